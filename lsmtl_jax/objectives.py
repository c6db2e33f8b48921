"""Losses: the per-task regression loss and Deep-LSMTL's masked reconstruction term.

L = L_task(y, y_hat) + lam * L_rec, with
  m ~ Bernoulli(rate) per (example, task), or per task shared by the batch,
  r = g((1 - m) * y_hat),
  L_rec = sum(m * (y_hat - r)^2) / sum(m).
A masked task is reconstructed only from the tasks left visible, so g cannot
copy a task onto itself: the mask plays the role of diag(A) = 0 in the
subspace-clustering objective the method starts from.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def task_loss(y: jnp.ndarray, y_hat: jnp.ndarray, kind: str = "mse",
              valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean over examples and real tasks; `valid` (1 per real task) drops padding."""
  err = y_hat - y
  if kind == "mse":
    per_entry = jnp.square(err)
  elif kind == "mae":
    per_entry = jnp.abs(err)
  else:
    raise ValueError(f"loss.task must be 'mse' or 'mae', got {kind!r}")
  if valid is None:
    return jnp.mean(per_entry)
  return jnp.sum(per_entry * valid) / (y.shape[0] * jnp.sum(valid))


def sample_task_mask(key: jax.Array, shape: tuple[int, int], rate: float,
                     per_batch: bool = False) -> jnp.ndarray:
  """1.0 marks a hidden (masked) task. Per batch: one draw per task, shared by rows."""
  draw_shape = (1, shape[1]) if per_batch else shape
  mask = jax.random.bernoulli(key, rate, draw_shape).astype(jnp.float32)
  return jnp.broadcast_to(mask, shape)


def reconstruction_loss(y_hat: jnp.ndarray, mask: jnp.ndarray,
                        relation: Callable[[jnp.ndarray], jnp.ndarray],
                        stop_gradient_target: bool = False,
                        valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean squared error of g's reconstruction over the masked entries only.

  Padding tasks (`valid` = 0) are neither shown to g nor scored.
  """
  visible = 1.0 - mask
  if valid is not None:
    mask, visible = mask * valid, visible * valid
  reconstruction = relation(visible * y_hat)
  target = jax.lax.stop_gradient(y_hat) if stop_gradient_target else y_hat
  squared = mask * jnp.square(target - reconstruction)
  return jnp.sum(squared) / jnp.maximum(jnp.sum(mask), 1.0)
