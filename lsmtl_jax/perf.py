"""Model FLOPs and the measured matmul peak of the current device, for MFU; and
the one lowering choice the package makes for speed on CPU (threefry, below)."""

from __future__ import annotations

import functools
import os
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
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 8) -> float:
  """FLOP/s of the best of `repeats` square matmuls on the default device.

  Best of several, because on a shared machine the median measures the
  neighbours; MFU against it is therefore conservative.
  """
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


ROLLED_THREEFRY_ENV = "LSMTL_JAX_ROLLED_THREEFRY"


def use_unrolled_threefry_on_cpu() -> bool:
  """Lowers JAX's threefry hash on CPU the way GPU and TPU get it: unrolled.

  JAX emits threefry for XLA:CPU as a 5-trip while loop (short compiles); every
  trip writes and re-reads two uint32 arrays the size of the draw. Deep-LSMTL
  draws a B x T task mask each step (256 x 9,600 at the demo size): 30-40 ms
  rolled, 4-5 ms unrolled on 2 cores, the same bits (tests check them). Dropout
  masks gain the same way. Set LSMTL_JAX_ROLLED_THREEFRY=1 to keep JAX's
  default. Returns whether the unrolled rule is installed.

  Uses JAX internals (jax._src.random.threefry2x32); where they moved, nothing
  changes and this returns False.
  """
  if os.environ.get(ROLLED_THREEFRY_ENV, "") not in ("", "0"):
    return False
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    rule = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    mlir.register_lowering(threefry2x32.threefry2x32_p, rule, platform="cpu")
  except (ImportError, AttributeError):
    return False
  return True


# train.py imports this module, so every training and benchmark process gets it
# before its first step is traced.
UNROLLED_THREEFRY = use_unrolled_threefry_on_cpu()
