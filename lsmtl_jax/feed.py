"""How fast each input path can feed the train step (data.placement, resident.py).

Functions (the benchmark suites call these; every rate is examples/s, timed
after `warmup` untimed batches, with at most `depth` batches in flight and
block_until_ready on each one that leaves the window and on the last):

  host_feed_rate(dataset, order, steps, mesh=None, prefetch=4, warmup=2) -> float
      placement 'host': rows read from the TensorStore on the loader's thread
      (loader.train_batches, `prefetch` reads in flight) and put on the devices
      (parallel.Placement.put), as training does.
  device_feed_rate(dataset, order, steps, mesh=None, warmup=2, matrix=None) -> float
      placement 'device': the batch gathered on the devices from the resident
      matrix (resident.ResidentMatrix; loaded from `dataset` first, untimed,
      unless `matrix` is given).
  step_rate(config, num_landmarks, num_targets, steps, warmup=2) -> float
      the jitted train step alone, as build.build_network builds it, on one
      fixed batch already on the devices.
  write_random_store(path, num_samples, num_landmarks=943, num_targets=9520)
      a GEO-shaped store of random standardized values to time them on.
  measure(dataset, step_config, repeats, steps, batch_size, prefetch) -> dict
      all of them interleaved `repeats` times (the host feed at each depth in
      `prefetch`): medians and min-max of examples/s and of the process's CPU
      ms per batch ('examples_per_s', 'cpu_ms_per_batch'), for the command below.

`order` is a loader.TrainOrder (e.g. loader.TrainOrder(dataset.split('train'),
256, 0)); `mesh` defaults to every device on the 'data' axis.

The command times them interleaved at GEO width (943 + 9,520 = 10,463 columns)
beside the step at demo size::

  python -m lsmtl_jax.feed [--rows=20000] [--batch=256] [--steps=40] [--repeats=3]
      [--prefetch=4,16] [--config=configs/demo.py] [--json]
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from lsmtl_jax import cli
from lsmtl_jax import parallel
from lsmtl_jax import perf
from lsmtl_jax import resident
from lsmtl_jax import stepbench
from lsmtl_jax.data import loader
from lsmtl_jax.data import store

GEO_LANDMARKS, GEO_TARGETS = 943, 9520


def _default_mesh(mesh):
  if mesh is not None:
    return mesh
  return parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))


def _timed(batches, steps: int, warmup: int, batch_size: int,
           depth: int = 4) -> tuple[float, float]:
  """(examples/s, process CPU ms per batch, every thread's) of `steps` batches
  of `batches` after `warmup`, `depth` in flight. The CPU time is what the feed
  costs whatever else shares the cores."""
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  window = collections.deque()
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    window.append(next(batches))
    if len(window) > depth:
      jax.block_until_ready(window.popleft())
  jax.block_until_ready(list(window))
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  return steps * batch_size / seconds, 1e3 * cpu / steps


def _host_feed(dataset, order, steps, mesh=None, prefetch=4, warmup=2):
  batches = resident.train_batches("host", dataset, order, 0, warmup + steps,
                                   _default_mesh(mesh), prefetch)
  try:
    return _timed(batches, steps, warmup, order.batch_size)
  finally:
    batches.close()


def _device_feed(dataset, order, steps, mesh=None, warmup=2, matrix=None):
  mesh = _default_mesh(mesh)
  if matrix is None:
    matrix = resident.ResidentMatrix.load(dataset, order.indices, mesh)
  batches = resident.train_batches("device", dataset, order, 0, warmup + steps, mesh,
                                   resident=matrix)
  return _timed(batches, steps, warmup, order.batch_size)


def host_feed_rate(dataset: store.Dataset, order: loader.TrainOrder, steps: int, mesh=None,
                   prefetch: int = 4, warmup: int = 2) -> float:
  """Examples/s placement 'host' delivers onto the devices."""
  return _host_feed(dataset, order, steps, mesh, prefetch, warmup)[0]


def device_feed_rate(dataset: store.Dataset, order: loader.TrainOrder, steps: int, mesh=None,
                     warmup: int = 2, matrix: resident.ResidentMatrix | None = None) -> float:
  """Examples/s placement 'device' delivers (the matrix load is not timed)."""
  return _device_feed(dataset, order, steps, mesh, warmup, matrix)[0]


class _Step:
  """The train step as training builds it (stepbench.StepBench), timed with the
  process's CPU time beside the wall time."""

  def __init__(self, config, num_landmarks: int, num_targets: int):
    self.bench = stepbench.StepBench(config, num_landmarks, num_targets)
    self.batch_size = self.bench.batch_size

  def rate(self, steps: int) -> tuple[float, float]:
    """(examples/s, process CPU ms per step)."""
    cpu = time.process_time()
    seconds = self.bench.block(steps)
    return self.batch_size / seconds, 1e3 * (time.process_time() - cpu) / steps


def step_rate(config, num_landmarks: int, num_targets: int, steps: int,
              warmup: int = 2) -> float:
  """Examples/s of the jitted train step of `config` (compile and warm-up untimed)."""
  step = _Step(config, num_landmarks, num_targets)
  step.rate(warmup)
  return step.rate(steps)[0]


def write_random_store(path: str, num_samples: int, num_landmarks: int = GEO_LANDMARKS,
                       num_targets: int = GEO_TARGETS, seed: int = 0,
                       block_rows: int = 2048) -> store.Dataset:
  """A dataset of random standardized values, 80/10/10 train/val/test (timing only)."""
  rng = np.random.default_rng(seed)

  def blocks():
    for start in range(0, num_samples, block_rows):
      rows = min(block_rows, num_samples - start)
      yield rng.standard_normal((rows, num_landmarks + num_targets), np.float32)

  n_train = int(0.8 * num_samples)
  n_val = (num_samples - n_train) // 2
  perm = rng.permutation(num_samples)
  meta = {"landmarks": {"ids": [f"L{i}" for i in range(num_landmarks)]},
          "targets": {"ids": [f"T{i}" for i in range(num_targets)]},
          "splits": {"train": perm[:n_train].tolist(),
                     "val": perm[n_train:n_train + n_val].tolist(),
                     "test": perm[n_train + n_val:].tolist()},
          "provenance": {"generator": "lsmtl_jax.feed.write_random_store"}}
  return store.write_dataset(path, blocks(), num_samples, meta)


def _median(values):
  return {"median": float(np.median(values)), "min": float(min(values)),
          "max": float(max(values))}


def measure(dataset: store.Dataset, step_config, repeats: int, steps: int, batch_size: int,
            prefetch: tuple[int, ...], log=print) -> dict:
  """Host (each prefetch depth), device and the step, interleaved `repeats` times."""
  mesh = _default_mesh(None)
  order = loader.TrainOrder(dataset.split("train"), batch_size, 0)
  start = time.perf_counter()
  matrix = resident.ResidentMatrix.load(dataset, order.indices, mesh)
  load_seconds = time.perf_counter() - start
  step = _Step(step_config, step_config.data.synthetic.num_landmarks,
               step_config.data.synthetic.num_targets)
  step.rate(2)
  rates, cpu_ms = collections.defaultdict(list), collections.defaultdict(list)
  for r in range(repeats):
    got = {f"host_prefetch_{depth}": _host_feed(dataset, order, steps, mesh, depth)
           for depth in prefetch}
    got["device"] = _device_feed(dataset, order, steps, mesh, matrix=matrix)
    got["step"] = step.rate(max(2, steps // 8))
    for name, (rate, ms) in got.items():
      rates[name].append(rate)
      cpu_ms[name].append(ms)
    log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
  return {"examples_per_s": {k: _median(v) for k, v in rates.items()},
          "cpu_ms_per_batch": {k: _median(v) for k, v in cpu_ms.items()},
          "matrix_load_seconds": load_seconds, "matrix_bytes_per_device": matrix.bytes_per_device,
          "rows": dataset.num_samples, "train_rows": len(order.indices),
          "columns": dataset.num_landmarks + dataset.num_targets, "batch_size": batch_size,
          "steps": steps, "repeats": repeats, "backend": jax.default_backend(),
          "devices": jax.device_count(),
          "paper_step_need": paper_step_need(),
          "step_config": {"hidden": step_config.model.hidden, "depth": step_config.model.depth,
                          "batch_size": step_config.train.batch_size,
                          "landmarks": step_config.data.synthetic.num_landmarks,
                          "targets": step_config.data.synthetic.num_targets}}


def paper_step_need(share: float = 0.4, chip: str = "h100") -> dict:
  """Examples/s the paper's step (3 x 9,000 DenseNet, 943 -> 9,520, the k = 256
  bottleneck) consumes on one accelerator at `share` of its bf16 dense peak:
  the rate a feed must reach for that device never to wait."""
  peak = perf.known_peak(chip)
  model = ml_collections.ConfigDict({"trunk": "densenet", "depth": 3, "hidden": 9000})
  flops = perf.train_flops_per_example(model, GEO_LANDMARKS, GEO_TARGETS, 256)
  return {"device": peak["name"], "share_of_bf16_peak": share,
          "flops_per_example": flops, "examples_per_s": share * peak["bfloat16"] / flops}


def format_report(report: dict) -> str:
  c = report["step_config"]
  lines = [f"Feeding the step: {report['rows']:,} x {report['columns']:,} store "
           f"({report['train_rows']:,} training rows), batch {report['batch_size']}, "
           f"{report['backend']} x {report['devices']}; medians of {report['repeats']} "
           "interleaved repeats (min-max)",
           f"  resident matrix: {report['matrix_bytes_per_device'] / 2**30:.2f} GiB per device, "
           f"loaded in {report['matrix_load_seconds']:.1f} s"]
  for name, s in report["examples_per_s"].items():
    what = (f"train step ({c['depth']} x {c['hidden']}, {c['landmarks']} -> {c['targets']}, "
            f"batch {c['batch_size']})" if name == "step" else name.replace("_", " "))
    lines.append(f"  {what:<50} {s['median']:>9,.0f} examples/s "
                 f"({s['min']:,.0f}-{s['max']:,.0f}), "
                 f"{report['cpu_ms_per_batch'][name]['median']:.1f} CPU-ms per batch")
  need = report.get("paper_step_need")
  if need:
    lines.append(f"  {'needed: the 3 x 9,000 step on one ' + need['device']:<50} "
                 f"{need['examples_per_s']:>9,.0f} examples/s "
                 f"(at {100 * need['share_of_bf16_peak']:.0f} % of its bf16 peak, "
                 f"{need['flops_per_example'] / 1e9:.2f} GFLOP per example)")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_integer("rows", 20_000, "rows of the GEO-shaped random store")
  flags.DEFINE_integer("batch", 256, "batch size of the feeds")
  flags.DEFINE_integer("steps", 40, "timed batches per feed and repeat")
  flags.DEFINE_integer("repeats", 3, "interleaved repeats")
  flags.DEFINE_list("prefetch", ["4", "16"], "host loader depths to time")
  config_flags.DEFINE_config_file("config", "configs/demo.py",
                                  "config whose train step is timed beside (synthetic sizes)")
  flags.DEFINE_string("scratch", "", "where to write the store (default: the temp dir)")
  flags.DEFINE_bool("json", False, "print the report as JSON")


def main(argv):
  del argv
  step_config = FLAGS.config
  path = tempfile.mkdtemp(prefix="lsmtl_feed_", dir=FLAGS.scratch or None)
  try:
    print(f"writing a {FLAGS.rows:,} x {GEO_LANDMARKS + GEO_TARGETS:,} store in {path} ...",
          flush=True)
    dataset = write_random_store(os.path.join(path, "geo"), FLAGS.rows)
    report = measure(dataset, step_config, FLAGS.repeats, FLAGS.steps, FLAGS.batch,
                     tuple(int(p) for p in FLAGS.prefetch), log=lambda m: print(m, flush=True))
  finally:
    shutil.rmtree(path, ignore_errors=True)
  print(json.dumps(report, indent=1) if FLAGS.json else format_report(report))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
