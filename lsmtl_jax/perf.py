"""Model FLOPs and the measured matmul peak of the current device, for MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


def dense_macs_per_example(model_config, num_landmarks: int, num_targets: int,
                           bottleneck: int = 0) -> int:
  """Multiply-adds of every dense layer in one forward pass of one example."""
  macs, width = 0, num_landmarks
  for _ in range(model_config.depth):
    macs += width * model_config.hidden
    width = width + model_config.hidden if model_config.trunk == "densenet" else (
        model_config.hidden)
  macs += width * num_targets
  if bottleneck:
    macs += 2 * num_targets * bottleneck
  return macs


def train_flops_per_example(model_config, num_landmarks, num_targets, bottleneck=0) -> int:
  """Forward (2 FLOPs per MAC) plus backward (twice the forward)."""
  return 6 * dense_macs_per_example(model_config, num_landmarks, num_targets, bottleneck)


@functools.cache
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` square matmuls on the default device."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (size, size), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
