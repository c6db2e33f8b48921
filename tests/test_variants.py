"""Readings of the Deep-LSMTL loss as switches (lsmtl.detach_input,
lsmtl.warmup_steps, lsmtl.relation_lr_scale) and model.head_init='lsr', each
checked against an independent reference; at their defaults nothing changes."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import objectives
from lsmtl_jax import steps
from lsmtl_jax import train

B, NUM_L, T, K = 6, 5, 10, 3
LAM = 0.7
BASE_KEY = jax.random.PRNGKey(1)
_rng = np.random.default_rng(0)
BATCH = {"x": jnp.asarray(_rng.normal(size=(B, NUM_L)), jnp.float32),
         "y": jnp.asarray(_rng.normal(size=(B, T)), jnp.float32)}
REL = "task_relation"


def _config(target_multiple=1, **overrides):
  from configs import default
  c = default.get_config()
  c.model.hidden, c.model.depth, c.lsmtl.bottleneck = 8, 2, K
  c.lsmtl.lam, c.lsmtl.mask_rate = LAM, 0.3
  c.mesh.target_multiple = target_multiple
  for field, value in overrides.items():
    config_lib.set_field(c, field.replace("__", "."), value)
  c = config_lib.resolve(c)
  config_lib.validate(c)
  return c


def _setup(target_multiple=1, **overrides):
  return _cached_setup(target_multiple, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _cached_setup(target_multiple, overrides):
  c = _config(target_multiple, **dict(overrides))
  net = build.build_network(c, NUM_L, T)
  tx = build.create_optimizer(c, 10)
  state, _ = net.create_state(jax.random.PRNGKey(0), tx)
  return net, state, tx


def _step(net, state):
  return steps.loss_and_gradients(state, BATCH, **net.step_kwargs(BASE_KEY))


def _keys_y_valid(net, state):
  dropout_key, mask_key = jax.random.split(jax.random.fold_in(BASE_KEY, state.step))
  y = jnp.pad(BATCH["y"], ((0, 0), (0, net.num_padded - T)))
  valid = None if net.num_padded == T else (jnp.arange(net.num_padded) < T).astype(jnp.float32)
  return dropout_key, mask_key, y, valid


def _forward(net, state, params, dropout_key):
  y_hat, _ = net.regressor.apply(
      {"params": params["regressor"], "batch_stats": state.batch_stats}, BATCH["x"], train=True,
      rngs={"dropout": dropout_key}, mutable=["batch_stats"])
  return y_hat


def _g(net, params):
  return lambda u: net.extras[REL].apply({"params": params[REL]}, u)


def _assert_trees(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _max_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------
# Defaults: today's loss, gradients and optimizer, bit for bit
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("target_multiple", [1, 16])  # 16: a padded head (valid mask)
def test_defaults_give_the_loss_and_gradients_of_today(target_multiple):
  net, state, _ = _setup(target_multiple)
  c = net.config.lsmtl
  assert (c.detach_input, c.warmup_steps, c.relation_lr_scale) == (False, 0, 1.0)
  assert net.config.model.head_init == "default"
  grads, _, metrics = _step(net, state)
  dropout_key, mask_key, y, valid = _keys_y_valid(net, state)

  def reference(params):  # the loss as it was written before the switches
    y_hat = _forward(net, state, params, dropout_key)
    l_task = objectives.task_loss(y, y_hat, "mse", valid)
    mask = objectives.sample_task_mask(mask_key, y_hat.shape, c.mask_rate)
    l_rec = objectives.reconstruction_loss(y_hat, mask, _g(net, params), False, valid)
    return l_task + c.lam * l_rec, (l_task, l_rec)

  (loss, (l_task, l_rec)), want = jax.value_and_grad(reference, has_aux=True)(state.params)
  assert float(metrics["loss"]) == float(loss) and float(metrics["rec_loss"]) == float(l_rec)
  assert float(metrics["task_loss"]) == float(l_task) and float(l_rec) > 0
  _assert_trees(grads, want)


def test_default_optimizer_is_todays_adam():
  net, state, tx = _setup()
  grads, _, _ = _step(net, state)
  today = optax.adam(optax.cosine_decay_schedule(net.config.optim.learning_rate, 10))
  ref_state = today.init(state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(ref_state)
  got, _ = tx.update(grads, state.opt_state, state.params)
  want, _ = today.update(grads, ref_state, state.params)
  _assert_trees(got, want)


# ----------------------------------------------------------------------------
# lsmtl.detach_input
# ----------------------------------------------------------------------------


def test_detach_input_reaches_the_regressor_only_through_the_target():
  net, state, _ = _setup(lsmtl__detach_input=True)
  grads, _, metrics = _step(net, state)
  dropout_key, mask_key, y, _ = _keys_y_valid(net, state)
  mask = objectives.sample_task_mask(mask_key, (B, T), net.config.lsmtl.mask_rate)
  params = state.params

  # Hand-derived: y_hat's cotangent is dL_task/dy_hat + lam * 2 m (y_hat - r) / sum(m),
  # with r = g((1 - m) y_hat) held fixed; pulled back through the regressor.
  y_hat, pullback = jax.vjp(lambda p: _forward(net, state, {"regressor": p}, dropout_key),
                            params["regressor"])
  r = _g(net, params)((1 - mask) * y_hat)
  cotangent = 2 * (y_hat - y) / y.size + LAM * 2 * mask * (y_hat - r) / jnp.sum(mask)
  (want,) = pullback(cotangent)
  _assert_trees(grads["regressor"], want, rtol=2e-5, atol=1e-7)

  # The same through jax.grad of the explicit expression, detached where it should be.
  def explicit(p):
    yh = _forward(net, state, p, dropout_key)
    rec = _g(net, p)(jax.lax.stop_gradient((1 - mask) * yh))
    return jnp.mean((yh - y) ** 2) + LAM * jnp.sum(mask * (yh - rec) ** 2) / jnp.sum(mask)

  loss, want_all = jax.value_and_grad(explicit)(params)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
  _assert_trees(grads, want_all, rtol=2e-5, atol=1e-7)

  # It differs from the default (which also pulls through g's input), and g
  # learns exactly as it does by default.
  default_grads, _, default_metrics = _step(*_setup()[:2])
  assert float(default_metrics["loss"]) == float(metrics["loss"])
  assert _max_diff(grads["regressor"], default_grads["regressor"]) > 1e-4
  _assert_trees(grads[REL], default_grads[REL])


def test_detaching_both_leaves_the_regressor_the_task_gradient_alone():
  net, state, _ = _setup(lsmtl__detach_input=True, lsmtl__stop_gradient_target=True)
  grads, _, metrics = _step(net, state)
  dropout_key, _, y, _ = _keys_y_valid(net, state)
  task_only = jax.grad(lambda p: jnp.mean((_forward(net, state, {"regressor": p},
                                                    dropout_key) - y) ** 2))
  assert float(metrics["rec_loss"]) > 0
  _assert_trees(grads["regressor"], task_only(state.params["regressor"]), rtol=1e-5, atol=1e-8)
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[REL])) > 0


# ----------------------------------------------------------------------------
# lsmtl.warmup_steps
# ----------------------------------------------------------------------------


def test_warmup_ramps_the_term_weight_with_the_step():
  warmup = 10
  net, state, _ = _setup(lsmtl__warmup_steps=warmup)
  grads, _, m = _step(net, state)  # step 0: weight 0
  assert float(m["rec_loss"]) > 0
  assert float(m["loss"]) == float(m["task_loss"])
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[REL]))
  for step, weight in ((warmup // 2, LAM / 2), (3, LAM * 3 / warmup), (warmup, LAM),
                       (4 * warmup, LAM)):
    _, _, m = _step(net, state.replace(step=jnp.asarray(step, jnp.int32)))
    np.testing.assert_allclose(float(m["loss"]) - float(m["task_loss"]),
                               weight * float(m["rec_loss"]), rtol=1e-5)
  # Without warmup the full weight applies from step 0.
  net0, state0, _ = _setup()
  _, _, m = _step(net0, state0.replace(step=jnp.asarray(warmup // 2, jnp.int32)))
  np.testing.assert_allclose(float(m["loss"]) - float(m["task_loss"]),
                             LAM * float(m["rec_loss"]), rtol=1e-5)


# ----------------------------------------------------------------------------
# lsmtl.relation_lr_scale
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_relation_lr_scale_scales_only_gs_step(optimizer):
  scale = 0.25
  net1, state1, tx1 = _setup(optim__name=optimizer)
  net2, state2, tx2 = _setup(optim__name=optimizer, lsmtl__relation_lr_scale=scale)
  _assert_trees(state1.params, state2.params)
  # The optimizer state keeps its layout (checkpoints do not depend on the scale).
  assert jax.tree.structure(state1.opt_state) == jax.tree.structure(state2.opt_state)
  grads, _, _ = _step(net1, state1)

  u1, _ = tx1.update(grads, state1.opt_state, state1.params)
  u2, _ = tx2.update(grads, state2.opt_state, state2.params)
  _assert_trees(u2["regressor"], u1["regressor"])
  _assert_trees(u2[REL], jax.tree.map(lambda u: scale * u, u1[REL]))

  new1, new2 = state1.apply_gradients(grads=grads), state2.apply_gradients(grads=grads)
  _assert_trees(new2.params["regressor"], new1.params["regressor"])
  change = lambda new: jax.tree.map(jnp.subtract, new.params[REL], state1.params[REL])
  _assert_trees(change(new2), jax.tree.map(lambda d: scale * d, change(new1)),
                rtol=2e-3, atol=1e-9)
  assert _max_diff(change(new1), jax.tree.map(jnp.zeros_like, change(new1))) > 1e-5
  # Adam's moments see the gradients, not the scale.
  _assert_trees(new2.opt_state, new1.opt_state)


# ----------------------------------------------------------------------------
# model.head_init = 'lsr'
# ----------------------------------------------------------------------------


def _numpy_ridge(dataset, rows, ridge):
  """The centred ridge solution in float64 from the raw rows (intercept unpenalized)."""
  values = dataset.read_rows(np.sort(rows)).astype(np.float64)
  x, y = values[:, :dataset.num_landmarks], values[:, dataset.num_landmarks:]
  mx, my = x.mean(0), y.mean(0)
  xc, yc = x - mx, y - my
  n = x.shape[0]
  w = np.linalg.solve(xc.T @ xc / n + ridge * np.eye(x.shape[1]), xc.T @ yc / n)
  return w, my - mx @ w


def _tiny_config(dataset, **overrides):
  from configs import tiny
  c = tiny.get_config()
  c.data.synthetic.enabled = False
  c.data.path = dataset.path
  for field, value in overrides.items():
    config_lib.set_field(c, field.replace("__", "."), value)
  c = config_lib.resolve(c)
  config_lib.validate(c)
  return c


@pytest.mark.parametrize("method", ["densenet", "deep_lsmtl"])
def test_lsr_head_makes_the_untrained_network_predict_lsr(tiny_dataset, method):
  c = _tiny_config(tiny_dataset, method=method, model__head_init="lsr")
  num_l, num_t = tiny_dataset.num_landmarks, tiny_dataset.num_targets
  net = build.build_network(c, num_l, num_t)
  assert net.num_padded > num_t  # the padding stays zero
  state, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(c, 10))
  train_rows = tiny_dataset.split("train")
  state = train._with_lsr_head(c, net, state, tiny_dataset, train_rows)

  w, b = _numpy_ridge(tiny_dataset, train_rows, c.lsr.ridge)
  val = tiny_dataset.read_rows(tiny_dataset.split("val"))
  x = jnp.asarray(val[:, :num_l], jnp.float32)
  want = val[:, :num_l].astype(np.float64) @ w + b
  variables = steps.regressor_variables(state)
  for mode in (dict(train=False), dict(train=True, rngs={"dropout": jax.random.PRNGKey(5)},
                                         mutable=["batch_stats"])):
    out = net.regressor.apply(variables, x, **mode)
    y_hat = np.asarray(out[0] if isinstance(out, tuple) else out)
    np.testing.assert_allclose(y_hat[:, :num_t], want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(y_hat[:, num_t:], 0.0)
  kernel = np.asarray(state.params["regressor"]["head"]["kernel"])
  assert not kernel[num_l:].any() and not kernel[:, num_t:].any()
  # The default init predicts something else entirely.
  fresh, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(c, 10))
  y0 = np.asarray(net.regressor.apply(steps.regressor_variables(fresh), x, train=False))
  assert np.abs(y0[:, :num_t] - want).max() > 0.1


def test_lsr_head_run_starts_where_lsr_ends(tiny_dataset, tmp_path):
  # One step at a negligible learning rate: the network's validation metrics
  # are LSR's, so the loop applied the LSR head before training.
  c = _tiny_config(tiny_dataset, method="densenet", model__head_init="lsr",
                   train__num_steps=1, optim__learning_rate=1e-9, compare_with=("lsr",))
  main = train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / "compare" / "lsr" / "results.json") as f:
    lsr = json.load(f)
  for key in ("mae_mean", "cc_mean"):
    np.testing.assert_allclose(main["splits"]["val"][key], lsr["splits"]["val"][key], rtol=1e-4)


def test_lsr_head_refuses_a_network_without_a_plain_head(tiny_dataset):
  c = _tiny_config(tiny_dataset, method="densenet", model__head_init="lsr")
  c.method = "go_mtl"
  c = config_lib.resolve(c)
  net = build.build_network(c, tiny_dataset.num_landmarks, tiny_dataset.num_targets)
  state, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(c, 10))
  with pytest.raises(config_lib.ConfigError, match="go_mtl"):
    build.with_lsr_head(state, net, np.zeros((tiny_dataset.num_landmarks,
                                              tiny_dataset.num_targets)),
                        np.zeros(tiny_dataset.num_targets))


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _with(field, value, method="deep_lsmtl", compare_with=()):
  """A config holding a value its type would refuse on assignment (as a
  hand-edited JSON config can)."""
  from configs import default
  d = default.get_config().to_dict()
  d["method"], d["compare_with"] = method, compare_with
  section, name = field.split(".")
  d[section][name] = value
  return config_lib.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize("field, value", [
    ("lsmtl.detach_input", "yes"), ("lsmtl.detach_input", 1),
    ("lsmtl.warmup_steps", -1), ("lsmtl.warmup_steps", 2.5), ("lsmtl.warmup_steps", True),
    ("lsmtl.relation_lr_scale", -0.5), ("lsmtl.relation_lr_scale", float("nan")),
    ("lsmtl.relation_lr_scale", float("inf")), ("lsmtl.relation_lr_scale", "2"),
    ("model.head_init", "ridge"),
])
def test_a_bad_value_names_its_field(field, value):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(_with(field, value))


@pytest.mark.parametrize("method, compare_with, message", [
    ("dgex", (), "model.head_init=lsr needs the densenet trunk; method 'dgex'"),
    ("semigan", (), "model.head_init=lsr needs the densenet trunk; method 'semigan'"),
    ("deep_lsmtl", ("dgex",), "method 'dgex'"),
    ("go_mtl", (), "method 'go_mtl' \\(Deep-GO-MTL\\) has none"),
    ("densenet", ("lsr", "go_mtl"), "method 'go_mtl'"),
])
def test_head_init_lsr_refused_where_no_head_sees_the_landmarks(method, compare_with, message):
  config = _with("model.head_init", "lsr", method, compare_with)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["deep_lsmtl", "densenet", "cnmtl", "amtl", "amtfl", "lsr",
                                    "knn"])
def test_head_init_lsr_accepted_for_a_plain_head_on_the_densenet(method):
  assert config_lib.validate(_with("model.head_init", "lsr", method, ("densenet", "lsr"))) is None


def test_good_values_pass_and_old_configs_get_the_defaults():
  config_lib.validate(_with("lsmtl.relation_lr_scale", 0.0))
  config_lib.validate(_with("lsmtl.warmup_steps", 500))
  from configs import default
  d = default.get_config().to_dict()
  for section, name in (("lsmtl", "detach_input"), ("lsmtl", "warmup_steps"),
                        ("lsmtl", "relation_lr_scale"), ("model", "head_init")):
    del d[section][name]
  old = config_lib.resolve(ml_collections.ConfigDict(d))
  config_lib.validate(old)
  assert (old.lsmtl.detach_input, old.lsmtl.warmup_steps, old.lsmtl.relation_lr_scale,
          old.model.head_init) == (False, 0, 1.0, "default")
