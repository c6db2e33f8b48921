"""Methods are records: the registry, resolution of a method's settings, and a
new method added as one record (trained, evaluated and loaded for prediction
by the same code as the built-in ones)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsmtl_jax import build
from lsmtl_jax import config_lib
from lsmtl_jax import inference
from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax import steps
from lsmtl_jax import train
from lsmtl_jax.methods import base
from lsmtl_jax.methods import registry

PAPER_METHODS = {"lsr", "lsr_l1", "knn", "dgex", "semigan", "semigan_semi", "go_mtl", "cnmtl",
                 "amtl", "amtfl", "densenet", "deep_lsmtl"}


def test_every_method_of_the_comparison_is_registered_once():
  assert set(registry.names()) >= PAPER_METHODS
  assert len({registry.get(n).label for n in registry.names()}) == len(registry.names())
  for name in registry.names():
    method = registry.get(name)
    for tunable in method.tunables:  # every tunable names a real config field
      config = config_lib.resolve(_tiny(name))
      config_lib.get_field(config, tunable.field)
      assert len(tunable.values) >= 1


def test_resolve_applies_fixed_settings_once():
  config = _tiny("dgex")
  config.lsmtl.lam = 0.5
  resolved = config_lib.resolve(config)
  assert (resolved.model.trunk, resolved.model.activation, resolved.lsmtl.lam) == (
      "mlp", "tanh", 0.0)
  assert config.lsmtl.lam == 0.5  # the caller's config is left as it was
  assert config_lib.resolve(resolved).to_dict() == resolved.to_dict()


def test_unknown_method_is_a_config_error():
  config = _tiny("deep_lsmtl")
  config.method = "deep_lsmt"
  with pytest.raises(config_lib.ConfigError, match="method must be one of .*'deep_lsmt'"):
    config_lib.resolve(config)


# ----------------------------------------------------------------------------
# A new method: the DenseNet with an L2 penalty on its head, as one record.
# ----------------------------------------------------------------------------


def _toy_loss(state, batch, step: base.StepInputs):
  def loss_fn(params):
    y_hat, updates = step.regressor.apply(
        {"params": params["regressor"], "batch_stats": state.batch_stats}, batch["x"],
        train=True, rngs={"dropout": step.dropout_key}, mutable=["batch_stats"])
    l_task = objectives.task_loss(step.y, y_hat, "mse", step.valid)
    penalty = step.config.ridge_head.weight * jnp.sum(params["regressor"]["head"]["kernel"]**2)
    return l_task + penalty, (updates["batch_stats"], l_task, penalty)
  return base.gradients_and_metrics(loss_fn, state.params, "penalty")


def _toy_build(config, num_targets, dtype):
  return models.Regressor(trunk=models.build_trunk(config.model, dtype),
                          num_targets=num_targets, dtype=dtype), {}


def _toy_checks(config):
  yield config.ridge_head.weight >= 0, "ridge_head.weight must be >= 0"


TOY = base.Method(name="ridge_head", label="DenseNet + head L2", section="ridge_head",
                  defaults={"weight": 1e-3}, fixed={"model.trunk": "densenet", "lsmtl.lam": 0.0},
                  checks=_toy_checks, build=_toy_build, loss=_toy_loss,
                  memory=lambda config, num_targets, width: (0, ""),
                  tunables=(base.Tunable("ridge_head.weight", (1e-4, 1e-3, 1e-2)),))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture
def toy():
  registry.register(TOY)
  yield TOY
  registry.unregister(TOY.name)


def _tiny(method, cache=None):
  from configs import tiny
  config = tiny.get_config()
  config.method = method
  if cache is not None:
    config.data.cache_dir = str(cache)
  return config


def test_a_record_is_all_a_new_method_needs(toy, tmp_path, cache):
  config = config_lib.resolve(_tiny(toy.name, cache))
  assert config.ridge_head.weight == 1e-3 and config.lsmtl.lam == 0.0
  config.ridge_head.weight = -1.0
  with pytest.raises(config_lib.ConfigError, match="ridge_head.weight must be >= 0"):
    config_lib.validate(config)

  # Its loss is what the record says, against float64 numpy on the initial state.
  config.ridge_head.weight = 0.05
  config.mesh.target_multiple = 1
  net = build.build_network(config, 24, 40)
  state, _ = net.create_state(jax.random.PRNGKey(0), build.create_optimizer(config, 10))
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(8, 40)), jnp.float32)}
  _, _, m = steps.loss_and_gradients(state, batch, **net.step_kwargs(jax.random.PRNGKey(1)))
  w = np.asarray(state.params["regressor"]["head"]["kernel"], np.float64)
  assert float(m["penalty"]) == pytest.approx(0.05 * np.sum(w**2), rel=1e-5)
  assert float(m["loss"]) == pytest.approx(float(m["task_loss"]) + float(m["penalty"]), rel=1e-6)

  # The same loop, results, checkpoints and inference as every built-in method.
  run = _tiny(toy.name, cache)
  run.train.num_steps = 8
  results = train.train_and_evaluate(run, str(tmp_path))
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["method"] == "ridge_head" and saved["splits"] == results["splits"]
  scalars = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert any("train/penalty" in s for s in scalars)
  loaded = inference.load_run(str(tmp_path))
  assert loaded.regressor.num_targets == 128 and loaded.best_step == saved["best_step"]


def test_a_name_cannot_be_registered_twice(toy):
  with pytest.raises(ValueError, match="already registered"):
    registry.register(base.Method(name=toy.name, label="other", build=_toy_build,
                                  loss=_toy_loss))
  with pytest.raises(ValueError, match="built in"):
    registry.unregister("deep_lsmtl")
