"""The Deep-LSMTL loss: mask semantics, the reconstruction term and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax import steps

B, T, K = 6, 10, 3


def _relation():
  rel = models.TaskRelation(num_targets=T, bottleneck=K, negative_slope=0.2)
  params = models.nn.meta.unbox(rel.init(jax.random.PRNGKey(3), jnp.zeros((1, T))))["params"]
  return rel, params


def _np_relation(params, u):
  e, d = params["encode"], params["decode"]
  z = u @ np.asarray(e["kernel"], np.float64) + np.asarray(e["bias"], np.float64)
  z = np.where(z >= 0, z, 0.2 * z)
  return z @ np.asarray(d["kernel"], np.float64) + np.asarray(d["bias"], np.float64)


def _fixed_mask():
  mask = np.zeros((B, T), np.float32)
  mask[0, 1] = mask[0, 4] = mask[2, 0] = mask[3, 9] = mask[5, 5] = 1
  return mask


def test_task_losses_match_numpy():
  rng = np.random.default_rng(0)
  y, p = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  np.testing.assert_allclose(objectives.task_loss(y, p, "mse"), np.mean((p - y) ** 2), rtol=1e-6)
  np.testing.assert_allclose(objectives.task_loss(y, p, "mae"), np.mean(np.abs(p - y)), rtol=1e-6)
  with pytest.raises(ValueError, match="loss.task"):
    objectives.task_loss(y, p, "huber")


def test_mask_rate_and_per_batch_sharing():
  key = jax.random.PRNGKey(0)
  m = np.asarray(objectives.sample_task_mask(key, (400, 500), 0.1))
  assert set(np.unique(m)) <= {0.0, 1.0}
  assert abs(m.mean() - 0.1) < 0.005  # 200k Bernoulli draws: std 0.0007
  mb = np.asarray(objectives.sample_task_mask(key, (400, 500), 0.3, per_batch=True))
  assert (mb == mb[:1]).all() and 0.2 < mb[0].mean() < 0.4
  assert np.asarray(objectives.sample_task_mask(key, (4, 5), 0.0)).sum() == 0


def test_reconstruction_loss_hand_computed():
  rel, params = _relation()
  rng = np.random.default_rng(1)
  y_hat = rng.normal(size=(B, T)).astype(np.float32)
  mask = _fixed_mask()
  got = objectives.reconstruction_loss(jnp.asarray(y_hat), jnp.asarray(mask),
                                       lambda u: rel.apply({"params": params}, u))
  r = _np_relation(params, (1 - mask) * y_hat.astype(np.float64))
  want = np.sum(mask * (y_hat - r) ** 2) / mask.sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Only masked entries are scored: changing r's error on unmasked entries is free.
  assert np.isclose(want, np.mean((y_hat - r)[mask == 1] ** 2))


def test_masked_task_never_reaches_its_own_reconstruction():
  rel, params = _relation()
  g = lambda u: rel.apply({"params": params}, u)
  rng = np.random.default_rng(2)
  y_hat = rng.normal(size=(B, T)).astype(np.float32)
  mask = _fixed_mask()
  perturbed = y_hat.copy()
  perturbed[mask == 1] += 100.0
  r0 = g(jnp.asarray((1 - mask) * y_hat))
  r1 = g(jnp.asarray((1 - mask) * perturbed))
  np.testing.assert_array_equal(np.asarray(r0), np.asarray(r1))
  # And the derivative of r with respect to a masked entry is exactly zero.
  jac = jax.jacfwd(lambda yh: g((1 - mask) * yh))(jnp.asarray(y_hat))  # [B,T,B,T]
  for b, t in zip(*np.nonzero(mask)):
    assert float(jnp.abs(jac[b, t, b, t])) == 0.0
    assert float(jnp.abs(jac[:, :, b, t]).max()) == 0.0


def test_stop_gradient_target_changes_exactly_the_target_path():
  rel, params = _relation()
  g = lambda u: rel.apply({"params": params}, u)
  rng = np.random.default_rng(4)
  y_hat = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  mask = jnp.asarray(_fixed_mask())
  loss = lambda yh, sg: objectives.reconstruction_loss(yh, mask, g, sg)
  g_full = np.asarray(jax.grad(loss)(y_hat, False))
  g_sg = np.asarray(jax.grad(loss)(y_hat, True))
  m = np.asarray(mask)
  r = np.asarray(g((1 - mask) * y_hat))
  # Masked entries: only the target path reaches them; detached, nothing does.
  np.testing.assert_array_equal(g_sg[m == 1], 0.0)
  np.testing.assert_allclose(g_full[m == 1], (2 * (np.asarray(y_hat) - r) / m.sum())[m == 1],
                             rtol=1e-5, atol=1e-7)
  # Unmasked entries feed g's input in both modes and get identical gradients.
  np.testing.assert_allclose(g_full[m == 0], g_sg[m == 0], rtol=1e-6)
  assert np.abs(g_sg[m == 0]).max() > 0
  # Relation parameters get the same gradient either way.
  pl = lambda p, sg: objectives.reconstruction_loss(
      y_hat, mask, lambda u: rel.apply({"params": p}, u), sg)
  ga, gb = jax.grad(pl)(params, False), jax.grad(pl)(params, True)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _step_grads(lam, stop_gradient_target=False):
  from configs import default
  c = default.get_config()
  c.model.hidden, c.model.depth, c.lsmtl.bottleneck = 8, 2, K
  c.lsmtl.lam, c.lsmtl.mask_rate, c.lsmtl.stop_gradient_target = lam, 0.3, stop_gradient_target
  c.mesh.target_multiple = 1
  num_l = 5
  net = build.build_network(config_lib.resolve(c), num_l, T)
  state, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(c, 10))
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(B, num_l)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(B, T)), jnp.float32)}
  grads, _, metrics = steps.loss_and_gradients(state, batch,
                                               **net.step_kwargs(jax.random.PRNGKey(1)))
  return grads, metrics


def test_gradients_reach_trunk_head_and_bottleneck():
  grads, metrics = _step_grads(lam=1.0)
  assert float(metrics["rec_loss"]) > 0
  norms = lambda tree: [float(jnp.abs(x).max()) for x in jax.tree.leaves(tree)]
  assert min(norms(grads["regressor"]["trunk"]["block0_dense"])) > 0
  assert min(norms(grads["regressor"]["head"])) > 0
  assert min(norms(grads["task_relation"])) > 0


def test_lambda_zero_is_the_plain_densenet_loss():
  grads0, metrics0 = _step_grads(lam=0.0)
  assert "task_relation" not in grads0
  assert float(metrics0["rec_loss"]) == 0.0
  np.testing.assert_allclose(float(metrics0["loss"]), float(metrics0["task_loss"]))
  # The regularizer changes the head's gradient when lam > 0 and the target is live.
  grads1, _ = _step_grads(lam=1.0)
  diff = np.abs(np.asarray(grads1["regressor"]["head"]["kernel"])
                - np.asarray(grads0["regressor"]["head"]["kernel"])).max()
  assert diff > 0
