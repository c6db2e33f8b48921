"""Deep MTL baselines on the shared trunk: Deep-GO-MTL, Deep-CNMTL, Deep-AMTL,
Deep-AMTFL (SPEC.md section 3), and the memory guard that stops a run whose
parameters cannot fit before anything is allocated.

The penalties themselves are in objectives.py; this module assembles each
method's objective from the regressor's outputs and parameters, and keeps
CNMTL's cluster assignments a function of the checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsmtl_jax import objectives

METHODS = ("go_mtl", "cnmtl", "amtl", "amtfl")


class MemoryGuardError(RuntimeError):
  """The run's estimated training memory exceeds the device's; nothing was allocated."""

  def __init__(self, message: str, needed_bytes: int, limit_bytes: int):
    super().__init__(message)
    self.needed_bytes, self.limit_bytes = needed_bytes, limit_bytes


# ----------------------------------------------------------------------------
# CNMTL clusters
# ----------------------------------------------------------------------------


def kmeans_columns(w: jnp.ndarray, num_clusters: int, iters: int,
                   valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Cluster of each column of w (H, T) by Lloyd's k-means, deterministically:
  farthest-point initialization from the first column; an emptied cluster keeps
  its centroid; padded columns are assigned but move no centroid."""
  points = w.T.astype(jnp.float32)  # (T, H)
  num = points.shape[0]
  v = jnp.ones((num,), jnp.float32) if valid is None else valid
  sq = jnp.sum(points**2, 1)

  def farthest(i, c):  # the real column farthest from the centroids so far
    d = sq[:, None] - 2 * points @ c.T + jnp.sum(c**2, 1)[None]  # (T, C)
    d = jnp.where(jnp.arange(num_clusters)[None, :] < i, d, jnp.inf).min(1)
    return c.at[i].set(points[jnp.argmax(jnp.where(v > 0, d, -jnp.inf))])

  centroids = jnp.zeros((num_clusters, points.shape[1]), jnp.float32).at[0].set(points[0])
  centroids = jax.lax.fori_loop(1, num_clusters, farthest, centroids)

  def assign(c):
    d = (jnp.sum(points**2, 1, keepdims=True) - 2 * points @ c.T + jnp.sum(c**2, 1)[None])
    return jnp.argmin(d, axis=1)

  def lloyd(_, c):
    onehot = jax.nn.one_hot(assign(c), num_clusters) * v[:, None]
    counts = jnp.sum(onehot, 0)
    means = onehot.T @ points / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, c)

  centroids = jax.lax.fori_loop(0, iters, lloyd, centroids)
  return assign(centroids).astype(jnp.int32)


def current_clusters(state, config, valid):
  """Re-estimated from the head every cnmtl.every steps (including step 0), else
  the assignment saved in the state: a resumed run sees what it would have."""
  cfg = config.cnmtl
  w = state.params["regressor"]["head"]["kernel"]
  return jax.lax.cond(
      state.step % cfg.every == 0,
      lambda: kmeans_columns(jax.lax.stop_gradient(w), cfg.num_clusters, cfg.kmeans_iters,
                             valid),
      lambda: state.batch_stats["clusters"])


# ----------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------


def _features_filter(module, method_name):
  return module.name == "trunk" and method_name == "__call__"


def capture_features(config) -> dict:
  """Extra regressor.apply arguments: AMTFL needs the trunk's output h."""
  if config.method == "amtfl":
    return {"capture_intermediates": _features_filter}
  return {}


def objective(config, params, y, y_hat, updates, relation, valid, key):
  """(total loss, plain task loss, regularizer) of an MTL method on one batch.

  Penalties are divided by the number of real targets; so are the task-weighted
  sums of AMTL and AMTFL, which then reduce to the mean task loss at alpha = 0.
  """
  num_real = y.shape[1] if valid is None else jnp.sum(valid)
  v = jnp.ones((y.shape[1],), jnp.float32) if valid is None else valid
  losses = objectives.per_task_loss(y, y_hat, config.loss.task)
  l_task = jnp.sum(losses * v) / num_real
  head = params["regressor"]["head"]
  method = config.method
  if method == "go_mtl":
    reg = objectives.go_mtl_penalty(params["regressor"]["head_basis"]["kernel"],
                                    head["kernel"], config.go_mtl.mu, config.go_mtl.lam, valid)
    return l_task + reg / num_real, l_task, reg / num_real
  if method == "cnmtl":
    cfg = config.cnmtl
    reg = objectives.cluster_norm_penalty(head["kernel"], updates["batch_stats"]["clusters"],
                                          cfg.num_clusters, cfg.eps_m, cfg.eps_b, cfg.eps_w,
                                          valid)
    return l_task + reg / num_real, l_task, reg / num_real
  if method == "amtl":
    b = objectives.amtl_transfer(relation.apply({"params": params["relation"]}), valid)
    w = head["kernel"]
    rows = config.amtl.row_sample
    if 0 < rows < w.shape[0]:  # unbiased estimate of ||W - WB||^2 from random rows
      picked = jax.random.choice(key, w.shape[0], (rows,), replace=False)
      weighted, rec = objectives.amtl_terms(w[picked], b, losses, config.amtl.alpha,
                                            config.amtl.gamma, valid)
      rec = rec * (w.shape[0] / rows)
    else:
      weighted, rec = objectives.amtl_terms(w, b, losses, config.amtl.alpha,
                                            config.amtl.gamma, valid)
    return (weighted + rec) / num_real, l_task, (weighted + rec) / num_real - l_task
  if method == "amtfl":
    h = updates["intermediates"]["trunk"]["__call__"][0]
    h_hat = relation.apply({"params": params["relation"]}, y_hat * v[None, :], h.shape[1])
    cfg = config.amtfl
    weighted, reg = objectives.amtfl_terms(h, h_hat, params["relation"]["A"], head["kernel"],
                                           losses, cfg.alpha, cfg.gamma, cfg.mu, valid)
    return (weighted + reg) / num_real, l_task, (weighted + reg) / num_real - l_task
  raise ValueError(f"not an MTL method: {method!r}")


# ----------------------------------------------------------------------------
# Memory guard
# ----------------------------------------------------------------------------


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


def estimate_training_bytes(config, init_fn, num_targets: int, trunk_width: int) -> dict:
  """What one training step holds, by arithmetic: every parameter four times
  (value, gradient, two Adam moments) plus the method's largest transients.
  Near the limit check_memory asks XLA's plan of the compiled step instead
  (train.compiled_step_memory; this misses e.g. Deep-CNMTL's temporaries by
  ~30 % and counts the whole model rather than one device's share).

  `init_fn()` returns the boxed params; only its shapes are traced (eval_shape),
  so nothing is allocated however large the model.
  """
  shapes = jax.eval_shape(init_fn)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  batch = config.train.batch_size
  transient = 3 * batch * (trunk_width + num_targets)  # activations kept for backprop
  if config.method == "amtl":
    # relu(raw), the masked B and its cotangent, and W B with its cotangent.
    rows = config.amtl.row_sample if config.amtl.row_sample > 0 else trunk_width
    transient += 3 * num_targets**2 + 2 * rows * num_targets
  if config.method == "amtfl":
    transient += 3 * batch * trunk_width
  needed = 4 * (4 * num_params + transient)
  return {"bytes": int(needed), "num_params": int(num_params)}


def check_memory(config, init_fn, num_targets: int, trunk_width: int, method_name: str,
                 plan: Callable[[], int | None] | None = None) -> dict:
  """Raises MemoryGuardError, naming the size needed, when the estimate exceeds
  the memory available; returns the estimate otherwise.

  `plan()` gives XLA's per-device bytes of the compiled step (or None). The
  arithmetic is within ~35 % of it, so only a run within a factor 2 of the
  limit pays for that extra compile, and then the plan decides.
  """
  estimate = estimate_training_bytes(config, init_fn, num_targets, trunk_width)
  limit = device_memory_bytes(config)
  if plan is not None and 2 * estimate["bytes"] > limit:
    planned = plan()
    if planned is not None:
      estimate["bytes"] = int(planned)
  if estimate["bytes"] > limit:
    detail = ""
    if config.method == "amtl":
      detail = (f"; its task-transfer matrix B alone is {num_targets:,} x {num_targets:,} = "
                f"{num_targets**2 * 4 / 2**30:.2f} GiB in float32, x4 with its gradient and "
                "Adam moments")
    raise MemoryGuardError(
        f"out of memory: {method_name} needs about {estimate['bytes'] / 2**30:.2f} GiB to "
        f"train ({estimate['num_params']:,} parameters{detail}) but "
        f"{limit / 2**30:.2f} GiB are available (memory.limit_gb={config.memory.limit_gb}); "
        "nothing was allocated", estimate["bytes"], limit)
  return estimate
