"""lsmtl.lam = 'auto': the choice against the candidates' own results, the
workdir it leaves (load_run, predict, export), explicit lam unchanged, resume
after SIGKILL, and the refusals (another config, explicit vs 'auto')."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsmtl_jax import config_lib
from lsmtl_jax import export
from lsmtl_jax import inference
from lsmtl_jax import lam_search
from lsmtl_jax import train

from conftest import REPO

LAMS = (0.0, 0.5)
FLAGS = ["--config.lsmtl.lam=auto", f"--config.lsmtl.lam_candidates={LAMS}",
         "--config.compare_with=('densenet',)"]


def _tiny(cache, lam="auto"):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = str(cache)
  config.lsmtl.lam = lam
  config.lsmtl.lam_candidates = LAMS
  return config


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def auto(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("auto"))
  config = _tiny(cache)
  config.compare_with = ("densenet",)
  config.report = True
  returned = train.train_and_evaluate(config, workdir)
  return workdir, returned


def test_the_lowest_validation_mae_is_chosen(auto):
  workdir, returned = auto
  top = _json(workdir, "results.json")
  record = top["lam_search"]
  assert [c["lam"] for c in record["candidates"]] == list(LAMS)
  own = {c["lam"]: _json(workdir, c["workdir"], "results.json") for c in record["candidates"]}
  for c in record["candidates"]:
    assert c["status"] == "ok" and c["val_mae"] == own[c["lam"]]["splits"]["val"]["mae_mean"]
    assert own[c["lam"]]["config"]["lsmtl"]["lam"] == c["lam"]
  # lam = 0 is the compared DenseNet run, trained once.
  assert record["candidates"][0]["workdir"] == os.path.join("compare", "densenet")
  assert not os.path.exists(os.path.join(workdir, "lam", "0.0"))
  best = min(LAMS, key=lambda lam: (own[lam]["splits"]["val"]["mae_mean"], lam))
  assert record["chosen"] == best
  assert top["splits"] == own[best]["splits"] and returned["splits"] == own[best]["splits"]
  assert top["method"] == "deep_lsmtl" and top["config"]["lsmtl"]["lam"] == best
  assert _json(workdir, "config.json") == top["config"]
  assert _json(workdir, lam_search.SEARCH_NAME) == record
  assert f"(lam {best:g}, chosen on val)" in open(os.path.join(workdir, "comparison.md")).read()
  assert os.path.isfile(os.path.join(workdir, "report", "report.html"))


def test_choice_ties_go_to_the_smaller_lam():
  rows = [{"lam": 0.1, "val_mae": 0.5, "status": "ok"},
          {"lam": 0.01, "val_mae": 0.5, "status": "ok"},
          {"lam": 0.0, "val_mae": 0.6, "status": "ok"},
          {"lam": 1.0, "val_mae": None, "status": "failed"}]
  assert lam_search.choose(rows)["lam"] == 0.01
  assert lam_search.choose(rows[2:])["lam"] == 0.0


def test_the_top_workdir_predicts_and_exports_as_the_chosen_run(auto, tmp_path):
  workdir, _ = auto
  record = _json(workdir, "results.json")["lam_search"]
  chosen = next(c for c in record["candidates"] if c["lam"] == record["chosen"])
  top = inference.load_run(workdir, jax.local_devices())
  own = inference.load_run(os.path.join(workdir, chosen["workdir"]), jax.local_devices())
  z = top.dataset.read_rows(top.dataset.split("test"))[:, :top.num_landmarks]
  np.testing.assert_array_equal(inference.Predictor(top, 16)(z), inference.Predictor(own, 16)(z))
  path = str(tmp_path / "auto.lsmtl")
  export.export(workdir, path)
  model = inference.load_model(path)
  np.testing.assert_array_equal(inference.Predictor(model, 16)(z),
                                inference.Predictor(own, 16)(z))


def test_an_explicit_lam_is_one_ordinary_run(auto, cache, tmp_path):
  workdir, _ = auto
  for lam, where in ((0.5, os.path.join("lam", "0.5")), (0.0, os.path.join("compare",
                                                                             "densenet"))):
    explicit = str(tmp_path / repr(lam))
    train.train_and_evaluate(_tiny(cache, lam), explicit)
    results = _json(explicit, "results.json")
    assert "lam_search" not in results and not os.path.exists(os.path.join(explicit, "lam"))
    assert results["config"]["lsmtl"]["lam"] == lam
    # The candidate is the same run (for lam = 0: the DenseNet is that network).
    assert results["splits"] == _json(workdir, where, "results.json")["splits"]


def test_refused_before_anything_is_written(auto, cache, tmp_path):
  workdir, _ = auto
  before = _json(workdir, "results.json")
  other = _tiny(cache)
  other.compare_with = ("densenet",)
  other.model.hidden = 8
  with pytest.raises(config_lib.ConfigError, match="different config"):
    train.train_and_evaluate(other, workdir)
  with pytest.raises(train.WorkdirError, match="lsmtl.lam='auto' run"):
    train.train_and_evaluate(_tiny(cache, 0.5), workdir)
  explicit = str(tmp_path / "explicit")
  config = _tiny(cache, 0.5)
  config.train.num_steps = 4
  train.train_and_evaluate(config, explicit)
  with pytest.raises(train.WorkdirError, match="explicit lsmtl.lam"):
    train.train_and_evaluate(_tiny(cache), explicit)
  assert _json(workdir, "results.json") == before
  assert not os.path.exists(os.path.join(explicit, "lam"))


def test_bad_lam_values_are_refused(cache):
  for field, value, message in (("lam", "0.1x", "lsmtl.lam must be 'auto' or a number"),
                                ("lam_candidates", (), "lam_candidates must be distinct"),
                                ("lam_candidates", (0.1, 0.1), "lam_candidates must be")):
    config = _tiny(cache)
    config.lsmtl[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(config_lib.resolve(config))


def _main(workdir, cache, *overrides):
  cmd = [sys.executable, "-m", "lsmtl_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *FLAGS, *overrides]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_a_killed_auto_run_resumes_to_the_same_choice(auto, cache, tmp_path):
  reference = _json(auto[0], "results.json")
  workdir = str(tmp_path / "killed")
  # Saving every step makes the last candidate slow enough to be caught in the middle.
  proc = _main(workdir, cache, "--config.train.checkpoint_every=1",
               "--config.report=False")
  latest = os.path.join(workdir, "lam", "0.5", "checkpoints", "latest")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(latest) and any(d.isdigit() and int(d) >= 8 for d in os.listdir(latest)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert os.path.isfile(os.path.join(workdir, "compare", "densenet", "results.json"))

  proc = _main(workdir, cache, "--config.report=False")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Resumed from step" in err
  resumed = _json(workdir, "results.json")
  assert resumed["lam_search"] == reference["lam_search"]
  assert resumed["splits"] == reference["splits"]


@pytest.mark.parametrize("name", ["demo_table", "tuned_table", "paper_geo", "paper_gtex",
                                  "regimes"])
def test_experiment_plans_pin_lam_and_the_runner_refuses_auto(name, cache):
  from lsmtl_jax import experiments
  path = os.path.join(REPO, "configs", "experiments", f"{name}.py")
  config = experiments._load_module(path).get_config()  # pylint: disable=protected-access
  assert not config_lib.lam_is_auto(config_lib.resolve(config))
  planned = experiments.plan(_tiny(cache), [{"method": "deep_lsmtl"}])
  with pytest.raises(config_lib.ConfigError, match="lsmtl.lam is 'auto'"):
    experiments.check_runs(planned)
