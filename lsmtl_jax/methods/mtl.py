"""Deep MTL baselines on the shared trunk: Deep-GO-MTL, Deep-CNMTL, Deep-AMTL,
Deep-AMTFL (docs/method.md, 'Comparison methods'), one record each.

The penalties themselves are in objectives.py; this module assembles each
method's objective from the regressor's outputs and parameters, and keeps
CNMTL's cluster assignments a function of the checkpointed state.
Penalties are divided by the number of real targets (as the task loss is a
mean over targets), so their coefficients are per task.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax.methods import base

TRANSFER = "transfer"  # params[...] of AMTL's task-transfer matrix B
FEEDBACK = "feedback"  # params[...] of AMTFL's output-to-feature map A


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
# Objectives: (total, penalty) from the batch's outputs, per-task losses and
# parameters; the penalty is reported as the step's 'penalty' metric.
# ----------------------------------------------------------------------------


def _go_mtl(step, params, y_hat, updates, losses, l_task, num_real):
  cfg = step.config.go_mtl
  reg = objectives.go_mtl_penalty(params["regressor"]["head_basis"]["kernel"],
                                  params["regressor"]["head"]["kernel"], cfg.mu, cfg.lam,
                                  step.valid)
  return l_task + reg / num_real, reg / num_real


def _cnmtl(step, params, y_hat, updates, losses, l_task, num_real):
  cfg = step.config.cnmtl
  reg = objectives.cluster_norm_penalty(params["regressor"]["head"]["kernel"],
                                        updates["batch_stats"]["clusters"], cfg.num_clusters,
                                        cfg.eps_m, cfg.eps_b, cfg.eps_w, step.valid)
  return l_task + reg / num_real, reg / num_real


def _amtl(step, params, y_hat, updates, losses, l_task, num_real):
  cfg = step.config.amtl
  b = objectives.amtl_transfer(step.extras[TRANSFER].apply({"params": params[TRANSFER]}),
                               step.valid)
  w = params["regressor"]["head"]["kernel"]
  if 0 < cfg.row_sample < w.shape[0]:  # unbiased estimate of ||W - WB||^2 from random rows
    picked = jax.random.choice(step.mask_key, w.shape[0], (cfg.row_sample,), replace=False)
    weighted, rec = objectives.amtl_terms(w[picked], b, losses, cfg.alpha, cfg.gamma,
                                          step.valid)
    rec = rec * (w.shape[0] / cfg.row_sample)
  else:
    weighted, rec = objectives.amtl_terms(w, b, losses, cfg.alpha, cfg.gamma, step.valid)
  total = (weighted + rec) / num_real
  return total, total - l_task


def _amtfl(step, params, y_hat, updates, losses, l_task, num_real):
  cfg = step.config.amtfl
  v = _real(step)
  h = updates["intermediates"]["trunk"]["__call__"][0]
  h_hat = step.extras[FEEDBACK].apply({"params": params[FEEDBACK]}, y_hat * v[None, :],
                                      h.shape[1])
  weighted, reg = objectives.amtfl_terms(h, h_hat, params[FEEDBACK]["A"],
                                         params["regressor"]["head"]["kernel"], losses,
                                         cfg.alpha, cfg.gamma, cfg.mu, step.valid)
  total = (weighted + reg) / num_real
  return total, total - l_task


def _real(step):
  return jnp.ones((step.y.shape[1],), jnp.float32) if step.valid is None else step.valid


def _features_filter(module, method_name):
  return module.name == "trunk" and method_name == "__call__"


def _loss(state, batch, step: base.StepInputs, *, objective, clusters=False, features=False):
  """Task loss (mean over real targets) + the method's penalty. CNMTL's
  clusters ride in batch_stats; AMTFL captures the trunk's output h."""
  batch_stats = state.batch_stats
  if clusters:
    batch_stats = {**batch_stats, "clusters": current_clusters(state, step.config, _real(step))}
  extra = {"mutable": ["batch_stats", "intermediates"],
           "capture_intermediates": _features_filter} if features else {
               "mutable": ["batch_stats"]}
  num_real = step.y.shape[1] if step.valid is None else jnp.sum(step.valid)

  def loss_fn(params):
    y_hat, updates = step.regressor.apply(
        {"params": params["regressor"], "batch_stats": batch_stats}, batch["x"], train=True,
        rngs={"dropout": step.dropout_key}, **extra)
    losses = objectives.per_task_loss(step.y, y_hat, step.config.loss.task)
    l_task = jnp.sum(losses * _real(step)) / num_real
    total, penalty = objective(step, params, y_hat, updates, losses, l_task, num_real)
    return total, (updates["batch_stats"], l_task, penalty)

  return base.gradients_and_metrics(loss_fn, state.params, "penalty")


# ----------------------------------------------------------------------------
# Models and memory
# ----------------------------------------------------------------------------


def _trunk(config, dtype):
  return models.build_trunk(config.model, dtype)


def _build_go_mtl(config, num_targets, dtype):
  return models.FactorizedRegressor(trunk=_trunk(config, dtype), num_targets=num_targets,
                                    rank=config.go_mtl.rank, dtype=dtype), {}


def _build_cnmtl(config, num_targets, dtype):
  return models.ClusteredRegressor(trunk=_trunk(config, dtype), num_targets=num_targets,
                                   num_clusters=config.cnmtl.num_clusters, dtype=dtype), {}


def _build_amtl(config, num_targets, dtype):
  regressor = models.Regressor(trunk=_trunk(config, dtype), num_targets=num_targets,
                               dtype=dtype)
  return regressor, {TRANSFER: models.TaskTransfer(num_targets=num_targets)}


def _build_amtfl(config, num_targets, dtype):
  regressor = models.Regressor(trunk=_trunk(config, dtype), num_targets=num_targets,
                               dtype=dtype)
  return regressor, {FEEDBACK: models.OutputFeedback(
      num_targets=num_targets, negative_slope=config.lsmtl.negative_slope,
      trunk_output_width=functools.partial(models.trunk_output_width, config.model))}


def _amtl_memory(config, num_targets, trunk_width):
  # relu(raw), the masked B and its cotangent, and W B with its cotangent.
  rows = config.amtl.row_sample if config.amtl.row_sample > 0 else trunk_width
  note = (f"; its task-transfer matrix B alone is {num_targets:,} x {num_targets:,} = "
          f"{num_targets**2 * 4 / 2**30:.2f} GiB in float32, x4 with its gradient and "
          "Adam moments")
  return 3 * num_targets**2 + 2 * rows * num_targets, note


def _amtfl_memory(config, num_targets, trunk_width):
  return 3 * config.train.batch_size * trunk_width, ""


def _no_extra_memory(config, num_targets, trunk_width):
  return 0, ""


# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


def _go_mtl_checks(config):
  c = config.go_mtl
  yield c.rank > 0, f"go_mtl.rank must be positive, got {c.rank}"
  yield c.mu >= 0 and c.lam >= 0, "go_mtl.mu and go_mtl.lam must be >= 0"


def _cnmtl_checks(config):
  c = config.cnmtl
  yield c.num_clusters >= 1, f"cnmtl.num_clusters must be >= 1, got {c.num_clusters}"
  yield (c.every > 0 and c.kmeans_iters >= 0,
         "cnmtl.every must be positive and cnmtl.kmeans_iters >= 0")
  yield min(c.eps_m, c.eps_b, c.eps_w) >= 0, "cnmtl.eps_* must be >= 0"


def _amtl_checks(config):
  c = config.amtl
  yield c.alpha >= 0 and c.gamma >= 0, "amtl.alpha and amtl.gamma must be >= 0"
  yield c.row_sample >= 0, f"amtl.row_sample must be >= 0, got {c.row_sample}"


def _amtfl_checks(config):
  c = config.amtfl
  yield min(c.alpha, c.gamma, c.mu) >= 0, "amtfl.alpha, amtfl.gamma and amtfl.mu must be >= 0"


# The MTL regularizers replace Deep-LSMTL's; the trunk is the same DenseNet.
_FIXED = {"model.trunk": "densenet", "lsmtl.lam": 0.0}
# Penalty weights are searched over four decades: at the defaults the penalties
# are ~0.1 % of the task loss, so the search must reach where they bite.
_DECADES = (1e-4, 1e-3, 1e-2, 1e-1)

GO_MTL = base.Method(
    name="go_mtl", label="Deep-GO-MTL", section="go_mtl",
    defaults={"rank": 64, "mu": 1e-4, "lam": 1e-4}, fixed=_FIXED, checks=_go_mtl_checks,
    build=_build_go_mtl, loss=functools.partial(_loss, objective=_go_mtl),
    memory=_no_extra_memory,
    tunables=(base.Tunable("go_mtl.mu", _DECADES), base.Tunable("go_mtl.lam", _DECADES)))
CNMTL = base.Method(
    name="cnmtl", label="Deep-CNMTL", section="cnmtl",
    defaults={"num_clusters": 10, "eps_m": 1e-3, "eps_b": 1e-3, "eps_w": 1e-2, "every": 100,
              "kmeans_iters": 10},
    fixed=_FIXED, checks=_cnmtl_checks, build=_build_cnmtl,
    loss=functools.partial(_loss, objective=_cnmtl, clusters=True), memory=_no_extra_memory,
    tunables=(base.Tunable("cnmtl.eps_w", (1e-3, 1e-2, 1e-1, 1.0)),
              base.Tunable("cnmtl.eps_b", _DECADES)))
AMTL = base.Method(
    name="amtl", label="Deep-AMTL", section="amtl",
    # row_sample > 0: ||W - WB||^2 estimated each step on that many random rows of
    # W (unbiased; a CPU economy for the demo); 0: exact.
    defaults={"alpha": 1e-2, "gamma": 1e-2, "row_sample": 0}, fixed=_FIXED,
    checks=_amtl_checks, build=_build_amtl, loss=functools.partial(_loss, objective=_amtl),
    memory=_amtl_memory,
    tunables=(base.Tunable("amtl.gamma", (1e-3, 1e-2, 1e-1, 1.0)),
              base.Tunable("amtl.alpha", _DECADES)))
AMTFL = base.Method(
    name="amtfl", label="Deep-AMTFL", section="amtfl",
    defaults={"alpha": 1e-3, "gamma": 0.1, "mu": 1e-5}, fixed=_FIXED, checks=_amtfl_checks,
    build=_build_amtfl, loss=functools.partial(_loss, objective=_amtfl, features=True),
    memory=_amtfl_memory,
    tunables=(base.Tunable("amtfl.gamma", (1e-2, 1e-1, 1.0, 10.0)),
              base.Tunable("amtfl.alpha", _DECADES), base.Tunable("amtfl.mu", (1e-6, 1e-5, 1e-4))))

METHODS = (GO_MTL, CNMTL, AMTL, AMTFL)
