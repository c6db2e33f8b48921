"""SIGINT and SIGTERM in the middle of predict's and prepare's streams: one
`error:` line, exit 128 + the signal, and nothing left beside the output (no
stage folder, no temporary, no lock). The signal goes once the process's
temporary exists, i.e. while it writes, and the test checks it had not
finished."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lsmtl_jax import inference
from lsmtl_jax.data import formats
from lsmtl_jax.data import store

from conftest import REPO
from test_predict import trained_run
from test_prepare import _case, _config

SIGNALS = [signal.SIGINT, signal.SIGTERM]


def _start(args, log_path):
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _signal_while_writing(proc, folder, prefix, signum, log_path, timeout=240):
  """Sends `signum` once a temporary of `prefix` exists in `folder`."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "finished before the signal: " + open(log_path).read()[-2000:]
    if any(p.startswith(prefix) and ".tmp-" in p and not p.endswith(".probe")
           for p in os.listdir(folder)):  # (the probe of the output check is no write)
      proc.send_signal(signum)
      proc.wait(timeout=120)
      return open(log_path).read()
    time.sleep(0.005)
  raise AssertionError("the process never started writing")


def _check_interrupted(proc, out, signum, path):
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert proc.returncode == 128 + signum, out[-3000:]
  assert errors == [f"error: {path}: interrupted by {signal.Signals(signum).name}; nothing "
                    f"written (the partial {'output' if path.endswith('.gctx') else 'dataset'} "
                    "was removed)"], out[-3000:]
  assert "Traceback" not in out


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
  """A run and enough landmark profiles that predict streams for seconds."""
  workdir = trained_run(tmp_path_factory)
  run = inference.load_run(workdir)
  folder = tmp_path_factory.mktemp("big_predict")
  n = 200_000
  rng = np.random.default_rng(0)
  scale, offset = run.landmark_scale_and_offset()
  values = (rng.standard_normal((n, run.num_landmarks)) * scale + offset).astype(np.float32)
  path = str(folder / "in.gctx")
  formats.write_gctx(path, values, [f"s{i}" for i in range(n)], run.landmark_ids)
  return workdir, path


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_predict_interrupted_mid_stream_leaves_nothing(big_input, tmp_path, signum):
  workdir, inp = big_input
  out = str(tmp_path / "out.gctx")
  proc = _start(["lsmtl_jax.predict", f"--workdir={workdir}", f"--input={inp}",
                 f"--output={out}", "--block_rows=256", "--intervals=0.9"],
                tmp_path / "log.txt")
  log = _signal_while_writing(proc, str(tmp_path), ".out.gctx", signum, tmp_path / "log.txt")
  assert "streaming 200000 profiles" in log
  _check_interrupted(proc, log, signum, out)
  assert sorted(os.listdir(tmp_path)) == ["log.txt"]  # no stage, no bounds, no lock


@pytest.fixture(scope="module")
def big_case(tmp_path_factory):
  return _case(tmp_path_factory.mktemp("big_prepare"), n=30_000)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_prepare_interrupted_while_writing_leaves_nothing(big_case, tmp_path, signum):
  data, lm, tg = big_case
  cfg = _config(data, lm, tg, tmp_path / "ds")
  proc = _start(["lsmtl_jax.prepare",
                 "--config=" + os.path.join(REPO, "configs", "prepare", "default.py"),
                 f"--config.input.path={data}", f"--config.output={cfg.output}",
                 f"--config.genes.landmark_map={lm}", f"--config.genes.target_map={tg}",
                 "--config.block_rows=16", "--config.dedup.enabled=False"],
                tmp_path / "log.txt")
  log = _signal_while_writing(proc, str(tmp_path), ".ds", signum, tmp_path / "log.txt")
  _check_interrupted(proc, log, signum, cfg.output)
  assert sorted(os.listdir(tmp_path)) == ["log.txt"]  # no dataset, no temporary, no lock
  assert not store.remove_abandoned(cfg.output)
