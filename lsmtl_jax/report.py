"""Per-gene report of a finished run: python -m lsmtl_jax.report --workdir=RUN

Writes WORKDIR/report/ (built in a temporary directory, then renamed):

  genes.tsv             per target gene: MAE (standardized and expression units)
                        and Lin's CC on the validation and test splits
  cc_histogram.png      distribution of per-gene CC, validation and test
  scatter.png           predicted vs measured on test for the best, median and
                        worst gene by test CC
  training_curves.png   losses and validation MAE/CC from WORKDIR/metrics.jsonl
                        (or the final numbers of results.json when there is
                        no such log)
  calibration.png       the split-conformal prediction intervals on test:
                        nominal vs observed coverage per gene, and each gene's
                        90 % interval width vs its test MAE
  report.html           one page linking all of the above

The per-gene numbers are those of training's final evaluation of the best
checkpoint (WORKDIR/gene_stats.npz: the per-gene sums evaluation.py keeps), so
the report and results.json agree by construction.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from lsmtl_jax import inference
from lsmtl_jax import intervals
from lsmtl_jax import metrics
from lsmtl_jax import fileio
from lsmtl_jax import results as results_lib
from lsmtl_jax.data import sources
from lsmtl_jax.data import store
from lsmtl_jax.methods import registry

REPORT_DIR = "report"
GENES_NAME = "genes.tsv"
GENE_COLUMNS = ("gene_id", "symbol", "val_mae", "val_cc", "test_mae", "test_cc",
                "val_mae_expression", "test_mae_expression")
SCATTER_MAX_ROWS = 2000  # profiles shown in the scatter plots
READ_ROWS = 512


def gene_metrics(run: inference.Run, splits=("val", "test")) -> dict[str, dict[str, np.ndarray]]:
  """{split: {'mae', 'cc', 'mae_expression', 'constant'}} per target gene, from
  the per-gene sums of training's final evaluation (validation and test as
  training took them, cross-platform runs included)."""
  stats = results_lib.read_gene_stats(run.workdir)
  if stats is None or any(name not in stats for name in splits):
    raise inference.RunError(f"{run.workdir}: no {results_lib.GENE_STATS_NAME} with "
                             f"{', '.join(splits)} statistics; the run did not finish its "
                             "final evaluation")
  scale, offset = run.target_scale_and_offset()
  out = {}
  for name in splits:
    genes = metrics.per_gene(stats[name])
    genes["mae_expression"] = metrics.per_gene(metrics.affine(stats[name], scale, offset))["mae"]
    out[name] = genes
  return out


def write_genes_tsv(path: str, run: inference.Run, genes: dict) -> None:
  ids, symbols = run.target_ids, run.meta["targets"].get("symbols", run.target_ids)
  with open(path, "w") as f:
    f.write("\t".join(GENE_COLUMNS) + "\n")
    for t in range(run.num_targets):
      values = (genes["val"]["mae"][t], genes["val"]["cc"][t], genes["test"]["mae"][t],
                genes["test"]["cc"][t], genes["val"]["mae_expression"][t],
                genes["test"]["mae_expression"][t])
      f.write("\t".join([ids[t], symbols[t], *(f"{v:.6g}" for v in values)]) + "\n")


def read_genes_tsv(path: str) -> dict[str, np.ndarray | list[str]]:
  """Columns of a genes.tsv: ids and symbols as lists, the metrics as float64 arrays."""
  with open(path) as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  cols = {name: [r[i] for r in rows] for i, name in enumerate(header)}
  return {k: (v if k in ("gene_id", "symbol") else np.asarray(v, np.float64))
          for k, v in cols.items()}


def validation_metrics(run: inference.Run) -> dict[str, np.ndarray]:
  """Per-target validation CC and MAE (z and expression units) of the run."""
  return run.validation_metrics()


# Figures.


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_cc_histogram(path: str, genes: dict) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, colour in (("val", "tab:blue"), ("test", "tab:orange")):
    cc = genes[name]["cc"][np.isfinite(genes[name]["cc"])]
    ax.hist(cc, bins=50, range=(min(-0.1, float(cc.min(initial=0))), 1.0), alpha=0.55,
            color=colour, label=f"{name}: mean {cc.mean():.3f}, {cc.size} genes")
  ax.set_xlabel("Lin's concordance correlation per target gene")
  ax.set_ylabel("genes")
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pick_genes(cc: np.ndarray) -> dict[str, int]:
  """Indices of the best, median and worst gene by CC (constant genes skipped)."""
  ok = np.flatnonzero(np.isfinite(cc))
  order = ok[np.argsort(cc[ok], kind="stable")]
  return {"best": int(order[-1]), "median": int(order[len(order) // 2]),
          "worst": int(order[0])}


def plot_scatter(path: str, run: inference.Run, predictor, genes: dict) -> dict[str, int]:
  try:
    data = sources.load_data(run.config)
  except store.DatasetError as e:
    raise inference.RunError(f"{run.workdir}: cannot open the run's evaluation data: {e}") from None
  eval_set = data.eval_sets["test"]
  picks = pick_genes(genes["test"]["cc"])
  cols = np.array(list(picks.values()))
  rows = eval_set.indices[:SCATTER_MAX_ROWS]
  scale, offset = run.target_scale_and_offset()
  lm = run.num_landmarks
  ys, ps = [], []
  for start in range(0, len(rows), READ_ROWS):
    block = eval_set.dataset.read_rows(rows[start:start + READ_ROWS])
    ys.append(block[:, lm + cols])
    ps.append(predictor(block[:, :lm])[:, cols])
  y = np.concatenate(ys) * scale[cols] + offset[cols]
  p = np.concatenate(ps) * scale[cols] + offset[cols]
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(12, 4))
  for ax, (label, t), j in zip(axes, picks.items(), range(3)):
    ax.scatter(y[:, j], p[:, j], s=6, alpha=0.5)
    lo, hi = min(y[:, j].min(), p[:, j].min()), max(y[:, j].max(), p[:, j].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_title(f"{label}: {run.target_ids[t]} (CC {genes['test']['cc'][t]:.3f}, "
                 f"MAE {genes['test']['mae_expression'][t]:.3f})", fontsize=9)
    ax.set_xlabel("measured (log2)")
    ax.set_ylabel("predicted (log2)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return picks


def plot_training_curves(path: str, workdir: str) -> str:
  """Returns where the numbers came from: the scalars log or 'results.json'."""
  scalars = results_lib.read_scalars(workdir) or {}
  plt = _pyplot()
  losses = sorted(tag for tag in scalars
                  if tag.startswith("train/") and tag.split("/")[1] not in (
                      "grad_norm", "examples_per_sec", "mfu"))
  panels = [("loss", losses), ("validation MAE", ["val/mae"]), ("validation CC", ["val/cc"])]
  if any(tag in scalars for _, tags in panels for tag in tags):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, tags) in zip(axes, panels):
      for tag in tags:
        if tag in scalars:
          steps, values = scalars[tag]
          ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=tag)
      ax.set_title(title)
      ax.set_xlabel("step")
      ax.legend(fontsize=8)
    source = results_lib.SCALARS_NAME
  else:
    results = results_lib.read_results(workdir) or {"splits": {}}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = [s for s in ("val", "test") if s in results["splits"]]
    ax.bar(names, [results["splits"][s]["mae_mean"] for s in names])
    ax.set_title(f"no {results_lib.SCALARS_NAME}: final MAE from results.json")
    source = "results.json"
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return source


CALIBRATION_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
WIDTH_LEVEL = 0.9


def interval_coverage(run: inference.Run, predictor,
                      calibration: intervals.Calibration) -> dict[str, Any]:
  """Per-gene test coverage of the prediction intervals at each of
  CALIBRATION_LEVELS the calibration has enough profiles for, and at
  WIDTH_LEVEL each gene's interval width and test MAE (expression units)."""
  try:
    test = sources.eval_set(run.config, "test", run.dataset)
  except store.DatasetError as e:
    raise inference.RunError(f"{run.workdir}: cannot open the run's test data: {e}") from None
  n_cal = calibration.num_profiles
  levels = [c for c in CALIBRATION_LEVELS if intervals.conformal_rank(n_cal, c) <= n_cal]
  q = np.stack([calibration.quantile(c) for c in levels])  # [levels, targets]
  lm, rows = run.num_landmarks, test.indices
  inside = np.zeros(q.shape)
  abs_error = np.zeros(run.num_targets)
  for start in range(0, len(rows), READ_ROWS):
    block = test.dataset.read_rows(rows[start:start + READ_ROWS])
    error = np.abs(block[:, lm:] - predictor(block[:, :lm])).astype(np.float64)
    inside += (error[None] <= q[:, None, :]).sum(1)
    abs_error += error.sum(0)
  scale, _ = run.target_scale_and_offset()
  width_level = WIDTH_LEVEL if WIDTH_LEVEL in levels else levels[-1]
  return {"levels": np.array(levels), "coverage": inside / max(len(rows), 1),
          "width_level": width_level,
          "width": 2 * calibration.quantile(width_level) * scale,
          "mae": abs_error / max(len(rows), 1) * scale, "num_test": len(rows),
          "num_profiles": n_cal, "source": calibration.source}


def plot_calibration(path: str, cov: dict[str, Any]) -> None:
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  levels, coverage = cov["levels"], cov["coverage"]
  lo, hi = np.percentile(coverage, [5, 95], axis=1)
  left.plot([0.45, 1.0], [0.45, 1.0], "k--", lw=0.8, label="nominal")
  left.fill_between(levels, lo, hi, alpha=0.25, label="5-95 % of genes")
  left.plot(levels, coverage.mean(1), "o-", label="mean over genes")
  left.set_xlabel("nominal coverage")
  left.set_ylabel(f"observed coverage on test ({cov['num_test']} profiles)")
  left.set_title(f"calibrated on {cov['num_profiles']} {cov['source']} profiles", fontsize=9)
  left.legend(loc="upper left", fontsize=8)
  right.scatter(cov["mae"], cov["width"], s=5, alpha=0.4)
  right.set_xlabel("test MAE per gene (log2)")
  right.set_ylabel(f"{100 * cov['width_level']:g} % interval width (log2)")
  right.set_title(f"median width {np.median(cov['width']):.3g}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _html_intervals(cov: dict[str, Any]) -> str:
  i = int(np.flatnonzero(cov["levels"] == cov["width_level"])[0])
  c = cov["coverage"][i]
  note = (" (the validation split, which also chose the checkpoint: mildly optimistic; "
          "data.calibration_fraction holds calibration profiles out)"
          if cov["source"] == "validation" else "")
  return (f"<h2>Prediction intervals (test)</h2><p>Split-conformal per gene from "
          f"{cov['num_profiles']} {cov['source']} profiles{note}. At "
          f"{100 * cov['width_level']:g} %: test coverage {100 * c.mean():.1f} % averaged over "
          f"genes (5-95 % of genes: {100 * np.percentile(c, 5):.1f}-"
          f"{100 * np.percentile(c, 95):.1f} %), median width "
          f"{np.median(cov['width']):.3g} log2.</p>"
          '<img src="calibration.png" alt="interval calibration">\n')


def _html(run: inference.Run, genes: dict, picks: dict, curves_source: str,
          coverage: dict[str, Any] | None = None) -> str:
  results = results_lib.read_results(run.workdir) or {}
  rows = []
  for name in ("val", "test"):
    g = genes[name]
    cc = g["cc"][np.isfinite(g["cc"])]
    rows.append(f"<tr><td>{name}</td><td>{g['mae'].mean():.4f}</td><td>{cc.mean():.4f}</td>"
                f"<td>{g['mae_expression'].mean():.4f}</td><td>{int(g['constant'].sum())}</td>"
                f"<td>{int((g['cc'] >= 0.9).sum())}</td></tr>")
  pick_text = ", ".join(f"{k} {html.escape(run.target_ids[v])}" for k, v in picks.items())
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lsmtl_jax report: {html.escape(run.workdir)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
img{{max-width:100%;border:1px solid #eee}}</style></head><body>
<h1>{html.escape(registry.label(run.config.method))} run
{html.escape(os.path.abspath(run.workdir))}</h1>
<p>Best checkpoint: step {run.best_step} of {results.get('steps', '?')};
{run.num_landmarks} landmarks, {run.num_targets} targets.
Per-gene table: <a href="{GENES_NAME}">{GENES_NAME}</a>.</p>
<table><tr><th>split</th><th>MAE (z)</th><th>CC</th><th>MAE (log2)</th>
<th>constant genes</th><th>genes with CC &ge; 0.9</th></tr>{''.join(rows)}</table>
<h2>Per-gene CC</h2><img src="cc_histogram.png" alt="CC histogram">
<h2>Predicted vs measured (test): {pick_text}</h2><img src="scatter.png" alt="scatter plots">
<h2>Training curves (from {curves_source})</h2>
<img src="training_curves.png" alt="training curves">
{_html_intervals(coverage) if coverage is not None else ""}</body></html>
"""


FIGURES = ("cc_histogram.png", "scatter.png", "training_curves.png", "calibration.png")


def write_report(workdir: str, run: inference.Run | None = None) -> str:
  """Builds WORKDIR/report/ and returns its path; an existing report is replaced."""
  if run is None:
    inference.check_finished(workdir)
  final = os.path.join(workdir, REPORT_DIR)
  fileio.check_atomic_dir(final)
  run = run or inference.load_run(workdir)
  predictor = inference.Predictor(run, run.config.train.eval_batch_size)
  genes = gene_metrics(run)
  with fileio.atomic_dir(final) as tmp:
    write_genes_tsv(os.path.join(tmp, GENES_NAME), run, genes)
    plot_cc_histogram(os.path.join(tmp, "cc_histogram.png"), genes)
    picks = plot_scatter(os.path.join(tmp, "scatter.png"), run, predictor, genes)
    source = plot_training_curves(os.path.join(tmp, "training_curves.png"), workdir)
    coverage = interval_coverage(run, predictor,
                                 run.calibration(run.config.train.eval_batch_size))
    plot_calibration(os.path.join(tmp, "calibration.png"), coverage)
    with open(os.path.join(tmp, "report.html"), "w") as f:
      f.write(_html(run, genes, picks, source, coverage))
  return final


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.refuse(f"unexpected arguments {argv[1:]}")
  workdir = flags.FLAGS.workdir
  try:
    path = write_report(workdir)
  except (inference.RunError, store.DatasetError, fileio.OutputError) as e:
    cli.refuse(str(e))
  except OSError as e:  # the report could not be written after all (e.g. a full disk)
    cli.refuse(f"{os.path.join(workdir, REPORT_DIR)}: cannot write: {e.strerror or e}")
  print(f"report: {os.path.join(path, 'report.html')}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A finished training run.")
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=cli.parse_flags)
