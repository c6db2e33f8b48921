"""Streams a split through a predictor and summarizes per-gene MAE and CC, in
standardized and in expression units. Shared by every method."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lsmtl_jax import metrics
from lsmtl_jax.data import loader
from lsmtl_jax.data.store import Dataset
from lsmtl_jax.parallel import Placement

# (stats, global batch) -> stats, jitted by the caller; batch has x, y and weight.
StatsStep = Callable[[dict, dict], dict]


def split_statistics(dataset: Dataset, indices: np.ndarray, batch_size: int,
                     stats_step: StatsStep, init_stats: Callable[[], dict],
                     placement: Placement, prefetch: int = 4) -> dict[str, np.ndarray]:
  """Per-gene sums over the rows `indices`, as float64 numpy of the real targets."""
  stats = init_stats()
  local = placement.local_rows(batch_size)
  for batch in loader.eval_batches(dataset, indices, batch_size, prefetch, local):
    stats = stats_step(stats, placement.put(batch, batch_size))
  host = placement.fetch(stats)
  # The device sums are float32 around per-gene shifts; the host keeps plain float64 sums.
  return metrics.unshift({k: np.asarray(v, np.float64)[:dataset.num_targets]
                          for k, v in host.items()})


def summarize_split(dataset: Dataset, stats: dict[str, np.ndarray]) -> dict[str, Any]:
  summary = metrics.summarize(stats)
  scale, offset = dataset.target_scale_and_offset()
  summary["expression_units"] = metrics.summarize(metrics.affine(stats, scale, offset))
  return summary


def evaluate(dataset: Dataset, indices: np.ndarray, batch_size: int, stats_step: StatsStep,
             init_stats: Callable[[], dict], placement: Placement,
             prefetch: int = 4) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(summary, per-gene stats) of the rows `indices` of `dataset`."""
  stats = split_statistics(dataset, indices, batch_size, stats_step, init_stats, placement,
                           prefetch)
  return summarize_split(dataset, stats), stats
