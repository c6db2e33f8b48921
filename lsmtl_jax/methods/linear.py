"""LSR and LSR-L1: linear regression of all targets on the landmarks.

The normal equations are accumulated batch by batch in float64 (the training
split streams through once), centred so the intercept is not penalized. LSR
solves them once: W = (Cxx + ridge I)^-1 Cxy, b = mean_y - mean_x W. LSR-L1
runs FISTA over an alpha path from the same moments (lasso.py) and keeps the
alpha with the best validation MAE.
"""

from __future__ import annotations

import math
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsmtl_jax import evaluation
from lsmtl_jax import metrics
from lsmtl_jax import parallel
from lsmtl_jax.data import loader
from lsmtl_jax.data.sources import Data
from lsmtl_jax.data.store import Dataset
from lsmtl_jax.methods import base
from lsmtl_jax.methods import lasso


def moments(dataset: Dataset, split: str | np.ndarray, batch_size: int,
            prefetch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(mean_x, mean_y, Cxx, Cxy) of a split (a name or its row indices),
  accumulated in float64 in one pass."""
  rows = dataset.split(split) if isinstance(split, str) else split
  num_l, num_t = dataset.num_landmarks, dataset.num_targets
  n = 0.0
  sum_x, sum_y = np.zeros(num_l), np.zeros(num_t)
  xtx, xty = np.zeros((num_l, num_l)), np.zeros((num_l, num_t))
  for batch in loader.eval_batches(dataset, rows, batch_size, prefetch):
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


def fit(dataset: Dataset, split: str | np.ndarray, batch_size: int, ridge: float,
        prefetch: int = 4) -> tuple[np.ndarray, np.ndarray]:
  mean_x, mean_y, cxx, cxy = moments(dataset, split, batch_size, prefetch)
  weights = np.linalg.solve(cxx + ridge * np.eye(dataset.num_landmarks), cxy)
  bias = mean_y - mean_x @ weights
  return weights, bias


def evaluate(config, data: Data, weights, bias):
  """({split: summary}, {split: per-gene sums}) of y_hat = x W + b."""
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))
  placement = parallel.Placement(mesh)
  w, b = jax.device_put((jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)),
                        parallel.replicated(mesh))
  stats_step = jax.jit(lambda stats, batch: metrics.accumulate(
      stats, batch["y"], batch["x"] @ w + b, batch["weight"]), donate_argnums=0)
  init_stats = jax.jit(lambda: metrics.zeros(data.train.num_targets),
                       out_shardings=parallel.replicated(mesh))
  eval_batch = math.lcm(config.train.eval_batch_size, mesh.shape["data"])
  splits, stats = {}, {}
  for name, eval_set in data.eval_sets.items():
    splits[name], stats[name] = evaluation.evaluate(
        eval_set.dataset, eval_set.indices, eval_batch, stats_step, init_stats, placement,
        config.data.prefetch)
  return splits, stats


def _fit_lsr(config, data: Data) -> dict[str, Any]:
  start = time.perf_counter()
  weights, bias = fit(data.train, data.train_indices, config.train.eval_batch_size,
                      config.lsr.ridge, config.data.prefetch)
  seconds = time.perf_counter() - start
  splits, stats = evaluate(config, data, weights, bias)
  return _result(config, data, seconds, splits, stats, weights, {})


def _fit_lsr_l1(config, data: Data) -> dict[str, Any]:
  start = time.perf_counter()
  mean_x, mean_y, cxx, cxy = moments(data.train, data.train_indices,
                                     config.train.eval_batch_size, config.data.prefetch)
  cfg = config.lsr_l1
  path = lasso.path(mean_x, mean_y, cxx, cxy, cfg.alphas, cfg.max_iters, cfg.tol,
                    config.lsr.ridge)
  seconds = time.perf_counter() - start
  best, selection = None, []
  for alpha, weights, bias, iters in path:
    splits, stats = evaluate(config, data, weights, bias)
    nonzero = float(np.mean(weights != 0))
    selection.append({"alpha": alpha, "val_mae": splits["val"]["mae_mean"],
                      "iterations": iters, "nonzero_fraction": nonzero})
    logging.info("LSR-L1 alpha %g: %d iterations, %.1f%% weights nonzero, val MAE %.5f",
                 alpha, iters, 100 * nonzero, splits["val"]["mae_mean"])
    if best is None or splits["val"]["mae_mean"] < best[0]["val"]["mae_mean"]:
      best = (splits, stats, alpha, weights)
  splits, stats, alpha, weights = best
  return _result(config, data, seconds, splits, stats, weights,
                 {"alpha": alpha, "selection": selection})


def _result(config, data, seconds, splits, stats, weights, extra):
  n_train = len(data.train_indices)
  return {"steps": 1, "train_seconds": seconds, "examples_per_sec": n_train / seconds,
          "splits": splits, "gene_stats": stats,
          "extra": {"num_parameters": int(weights.size + data.train.num_targets), **extra}}


def _lsr_checks(config):
  yield config.lsr.ridge >= 0, f"lsr.ridge must be >= 0, got {config.lsr.ridge}"


def _lsr_l1_checks(config):
  c = config.lsr_l1
  yield (len(c.alphas) > 0 and all(a >= 0 for a in c.alphas),
         f"lsr_l1.alphas must be a non-empty list of values >= 0, got {c.alphas}")
  yield c.max_iters > 0, f"lsr_l1.max_iters must be positive, got {c.max_iters}"
  yield c.tol >= 0, f"lsr_l1.tol must be >= 0, got {c.tol}"


LSR = base.Method(name="lsr", label="LSR", fit=_fit_lsr, checks=_lsr_checks,
                  tunables=(base.Tunable("lsr.ridge", (1e-4, 1e-3, 1e-2, 1e-1, 1.0)),))
LSR_L1 = base.Method(
    name="lsr_l1", label="LSR-L1", section="lsr_l1", fit=_fit_lsr_l1, checks=_lsr_l1_checks,
    # The lasso (1/2n)||Y - XW - b||^2 + alpha ||W||_1 by FISTA, all targets at
    # once, started from the ridge solution; alpha picked on the validation MAE.
    defaults={"alphas": (1e-4, 1e-3, 1e-2, 3e-2), "max_iters": 300, "tol": 1e-5},
    # Its alpha path is searched inside one fit (one streamed pass serves all).
    tunables=(base.Tunable("lsr_l1.alphas", ((1e-4, 1e-3, 1e-2, 3e-2),), "choice"),))
METHODS = (LSR, LSR_L1)
