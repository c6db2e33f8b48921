"""bfloat16 against float32: the training step's time in both, interleaved.

  python -m lsmtl_jax.benchmark --suite=precision \
      [--precision_sizes=2x512@256,3x3000@256,3x9000@64] [--repeats=5] [--json]

Each size is DEPTHxHIDDEN@BATCH (943 landmarks, 9,520 targets unless the
config's dataset says otherwise). One float32 train state per size; the
float32 step and the bfloat16 step (model.dtype='bfloat16': bf16 matmuls,
float32 parameters and Adam state, so the same state fits both) take turns on
it, which one goes first alternating per repeat, each timed block after an
untimed step. The ratio bf16 / fp32 is taken per repeat and reported as its
median with the min-max spread: on a shared machine only interleaved ratios
mean anything.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from lsmtl_jax import bench_plan
from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import perf
from lsmtl_jax import stepbench

DEFAULT_SIZES = "2x512@256,3x3000@256,3x9000@64"
DTYPES = ("float32", "bfloat16")
Size = bench_plan.Size
parse_sizes = bench_plan.parse_sizes


def sized(config: ml_collections.ConfigDict, size: Size,
          dtype: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.depth, c.model.hidden, c.train.batch_size = size.depth, size.hidden, size.batch
  c.model.dtype = dtype
  return c


class DtypePair:
  """One float32 train state and the train step compiled in both dtypes."""

  def __init__(self, config, size: Size, num_landmarks: int, num_targets: int):
    self.bench = stepbench.StepBench(sized(config, size, "float32"), num_landmarks, num_targets)
    bf16 = build.build_network(config_lib.resolve(sized(config, size, "bfloat16")),
                               num_landmarks, num_targets)
    self.steps = {"float32": self.bench.step_fn,
                  "bfloat16": bf16.train_step(self.bench.shardings, self.bench.base_key)}
    self.compile_seconds = {}

  def block(self, dtype: str, steps: int) -> float:
    """Seconds per step of `steps` steps in `dtype`, the state carried on."""
    self.bench.step_fn = self.steps[dtype]
    return self.bench.block(steps)

  def warmup(self) -> None:
    for dtype in DTYPES:
      start = time.perf_counter()
      self.block(dtype, 1)
      self.compile_seconds[dtype] = time.perf_counter() - start


def steps_per_block(step_seconds: float, block_seconds: float, most: int = 200) -> int:
  return int(min(most, max(1, round(block_seconds / max(step_seconds, 1e-6)))))


def spread(values: Sequence[float]) -> dict[str, float]:
  values = [float(v) for v in values]
  return {"median": float(np.median(values)), "min": min(values), "max": max(values),
          "n": len(values)}


def measure_pair(pair: DtypePair, repeats: int, block_seconds: float) -> dict[str, Any]:
  """Interleaved blocks of both dtypes on one state; per-repeat ratios."""
  pair.warmup()
  probe = {d: pair.block(d, 1) for d in DTYPES}
  steps = steps_per_block(max(probe.values()), block_seconds)
  times = {d: [] for d in DTYPES}
  for rep in range(repeats):
    for dtype in DTYPES if rep % 2 == 0 else DTYPES[::-1]:
      pair.block(dtype, 1)  # untimed: the other dtype's step left the caches cold
      times[dtype].append(pair.block(dtype, steps))
  ratios = [b / f for f, b in zip(times["float32"], times["bfloat16"])]
  batch = pair.bench.batch_size
  flops = pair.bench.flops_per_example()
  out = {"steps_per_block": steps, "repeats": repeats, "flops_per_example": flops,
         "bf16_over_fp32_step": spread(ratios),
         "compile_and_first_step_s": dict(pair.compile_seconds)}
  for dtype in DTYPES:
    step = spread(times[dtype])
    out[dtype] = {"step_s": step, "examples_per_s": batch / step["median"],
                  "achieved_flops": flops * batch / step["median"]}
  return out


def run_suite(config, sizes: Sequence[Size], num_landmarks: int, num_targets: int,
              repeats: int, block_seconds: float,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  rows = []
  for size in sizes:
    log(f"precision: timing {size.label}, float32 and bfloat16 interleaved ...")
    pair = DtypePair(config, size, num_landmarks, num_targets)
    row = {"label": size.label, "depth": size.depth, "hidden": size.hidden,
           "batch": size.batch, "landmarks": num_landmarks, "targets": num_targets,
           **measure_pair(pair, repeats, block_seconds)}
    row["peak_device_bytes"] = stepbench.peak_device_memory()
    rows.append(row)
    q = row["bf16_over_fp32_step"]
    log(f"precision: {size.label}: fp32 {1e3 * row['float32']['step_s']['median']:.1f} ms, "
        f"bf16 {1e3 * row['bfloat16']['step_s']['median']:.1f} ms, bf16/fp32 "
        f"{q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f})")
    del pair
  device = jax.devices()[0]
  return {"suite": "precision", "backend": jax.default_backend(),
          "device_kind": getattr(device, "device_kind", str(device)),
          "threads": stepbench.num_threads(), "jax": jax.__version__,
          "known_peak": perf.known_peak(getattr(device, "device_kind", "")),
          "sizes": rows, "host_peak_rss": stepbench.host_peak_rss()}


def format_report(report: dict[str, Any]) -> str:
  lines = [f"== bfloat16 vs float32 train step, {report['backend']} ({report['device_kind']}), "
           f"{report['threads']} threads, jax {report['jax']}",
           f"  {'size':<28} {'fp32 ms':>10} {'bf16 ms':>10} {'bf16/fp32':>18} {'steps x reps':>13}"]
  for r in report["sizes"]:
    f, b, q = r["float32"]["step_s"], r["bfloat16"]["step_s"], r["bf16_over_fp32_step"]
    lines.append(f"  {r['label']:<28} {1e3 * f['median']:>10.1f} {1e3 * b['median']:>10.1f} "
                 f"{q['median']:>6.2f} ({q['min']:.2f}-{q['max']:.2f}) "
                 f"{r['steps_per_block']:>6} x {r['repeats']}")
  lines.append("  (median over interleaved repeats; bf16/fp32 < 1: bfloat16 is faster)")
  return "\n".join(lines)
