"""The device mesh: N training steps on 1x8, 2x4, 4x2 and 8x1 meshes of simulated
CPU devices give the parameters and metrics of a single-device run, and the head
is split along the targets."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from lsmtl_jax import parallel

from conftest import REPO

STEPS = 12
MESHES = ("1x8", "2x4", "4x2", "8x1")


def _mesh_cfg(data, model):
  return ml_collections.ConfigDict({"data": data, "model": model, "fsdp": False})


def test_mesh_shape_fills_and_validates():
  assert parallel.mesh_shape(_mesh_cfg(-1, 2), 8) == (4, 2)
  assert parallel.mesh_shape(_mesh_cfg(2, -1), 8) == (2, 4)
  assert parallel.mesh_shape(_mesh_cfg(8, 1), 8) == (8, 1)
  with pytest.raises(parallel.MeshError, match="needs 6 devices, found 8"):
    parallel.mesh_shape(_mesh_cfg(3, 2), 8)
  with pytest.raises(parallel.MeshError, match="does not divide"):
    parallel.mesh_shape(_mesh_cfg(-1, 3), 8)
  with pytest.raises(parallel.MeshError, match="both be -1"):
    parallel.mesh_shape(_mesh_cfg(-1, -1), 8)


def test_padded_targets_independent_of_mesh():
  assert parallel.padded_targets(9520, 128, 1) == 9600
  assert parallel.padded_targets(9520, 128, 8) == 9600
  assert parallel.padded_targets(40, 8, 4) == 40
  with pytest.raises(parallel.MeshError, match="mesh.model=7 does not divide"):
    parallel.padded_targets(9520, 128, 7)


def _run_worker(cache, out, meshes, devices, extra=None, tag=""):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  cmd = [sys.executable, os.path.join(REPO, "tests", "mesh_worker.py"), str(cache), str(out),
         str(STEPS), meshes, json.dumps(extra or {}), tag]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  out = tmp_path_factory.mktemp("meshes")
  _run_worker(cache, out, "1x1", devices=1)
  _run_worker(cache, out, ",".join(MESHES), devices=8)
  _run_worker(cache, out, "4x2", devices=8, extra={"mesh.fsdp": True}, tag="_fsdp")
  return out


def _load(out, shape):
  with open(out / f"summary_{shape}.json") as f:
    summary = json.load(f)
  return summary, dict(np.load(out / f"params_{shape}.npz"))


@pytest.mark.parametrize("shape", MESHES + ("4x2_fsdp",))
def test_sharded_training_matches_single_device(mesh_runs, shape):
  ref_summary, ref_params = _load(mesh_runs, "1x1")
  summary, params = _load(mesh_runs, shape)
  assert summary["devices"] == 8 and ref_summary["devices"] == 1
  assert params.keys() == ref_params.keys()
  for name in ref_params:
    np.testing.assert_allclose(params[name], ref_params[name], rtol=2e-4, atol=2e-5,
                               err_msg=name)
  for split in ("val", "test"):
    for key in ("mae_mean", "mae_std", "cc_mean", "cc_std"):
      assert summary["splits"][split][key] == pytest.approx(
          ref_summary["splits"][split][key], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_head_kernel_is_split_along_targets(mesh_runs, shape):
  summary, _ = _load(mesh_runs, shape)
  model = int(shape.split("x")[1])
  rows, cols = summary["head_shape"]
  assert {tuple(s) for s in summary["head_shard_shapes"]} == {(rows, cols // model)}
  assert "model" in summary["head_spec"] or model == 1


def test_fsdp_splits_trunk_kernels_over_data(mesh_runs):
  summary, _ = _load(mesh_runs, "4x2_fsdp")
  assert "data" in summary["trunk_spec"]


@pytest.fixture(scope="module")
def multiprocess_run(tmp_path_factory, mesh_runs):
  """Two processes of four CPU devices each, one 4x2 mesh, talking over gloo."""
  workdir = tmp_path_factory.mktemp("multiprocess")
  cache = tmp_path_factory.mktemp("mp_cache")
  env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "4", "configs/tiny.py",
       str(workdir), f"--config.data.cache_dir={cache}", f"--config.train.num_steps={STEPS}",
       "--config.mesh.data=4", "--config.mesh.model=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join((workdir / f"process_{i}.log").read_text()[-3000:] for i in range(2)
                 if (workdir / f"process_{i}.log").exists())
  assert proc.returncode == 0, proc.stderr + logs
  return workdir, cache


def test_two_processes_match_single_device(multiprocess_run, mesh_runs):
  workdir, _ = multiprocess_run
  ref, _ = _load(mesh_runs, "1x1")
  results = json.load(open(workdir / "results.json"))
  assert results["mesh"] == {"data": 4, "model": 2}
  for split in ("val", "test"):
    for key in ("mae_mean", "cc_mean"):
      assert results["splits"][split][key] == pytest.approx(ref["splits"][split][key],
                                                            rel=1e-4, abs=1e-5)
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
  assert "process 1 of 2, 4 local of 8 devices" in logs[1]


def test_checkpoint_from_a_4x2_two_process_mesh_restores_on_one_device(multiprocess_run):
  """Re-running the finished job on one device restores the sharded checkpoints
  (latest and best) and re-evaluates to the same metrics."""
  workdir, cache = multiprocess_run
  before = json.load(open(workdir / "results.json"))
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.data.cache_dir={cache}", f"--config.train.num_steps={STEPS}"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from step {STEPS}" in proc.stderr
  after = json.load(open(workdir / "results.json"))
  assert after["mesh"] == {"data": 1, "model": 1}
  for split in ("val", "test"):
    assert after["splits"][split]["mae_mean"] == pytest.approx(
        before["splits"][split]["mae_mean"], rel=1e-5)
