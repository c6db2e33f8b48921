"""The jitted training step as training builds it, timed on device-resident
batches; and the memory readers the benchmarks report beside it."""

from __future__ import annotations

import os
import resource
import time

import jax
import ml_collections
import numpy as np

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import parallel
from lsmtl_jax import perf
from lsmtl_jax.methods import deep_lsmtl


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def peak_device_memory() -> int | None:
  """peak_bytes_in_use of the first device, or None where the backend has no stats."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")


def host_peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def num_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


class StepBench:
  """A train state and its jitted step, built by build.build_network as training builds them.

  `block(steps)` runs `steps` donated steps and returns seconds per step, after
  block_until_ready on the state and metrics.
  """

  def __init__(self, config: ml_collections.ConfigDict, num_landmarks: int, num_targets: int,
               seed: int = 0):
    config = config_lib.concrete_lam(config_lib.resolve(config))
    config_lib.validate(config)
    self.config = config
    self.num_landmarks, self.num_targets = num_landmarks, num_targets
    self.batch_size = config.train.batch_size
    self.network = network = build.build_network(config, num_landmarks, num_targets)
    self.mesh = mesh = network.mesh
    self.padded_targets = network.num_padded
    self.has_relation = bool(network.extras.get(deep_lsmtl.TASK_RELATION))
    init_key, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
    self.state, shardings = network.create_state(init_key, build.create_optimizer(config, 10_000))
    self.shardings, self.base_key = shardings, base_key
    self.step_fn = network.train_step(shardings, base_key)
    rng = np.random.default_rng(seed)
    host = {"x": rng.standard_normal((self.batch_size, num_landmarks), np.float32),
            "y": rng.standard_normal((self.batch_size, num_targets), np.float32)}
    self.batch = parallel.Placement(mesh).put(host, self.batch_size)
    self.compile_seconds = None
    self.last_metrics = None

  @property
  def param_bytes(self) -> int:
    return tree_bytes(self.state.params)

  @property
  def opt_state_bytes(self) -> int:
    return tree_bytes(self.state.opt_state)

  @property
  def relation_param_bytes(self) -> int:
    return tree_bytes(self.state.params.get(deep_lsmtl.TASK_RELATION, {}))

  def flops_per_example(self) -> int:
    k = self.config.lsmtl.bottleneck if self.has_relation else 0
    return perf.train_flops_per_example(self.config.model, self.num_landmarks, self.num_targets,
                                        k)

  def warmup(self, steps: int = 2) -> None:
    start = time.perf_counter()
    self.block(1)
    self.compile_seconds = time.perf_counter() - start
    if steps > 1:
      self.block(steps - 1)

  def block(self, steps: int) -> float:
    state = self.state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = self.step_fn(state, self.batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    self.state, self.last_metrics = state, metrics
    return seconds
