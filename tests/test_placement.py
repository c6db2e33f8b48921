"""data.placement: the device-resident training matrix gives the host loader's
batches (same rows, same order, same sharding), so runs, resumes and sharded
runs end with the same results.json to the last digit; 'auto' and the memory
guard."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from lsmtl_jax import resident
from lsmtl_jax import train

from conftest import REPO

# Everything of results.json but the timing.
METRIC_FIELDS = ("method", "steps", "best_step", "stopped_early", "nonfinite_steps", "splits",
                 "padded_targets", "num_parameters")


def _metrics(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return {k: results.get(k) for k in METRIC_FIELDS}


def _gene_stats(workdir):
  return dict(np.load(os.path.join(workdir, "gene_stats.npz")))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def _tiny(cache_dir, placement):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config.data.placement = placement
  config.train.measure_peak = False
  return config


def _demo(cache_dir, placement):
  """configs/demo.py (Deep-LSMTL, then LSR and the DenseNet beside it), shrunk."""
  from configs import demo
  config = demo.get_config()
  config.data.cache_dir = cache_dir
  config.data.placement = placement
  config.data.synthetic.update(dict(num_samples=500, num_landmarks=40, num_targets=150,
                                    num_programs=4, num_modules=10, num_tissues=3))
  config.model.hidden, config.lsmtl.bottleneck = 24, 8
  config.train.update(dict(batch_size=40, num_epochs=2, log_every=5, eval_every=5,
                           checkpoint_every=5, eval_batch_size=50, measure_peak=False))
  config.report = False
  return config


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, cache):
  out = {}
  for placement in ("host", "device"):
    workdir = str(tmp_path_factory.mktemp(f"tiny_{placement}"))
    results = train.train_and_evaluate(_tiny(cache, placement), workdir)
    assert results["placement"] == placement
    out[placement] = workdir
  return out


def test_tiny_host_and_device_results_identical(tiny_runs):
  host, device = _metrics(tiny_runs["host"]), _metrics(tiny_runs["device"])
  assert host == device
  assert host["steps"] == 24 and host["splits"]["val"]["mae_mean"] > 0
  for name, values in _gene_stats(tiny_runs["host"]).items():
    np.testing.assert_array_equal(values, _gene_stats(tiny_runs["device"])[name], err_msg=name)


def test_shrunk_demo_host_and_device_results_identical(tmp_path, cache):
  runs = {}
  for placement in ("host", "device"):
    train.train_and_evaluate(_demo(cache, placement), str(tmp_path / placement))
    runs[placement] = str(tmp_path / placement)
  for sub in ("", "compare/densenet", "compare/lsr"):
    host = _metrics(os.path.join(runs["host"], sub))
    assert host == _metrics(os.path.join(runs["device"], sub)), sub
  # 400 training rows, batches of 40: two epochs of 10 steps, so the second
  # epoch's order (a fresh permutation) is used too.
  assert _metrics(runs["host"])["steps"] == 20


def _wait_for_checkpoint(workdir, min_step, proc, timeout=180):
  import time
  latest = os.path.join(workdir, "checkpoints", "latest")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "finished before it could be killed"
    steps = [int(d) for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
    if steps and max(steps) >= min_step:
      return max(steps)
    time.sleep(0.01)
  raise AssertionError("no checkpoint appeared")


def test_device_placement_killed_and_resumed_matches_host(tiny_runs, cache, tmp_path):
  """SIGKILL mid-run under 'device', resumed under 'device': the uninterrupted
  host run's results."""
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "lsmtl_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
         "--config.data.placement=device", "--config.train.measure_peak=false"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  log = open(tmp_path / "log", "w+")
  proc = subprocess.Popen(cmd + ["--config.train.checkpoint_every=1"], cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  reached = _wait_for_checkpoint(workdir, 9, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and reached < 24
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resumed from step" in proc.stderr
  assert "Training batches from the device" in proc.stderr
  assert _metrics(workdir) == _metrics(tiny_runs["host"])


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, cache, tiny_dataset):
  out = tmp_path_factory.mktemp("eight")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "placement_worker.py"),
                         cache, str(out), tiny_dataset.path], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "summary.json") as f:
    return out, json.load(f)


@pytest.mark.parametrize("shape", ["1x8", "8x1", "4x2", "2x4"])
def test_gather_on_a_mesh_is_the_rows_numpy_picks(eight_devices, tiny_dataset, shape):
  out, summary = eight_devices
  assert summary["devices"] == 8
  got = np.load(out / f"gather_{shape}.npz")
  rows = tiny_dataset.read_rows(got["rows"])
  lm = tiny_dataset.num_landmarks
  # Bit patterns, so a -0.0 would have to stay -0.0.
  np.testing.assert_array_equal(got["x"].view(np.int32), rows[:, :lm].view(np.int32))
  np.testing.assert_array_equal(got["y"].view(np.int32), rows[:, lm:].view(np.int32))
  gather = summary["gathers"][shape]
  assert gather["same_sharding"]
  data = int(shape.split("x")[0])
  assert gather["shard_rows"] == [-(-37 // data)]  # rows split over 'data', padded


def test_sharded_runs_host_and_device_identical(eight_devices):
  _, summary = eight_devices
  shape = "4x2"
  host, device = summary["runs"][f"{shape}_host"], summary["runs"][f"{shape}_device"]
  assert host["mesh"] == device["mesh"] == dict(zip(("data", "model"),
                                                    map(int, shape.split("x"))))
  assert {k: host.get(k) for k in METRIC_FIELDS} == {k: device.get(k) for k in METRIC_FIELDS}
  assert (host["placement"], device["placement"]) == ("host", "device")


def test_auto_picks_device_when_the_matrix_fits_a_quarter():
  gib = 2**30
  assert resident.choose("auto", gib, 8 * gib, "gpu", 1)[0] == "device"
  assert resident.choose("auto", gib, 4 * gib, "gpu", 1)[0] == "device"  # exactly 25 %
  placement, why = resident.choose("auto", gib + 1, 4 * gib, "gpu", 1)
  assert placement == "host" and "does not fit 25%" in why
  assert resident.choose("auto", gib, 64 * gib, "cpu", 1)[0] == "host"
  assert resident.choose("device", 100 * gib, gib, "cpu", 1)[0] == "device"
  assert resident.choose("host", 1, 64 * gib, "tpu", 1)[0] == "host"


def test_bytes_per_device_splits_padded_rows():
  # GEO's training split: 88,807 x 10,463 float32.
  assert resident.bytes_per_device(88_807, 10_463, 1) == 4 * 88_807 * 10_463
  assert resident.bytes_per_device(88_807, 10_463, 8) == 4 * 11_101 * 10_463
  assert resident.padded_rows(37, 4) == 40 and resident.padded_rows(40, 4) == 40


def test_memory_guard_counts_the_resident_matrix(tmp_path, cache):
  """A limit the step fits but step + matrix does not: 'host' trains, 'device'
  is refused naming the matrix."""
  from lsmtl_jax import build
  from lsmtl_jax import config_lib
  from lsmtl_jax import memory
  config = config_lib.resolve(_tiny(cache, "device"))
  network = build.build_network(config, 24, 40)
  step = memory.check_memory(network, plan=lambda n: None)["bytes"]
  matrix = 64 * step
  config.memory.limit_gb = 2 * step / 2**30
  network = build.build_network(config, 24, 40)
  assert memory.check_memory(network, plan=lambda n: None)["bytes"] == step
  with pytest.raises(memory.MemoryGuardError, match="of it the training matrix") as e:
    memory.check_memory(network, plan=lambda n: None, resident_bytes=matrix)
  assert e.value.needed_bytes == step + matrix


def test_two_processes_device_placement_matches_one(eight_devices, cache, tmp_path):
  """Two processes of four devices, one 4x2 mesh: each process loads only the
  rows its devices hold, and the run ends as the one-process 4x2 host run."""
  _, summary = eight_devices
  workdir = tmp_path / "two"
  env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "4", "configs/tiny.py",
       str(workdir), f"--config.data.cache_dir={cache}", "--config.train.num_steps=12",
       "--config.mesh.data=4", "--config.mesh.model=2", "--config.data.placement=device",
       "--config.train.measure_peak=false"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)
          if (workdir / f"process_{i}.log").exists()]
  assert proc.returncode == 0, proc.stderr + "".join(l[-3000:] for l in logs)
  assert all("Training batches from the device" in l for l in logs)
  host, two = summary["runs"]["4x2_host"], _metrics(workdir)
  assert two["steps"] == host["steps"] == 12 and two["best_step"] == host["best_step"]
  # Across processes the collectives (gloo) sum in another order: equal to
  # ~1e-8, as for the host path (tests/test_parallel.py).
  for split in ("val", "test"):
    for key in ("mae_mean", "mae_std", "cc_mean", "cc_std"):
      assert two["splits"][split][key] == pytest.approx(host["splits"][split][key], rel=1e-6)


def test_feed_measurement_reports_every_path(tiny_dataset, cache):
  """lsmtl_jax.feed (what the benchmark calls): each feed's rate and CPU cost, the step's."""
  from lsmtl_jax import feed
  from lsmtl_jax.data import loader
  order = loader.TrainOrder(tiny_dataset.split("train"), 32, 0)
  assert feed.host_feed_rate(tiny_dataset, order, 3, prefetch=2) > 0
  assert feed.device_feed_rate(tiny_dataset, order, 3) > 0
  report = feed.measure(tiny_dataset, _tiny(cache, "host"), repeats=1, steps=2, batch_size=32,
                        prefetch=(1, 2), log=lambda m: None)
  assert set(report["examples_per_s"]) == {"host_prefetch_1", "host_prefetch_2", "device",
                                           "step"}
  assert all(s["median"] > 0 for s in report["examples_per_s"].values())
  assert report["columns"] == 64 and report["train_rows"] == len(order.indices)
  assert report["matrix_bytes_per_device"] == 4 * 64 * len(order.indices)
  assert "examples/s" in feed.format_report(report)
