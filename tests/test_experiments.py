"""The experiment runner: plan, one process per run, resume without redoing a
finished run, tables and figures; the gene-wise Wilcoxon test vs scipy."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.stats

from lsmtl_jax import experiments

from conftest import REPO


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wilcoxon_matches_scipy_normal_approximation(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=300)
  b = a + rng.normal(0.05, 0.3, size=300)
  b[:20] = a[:20]  # zero differences are dropped
  b[20:60] = np.round(b[20:60], 1)
  a[20:60] = np.round(a[20:60], 1)  # and ties share their mean rank
  stat, p = experiments.wilcoxon_signed_rank(a, b)
  ref = scipy.stats.wilcoxon(a, b, zero_method="wilcox", correction=False, method="approx")
  assert stat == pytest.approx(ref.statistic)
  assert p == pytest.approx(ref.pvalue, rel=1e-6)


def test_genewise_fraction():
  ref = np.array([0.1, 0.2, 0.3, 0.4])
  other = np.array([0.2, 0.1, 0.5, 0.5])
  out = experiments.genewise(ref, other)
  assert out["fraction_reference_better"] == 0.75 and 0 < out["wilcoxon_p"] <= 1


EXPERIMENT = textwrap.dedent("""
    from configs import tiny

    TITLE = "tiny"

    def get_config():
      config = tiny.get_config()
      config.data.cache_dir = {cache!r}
      config.train.num_steps = 8
      return config

    def get_runs(config):
      fig = {{"fig3": {{"width": 16}}, "fig4": {{"depth": 2, "width": 16}},
             "fig5": {{"dropout": 0.1}}}}
      return [{{"method": "lsr", "figures": {{"table": {{"order": 0}}}}}},
              {{"method": "knn", "overrides": {{"knn.ks": (1, 3)}},
               "figures": {{"table": {{"order": 1}}}}}},
              {{"method": "amtl", "overrides": {{"memory.limit_gb": 1e-5}},
               "figures": {{"table": {{"order": 2}}}}}},
              {{"method": "deep_lsmtl", "figures": {{"table": {{"order": 3}}}}}},
              {{"method": "deep_lsmtl", "figures": fig}}]
    """)


def _runner(config, workdir):
  return subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.experiments", f"--config={config}",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_runner_writes_tables_and_figures_and_resumes(tmp_path):
  config = tmp_path / "tiny_experiment.py"
  config.write_text(EXPERIMENT.format(cache=str(tmp_path / "cache")))
  workdir = tmp_path / "exp"
  proc = _runner(config, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  status = json.load(open(workdir / "status.json"))["runs"]
  # The two Deep-LSMTL entries are one run.
  assert status == {"lsr": "done", "knn-ks(1,3)": "done", "amtl-limit_gb1em05": "oom",
                    "deep_lsmtl": "done"}
  table = (workdir / "table.md").read_text()
  for label in ("LSR", "KNN-GE", "Deep-LSMTL"):
    assert f"| {label} | " in table
  assert "| Deep-AMTL | out of memory: needs" in table
  entries = json.load(open(workdir / "table.json"))
  lsr = entries[0]
  assert lsr["method"] == "LSR" and 0 < lsr["test_mae_mean"] < 1.5
  assert 0 <= lsr["lsmtl_fraction_reference_better"] <= 1 and 0 < lsr["lsmtl_wilcoxon_p"] <= 1
  assert lsr["num_parameters"] == 24 * 40 + 40 and lsr["peak_bytes"] > 0
  lines = (workdir / "table.csv").read_text().splitlines()
  assert len(lines) == 5 and lines[0].startswith("method,run,status,test_mae_mean")
  for name in ("fig2_methods.png", "fig3_mtl.png", "fig4_dgex_lsmtl.png", "fig5_sensitivity.png"):
    assert (workdir / name).stat().st_size > 1000
  results = workdir / "runs" / "deep_lsmtl" / "results.json"
  before = results.stat().st_mtime_ns

  os.remove(workdir / "runs" / "knn-ks(1,3)" / "results.json")  # as if killed before the end
  proc = _runner(config, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  status = json.load(open(workdir / "status.json"))["runs"]
  assert status == {"lsr": "skipped", "knn-ks(1,3)": "done", "amtl-limit_gb1em05": "oom",
                    "deep_lsmtl": "skipped"}
  assert results.stat().st_mtime_ns == before  # not redone


@pytest.mark.parametrize("name", ["demo_table", "paper_geo", "paper_gtex"])
def test_shipped_experiments_plan_every_method_and_figure(name):
  path = os.path.join(REPO, "configs", "experiments", f"{name}.py")
  module = experiments._load_module(path)  # pylint: disable=protected-access
  config = module.get_config()
  planned = experiments.plan(config, module.get_runs(config))
  table = {p["method"] for p in planned.values() if "table" in p["figures"]}
  # Every row of docs/method.md, "Comparison methods" (SemiGAN with its semi-supervised variant).
  assert table == {"lsr", "lsr_l1", "knn", "dgex", "semigan", "semigan_semi", "go_mtl",
                   "cnmtl", "amtl", "amtfl", "densenet", "deep_lsmtl"}
  mtl_widths = {}
  for p in planned.values():
    if "fig3" in p["figures"]:
      mtl_widths.setdefault(p["figures"]["fig3"]["width"], set()).add(p["method"])
  # Figure 3 compares every MTL method at each trunk width.
  assert len(mtl_widths) >= 2
  assert all(methods == {"go_mtl", "cnmtl", "amtl", "amtfl", "deep_lsmtl"}
             for methods in mtl_widths.values())
  assert any("fig4" in p["figures"] for p in planned.values())
  # Figure 5: the base run is one run but a point on every sensitivity curve.
  curves = {}
  for p in planned.values():
    for param, value in p["figures"].get("fig5", {}).items():
      curves.setdefault(param, set()).add(value)
  assert set(curves) == {"dropout", "lambda", "mask rate", "bottleneck k"}
  assert all(len(values) >= 3 for values in curves.values()), curves

