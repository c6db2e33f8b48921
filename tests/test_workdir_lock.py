"""One writer per workdir or output: real processes running at once, a holder
killed with SIGKILL, a record from another host, and the lock of each entry
point (training, the experiment runner, prepare, predict)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from lsmtl_jax import train
from lsmtl_jax import workdir_lock

from conftest import REPO

STEPS = 40


def _main(workdir, cache, *overrides):
  """Starts a training; its log goes to a file (a full pipe would stall it)."""
  cmd = [sys.executable, "-m", "lsmtl_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
         f"--config.train.num_steps={STEPS}", *overrides]
  log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  proc.log_path = log.name
  return proc


def _log(proc):
  with open(proc.log_path) as f:
    return f.read()


def _errors(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


def _wait_for_step(workdir, step, proc, timeout=180):
  latest = os.path.join(workdir, "checkpoints", "latest")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "finished too early: " + _log(proc)[-2000:]
    steps = sorted(int(d) for d in os.listdir(latest) if d.isdigit()) if os.path.isdir(
        latest) else []
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
  return json.load(open(workdir / "results.json"))


def _same_metrics(a, b):
  assert a["steps"] == b["steps"]
  assert a["splits"] == b["splits"]  # bitwise on CPU


def test_second_training_in_a_running_workdir_is_refused_and_the_first_is_intact(
    reference, cache, tmp_path):
  workdir = str(tmp_path / "run")
  first = _main(workdir, cache, "--config.train.checkpoint_every=1")  # slow enough to overlap
  _wait_for_step(workdir, 3, first)
  second = _main(workdir, cache, "--config.train.checkpoint_every=1")
  second.wait(timeout=120)
  out = _log(second)
  assert first.poll() is None, "the first run ended before the second was refused"
  errors = _errors(out)
  assert second.returncode == 2 and len(errors) == 1, out[-3000:]
  assert errors[0].startswith(f"error: {workdir}: in use by pid {first.pid} on "
                              f"{socket.gethostname()} since ")
  assert os.path.join(workdir, ".lock") in errors[0]
  assert "Running" not in out and "Resumed" not in out  # refused before it began
  first.wait(timeout=300)
  assert first.returncode == 0, _log(first)[-3000:]
  _same_metrics(json.load(open(os.path.join(workdir, "results.json"))), reference)
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # removed by its holder


def test_holder_killed_with_sigkill_is_taken_over_and_the_run_resumes(reference, cache,
                                                                      tmp_path):
  workdir = str(tmp_path / "run")
  first = _main(workdir, cache, "--config.train.checkpoint_every=1")
  _wait_for_step(workdir, 6, first)
  first.send_signal(signal.SIGKILL)
  first.wait()
  lock = os.path.join(workdir, ".lock")
  assert json.load(open(lock))["pid"] == first.pid  # the dead holder's record stays
  again = _main(workdir, cache)
  again.wait(timeout=300)
  out = _log(again)
  assert again.returncode == 0 and "Resumed from step" in out, out[-3000:]
  _same_metrics(json.load(open(os.path.join(workdir, "results.json"))), reference)
  assert not os.path.exists(lock)


_HOLDER = """
import sys
from lsmtl_jax import workdir_lock
hold = workdir_lock.hold_beside if sys.argv[2] == "beside" else workdir_lock.hold
with hold(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()
"""


@pytest.fixture
def holder():
  """Starts a process that holds a lock until the test ends."""
  procs = []

  def start(path, kind="workdir"):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), kind], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    procs.append(proc)
    return proc

  yield start
  for proc in procs:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_lock_refuses_another_process_and_names_it(holder, tmp_path):
  proc = holder(tmp_path / "w")
  with pytest.raises(workdir_lock.LockError, match=f"in use by pid {proc.pid} on "):
    with workdir_lock.hold(str(tmp_path / "w")):
      pass
  record = json.load(open(tmp_path / "w" / ".lock"))
  assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
  assert os.listdir(tmp_path / "w") == [".lock"]  # the refused one added nothing


def test_lock_is_reentrant_and_removed_with_a_folder_it_made(tmp_path):
  workdir = str(tmp_path / "a" / "b")
  with workdir_lock.hold(workdir):
    with workdir_lock.hold(workdir):  # a run's nested call shares it
      assert os.path.exists(os.path.join(workdir, ".lock"))
  assert not os.path.exists(tmp_path / "a")  # made here and left empty: gone again


def test_record_of_a_live_process_on_another_host_refuses_then_goes_stale(tmp_path):
  os.makedirs(tmp_path / "w")
  lock = tmp_path / "w" / ".lock"
  lock.write_text(json.dumps({"pid": 4242, "host": "lost-vm-7", "started": "earlier"}))
  with pytest.raises(workdir_lock.LockError, match="pid 4242 on lost-vm-7 .*heartbeat"):
    with workdir_lock.hold(str(tmp_path / "w")):
      pass
  old = time.time() - workdir_lock.STALE_S - 1  # no heartbeat since: the host is gone
  os.utime(lock, (old, old))
  with workdir_lock.hold(str(tmp_path / "w")):
    assert json.load(open(lock))["pid"] == os.getpid()
  assert not lock.exists()


def test_process_roles_of_a_multiprocess_job_lock_their_own_files(tmp_path):
  with workdir_lock.hold(str(tmp_path), 0), workdir_lock.hold(str(tmp_path), 1):
    assert sorted(os.listdir(tmp_path)) == [".lock", ".lock.process-1"]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_experiment_runner_refused_on_a_held_workdir(holder, tmp_path):
  proc = holder(tmp_path / "exp")
  r = _cli("lsmtl_jax.experiments", "--config=configs/experiments/demo_table.py",
           f"--workdir={tmp_path / 'exp'}")
  errors = _errors(r.stderr)
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert errors[0].startswith(f"error: {tmp_path / 'exp'}: in use by pid {proc.pid} on "), errors
  assert os.listdir(tmp_path / "exp") == [".lock"]


def test_prepare_refused_while_another_writes_its_output(holder, tmp_path):
  from test_prepare import _case  # pylint: disable=g-import-not-at-top
  data, lm, tg = _case(tmp_path / "in")
  out = tmp_path / "out" / "ds"
  proc = holder(out, "beside")
  r = _cli("lsmtl_jax.prepare", "--config=" + os.path.join(REPO, "configs", "prepare",
                                                          "default.py"),
           f"--config.input.path={data}", f"--config.output={out}",
           f"--config.genes.landmark_map={lm}", f"--config.genes.target_map={tg}")
  errors = _errors(r.stderr)
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert errors[0].startswith(f"error: {out}: in use by pid {proc.pid} on "), errors
  assert os.listdir(tmp_path / "out") == [".ds.lock"]  # nothing of the refused one


def test_predict_refused_while_another_writes_its_output(holder, tmp_path, tmp_path_factory):
  from test_predict import trained_run  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lsmtl_jax import inference  # pylint: disable=g-import-not-at-top
  from lsmtl_jax.data import formats  # pylint: disable=g-import-not-at-top
  workdir = trained_run(tmp_path_factory)
  run = inference.load_run(workdir)
  scale, offset = run.landmark_scale_and_offset()
  inp = str(tmp_path / "in.gctx")
  formats.write_gctx(inp, np.tile(offset, (3, 1)).astype(np.float32), ["a", "b", "c"],
                     run.landmark_ids)
  out = tmp_path / "out.gctx"
  proc = holder(out, "beside")
  r = _cli("lsmtl_jax.predict", f"--workdir={workdir}", f"--input={inp}", f"--output={out}",
           "--intervals=0.9")
  errors = _errors(r.stderr)
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert errors[0].startswith(f"error: {out}: in use by pid {proc.pid} on "), errors
  assert sorted(os.listdir(tmp_path)) == [".out.gctx.lock", "in.gctx"]


_TWO_RUNS = """
from configs import tiny

TITLE = "two"

def get_config():
  config = tiny.get_config()
  config.data.cache_dir = {cache!r}
  return config

def get_runs(config):
  return [{{"method": "lsr", "figures": {{"table": {{"order": 0}}}}}},
          {{"method": "knn", "figures": {{"table": {{"order": 1}}}}}}]
"""


def test_experiment_runner_with_two_jobs_is_not_refused_by_its_own_children(tmp_path):
  config = tmp_path / "two.py"
  config.write_text(_TWO_RUNS.format(cache=str(tmp_path / "cache")))
  workdir = tmp_path / "exp"
  r = _cli("lsmtl_jax.experiments", f"--config={config}", f"--workdir={workdir}", "--jobs=2")
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.load(open(workdir / "status.json"))["runs"] == {"lsr": "done", "knn": "done"}
  for name in ("lsr", "knn"):  # each child held its own run folder's lock
    log = (workdir / "runs" / name / "log.txt").read_text()
    assert "in use by" not in log and not (workdir / "runs" / name / ".lock").exists()
  assert not (workdir / ".lock").exists()
