"""predict: a trained tiny run applied to landmark profiles written with the
project's own GCTx writer; compared with the evaluation path, round-tripped
through the readers, and fed bad input on the command line."""

import json
import os
import shutil
import subprocess
import sys
import threading

import h5py
import jax
import numpy as np
import pytest

from lsmtl_jax import evaluation
from lsmtl_jax import inference
from lsmtl_jax import metrics
from lsmtl_jax import parallel
from lsmtl_jax import predict
from lsmtl_jax import steps
from lsmtl_jax import train
from lsmtl_jax.data import formats

from conftest import REPO


def trained_run(tmp_path_factory):
  """One finished tiny run per pytest session, shared by the predict, report and
  relevance tests through the session's base temporary directory."""
  workdir = tmp_path_factory.getbasetemp() / "lsmtl_tiny_run"
  if not (workdir / "results.json").exists():
    from configs import tiny
    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path_factory.getbasetemp() / "lsmtl_tiny_cache")
    config.train.num_steps = 16
    train.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return inference.load_run(trained_run(tmp_path_factory))


@pytest.fixture(scope="module")
def val(run):
  """Validation rows: standardized landmarks and targets, and their sample ids."""
  rows = run.dataset.split("val")
  values = run.dataset.read_rows(rows)
  ids = [run.meta["sample_ids"][i] for i in rows]
  return values[:, :run.num_landmarks], values[:, run.num_landmarks:], ids


def _expression(run, z):
  scale, offset = run.landmark_scale_and_offset()
  return (z.astype(np.float64) * scale + offset).astype(np.float32)


def _predict(run, inp, out, **kw):
  return predict.predict_file(run.workdir, str(inp), str(out), predict.Options(**kw))


def _cli(*args):
  cmd = [sys.executable, "-m", "lsmtl_jax.predict", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_predictions_equal_the_evaluation_path(run, val, tmp_path):
  z_lm, z_tg, ids = val
  inp, out = tmp_path / "in.gctx", tmp_path / "out.gctx"
  formats.write_gctx(str(inp), z_lm, ids, run.landmark_ids)
  _predict(run, inp, out, input_units="standardized", output_units="standardized",
           batch_size=8, block_rows=7)
  with formats.open_matrix(str(out)) as m:
    got = m.read_rows(0, m.num_samples)
    assert m.sample_ids == ids and m.gene_ids == run.landmark_ids + run.target_ids
  np.testing.assert_array_equal(got[:, :run.num_landmarks], z_lm)
  p = got[:, run.num_landmarks:]

  # The evaluation path: steps.eval_stats_step over the split, on the best variables.
  mesh = run.mesh
  regressor = run.regressor
  stats_step = jax.jit(lambda s, b: steps.eval_stats_step(run.variables, s, b,
                                                          regressor=regressor))
  init = jax.jit(lambda: metrics.zeros(regressor.num_targets))
  summary, stats = evaluation.evaluate(run.dataset, run.dataset.split("val"), 16, stats_step,
                                       init, parallel.Placement(mesh))
  # Per-gene sums of predict's output in float64 numpy, against the step's.
  y, pp = z_tg.astype(np.float64), p.astype(np.float64)
  np.testing.assert_allclose(pp.sum(0), stats["sum_p"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose((y * pp).sum(0), stats["sum_yp"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.abs(y - pp).sum(0), stats["sum_abs"], rtol=1e-5, atol=1e-4)
  # ... and what training itself reported for the best checkpoint.
  results = json.load(open(os.path.join(run.workdir, "results.json")))
  assert np.abs(y - pp).mean() == pytest.approx(results["splits"]["val"]["mae_mean"], abs=1e-5)
  assert summary["mae_mean"] == pytest.approx(results["splits"]["val"]["mae_mean"], abs=1e-6)


def test_expression_units_round_trip_and_metadata(run, val, tmp_path):
  z_lm, _, ids = val
  x = _expression(run, z_lm)
  inp, out = tmp_path / "in.gctx", tmp_path / "out.gctx"
  formats.write_gctx(str(inp), x, ids, run.landmark_ids)
  summary = _predict(run, inp, out, threshold=0.3)
  with formats.open_matrix(str(out)) as m:
    got = m.read_rows(0, m.num_samples)
  # Landmarks exactly as given; targets = the model's z mapped with the training statistics.
  np.testing.assert_array_equal(got[:, :run.num_landmarks], x)
  z_pred = inference.Predictor(run, 64)(z_lm).astype(np.float64)
  scale, offset = run.target_scale_and_offset()
  np.testing.assert_allclose(got[:, run.num_landmarks:], z_pred * scale + offset,
                             rtol=1e-5, atol=2e-4)

  meta = predict.read_gctx_row_metadata(str(out))
  L, T = run.num_landmarks, run.num_targets
  assert set(predict.ROW_META_FIELDS) <= set(meta)
  assert list(meta["id"]) == run.landmark_ids + run.target_ids
  np.testing.assert_array_equal(meta["is_landmark"], [1] * L + [0] * T)
  assert np.isnan(meta["val_cc"][:L]).all() and np.isfinite(meta["val_cc"][L:]).all()
  # val CC and MAE per target from independent float64 sums over the val split.
  p = (z_pred * scale + offset)
  y = val[1].astype(np.float64) * scale + offset
  mae = np.abs(y - p).mean(0)
  cc = (2 * ((y - y.mean(0)) * (p - p.mean(0))).mean(0)
        / (y.var(0) + p.var(0) + (y.mean(0) - p.mean(0)) ** 2))
  np.testing.assert_allclose(meta["val_mae"][L:], mae, rtol=1e-4)
  np.testing.assert_allclose(meta["val_cc"][L:], cc, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(meta["well_inferred"][L:], (cc >= 0.3).astype(np.int8))
  assert summary["well_inferred"] == int((cc >= 0.3).sum()) > 0


def test_gene_order_and_extra_genes_change_nothing(run, val, tmp_path):
  z_lm, _, ids = val
  x = _expression(run, z_lm)
  formats.write_gctx(str(tmp_path / "a.gctx"), x, ids, run.landmark_ids)
  perm = np.random.default_rng(0).permutation(run.num_landmarks + 3)
  extra = np.random.default_rng(1).normal(8, 1, (len(ids), 3)).astype(np.float32)
  shuffled = np.concatenate([x, extra], 1)[:, perm]
  gene_ids = np.array(run.landmark_ids + ["X1", "X2", "X3"])[perm].tolist()
  formats.write_gctx(str(tmp_path / "b.gctx"), shuffled, ids, gene_ids)
  _predict(run, tmp_path / "a.gctx", tmp_path / "a_out.gctx")
  _predict(run, tmp_path / "b.gctx", tmp_path / "b_out.gctx")
  with formats.open_matrix(str(tmp_path / "a_out.gctx")) as a, \
      formats.open_matrix(str(tmp_path / "b_out.gctx")) as b:
    assert a.gene_ids == b.gene_ids
    np.testing.assert_array_equal(a.read_rows(0, a.num_samples), b.read_rows(0, b.num_samples))


def test_text_and_npy_formats_agree_with_gctx(run, val, tmp_path):
  z_lm, _, ids = val
  x = _expression(run, z_lm)
  formats.write_gctx(str(tmp_path / "in.gctx"), x, ids, run.landmark_ids)
  formats.write_table(str(tmp_path / "in.csv"), x, ids, run.landmark_ids, delimiter=",")
  np.save(tmp_path / "in.npy", x)
  (tmp_path / "genes.txt").write_text("\n".join(run.landmark_ids) + "\n")
  _predict(run, tmp_path / "in.gctx", tmp_path / "ref.gctx")
  _predict(run, tmp_path / "in.csv", tmp_path / "out.gct")
  _predict(run, tmp_path / "in.npy", tmp_path / "out.npy", gene_ids=str(tmp_path / "genes.txt"))
  with formats.open_matrix(str(tmp_path / "ref.gctx")) as m:
    ref = m.read_rows(0, m.num_samples)
  gct = formats.read_gct(str(tmp_path / "out.gct"))
  assert gct.sample_ids == ids and gct.gene_ids == run.landmark_ids + run.target_ids
  np.testing.assert_allclose(gct.read_rows(0, len(ids)), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ref)
  genes = (tmp_path / "out.npy.genes.tsv").read_text().splitlines()
  assert genes[0].split("\t") == ["id", *predict.ROW_META_FIELDS]
  assert len(genes) == 1 + run.num_landmarks + run.num_targets


def test_quantile_map_ignores_the_input_scale(run, val, tmp_path):
  """Rank mapping sees only the order within a profile: 2**v and v give the same."""
  z_lm, _, ids = val
  x = _expression(run, z_lm).astype(np.float64)
  formats.write_gctx(str(tmp_path / "log.gctx"), x.astype(np.float32), ids, run.landmark_ids)
  formats.write_gctx(str(tmp_path / "lin.gctx"), np.exp2(x).astype(np.float32), ids,
                     run.landmark_ids)
  _predict(run, tmp_path / "log.gctx", tmp_path / "a.gctx", quantile_map=True)
  _predict(run, tmp_path / "lin.gctx", tmp_path / "b.gctx", quantile_map=True)
  with formats.open_matrix(str(tmp_path / "a.gctx")) as a, \
      formats.open_matrix(str(tmp_path / "b.gctx")) as b:
    np.testing.assert_array_equal(a.read_rows(0, a.num_samples), b.read_rows(0, b.num_samples))


def test_missing_landmarks_are_listed_or_imputed(run, val, tmp_path):
  z_lm, _, ids = val
  x = _expression(run, z_lm)
  inp, out = tmp_path / "in.gctx", tmp_path / "out.gctx"
  formats.write_gctx(str(inp), x[:, 2:], ids, run.landmark_ids[2:])
  proc = _cli(f"--workdir={run.workdir}", f"--input={inp}", f"--output={out}")
  lines = _error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "2 of 24 landmarks missing" in lines[0] and run.landmark_ids[0] in lines[0]
  assert "--impute_missing" in lines[0] and not out.exists()
  assert os.listdir(tmp_path) == ["in.gctx"]

  proc = _cli(f"--workdir={run.workdir}", f"--input={inp}", f"--output={out}",
              "--impute_missing")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(f"predict: {len(ids)} profiles, 64 genes (24 landmarks, "
                                "2 imputed, 40 targets)")
  meta = predict.read_gctx_row_metadata(str(out))
  np.testing.assert_array_equal(meta["imputed"][:4], [1, 1, 0, 0])
  with formats.open_matrix(str(out)) as m:
    got = m.read_rows(0, m.num_samples)
  _, offset = run.landmark_scale_and_offset()
  np.testing.assert_allclose(got[:, :2], np.broadcast_to(offset[:2], (len(ids), 2)), rtol=1e-6)


def test_bad_runs_and_outputs_exit_2_with_one_line(run, val, tmp_path):
  z_lm, _, ids = val
  inp = tmp_path / "in.gctx"
  formats.write_gctx(str(inp), _expression(run, z_lm), ids, run.landmark_ids)
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_text(
      open(os.path.join(run.workdir, "config.json")).read())
  exists = tmp_path / "exists.gctx"
  exists.write_text("keep me")
  cases = [
      ([f"--workdir={unfinished}", f"--input={inp}", f"--output={tmp_path / 'o1.gctx'}"],
       "training has not finished"),
      ([f"--workdir={run.workdir}", f"--input={inp}", f"--output={exists}"],
       "already exists; pass --overwrite"),
      ([f"--workdir={run.workdir}", f"--input={tmp_path / 'in.xyz'}",
        f"--output={tmp_path / 'o2.gctx'}"], "cannot tell the format"),
      ([f"--workdir={run.workdir}", f"--input={inp}", f"--output={tmp_path / 'o3.gctx'}",
        "--input_units=standardized"], "values look unnormalized for --input_units=standardized"),
  ]
  for args, message in cases:
    proc = _cli(*args)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert "observed range [" in lines[0]
  assert exists.read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["exists.gctx", "in.gctx", "unfinished"]
  # --overwrite replaces it.
  predict.predict_file(run.workdir, str(inp), str(exists), predict.Options(overwrite=True))
  with formats.open_matrix(str(exists)) as m:
    assert m.num_samples == len(ids)


def test_a_run_without_a_model_is_refused(tmp_path):
  with pytest.raises(inference.RunError, match="no such run directory"):
    inference.load_run(str(tmp_path / "nothing"))
  (tmp_path / "lsr").mkdir()
  (tmp_path / "lsr" / "config.json").write_text(json.dumps({"method": "lsr"}))
  with pytest.raises(inference.RunError, match="method 'lsr' has no network checkpoint"):
    inference.load_run(str(tmp_path / "lsr"))


def test_csv_output_is_comma_separated(run, val, tmp_path):
  # The delimiter follows the output's name (it once followed the temporary
  # file's name and wrote tabs into x.csv).
  import csv
  z_lm, _, ids = val
  formats.write_gctx(str(tmp_path / "in.gctx"), _expression(run, z_lm), ids, run.landmark_ids)
  _predict(run, tmp_path / "in.gctx", tmp_path / "out.csv")
  _predict(run, tmp_path / "in.gctx", tmp_path / "out.tsv")
  with open(tmp_path / "out.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["id", *predict.ROW_META_FIELDS, *ids]
  assert len(rows) == 1 + run.num_landmarks + run.num_targets
  assert all(len(r) == len(rows[0]) for r in rows)
  assert "\t" not in (tmp_path / "out.csv").read_text()
  with open(tmp_path / "out.tsv", newline="") as f:
    assert list(csv.reader(f, delimiter="\t")) == rows


def _many_profiles(run, val, copies=20):
  """The val profiles `copies` times over with noise, in log2 units (float32)."""
  z_lm, _, _ = val
  rng = np.random.default_rng(3)
  z = np.concatenate([z_lm + rng.normal(0, 0.1, z_lm.shape) for _ in range(copies)])
  return _expression(run, z), [f"P{i}" for i in range(len(z))]


@pytest.mark.parametrize("piece_bytes", [predict.READ_PIECE_BYTES, 1])
def test_streamed_outputs_equal_a_sequential_reference(run, val, tmp_path, monkeypatch,
                                                       piece_bytes):
  """Reading, predicting and writing overlap in threads, 60 blocks of 10 rows
  (read whole, or as two pieces of one 5-row storage chunk each); the three
  outputs equal, bit for bit, the plain computation: every row at once, the
  model, -+ the calibration's half-width, to log2, cast to float32 last."""
  monkeypatch.setattr(predict, "READ_PIECE_BYTES", piece_bytes)
  x, ids = _many_profiles(run, val)
  inp, out = tmp_path / "in.gctx", tmp_path / "out.gctx"
  formats.write_gctx(str(inp), x, ids, run.landmark_ids, chunk_rows=5)
  summary = _predict(run, inp, out, intervals=0.8, block_rows=10, batch_size=8)

  L = run.num_landmarks
  scale, offset = run.landmark_scale_and_offset()
  t_scale, t_offset = run.target_scale_and_offset()
  y = inference.Predictor(run, 8)(((x - offset) / scale).astype(np.float32)).astype(np.float64)
  q = run.calibration(8).quantile(0.8)
  expected = {"prediction": y, "lower": y - q, "upper": y + q}
  paths = {"prediction": str(out), **predict.interval_paths(str(out))}
  for kind, path in paths.items():
    with formats.open_matrix(path) as m:
      got = m.read_rows(0, m.num_samples)
      assert m.sample_ids == ids
    np.testing.assert_array_equal(got[:, :L], x)  # measured: as given
    np.testing.assert_array_equal(got[:, L:],
                                  (expected[kind] * t_scale + t_offset).astype(np.float32))
  stages = summary["stages"]
  assert all(stages[k] > 0 for k in ("wall", "read", "compute", "model", "write"))
  # Output blocks are reused once written: a few per output, not one per block.
  assert set(stages["buffers"]) == set(paths)
  assert all(1 <= c <= predict.WRITE_BEHIND + 2 for c in stages["buffers"].values())
  assert summary["read_bytes"] == x.nbytes
  assert summary["written_bytes"] == sum(os.path.getsize(p) for p in paths.values())
  assert sorted(os.listdir(tmp_path)) == ["in.gctx", "out.gctx", "out.lower.gctx",
                                          "out.upper.gctx"]


def test_a_damaged_block_mid_run_leaves_nothing(run, val, tmp_path):
  """A compressed chunk that no longer inflates, in the fifth block: the reader
  thread's error is predict's one line, after earlier blocks were written."""
  x, ids = _many_profiles(run, val)
  inp = tmp_path / "in.gctx"
  formats.write_gctx(str(inp), x, ids, run.landmark_ids, chunk_rows=10, compression="gzip")
  with h5py.File(inp, "r") as f:
    chunk = f[formats.DATA_NODE].id.get_chunk_info(20)  # rows 200-209
  with open(inp, "r+b") as f:
    f.seek(chunk.byte_offset + 2)
    f.write(bytes(range(256))[:chunk.size - 4])
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  proc = _cli(f"--workdir={run.workdir}", f"--input={inp}", f"--output={out_dir / 'p.gctx'}",
              "--intervals=0.8", "--block_rows=50", "--batch_size=8")
  lines = _error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"error: {inp}: cannot read rows 200-250"), lines[0]
  assert "Traceback" not in proc.stderr
  assert os.listdir(out_dir) == []  # no output, no temporary


def test_an_output_folder_removed_mid_run_is_one_error(run, val, tmp_path, monkeypatch):
  """The writer threads' error (their files' folder is gone) reaches the caller
  as predict's one-line error, and no thread is left running."""
  x, ids = _many_profiles(run, val)
  inp = tmp_path / "in.gctx"
  formats.write_gctx(str(inp), x, ids, run.landmark_ids, chunk_rows=10)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  compute, calls = predict.BlockPredictor.__call__, []

  def remove_on_the_third_block(self, *args):
    calls.append(1)
    if len(calls) == 3:
      shutil.rmtree(out_dir)
    return compute(self, *args)

  monkeypatch.setattr(predict.BlockPredictor, "__call__", remove_on_the_third_block)
  threads = threading.active_count()
  with pytest.raises(predict.PredictError) as e:
    _predict(run, inp, out_dir / "p.gctx", intervals=0.8, block_rows=20, batch_size=8)
  message = str(e.value)
  assert "\n" not in message and " cannot write: " in message, message
  assert message.startswith(tuple(str(out_dir / n) for n in ("p.gctx", "p.lower.gctx",
                                                              "p.upper.gctx"))), message
  assert threading.active_count() == threads
  assert not out_dir.exists() and sorted(os.listdir(tmp_path)) == ["in.gctx"]


def test_outputs_that_cannot_fit_are_refused_before_any_work(run, val, tmp_path, monkeypatch):
  """A disk that fills under HDF5 can crash the process at close (h5py #914), so
  predict compares the outputs' size with the free space first."""
  x, ids = _many_profiles(run, val, copies=1)
  inp = tmp_path / "in.gctx"
  formats.write_gctx(str(inp), x, ids, run.landmark_ids)
  need = len(ids) * (run.num_landmarks + run.num_targets) * 4 * 3  # three float32 files
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda p: real(p)._replace(free=need - 1))
  with pytest.raises(predict.PredictError, match=r"the outputs need about .* GB and .* GB "
                     "free; free some space or write them elsewhere"):
    _predict(run, inp, tmp_path / "p.gctx", intervals=0.8)
  assert sorted(os.listdir(tmp_path)) == ["in.gctx"]
  monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))
  _predict(run, inp, tmp_path / "p.gctx", intervals=0.8)
