"""export: a tiny run as one model file; predict --model gives the run's
predictions bit for bit without the run directory or the dataset; a newer
format version or a failing checksum is one `error:` line and exit code 2."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import lsmtl_jax
from lsmtl_jax import checkpoints
from lsmtl_jax import export
from lsmtl_jax import inference
from lsmtl_jax import model_file
from lsmtl_jax import predict
from lsmtl_jax.data import formats
from lsmtl_jax.data import sources
from lsmtl_jax.data import store

from conftest import REPO
from test_predict import trained_run


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return inference.load_run(trained_run(tmp_path_factory))


@pytest.fixture(scope="module")
def model_path(run, tmp_path_factory):
  """The tiny run exported on the command line (and refused a second time)."""
  path = str(tmp_path_factory.mktemp("model") / "tiny.lsmtl")
  proc = _cli("lsmtl_jax.export", f"--workdir={run.workdir}", f"--output={path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("export: deep_lsmtl (best step 16), 24 landmarks, 40 targets, "
                                "intervals from 30 validation profiles"), proc.stdout
  proc = _cli("lsmtl_jax.export", f"--workdir={run.workdir}", f"--output={path}")
  lines = _error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1 and "already exists" in lines[0], proc.stderr
  assert os.listdir(os.path.dirname(path)) == ["tiny.lsmtl"]
  return path


@pytest.fixture(scope="module")
def profiles(run, tmp_path_factory):
  """The run's test landmarks in log2 units, as GCTx."""
  rows = run.dataset.split("test")
  z = run.dataset.read_rows(rows)[:, :run.num_landmarks]
  scale, offset = run.landmark_scale_and_offset()
  path = str(tmp_path_factory.mktemp("profiles") / "in.gctx")
  formats.write_gctx(path, (z * scale + offset).astype(np.float32),
                     [run.meta["sample_ids"][i] for i in rows], run.landmark_ids)
  return path


def test_the_file_holds_every_part_with_its_checksum(run, model_path):
  with zipfile.ZipFile(model_path) as zf:
    names = set(zf.namelist())
    manifest = json.loads(zf.read("manifest.json"))
    model = json.loads(zf.read("model.json"))
  assert manifest["format"] == "lsmtl_jax.model" and manifest["format_version"] == 1
  assert manifest["lsmtl_jax_version"] == lsmtl_jax.__version__
  assert set(manifest["parts"]) == names - {"manifest.json"}
  for part in ("model.json", "arrays/standardization/mean.npy", "arrays/landmark_reference.npy",
               "arrays/validation/cc.npy", "arrays/validation/mae.npy",
               "arrays/calibration/quantiles.npy", "arrays/variables/params/head/kernel.npy"):
    assert part in names, part
  assert model["config"] == run.config.to_dict()
  assert model["landmarks"] == {"ids": run.landmark_ids, "symbols": run.landmark_symbols}
  assert model["targets"]["ids"] == run.target_ids
  assert model["provenance"]["best_step"] == run.best_step == 16
  assert model["calibration"]["source"] == "validation"

  loaded = inference.load_model(model_path)
  for mine, theirs in zip(jax_leaves(loaded.variables), jax_leaves(run.variables)):
    np.testing.assert_array_equal(mine, theirs)
  for a, b in zip(loaded.landmark_scale_and_offset() + loaded.target_scale_and_offset(),
                  run.landmark_scale_and_offset() + run.target_scale_and_offset()):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.landmark_reference(), run.landmark_reference())
  for key, value in run.validation_metrics().items():
    np.testing.assert_array_equal(loaded.validation_metrics()[key], value)
  np.testing.assert_array_equal(loaded.calibration().quantiles, run.calibration().quantiles)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _read(path):
  with formats.open_matrix(path) as m:
    return m.read_rows(0, m.num_samples), m.sample_ids, m.gene_ids


@pytest.mark.parametrize("name, options", [
    ("default.gctx", dict(intervals=0.9)),
    ("mapped.npy", dict(quantile_map=True, output_units="standardized")),
    ("table.csv", dict(threshold=0.2)),
])
def test_predictions_from_the_run_and_the_file_are_identical(run, model_path, profiles,
                                                             tmp_path, monkeypatch, name,
                                                             options):
  from_run = str(tmp_path / f"run_{name}")
  from_file = str(tmp_path / f"file_{name}")
  a = predict.predict_file(run.workdir, profiles, from_run, predict.Options(**options))

  # The file needs no run directory, no dataset and no checkpoint.
  def refuse(*args, **kwargs):
    raise AssertionError("the model file must be enough")
  for module, attr in ((inference, "load_run"), (sources, "load_dataset"),
                       (store, "open_dataset"), (checkpoints, "read_best")):
    monkeypatch.setattr(module, attr, refuse)
  b = predict.predict_file("", profiles, from_file, predict.Options(**options),
                           model=model_path)
  monkeypatch.undo()

  varies = ("seconds", "stages", "output", "interval_files")  # timings and names
  assert {k: v for k, v in a.items() if k not in varies} == \
      {k: v for k, v in b.items() if k not in varies}
  outputs = [(from_run, from_file)]
  if options.get("intervals"):
    outputs += list(zip(predict.interval_paths(from_run).values(),
                        predict.interval_paths(from_file).values()))
  for x, y in outputs:
    if name.endswith(".npy"):
      np.testing.assert_array_equal(np.load(x), np.load(y))  # bit for bit (NaN == NaN)
      assert open(x + ".genes.tsv").read() == open(y + ".genes.tsv").read()
    elif name.endswith(".csv"):
      assert open(x).read() == open(y).read()
    else:
      vx, vy = _read(x), _read(y)
      np.testing.assert_array_equal(vx[0], vy[0])
      assert vx[1:] == vy[1:]
      mx, my = predict.read_gctx_row_metadata(x), predict.read_gctx_row_metadata(y)
      assert set(mx) == set(my)
      for field in mx:
        np.testing.assert_array_equal(mx[field], my[field])


def _rewrite(src, dst, change):
  """A copy of the zip `src` with each member's bytes passed through change(name, data)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      zout.writestr(name, change(name, zin.read(name)))


def test_a_newer_format_or_a_failing_checksum_is_one_line_exit_2(model_path, profiles,
                                                                 tmp_path):
  def newer(name, data):
    if name == "manifest.json":
      manifest = json.loads(data)
      manifest.update(format_version=2, lsmtl_jax_version="9.0")
      return json.dumps(manifest).encode()
    return data

  def tampered(name, data):
    if name == "arrays/variables/params/head/kernel.npy":
      data = bytearray(data)
      data[-3] ^= 0x10  # a bit of one weight; the zip's own CRC is rewritten to match
      return bytes(data)
    return data

  _rewrite(model_path, tmp_path / "newer.lsmtl", newer)
  _rewrite(model_path, tmp_path / "tampered.lsmtl", tampered)
  cases = [("newer.lsmtl", "model format version 2 (written by lsmtl_jax 9.0) is newer than "
                           "this lsmtl_jax 0.1.0 reads (up to 1); upgrade lsmtl_jax"),
           ("tampered.lsmtl", "part arrays/variables/params/head/kernel.npy fails its sha256 "
                              "check")]
  for model, message in cases:
    out = tmp_path / f"{model}.gctx"
    proc = _cli("lsmtl_jax.predict", f"--model={tmp_path / model}", f"--input={profiles}",
                f"--output={out}")
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert message in lines[0] and lines[0].startswith(f"error: {tmp_path / model}: ")
    assert not out.exists()


def test_damaged_or_foreign_files_are_refused(model_path, tmp_path):
  data = bytearray(open(model_path, "rb").read())
  with zipfile.ZipFile(model_path) as zf:
    info = zf.getinfo("arrays/variables/params/head/kernel.npy")
  extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
  start = info.header_offset + 30 + len(info.filename) + extra  # the member's bytes
  data[start + info.file_size - 5] ^= 1
  (tmp_path / "flipped.lsmtl").write_bytes(bytes(data))
  (tmp_path / "text.lsmtl").write_text("not a model")
  with zipfile.ZipFile(model_path) as zin, zipfile.ZipFile(tmp_path / "lacking.lsmtl", "w") as zout:
    for name in zin.namelist():
      if name != "arrays/landmark_reference.npy":
        zout.writestr(name, zin.read(name))
  cases = [("flipped.lsmtl", "part arrays/variables/params/head/kernel.npy is damaged"),
           ("text.lsmtl", "not an lsmtl_jax model file"),
           ("lacking.lsmtl", "part arrays/landmark_reference.npy is missing"),
           ("absent.lsmtl", "no such model file")]
  for name, message in cases:
    with pytest.raises(inference.RunError, match=message):
      inference.load_model(str(tmp_path / name))
  with pytest.raises(inference.RunError, match="is a directory, not a model file"):
    inference.load_model(str(tmp_path))


def test_predict_takes_one_of_workdir_and_model(run, model_path, profiles, tmp_path):
  for workdir, model in (("", ""), (run.workdir, model_path)):
    with pytest.raises(predict.PredictError, match="--workdir=RUN .* or --model=MODEL"):
      predict.predict_file(workdir, profiles, str(tmp_path / "o.gctx"), predict.Options(),
                           model=model)
  with pytest.raises(export.ExportError, match="is a directory"):
    export.export(run.workdir, str(tmp_path))
  assert model_file.FORMAT_VERSION == 1
