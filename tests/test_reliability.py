"""Nothing lost: SIGKILL and SIGTERM at seeded random steps, non-finite steps,
damaged checkpoints, a checkpoint of another config, and a dying process of a
multi-process job. Every case uses real subprocesses, signals and files."""

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from lsmtl_jax import train

from conftest import REPO

STEPS = 40


def _main(workdir, cache, *overrides, env=None):
  """Starts main; its log goes to a file (a full pipe would stall the process)."""
  cmd = [sys.executable, "-m", "lsmtl_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
         f"--config.train.num_steps={STEPS}", *overrides]
  log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  proc.log_path = log.name
  return proc


def _log(proc):
  with open(proc.log_path) as f:
    return f.read()


def _finish(proc, timeout=300):
  proc.wait(timeout=timeout)
  return proc.returncode, _log(proc)


def _latest_steps(workdir):
  latest = os.path.join(workdir, "checkpoints", "latest")
  return sorted(int(d) for d in os.listdir(latest) if d.isdigit()) if os.path.isdir(latest) else []


def _wait_for_step(workdir, step, proc, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "finished before the signal: " + _log(proc)[-2000:]
    steps = _latest_steps(workdir)
    if steps and steps[-1] >= step:
      return steps[-1]
    time.sleep(0.01)
  raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = cache
  config.train.num_steps = STEPS
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(config, str(workdir))
  return str(workdir), json.load(open(workdir / "results.json"))


def _same_metrics(a, b):
  assert a["steps"] == b["steps"]
  assert a["splits"] == b["splits"]  # bitwise on CPU


def test_sigkill_twice_at_random_steps_then_resume_matches(reference, cache, tmp_path):
  _, ref = reference
  workdir = str(tmp_path / "run")
  kill_at = sorted(np.random.default_rng(2026).choice(np.arange(4, STEPS - 4), 2,
                                                      replace=False).tolist())
  for step in kill_at:
    # Saving every step makes the run slow enough to be caught where we want.
    proc = _main(workdir, cache, "--config.train.checkpoint_every=1")
    reached = _wait_for_step(workdir, step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and reached < STEPS
    assert not os.path.exists(os.path.join(workdir, "results.json"))
  code, err = _finish(_main(workdir, cache))
  assert code == 0, err[-3000:]
  assert "Resumed from step" in err
  _same_metrics(json.load(open(os.path.join(workdir, "results.json"))), ref)


def test_sigterm_saves_a_checkpoint_and_exits_then_resumes(reference, cache, tmp_path):
  _, ref = reference
  workdir = str(tmp_path / "run")
  proc = _main(workdir, cache, "--config.train.checkpoint_every=1000")
  # With checkpoints only at the end, a checkpoint exists only if SIGTERM made one.
  deadline = time.time() + 120
  while not glob.glob(os.path.join(workdir, "tensorboard", "events*")):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.01)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  code, err = _finish(proc)
  assert code == 128 + signal.SIGTERM, err[-3000:]
  line = [l for l in err.splitlines() if l.startswith("preempted:")]
  assert len(line) == 1 and "run the same command again to resume" in line[0]
  steps = _latest_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < STEPS
  code, err = _finish(_main(workdir, cache, "--config.train.checkpoint_every=1000"))
  assert code == 0 and f"Resumed from step {steps[0]}" in err
  _same_metrics(json.load(open(os.path.join(workdir, "results.json"))), ref)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
  workdir = str(tmp_path / "diverge")
  code, err = _finish(_main(workdir, cache, "--config.optim.learning_rate=1e30",
                            "--config.optim.schedule=constant",
                            "--config.train.checkpoint_every=1"))
  assert code == 1
  line = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(line) == 1 and "training loss is" in line[0] or "gradient norm is" in line[0]
  bad_step = int(line[0].split("step ")[1].split(":")[0])
  steps = _latest_steps(workdir)
  assert steps and steps[-1] < bad_step
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_nonfinite_steps_can_be_skipped_and_counted(cache, tmp_path):
  workdir = str(tmp_path / "skip")
  code, err = _finish(_main(workdir, cache, "--config.optim.learning_rate=1e30",
                            "--config.optim.schedule=constant", "--config.train.nonfinite=skip"))
  assert code == 0, err[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert 0 < results["nonfinite_steps"] < STEPS
  assert "Skipped" in err


def _damage(step_dir, how):
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  assert files
  for f in files:
    if how == "truncate":
      os.truncate(f, 100)
    else:
      data = bytearray(open(f, "rb").read())
      for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
      open(f, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, cache, tmp_path,
                                                                  how):
  ref_dir, ref = reference
  workdir = tmp_path / "copy"
  subprocess.run(["cp", "-r", ref_dir, str(workdir)], check=True)
  os.remove(workdir / "results.json")
  newest = _latest_steps(str(workdir))[-1]
  _damage(str(workdir / "checkpoints" / "latest" / str(newest)), how)
  code, err = _finish(_main(str(workdir), cache))
  assert code == 0, err[-3000:]
  assert f"latest/{newest}: unreadable" in err and "Restored the earlier checkpoint" in err
  assert os.listdir(workdir / "checkpoints" / "damaged")
  _same_metrics(json.load(open(workdir / "results.json")), ref)


def test_checkpoint_of_another_config_is_refused(reference, cache, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "copy"
  subprocess.run(["cp", "-r", ref_dir, str(workdir)], check=True)
  before = sorted(glob.glob(str(workdir / "checkpoints" / "**"), recursive=True))
  code, err = _finish(_main(str(workdir), cache, "--config.model.hidden=32"))
  assert code == 2
  line = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(line) == 1 and "different config" in line[0] and "'hidden': 16" in line[0]
  assert sorted(glob.glob(str(workdir / "checkpoints" / "**"), recursive=True)) == before


def test_a_dying_process_stops_the_others_and_all_resume(cache, tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "mp")

  def start(i, *extra):
    return _main(workdir, cache, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}", "--heartbeat_timeout_seconds=10",
                 *extra, env={"JAX_NUM_CPU_DEVICES": "2"})

  procs = [start(i, "--config.train.checkpoint_every=1") for i in range(2)]
  _wait_for_step(workdir, 6, procs[0])
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  procs[0].wait(timeout=120)
  assert procs[0].returncode != 0 and time.time() - killed < 120
  procs[1].wait()

  procs = [start(i) for i in range(2)]
  for p in procs:
    code, err = _finish(p)
    assert code == 0, err[-3000:]
  assert "Resumed from step" in err
  assert json.load(open(os.path.join(workdir, "results.json")))["steps"] == STEPS
