"""Per-gene MAE and Lin's concordance correlation from streamed sufficient statistics.

Each evaluation batch adds (n, sum y, sum p, sum y^2, sum p^2, sum y*p,
sum |y - p|) per gene; nothing else is kept, so evaluation streams over any
number of samples and splits along genes exactly like the head does. The
summary is computed on the host in float64, and an affine per-gene map
(standardized -> expression units) is applied to the statistics exactly.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

STAT_NAMES = ("n", "sum_y", "sum_p", "sum_yy", "sum_pp", "sum_yp", "sum_abs")
# Relative variance below which a gene counts as constant (its CC is undefined).
CONSTANT_RTOL = 1e-10


def zeros(num_genes: int) -> dict[str, jnp.ndarray]:
  return {name: jnp.zeros((num_genes,), jnp.float32) for name in STAT_NAMES}


def batch_statistics(y: jnp.ndarray, p: jnp.ndarray,
                     weight: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Sums over the batch axis; `weight` (0 or 1 per row) drops padding rows."""
  if weight is None:
    weight = jnp.ones(y.shape[:1], y.dtype)
  w = weight[:, None]
  wy, wp = w * y, w * p
  return {
      "n": jnp.broadcast_to(jnp.sum(weight), y.shape[1:]).astype(jnp.float32),
      "sum_y": jnp.sum(wy, 0),
      "sum_p": jnp.sum(wp, 0),
      "sum_yy": jnp.sum(wy * y, 0),
      "sum_pp": jnp.sum(wp * p, 0),
      "sum_yp": jnp.sum(wy * p, 0),
      "sum_abs": jnp.sum(w * jnp.abs(y - p), 0),
  }


def accumulate(stats, y, p, weight=None):
  batch = batch_statistics(y, p, weight)
  return {k: stats[k] + batch[k] for k in STAT_NAMES}


def affine(stats: Mapping[str, np.ndarray], scale: np.ndarray,
           offset: np.ndarray) -> dict[str, np.ndarray]:
  """Statistics of (a * y + b, a * p + b) from those of (y, p), per gene."""
  s = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  a, b = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
  n = s["n"]
  return {
      "n": n,
      "sum_y": a * s["sum_y"] + n * b,
      "sum_p": a * s["sum_p"] + n * b,
      "sum_yy": a * a * s["sum_yy"] + 2 * a * b * s["sum_y"] + n * b * b,
      "sum_pp": a * a * s["sum_pp"] + 2 * a * b * s["sum_p"] + n * b * b,
      "sum_yp": a * a * s["sum_yp"] + a * b * (s["sum_y"] + s["sum_p"]) + n * b * b,
      "sum_abs": np.abs(a) * s["sum_abs"],
  }


def per_gene(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-gene MAE and Lin's CC (NaN where the gene is constant)."""
  s = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  n = s["n"]
  mean_y, mean_p = s["sum_y"] / n, s["sum_p"] / n
  var_y = np.maximum(s["sum_yy"] / n - mean_y**2, 0.0)
  var_p = np.maximum(s["sum_pp"] / n - mean_p**2, 0.0)
  cov = s["sum_yp"] / n - mean_y * mean_p
  constant = var_y <= CONSTANT_RTOL * np.maximum(mean_y**2, 1.0)
  denom = var_y + var_p + (mean_y - mean_p) ** 2
  with np.errstate(invalid="ignore", divide="ignore"):
    cc = np.where(constant, np.nan, 2 * cov / denom)
  return {"mae": s["sum_abs"] / n, "cc": cc, "constant": constant}


def summarize(stats: Mapping[str, np.ndarray]) -> dict[str, float | int]:
  genes = per_gene(stats)
  cc = genes["cc"][~genes["constant"]]
  return {
      "mae_mean": float(np.mean(genes["mae"])),
      "mae_std": float(np.std(genes["mae"])),
      "cc_mean": float(np.mean(cc)) if cc.size else float("nan"),
      "cc_std": float(np.std(cc)) if cc.size else float("nan"),
      "n_samples": int(round(float(np.asarray(stats["n"])[0]))),
      "n_genes": int(genes["mae"].size),
      "n_constant_genes": int(genes["constant"].sum()),
  }
