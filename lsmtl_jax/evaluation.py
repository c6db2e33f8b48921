"""Streams a split through a predictor and summarizes per-gene MAE and CC, in
standardized and in expression units. Shared by every method."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from lsmtl_jax import metrics
from lsmtl_jax.data import loader
from lsmtl_jax.data.store import Dataset

# (stats, batch) -> stats, jitted by the caller; batch has x, y and weight.
StatsStep = Callable[[dict, dict], dict]


def split_statistics(dataset: Dataset, split: str, batch_size: int, stats_step: StatsStep,
                     prefetch: int = 4) -> dict[str, np.ndarray]:
  stats = metrics.zeros(dataset.num_targets)
  for batch in loader.eval_batches(dataset, dataset.split(split), batch_size, prefetch):
    stats = stats_step(stats, batch)
  return {k: np.asarray(v, np.float64) for k, v in jax.device_get(stats).items()}


def summarize_split(dataset: Dataset, stats: dict[str, np.ndarray]) -> dict[str, Any]:
  summary = metrics.summarize(stats)
  scale, offset = dataset.target_scale_and_offset()
  summary["expression_units"] = metrics.summarize(metrics.affine(stats, scale, offset))
  return summary


def evaluate(dataset: Dataset, split: str, batch_size: int, stats_step: StatsStep,
             prefetch: int = 4) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(summary, per-gene stats) of one split."""
  stats = split_statistics(dataset, split, batch_size, stats_step, prefetch)
  return summarize_split(dataset, stats), stats


def make_stats_step(predict: Callable[[Any, np.ndarray], Any]) -> StatsStep:
  """A jitted stats step from predict(x) -> y_hat; stats buffers are donated."""

  def step(stats, batch):
    return metrics.accumulate(stats, batch["y"], predict(batch["x"]), batch["weight"])

  return jax.jit(step, donate_argnums=0)
