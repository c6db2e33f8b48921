"""DenseNet / MLP wiring and forward pass against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lsmtl_jax import models
from lsmtl_jax import perf
from lsmtl_jax.methods import deep_lsmtl

L, T, H, DEPTH = 11, 13, 7, 3


def _model_config(trunk="densenet", **kw):
  c = ml_collections.ConfigDict(dict(trunk=trunk, hidden=H, depth=DEPTH, dropout=0.1,
                                     negative_slope=0.2, batch_norm=True, activation="tanh",
                                     dtype="float32"))
  c.update(kw)
  return c


def _init(model_config, seed=0):
  reg = models.Regressor(trunk=models.build_trunk(model_config), num_targets=T)
  variables = reg.init(jax.random.PRNGKey(seed), jnp.zeros((2, L)), train=False)
  return reg, jax.tree.map(np.asarray, models.nn.meta.unbox(variables))


def test_densenet_block_input_widths_and_head_shape():
  _, variables = _init(_model_config())
  params = variables["params"]
  for i in range(DEPTH):
    assert params["trunk"][f"block{i}_dense"]["kernel"].shape == (L + i * H, H)
    assert params["trunk"][f"block{i}_norm"]["scale"].shape == (L + i * H,)
  assert params["head"]["kernel"].shape == (L + DEPTH * H, T)
  assert params["head"]["bias"].shape == (T,)
  assert models.trunk_output_width(_model_config(), L) == L + DEPTH * H


def test_parameter_count_matches_formula():
  _, variables = _init(_model_config())
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  widths = [L + i * H for i in range(DEPTH)]
  expected = sum(w * H + H + 2 * w for w in widths) + (L + DEPTH * H) * T + T
  assert count == expected
  # MACs used for MFU are the dense layers' weight counts.
  assert perf.dense_macs_per_example(_model_config(), L, T) == (
      sum(w * H for w in widths) + (L + DEPTH * H) * T)


def _np_leaky(x, slope):
  return np.where(x >= 0, x, slope * x)


def test_densenet_eval_forward_matches_numpy_float64():
  reg, variables = _init(_model_config())
  # Give batch norm non-trivial running statistics and affine parameters.
  rng = np.random.default_rng(0)
  stats = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape), variables["batch_stats"])
  params = jax.tree.map(np.array, variables["params"])
  for i in range(DEPTH):
    params["trunk"][f"block{i}_norm"]["bias"] = rng.normal(size=L + i * H)
  x = rng.normal(size=(5, L))
  got = reg.apply({"params": params, "batch_stats": stats}, jnp.asarray(x, jnp.float32),
                  train=False)

  feats = [x]
  for i in range(DEPTH):
    h = np.concatenate(feats, 1)
    bn, bs = params["trunk"][f"block{i}_norm"], stats["trunk"][f"block{i}_norm"]
    h = (h - bs["mean"]) / np.sqrt(bs["var"] + 1e-5) * bn["scale"] + bn["bias"]
    d = params["trunk"][f"block{i}_dense"]
    feats.append(_np_leaky(h @ d["kernel"] + d["bias"], 0.2))
  want = np.concatenate(feats, 1) @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_mlp_trunk_forward_matches_numpy():
  mc = _model_config("mlp", depth=2)
  reg, variables = _init(mc)
  p = variables["params"]
  assert "batch_stats" not in variables
  assert p["trunk"]["layer0_dense"]["kernel"].shape == (L, H)
  assert p["trunk"]["layer1_dense"]["kernel"].shape == (H, H)
  assert p["head"]["kernel"].shape == (H, T)
  x = np.random.default_rng(1).normal(size=(4, L))
  h = np.tanh(x @ p["trunk"]["layer0_dense"]["kernel"] + p["trunk"]["layer0_dense"]["bias"])
  h = np.tanh(h @ p["trunk"]["layer1_dense"]["kernel"] + p["trunk"]["layer1_dense"]["bias"])
  want = h @ p["head"]["kernel"] + p["head"]["bias"]
  got = reg.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training_and_keyed():
  reg, variables = _init(_model_config(batch_norm=False, dropout=0.5))
  x = jnp.ones((3, L))
  a = reg.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  b = reg.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  c = reg.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(reg.apply(variables, x, train=False),
                                reg.apply(variables, x, train=False))


def test_parameters_carry_logical_axis_names():
  reg = models.Regressor(trunk=models.build_trunk(_model_config()), num_targets=T)
  boxed = jax.eval_shape(lambda: reg.init(jax.random.PRNGKey(0), jnp.zeros((1, L)),
                                          train=False))
  specs = models.nn.get_partition_spec(boxed)["params"]
  assert tuple(specs["head"]["kernel"]) == ("trunk_out", "targets")
  assert tuple(specs["head"]["bias"]) == ("targets",)
  rel = models.TaskRelation(num_targets=T, bottleneck=4)
  rel_specs = models.nn.get_partition_spec(
      jax.eval_shape(lambda: rel.init(jax.random.PRNGKey(0), jnp.zeros((1, T)))))["params"]
  assert tuple(rel_specs["encode"]["kernel"]) == ("targets", "bottleneck")
  assert tuple(rel_specs["decode"]["kernel"]) == ("bottleneck", "targets")


def test_relation_absent_when_lambda_zero():
  from configs import default
  c = default.get_config()
  c.lsmtl.lam = 0.0
  _, extras = deep_lsmtl.build(c, T, jnp.float32)
  assert extras == {}
  c.lsmtl.lam = 0.1
  _, extras = deep_lsmtl.build(c, T, jnp.float32)
  assert extras[deep_lsmtl.TASK_RELATION].bottleneck == c.lsmtl.bottleneck


@pytest.mark.parametrize("bad", [dict(trunk="cnn")])
def test_unknown_trunk_rejected(bad):
  with pytest.raises(ValueError, match="trunk"):
    models.build_trunk(_model_config(**bad))
