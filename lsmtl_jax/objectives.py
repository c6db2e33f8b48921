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

import math
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
                        valid: jnp.ndarray | None = None,
                        stop_gradient_input: bool = False,
                        shown_from: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean squared error of g's reconstruction over the masked entries only.

  Padding tasks (`valid` = 0) are neither shown to g nor scored. y_hat appears
  twice, as g's input (1 - m) y_hat and as the target; `stop_gradient_input` /
  `stop_gradient_target` detach the one named, so the regressor gets this
  term's gradient only through the other (both: only g learns from it).
  `shown_from` (lsmtl.relation_input='target': the true y) replaces y_hat as
  what g sees, r = g((1 - m) shown_from); y_hat stays the target.
  """
  visible = 1.0 - mask
  if valid is not None:
    mask, visible = mask * valid, visible * valid
  shown = visible * (y_hat if shown_from is None else shown_from)
  if stop_gradient_input:
    shown = jax.lax.stop_gradient(shown)
  reconstruction = relation(shown)
  target = jax.lax.stop_gradient(y_hat) if stop_gradient_target else y_hat
  squared = mask * jnp.square(target - reconstruction)
  return jnp.sum(squared) / jnp.maximum(jnp.sum(mask), 1.0)


def feature_reconstruction_loss(features: jnp.ndarray, y_hat: jnp.ndarray,
                                feature_mask: jnp.ndarray,
                                relation: Callable[[jnp.ndarray], jnp.ndarray],
                                stop_gradient_target: bool = False,
                                valid: jnp.ndarray | None = None,
                                stop_gradient_input: bool = False) -> jnp.ndarray:
  """lsmtl.relation_on='hidden': g maps the trunk's features h (B, F), a random
  subset of them hidden, to every task's output, r = g((1 - m) h) with m over
  the F features; L_rec = mean over examples and real tasks of (y_hat - r)^2.
  No task is hidden, so every task is scored; the detach switches act on
  (1 - m) h and on y_hat as in reconstruction_loss."""
  shown = (1.0 - feature_mask) * features
  if stop_gradient_input:
    shown = jax.lax.stop_gradient(shown)
  reconstruction = relation(shown)
  target = jax.lax.stop_gradient(y_hat) if stop_gradient_target else y_hat
  squared = jnp.square(target - reconstruction)
  if valid is None:
    return jnp.mean(squared)
  return jnp.sum(squared * valid) / (y_hat.shape[0] * jnp.sum(valid))


def blend_groups(key: jax.Array, num_tasks: int, mask_rate: float) -> jnp.ndarray:
  """Each task's group in a random partition of the tasks into
  K = ceil(1 / mask_rate) groups of near-equal size (lsmtl.test_blend)."""
  return jax.random.permutation(key, num_tasks) % num_blend_groups(mask_rate)


def num_blend_groups(mask_rate: float) -> int:
  """K = ceil(1 / rho): each pass hides about the share of tasks training hides."""
  return max(1, math.ceil(round(1.0 / mask_rate, 6))) if mask_rate > 0 else 1


def leave_group_out(y_hat: jnp.ndarray, groups: jnp.ndarray, num_groups: int,
                    relation: Callable[[jnp.ndarray], jnp.ndarray],
                    valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """g_loo(y_hat): task t reconstructed by g with its own group hidden,
  g((1 - m_k) y_hat)[:, t] for the group k of t (m_k hides group k); every task
  is hidden exactly once, in K passes of g. Padding is never shown to g."""
  shown_tasks = jnp.ones(y_hat.shape[1], y_hat.dtype) if valid is None else valid
  out = jnp.zeros_like(y_hat)
  for k in range(num_groups):
    hidden = (groups == k).astype(y_hat.dtype)
    out = out + hidden * relation((1.0 - hidden) * shown_tasks * y_hat)
  return out


def blend(y_hat: jnp.ndarray, loo: jnp.ndarray, weight) -> jnp.ndarray:
  """(1 - w) y_hat + w g_loo(y_hat)."""
  return (1.0 - weight) * y_hat + weight * loo


# ----------------------------------------------------------------------------
# Regularizers of the deep MTL baselines (docs/method.md, "Comparison methods"). Each is the literal
# formula of its row; the training step divides it by the number of real tasks
# so that its coefficients are per task, like the mean task loss beside it.
# ----------------------------------------------------------------------------


def per_task_loss(y: jnp.ndarray, y_hat: jnp.ndarray, kind: str = "mse") -> jnp.ndarray:
  """L_t: the task loss of each task, a mean over the batch, shape (T,)."""
  err = y_hat - y
  if kind == "mse":
    return jnp.mean(jnp.square(err), axis=0)
  if kind == "mae":
    return jnp.mean(jnp.abs(err), axis=0)
  raise ValueError(f"loss.task must be 'mse' or 'mae', got {kind!r}")


def _ones_if_none(valid, n):
  return jnp.ones((n,), jnp.float32) if valid is None else valid


def go_mtl_penalty(basis: jnp.ndarray, codes: jnp.ndarray, mu: float, lam: float,
                   valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Deep-GO-MTL: mu ||S||_1 + lam ||L_b||_F^2 for the head W = L_b S.

  basis L_b is (H, r), codes S is (r, T); padded tasks' codes are not counted.
  """
  v = _ones_if_none(valid, codes.shape[1])
  return mu * jnp.sum(jnp.abs(codes) * v) + lam * jnp.sum(jnp.square(basis))


def cluster_norm_penalty(w: jnp.ndarray, clusters: jnp.ndarray, num_clusters: int,
                         eps_m: float, eps_b: float, eps_w: float,
                         valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Deep-CNMTL: eps_M ||w_bar||^2 + eps_B sum_c n_c ||w_bar_c - w_bar||^2
  + eps_W sum_c sum_{t in c} ||w_t - w_bar_c||^2, over the columns w_t of W (H, T).
  """
  v = _ones_if_none(valid, w.shape[1])
  onehot = jax.nn.one_hot(clusters, num_clusters, dtype=w.dtype) * v[:, None]  # (T, C)
  n_c = jnp.sum(onehot, axis=0)
  w_bar = (w @ v) / jnp.sum(v)
  w_bar_c = (w @ onehot) / jnp.maximum(n_c, 1.0)  # (H, C)
  between = jnp.sum(n_c * jnp.sum(jnp.square(w_bar_c - w_bar[:, None]), axis=0))
  within = jnp.sum(v * jnp.sum(jnp.square(w - w_bar_c @ onehot.T), axis=0))
  return eps_m * jnp.sum(jnp.square(w_bar)) + eps_b * between + eps_w * within


def amtl_transfer(raw: jnp.ndarray, valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """B >= 0 with diag(B) = 0 (and no edge to or from a padded task), from free params."""
  v = _ones_if_none(valid, raw.shape[0])
  off_diagonal = 1.0 - jnp.eye(raw.shape[0], dtype=raw.dtype)
  return jax.nn.relu(raw) * off_diagonal * v[:, None] * v[None, :]


def amtl_terms(w: jnp.ndarray, b: jnp.ndarray, task_losses: jnp.ndarray, alpha: float,
               gamma: float, valid: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Deep-AMTL: (sum_t (1 + alpha ||B_t,:||_1) L_t, gamma ||W - W B||_F^2).

  Row t of B is how much task t's parameters transfer to the others: a task
  with a large loss pays for transferring, so the easy tasks teach the hard ones.
  """
  v = _ones_if_none(valid, w.shape[1])
  weighted = jnp.sum(v * (1.0 + alpha * jnp.sum(jnp.abs(b), axis=1)) * task_losses)
  w = w * v[None, :]
  return weighted, gamma * jnp.sum(jnp.square(w - w @ b))


def amtfl_terms(h: jnp.ndarray, h_feedback: jnp.ndarray, a: jnp.ndarray, w: jnp.ndarray,
                task_losses: jnp.ndarray, alpha: float, gamma: float, mu: float,
                valid: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Deep-AMTFL: (sum_t (1 + alpha ||A_t,:||_1) L_t,
  gamma ||h - h_hat||^2 (mean over the batch) + mu ||W||_1).

  A (T, F) feeds the outputs back to the trunk's features: h_hat = sigma(y_hat A).
  """
  v = _ones_if_none(valid, a.shape[0])
  weighted = jnp.sum(v * (1.0 + alpha * jnp.sum(jnp.abs(a), axis=1)) * task_losses)
  feedback = gamma * jnp.sum(jnp.square(h - h_feedback)) / h.shape[0]
  return weighted, feedback + mu * jnp.sum(jnp.abs(w) * v[None, :])
