"""The accelerator check's plan: its parts, their sizes, and an estimate of each
part's seconds on a device, from FLOPs, bytes and the device's peaks
(perf.KNOWN_PEAKS), before anything runs.

The estimate is arithmetic plus stated constants (compile times, fixed
start-up costs, host rates measured on the 2-core CPU this was written on);
each part also has a budget, the wall time the check lets it take (a part
that is still running at its budget is stopped or cut short and says so).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import ml_collections

from lsmtl_jax import perf

GEO_LANDMARKS, GEO_TARGETS = 943, 9520
GEO_PROFILES = 111_009  # the paper's GEO compendium (D-GEX's GEO split)
LIMIT_S = 600  # one lent GPU machine: 10 minutes, compiles included

# Stated constants of the estimate (seconds). Compiles on GPU: XLA autotunes
# every GEMM shape of the step once; ~10 s per train step is typical for a
# network of a few dense layers, padded head and Adam.
COMPILE_S = {"gpu": 10.0, "tpu": 15.0, "cpu": 3.0}
STARTUP_S = 15.0  # imports, backend start, the two matmul-peak measurements
LAUNCH_S = 1e-3  # per step: ~60 kernel launches, the Python dispatch
MATMUL_EFFICIENCY = 0.5  # fraction of the peak a step's GEMMs reach at these shapes
BANDWIDTH_EFFICIENCY = 0.7
ADAM_BYTES_PER_PARAM = 40  # param, grad, two moments read and written, float32
# Host-side rates measured on the 2-core CPU (docs/performance.md): the
# synthetic generator and predict's host work. The device machine has 16 cores;
# the estimate keeps the 2-core rates (pessimistic, and honest about it).
SYNTHETIC_ROWS_PER_S = 230.0  # GEO-shaped rows per CPU-second (2,000 rows: 8.6 s of CPU)
PREDICT_HOST_PROFILES_PER_S = 1527.0
PREDICT_FIXED_S = 45.0  # the tiny model's training, export, the two children's start-up
DISK_BYTES_PER_S = 1.0e9
HOST_FEED_EXAMPLES_PER_S = 28_767.0  # the loader on a GEO-shaped store, 2 cores


def generator_workers(host_cores: int = 0) -> int:
  """Processes that make the paper run's compendium: half the host's cores (the
  other parts need the rest: predict's reader and writer, pytest, the runtime).
  host_cores 0: this host's."""
  return max(1, (host_cores or os.cpu_count() or 2) // 2)


class PlanError(ValueError):
  """A size spec that cannot be read; the message names it."""


@dataclasses.dataclass(frozen=True)
class Size:
  depth: int
  hidden: int
  batch: int

  @property
  def label(self) -> str:
    return f"{self.depth} x {self.hidden:,} (batch {self.batch})"


_SIZE = re.compile(r"^(\d+)x(\d+)(?:@(\d+))?$")


def parse_sizes(spec, default_batch: int, flag: str = "--precision_sizes") -> list[Size]:
  """'3x3000@256,2x512' -> sizes; a missing @BATCH takes default_batch."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  sizes = []
  for item in (i.strip() for i in items if i.strip()):
    m = _SIZE.match(item)
    if not m or min(int(g) for g in m.groups() if g) < 1:
      raise PlanError(f"{flag}: {item!r} is not DEPTHxHIDDEN[@BATCH] with positive numbers "
                      "(e.g. 3x3000@256)")
    sizes.append(Size(int(m[1]), int(m[2]), int(m[3]) if m[3] else default_batch))
  if not sizes:
    raise PlanError(f"{flag}: no size given")
  return sizes


@dataclasses.dataclass
class Part:
  name: str
  what: str
  estimate_s: float
  budget_s: float
  detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Sizes:
  """What the check runs; --toy shrinks everything to seconds on a CPU."""
  landmarks: int = GEO_LANDMARKS
  targets: int = GEO_TARGETS
  step_sizes: str = "2x512@256,3x3000@256,3x9000@256"
  repeats: int = 5
  block_seconds: float = 0.5
  feed_batches: int = 40
  predict_profiles: int = 100_000
  paper_profiles: int = GEO_PROFILES
  paper_depth: int = 3
  paper_hidden: int = 9000
  paper_batch: int = 256
  paper_max_steps: int = 0  # 0: as many as the budget allows
  host_cores: int = 0  # 0: this host's (--assume_host_cores for another's plan)
  # The tests that run in-process on the default device. tests/test_parallel.py's
  # meshes run in children pinned to simulated CPU devices (one GPU cannot hold
  # an 8-device mesh), so on one accelerator it would test the CPU again.
  tests: tuple[str, ...] = ("tests/test_device.py", "tests/test_mixed_precision.py",
                            "tests/test_models.py")


TOY = Sizes(landmarks=24, targets=40, step_sizes="2x16@32", repeats=2, block_seconds=0.05,
            feed_batches=4, predict_profiles=0, paper_profiles=400, paper_depth=2,
            paper_hidden=16, paper_batch=32, paper_max_steps=4,
            tests=("tests/test_device.py::test_batches_shard_over_every_device_found",))

BUDGET_S = {"startup": 20, "device_tests": 90, "steps": 100, "predict": 160, "paper": 150}
# pytest's own start-up plus each file's time on the 2-core CPU (x 1.5 on a
# device: small graphs compile slower for a GPU than for the CPU).
TEST_SECONDS_ON_2_CORES = {"pytest": 5, "tests/test_mixed_precision.py": 25,
                           "tests/test_models.py": 10, "tests/test_device.py": 20}


def model_config(depth: int, hidden: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"depth": depth, "hidden": hidden, "trunk": "densenet"})


def num_params(depth: int, hidden: int, landmarks: int, targets: int, bottleneck: int) -> int:
  """Dense weights (biases are a rounding error), the regularizer's included."""
  return perf.dense_macs_per_example(model_config(depth, hidden), landmarks, targets,
                                     bottleneck)


def step_seconds(depth, hidden, batch, landmarks, targets, bottleneck, flops_peak,
                 bandwidth) -> float:
  """max(GEMM-bound, Adam-bandwidth-bound) + launch overhead."""
  flops = batch * perf.train_flops_per_example(model_config(depth, hidden), landmarks, targets,
                                               bottleneck)
  params = num_params(depth, hidden, landmarks, targets, bottleneck)
  return max(flops / (MATMUL_EFFICIENCY * flops_peak),
             ADAM_BYTES_PER_PARAM * params / (BANDWIDTH_EFFICIENCY * bandwidth)) + LAUNCH_S


def device_peaks(platform: str, device_kind: str, measured: dict[str, float] | None = None):
  """Peaks for the estimate: the known table, else what was measured, else a CPU guess."""
  known = perf.known_peak(device_kind)
  if known:
    return known
  measured = measured or {}
  f32 = measured.get("float32", 1e11)
  return {"name": device_kind or platform, "float32": f32,
          "bfloat16": measured.get("bfloat16", f32), "hbm_bytes_per_s": 2e10,
          "hbm_bytes": 0}




def make_plan(platform: str, device_kind: str, sizes: Sizes = Sizes(),
              measured: dict[str, float] | None = None, bottleneck: int = 256,
              demo_bottleneck: int = 128) -> list[Part]:
  """The parts in the order they run, each with its estimate and budget."""
  peaks = device_peaks(platform, device_kind, measured)
  compile_s = COMPILE_S.get("gpu" if platform in ("cuda", "rocm") else platform, 10.0)
  bw = peaks["hbm_bytes_per_s"]
  parts = [Part("startup", "imports, backend, float32 and bfloat16 matmul peaks", STARTUP_S,
                BUDGET_S["startup"])]

  tests_s = 1.5 * (TEST_SECONDS_ON_2_CORES["pytest"] + sum(
      TEST_SECONDS_ON_2_CORES.get(t, 10) for t in sizes.tests))
  parts.append(Part("device_tests", f"pytest on the device: {' '.join(sizes.tests)}", tests_s,
                    BUDGET_S["device_tests"], {"tests": list(sizes.tests)}))

  rows, steps_s = [], 0.0
  for size in parse_sizes(sizes.step_sizes, 256, "--step_sizes"):
    k = demo_bottleneck if size.hidden <= 512 else bottleneck
    per = {d: step_seconds(size.depth, size.hidden, size.batch, sizes.landmarks, sizes.targets,
                           k, peaks[d], bw) for d in ("float32", "bfloat16")}
    timed = sum(2 * sizes.repeats * max(sizes.block_seconds, 2 * per[d]) + 2 * per[d]
                for d in per)
    secs = 2 * compile_s + timed
    rows.append({"size": size.label, "step_s": per, "seconds": secs})
    steps_s += secs
  feed_s = 5.0 + sizes.feed_batches * 0.05
  parts.append(Part("steps", "train step, fp32 and bf16 interleaved, device-resident batches; "
                    "host feed rate; peak memory vs the guard", steps_s + feed_s,
                    BUDGET_S["steps"], {"sizes": rows, "feed_s": feed_s}))

  n = sizes.predict_profiles
  input_bytes = n * 12_328 * 4
  output_bytes = n * 11_350 * 4 * 3  # predictions and the two interval bounds
  predict_s = (PREDICT_FIXED_S + 1.1 * n / PREDICT_HOST_PROFILES_PER_S
               + (2 * input_bytes + 2 * output_bytes) / DISK_BYTES_PER_S) if n else 0.0
  parts.append(Part("predict", f"predict {n:,} LINCS-shaped profiles (benchmark_predict)",
                    predict_s, BUDGET_S["predict"] if n else 0,
                    {"profiles": n, "input_bytes": input_bytes, "output_bytes": output_bytes}))

  # Generated by a child on the host from the check's start, beside the parts
  # above, in generator_workers() processes: as many profiles as they make in
  # that time (111,009 need ~8 min of one core).
  head_start = sum(p.estimate_s for p in parts)
  rows_per_s = SYNTHETIC_ROWS_PER_S * generator_workers(sizes.host_cores)
  rows_n = min(sizes.paper_profiles, max(100, int(0.9 * head_start * rows_per_s)))
  gen_s = rows_n / rows_per_s
  wait_s = max(0.0, gen_s - head_start)
  step = step_seconds(sizes.paper_depth, sizes.paper_hidden, sizes.paper_batch,
                      sizes.landmarks, sizes.targets, bottleneck, peaks["bfloat16"], bw)
  # The run trains with data.placement='device': its feed is a gather on the
  # device (the batch's rows read and written once), the host loader's rate
  # (HOST_FEED_EXAMPLES_PER_S) bounds only placement 'host'.
  gather = LAUNCH_S + 2 * sizes.paper_batch * (sizes.landmarks + sizes.targets) * 4 / (
      bw * BANDWIDTH_EFFICIENCY)
  per_step = max(step, gather)
  fixed = wait_s + 3 * compile_s + 20.0  # the wait, compiles (train, eval), LSR and evals
  steps = max(1, int(max(0.0, BUDGET_S["paper"] - fixed) / 2 / per_step))
  if sizes.paper_max_steps:
    steps = min(steps, sizes.paper_max_steps)
  epochs = steps * sizes.paper_batch / (0.8 * rows_n)
  parts.append(Part("paper", f"Deep-LSMTL, lam = 0 DenseNet and LSR on {rows_n:,} synthetic "
                    f"GEO-shaped profiles, {sizes.paper_depth} x {sizes.paper_hidden:,}",
                    fixed + 2 * steps * per_step, BUDGET_S["paper"],
                    {"steps_each": steps, "epochs_each": epochs, "step_s": per_step,
                     "generate_s": gen_s, "wait_s": wait_s, "profiles": rows_n,
                     "generator_workers": generator_workers(sizes.host_cores),
                     "profiles_asked": sizes.paper_profiles,
                     "bound_by": "feed" if per_step > step else "step"}))
  return parts


def total_seconds(parts: list[Part]) -> dict[str, float]:
  return {"estimate_s": sum(p.estimate_s for p in parts),
          "budget_s": sum(p.budget_s for p in parts), "limit_s": LIMIT_S}


def format_plan(parts: list[Part], device: str) -> str:
  peaks = perf.known_peak(device)
  head = f"== accelerator check plan on {device}"
  if peaks:
    head += (f" (peaks: bf16 {peaks['bfloat16'] / 1e12:.0f}, fp32/tf32 "
             f"{peaks['float32'] / 1e12:.0f} TFLOP/s, HBM {peaks['hbm_bytes_per_s'] / 1e12:.2f}"
             " TB/s)")
  lines = [head, f"  {'part':<13} {'estimate':>9} {'budget':>7}  what"]
  for p in parts:
    lines.append(f"  {p.name:<13} {p.estimate_s:>8.0f}s {p.budget_s:>6.0f}s  {p.what}")
    for row in p.detail.get("sizes", []):
      lines.append(f"  {'':<13} {row['seconds']:>8.0f}s {'':>7}    {row['size']}: step "
                   f"{1e3 * row['step_s']['float32']:.2f} ms fp32, "
                   f"{1e3 * row['step_s']['bfloat16']:.2f} ms bf16 (+2 compiles)")
    if p.name == "paper":
      d = p.detail
      lines.append(f"  {'':<13} {'':>9} {'':>7}    {d['profiles']:,} of {d['profiles_asked']:,} "
                   f"profiles: what {d['generator_workers']} generator process(es) make "
                   f"beside the parts above "
                   f"({d['generate_s']:.0f} s, {d['wait_s']:.0f} s waited)")
      lines.append(f"  {'':<13} {'':>9} {'':>7}    {d['steps_each']:,} steps each "
                   f"({d['epochs_each']:.1f} epochs) at {1e3 * d['step_s']:.1f} ms bf16, "
                   f"bound by the {d['bound_by']}")
  t = total_seconds(parts)
  lines.append(f"  {'total':<13} {t['estimate_s']:>8.0f}s {t['budget_s']:>6.0f}s  limit "
               f"{t['limit_s']} s, compiles included")
  return "\n".join(lines)
