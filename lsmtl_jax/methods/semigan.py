"""SemiGAN (Ghasedi Dizaji et al. 2018), our reading (docs/method.md).

The generator is the regressor G: landmarks -> targets. The discriminator D
scores (landmark, target) pairs: real pairs from the data, fake pairs
(x, G(x)). Both are updated in the same step from one optimizer (simultaneous
gradient descent), so the method keeps the shared TrainState and checkpoint:

  L_G = L_task(y, G(x)) + adversarial * BCE(D(x, G(x)), real)
  L_D = BCE(D(x, y), real) + BCE(D(x, G(x)), fake)

Semi-supervised variant: landmark-only profiles enter the adversarial terms
only (their G(x) must look real to D; D learns to call them fake). The demo
compendium has no landmark-only profiles, so a fixed fraction of the training
rows plays that part: a row is unlabeled when a hash of its landmark values
falls below semigan.unlabeled_fraction, the same row in every epoch, so its
targets are never used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax.methods import base

CRITIC = "critic"  # params[...] of the discriminator D


def unlabeled_rows(x: jnp.ndarray, fraction: float) -> jnp.ndarray:
  """1.0 for a landmark-only row: a fixed function of the row's values."""
  # Quantized, so float rounding of the stored values cannot flip a row.
  q = jnp.round(x * 1024.0).astype(jnp.int32)
  weights = (jnp.arange(x.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
  h = jnp.sum(q.astype(jnp.uint32) * weights, axis=1)
  h = (h ^ (h >> 16)) * jnp.uint32(0x45D9F3B)
  h = h ^ (h >> 16)
  return ((h % 10007).astype(jnp.float32) / 10007.0 < fraction).astype(jnp.float32)


def _bce(logits, real: bool, weight):
  labels = jnp.ones_like(logits) if real else jnp.zeros_like(logits)
  per_row = optax.sigmoid_binary_cross_entropy(logits, labels)
  return jnp.sum(per_row * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _loss(state, batch, step: base.StepInputs, *, semi_supervised: bool):
  """(gradients for both players, new batch statistics, step metrics)."""
  config, regressor, critic, y = step.config, step.regressor, step.extras[CRITIC], step.y
  valid, dropout_key = step.valid, step.dropout_key
  x = batch["x"]
  labeled = jnp.ones((x.shape[0],), jnp.float32)
  if semi_supervised:
    labeled = 1.0 - unlabeled_rows(x, config.semigan.unlabeled_fraction)
  v = jnp.ones((y.shape[1],), jnp.float32) if valid is None else valid
  everyone = jnp.ones_like(labeled)

  def generate(params):
    return regressor.apply({"params": params, "batch_stats": state.batch_stats}, x,
                           train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])

  def discriminate(params, targets):
    return critic.apply({"params": params}, x, targets * v[None, :])

  def generator_loss(g_params):
    y_hat, updates = generate(g_params)
    per_entry = objectives.per_task_loss(y * labeled[:, None], y_hat * labeled[:, None],
                                         config.loss.task) * x.shape[0]
    l_task = jnp.sum(per_entry * v) / (jnp.maximum(jnp.sum(labeled), 1.0) * jnp.sum(v))
    l_adv = _bce(discriminate(state.params[CRITIC], y_hat), True, everyone)
    total = l_task + config.semigan.adversarial * l_adv
    return total, (updates["batch_stats"], y_hat, l_task, l_adv)

  (g_total, (batch_stats, y_hat, l_task, l_adv)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(state.params["regressor"])
  fake = jax.lax.stop_gradient(y_hat)

  def critic_loss(d_params):
    # Real pairs exist only for labeled rows; every row's G(x) is a fake pair.
    return (_bce(discriminate(d_params, y), True, labeled)
            + _bce(discriminate(d_params, fake), False, everyone))

  l_critic, d_grads = jax.value_and_grad(critic_loss)(state.params[CRITIC])
  grads = {"regressor": g_grads, CRITIC: d_grads}
  step_metrics = {"loss": g_total, "task_loss": l_task, "critic_loss": l_critic,
                  "grad_norm": optax.tree.norm(grads)}
  del l_adv
  return grads, batch_stats, step_metrics


def build(config, num_targets: int, dtype):
  trunk = models.build_trunk(config.model, dtype)
  regressor = models.Regressor(trunk=trunk, num_targets=num_targets, dtype=dtype)
  return regressor, {CRITIC: models.PairDiscriminator(
      hidden=config.semigan.critic_hidden, depth=config.semigan.critic_depth, dtype=dtype)}


def _checks(config):
  c = config.semigan
  yield c.adversarial >= 0, f"semigan.adversarial must be >= 0, got {c.adversarial}"
  yield (c.critic_hidden > 0 and c.critic_depth >= 1,
         "semigan.critic_hidden must be positive and semigan.critic_depth at least 1")
  yield (0 <= c.unlabeled_fraction < 1,
         f"semigan.unlabeled_fraction must be in [0, 1), got {c.unlabeled_fraction}")


_COMMON = dict(
    section="semigan",
    # D = MLP on (landmarks, targets) pairs, trained simultaneously with G; G
    # minimizes task loss + adversarial * BCE(D(x, G(x)), real). semigan_semi
    # treats a fixed fraction of the training profiles (picked by a hash of their
    # landmark values) as landmark-only: adversarial terms only.
    defaults={"adversarial": 0.01, "critic_hidden": 256, "critic_depth": 2,
              "unlabeled_fraction": 0.5},
    # The generator is a fully connected network, as in SemiGAN; no LSMTL term.
    fixed={"model.trunk": "mlp", "model.activation": "leaky_relu", "lsmtl.lam": 0.0},
    checks=_checks, build=build, memory=lambda config, num_targets, trunk_width: (0, ""),
    tunables=(base.Tunable("semigan.adversarial", (1e-3, 1e-2, 1e-1, 1.0)),
              base.Tunable("model.dropout", (0.0, 0.1, 0.3), "linear")))

SEMIGAN = base.Method(name="semigan", label="SemiGAN",
                      loss=functools.partial(_loss, semi_supervised=False), **_COMMON)
SEMIGAN_SEMI = base.Method(name="semigan_semi", label="SemiGAN (semi-sup.)",
                           loss=functools.partial(_loss, semi_supervised=True), **_COMMON)
METHODS = (SEMIGAN, SEMIGAN_SEMI)
