"""Experiment runner: the paper's comparison table, its figures and ablations.

  python -m lsmtl_jax.experiments --config=configs/experiments/demo_table.py --workdir=DIR

An experiment config has `get_config()` (the shared training config: dataset,
setting, schedule; --config.* overrides it) and `get_runs(config)`: a list of
runs, each {"method", "overrides": {dotted field: value}, "figures": {...}}.
Runs with the same method and overrides are one run, shared by every figure
that lists it. Each run trains in its own process under DIR/runs/<name>/ (so a
crash or an out-of-memory stop cannot take the runner down, and peak memory is
the run's own); a run whose results.json and genes_mae.npz exist is skipped,
and an interrupted one resumes from its latest checkpoint. Then:

  DIR/table.md, table.csv, table.json   the comparison (figure "table")
  DIR/fig2_methods.png                  every method (paper Figure 2)
  DIR/fig3_mtl.png                      MTL methods at equal trunk sizes (Figure 3)
  DIR/fig4_dgex_lsmtl.png               D-GEX vs Deep-LSMTL, MLP base, 1-3 layers x widths (Figure 4)
  DIR/fig5_sensitivity.png              dropout, lambda, mask rate, bottleneck (Figure 5)

Gene-wise: for each table row, the fraction of target genes on which the
reference method (Deep-LSMTL) has the lower test MAE, with a two-sided paired
Wilcoxon signed-rank p-value (normal approximation, ties and zeros handled as
scipy's default 'wilcox' method does).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from lsmtl_jax import fileio
from lsmtl_jax import results as results_lib

FLAGS = flags.FLAGS
RUN_CONFIG_NAME = "run_config.json"
USAGE_NAME = "usage.json"
OOM_NAME = "out_of_memory.json"
OOM_EXIT = 3
REFERENCE = "deep_lsmtl"


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------


def _slug(value) -> str:
  return str(value).replace(".", "p").replace("-", "m").replace(" ", "")


def run_name(method: str, overrides: dict) -> str:
  """A readable directory name that is the same for the same run."""
  parts = [method] + [f"{k.split('.')[-1]}{_slug(v)}" for k, v in sorted(overrides.items())]
  name = "-".join(parts)
  if len(name) > 80:
    digest = hashlib.sha1(json.dumps(sorted(overrides.items())).encode()).hexdigest()[:8]
    name = f"{method}-{digest}"
  return name


def plan(base: ml_collections.ConfigDict, runs: list[dict]) -> dict[str, dict]:
  """{name: {"method", "overrides", "figures", "config"}}, duplicates merged."""
  from lsmtl_jax import config_lib  # pylint: disable=g-import-not-at-top  (JAX import is slow)
  out: dict[str, dict] = {}
  for run in runs:
    overrides = dict(run.get("overrides", {}))
    name = run.get("name") or run_name(run["method"], overrides)
    if name in out:  # one run, several points: merge each figure's coordinates
      for figure, coords in run.get("figures", {}).items():
        out[name]["figures"].setdefault(figure, {}).update(coords)
      continue
    config = ml_collections.ConfigDict(base.to_dict())
    config.method = run["method"]
    config.compare_with = ()
    config = config_lib.resolve(config)
    for k, v in overrides.items():
      config_lib.set_field(config, k, v)
    out[name] = {"method": run["method"], "overrides": overrides,
                 "figures": {f: dict(c) for f, c in run.get("figures", {}).items()},
                 "config": config}
  return out


def is_complete(run_dir: str) -> bool:
  if os.path.exists(os.path.join(run_dir, OOM_NAME)):
    return True
  return all(os.path.exists(os.path.join(run_dir, f))
             for f in (results_lib.RESULTS_NAME, results_lib.GENES_MAE_NAME, USAGE_NAME))


def _run_child(run_dir: str) -> None:
  """Trains one run in this process (the runner's child): results, per-gene MAE,
  peak memory; an out-of-memory stop is recorded, not raised."""
  from lsmtl_jax import memory  # pylint: disable=g-import-not-at-top
  from lsmtl_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run_dir, RUN_CONFIG_NAME)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  start = time.perf_counter()
  try:
    train.train_and_evaluate(config, run_dir)
  except memory.MemoryGuardError as e:
    fileio.write_json(os.path.join(run_dir, OOM_NAME), {
        "message": str(e), "needed_bytes": e.needed_bytes, "limit_bytes": e.limit_bytes})
    print(f"error: {e}", file=sys.stderr)
    sys.exit(OOM_EXIT)
  usage = {"wall_seconds": time.perf_counter() - start,
           "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "backend": jax.default_backend()}
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    usage["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
  fileio.write_json(os.path.join(run_dir, USAGE_NAME), usage)


def execute(planned: dict[str, dict], workdir: str, log_dir: str | None = None) -> dict:
  """Runs every incomplete run, one process each; {name: 'done'|'skipped'|'oom'|'failed'}."""
  status = {}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for i, (name, run) in enumerate(planned.items()):
    run_dir = os.path.join(workdir, "runs", name)
    if is_complete(run_dir):
      status[name] = "oom" if os.path.exists(os.path.join(run_dir, OOM_NAME)) else "skipped"
      logging.info("[%d/%d] %s: complete, skipped", i + 1, len(planned), name)
      continue
    os.makedirs(run_dir, exist_ok=True)
    fileio.write_json(os.path.join(run_dir, RUN_CONFIG_NAME), run["config"].to_dict())
    logging.info("[%d/%d] %s: running", i + 1, len(planned), name)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "log.txt"), "a") as log:
      proc = subprocess.run([sys.executable, "-m", "lsmtl_jax.experiments",
                             f"--run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=repo, env=os.environ.copy(), check=False)
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
      status[name] = "done"
    elif proc.returncode == OOM_EXIT:
      status[name] = "oom"
    else:
      status[name] = "failed"
    logging.info("[%d/%d] %s: %s in %.0f s", i + 1, len(planned), name, status[name], seconds)
  return status


# ----------------------------------------------------------------------------
# Gene-wise comparison
# ----------------------------------------------------------------------------


def _normal_sf(z: float) -> float:
  return 0.5 * math.erfc(z / math.sqrt(2.0))


def wilcoxon_signed_rank(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(statistic, two-sided p) of the paired signed-rank test of a - b.

  Zero differences are dropped, tied |differences| get their mean rank, and the
  variance is tie-corrected; p from the normal approximation (exact enough
  for thousands of genes). The statistic is min(W+, W-), as scipy reports it.
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  d = d[d != 0]
  n = d.size
  if n == 0:
    return 0.0, 1.0
  absd = np.abs(d)
  order = np.argsort(absd, kind="mergesort")
  ranks = np.empty(n)
  sorted_abs = absd[order]
  # Mean rank over each run of ties.
  _, first, counts = np.unique(sorted_abs, return_index=True, return_counts=True)
  mean_rank = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(mean_rank, counts)
  w_plus = float(ranks[d > 0].sum())
  w_minus = float(ranks[d < 0].sum())
  mean = n * (n + 1) / 4.0
  var = n * (n + 1) * (2 * n + 1) / 24.0 - float(np.sum(counts**3 - counts)) / 48.0
  if var <= 0:
    return min(w_plus, w_minus), 1.0
  z = (w_plus - mean) / math.sqrt(var)
  return min(w_plus, w_minus), min(1.0, 2.0 * _normal_sf(abs(z)))


def genewise(reference_mae: np.ndarray, other_mae: np.ndarray) -> dict[str, float]:
  """Fraction of genes where the reference has the lower MAE, and the p-value."""
  _, p = wilcoxon_signed_rank(reference_mae, other_mae)
  return {"fraction_reference_better": float(np.mean(reference_mae < other_mae)),
          "wilcoxon_p": p}


# ----------------------------------------------------------------------------
# Collect, tabulate, plot
# ----------------------------------------------------------------------------


def _read(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def collect(planned: dict[str, dict], workdir: str) -> dict[str, dict]:
  """{name: row} with results, usage and per-gene MAE of each planned run."""
  from lsmtl_jax.methods import registry  # pylint: disable=g-import-not-at-top
  rows = {}
  for name, run in planned.items():
    run_dir = os.path.join(workdir, "runs", name)
    row = {"name": name, "method": run["method"],
           "label": registry.label(run["method"]), "figures": run["figures"],
           "overrides": run["overrides"], "status": "missing"}
    oom = _read(os.path.join(run_dir, OOM_NAME))
    results = _read(os.path.join(run_dir, results_lib.RESULTS_NAME))
    if oom is not None:
      row.update(status="oom", oom=oom)
    elif results is not None:
      usage = _read(os.path.join(run_dir, USAGE_NAME)) or {}
      row.update(status="ok", splits=results["splits"],
                 num_parameters=results.get("num_parameters"),
                 train_seconds=results["train_seconds"], steps=results["steps"],
                 peak_bytes=usage.get("peak_device_bytes", usage.get("peak_host_bytes")),
                 peak_kind="device" if "peak_device_bytes" in usage else "host RSS")
      genes_path = os.path.join(run_dir, results_lib.GENES_MAE_NAME)
      if os.path.exists(genes_path):
        with np.load(genes_path) as z:
          row["genes"] = {k: np.array(z[k]) for k in z.files}
    rows[name] = row
  return rows


def table_rows(rows: dict[str, dict]) -> list[dict]:
  """The table's rows (runs tagged 'table'), with the gene-wise comparison."""
  table = [r for r in rows.values() if r["figures"].get("table")]
  table.sort(key=lambda r: r["figures"]["table"].get("order", 0))
  reference = next((r for r in table if r["method"] == REFERENCE and "genes" in r), None)
  out = []
  for r in table:
    entry = {"method": r["label"], "run": r["name"], "status": r["status"]}
    if r["status"] == "ok":
      for split in ("val", "test"):
        s = r["splits"][split]
        for k in ("mae_mean", "mae_std", "cc_mean", "cc_std"):
          entry[f"{split}_{k}"] = s[k]
      entry.update(num_parameters=r["num_parameters"], peak_bytes=r["peak_bytes"],
                   peak_kind=r["peak_kind"], train_seconds=r["train_seconds"])
      if reference is not None and r is not reference and "genes" in r:
        entry.update({f"lsmtl_{k}": v for k, v in genewise(
            reference["genes"]["test_mae"], r["genes"]["test_mae"]).items()})
    elif r["status"] == "oom":
      entry["note"] = (f"out of memory: needs {r['oom']['needed_bytes'] / 2**30:.2f} GiB, "
                       f"{r['oom']['limit_bytes'] / 2**30:.2f} GiB available")
    out.append(entry)
  return out


def _fmt_bytes(n) -> str:
  if n is None:
    return ""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_markdown(entries: list[dict]) -> str:
  lines = ["| method | test MAE | test CC | val MAE | val CC | parameters | peak memory | "
           "train s | Deep-LSMTL better on (genes, test MAE) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for e in entries:
    if e["status"] != "ok":
      note = e.get("note", e["status"])
      lines.append(f"| {e['method']} | {note} | | | | | | | |")
      continue
    cell = lambda s, m: f"{e[f'{s}_{m}_mean']:.4f} ± {e[f'{s}_{m}_std']:.4f}"
    better = ""
    if "lsmtl_fraction_reference_better" in e:
      p = e["lsmtl_wilcoxon_p"]
      better = (f"{100 * e['lsmtl_fraction_reference_better']:.1f}% "
                f"(p {'< 1e-300' if p < 1e-300 else f'= {p:.2g}'})")
    lines.append(f"| {e['method']} | {cell('test', 'mae')} | {cell('test', 'cc')} | "
                 f"{cell('val', 'mae')} | {cell('val', 'cc')} | {e['num_parameters']:,} | "
                 f"{_fmt_bytes(e['peak_bytes'])} | {e['train_seconds']:.1f} | {better} |")
  return "\n".join(lines)


CSV_FIELDS = ("method", "run", "status", "test_mae_mean", "test_mae_std", "test_cc_mean",
              "test_cc_std", "val_mae_mean", "val_mae_std", "val_cc_mean", "val_cc_std",
              "num_parameters", "peak_bytes", "peak_kind", "train_seconds",
              "lsmtl_fraction_reference_better", "lsmtl_wilcoxon_p", "note")


def write_tables(workdir: str, entries: list[dict], header: str) -> None:
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(f"{header}\n\n{format_markdown(entries)}\n")
  with open(os.path.join(workdir, "table.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)
  fileio.write_json(os.path.join(workdir, "table.json"), entries)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _test(row, key="mae_mean"):
  return row["splits"]["test"][key] if row["status"] == "ok" else np.nan


def plot_methods(path: str, rows: dict[str, dict]) -> None:
  """Figure 2: test MAE and CC of every method of the table."""
  plt = _pyplot()
  table = sorted((r for r in rows.values() if r["figures"].get("table")),
                 key=lambda r: r["figures"]["table"].get("order", 0))
  labels = [r["label"] for r in table]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, key, title in ((axes[0], "mae_mean", "test MAE (lower is better)"),
                         (axes[1], "cc_mean", "test CC (higher is better)")):
    values = [_test(r, key) for r in table]
    colors = ["tab:red" if r["method"] == REFERENCE else "tab:blue" for r in table]
    ax.bar(range(len(table)), np.nan_to_num(values), color=colors)
    for i, (r, v) in enumerate(zip(table, values)):
      ax.text(i, 0 if np.isnan(v) else v, "OOM" if r["status"] == "oom" else f"{v:.3f}",
              ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title)
    finite = [v for v in values if np.isfinite(v)]
    if finite:
      lo, hi = min(finite), max(finite)
      ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-3)), hi + 0.25 * (hi - lo + 1e-3))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _grouped(rows, figure: str):
  return [r for r in rows.values() if figure in r["figures"]]


def plot_mtl(path: str, rows: dict[str, dict]) -> None:
  """Figure 3: MTL methods on the same two-block DenseNet, per width."""
  plt = _pyplot()
  runs = _grouped(rows, "fig3")
  widths = sorted({r["figures"]["fig3"]["width"] for r in runs})
  methods = []
  for r in sorted(runs, key=lambda r: r["figures"]["fig3"].get("order", 0)):
    if r["label"] not in methods:
      methods.append(r["label"])
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  bar = 0.8 / max(len(methods), 1)
  for ax, key, title in ((axes[0], "mae_mean", "test MAE"), (axes[1], "cc_mean", "test CC")):
    for j, label in enumerate(methods):
      xs, ys, ooms = [], [], []
      for i, w in enumerate(widths):
        match = [r for r in runs if r["label"] == label and r["figures"]["fig3"]["width"] == w]
        if not match:
          continue
        xs.append(i + j * bar)
        ys.append(_test(match[0], key))
        ooms.append(match[0]["status"] == "oom")
      ax.bar(xs, np.nan_to_num(ys), bar, label=label)
      for x, y, oom in zip(xs, ys, ooms):
        if oom:
          ax.text(x, 0, "OOM", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks([i + 0.4 - bar / 2 for i in range(len(widths))],
                  [f"{w} units" for w in widths])
    ax.set_title(f"{title}, 2-block DenseNet")
    finite = [v for r in runs for v in [_test(r, key)] if np.isfinite(v)]
    if finite:
      lo, hi = min(finite), max(finite)
      ax.set_ylim(max(0.0, lo - 0.2 * (hi - lo + 1e-3)), hi + 0.2 * (hi - lo + 1e-3))
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_dgex_lsmtl(path: str, rows: dict[str, dict]) -> None:
  """Figure 4: D-GEX vs Deep-LSMTL on the MLP base, depth 1-3 x widths."""
  plt = _pyplot()
  runs = _grouped(rows, "fig4")
  depths = sorted({r["figures"]["fig4"]["depth"] for r in runs})
  fig, axes = plt.subplots(1, max(len(depths), 1), figsize=(4.2 * max(len(depths), 1), 4),
                           sharey=True, squeeze=False)
  for ax, depth in zip(axes[0], depths):
    for label, style in (("D-GEX", "o--"), ("Deep-LSMTL", "s-")):
      pts = sorted((r["figures"]["fig4"]["width"], _test(r)) for r in runs
                   if r["label"] == label and r["figures"]["fig4"]["depth"] == depth)
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_title(f"{depth} hidden layer{'s' if depth > 1 else ''} (MLP)")
    ax.set_xlabel("hidden units")
  axes[0][0].set_ylabel("test MAE")
  axes[0][0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sensitivity(path: str, rows: dict[str, dict]) -> None:
  """Figure 5: Deep-LSMTL's val and test MAE against one hyperparameter at a time."""
  plt = _pyplot()
  runs = _grouped(rows, "fig5")
  params = []
  for r in runs:
    for p in r["figures"]["fig5"]:
      if p not in params:
        params.append(p)
  fig, axes = plt.subplots(1, max(len(params), 1), figsize=(3.6 * max(len(params), 1), 3.6),
                           squeeze=False)
  for ax, param in zip(axes[0], params):
    pts = sorted((r["figures"]["fig5"][param], r) for r in runs if param in r["figures"]["fig5"])
    xs = [p[0] for p in pts]
    for split, style in (("val", "o--"), ("test", "s-")):
      ax.plot(xs, [p[1]["splits"][split]["mae_mean"] if p[1]["status"] == "ok" else np.nan
                   for p in pts], style, label=split)
    if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 20:
      ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel("MAE")
  if params:
    axes[0][0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


FIGURES = (("fig2_methods.png", "table", plot_methods), ("fig3_mtl.png", "fig3", plot_mtl),
           ("fig4_dgex_lsmtl.png", "fig4", plot_dgex_lsmtl),
           ("fig5_sensitivity.png", "fig5", plot_sensitivity))


def report(planned: dict[str, dict], workdir: str, header: str) -> list[dict]:
  rows = collect(planned, workdir)
  entries = table_rows(rows)
  write_tables(workdir, entries, header)
  for filename, figure, plot in FIGURES:
    if _grouped(rows, figure):
      plot(os.path.join(workdir, filename), rows)
  return entries


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_experiment(config_path: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Plans, runs what is missing, and writes the tables and figures."""
  module = _load_module(config_path)
  planned = plan(config, module.get_runs(config))
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  status = execute(planned, workdir)
  seconds = time.perf_counter() - start
  header = getattr(module, "TITLE", os.path.basename(config_path))
  entries = report(planned, workdir, header)
  fileio.write_json(os.path.join(workdir, "status.json"), {"runs": status, "seconds": seconds})
  print(format_markdown(entries), flush=True)
  failed = [n for n, s in status.items() if s == "failed"]
  if failed:
    logging.error("failed runs (see runs/<name>/log.txt): %s", ", ".join(failed))
  return {"status": status, "entries": entries, "seconds": seconds}


flags.DEFINE_string("workdir", None, "Directory of the experiment (runs/, tables, figures).")
flags.DEFINE_string("run_dir", None, "Internal: train the one run prepared in this directory.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.run_dir:
    _run_child(FLAGS.run_dir)
    return
  if not FLAGS.config or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  path = config_flags.get_config_filename(FLAGS["config"])
  try:
    result = run_experiment(path, FLAGS.config, FLAGS.workdir)
  except KeyError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(1 if any(s == "failed" for s in result["status"].values()) else 0)


if __name__ == "__main__":
  app.run(main)
