"""Model FLOPs and the measured matmul peak of the current device, for MFU; and
two process settings the package makes for speed on CPU (threefry lowering,
host allocator; below), applied when train.py imports this module."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
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


# Vendor peaks per chip (dense, no sparsity), FLOP/s and HBM bytes/s, matched
# on jax's device_kind (lower case, first match wins, so the specific names
# come first). "float32" is what a float32 matmul gets under JAX's default
# precision: TF32 tensor cores on NVIDIA Ampere and later, bf16 passes on TPU
# (so there the bf16 peak); the measured matmul peak is reported beside it.
KNOWN_PEAKS = (
    # (match, name, bfloat16, float32, hbm bytes/s, hbm bytes)
    ("h100 pcie", "H100 PCIe", 756e12, 378e12, 2.0e12, 80e9),
    ("h100 nvl", "H100 NVL", 835e12, 418e12, 3.9e12, 94e9),
    ("h100", "H100 SXM", 989e12, 495e12, 3.35e12, 80e9),
    ("h200", "H200", 989e12, 495e12, 4.8e12, 141e9),
    ("a100", "A100 SXM", 312e12, 156e12, 2.0e12, 80e9),
    ("v5 lite", "TPU v5e", 197e12, 197e12, 0.82e12, 16e9),
    ("v5e", "TPU v5e", 197e12, 197e12, 0.82e12, 16e9),
    ("v6 lite", "TPU v6e", 918e12, 918e12, 1.64e12, 32e9),
    ("v6e", "TPU v6e", 918e12, 918e12, 1.64e12, 32e9),
    ("v5p", "TPU v5p", 459e12, 459e12, 2.76e12, 95e9),
    ("tpu v5", "TPU v5p", 459e12, 459e12, 2.76e12, 95e9),
    ("tpu v4", "TPU v4", 275e12, 275e12, 1.2e12, 32e9),
)


def known_peak(device_kind: str) -> dict | None:
  """{'name', 'bfloat16', 'float32', 'hbm_bytes_per_s', 'hbm_bytes'} for a
  device_kind in KNOWN_PEAKS, else None (a CPU, or a chip not listed)."""
  kind = device_kind.lower()
  for match, name, bf16, f32, bandwidth, hbm in KNOWN_PEAKS:
    if match in kind:
      return {"name": name, "bfloat16": bf16, "float32": f32, "hbm_bytes_per_s": bandwidth,
              "hbm_bytes": hbm}
  return None


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


DEFAULT_MALLOC_ENV = "LSMTL_JAX_DEFAULT_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory_for_reuse() -> bool:
  """glibc malloc: one arena, no mmap for large blocks, no trimming.

  XLA:CPU allocates each step's temporaries as one block (271 MB at the demo
  size) and frees it after the step; glibc serves blocks that large with a
  fresh mmap, so every step page-faults the whole block back in (66,000 minor
  faults, about 0.14 s of kernel time per step on 2 cores, 20 % of the step).
  With these settings freed blocks stay in the heap and the next step reuses
  them without a fault. The process keeps its peak heap (no trimming), the
  usual trade for a training job. Set LSMTL_JAX_DEFAULT_MALLOC=1 to skip;
  non-glibc systems are left alone. Returns whether the settings were applied.
  """
  if os.environ.get(DEFAULT_MALLOC_ENV, "") not in ("", "0") or not sys.platform.startswith(
      "linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)
  except (OSError, AttributeError):
    return False


# train.py imports this module, so every training and benchmark process gets
# these before its first step is traced and before XLA starts its threads.
UNROLLED_THREEFRY = use_unrolled_threefry_on_cpu()
MALLOC_TUNED = keep_freed_memory_for_reuse()
