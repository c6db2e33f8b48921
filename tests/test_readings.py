"""Three more readings of Deep-LSMTL as switches, each against a numpy reference:
lsmtl.relation_input='target' (g sees the true y), lsmtl.relation_on='hidden'
(g maps the trunk's features to the outputs) and lsmtl.test_blend (y_hat mixed
with g's leave-task-out reconstruction, w chosen on validation)."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import objectives
from lsmtl_jax import steps
from lsmtl_jax import blending
from lsmtl_jax import train

from conftest import REPO

B, NUM_L, T, K, HIDDEN, DEPTH = 6, 5, 10, 3, 8, 2
F = NUM_L + DEPTH * HIDDEN  # the DenseNet trunk's output width
LAM, RATE = 0.7, 0.3
BASE_KEY = jax.random.PRNGKey(1)
_rng = np.random.default_rng(0)
BATCH = {"x": jnp.asarray(_rng.normal(size=(B, NUM_L)), jnp.float32),
         "y": jnp.asarray(_rng.normal(size=(B, T)), jnp.float32)}
REL = "task_relation"


def _config(target_multiple=1, **overrides):
  from configs import default
  c = default.get_config()
  c.model.hidden, c.model.depth, c.lsmtl.bottleneck = HIDDEN, DEPTH, K
  c.lsmtl.lam, c.lsmtl.mask_rate = LAM, RATE
  c.mesh.target_multiple = target_multiple
  for field, value in overrides.items():
    config_lib.set_field(c, field.replace("__", "."), value)
  c = config_lib.resolve(c)
  config_lib.validate(c)
  return c


@functools.lru_cache(maxsize=None)
def _setup(target_multiple=1, **overrides):
  net = build.build_network(_config(target_multiple, **overrides), NUM_L, T)
  state, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(net.config, 10))
  return net, state


def _step(net, state):
  return steps.loss_and_gradients(state, BATCH, **net.step_kwargs(BASE_KEY))


def _keys_y_valid(net, state):
  dropout_key, mask_key = jax.random.split(jax.random.fold_in(BASE_KEY, state.step))
  y = np.pad(np.asarray(BATCH["y"]), ((0, 0), (0, net.num_padded - T)))
  valid = np.arange(net.num_padded) < T
  return dropout_key, mask_key, y, valid.astype(np.float32)


def _forward(net, state, params, dropout_key):
  (y_hat, h), _ = net.regressor.apply(
      {"params": params["regressor"], "batch_stats": state.batch_stats}, BATCH["x"], train=True,
      rngs={"dropout": dropout_key}, mutable=["batch_stats"], return_features=True)
  return y_hat, h


def _np_g(params, u):
  """g(u) = V LeakyReLU(U u + c) + d in numpy, from g's parameters."""
  enc, dec = params["encode"], params["decode"]
  z = u @ np.asarray(enc["kernel"]) + np.asarray(enc["bias"])
  z = np.where(z > 0, z, 0.2 * z)
  return z @ np.asarray(dec["kernel"]) + np.asarray(dec["bias"])


def test_defaults():
  c = _config().lsmtl
  assert (c.relation_input, c.relation_on, c.test_blend) == ("prediction", "outputs", False)
  assert tuple(c.test_blend_weights) == (0.0, 0.25, 0.5)


# ----------------------------------------------------------------------------
# lsmtl.relation_input = 'target'
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("target_multiple", [1, 16])  # 16: a padded head
def test_target_input_reconstructs_from_the_true_targets(target_multiple):
  net, state = _setup(target_multiple, lsmtl__relation_input="target")
  grads, _, metrics = _step(net, state)
  dropout_key, mask_key, y, valid = _keys_y_valid(net, state)
  mask = np.asarray(objectives.sample_task_mask(mask_key, y.shape, RATE)) * valid
  y_hat, _ = _forward(net, state, state.params, dropout_key)
  y_hat_np = np.asarray(y_hat, np.float64)
  r = _np_g(state.params[REL], (1 - mask) * valid * y)
  want = np.sum(mask * (y_hat_np - r) ** 2) / np.sum(mask)
  np.testing.assert_allclose(float(metrics["rec_loss"]), want, rtol=1e-5)
  task = np.sum(valid * (y_hat_np - y) ** 2) / (B * T)
  np.testing.assert_allclose(float(metrics["loss"]), task + LAM * want, rtol=1e-5)

  # g's input is data: the regressor gets the term only through the target y_hat.
  _, pullback = jax.vjp(lambda p: _forward(net, state, {"regressor": p}, dropout_key)[0],
                        state.params["regressor"])
  cotangent = (2 * valid * (y_hat_np - y) / (B * T)
               + LAM * 2 * mask * (y_hat_np - r) / np.sum(mask))
  (want_grads,) = pullback(jnp.asarray(cotangent, jnp.float32))
  for got, ref in zip(jax.tree.leaves(grads["regressor"]), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# lsmtl.relation_on = 'hidden'
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("target_multiple", [1, 16])
def test_hidden_maps_masked_features_to_every_output(target_multiple):
  net, state = _setup(target_multiple, lsmtl__relation_on="hidden")
  assert state.params[REL]["encode"]["kernel"].shape == (F, K)
  assert state.params[REL]["decode"]["kernel"].shape == (K, net.num_padded)
  grads, _, metrics = _step(net, state)
  dropout_key, mask_key, y, valid = _keys_y_valid(net, state)
  y_hat, h = _forward(net, state, state.params, dropout_key)
  y_hat_np, h_np = np.asarray(y_hat, np.float64), np.asarray(h, np.float64)
  head = state.params["regressor"]["head"]
  # h is what the head reads: y_hat = h W + b.
  np.testing.assert_allclose(h_np @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             y_hat_np, rtol=1e-4, atol=1e-5)
  feature_mask = np.asarray(objectives.sample_task_mask(mask_key, (B, F), RATE))
  assert 0 < feature_mask.mean() < 1
  r = _np_g(state.params[REL], (1 - feature_mask) * h_np)
  want = np.sum(valid * (y_hat_np - r) ** 2) / (B * T)
  np.testing.assert_allclose(float(metrics["rec_loss"]), want, rtol=1e-5)
  task = np.sum(valid * (y_hat_np - y) ** 2) / (B * T)
  np.testing.assert_allclose(float(metrics["loss"]), task + LAM * want, rtol=1e-5)
  # The term shapes the trunk through h and the head through y_hat.
  default_grads = _step(*_setup(target_multiple))[0]
  for path in (("head",), ("trunk", "block0_dense")):
    got, ref = grads["regressor"], default_grads["regressor"]
    for part in path:
      got, ref = got[part], ref[part]
    assert np.abs(np.asarray(got["kernel"]) - np.asarray(ref["kernel"])).max() > 1e-5


def test_hidden_is_in_the_fingerprint_only_when_set():
  outputs = config_lib.fingerprint(_config(), T, [REL])
  hidden = config_lib.fingerprint(_config(lsmtl__relation_on="hidden"), T, [REL])
  assert "lsmtl.relation_on" not in outputs
  assert hidden["lsmtl.relation_on"] == "hidden"


# ----------------------------------------------------------------------------
# lsmtl.test_blend
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate, groups", [(0.3, 4), (0.1, 10), (0.25, 4), (0.5, 2)])
def test_blend_partition_hides_each_task_once(rate, groups):
  assert objectives.num_blend_groups(rate) == groups
  g = np.asarray(objectives.blend_groups(jax.random.PRNGKey(3), 23, rate))
  assert sorted(np.unique(g).tolist()) == list(range(groups))
  counts = np.bincount(g, minlength=groups)
  assert counts.max() - counts.min() <= 1


def test_leave_group_out_against_numpy():
  net, state = _setup(16)  # padded: the padding is never shown to g
  params = state.params[REL]
  valid = np.arange(net.num_padded) < T
  y_hat = _rng.normal(size=(B, net.num_padded)).astype(np.float32)
  groups, num_groups = blending.partition(net.config, net.num_padded)
  g = lambda u: net.extras[REL].apply({"params": params}, u)
  got = np.asarray(objectives.leave_group_out(jnp.asarray(y_hat), groups, num_groups, g,
                                              jnp.asarray(valid, jnp.float32)))
  groups = np.asarray(groups)
  want = np.empty_like(got)
  for t in range(net.num_padded):  # one task at a time, its group hidden
    shown = (groups != groups[t]) & valid
    want[:, t] = _np_g(params, shown * y_hat)[:, t]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A task's reconstruction does not see its own prediction.
  bumped = y_hat.copy()
  bumped[:, 2] += 5.0
  again = np.asarray(objectives.leave_group_out(jnp.asarray(bumped), jnp.asarray(groups),
                                                num_groups, g, jnp.asarray(valid, jnp.float32)))
  np.testing.assert_array_equal(again[:, 2], got[:, 2])
  w = 0.25
  np.testing.assert_allclose(np.asarray(objectives.blend(y_hat, got, w)),
                             0.75 * y_hat + 0.25 * got, rtol=1e-6)


def test_choose_takes_the_lowest_validation_mae_and_keeps_ties_early():
  maes = {0.0: 0.5, 0.25: 0.4, 0.5: 0.45}
  assert blending.choose((0.0, 0.25, 0.5), maes.get)[0] == 0.25
  w, record = blending.choose((0.0, 0.5), lambda w: 0.3)
  assert w == 0.0 and record == {"weight": 0.0, "val_mae": {"0.0": 0.3, "0.5": 0.3}}


@pytest.fixture(scope="module")
def blend_runs(tmp_path_factory):
  from configs import tiny
  cache = tmp_path_factory.mktemp("cache")
  out = {}
  for blend in (False, True):
    config = tiny.get_config()
    config.data.cache_dir = str(cache)
    config.train.num_steps = 30
    config.lsmtl.lam = 0.5
    config.lsmtl.test_blend = blend
    config.lsmtl.test_blend_weights = (0.0, 0.5, 1.0)
    workdir = tmp_path_factory.mktemp(f"blend{int(blend)}")
    train.train_and_evaluate(config, str(workdir))
    with open(workdir / "results.json") as f:
      out[blend] = json.load(f)
  return out


def test_test_blend_chooses_w_on_validation_and_reports_it(blend_runs):
  plain, blended = blend_runs[False], blend_runs[True]
  assert "test_blend" not in plain
  record = blended["test_blend"]
  maes = {float(w): m for w, m in record["val_mae"].items()}
  assert sorted(maes) == [0.0, 0.5, 1.0]
  assert record["weight"] == min(maes, key=maes.get)
  # w = 0 is the unblended network; the chosen w's val MAE is the reported one.
  np.testing.assert_allclose(maes[0.0], plain["splits"]["val"]["mae_mean"], rtol=1e-6)
  np.testing.assert_allclose(blended["splits"]["val"]["mae_mean"], maes[record["weight"]],
                             rtol=1e-6)
  assert len(set(maes.values())) == 3  # g's reconstruction does move the predictions


# ----------------------------------------------------------------------------
# Config checks and the regime study's entries
# ----------------------------------------------------------------------------


def _with(**fields):
  from configs import default
  d = default.get_config().to_dict()
  for dotted, value in fields.items():
    section, name = dotted.split("__")
    d[section][name] = value
  return config_lib.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize("fields, message", [
    ({"lsmtl__relation_input": "truth"}, "lsmtl.relation_input"),
    ({"lsmtl__relation_on": "trunk"}, "lsmtl.relation_on"),
    ({"lsmtl__test_blend": 1}, "lsmtl.test_blend"),
    ({"lsmtl__test_blend_weights": ()}, "lsmtl.test_blend_weights"),
    ({"lsmtl__test_blend_weights": (0.0, 1.5)}, "lsmtl.test_blend_weights"),
    ({"lsmtl__relation_on": "hidden", "lsmtl__relation_input": "target"},
     "relation_input='target' needs"),
    ({"lsmtl__relation_on": "hidden", "lsmtl__test_blend": True}, "test_blend needs"),
])
def test_a_bad_value_names_its_field(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    config_lib.validate(_with(**fields))


def test_old_configs_get_the_defaults():
  from configs import default
  d = default.get_config().to_dict()
  for name in ("relation_input", "relation_on", "test_blend", "test_blend_weights"):
    del d["lsmtl"][name]
  old = config_lib.resolve(ml_collections.ConfigDict(d))
  config_lib.validate(old)
  assert (old.lsmtl.relation_input, old.lsmtl.relation_on, old.lsmtl.test_blend) == (
      "prediction", "outputs", False)


def _regimes():
  spec = importlib.util.spec_from_file_location(
      "regimes", os.path.join(REPO, "configs", "experiments", "regimes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_regime_readings_set_their_switch_and_lam_explicitly():
  regimes = _regimes()
  config = regimes.get_config()
  config.study.readings = ("target_input", "hidden", "test_blend")
  config.study.reading_width, config.study.widths = 512, (512,)
  config.study.datasets, config.study.n_train = ("synthetic",), (300,)
  config.study.reading_datasets = ("synthetic",)
  runs = {r["name"]: r for r in regimes.get_runs(config, "w")}
  want = {"target_input": ("lsmtl.relation_input", "target"),
          "hidden": ("lsmtl.relation_on", "hidden"), "test_blend": ("lsmtl.test_blend", True)}
  for reading, (field, value) in want.items():
    run = runs[f"synthetic-300-w512-{reading}-lsmtl"]
    assert run["overrides"][field] == value
    assert run["tune"]["on_top_of"] == "synthetic-300-w512-default-lam0"
    assert [c["lsmtl.lam"] for c in run["tune"]["search"]] == list(config.study.lam_values)
  config.study.depth, config.study.widths, config.study.readings = 3, (1024,), ()
  (lam0, lsmtl) = regimes.get_runs(config, "w")
  assert lam0["name"] == "synthetic-300-w1024-d3-default-lam0"
  assert lsmtl["overrides"]["model.depth"] == 3 and lsmtl["overrides"]["model.hidden"] == 1024
