"""Per-gene split-conformal prediction intervals (numpy only).

A held-out profile i gives each target gene g the score

    r_ig = |y_ig - yhat_ig|            (standardized units)

and with n such profiles the interval at coverage c is

    yhat_g +- q_g(c),   q_g(c) = the ceil((n + 1) c)-th smallest of r_1g ... r_ng.

If the held-out profiles and a new one are exchangeable (drawn alike, and not
used to fit or choose the model), the new profile's y_g falls inside with
probability at least c, and below c + 1 / (n + 1) when scores do not tie
(split conformal prediction: Vovk et al. 2005, Lei et al. 2018). The guarantee
holds for every gene separately, averaged over profiles; it says nothing about
one particular profile. `ceil((n + 1) c) > n` has no finite quantile: such a
level needs more held-out profiles.

Which profiles are held out is the caller's choice (data.calibration_fraction,
docs/using_a_model.md "Prediction intervals"); a `Calibration` records how many
there were and where they came from. Quantiles are kept on the grid `LEVELS`
(0.50, 0.51, ..., 0.99), so a model carries every usual coverage in a few MB.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LEVELS = tuple(round(0.5 + i / 100, 2) for i in range(50))  # 0.50 ... 0.99
# Where the scores come from: a calibration subset that training never
# evaluated on, or (calibration_fraction 0) the validation split itself, which
# chose the checkpoint and so makes the intervals slightly optimistic.
SOURCES = ("calibration", "validation")


class IntervalError(ValueError):
  """A coverage the calibration cannot give; the message says why."""


def conformal_rank(n: int, level: float) -> int:
  """k = ceil((n + 1) c): the rank (1-based) of the score that bounds coverage c."""
  # (n + 1) c is often an integer up to rounding (10 * 0.9 = 9.000000000000002).
  return int(math.ceil((n + 1) * level - 1e-9))


def conformal_quantiles(scores: np.ndarray, levels=LEVELS) -> np.ndarray:
  """[len(levels), genes] float64: per gene (column) the conformal quantile of
  its n scores (rows) at each coverage level; +inf where the rank exceeds n."""
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [profiles, genes], got shape {scores.shape}")
  n = scores.shape[0]
  ordered = np.sort(scores, axis=0)  # in the scores' dtype: no float64 copy of all
  out = np.full((len(levels), scores.shape[1]), np.inf)
  for i, level in enumerate(levels):
    k = conformal_rank(n, level)
    if 1 <= k <= n:
      out[i] = ordered[k - 1]
  return out


@dataclasses.dataclass
class Calibration:
  """Per-gene score quantiles at `levels` (standardized units) from
  `num_profiles` held-out profiles of `source`."""

  levels: np.ndarray  # [K] float64
  quantiles: np.ndarray  # [K, targets] float64
  num_profiles: int
  source: str

  @classmethod
  def from_scores(cls, scores: np.ndarray, source: str, levels=LEVELS) -> "Calibration":
    if source not in SOURCES:
      raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return cls(levels=np.asarray(levels, np.float64),
               quantiles=conformal_quantiles(scores, levels),
               num_profiles=int(np.asarray(scores).shape[0]), source=source)

  @property
  def num_targets(self) -> int:
    return int(self.quantiles.shape[1])

  def quantile(self, level: float) -> np.ndarray:
    """q_g(level) for every target gene; IntervalError off the grid or beyond n."""
    hits = np.flatnonzero(np.abs(self.levels - level) < 1e-9)
    if not hits.size:
      raise IntervalError(
          f"coverage {level:g} is not one the model keeps: {self.levels[0]:.2f} to "
          f"{self.levels[-1]:.2f} in steps of 0.01")
    q = self.quantiles[hits[0]]
    if not np.isfinite(q).all():
      need = int(math.ceil(level / (1 - level) - 1e-9))  # smallest n with ceil((n+1)c) <= n
      raise IntervalError(
          f"coverage {level:g} needs at least {need} held-out profiles; the calibration "
          f"has {self.num_profiles}")
    return q

  def bounds(self, prediction: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) around standardized predictions [n, targets], float64."""
    q = self.quantile(level)
    p = np.asarray(prediction, np.float64)
    return p - q, p + q

  def to_arrays(self) -> dict[str, np.ndarray]:
    return {"levels": self.levels, "quantiles": self.quantiles}

  def info(self) -> dict:
    return {"method": "split conformal, |y - yhat| per gene", "num_profiles": self.num_profiles,
            "source": self.source}

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray], info: dict) -> "Calibration":
    levels = np.asarray(arrays["levels"], np.float64)
    quantiles = np.asarray(arrays["quantiles"], np.float64)
    if levels.ndim != 1 or quantiles.shape[:1] != levels.shape:
      raise ValueError(f"calibration: {quantiles.shape} quantiles for {levels.shape} levels")
    return cls(levels=levels, quantiles=quantiles, num_profiles=int(info["num_profiles"]),
               source=str(info["source"]))


def coverage(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
  """Per gene (column): the fraction of profiles with lower <= y <= upper."""
  y = np.asarray(y, np.float64)
  return ((y >= lower) & (y <= upper)).mean(axis=0)
