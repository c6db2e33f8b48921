"""A run's workdir files: one results format for every method (results.json),
per-gene MAE, and the scalars log."""

from __future__ import annotations

import json
import os

import numpy as np

from lsmtl_jax import fileio
from lsmtl_jax.data import store

# The files of a run's workdir that other commands read.
CONFIG_NAME = "config.json"  # the resolved config the run was started with
RESULTS_NAME = "results.json"  # metrics of the final evaluation (format below)
GENES_MAE_NAME = "genes_mae.npz"  # per-gene test/val MAE, for gene-wise comparisons
GENE_STATS_NAME = "gene_stats.npz"  # per-gene sums of the final evaluation (metrics.py)
SCALARS_NAME = "metrics.jsonl"  # training and validation scalars, one JSON object a line

write_json_atomic = fileio.write_json
write_text_atomic = fileio.write_text
WorkdirError = fileio.OutputError


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError, before anything is written, for a --workdir that
  cannot hold a run: an existing file, a prepared dataset or a folder inside
  one, or a place where no folder can be created or written."""
  path = os.path.abspath(workdir)
  while True:
    if (os.path.isfile(os.path.join(path, store.META_NAME))
        and os.path.isdir(os.path.join(path, store.ARRAY_NAME))):
      where = "is" if path == os.path.abspath(workdir) else f"is inside {path},"
      raise WorkdirError(f"{workdir}: {where} a prepared dataset ({store.META_NAME}, "
                         f"{store.ARRAY_NAME}), not a run directory; pass another --workdir")
    if os.path.dirname(path) == path:
      break
    path = os.path.dirname(path)
  fileio.check_output_dir(workdir)


def write_results(workdir: str, *, method: str, config: dict, steps: int,
                  train_seconds: float, examples_per_sec: float,
                  splits: dict[str, dict], extra: dict | None = None) -> str:
  results = {
      "method": method,
      "config": config,
      "steps": int(steps),
      "train_seconds": float(train_seconds),
      "examples_per_sec": float(examples_per_sec),
      "splits": splits,
      **(extra or {}),
  }
  path = os.path.join(workdir, RESULTS_NAME)
  write_json_atomic(path, results)
  return path


def read_results(workdir: str) -> dict | None:
  path = os.path.join(workdir, RESULTS_NAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def format_table(rows: list[dict]) -> str:
  """A Markdown table of test (and val) MAE and CC, one row per results.json."""
  header = ("| method | test MAE | test CC | val MAE | val CC | steps | train s |\n"
            "|---|---|---|---|---|---|---|")
  lines = [header]
  for r in rows:
    t, v = r["splits"]["test"], r["splits"]["val"]
    lines.append(
        f"| {r['method']} | {t['mae_mean']:.4f} ± {t['mae_std']:.4f} | "
        f"{t['cc_mean']:.4f} ± {t['cc_std']:.4f} | {v['mae_mean']:.4f} | "
        f"{v['cc_mean']:.4f} | {r['steps']} | {r['train_seconds']:.1f} |")
  return "\n".join(lines)


def write_genes_mae(workdir: str, mae: dict[str, np.ndarray]) -> None:
  """WORKDIR/genes_mae.npz: per-gene MAE (standardized units) of each split
  ({split: MAE}), for the gene-wise comparisons of experiments.py."""
  arrays = {f"{name}_mae": values for name, values in mae.items()}
  with fileio.atomic_file(os.path.join(workdir, GENES_MAE_NAME), ".npz") as tmp:
    np.savez(tmp, **arrays)


def write_gene_stats(workdir: str, gene_stats: dict[str, dict[str, np.ndarray]]) -> None:
  """WORKDIR/gene_stats.npz: {split: {sum name: per-gene float64 array}} of
  the final evaluation, stored as '<split>/<sum name>'."""
  arrays = {f"{split}/{name}": np.asarray(v, np.float64)
            for split, stats in gene_stats.items() for name, v in stats.items()}
  with fileio.atomic_file(os.path.join(workdir, GENE_STATS_NAME), ".npz") as tmp:
    np.savez(tmp, **arrays)


def read_gene_stats(workdir: str) -> dict[str, dict[str, np.ndarray]] | None:
  path = os.path.join(workdir, GENE_STATS_NAME)
  if not os.path.exists(path):
    return None
  out: dict[str, dict[str, np.ndarray]] = {}
  with np.load(path) as f:
    for key in f.files:
      split, name = key.split("/", 1)
      out.setdefault(split, {})[name] = f[key]
  return out


class ScalarLines:
  """Appends {"step": N, name: value, ...} lines to WORKDIR/metrics.jsonl. A
  resumed run appends again from its checkpoint, so a step may appear twice:
  readers keep the last record of each (step, name)."""

  def __init__(self, workdir: str):
    self._file = open(os.path.join(workdir, SCALARS_NAME), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in
                                                       scalars.items()}}) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_scalars(workdir: str) -> dict[str, tuple[list[int], list[float]]] | None:
  """{name: (steps, values)} sorted by step from metrics.jsonl; None if absent.
  A torn last line (a killed writer) is ignored."""
  path = os.path.join(workdir, SCALARS_NAME)
  if not os.path.exists(path):
    return None
  latest: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      step = record.pop("step")
      for name, value in record.items():
        latest.setdefault(name, {})[step] = value
  return {name: (sorted(points), [points[s] for s in sorted(points)])
          for name, points in latest.items()}
