"""The jitted steps: one optimizer update, and one batch of evaluation sums.

Pure functions of (state, batch); the caller jits them with shardings and
donation (build.py). The method record supplies the loss; this module adds
what every method shares: the (seed, step) keys, padding of the head's width,
and skipping a non-finite update without a host sync.
"""

from __future__ import annotations

from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp

from lsmtl_jax import metrics
from lsmtl_jax.methods import base


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Steps whose loss or gradient norm was not finite (their update is not
  # applied), and [step, loss, grad norm] of the first of them.
  nonfinite_steps: Any = None
  first_nonfinite: Any = None


def pad_targets(y: jnp.ndarray, num_padded: int) -> jnp.ndarray:
  return jnp.pad(y, ((0, 0), (0, num_padded - y.shape[1])))


def valid_targets(num_targets: int, num_padded: int) -> jnp.ndarray | None:
  if num_padded == num_targets:
    return None
  return (jnp.arange(num_padded) < num_targets).astype(jnp.float32)


def loss_and_gradients(state: TrainState, batch, *, method: base.Method, regressor, extras,
                       config, base_key):
  """(gradients, new batch statistics, step metrics) of `method`'s loss.

  Dropout and task-mask keys derive from (seed, step), so a resumed run draws
  exactly what it would have. The head may be wider than the targets (padding
  so the model axis divides it): padded outputs are masked out of the loss.
  """
  dropout_key, mask_key = jax.random.split(jax.random.fold_in(base_key, state.step))
  num_padded = regressor.num_targets
  inputs = base.StepInputs(regressor=regressor, extras=extras, config=config,
                           dropout_key=dropout_key, mask_key=mask_key,
                           y=pad_targets(batch["y"], num_padded),
                           valid=valid_targets(batch["y"].shape[1], num_padded))
  return method.loss(state, batch, inputs)


def train_step(state: TrainState, batch, **kw):
  """One optimizer update: (state, batch) -> (state, metrics).

  A step whose loss or gradient norm is not finite leaves parameters, optimizer
  and batch statistics as they were and is recorded in the state; the loop
  stops on it (or, with train.nonfinite='skip', counts it) without a host sync
  per step.
  """
  grads, batch_stats, step_metrics = loss_and_gradients(state, batch, **kw)
  finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
  # A branch, not a tree-wide select: the select made XLA copy both Adam
  # moments every step; the taken branch updates the donated buffers in place.
  new_state = jax.lax.cond(
      finite, lambda s: s.apply_gradients(grads=grads, batch_stats=batch_stats),
      lambda s: s.replace(step=s.step + 1), state)
  first = jnp.where((state.first_nonfinite[0] < 0) & ~finite,
                    jnp.stack([state.step.astype(jnp.float32), step_metrics["loss"],
                               step_metrics["grad_norm"]]), state.first_nonfinite)
  new_state = new_state.replace(
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32), first_nonfinite=first)
  return new_state, step_metrics


def eval_stats_step(variables, stats, batch, *, regressor):
  """Adds one batch's per-gene sums (over the padded head width) to `stats`."""
  y_hat = regressor.apply(variables, batch["x"], train=False)
  y = pad_targets(batch["y"], regressor.num_targets)
  return metrics.accumulate(stats, y, y_hat, batch["weight"])


def regressor_variables(state: TrainState) -> dict[str, Any]:
  return {"params": state.params["regressor"], "batch_stats": state.batch_stats}
