"""The memory guard: a network run whose training step cannot fit stops before
anything is allocated (the paper's out-of-memory cells, e.g. Deep-AMTL's
T x T matrix at full size).

By arithmetic first (every parameter four times: value, gradient, two Adam
moments; plus activations kept for backprop and the method's own transients,
from its record); near the limit, XLA's buffer plan of the compiled step
decides (the arithmetic misses e.g. Deep-CNMTL's temporaries by ~30 % and
counts the whole model rather than one device's share).
"""

from __future__ import annotations

from collections.abc import Callable
import math
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from lsmtl_jax import build
from lsmtl_jax import models
from lsmtl_jax import parallel


class MemoryGuardError(RuntimeError):
  """The run's estimated training memory exceeds the device's; nothing was allocated."""

  def __init__(self, message: str, needed_bytes: int, limit_bytes: int):
    super().__init__(message)
    self.needed_bytes, self.limit_bytes = needed_bytes, limit_bytes


def device_memory_bytes(config) -> int:
  """memory.limit_gb if set, else the accelerator's limit, else the host's RAM."""
  if config.memory.limit_gb > 0:
    return int(config.memory.limit_gb * 2**30)
  try:  # CPU devices of a multi-process run refuse to report
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_training_bytes(network: build.Network) -> dict:
  """What one training step holds, by arithmetic; only shapes are traced
  (eval_shape), so nothing is allocated however large the model."""
  config = network.config
  shapes = jax.eval_shape(network.init_params_fn())
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  trunk_width = models.trunk_output_width(config.model, network.num_landmarks)
  transient = 3 * config.train.batch_size * (trunk_width + network.num_padded)
  extra, note = network.method.memory(config, network.num_padded, trunk_width)
  needed = 4 * (4 * num_params + transient + extra)
  return {"bytes": int(needed), "num_params": int(num_params), "note": note}


def compiled_step_memory(network: build.Network) -> dict[str, int]:
  """Per-device bytes of one train step as XLA plans it, from shapes alone: the
  step is lowered and compiled on abstract inputs (nothing is allocated), as
  training would run it (sharded, state donated). 'peak' = arguments +
  temporaries + outputs not aliased to a donated argument.
  """
  config = network.config
  key = jax.random.PRNGKey(config.seed)
  tx = build.create_optimizer(config, max(config.train.num_steps, 1))
  state, shardings = network.abstract_state(key, tx)
  batch_sharding = parallel.batch_sharding(network.mesh)
  b = config.train.batch_size
  batch = {"x": jax.ShapeDtypeStruct((b, network.num_landmarks), jnp.float32,
                                     sharding=batch_sharding),
           "y": jax.ShapeDtypeStruct((b, network.num_targets), jnp.float32,
                                     sharding=batch_sharding)}
  analysis = network.train_step(shardings, key).lower(state, batch).compile().memory_analysis()
  out = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
         for name in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
  return out


def _plan(network: build.Network) -> int | None:
  try:  # compiling on shapes allocates nothing; XLA counts what the step really holds
    return compiled_step_memory(network)["peak"]
  except Exception as e:  # pylint: disable=broad-except  (a backend without the analysis)
    logging.warning("no compiled memory plan (%s); estimating by arithmetic", e)
    return None


def check_memory(network: build.Network,
                 plan: Callable[[build.Network], int | None] = _plan,
                 resident_bytes: int = 0) -> dict:
  """Raises MemoryGuardError, naming the size needed, when the estimate exceeds
  the memory available; returns the estimate otherwise.

  `resident_bytes`: what one device holds besides the step (the training
  matrix under data.placement='device'), added to either estimate.
  The arithmetic is within ~35 % of XLA's plan, so only a run within a factor 2
  of the limit pays for that extra compile, and then the plan decides.
  """
  config = network.config
  estimate = estimate_training_bytes(network)
  limit = device_memory_bytes(config)
  if 2 * (estimate["bytes"] + resident_bytes) > limit:
    planned = plan(network)
    if planned is not None:
      estimate["bytes"] = int(planned)
  estimate["bytes"] += int(resident_bytes)
  if resident_bytes:
    estimate["note"] += (f"; {resident_bytes / 2**30:.2f} GiB of it the training matrix "
                         "held on the device (data.placement='device')")
  if estimate["bytes"] > limit:
    raise MemoryGuardError(
        f"out of memory: {network.method.label} needs about {estimate['bytes'] / 2**30:.2f} GiB "
        f"to train ({estimate['num_params']:,} parameters{estimate['note']}) but "
        f"{limit / 2**30:.2f} GiB are available (memory.limit_gb={config.memory.limit_gb}); "
        "nothing was allocated", estimate["bytes"], limit)
  return estimate
