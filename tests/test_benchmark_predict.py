"""benchmark_predict through its command at a tiny size: it trains and exports
a tiny model, writes a LINCS-shaped GCTx, runs predict twice in child
processes and reports; the report's fields, the input's layout and the
prediction it wrote are checked against independent references (no timing
assertions: speed lives in the benchmark's report)."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lsmtl_jax import benchmark_predict
from lsmtl_jax import inference
from lsmtl_jax import perf
from lsmtl_jax import predict
from lsmtl_jax.data import formats

from conftest import REPO

PROFILES, SMALL, GENES, LANDMARKS = 300, 120, 100, 24


def _bench(*args):
  cmd = [sys.executable, "-m", "lsmtl_jax.benchmark_predict", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _read(path):
  with formats.open_matrix(path) as m:
    return m.read_rows(0, m.num_samples)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """One run of the default path (training included) with the tiny config."""
  work = tmp_path_factory.mktemp("bench")
  report = work / "report.json"
  proc = _bench(f"--workdir={work}", f"--profiles={PROFILES}", f"--small_profiles={SMALL}",
                f"--genes={GENES}", f"--landmarks={LANDMARKS}",
                "--train_config=configs/tiny.py", "--train_steps=2", "--train_samples=300",
                "--block_rows=50", "--batch_size=32", f"--json={report}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work, json.loads(report.read_text()), proc.stdout


def test_the_report_has_every_field(bench):
  work, r, stdout = bench
  assert r["profiles"] == PROFILES and r["genes"] == GENES
  assert (r["landmarks"], r["targets"]) == (LANDMARKS, GENES - LANDMARKS)
  assert r["intervals"] == 0.9
  for stage in ("read", "compute", "model", "write"):
    assert r["stage_s"][stage] > 0, stage
  assert r["stage_s"]["model"] <= r["stage_s"]["compute"]
  assert r["stream_wall_s"] > 0 and r["wall_s"] > r["stream_wall_s"]
  assert r["stage_sum_over_wall"] == pytest.approx(
      sum(r["stage_s"][k] for k in ("read", "compute", "write")) / r["stream_wall_s"])
  assert set(r["peak_rss_bytes"]) == {str(SMALL), str(PROFILES)}
  assert all(v > 50 * 2**20 for v in r["peak_rss_bytes"].values())  # a Python with JAX
  assert r["rss_growth_bytes_per_profile"] == pytest.approx(
      (r["peak_rss_bytes"][str(PROFILES)] - r["peak_rss_bytes"][str(SMALL)])
      / (PROFILES - SMALL))
  for size in (SMALL, PROFILES):  # sampled every 0.1 s: no more than the true peak
    quarters = r["rss_by_quarter_bytes"][str(size)]
    assert len(quarters) == 4
    assert all(q is None or 0 < q <= r["peak_rss_bytes"][str(size)] for q in quarters)
    assert max(q or 0 for q in quarters) > 50 * 2**20  # JAX loaded by then
    buffers = r["stream_buffers"][str(size)]
    assert set(buffers) == {"prediction", "lower", "upper"}
    assert all(1 <= c <= predict.WRITE_BEHIND + 2 for c in buffers.values())
  # Bytes: the float32 values read, and the three files on disk.
  assert r["read_bytes"] == PROFILES * GENES * 4
  outputs = [r["output"], *predict.interval_paths(r["output"]).values()]
  assert r["written_bytes"] == sum(os.path.getsize(p) for p in outputs)
  assert r["read_mb_per_s"] > 0 and r["write_mb_per_s"] > 0
  # FLOPs: 2 per multiply-add of the tiny DenseNet, its head padded as training pads it.
  model = inference.load_model(r["model"])
  padded = -(-(GENES - LANDMARKS) // model.config.mesh.target_multiple) * (
      model.config.mesh.target_multiple)
  assert r["flops_per_profile"] == 2 * perf.dense_macs_per_example(
      model.config.model, LANDMARKS, padded)
  lincs = r["lincs"]
  assert lincs["profiles"] == benchmark_predict.LINCS_PROFILES
  assert lincs["cpu_s"] > 0 and lincs["gpu_s"] > 0
  assert lincs["gpu_bound_by"] in lincs["gpu_bounds_s"]
  assert lincs["gpu_s"] == pytest.approx(r["startup_s"] + max(lincs["gpu_bounds_s"].values()))
  assert "| profiles/s (streaming; with startup) |" in stdout
  assert not [p for p in os.listdir(work) if ".tmp-" in p]


def test_the_input_is_lincs_shaped(bench):
  work, r, _ = bench
  with h5py.File(r["input"], "r") as f:
    assert f[formats.DATA_NODE].shape == (PROFILES, GENES)
    assert f[formats.DATA_NODE].dtype == np.float32
    ids = [x.decode() for x in f[formats.ROW_ID_NODE][()]]
    is_lm = f["0/META/ROW/pr_is_lm"][()]
    entrez = f["0/META/ROW/pr_gene_id"][()]
  assert all(i.isdigit() for i in ids) and entrez.tolist() == [int(i) for i in ids]
  assert is_lm.sum() == LANDMARKS and np.diff(np.flatnonzero(is_lm)).max() > 1  # scattered
  model = inference.load_model(r["model"])  # its genes are the input's, by id
  assert sorted(model.landmark_ids) == sorted(i for i, f in zip(ids, is_lm) if f)
  assert sorted(model.target_ids) == sorted(i for i, f in zip(ids, is_lm) if not f)
  # The small run's input is the large one's first rows.
  small = str(work / f"first_{SMALL}.gctx")
  np.testing.assert_array_equal(_read(small), _read(r["input"])[:SMALL])


def test_the_prediction_equals_predict_run_directly(bench, tmp_path):
  _, r, _ = bench
  direct = str(tmp_path / "direct.gctx")
  predict.predict_file("", r["input"], direct,
                       predict.Options(intervals=0.9, block_rows=50, batch_size=32),
                       model=r["model"])
  for mine, theirs in zip([r["output"], *predict.interval_paths(r["output"]).values()],
                          [direct, *predict.interval_paths(direct).values()]):
    np.testing.assert_array_equal(_read(mine), _read(theirs))


def test_rss_by_quarter_takes_the_highest_sample_in_each_quarter():
  samples = [(0.5, 10), (1.0, 30), (2.4, 20), (2.6, 50), (3.9, 40), (4.2, 60)]
  assert benchmark_predict.rss_by_quarter(samples, 4.0) == [10, 30, 50, 60]
  assert benchmark_predict.rss_by_quarter([(0.1, 5)], 4.0) == [5, None, None, None]


def test_a_given_model_and_input_are_reused(bench, tmp_path):
  work, r, _ = bench
  again = tmp_path / "again"
  proc = _bench(f"--workdir={again}", f"--model={r['model']}", f"--input={r['input']}",
                "--small_profiles=60", "--block_rows=50", "--batch_size=32",
                f"--json={again / 'r.json'}", "--nokeep_outputs")
  assert proc.returncode == 0, proc.stderr[-3000:]
  s = json.loads((again / "r.json").read_text())
  assert (s["input"], s["model"], s["profiles"]) == (r["input"], r["model"], PROFILES)
  assert sorted(s["peak_rss_bytes"], key=int) == ["60", str(PROFILES)]
  assert not [p for p in os.listdir(again) if p.startswith("train")]  # nothing trained
  assert not os.path.exists(s["output"])  # --nokeep_outputs


def test_bad_flags_are_one_line_before_any_work(tmp_path):
  cases = [(["--landmarks=0"], "--landmarks=0 must be positive"),
           ([f"--model={tmp_path / 'none.lsmtl'}"], "none.lsmtl: no such file"),
           (["--intervals=1.5"], "--intervals=1.5 is a coverage"),
           (["--profiles=1000000000"], "GB of disk")]
  for args, needle in cases:
    proc = _bench(f"--workdir={tmp_path / 'w'}", *args)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
  assert os.listdir(tmp_path) == []
