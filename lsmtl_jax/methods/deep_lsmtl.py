"""Deep-LSMTL and the networks that share its code path: the DenseNet (lam = 0)
and D-GEX (an MLP trunk, tanh, lam = 0).

Deep-LSMTL (docs/method.md): L = L_task(y, y_hat) + lam L_rec, where a task
mask m hides a random subset of the outputs and the task-relation bottleneck
g reconstructs the hidden ones from the visible ones, r = g((1 - m) y_hat),
L_rec = sum(m (y_hat - r)^2) / sum(m). With lam = 0 no bottleneck is built.

Readings of the paper's loss other than the default, as switches (each at its
default gives exactly the loss above): lsmtl.stop_gradient_target and
lsmtl.detach_input detach y_hat where it is g's target or g's input;
lsmtl.warmup_steps ramps the term's weight lam * min(1, step / warmup_steps);
lsmtl.relation_lr_scale (build.create_optimizer) sets g's learning rate apart;
lsmtl.relation_input='target' shows g the true y, r = g((1 - m) y);
lsmtl.relation_on='hidden' has g map the trunk's features, some hidden, to the
outputs; lsmtl.test_blend (lsmtl_jax/blending.py) mixes y_hat with g's
leave-task-out reconstruction at test time.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax.methods import base

TASK_RELATION = "task_relation"  # params[...] of g


def build(config, num_targets: int, dtype):
  regressor = models.Regressor(trunk=models.build_trunk(config.model, dtype),
                               num_targets=num_targets, dtype=dtype)
  extras = {}
  if config.lsmtl.lam > 0:
    on_hidden = config.lsmtl.relation_on == "hidden"
    extras[TASK_RELATION] = models.TaskRelation(
        num_targets=num_targets, bottleneck=config.lsmtl.bottleneck,
        negative_slope=config.lsmtl.negative_slope, dtype=dtype,
        trunk_output_width=(functools.partial(models.trunk_output_width, config.model)
                            if on_hidden else None))
  return regressor, extras


def rec_weight(lsmtl, step):
  """The weight of L_rec at optimizer step `step` (0 for the first update):
  lam, or with lsmtl.warmup_steps = W > 0, lam * min(1, step / W)."""
  if lsmtl.warmup_steps <= 0:
    return lsmtl.lam
  ramp = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / lsmtl.warmup_steps)
  return lsmtl.lam * ramp


def loss(state, batch, step: base.StepInputs):
  lsmtl = step.config.lsmtl
  relation = step.extras.get(TASK_RELATION)

  on_hidden = relation is not None and lsmtl.relation_on == "hidden"

  def loss_fn(params):
    out, updates = step.regressor.apply(
        {"params": params["regressor"], "batch_stats": state.batch_stats}, batch["x"],
        train=True, rngs={"dropout": step.dropout_key}, mutable=["batch_stats"],
        **({"return_features": True} if on_hidden else {}))
    y_hat, features = out if on_hidden else (out, None)
    l_task = objectives.task_loss(step.y, y_hat, step.config.loss.task, step.valid)
    l_rec = jnp.zeros((), jnp.float32)
    if relation is not None:
      g = lambda u: relation.apply({"params": params[TASK_RELATION]}, u)
      per_batch = lsmtl.mask_per == "batch"
      if on_hidden:
        mask = objectives.sample_task_mask(step.mask_key, features.shape, lsmtl.mask_rate,
                                           per_batch=per_batch)
        l_rec = objectives.feature_reconstruction_loss(
            features, y_hat, mask, g, lsmtl.stop_gradient_target, step.valid,
            lsmtl.detach_input)
      else:
        mask = objectives.sample_task_mask(step.mask_key, y_hat.shape, lsmtl.mask_rate,
                                           per_batch=per_batch)
        shown_from = step.y if lsmtl.relation_input == "target" else None
        l_rec = objectives.reconstruction_loss(y_hat, mask, g, lsmtl.stop_gradient_target,
                                               step.valid, lsmtl.detach_input, shown_from)
    return l_task + rec_weight(lsmtl, state.step) * l_rec, (updates["batch_stats"], l_task,
                                                            l_rec)

  return base.gradients_and_metrics(loss_fn, state.params, "rec_loss")


def _no_extra_memory(config, num_targets, trunk_width):
  return 0, ""


_NETWORK = dict(build=build, loss=loss, memory=_no_extra_memory)
# The trunk's regularization, searched for the networks alike.
DROPOUT = base.Tunable("model.dropout", (0.0, 0.1, 0.3), "linear")
WEIGHT_DECAY = base.Tunable("optim.weight_decay", (0.0, 1e-4, 1e-3),
                            implies={"optim.name": "adamw"})

DEEP_LSMTL = base.Method(
    name="deep_lsmtl", label="Deep-LSMTL", **_NETWORK,
    tunables=(base.Tunable("lsmtl.lam", (1e-3, 1e-2, 1e-1, 1.0)),
              base.Tunable("lsmtl.bottleneck", (32, 128, 512)),
              base.Tunable("lsmtl.mask_rate", (0.05, 0.1, 0.3), "linear"),
              base.Tunable("lsmtl.mask_per", ("example", "batch"), "choice"),
              base.Tunable("lsmtl.stop_gradient_target", (False, True), "choice"),
              DROPOUT))
DENSENET = base.Method(
    name="densenet", label="DenseNet", **_NETWORK,
    fixed={"model.trunk": "densenet", "lsmtl.lam": 0.0}, tunables=(DROPOUT, WEIGHT_DECAY))
DGEX = base.Method(
    name="dgex", label="D-GEX", **_NETWORK,
    fixed={"model.trunk": "mlp", "model.activation": "tanh", "lsmtl.lam": 0.0},
    tunables=(DROPOUT, WEIGHT_DECAY))

METHODS = (DEEP_LSMTL, DENSENET, DGEX)
