"""KNN-GE: the mean target profile of the k training profiles nearest in
landmark space (exact Euclidean distances), for several k at once.

The training split is held on the device (n x L and n x T). Queries come in
blocks; squared distances |q|^2 - 2 q.x + |x|^2 are computed against blocks of
training rows and merged into a running top-k, so memory stays bounded by
query_block x train_block. One neighbour search serves every candidate k:
the prediction for k is the running mean (a cumulative sum) of the first k.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lsmtl_jax import evaluation
from lsmtl_jax import metrics
from lsmtl_jax.data import loader
from lsmtl_jax.data.sources import Data
from lsmtl_jax.data.store import Dataset
from lsmtl_jax.methods import base


def load_split(dataset: Dataset, split: str | np.ndarray, batch_size: int,
               prefetch: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) of a split (a name or its row indices), in float32."""
  rows = dataset.split(split) if isinstance(split, str) else split
  xs, ys = [], []
  for batch in loader.eval_batches(dataset, rows, batch_size, prefetch):
    keep = batch["weight"] > 0
    xs.append(batch["x"][keep])
    ys.append(batch["y"][keep])
  return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_block(best_d, best_i, queries, block, block_sq, offset, k: int):
  d = (jnp.sum(queries**2, 1, keepdims=True) - 2.0 * queries @ block.T + block_sq[None, :])
  idx = offset + jnp.arange(block.shape[0], dtype=jnp.int32)
  all_d = jnp.concatenate([best_d, d], axis=1)
  all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, d.shape)], axis=1)
  neg, pos = jax.lax.top_k(-all_d, k)
  return -neg, jnp.take_along_axis(all_i, pos, axis=1)


class Neighbours:
  """Exact k-nearest-neighbour search over training rows held on the device."""

  def __init__(self, train_x: np.ndarray, train_block: int):
    n = train_x.shape[0]
    self.blocks = []
    for start in range(0, n, train_block):
      block = jnp.asarray(train_x[start:start + train_block])
      self.blocks.append((block, jnp.sum(block**2, 1), jnp.int32(start)))
    self.num_train = n

  def search(self, queries: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(squared distances, indices) of the k nearest, nearest first: (Q, k) each."""
    k = min(k, self.num_train)
    best_d = jnp.full((queries.shape[0], k), jnp.inf, jnp.float32)
    best_i = jnp.zeros((queries.shape[0], k), jnp.int32)
    for block, block_sq, offset in self.blocks:
      best_d, best_i = _merge_block(best_d, best_i, queries, block, block_sq, offset, k)
    return best_d, best_i


@functools.partial(jax.jit, static_argnames=("ks",), donate_argnums=0)
def _accumulate_ks(stats, train_y, idx, y, weight, ks: tuple[int, ...]):
  """Adds one batch's per-gene sums for each k; stats leaves are (K, T)."""
  csum = jnp.cumsum(train_y[idx], axis=1)  # (Q, kmax, T)
  preds = jnp.stack([csum[:, k - 1] / k for k in ks])  # (K, Q, T)
  batch = jax.vmap(lambda p: metrics.batch_statistics(y, p, weight))(preds)
  return {name: stats[name] + batch[name] for name in metrics.STAT_NAMES}


def split_statistics(dataset: Dataset, indices: np.ndarray, search: Neighbours,
                     train_y: jnp.ndarray, ks: tuple[int, ...], query_block: int,
                     prefetch: int = 4) -> list[dict[str, np.ndarray]]:
  """Per-gene sums of the rows `indices` for every k in ks (one dict per k)."""
  ks = tuple(min(k, search.num_train) for k in ks)
  kmax = max(ks)
  stats = {name: jnp.zeros((len(ks), dataset.num_targets), jnp.float32)
           for name in metrics.STAT_NAMES}
  for batch in loader.eval_batches(dataset, indices, query_block, prefetch):
    _, idx = search.search(jnp.asarray(batch["x"]), kmax)
    stats = _accumulate_ks(stats, train_y, idx, jnp.asarray(batch["y"]),
                           jnp.asarray(batch["weight"]), ks)
  host = {name: np.asarray(v, np.float64) for name, v in stats.items()}
  return [{name: host[name][i] for name in metrics.STAT_NAMES} for i in range(len(ks))]


def _fit(config, data: Data) -> dict[str, Any]:
  """One exact neighbour search per split serves every k; the k with the best
  validation MAE is reported on both splits."""
  cfg = config.knn
  start = time.perf_counter()
  train_x, train_y = load_split(data.train, data.train_indices,
                                config.train.eval_batch_size, config.data.prefetch)
  search = Neighbours(train_x, cfg.train_block)
  train_y = jnp.asarray(train_y)
  seconds = time.perf_counter() - start
  ks = tuple(min(int(k), search.num_train) for k in cfg.ks)
  per_k = {name: split_statistics(s.dataset, s.indices, search, train_y, ks, cfg.query_block,
                                  config.data.prefetch)
           for name, s in data.eval_sets.items()}
  val = [evaluation.summarize_split(data.eval_sets["val"].dataset, s) for s in per_k["val"]]
  best = int(np.argmin([v["mae_mean"] for v in val]))
  for k, v in zip(ks, val):
    logging.info("KNN-GE k=%d: val MAE %.5f", k, v["mae_mean"])
  splits = {name: evaluation.summarize_split(data.eval_sets[name].dataset, per_k[name][best])
            for name in data.eval_sets}
  stats = {name: per_k[name][best] for name in data.eval_sets}
  return {"steps": 1, "train_seconds": seconds,
          "examples_per_sec": search.num_train / max(seconds, 1e-9), "splits": splits,
          "gene_stats": stats,
          "extra": {"num_parameters": 0, "k": ks[best],
                    "selection": [{"k": k, "val_mae": v["mae_mean"]} for k, v in zip(ks, val)]}}


def _checks(config):
  c = config.knn
  yield (len(c.ks) > 0 and all(k >= 1 for k in c.ks),
         f"knn.ks must be a non-empty list of values >= 1, got {c.ks}")
  yield (c.query_block > 0 and c.train_block > 0,
         "knn.query_block and knn.train_block must be positive")


KNN = base.Method(
    name="knn", label="KNN-GE", section="knn", fit=_fit, checks=_checks,
    # The mean target profile of the k nearest training profiles (Euclidean, in
    # standardized landmark space); k picked on the validation MAE.
    defaults={"ks": (1, 5, 10, 20, 40), "query_block": 32, "train_block": 16384},
    # Every k is scored inside one fit (one neighbour search serves all).
    tunables=(base.Tunable("knn.ks", ((1, 5, 10, 20, 40),), "choice"),))
METHODS = (KNN,)
