"""End to end: train_and_evaluate on a tiny config, results.json, kill and resume,
and the command line (overrides, typos, missing data)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lsmtl_jax import train

from conftest import REPO

RESULT_KEYS = {"method", "config", "steps", "train_seconds", "examples_per_sec", "splits"}
SPLIT_KEYS = {"mae_mean", "mae_std", "cc_mean", "cc_std", "n_samples", "n_genes"}
STEPS = 40


def _tiny(cache_dir):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = str(cache_dir)
  config.train.num_steps = STEPS
  return config


def _main(workdir, *overrides, config="configs/tiny.py"):
  cmd = [sys.executable, "-m", "lsmtl_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train.train_and_evaluate(_tiny(cache), str(workdir))
  with open(workdir / "results.json") as f:
    return workdir, json.load(f)


def test_results_json_has_the_documented_keys(uninterrupted):
  workdir, results = uninterrupted
  assert RESULT_KEYS <= set(results)
  assert results["method"] == "deep_lsmtl" and results["steps"] == STEPS
  assert results["examples_per_sec"] > 0 and results["train_seconds"] > 0
  for split in ("val", "test"):
    s = results["splits"][split]
    assert SPLIT_KEYS <= set(s) and SPLIT_KEYS <= set(s["expression_units"])
    assert s["n_samples"] == 30 and s["n_genes"] == 40
    assert 0 < s["mae_mean"] < 1.5 and -1 <= s["cc_mean"] <= 1
    # Standardized and expression units differ by the per-gene scale, not the CC.
    assert s["expression_units"]["mae_mean"] != pytest.approx(s["mae_mean"])
    assert s["expression_units"]["cc_mean"] == pytest.approx(s["cc_mean"], abs=1e-4)
  assert json.load(open(workdir / "config.json"))["model"]["hidden"] == 16
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  scalars = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [s["step"] for s in scalars if "train/loss" in s] == list(range(4, STEPS + 1, 4))
  assert all(np.isfinite(s["train/rec_loss"]) for s in scalars if "train/loss" in s)
  assert os.path.isdir(workdir / "checkpoints" / "latest" / str(STEPS))
  assert os.listdir(workdir / "checkpoints" / "best")


def test_a_run_shorter_than_one_log_window_reports_its_rate(tmp_path, cache):
  # The first step (the compilation) is not timed; the rest are, even when no
  # log window completes before the end.
  config = _tiny(cache)
  config.train.num_steps, config.train.log_every, config.train.eval_every = 3, 100, 100
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["steps"] == 3 and results["examples_per_sec"] > 0


def test_training_learns(uninterrupted, cache):
  """40 steps beat predicting the training mean (MAE of |y| ~ 0.8 in z-units)."""
  _, results = uninterrupted
  assert results["splits"]["val"]["mae_mean"] < 0.75
  assert results["splits"]["val"]["cc_mean"] > 0.2


def _wait_for_checkpoint(workdir, min_step, proc, timeout=120):
  latest = os.path.join(workdir, "checkpoints", "latest")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"finished before it could be killed: {proc.stderr.read()[-2000:]}")
    steps = [int(d) for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
    if steps and max(steps) >= min_step:
      return max(steps)
    time.sleep(0.02)
  raise AssertionError("no checkpoint appeared")


def test_killed_and_resumed_run_matches_uninterrupted(uninterrupted, cache, tmp_path):
  _, reference = uninterrupted
  workdir = str(tmp_path / "killed")
  common = [f"--config.data.cache_dir={cache}", f"--config.train.num_steps={STEPS}"]
  # Saving every step makes the run slow enough to be caught in the middle.
  proc = _main(workdir, *common, "--config.train.checkpoint_every=1")
  step = _wait_for_checkpoint(workdir, 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert step < STEPS and not os.path.exists(os.path.join(workdir, "results.json"))

  proc = _main(workdir, *common)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Resumed from step" in err
  resumed = json.load(open(os.path.join(workdir, "results.json")))
  assert resumed["steps"] == reference["steps"]
  assert resumed["splits"] == reference["splits"]


def test_override_is_applied_and_a_typo_fails(tmp_path, cache):
  proc = _main(tmp_path / "ok", f"--config.data.cache_dir={cache}", "--config.train.num_steps=4",
               "--config.model.hidden=12", "--config.train.eval_every=4")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  cfg = json.load(open(tmp_path / "ok" / "config.json"))
  assert cfg["model"]["hidden"] == 12 and cfg["train"]["num_steps"] == 4
  results = json.load(open(tmp_path / "ok" / "results.json"))
  assert results["steps"] == 4

  proc = _main(tmp_path / "typo", "--config.model.hiden=12")
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "hiden" in err
  assert not os.path.exists(tmp_path / "typo" / "results.json")


@pytest.mark.parametrize("override, message", [
    ("--config.lsmtl.mask_rate=1.5", "lsmtl.mask_rate must be in [0, 1)"),
    ("--config.model.hidden=-3", "model.hidden must be positive"),
    ("--config.method=lasso", "method must be one of"),
])
def test_out_of_range_config_exits_2_with_one_line(tmp_path, override, message):
  proc = _main(tmp_path / "bad", override)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0]


def test_geo_without_prepared_data_says_what_is_missing(tmp_path):
  proc = _main(tmp_path / "geo", config="configs/geo.py")
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  line = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(line) == 1 and "config.data.path" in line[0] and "lsmtl_jax.prepare" in line[0]
  proc = _main(tmp_path / "geo2", "--config.data.path=/nonexistent/geo", config="configs/geo.py")
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and "/nonexistent/geo: prepared dataset not found" in err


def test_densenet_and_lsr_share_the_results_format(tmp_path, cache):
  config = _tiny(cache)
  config.train.num_steps = 8
  config.compare_with = ("lsr", "densenet")
  config.report = True
  main = train.train_and_evaluate(config, str(tmp_path))
  lsr = json.load(open(tmp_path / "compare" / "lsr" / "results.json"))
  dense = json.load(open(tmp_path / "compare" / "densenet" / "results.json"))
  assert main["method"] == "deep_lsmtl"
  assert lsr["method"] == "lsr" and dense["method"] == "densenet"
  assert dense["config"]["lsmtl"]["lam"] == 0.0
  for r in (lsr, dense):
    assert RESULT_KEYS <= set(r) and SPLIT_KEYS <= set(r["splits"]["test"])
  for run_dir in (tmp_path, tmp_path / "compare" / "densenet"):
    assert (run_dir / "report" / "report.html").exists()
    assert (run_dir / "report" / "genes.tsv").exists()
  assert not (tmp_path / "compare" / "lsr" / "report").exists()
  table = (tmp_path / "comparison.md").read_text()
  assert "Deep-LSMTL" in table and "LSR" in table and "DenseNet" in table
