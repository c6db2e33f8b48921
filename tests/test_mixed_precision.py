"""config.model.dtype='bfloat16': bf16 matmuls, float32 master weights, optimizer
state, loss and metrics; agreement with float32 within stated tolerances.

Tolerances (tiny shapes, unit-variance data, the same float32 parameters):
  predictions  ||y_bf16 - y_f32|| / ||y_f32||          <= 2e-2  (bf16 keeps 8 bits)
  loss         |L_bf16 - L_f32| / L_f32                 <= 2e-2
  gradients    ||g_bf16 - g_f32|| / ||g_f32||           <= 5e-2, cosine >= 0.99
  training     20 steps from the same start: final loss within 5 % of float32's
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import metrics
from lsmtl_jax import steps

L, T, B = 24, 40, 32


def _config(dtype):
  from configs import tiny
  c = tiny.get_config()
  c.model.dtype = dtype
  c.optim.schedule = "constant"
  return c


def _setup(dtype):
  c = _config(dtype)
  c.mesh.target_multiple = 1
  net = build.build_network(config_lib.resolve(c), L, T)
  state, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(c, 100))
  return c, net.regressor, state, net.step_kwargs(jax.random.PRNGKey(1))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, L)).astype(np.float32)
  w = rng.standard_normal((L, T)).astype(np.float32) / np.sqrt(L)
  y = np.tanh(x @ w) + 0.1 * rng.standard_normal((B, T)).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _dots(jaxpr, out):
  """(input dtypes, output dtype) of every dot_general, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          _dots(getattr(inner, "jaxpr", inner), out)
        elif hasattr(sub, "eqns"):
          _dots(sub, out)
  return out


def _rel(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_bfloat16_keeps_float32_parameters_and_optimizer_state():
  _, _, state, _ = _setup("bfloat16")
  for leaf in jax.tree.leaves((state.params, state.batch_stats)):
    assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(state.opt_state):
    assert leaf.dtype in (jnp.float32, jnp.int32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_matmul_of_the_train_step_runs_in_the_configured_dtype(dtype):
  _, _, state, kw = _setup(dtype)
  jaxpr = jax.make_jaxpr(functools.partial(steps.loss_and_gradients, **kw))(state, _batch())
  dots = _dots(jaxpr.jaxpr, [])
  # Forward: 2 trunk blocks + head + encode + decode; backward: two per forward dot
  # (the input's gradient is not needed for the first block's input x).
  assert len(dots) >= 5 * 2
  assert all(ins == (dtype, dtype) and out == dtype for ins, out in dots), dots
  grads, batch_stats, step_metrics = jax.eval_shape(
      functools.partial(steps.loss_and_gradients, **kw), state, _batch())
  for leaf in jax.tree.leaves((grads, batch_stats)):
    assert leaf.dtype == jnp.float32
  for name, value in step_metrics.items():
    assert value.dtype == jnp.float32, name


def test_predictions_loss_and_gradients_agree_with_float32():
  _, reg16, state16, kw16 = _setup("bfloat16")
  _, reg32, state32, kw32 = _setup("float32")
  # The same float32 parameters (created from the same key) in both.
  for a, b in zip(jax.tree.leaves(state16.params), jax.tree.leaves(state32.params)):
    np.testing.assert_array_equal(a, b)
  batch = _batch()
  variables = {"params": state32.params["regressor"], "batch_stats": state32.batch_stats}
  y16 = reg16.apply(variables, batch["x"], train=False)
  y32 = reg32.apply(variables, batch["x"], train=False)
  assert y16.dtype == jnp.float32
  assert _rel(y16, y32) <= 2e-2

  g16, _, m16 = jax.jit(functools.partial(steps.loss_and_gradients, **kw16))(state16, batch)
  g32, _, m32 = jax.jit(functools.partial(steps.loss_and_gradients, **kw32))(state32, batch)
  assert abs(float(m16["loss"]) - float(m32["loss"])) <= 2e-2 * float(m32["loss"])
  flat16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16)])
  flat32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
  assert _rel(flat16, flat32) <= 5e-2
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine >= 0.99


def test_training_and_metrics_track_float32():
  finals, stats = {}, {}
  for dtype in ("bfloat16", "float32"):
    _, reg, state, kw = _setup(dtype)
    step = jax.jit(functools.partial(steps.train_step, **kw))
    for i in range(20):
      state, m = step(state, _batch(i % 4))
    finals[dtype] = float(m["loss"])
    variables = {"params": state.params["regressor"], "batch_stats": state.batch_stats}
    batch = dict(_batch(99), weight=jnp.ones((B,), jnp.float32))
    s = steps.eval_stats_step(variables, metrics.zeros(T), batch, regressor=reg)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(s))
    stats[dtype] = s
  assert np.isfinite(finals["bfloat16"])
  assert abs(finals["bfloat16"] - finals["float32"]) <= 0.05 * finals["float32"]
  # Summed absolute errors per gene (the MAE numerator) within 5 % as well.
  assert _rel(stats["bfloat16"]["sum_abs"], stats["float32"]["sum_abs"]) <= 5e-2
