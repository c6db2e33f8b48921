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

import concurrent.futures
import csv
import hashlib
import importlib.util
import inspect
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
from lsmtl_jax import tuning
from lsmtl_jax import workdir_lock

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
  """{name: {"method", "overrides", "figures", "config"[, "tuning"]}}, duplicates
  merged."""
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
    if "tuning" in run:
      out[name]["tuning"] = run["tuning"]
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


def execute(planned: dict[str, dict], workdir: str, jobs: int = 1) -> dict:
  """Runs every incomplete run, one process each and up to `jobs` at a time
  (compiling is mostly single-threaded, so two short runs share 2 cores
  better than one); {name: 'done'|'skipped'|'oom'|'failed'|'missing'}.
  jobs = 0 trains nothing: the tables then show what has finished."""
  status = {}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  todo = []
  for i, (name, run) in enumerate(planned.items()):
    run_dir = os.path.join(workdir, "runs", name)
    if is_complete(run_dir):
      status[name] = "oom" if os.path.exists(os.path.join(run_dir, OOM_NAME)) else "skipped"
      logging.info("[%d/%d] %s: complete, skipped", i + 1, len(planned), name)
    else:
      todo.append((i, name, run, run_dir))

  def run_one(item):
    i, name, run, run_dir = item
    os.makedirs(run_dir, exist_ok=True)
    fileio.write_json(os.path.join(run_dir, RUN_CONFIG_NAME), run["config"].to_dict())
    logging.info("[%d/%d] %s: running", i + 1, len(planned), name)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "log.txt"), "a") as log:
      proc = subprocess.run([sys.executable, "-m", "lsmtl_jax.experiments",
                             f"--run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=repo, env=os.environ.copy(), check=False)
    result = {0: "done", OOM_EXIT: "oom"}.get(proc.returncode, "failed")
    logging.info("[%d/%d] %s: %s in %.0f s", i + 1, len(planned), name, result,
                 time.perf_counter() - start)
    return name, result

  if jobs <= 0:
    status.update({name: "missing" for _, name, _, _ in todo})
  else:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      for name, result in pool.map(run_one, todo):
        status[name] = result
  return {name: status[name] for name in planned}


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
    if "tuning" in run:
      row["tuning"] = run["tuning"]
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
      if "tuning" in r and "chosen" in r["tuning"]:
        t = r["splits"]["test"]
        entry.update(test_mae_seed_sd=t["mae_mean_seed_sd"], test_cc_seed_sd=t["cc_mean_seed_sd"],
                     test_mae_per_seed=t["mae_mean_per_seed"], seeds=r["tuning"]["seeds"],
                     chosen=r["tuning"]["chosen"], tried=r["tuning"]["tried"])
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


def _setting(setting: dict | None) -> str:
  if not setting:
    return "defaults"
  return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items())


def format_markdown(entries: list[dict]) -> str:
  if any("seeds" in e for e in entries):
    return format_tuned_markdown(entries)
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


def format_tuned_markdown(entries: list[dict]) -> str:
  """Tuned rows: mean over seeds ± sd over seeds (the spread over genes is in
  table.json), the setting chosen on validation and how many were tried."""
  lines = ["| method | test MAE (seeds mean ± sd) | test CC (seeds mean ± sd) | val MAE | "
           "chosen on validation | tried | seeds | parameters | "
           "Deep-LSMTL better on (genes, seed-mean test MAE) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for e in entries:
    if e["status"] != "ok":
      lines.append(f"| {e['method']} | {e.get('note', e['status'])} | | | | | | | |")
      continue
    better = ""
    if "lsmtl_fraction_reference_better" in e:
      p = e["lsmtl_wilcoxon_p"]
      better = (f"{100 * e['lsmtl_fraction_reference_better']:.1f}% "
                f"(p {'< 1e-300' if p < 1e-300 else f'= {p:.2g}'})")
    seeds = e.get("seeds", [0])
    lines.append(
        f"| {e['method']} | {e['test_mae_mean']:.4f} ± {e.get('test_mae_seed_sd', 0):.4f} | "
        f"{e['test_cc_mean']:.4f} ± {e.get('test_cc_seed_sd', 0):.4f} | "
        f"{e['val_mae_mean']:.4f} | {_setting(e.get('chosen'))} | {len(e.get('tried', [1]))} | "
        f"{len(seeds)} | {e['num_parameters']:,} | {better} |")
  return "\n".join(lines)


CSV_FIELDS = ("method", "run", "status", "test_mae_mean", "test_mae_std", "test_cc_mean",
              "test_cc_std", "val_mae_mean", "val_mae_std", "val_cc_mean", "val_cc_std",
              "num_parameters", "peak_bytes", "peak_kind", "train_seconds",
              "lsmtl_fraction_reference_better", "lsmtl_wilcoxon_p", "test_mae_seed_sd",
              "seeds", "chosen", "note")


def write_tables(workdir: str, entries: list[dict], header: str) -> None:
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(f"{header}\n\n{format_markdown(entries)}\n")
  with open(os.path.join(workdir, "table.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)
  fileio.write_json(os.path.join(workdir, "table.json"), entries)


def write_comparisons(workdir: str, rows: dict[str, dict]) -> None:
  """Deep-LSMTL against lam = 0 (the DenseNet), both tuned: per-seed relative
  test-MAE change and the paired per-gene test (lsmtl_vs_lam0.json, appended
  to table.md); the regime study's cells (regimes.json, regimes.md)."""
  table = {r["method"]: r for r in rows.values()
           if r["figures"].get("table") and "tuning" in r and r["status"] == "ok"}
  if REFERENCE in table and "densenet" in table:
    lsmtl, lam0 = table[REFERENCE], table["densenet"]
    out = {"gain": tuning.paired_seeds(lsmtl, lam0),
           "lsmtl_chosen": lsmtl["tuning"]["chosen"], "lam0_chosen": lam0["tuning"]["chosen"]}
    if "genes" in lsmtl and "genes" in lam0:
      out.update(genewise(lsmtl["genes"]["test_mae"], lam0["genes"]["test_mae"]))
    fileio.write_json(os.path.join(workdir, "lsmtl_vs_lam0.json"), out)
    text = (f"\nDeep-LSMTL vs the DenseNet (lam = 0), both tuned on validation: relative test "
            f"MAE change per seed (positive: Deep-LSMTL better) "
            f"{', '.join(f'{100 * g:+.2f}%' for g in out['gain']['per_seed'])}; mean "
            f"{100 * out['gain']['mean']:+.2f}% ± {100 * out['gain']['sd']:.2f}%.")
    if "wilcoxon_p" in out:
      text += (f" Per gene (seed-mean test MAE): Deep-LSMTL lower on "
               f"{100 * out['fraction_reference_better']:.1f}% of genes, paired Wilcoxon "
               f"p = {out['wilcoxon_p']:.2g}.")
    with open(os.path.join(workdir, "table.md"), "a") as f:
      f.write(text + "\n")
  gains = regime_gains(rows)
  if gains:
    fileio.write_json(os.path.join(workdir, "regimes.json"), gains)
    lines = ["| dataset | training profiles | width | head share | reading | lam = 0 test MAE "
             "(chose) | Deep-LSMTL test MAE (chose) | gain, seeds mean ± sd | val gain | "
             "genes better (p) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in gains:
      genes = (f"{100 * g['genes_fraction_reference_better']:.0f}% "
               f"({g['genes_wilcoxon_p']:.2g})" if "genes_wilcoxon_p" in g else "")
      share = f"{100 * g['head_share']:.0f}%" if g.get("head_share") else ""
      lines.append(
          f"| {g['dataset']} | {g['n_train']:,} | {g['width']} | {share} | {g['reading']} | "
          f"{g['lam0_test_mae']:.4f} ({_setting(g['lam0_chosen'])}) | "
          f"{g['lsmtl_test_mae']:.4f} ({_setting(g['lsmtl_chosen'])}) | "
          f"{100 * g['gain_mean']:+.2f}% ± {100 * g['gain_sd']:.2f}% | "
          f"{100 * g['val_gain_mean']:+.2f}% | {genes} |")
    fileio.write_text(os.path.join(workdir, "regimes.md"), "\n".join(lines) + "\n")


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


def regime_gains(rows: dict[str, dict]) -> list[dict]:
  """For each regime cell (dataset, reading, training profiles, width): the
  relative test-MAE change of Deep-LSMTL against lam = 0 per seed,
  (MAE_lam0 - MAE_lsmtl) / MAE_lam0 (positive: the term helps), with the
  setting each arm chose on validation and a paired per-gene test on the
  seed-mean per-gene MAE. Arms of a reading pair with that reading's lam = 0
  arm, else with the default reading's."""
  cells: dict[tuple, dict[str, dict]] = {}
  for r in _grouped(rows, "regime"):
    f = r["figures"]["regime"]
    key = (f["dataset"], f["n_train"], f["width"])
    cells.setdefault(key, {})[f"{f['reading']}/{f['arm']}"] = r
  out = []
  for (dataset, n_train, width), arms in sorted(cells.items()):
    for name, lsmtl in sorted(arms.items()):
      reading, arm = name.split("/")
      if arm != "lsmtl":
        continue
      lam0 = arms.get(f"{reading}/lam0") or arms.get("default/lam0")
      if lam0 is None or lsmtl["status"] != "ok" or lam0["status"] != "ok":
        continue
      gain = tuning.paired_seeds(lsmtl, lam0)
      val_gain = tuning.paired_seeds(lsmtl, lam0, "val")
      entry = {"dataset": dataset, "n_train": n_train, "width": width, "reading": reading,
               "gain_mean": gain["mean"], "gain_sd": gain["sd"], "gain_per_seed": gain["per_seed"],
               "val_gain_mean": val_gain["mean"],
               "lsmtl_test_mae": lsmtl["splits"]["test"]["mae_mean"],
               "lam0_test_mae": lam0["splits"]["test"]["mae_mean"],
               "lsmtl_chosen": lsmtl["tuning"]["chosen"], "lam0_chosen": lam0["tuning"]["chosen"],
               "head_share": lsmtl["figures"]["regime"].get("head_share")}
      if "genes" in lsmtl and "genes" in lam0:
        entry.update({f"genes_{k}": v for k, v in genewise(
            lsmtl["genes"]["test_mae"], lam0["genes"]["test_mae"]).items()})
      out.append(entry)
  return out


def plot_regimes(path: str, rows: dict[str, dict]) -> None:
  """Gain of tuned Deep-LSMTL over tuned lam = 0 against training profiles:
  one panel per dataset, one curve per width (default reading), error bars
  = sd over seeds; other readings dashed."""
  plt = _pyplot()
  gains = regime_gains(rows)
  datasets = sorted({g["dataset"] for g in gains})
  fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5.5 * max(len(datasets), 1), 4),
                           squeeze=False, sharey=True)
  for ax, dataset in zip(axes[0], datasets):
    curves = sorted({(g["reading"], g["width"]) for g in gains if g["dataset"] == dataset},
                    key=lambda c: (c[0] != "default", c))
    for reading, width in curves:
      pts = sorted((g["n_train"], 100 * g["gain_mean"], 100 * g["gain_sd"]) for g in gains
                   if (g["dataset"], g["reading"], g["width"]) == (dataset, reading, width))
      label = f"width {width}" + ("" if reading == "default" else f", {reading}")
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                  fmt="o-" if reading == "default" else "s--", capsize=3, label=label)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    sizes = sorted({g["n_train"] for g in gains if g["dataset"] == dataset})
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])  # the sizes run, not log-scale minor labels
    ax.minorticks_off()
    ax.set_xlabel("training profiles")
    ax.set_title(dataset)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("test MAE gain of Deep-LSMTL over lam = 0 (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


FIGURES = (("fig2_methods.png", "table", plot_methods), ("fig3_mtl.png", "fig3", plot_mtl),
           ("fig4_dgex_lsmtl.png", "fig4", plot_dgex_lsmtl),
           ("fig5_sensitivity.png", "fig5", plot_sensitivity),
           ("regimes.png", "regime", plot_regimes))


def report(planned: dict[str, dict], workdir: str, header: str,
           tuned_rows: dict[str, dict] | None = None) -> list[dict]:
  rows = {**collect(planned, workdir), **(tuned_rows or {})}
  entries = table_rows(rows)
  genes = sorted({r["splits"]["test"]["n_genes"] for r in rows.values()
                  if r["status"] == "ok" and "test" in r.get("splits", {})
                  and "n_genes" in r["splits"]["test"]})
  if genes:  # which target set: e.g. GEO's 9,520 with copy targets kept, 9,075 without
    header += f" ({' / '.join(f'{g:,}' for g in genes)} target genes)"
  write_tables(workdir, entries, header)
  write_comparisons(workdir, rows)
  for filename, figure, plot in FIGURES:
    if _grouped(rows, figure):
      plot(os.path.join(workdir, filename), rows)
  return entries


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tuned_entries(runs: list[dict]) -> list[dict]:
  """The runs marked 'tune', each with its key (a readable name) and label."""
  from lsmtl_jax.methods import registry  # pylint: disable=g-import-not-at-top
  out = []
  for run in runs:
    if run.get("tune"):
      entry = dict(run)
      entry.setdefault("key", run.get("name") or run_name(run["method"], run.get(
          "overrides", {})))
      entry.setdefault("label", registry.label(run["method"]))
      out.append(entry)
  return out


def _run_key(run: dict) -> str:
  return run.get("name") or run_name(run["method"], dict(run.get("overrides", {})))


def _rows_of(runs: list[dict], rows: dict[str, dict]) -> list[dict]:
  """The collected rows of `runs`, each tagged as that run (a run two entries
  share is trained once but counted for both)."""
  return [{**rows[_run_key(r)], "tuning": r["tuning"]} for r in runs]


def run_tuned(config, entries: list[dict], workdir: str, jobs: int = 1) -> tuple[dict, dict]:
  """Candidates, the choice on validation, then seeds (tuning.py), level by
  level when entries are tuned on top of others (an entry's seeds run beside
  the next level's candidates); returns ({entry key: aggregated row}, {run
  name: status})."""
  from lsmtl_jax.methods import registry  # pylint: disable=g-import-not-at-top
  status: dict[str, str] = {}
  tried: dict[str, list[dict]] = {}
  chosen: dict[str, dict | None] = {}
  pending: dict[str, list[dict]] = {}  # seed runs of the previous level
  seeds: dict[str, list[dict]] = {}  # their rows
  for level in tuning.levels(entries) + [[]]:
    candidates = {}
    for e in level:
      base = e["tune"].get("on_top_of")
      if base is None or chosen.get(base) is not None:
        candidates[e["key"]] = tuning.candidate_runs(
            e, registry.get(e["method"]), chosen.get(base) if base else None)
      else:  # nothing to build on: the entry is reported missing
        candidates[e["key"]], chosen[e["key"]] = [], None
    runs = [r for rs in list(candidates.values()) + list(pending.values()) for r in rs]
    planned = plan(config, runs)
    status.update(execute(planned, workdir, jobs))
    rows = collect(planned, workdir)
    seeds.update({key: _rows_of(rs, rows) for key, rs in pending.items()})
    pending = {}
    for e in level:
      tried[e["key"]] = _rows_of(candidates[e["key"]], rows)
      best = tuning.choose(tried[e["key"]])
      chosen[e["key"]] = best["tuning"]["setting"] if best is not None else None
      if best is not None:
        logging.info("%s: chose %s (val MAE %.5f) of %d tried", e["key"],
                     best["tuning"]["setting"] or "the defaults",
                     best["splits"]["val"]["mae_mean"], len(tried[e["key"]]))
        pending[e["key"]] = tuning.seed_runs(e, best["tuning"]["setting"])
  out = {}
  for e in entries:
    out[e["key"]] = tuning.aggregate(e, tried.get(e["key"], []), seeds.get(e["key"], []))
  return out, status


def check_runs(planned: dict[str, dict]) -> None:
  """Before any run starts, so that a bad config or a missing dataset is one
  error instead of every run failing: each planned config is valid
  (config_lib.ConfigError) and the datasets it names open, with their splits
  and genes (store.DatasetError)."""
  from lsmtl_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lsmtl_jax.data import sources  # pylint: disable=g-import-not-at-top
  checked = set()
  for name, run in planned.items():
    config = run["config"]
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"run {name}: {e}") from None
    if config_lib.lam_is_auto(config):  # a table would change with the default
      raise config_lib.ConfigError(
          f"run {name}: lsmtl.lam is 'auto'; experiment runs pin it (in the experiment config "
          "or the run's overrides) or search it with 'tune'")
    data = (config.data.synthetic.enabled, config.data.path, config.data.val_path,
            config.data.test_path, config.data.train_split, config.data.val_split,
            config.data.test_split)  # what check_data looks at
    if data not in checked:
      sources.check_data(config)
      checked.add(data)


def run_experiment(config_path: str, config: ml_collections.ConfigDict, workdir: str,
                   jobs: int = 1) -> dict:
  """Plans, checks every run, runs what is missing, and writes the tables and figures."""
  module = _load_module(config_path)
  results_lib.check_workdir(workdir)
  # The runner holds the top workdir; each child holds its own run folder.
  with workdir_lock.hold(workdir):
    return _run_experiment(module, config_path, config, workdir, jobs)


def _run_experiment(module, config_path: str, config: ml_collections.ConfigDict,
                    workdir: str, jobs: int) -> dict:
  workdir = os.path.abspath(workdir)  # runs train from the repository's folder
  if hasattr(module, "prepare"):  # datasets the runs need (e.g. a prepared GCTx)
    module.prepare(config, workdir)
  wants_workdir = len(inspect.signature(module.get_runs).parameters) > 1
  runs = module.get_runs(config, workdir) if wants_workdir else module.get_runs(config)
  tuned = _tuned_entries(runs)
  tuning.levels(tuned)  # an unknown or circular on_top_of, before anything runs
  planned = plan(config, [r for r in runs if not r.get("tune")])
  if jobs > 0:  # (jobs = 0 trains nothing: the tables of what has finished)
    check_runs(planned)
  if tuned and jobs > 0:  # the candidates of step 1 (seeds differ only in seed and setting)
    from lsmtl_jax.methods import registry  # pylint: disable=g-import-not-at-top
    check_runs(plan(config, [r for e in tuned
                             for r in tuning.candidate_runs(e, registry.get(e["method"]))]))
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  status = execute(planned, workdir, jobs)
  tuned_rows, tuned_status = run_tuned(config, tuned, workdir, jobs) if tuned else ({}, {})
  status.update(tuned_status)
  seconds = time.perf_counter() - start
  header = getattr(module, "TITLE", os.path.basename(config_path))
  entries = report(planned, workdir, header, tuned_rows)
  fileio.write_json(os.path.join(workdir, "status.json"), {"runs": status, "seconds": seconds})
  print(format_markdown(entries), flush=True)
  failed = [n for n, s in status.items() if s == "failed"]
  if failed:
    logging.error("failed runs (see runs/<name>/log.txt): %s", ", ".join(failed))
  return {"status": status, "entries": entries, "seconds": seconds}


flags.DEFINE_string("workdir", None, "Directory of the experiment (runs/, tables, figures).")
flags.DEFINE_string("run_dir", None, "Internal: train the one run prepared in this directory.")
flags.DEFINE_integer("jobs", 1, "Runs trained at the same time, each its own process; 0 "
                     "trains nothing and writes the tables of what has finished.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def _refuse(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _refuse(f"unexpected arguments {argv[1:]}")
  if FLAGS.run_dir:
    _run_child(FLAGS.run_dir)
    return
  if not FLAGS.config or not FLAGS.workdir:
    _refuse("--config and --workdir are required")
  if FLAGS.jobs < 0:
    _refuse(f"--jobs must be >= 0, got {FLAGS.jobs}")
  from lsmtl_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lsmtl_jax.data import store  # pylint: disable=g-import-not-at-top
  path = config_flags.get_config_filename(FLAGS["config"])
  try:
    result = run_experiment(path, FLAGS.config, FLAGS.workdir, FLAGS.jobs)
  except (config_lib.ConfigError, store.DatasetError, results_lib.WorkdirError,
          tuning.TuningError, workdir_lock.LockError) as e:
    _refuse(str(e))
  except KeyError as e:
    _refuse(str(e))
  sys.exit(1 if any(s == "failed" for s in result["status"].values()) else 0)


if __name__ == "__main__":
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
