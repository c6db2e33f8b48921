"""A run's config: method sections and fixed settings applied once, checks,
and the fingerprint that ties a workdir's checkpoints to the config.

Entry points (train.train_and_evaluate, inference, the benchmark, the
experiment runner) call `resolve` once; everything below them takes a
resolved config and never fills in defaults again.
"""

from __future__ import annotations

import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lsmtl_jax import models
from lsmtl_jax.data import synthetic
from lsmtl_jax.methods import registry

Config = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config value out of range; the message names the field."""


def with_method_sections(config: Config) -> Config:
  """Adds each method's own section (with its defaults) that `config` lacks,
  so any of them can be overridden on the command line and older configs
  (a workdir's config.json) keep working."""
  for section, fields in registry.sections().items():
    if section not in config:
      config[section] = ml_collections.ConfigDict(fields)
    else:
      for name, value in fields.items():
        if name not in config[section]:
          config[section][name] = value
  for dotted, value in _LATER_FIELDS.items():  # configs written before they existed
    *path, leaf = dotted.split(".")
    node = config
    for part in path:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    if leaf not in node:
      node[leaf] = value
  return config


# Fields added after configs were first saved in workdirs, with the value that
# reproduces the behaviour from before they existed.
_LATER_FIELDS = {"memory.limit_gb": 0.0, "data.max_train": 0, "data.calibration_fraction": 0.0,
                 "lsmtl.lam_candidates": (0.0, 0.01, 0.1),
                 "lsmtl.detach_input": False,
                 "lsmtl.warmup_steps": 0, "lsmtl.relation_lr_scale": 1.0,
                 "lsmtl.relation_input": "prediction", "lsmtl.relation_on": "outputs",
                 "lsmtl.test_blend": False, "lsmtl.test_blend_weights": (0.0, 0.25, 0.5),
                 "model.head_init": "default", "train.measure_peak": True,
                 "data.require_external_eval": False}


# lsmtl.lam: 'auto' (chosen on validation among lsmtl.lam_candidates) or a number.
AUTO_LAM = "auto"
# Fields that hold a string or a number: a value of the other kind replaces the
# field rather than failing ml_collections' type check.
_MIXED_FIELDS = ("lsmtl.lam",)


def lam_is_auto(config: Config) -> bool:
  """Whether this (resolved) run chooses lsmtl.lam on validation: a network
  method whose lam is not fixed (Deep-LSMTL) with lsmtl.lam = 'auto'."""
  return (config.lsmtl.lam == AUTO_LAM and config.method in registry.names()
          and registry.get(config.method).is_network)


def with_lam(config: Config, lam: float) -> Config:
  """A copy of `config` with lsmtl.lam = lam (a number), e.g. one candidate of
  an 'auto' run."""
  fields = config.to_dict()
  fields["lsmtl"]["lam"] = float(lam)
  return ml_collections.ConfigDict(fields)


def concrete_lam(config: Config) -> Config:
  """`config`, or for an 'auto' one a copy at its largest candidate: what
  builds and steps the same network (every lam > 0 builds the same bottleneck),
  for shape checks and the step benchmark."""
  if not lam_is_auto(config):
    return config
  return with_lam(config, max(config.lsmtl.lam_candidates))


def set_field(config: Config, dotted: str, value: Any) -> None:
  """config[a][b]... = value for 'a.b...'; an unknown field is a ConfigError."""
  *path, leaf = dotted.split(".")
  node = config
  for part in path:
    if part not in node:
      raise ConfigError(f"config: no such field {dotted!r}")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"config: no such field {dotted!r}")
  try:
    node[leaf] = value
  except TypeError:
    if dotted not in _MIXED_FIELDS:
      raise
    del node[leaf]
    node[leaf] = value


def get_field(config: Config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def resolve(config: Config) -> Config:
  """A copy of `config` with the method's sections and fixed settings applied."""
  config = with_method_sections(ml_collections.ConfigDict(config.to_dict()))
  try:
    method = registry.get(config.method)
  except registry.UnknownMethodError as e:
    raise ConfigError(f"config: {e.args[0]}") from None
  for dotted, value in method.fixed.items():
    set_field(config, dotted, value)
  if config.model.dtype == "auto":
    config.model.dtype = auto_dtype(jax.default_backend())
  return config


# model.dtype='auto' by platform (docs/performance.md, "Mixed precision,
# measured"): GPU and TPU run bfloat16 matmuls at 2x (tensor cores) or more
# the float32 rate; this CPU measured bfloat16 slower than float32, so CPU
# keeps float32. Resolved here, so a run's config.json and fingerprint hold
# the dtype it actually trained in.
AUTO_DTYPE = {"cpu": "float32", "gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16",
              "tpu": "bfloat16"}


def auto_dtype(platform: str) -> str:
  """The matmul dtype model.dtype='auto' resolves to on `platform`."""
  return AUTO_DTYPE.get(platform, "float32")


def matmul_dtype(dtype: str) -> str:
  """model.dtype as a dtype name; 'auto' (a config not resolved) by the platform."""
  return auto_dtype(jax.default_backend()) if dtype == "auto" else dtype


_CHOICES = {
    "model.trunk": ("densenet", "mlp"),
    "model.activation": ("tanh", "relu", "leaky_relu", "sigmoid", "gelu", "elu", "silu"),
    "model.dtype": ("auto", "float32", "bfloat16"),  # "auto": by platform, in `resolve`
    "lsmtl.mask_per": ("example", "batch"),
    "lsmtl.relation_input": ("prediction", "target"),
    "lsmtl.relation_on": ("outputs", "hidden"),
    "model.head_init": ("default", "lsr"),
    "loss.task": ("mse", "mae"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "warmup_cosine"),
    "train.nonfinite": ("stop", "skip"),
    "data.placement": ("auto", "host", "device"),
}


# Switches: True or False (a config file may set anything; flags are typed).
_BOOLS = ("model.batch_norm", "lsmtl.stop_gradient_target", "lsmtl.detach_input",
          "lsmtl.test_blend",
          "mesh.fsdp", "data.in_memory", "data.synthetic.enabled",
          "data.require_external_eval", "train.measure_peak", "report")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _checks(config: Config):
  for field, choices in _CHOICES.items():
    value = get_field(config, field)
    yield value in choices, f"{field} must be one of {list(choices)}, got {value!r}"
  for field in _BOOLS:
    value = get_field(config, field)
    yield isinstance(value, bool), f"{field} must be True or False, got {value!r}"
  yield from _data_checks(config)
  yield from _mesh_checks(config)
  m, lsmtl, t = config.model, config.lsmtl, config.train
  yield m.hidden > 0, f"model.hidden must be positive, got {m.hidden}"
  yield m.depth >= 1, f"model.depth must be at least 1, got {m.depth}"
  yield 0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}"
  yield from _lam_checks(lsmtl)
  yield lsmtl.bottleneck > 0, f"lsmtl.bottleneck must be positive, got {lsmtl.bottleneck}"
  yield 0 <= lsmtl.mask_rate < 1, f"lsmtl.mask_rate must be in [0, 1), got {lsmtl.mask_rate}"
  yield (config.optim.learning_rate > 0,
         f"optim.learning_rate must be positive, got {config.optim.learning_rate}")
  for name in ("warmup_steps", "weight_decay", "grad_clip_norm"):
    value = config.optim[name]
    yield value >= 0, f"optim.{name} must be >= 0, got {value}"
  for name in ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every",
               "patience"):
    yield t[name] > 0, f"train.{name} must be positive, got {t[name]}"
  yield (t.num_steps > 0 or t.num_epochs > 0,
         "train.num_steps or train.num_epochs must be positive")
  yield config.lsr.ridge >= 0, f"lsr.ridge must be >= 0, got {config.lsr.ridge}"
  yield config.data.max_train >= 0, f"data.max_train must be >= 0, got {config.data.max_train}"
  fraction = config.data.calibration_fraction
  yield (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
         and 0 <= fraction < 1,
         f"data.calibration_fraction must be in [0, 1), got {fraction!r}")
  yield (config.memory.limit_gb >= 0,
         f"memory.limit_gb must be >= 0, got {config.memory.limit_gb}")
  for other in config.compare_with:
    yield other in registry.names(), f"compare_with names unknown method {other!r}"
  yield from _variant_checks(config)


def _is_weight(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)


def _lam_checks(lsmtl):
  lam = lsmtl.lam
  yield (lam == AUTO_LAM or _is_weight(lam),
         f"lsmtl.lam must be 'auto' or a number >= 0, got {lam!r}")
  values = lsmtl.lam_candidates
  ok = (isinstance(values, (tuple, list)) and len(values) > 0
        and all(_is_weight(v) for v in values) and len(set(map(float, values))) == len(values))
  yield ok, ("lsmtl.lam_candidates must be distinct numbers >= 0, at least one, got "
             f"{values!r}")


def _data_checks(config: Config):
  """The split names and sources; whether a split exists is the dataset's to
  say (sources.load_data, before anything is written)."""
  data = config.data
  for name in ("train_split", "val_split", "test_split"):
    value = data[name]
    # test_split '' is a tuning candidate's: the test split is never looked at.
    ok = isinstance(value, str) and (bool(value) or name == "test_split")
    yield ok, f"data.{name} must name a split of the dataset, got {value!r}"
  yield data.prefetch >= 1, f"data.prefetch must be at least 1, got {data.prefetch}"
  if data.synthetic.enabled:
    fields = dict(data.synthetic.to_dict())
    fields.pop("enabled")
    problem = None
    try:
      synthetic.SyntheticSpec(**fields).validate()
    except (TypeError, ValueError) as e:
      problem = str(e).replace("synthetic data: ", "").replace("__init__() ", "")
    yield problem is None, f"data.synthetic: {problem}"
  if data.require_external_eval:
    # The cross-platform setting (configs/gtex.py): validation and test come
    # from other prepared datasets, never from the training dataset's splits.
    empty = [f"data.{name}_path" for name in ("val", "test")
             if not data[f"{name}_path"] and (name == "val" or data.test_split)]
    yield (not empty, f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: "
           "this config validates and tests on other prepared datasets "
           "(data.require_external_eval); pass "
           + " ".join(f"--config.{f}=DIR" for f in empty))


def _mesh_checks(config: Config):
  """The mesh fields by themselves; against the devices at hand, parallel.make_mesh."""
  mesh = config.mesh
  for name in ("data", "model"):
    value = mesh[name]
    yield (_is_int(value) and (value == -1 or value >= 1),
           f"mesh.{name} must be a positive number of devices or -1, got {value!r}")
  yield (not (mesh.data == -1 and mesh.model == -1),
         "mesh.data and mesh.model cannot both be -1")
  yield (_is_int(mesh.target_multiple) and mesh.target_multiple >= 1,
         f"mesh.target_multiple must be a positive integer, got {mesh.target_multiple!r}")


def _variant_checks(config: Config):
  """The switches between readings of Deep-LSMTL's loss, and model.head_init
  (for the method and every network method it is compared with)."""
  lsmtl = config.lsmtl
  yield (isinstance(lsmtl.detach_input, bool),
         f"lsmtl.detach_input must be True or False, got {lsmtl.detach_input!r}")
  warmup = lsmtl.warmup_steps
  yield (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0,
         f"lsmtl.warmup_steps must be an integer >= 0, got {warmup!r}")
  scale = lsmtl.relation_lr_scale
  yield (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale >= 0
         and math.isfinite(scale),
         f"lsmtl.relation_lr_scale must be a finite number >= 0, got {scale!r}")
  weights = lsmtl.test_blend_weights
  yield (isinstance(weights, (tuple, list)) and len(weights) > 0
         and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 1
                 for w in weights),
         f"lsmtl.test_blend_weights must be a non-empty list of numbers in [0, 1], "
         f"got {weights!r}")
  hidden = lsmtl.relation_on == "hidden"
  yield (not (hidden and lsmtl.relation_input == "target"),
         "lsmtl.relation_input='target' needs lsmtl.relation_on='outputs' (on 'hidden' g "
         "reads the trunk's features, not the targets)")
  yield (not (hidden and lsmtl.test_blend is True),
         "lsmtl.test_blend needs lsmtl.relation_on='outputs' (on 'hidden' g has no "
         "leave-task-out reconstruction)")
  if config.model.head_init == "lsr":
    for name in (config.method, *config.compare_with):
      if name not in registry.names():
        continue
      run = config
      if name != config.method:
        run = ml_collections.ConfigDict(config.to_dict())
        run.method, run.compare_with = name, ()
        run = resolve(run)
      problem = lsr_head_problem(run)
      yield problem is None, problem


def lsr_head_problem(config: Config) -> str | None:
  """Why model.head_init='lsr' cannot start this (resolved) config's network
  from the ridge solution, or None: it needs the DenseNet trunk, whose output
  starts with the raw landmarks, under one plain linear head. A method that is
  not a network ignores the field."""
  method = registry.get(config.method)
  if not method.is_network:
    return None
  config = concrete_lam(config)
  if config.model.trunk != "densenet":
    return (f"model.head_init=lsr needs the densenet trunk; method {method.name!r} runs "
            f"model.trunk={config.model.trunk!r}")
  num_landmarks = 3
  try:  # shapes only: nothing is allocated
    regressor, _ = method.build(config, 2, jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda: regressor.init(
        jax.random.PRNGKey(0), jnp.zeros((1, num_landmarks)), train=False)))
  except Exception:  # pylint: disable=broad-except  (a field out of range; its check says so)
    return None
  params = variables.get("params", {})
  kernel = params.get("head", {}).get("kernel")
  width = models.trunk_output_width(config.model, num_landmarks)
  if sorted(params) != ["head", "trunk"] or getattr(kernel, "shape", (None,))[0] != width:
    return (f"model.head_init=lsr needs one linear head on the DenseNet trunk's output; method "
            f"{method.name!r} ({method.label}) has none (its regressor's parameters: "
            f"{', '.join(sorted(params))})")
  return None


def validate(config: Config) -> None:
  """Raises ConfigError naming the first field out of range (config resolved)."""
  method = registry.get(config.method)
  checks = list(_checks(config))
  if method.checks is not None:
    checks += list(method.checks(config))
  for ok, message in checks:
    if not ok:
      raise ConfigError(f"config: {message}")


# What a checkpoint's shapes and meaning depend on; a workdir is refused to a
# config that differs in any of these.
_FINGERPRINT_FIELDS = ("method", "model", "lsmtl.bottleneck", "lsmtl.negative_slope",
                       "optim.name", "optim.grad_clip_norm", "mesh.target_multiple",
                       "data.path", "data.synthetic", "data.max_train", "seed")


def fingerprint(config: Config, num_padded: int, extras: list[str]) -> dict[str, Any]:
  out = {"num_padded_targets": num_padded, "extras": sorted(extras)}
  # g's shape depends on it; recorded only when set, so older checkpoints match.
  if get_field(config, "lsmtl.relation_on") != "outputs":
    out["lsmtl.relation_on"] = get_field(config, "lsmtl.relation_on")
  for field in _FINGERPRINT_FIELDS:
    value = get_field(config, field)
    out[field] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return json.loads(json.dumps(out))


def check_same_config(workdir: str, record: dict | None, expected: dict) -> None:
  saved = (record or {}).get("fingerprint")
  if saved is None or saved == expected:
    return
  diffs = [f"{k}: {saved.get(k)!r} there, {expected.get(k)!r} now"
           for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
  raise ConfigError(f"{workdir}: holds checkpoints of a different config ({'; '.join(diffs)}); "
                    "use a new --workdir or the config it was started with")
