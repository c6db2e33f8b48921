"""report: per-gene metrics against an independent numpy computation, the
figures and report.html, TensorBoard event parsing, the command line."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lsmtl_jax import inference
from lsmtl_jax import report
from lsmtl_jax import results as results_lib

from conftest import REPO
from test_predict import trained_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  workdir = trained_run(tmp_path_factory)
  proc = subprocess.run([sys.executable, "-m", "lsmtl_jax.report", f"--workdir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == f"report: {os.path.join(workdir, 'report', 'report.html')}"
  return workdir, inference.load_run(workdir)


def _lins_cc(y, p):
  return (2 * ((y - y.mean(0)) * (p - p.mean(0))).mean(0)
          / (y.var(0) + p.var(0) + (y.mean(0) - p.mean(0)) ** 2))


def test_genes_tsv_matches_numpy(built):
  workdir, run = built
  genes = report.read_genes_tsv(os.path.join(workdir, "report", "genes.tsv"))
  assert list(genes) == list(report.GENE_COLUMNS)
  assert genes["gene_id"] == run.target_ids
  predictor = inference.Predictor(run, 32)
  scale, offset = run.target_scale_and_offset()
  for split in ("val", "test"):
    rows = run.dataset.read_rows(run.dataset.split(split)).astype(np.float64)
    y = rows[:, run.num_landmarks:]
    p = predictor(rows[:, :run.num_landmarks].astype(np.float32)).astype(np.float64)
    np.testing.assert_allclose(genes[f"{split}_mae"], np.abs(y - p).mean(0), rtol=1e-5)
    np.testing.assert_allclose(genes[f"{split}_cc"], _lins_cc(y, p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(genes[f"{split}_mae_expression"],
                               (np.abs(y - p) * scale).mean(0), rtol=1e-5)
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert genes["val_mae"].mean() == pytest.approx(results["splits"]["val"]["mae_mean"], abs=1e-5)
  assert genes["test_cc"].mean() == pytest.approx(results["splits"]["test"]["cc_mean"], abs=1e-5)


def test_report_html_links_every_figure(built):
  workdir, _ = built
  out = os.path.join(workdir, "report")
  page = open(os.path.join(out, "report.html")).read()
  links = re.findall(r'(?:src|href)="([^"]+)"', page)
  assert set(report.FIGURES) | {"genes.tsv"} == set(links)
  for name in report.FIGURES:
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG
  assert "Training curves (from metrics.jsonl)" in page
  assert not [d for d in os.listdir(workdir) if d.startswith("report.tmp")]


def test_scalars_log_is_read(built):
  workdir, _ = built
  scalars = results_lib.read_scalars(workdir)
  steps, loss = scalars["train/loss"]
  np.testing.assert_array_equal(steps, [4, 8, 12, 16])  # log_every = 4, 16 steps
  assert np.isfinite(loss).all()
  steps, mae = scalars["val/mae"]
  np.testing.assert_array_equal(steps, [8, 16])
  results = json.load(open(os.path.join(workdir, "results.json")))
  best = results["best_step"]
  assert mae[list(steps).index(best)] == pytest.approx(results["splits"]["val"]["mae_mean"],
                                                       rel=1e-5)


def test_scalars_log_keeps_the_last_record_of_a_step_and_skips_a_torn_line(tmp_path):
  # A resumed run logs the replayed steps again; a killed writer leaves half a line.
  (tmp_path / results_lib.SCALARS_NAME).write_text(
      '{"step": 4, "train/loss": 2.0}\n{"step": 8, "train/loss": 1.5}\n'
      '{"step": 8, "train/loss": 1.25, "val/mae": 0.5}\n{"step": 12, "train/lo')
  scalars = results_lib.read_scalars(str(tmp_path))
  assert scalars == {"train/loss": ([4, 8], [2.0, 1.25]), "val/mae": ([8], [0.5])}


def test_curves_fall_back_to_results_without_events(built, tmp_path):
  workdir, _ = built
  shutil.copy(os.path.join(workdir, "results.json"), tmp_path / "results.json")
  source = report.plot_training_curves(str(tmp_path / "curves.png"), str(tmp_path))
  assert source == "results.json"
  assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_pick_genes_skips_constant_genes():
  cc = np.array([0.5, np.nan, 0.9, -0.2, 0.7])
  assert report.pick_genes(cc) == {"best": 2, "median": 4, "worst": 3}


def test_unfinished_run_exits_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "lsmtl_jax.report", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(lines) == 1 and "no config.json" in lines[0]
  assert not os.path.exists(tmp_path / "report")
