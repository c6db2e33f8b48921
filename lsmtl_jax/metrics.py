"""Per-gene MAE and Lin's concordance correlation from streamed sufficient statistics.

Each evaluation batch adds (n, sum y, sum p, sum y^2, sum p^2, sum y*p,
sum |y - p|) per gene; nothing else is kept, so evaluation streams over any
number of samples and splits along genes exactly like the head does. The
summary is computed on the host in float64, and an affine per-gene map
(standardized -> expression units) is applied to the statistics exactly.

The sums are taken around a per-gene reference (`shift_y`, `shift_p`: the
first batch's weighted mean), i.e. sum_y is sum (y - shift_y), sum_yy is
sum (y - shift_y)^2, and so on. On the device they are float32, and a gene far
from zero relative to its spread (a cross-platform shift: mean 300, sd 1 in
standardized units) would lose its variance to cancellation in plain float32
sums; around its own reference it keeps full precision. `unshift` turns them
into plain float64 sums (shift 0) on the host, and every host function here
accepts either form (statistics without shift fields are plain sums).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

SUM_NAMES = ("n", "sum_y", "sum_p", "sum_yy", "sum_pp", "sum_yp", "sum_abs")
STAT_NAMES = SUM_NAMES + ("shift_y", "shift_p")
# Relative variance below which a gene counts as constant (its CC is undefined).
CONSTANT_RTOL = 1e-10


def zeros(num_genes: int) -> dict[str, jnp.ndarray]:
  return {name: jnp.zeros((num_genes,), jnp.float32) for name in STAT_NAMES}


def batch_statistics(y: jnp.ndarray, p: jnp.ndarray, weight: jnp.ndarray | None = None,
                     shift_y: jnp.ndarray | None = None,
                     shift_p: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Sums over the batch axis around per-gene shifts (default 0: plain sums).

  `weight` (0 or 1 per row) drops padding rows. The returned shift fields are
  the shifts used, so statistics and batch stay one pytree.
  """
  y = jnp.asarray(y, jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  if weight is None:
    weight = jnp.ones(y.shape[:1], jnp.float32)
  zero = jnp.zeros(y.shape[1:], jnp.float32)
  shift_y = zero if shift_y is None else shift_y
  shift_p = zero if shift_p is None else shift_p
  w = weight[:, None].astype(jnp.float32)
  dy, dp = y - shift_y, p - shift_p
  wy, wp = w * dy, w * dp
  return {
      "n": jnp.broadcast_to(jnp.sum(weight), y.shape[1:]).astype(jnp.float32),
      "sum_y": jnp.sum(wy, 0),
      "sum_p": jnp.sum(wp, 0),
      "sum_yy": jnp.sum(wy * dy, 0),
      "sum_pp": jnp.sum(wp * dp, 0),
      "sum_yp": jnp.sum(wy * dp, 0),
      "sum_abs": jnp.sum(w * jnp.abs(y - p), 0),
      "shift_y": shift_y,
      "shift_p": shift_p,
  }


def _weighted_mean(v: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(w[:, None] * v, 0) / jnp.maximum(jnp.sum(w), 1.0)


def accumulate(stats, y, p, weight=None):
  """Adds one batch. A gene's shifts are fixed by the first batch that has rows."""
  y = jnp.asarray(y, jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  w = (jnp.ones(y.shape[:1], jnp.float32) if weight is None
       else jnp.asarray(weight, jnp.float32))
  unset = stats["n"] == 0
  shift_y = jnp.where(unset, _weighted_mean(y, w), stats["shift_y"])
  shift_p = jnp.where(unset, _weighted_mean(p, w), stats["shift_p"])
  batch = batch_statistics(y, p, w, shift_y, shift_p)
  out = {k: stats[k] + batch[k] for k in SUM_NAMES}
  out["shift_y"], out["shift_p"] = shift_y, shift_p
  return out


def _float64(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  s = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  for k in ("shift_y", "shift_p"):
    if k not in s:
      s[k] = np.zeros_like(s["n"])
  return s


def unshift(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Plain float64 sums (shift 0) from sums around shifts: exact to float64 rounding."""
  s = _float64(stats)
  n, a, b = s["n"], s["shift_y"], s["shift_p"]
  return {
      "n": n,
      "sum_y": s["sum_y"] + n * a,
      "sum_p": s["sum_p"] + n * b,
      "sum_yy": s["sum_yy"] + 2 * a * s["sum_y"] + n * a * a,
      "sum_pp": s["sum_pp"] + 2 * b * s["sum_p"] + n * b * b,
      "sum_yp": s["sum_yp"] + a * s["sum_p"] + b * s["sum_y"] + n * a * b,
      "sum_abs": s["sum_abs"],
      "shift_y": np.zeros_like(n),
      "shift_p": np.zeros_like(n),
  }


def affine(stats: Mapping[str, np.ndarray], scale: np.ndarray,
           offset: np.ndarray) -> dict[str, np.ndarray]:
  """Statistics of (a * y + b, a * p + b) from those of (y, p), per gene.

  Sums around a shift c become sums around a * c + b, scaled by a (or a^2).
  """
  s = _float64(stats)
  a, b = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
  return {
      "n": s["n"],
      "sum_y": a * s["sum_y"],
      "sum_p": a * s["sum_p"],
      "sum_yy": a * a * s["sum_yy"],
      "sum_pp": a * a * s["sum_pp"],
      "sum_yp": a * a * s["sum_yp"],
      "sum_abs": np.abs(a) * s["sum_abs"],
      "shift_y": a * s["shift_y"] + b,
      "shift_p": a * s["shift_p"] + b,
  }


def per_gene(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-gene MAE and Lin's CC (NaN where the gene is constant)."""
  s = _float64(stats)
  n = s["n"]
  with np.errstate(invalid="ignore", divide="ignore"):
    dy, dp = s["sum_y"] / n, s["sum_p"] / n  # means relative to the shifts
    mean_y = s["shift_y"] + dy
    var_y = np.maximum(s["sum_yy"] / n - dy**2, 0.0)
    var_p = np.maximum(s["sum_pp"] / n - dp**2, 0.0)
    cov = s["sum_yp"] / n - dy * dp
    constant = var_y <= CONSTANT_RTOL * np.maximum(mean_y**2, 1.0)
    denom = var_y + var_p + ((s["shift_y"] - s["shift_p"]) + (dy - dp)) ** 2
    cc = np.where(constant, np.nan, 2 * cov / denom)
    mae = s["sum_abs"] / n
  return {"mae": mae, "cc": cc, "constant": constant}


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
