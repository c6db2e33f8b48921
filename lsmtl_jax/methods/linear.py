"""LSR: closed-form ridge regression of all targets on the landmarks.

The normal equations are accumulated batch by batch in float64 (the training
split streams through once), centred so the intercept is not penalized, and
solved once: W = (Cxx + ridge I)^-1 Cxy, b = mean_y - mean_x W.
"""

from __future__ import annotations

import numpy as np

from lsmtl_jax.data import loader
from lsmtl_jax.data.store import Dataset


def moments(dataset: Dataset, split: str, batch_size: int,
            prefetch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(mean_x, mean_y, Cxx, Cxy) of a split, accumulated in float64 in one pass."""
  num_l, num_t = dataset.num_landmarks, dataset.num_targets
  n = 0.0
  sum_x, sum_y = np.zeros(num_l), np.zeros(num_t)
  xtx, xty = np.zeros((num_l, num_l)), np.zeros((num_l, num_t))
  for batch in loader.eval_batches(dataset, dataset.split(split), batch_size, prefetch):
    keep = batch["weight"] > 0
    x = batch["x"][keep].astype(np.float64)
    y = batch["y"][keep].astype(np.float64)
    n += x.shape[0]
    sum_x += x.sum(0)
    sum_y += y.sum(0)
    xtx += x.T @ x
    xty += x.T @ y
  mean_x, mean_y = sum_x / n, sum_y / n
  cxx = xtx / n - np.outer(mean_x, mean_x)
  cxy = xty / n - np.outer(mean_x, mean_y)
  return mean_x, mean_y, cxx, cxy


def fit(dataset: Dataset, split: str, batch_size: int, ridge: float,
        prefetch: int = 4) -> tuple[np.ndarray, np.ndarray]:
  mean_x, mean_y, cxx, cxy = moments(dataset, split, batch_size, prefetch)
  weights = np.linalg.solve(cxx + ridge * np.eye(dataset.num_landmarks), cxy)
  bias = mean_y - mean_x @ weights
  return weights, bias
