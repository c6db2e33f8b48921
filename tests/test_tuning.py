"""Selection on validation, seeds and the regime study: the machinery (the
result is measured by the shipped configs, not here)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lsmtl_jax import tuning
from lsmtl_jax.methods import base
from lsmtl_jax.methods import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_candidates_defaults_first_distinct_and_seeded():
  tunables = (base.Tunable("a.x", (1, 2, 3)), base.Tunable("a.y", ("p", "q")))
  got = tuning.candidates(tunables, 4, "m")
  assert got[0] == {} and len(got) == 4
  points = [tuple(sorted(c.items())) for c in got[1:]]
  assert len(set(points)) == 3
  assert all(c["a.x"] in (1, 2, 3) and c["a.y"] in ("p", "q") for c in got[1:])
  assert tuning.candidates(tunables, 4, "m") == got  # the same for the same name and seed
  assert len(tuning.candidates(tunables, 50, "m")) == 7  # the whole grid, then no more


def test_every_network_method_gets_the_same_number_of_tries():
  budget = 6
  for name in registry.network_names():
    method = registry.get(name)
    assert len(tuning.candidates(method.tunables, budget, name)) == budget, name


def _row(i, val, status="ok", test=None):
  splits = {"val": {"mae_mean": val, "mae_std": 0.1, "cc_mean": 0.5, "cc_std": 0.1}}
  if test is not None:
    splits["test"] = {"mae_mean": test, "mae_std": 0.1, "cc_mean": 0.6, "cc_std": 0.1}
  return {"status": status, "splits": splits, "tuning": {"index": i, "setting": {"k": i},
                                                          "seed": i},
          "train_seconds": 1.0, "num_parameters": 10, "steps": 5, "peak_bytes": 1,
          "peak_kind": "host RSS"}


def test_choose_takes_the_lowest_validation_mae_never_test():
  rows = [_row(0, 0.5, test=0.1), _row(1, 0.4, test=0.9), _row(2, float("nan")),
          _row(3, 0.3, status="oom")]
  assert tuning.choose(rows)["tuning"]["index"] == 1
  assert tuning.choose([_row(0, 0.4), _row(1, 0.4)])["tuning"]["index"] == 0
  assert tuning.choose([_row(0, 0.3, status="failed")]) is None


def test_aggregate_and_paired_seeds_against_numpy():
  entry = {"key": "e", "method": "deep_lsmtl", "label": "Deep-LSMTL", "figures": {}}
  a = tuning.aggregate(entry, [_row(0, 0.5)], [_row(s, 0.4, test=t)
                                               for s, t in enumerate((0.30, 0.32, 0.34))])
  b = tuning.aggregate(entry, [_row(0, 0.5)], [_row(s, 0.4, test=t)
                                               for s, t in enumerate((0.31, 0.31, 0.36))])
  test = a["splits"]["test"]
  assert test["mae_mean"] == pytest.approx(0.32)
  assert test["mae_mean_seed_sd"] == pytest.approx(np.std([0.30, 0.32, 0.34], ddof=1))
  assert a["tuning"]["chosen"] == {"k": 0} and a["tuning"]["seeds"] == [0, 1, 2]
  gain = tuning.paired_seeds(a, b)
  expected = [(0.31 - 0.30) / 0.31, (0.31 - 0.32) / 0.31, (0.36 - 0.34) / 0.36]
  np.testing.assert_allclose(gain["per_seed"], expected)
  assert gain["sd"] == pytest.approx(np.std(expected, ddof=1))


def _entry(key, on_top_of=None, search=({"k": 1}, {"k": 2})):
  tune = {"search": list(search), "seeds": 2}
  if on_top_of:
    tune["on_top_of"] = on_top_of
  return {"key": key, "method": "densenet", "overrides": {"a": 0}, "tune": tune}


def test_entries_tuned_on_top_of_others_come_after_them():
  entries = [_entry("c", "b"), _entry("a"), _entry("b", "a"), _entry("d")]
  assert [[e["key"] for e in level] for level in tuning.levels(entries)] == [
      ["a", "d"], ["b"], ["c"]]
  with pytest.raises(tuning.TuningError, match="entry x: on_top_of 'nope' is not a tuned"):
    tuning.levels([_entry("x", "nope")])
  with pytest.raises(tuning.TuningError, match="circular"):
    tuning.levels([_entry("x", "y"), _entry("y", "x")])


def test_candidates_on_top_of_a_choice_carry_it_and_their_own_point():
  from lsmtl_jax.methods import registry
  runs = tuning.candidate_runs(_entry("b", "a", search=({"lsmtl.lam": 0.1}, {})),
                               registry.get("densenet"), {"model.dropout": 0.3, "lsmtl.lam": 9})
  assert [r["tuning"]["setting"] for r in runs] == [
      {"model.dropout": 0.3, "lsmtl.lam": 0.1}, {"model.dropout": 0.3, "lsmtl.lam": 9}]
  assert all(r["overrides"]["a"] == 0 and r["overrides"]["data.test_split"] == ""
             for r in runs)


EXPERIMENT = textwrap.dedent("""
    import importlib.util, os
    spec = importlib.util.spec_from_file_location(
        "regimes", os.path.join({repo!r}, "configs", "experiments", "regimes.py"))
    regimes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regimes)
    TITLE = "tiny regimes"
    prepare, get_runs = regimes.prepare, regimes.get_runs

    def get_config():
      config = regimes.get_config()
      config.data.synthetic.update(dict(num_samples=400, num_landmarks=24, num_targets=40,
                                        num_programs=4, num_modules=6, num_tissues=3))
      config.data.cache_dir = {cache!r}
      config.lsmtl.bottleneck = 8
      config.train.eval_batch_size = 40
      config.train.batch_size = 16
      config.study.update(dict(datasets=("geo_shaped",), n_train=(60,), widths=(8,),
                               readings=(), seeds=2, lam_values=(0.1, 1.0),
                               dropout_values=(0.0, 0.1), min_steps=6, max_steps=6,
                               geo_samples=320, geo_probes=200))
      return config
    """)


def test_regime_study_selects_on_validation_runs_seeds_and_plots(tmp_path):
  config = tmp_path / "tiny_regimes.py"
  config.write_text(EXPERIMENT.format(repo=REPO, cache=str(tmp_path / "cache")))
  workdir = tmp_path / "study"
  run = lambda: subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.experiments", f"--config={config}",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "data" / "geo_shaped" / "meta.json").exists()  # prepared once
  status = json.load(open(workdir / "status.json"))["runs"]
  # 1 cell x 2 arms x (2 candidates + 2 seeds)
  assert len(status) == 8 and set(status.values()) == {"done"}
  gains = json.load(open(workdir / "regimes.json"))
  assert [g["n_train"] for g in gains] == [60]
  for g in gains:
    assert len(g["gain_per_seed"]) == 2
    assert g["lsmtl_chosen"]["lsmtl.lam"] in (0.1, 1.0)
    assert g["lam0_chosen"]["model.dropout"] in (0.0, 0.1)
    # Deep-LSMTL's lam was tuned on top of the dropout the lam = 0 arm chose.
    assert g["lsmtl_chosen"]["model.dropout"] == g["lam0_chosen"]["model.dropout"]
    expected = (g["lam0_test_mae"] - g["lsmtl_test_mae"]) / g["lam0_test_mae"]
    assert g["gain_mean"] == pytest.approx(expected, abs=0.05)  # mean of ratios vs ratio
  assert (workdir / "regimes.png").stat().st_size > 1000
  # Candidates never evaluated the test split; the seed runs did, once each.
  for name in os.listdir(workdir / "runs"):
    results = json.load(open(workdir / "runs" / name / "results.json"))
    assert ("test" in results["splits"]) == (results["config"]["data"]["test_split"] != "")
  proc = run()  # resumed: nothing is trained again
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert set(json.load(open(workdir / "status.json"))["runs"].values()) == {"skipped"}
