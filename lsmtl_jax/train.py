"""Training and evaluation: data -> model -> loss -> step -> loop -> results.json.

`train_and_evaluate(config, workdir)` is the whole job; main.py and notebooks
call it. Starting it again on the same workdir resumes from the latest
checkpoint, and because batches, dropout and task masks are all derived from
(seed, step), the resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsmtl_jax import evaluation
from lsmtl_jax import metrics
from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax import parallel
from lsmtl_jax import perf
from lsmtl_jax import results as results_lib
from lsmtl_jax.checkpoints import Checkpoints
from lsmtl_jax.data import loader
from lsmtl_jax.data import store
from lsmtl_jax.data import synthetic
from lsmtl_jax.methods import defaults as method_defaults
from lsmtl_jax.methods import knn
from lsmtl_jax.methods import lasso
from lsmtl_jax.methods import linear
from lsmtl_jax.methods import mtl
from lsmtl_jax.methods import semigan

METHOD_NAMES = {"deep_lsmtl": "Deep-LSMTL", "densenet": "DenseNet", "dgex": "D-GEX",
                "lsr": "LSR", "lsr_l1": "LSR-L1", "knn": "KNN-GE", "semigan": "SemiGAN",
                "semigan_semi": "SemiGAN (semi-sup.)", "go_mtl": "Deep-GO-MTL",
                "cnmtl": "Deep-CNMTL", "amtl": "Deep-AMTL", "amtfl": "Deep-AMTFL"}
NETWORK_METHODS = ("deep_lsmtl", "densenet", "dgex", *semigan.METHODS, *mtl.METHODS)


class ConfigError(ValueError):
  """A config value out of range; the message names the field."""


# ----------------------------------------------------------------------------
# Config and data
# ----------------------------------------------------------------------------


def resolve_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the chosen method's fixed settings applied."""
  config = method_defaults.add_defaults(ml_collections.ConfigDict(config.to_dict()))
  if config.method == "densenet":
    config.model.trunk, config.lsmtl.lam = "densenet", 0.0
  elif config.method == "dgex":
    config.model.trunk, config.model.activation, config.lsmtl.lam = "mlp", "tanh", 0.0
  elif config.method in semigan.METHODS:
    # The generator is a fully connected network, as in SemiGAN; no LSMTL term.
    config.model.trunk, config.model.activation, config.lsmtl.lam = "mlp", "leaky_relu", 0.0
  elif config.method in mtl.METHODS:
    # The MTL regularizers replace Deep-LSMTL's; the trunk is the same DenseNet.
    config.model.trunk, config.lsmtl.lam = "densenet", 0.0
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  def need(ok: bool, message: str):
    if not ok:
      raise ConfigError(f"config: {message}")

  need(config.method in METHOD_NAMES,
       f"method must be one of {sorted(METHOD_NAMES)}, got {config.method!r}")
  need(config.model.trunk in ("densenet", "mlp"),
       f"model.trunk must be 'densenet' or 'mlp', got {config.model.trunk!r}")
  need(config.model.hidden > 0, f"model.hidden must be positive, got {config.model.hidden}")
  need(config.model.depth >= 1, f"model.depth must be at least 1, got {config.model.depth}")
  need(0 <= config.model.dropout < 1, f"model.dropout must be in [0, 1), got {config.model.dropout}")
  need(config.model.dtype in ("float32", "bfloat16"),
       f"model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
  need(config.lsmtl.lam >= 0, f"lsmtl.lam must be >= 0, got {config.lsmtl.lam}")
  need(config.lsmtl.bottleneck > 0,
       f"lsmtl.bottleneck must be positive, got {config.lsmtl.bottleneck}")
  need(0 <= config.lsmtl.mask_rate < 1,
       f"lsmtl.mask_rate must be in [0, 1), got {config.lsmtl.mask_rate}")
  need(config.lsmtl.mask_per in ("example", "batch"),
       f"lsmtl.mask_per must be 'example' or 'batch', got {config.lsmtl.mask_per!r}")
  need(config.loss.task in ("mse", "mae"), f"loss.task must be 'mse' or 'mae', got {config.loss.task!r}")
  need(config.optim.name in ("adam", "adamw", "sgd"),
       f"optim.name must be 'adam', 'adamw' or 'sgd', got {config.optim.name!r}")
  need(config.optim.schedule in ("constant", "cosine", "warmup_cosine"),
       f"optim.schedule must be 'constant', 'cosine' or 'warmup_cosine', got {config.optim.schedule!r}")
  need(config.optim.learning_rate > 0,
       f"optim.learning_rate must be positive, got {config.optim.learning_rate}")
  for name in ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every",
               "patience"):
    need(config.train[name] > 0, f"train.{name} must be positive, got {config.train[name]}")
  need(config.train.nonfinite in ("stop", "skip"),
       f"train.nonfinite must be 'stop' or 'skip', got {config.train.nonfinite!r}")
  need(config.train.num_steps > 0 or config.train.num_epochs > 0,
       "train.num_steps or train.num_epochs must be positive")
  need(config.lsr.ridge >= 0, f"lsr.ridge must be >= 0, got {config.lsr.ridge}")
  _validate_method_config(config, need)
  for other in config.compare_with:
    need(other in METHOD_NAMES, f"compare_with names unknown method {other!r}")


def _validate_method_config(config: ml_collections.ConfigDict, need) -> None:
  """Checks the comparison methods' own sections (methods/defaults.py)."""
  c = method_defaults.add_defaults(ml_collections.ConfigDict(config.to_dict()))
  if c.method == "lsr_l1":
    need(len(c.lsr_l1.alphas) > 0 and all(a >= 0 for a in c.lsr_l1.alphas),
         f"lsr_l1.alphas must be a non-empty list of values >= 0, got {c.lsr_l1.alphas}")
    need(c.lsr_l1.max_iters > 0, f"lsr_l1.max_iters must be positive, got {c.lsr_l1.max_iters}")
  elif c.method == "knn":
    need(len(c.knn.ks) > 0 and all(k >= 1 for k in c.knn.ks),
         f"knn.ks must be a non-empty list of values >= 1, got {c.knn.ks}")
    need(c.knn.query_block > 0 and c.knn.train_block > 0,
         "knn.query_block and knn.train_block must be positive")
  elif c.method in semigan.METHODS:
    need(c.semigan.adversarial >= 0,
         f"semigan.adversarial must be >= 0, got {c.semigan.adversarial}")
    need(c.semigan.critic_hidden > 0 and c.semigan.critic_depth >= 1,
         "semigan.critic_hidden must be positive and semigan.critic_depth at least 1")
    need(0 <= c.semigan.unlabeled_fraction < 1,
         f"semigan.unlabeled_fraction must be in [0, 1), got {c.semigan.unlabeled_fraction}")
  elif c.method == "go_mtl":
    need(c.go_mtl.rank > 0, f"go_mtl.rank must be positive, got {c.go_mtl.rank}")
    need(c.go_mtl.mu >= 0 and c.go_mtl.lam >= 0, "go_mtl.mu and go_mtl.lam must be >= 0")
  elif c.method == "cnmtl":
    need(c.cnmtl.num_clusters >= 1, f"cnmtl.num_clusters must be >= 1, got {c.cnmtl.num_clusters}")
    need(c.cnmtl.every > 0 and c.cnmtl.kmeans_iters >= 0,
         "cnmtl.every must be positive and cnmtl.kmeans_iters >= 0")
    need(min(c.cnmtl.eps_m, c.cnmtl.eps_b, c.cnmtl.eps_w) >= 0, "cnmtl.eps_* must be >= 0")
  elif c.method == "amtl":
    need(c.amtl.alpha >= 0 and c.amtl.gamma >= 0, "amtl.alpha and amtl.gamma must be >= 0")
    need(c.amtl.row_sample >= 0, f"amtl.row_sample must be >= 0, got {c.amtl.row_sample}")
  elif c.method == "amtfl":
    need(min(c.amtfl.alpha, c.amtfl.gamma, c.amtfl.mu) >= 0,
         "amtfl.alpha, amtfl.gamma and amtfl.mu must be >= 0")
  need(c.memory.limit_gb >= 0, f"memory.limit_gb must be >= 0, got {c.memory.limit_gb}")


def _open(path: str) -> store.Dataset:
  if not os.path.exists(path):
    raise store.DatasetError(
        f"{path}: prepared dataset not found; create it with python -m lsmtl_jax.prepare "
        "(see README, 'Real data') or point --config.data.path at it")
  return store.open_dataset(path)


def load_dataset(config: ml_collections.ConfigDict) -> store.Dataset:
  """The training dataset: the synthetic demo compendium or a prepared directory."""
  if config.data.synthetic.enabled:
    fields = dict(config.data.synthetic.to_dict())
    fields.pop("enabled")
    spec = synthetic.SyntheticSpec(**fields)
    if jax.process_count() > 1:  # one writer; the others wait, then open it
      if jax.process_index() == 0:
        synthetic.cached(spec, config.data.cache_dir)
      multihost_utils.sync_global_devices("synthetic dataset ready")
    return synthetic.cached(spec, config.data.cache_dir)
  if not config.data.path:
    raise store.DatasetError(
        "config.data.path is empty: prepare a dataset first (python -m lsmtl_jax.prepare "
        "--config=configs/prepare/geo.py ...) and pass --config.data.path=DIR")
  return _open(config.data.path)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  dataset: store.Dataset
  indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class Data:
  """The training dataset and where validation and test rows come from."""

  train: store.Dataset
  eval_sets: dict[str, EvalSet]


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Validation and test are splits of the training dataset, or (cross-platform,
  data.val_path / data.test_path) the named split of another prepared dataset
  with the same genes in the same order."""
  train_ds = load_dataset(config)
  if config.data.in_memory:
    train_ds.load_into_memory()
  eval_sets = {}
  for name, path, split in (("val", config.data.val_path, config.data.val_split),
                            ("test", config.data.test_path, config.data.test_split)):
    ds = _open(path) if path else train_ds
    if ds is not train_ds:
      for kind in ("landmarks", "targets"):
        if ds.meta[kind]["ids"] != train_ds.meta[kind]["ids"]:
          raise store.DatasetError(f"{path}: its {kind} differ from the training dataset's "
                                   f"({train_ds.path}); prepare both with the same gene maps")
    eval_sets[name] = EvalSet(ds, ds.split(split))
  return Data(train_ds, eval_sets)


# ----------------------------------------------------------------------------
# Model, optimizer and state
# ----------------------------------------------------------------------------


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Steps whose loss or gradient norm was not finite (their update is not
  # applied), and [step, loss, grad norm] of the first of them.
  nonfinite_steps: Any = None
  first_nonfinite: Any = None


def create_model(config, num_targets: int):
  """(regressor, relation); relation is None when lam = 0 (no bottleneck at all)."""
  dtype = jnp.dtype(config.model.dtype)
  method = config.get("method", "deep_lsmtl")
  if method in semigan.METHODS or method in mtl.METHODS:
    return _create_comparison_model(
        method_defaults.add_defaults(ml_collections.ConfigDict(config.to_dict())), num_targets,
        dtype)
  regressor = models.Regressor(trunk=models.build_trunk(config.model, dtype),
                               num_targets=num_targets, dtype=dtype)
  relation = None
  if config.lsmtl.lam > 0:
    relation = models.TaskRelation(num_targets=num_targets, bottleneck=config.lsmtl.bottleneck,
                                   negative_slope=config.lsmtl.negative_slope, dtype=dtype)
  return regressor, relation


def _create_comparison_model(config, num_targets: int, dtype):
  """(regressor, auxiliary module under params['relation']) of SemiGAN and the MTL
  baselines: the discriminator, AMTL's B or AMTFL's feedback A; None for GO-MTL
  and CNMTL, whose extra structure is in the head."""
  trunk = models.build_trunk(config.model, dtype)
  method = config.method
  if method == "go_mtl":
    return models.FactorizedRegressor(trunk=trunk, num_targets=num_targets,
                                      rank=config.go_mtl.rank, dtype=dtype), None
  if method == "cnmtl":
    return models.ClusteredRegressor(trunk=trunk, num_targets=num_targets,
                                     num_clusters=config.cnmtl.num_clusters, dtype=dtype), None
  regressor = models.Regressor(trunk=trunk, num_targets=num_targets, dtype=dtype)
  if method == "amtl":
    return regressor, models.TaskTransfer(num_targets=num_targets)
  if method == "amtfl":
    return regressor, models.OutputFeedback(
        num_targets=num_targets, negative_slope=config.lsmtl.negative_slope,
        trunk_output_width=functools.partial(models.trunk_output_width, config.model))
  return regressor, models.PairDiscriminator(hidden=config.semigan.critic_hidden,
                                             depth=config.semigan.critic_depth, dtype=dtype)


def create_learning_rate_fn(config, num_steps: int) -> optax.Schedule:
  lr, warmup = config.optim.learning_rate, config.optim.warmup_steps
  if config.optim.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.optim.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))


def create_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  schedule = create_learning_rate_fn(config, num_steps)
  if config.optim.name == "adam":
    opt = optax.adam(schedule)
  elif config.optim.name == "adamw":
    opt = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  else:
    opt = optax.sgd(schedule, momentum=0.9)
  if config.optim.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), opt)
  return opt


def init_variables(key, regressor, relation, num_landmarks: int, num_targets: int):
  """({'regressor': ..., 'relation': ...} params, batch_stats), with logical boxes."""
  reg_key, rel_key = jax.random.split(key)
  variables = regressor.init(reg_key, jnp.zeros((1, num_landmarks)), train=False)
  params = {"regressor": variables["params"]}
  if relation is not None:
    # The comparison methods' auxiliary modules say what they are called with.
    inputs = (relation.dummy_inputs(num_landmarks, num_targets)
              if hasattr(relation, "dummy_inputs") else (jnp.zeros((1, num_targets)),))
    params["relation"] = relation.init(rel_key, *inputs)["params"]
  return params, variables.get("batch_stats", {})


def create_train_state(key, regressor, relation, num_landmarks, num_targets, tx, mesh=None,
                       rules=()):
  """(state, shardings): parameters and optimizer state are created already sharded.

  eval_shape gives the logical axes of every leaf (optimizer moments included),
  the rules map them onto the mesh, and the jitted init writes each shard in place.
  """
  boxed_state = _boxed_state_fn(regressor, relation, num_landmarks, num_targets, tx)
  if mesh is None:
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": 1, "model": 1}),
                              jax.devices()[:1])
  shardings = parallel.shardings_of(jax.eval_shape(boxed_state, key), mesh, rules)
  state = jax.jit(lambda k: nn.meta.unbox(boxed_state(k)), out_shardings=shardings)(key)
  return state, shardings


def _boxed_state_fn(regressor, relation, num_landmarks, num_targets, tx):
  def boxed_state(k):
    params, batch_stats = init_variables(k, regressor, relation, num_landmarks, num_targets)
    return TrainState.create(apply_fn=regressor.apply, params=params, batch_stats=batch_stats,
                             tx=tx, nonfinite_steps=jnp.zeros((), jnp.int32),
                             first_nonfinite=jnp.array([-1.0, 0.0, 0.0], jnp.float32))
  return boxed_state


def compiled_step_memory(config, num_landmarks: int, num_targets: int) -> dict[str, int]:
  """Per-device bytes of one train step as XLA plans it, from shapes alone: the
  step is lowered and compiled on abstract inputs (nothing is allocated), as
  training would run it (sharded, state donated). 'peak' = arguments +
  temporaries + outputs not aliased to a donated argument.
  """
  config = resolve_method(config)
  mesh = parallel.make_mesh(config.mesh)
  padded = parallel.padded_targets(num_targets, config.mesh.target_multiple,
                                   mesh.shape["model"])
  regressor, relation = create_model(config, padded)
  tx = create_optimizer(config, max(config.train.num_steps, 1))
  key = jax.random.PRNGKey(config.seed)
  shapes = jax.eval_shape(_boxed_state_fn(regressor, relation, num_landmarks, padded, tx), key)
  shardings = parallel.shardings_of(shapes, mesh, parallel.logical_rules(config.mesh))
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       nn.meta.unbox(shapes), shardings)
  b = config.train.batch_size
  batch_sharding = parallel.batch_sharding(mesh)
  batch = {"x": jax.ShapeDtypeStruct((b, num_landmarks), jnp.float32, sharding=batch_sharding),
           "y": jax.ShapeDtypeStruct((b, num_targets), jnp.float32, sharding=batch_sharding)}
  step = jax.jit(functools.partial(train_step, regressor=regressor, relation=relation,
                                   config=config, base_key=key), donate_argnums=0)
  analysis = step.lower(state, batch).compile().memory_analysis()
  out = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
         for name in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
  return out


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def _pad_targets(y: jnp.ndarray, num_padded: int) -> jnp.ndarray:
  return jnp.pad(y, ((0, 0), (0, num_padded - y.shape[1])))


def _valid_targets(num_targets: int, num_padded: int) -> jnp.ndarray | None:
  if num_padded == num_targets:
    return None
  return (jnp.arange(num_padded) < num_targets).astype(jnp.float32)


def loss_and_gradients(state: TrainState, batch, *, regressor, relation, config, base_key):
  """(gradients, new batch statistics, step metrics). Dropout and task-mask keys
  derive from (seed, step), so a resumed run draws exactly what it would have.

  The head may be wider than the targets (padding so the model axis divides it):
  padded outputs are masked out of both loss terms.
  """
  step_key = jax.random.fold_in(base_key, state.step)
  dropout_key, mask_key = jax.random.split(step_key)
  lsmtl = config.lsmtl
  num_padded = regressor.num_targets
  valid = _valid_targets(batch["y"].shape[1], num_padded)
  y = _pad_targets(batch["y"], num_padded)
  if config.method in semigan.METHODS:
    return semigan.loss_and_gradients(state, batch, regressor=regressor, critic=relation,
                                      config=config, dropout_key=dropout_key, y=y, valid=valid)
  if config.method in mtl.METHODS:
    return _mtl_loss_and_gradients(state, batch, regressor=regressor, relation=relation,
                                   config=config, dropout_key=dropout_key, key=mask_key, y=y,
                                   valid=valid)

  def loss_fn(params):
    y_hat, updates = regressor.apply(
        {"params": params["regressor"], "batch_stats": state.batch_stats}, batch["x"],
        train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    l_task = objectives.task_loss(y, y_hat, config.loss.task, valid)
    l_rec = jnp.zeros((), jnp.float32)
    if relation is not None:
      mask = objectives.sample_task_mask(mask_key, y_hat.shape, lsmtl.mask_rate,
                                         per_batch=lsmtl.mask_per == "batch")
      g = lambda u: relation.apply({"params": params["relation"]}, u)
      l_rec = objectives.reconstruction_loss(y_hat, mask, g, lsmtl.stop_gradient_target, valid)
    total = l_task + lsmtl.lam * l_rec
    return total, (updates["batch_stats"], l_task, l_rec)

  return _gradients_and_metrics(loss_fn, state.params)


def _gradients_and_metrics(loss_fn, params):
  """loss_fn(params) -> (total, (batch_stats, task loss, second term)): the
  gradients, new batch statistics and the step's metrics."""
  (loss, (batch_stats, l_task, l_rec)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  step_metrics = {"loss": loss, "task_loss": l_task, "rec_loss": l_rec,
                  "grad_norm": optax.tree.norm(grads)}
  return grads, batch_stats, step_metrics


def _mtl_loss_and_gradients(state, batch, *, regressor, relation, config, dropout_key, key, y,
                            valid):
  """Deep-GO-MTL, -CNMTL, -AMTL, -AMTFL: task loss + the method's regularizer
  (methods/mtl.py), reported as rec_loss. CNMTL's clusters ride in batch_stats."""
  batch_stats = state.batch_stats
  if config.method == "cnmtl":
    num_real = batch["y"].shape[1]
    cluster_valid = valid if valid is not None else jnp.ones((num_real,), jnp.float32)
    batch_stats = {**batch_stats, "clusters": mtl.current_clusters(state, config, cluster_valid)}
  mutable = ["batch_stats", "intermediates"] if config.method == "amtfl" else ["batch_stats"]

  def loss_fn(params):
    y_hat, updates = regressor.apply(
        {"params": params["regressor"], "batch_stats": batch_stats}, batch["x"], train=True,
        rngs={"dropout": dropout_key}, mutable=mutable, **mtl.capture_features(config))
    total, l_task, l_reg = mtl.objective(config, params, y, y_hat, updates, relation, valid, key)
    return total, (updates["batch_stats"], l_task, l_reg)

  return _gradients_and_metrics(loss_fn, state.params)


def train_step(state: TrainState, batch, **kw):
  """One optimizer update: (state, batch) -> (state, metrics).

  A step whose loss or gradient norm is not finite leaves parameters, optimizer
  and batch statistics as they were and is recorded in the state; the loop
  stops on it (or, with train.nonfinite='skip', counts it) without a host sync
  per step.
  """
  grads, batch_stats, step_metrics = loss_and_gradients(state, batch, **kw)
  finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
  # A branch, not a tree-wide select: the select made XLA copy both Adam
  # moments every step; the taken branch updates the donated buffers in place.
  new_state = jax.lax.cond(
      finite, lambda s: s.apply_gradients(grads=grads, batch_stats=batch_stats),
      lambda s: s.replace(step=s.step + 1), state)
  first = jnp.where((state.first_nonfinite[0] < 0) & ~finite,
                    jnp.stack([state.step.astype(jnp.float32), step_metrics["loss"],
                               step_metrics["grad_norm"]]), state.first_nonfinite)
  new_state = new_state.replace(
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32), first_nonfinite=first)
  return new_state, step_metrics


def eval_stats_step(variables, stats, batch, *, regressor):
  """Adds one batch's per-gene sums (over the padded head width) to `stats`."""
  y_hat = regressor.apply(variables, batch["x"], train=False)
  y = _pad_targets(batch["y"], regressor.num_targets)
  return metrics.accumulate(stats, y, y_hat, batch["weight"])


# ----------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------


class _Throughput:
  """Examples/s over training steps only: compile, evals and saves are excluded."""

  def __init__(self):
    self.start = time.perf_counter()
    self.paused = 0.0

  def pause(self, seconds: float):
    self.paused += seconds

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed = now - self.start - self.paused
    self.start, self.paused = now, 0.0
    return elapsed


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient norm."""


class Preempted(RuntimeError):
  """SIGTERM (the preemption signal) arrived; a checkpoint was saved first."""


class _PreemptionSignal:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested, self.signal_name = False, ""
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested, self.signal_name = True, signal.Signals(signum).name


# What a checkpoint's shapes and meaning depend on; a workdir is refused to a
# config that differs in any of these.
_FINGERPRINT_FIELDS = ("method", "model", "lsmtl.bottleneck", "lsmtl.negative_slope",
                       "optim.name", "optim.grad_clip_norm", "mesh.target_multiple",
                       "data.path", "data.synthetic", "seed")


def config_fingerprint(config, num_padded: int) -> dict[str, Any]:
  out = {"num_padded_targets": num_padded, "relation": config.lsmtl.lam > 0}
  for field in _FINGERPRINT_FIELDS:
    value = config
    for part in field.split("."):
      value = value[part]
    out[field] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return json.loads(json.dumps(out))


def _check_same_config(workdir: str, record: dict | None, fingerprint: dict) -> None:
  saved = (record or {}).get("fingerprint")
  if saved is None or saved == fingerprint:
    return
  diffs = [f"{k}: {saved.get(k)!r} there, {fingerprint.get(k)!r} now"
           for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
  raise ConfigError(f"{workdir}: holds checkpoints of a different config ({'; '.join(diffs)}); "
                    "use a new --workdir or the config it was started with")


def _is_writer() -> bool:
  return jax.process_index() == 0


def _summary_writer(workdir: str):
  if not _is_writer():
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _variables_of(state: TrainState):
  return {"params": state.params["regressor"], "batch_stats": state.batch_stats}


def _train_network(config, workdir: str, data: "Data") -> dict[str, Any]:
  dataset = data.train
  num_l, num_t = dataset.num_landmarks, dataset.num_targets
  mesh = parallel.make_mesh(config.mesh)
  placement = parallel.Placement(mesh)
  for name in ("batch_size", "eval_batch_size"):
    if config.train[name] % mesh.shape["data"]:
      raise parallel.MeshError(f"config: train.{name}={config.train[name]} is not divisible by "
                               f"the data axis ({mesh.shape['data']})")
  num_padded = parallel.padded_targets(num_t, config.mesh.target_multiple, mesh.shape["model"])
  regressor, relation = create_model(config, num_padded)
  order = loader.TrainOrder(dataset.split(config.data.train_split), config.train.batch_size,
                            config.seed)
  num_steps = (config.train.num_steps if config.train.num_steps > 0 else
               config.train.num_epochs * order.steps_per_epoch)
  init_key, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state, state_shardings = create_train_state(
      init_key, regressor, relation, num_l, num_padded, create_optimizer(config, num_steps),
      mesh, parallel.logical_rules(config.mesh))
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  logging.info("%s: %s parameters, %d steps of %d (%d per epoch), mesh %s, %d targets padded "
               "to %d", METHOD_NAMES[config.method], f"{num_params:,}", num_steps,
               config.train.batch_size, order.steps_per_epoch, dict(mesh.shape), num_t,
               num_padded)

  ckpts = Checkpoints(workdir)
  fingerprint = config_fingerprint(config, num_padded)
  loop = {"step": 0, "best_val_mae": math.inf, "best_step": -1, "evals_since_best": 0,
          "stopped_early": False, "train_seconds": 0.0, "timed_examples": 0,
          "timed_seconds": 0.0, "fingerprint": fingerprint}
  _check_same_config(workdir, ckpts.latest_record(), fingerprint)
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, loop = restored
    logging.info("Resumed from step %d in %s", loop["step"], workdir)

  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, regressor=regressor, relation=relation, config=config,
                        base_key=base_key),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  variables_shardings = _variables_of(state_shardings)
  stats_sharding = {k: NamedSharding(mesh, P("model")) for k in metrics.STAT_NAMES}
  stats_step = jax.jit(functools.partial(eval_stats_step, regressor=regressor),
                       in_shardings=(variables_shardings, stats_sharding, batch_sharding),
                       out_shardings=stats_sharding, donate_argnums=1)
  init_stats = jax.jit(lambda: metrics.zeros(num_padded), out_shardings=stats_sharding)

  def evaluate(split: str, variables, with_gene_stats=False):
    eval_set = data.eval_sets[split]
    summary, gene_stats = evaluation.evaluate(
        eval_set.dataset, eval_set.indices, config.train.eval_batch_size,
        functools.partial(stats_step, variables), init_stats, placement, config.data.prefetch)
    return (summary, gene_stats) if with_gene_stats else summary

  flops = perf.train_flops_per_example(config.model, num_l, num_t,
                                       config.lsmtl.bottleneck if relation else 0)
  peak = perf.measured_matmul_peak()
  logging.info("Model FLOPs per training example: %.3g; measured %s matmul peak: %.1f GFLOP/s "
               "per device", flops, jax.default_backend(), peak / 1e9)
  peak *= jax.device_count()
  writer = _summary_writer(workdir)
  session_start = time.perf_counter()
  train_seconds_before = loop["train_seconds"]

  def check_finite(step):
    """Stops before a save would record a run that went non-finite."""
    count = int(placement.fetch(state.nonfinite_steps))
    if count and config.train.nonfinite == "stop":
      bad_step, loss, grad_norm = placement.fetch(state.first_nonfinite).tolist()
      what = (f"training loss is {loss}" if not math.isfinite(loss)
              else f"gradient norm is {grad_norm}")
      raise NonFiniteError(
          f"step {int(bad_step) + 1}: {what}; stopped, the latest checkpoint in "
          f"{workdir}/checkpoints/latest is the last good one (train.nonfinite='skip' skips "
          "such steps instead)")
    if count > loop.get("nonfinite_steps", 0):
      logging.warning("Skipped %d non-finite steps so far (first at step %d)", count,
                      int(placement.fetch(state.first_nonfinite)[0]) + 1)
    loop["nonfinite_steps"] = count

  def save_latest(step):
    check_finite(step)
    loop["step"] = step
    loop["train_seconds"] = train_seconds_before + time.perf_counter() - session_start
    ckpts.save_latest(step, state, loop)

  start_step = int(loop["step"])
  preemption = _PreemptionSignal()
  try:
    if start_step < num_steps and not loop["stopped_early"]:
      batch_size = config.train.batch_size
      batches = loader.train_batches(dataset, order, start_step, num_steps, config.data.prefetch,
                                     placement.local_rows(batch_size))
      timer, window, window_steps, first_window = _Throughput(), None, 0, True
      for step in range(start_step, num_steps):
        state, step_metrics = step_fn(state, placement.put(next(batches), batch_size))
        window = step_metrics if window is None else jax.tree.map(jnp.add, window, step_metrics)
        window_steps += 1
        done = step + 1

        if done % config.train.log_every == 0 or done == num_steps:
          means = {k: float(v) / window_steps for k, v in placement.fetch(window).items()}
          seconds = timer.lap()
          rate = window_steps * batch_size / seconds
          if not first_window:  # the first window holds the compilation
            loop["timed_examples"] += window_steps * batch_size
            loop["timed_seconds"] += seconds
          first_window = False
          eta = (num_steps - done) * seconds / window_steps
          logging.info("step %d/%d loss %.5f (task %.5f rec %.5f) | %.0f examples/s, "
                       "MFU %.1f%% | ETA %.0fs", done, num_steps, means["loss"],
                       means["task_loss"], means["rec_loss"], rate, 100 * rate * flops / peak, eta)
          check_finite(done)
          if writer:
            for k, v in means.items():
              writer.add_scalar(f"train/{k}", v, done)
            writer.add_scalar("train/examples_per_sec", rate, done)
            writer.add_scalar("train/mfu", rate * flops / peak, done)
          window, window_steps = None, 0

        pause_start = time.perf_counter()
        if done % config.train.eval_every == 0 or done == num_steps:
          val = evaluate("val", _variables_of(state))
          improved = math.isfinite(val["mae_mean"]) and val["mae_mean"] < loop["best_val_mae"]
          if improved:
            loop.update(best_val_mae=val["mae_mean"], best_step=done, evals_since_best=0)
            ckpts.save_best(done, _variables_of(state), {"step": done, "val": val})
          else:
            loop["evals_since_best"] += 1
          logging.info("step %d val MAE %.5f CC %.5f%s", done, val["mae_mean"], val["cc_mean"],
                       " (best)" if improved else "")
          if writer:
            writer.add_scalar("val/mae", val["mae_mean"], done)
            writer.add_scalar("val/cc", val["cc_mean"], done)
          if loop["evals_since_best"] >= config.train.patience:
            loop["stopped_early"] = True
            logging.info("Early stop at step %d: no better val MAE in %d evaluations", done,
                         config.train.patience)
        if (done % config.train.checkpoint_every == 0 or done == num_steps
            or loop["stopped_early"]):
          save_latest(done)
        timer.pause(time.perf_counter() - pause_start)
        if loop["stopped_early"]:
          break
        if preemption.requested and done < num_steps:
          if loop["step"] != done:
            save_latest(done)
          ckpts.close()
          raise Preempted(f"stopped by {preemption.signal_name} after step {done}; checkpoint "
                          f"saved in {workdir}; run the same command again to resume")
  except BaseException:
    ckpts.wait()  # saves already under way hold good states: let them land
    raise

  if loop["best_step"] < 0:  # no finite validation MAE: the final state stands in
    ckpts.save_best(int(loop["step"]), _variables_of(state),
                    {"step": int(loop["step"]), "val": None})
  best = ckpts.restore_best(_variables_of(state))
  best_variables = best[0] if best is not None else _variables_of(state)
  final = {name: evaluate(name, best_variables, True) for name in ("val", "test")}
  splits = {name: summary for name, (summary, _) in final.items()}
  gene_stats = {name: stats for name, (_, stats) in final.items()}
  ckpts.close()
  if writer:
    writer.close()
  rate = loop["timed_examples"] / loop["timed_seconds"] if loop["timed_seconds"] else 0.0
  return {"steps": int(loop["step"]), "train_seconds": loop["train_seconds"],
          "examples_per_sec": rate, "splits": splits, "state": state,
          "gene_stats": gene_stats,
          "extra": {"best_step": loop["best_step"], "stopped_early": loop["stopped_early"],
                    "nonfinite_steps": int(loop.get("nonfinite_steps", 0)),
                    "flops_per_example": flops, "mfu": rate * flops / peak,
                    "matmul_peak_flops": peak, "num_parameters": num_params,
                    "mesh": dict(mesh.shape), "padded_targets": num_padded}}


def _evaluate_linear(config, data: "Data", weights, bias):
  """({split: summary}, {split: per-gene sums}) of y_hat = x W + b."""
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))
  placement = parallel.Placement(mesh)
  w, b = jax.device_put((jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)),
                        parallel.replicated(mesh))
  stats_step = jax.jit(lambda stats, batch: metrics.accumulate(
      stats, batch["y"], batch["x"] @ w + b, batch["weight"]), donate_argnums=0)
  init_stats = jax.jit(lambda: metrics.zeros(data.train.num_targets),
                       out_shardings=parallel.replicated(mesh))
  eval_batch = math.lcm(config.train.eval_batch_size, mesh.shape["data"])
  splits, stats = {}, {}
  for name, eval_set in data.eval_sets.items():
    splits[name], stats[name] = evaluation.evaluate(
        eval_set.dataset, eval_set.indices, eval_batch, stats_step, init_stats, placement,
        config.data.prefetch)
  return splits, stats


def _fit_linear(config, data: "Data") -> dict[str, Any]:
  """LSR (ridge, closed form) or LSR-L1 (FISTA over an alpha path, the alpha
  with the best validation MAE kept); both from the same float64 moments."""
  dataset = data.train
  start = time.perf_counter()
  mean_x, mean_y, cxx, cxy = linear.moments(dataset, config.data.train_split,
                                            config.train.eval_batch_size, config.data.prefetch)
  extra = {}
  if config.method == "lsr":
    weights = np.linalg.solve(cxx + config.lsr.ridge * np.eye(dataset.num_landmarks), cxy)
    bias = mean_y - mean_x @ weights
    seconds = time.perf_counter() - start
    splits, stats = _evaluate_linear(config, data, weights, bias)
  else:
    cfg = config.lsr_l1
    path = lasso.path(mean_x, mean_y, cxx, cxy, cfg.alphas, cfg.max_iters, cfg.tol,
                      config.lsr.ridge)
    seconds = time.perf_counter() - start
    best = None
    selection = []
    for alpha, weights, bias, iters in path:
      splits, stats = _evaluate_linear(config, data, weights, bias)
      nonzero = float(np.mean(weights != 0))
      selection.append({"alpha": alpha, "val_mae": splits["val"]["mae_mean"],
                        "iterations": iters, "nonzero_fraction": nonzero})
      logging.info("LSR-L1 alpha %g: %d iterations, %.1f%% weights nonzero, val MAE %.5f",
                   alpha, iters, 100 * nonzero, splits["val"]["mae_mean"])
      if best is None or splits["val"]["mae_mean"] < best[0]["val"]["mae_mean"]:
        best = (splits, stats, alpha, weights)
    splits, stats, alpha, weights = best
    extra = {"alpha": alpha, "selection": selection}
  n_train = len(dataset.split(config.data.train_split))
  return {"steps": 1, "train_seconds": seconds, "examples_per_sec": n_train / seconds,
          "splits": splits, "gene_stats": stats,
          "extra": {"num_parameters": int(weights.size + dataset.num_targets), **extra}}


def _fit_knn(config, data: "Data") -> dict[str, Any]:
  """KNN-GE: one exact neighbour search per split serves every k; the k with
  the best validation MAE is reported on both splits."""
  cfg = config.knn
  start = time.perf_counter()
  train_x, train_y = knn.load_split(data.train, config.data.train_split,
                                    config.train.eval_batch_size, config.data.prefetch)
  search = knn.Neighbours(train_x, cfg.train_block)
  train_y = jnp.asarray(train_y)
  seconds = time.perf_counter() - start
  ks = tuple(min(int(k), search.num_train) for k in cfg.ks)
  per_k = {name: knn.split_statistics(s.dataset, s.indices, search, train_y, ks,
                                      cfg.query_block, config.data.prefetch)
           for name, s in data.eval_sets.items()}
  val = [evaluation.summarize_split(data.eval_sets["val"].dataset, s) for s in per_k["val"]]
  best = int(np.argmin([v["mae_mean"] for v in val]))
  for k, v in zip(ks, val):
    logging.info("KNN-GE k=%d: val MAE %.5f", k, v["mae_mean"])
  splits = {name: evaluation.summarize_split(data.eval_sets[name].dataset, per_k[name][best])
            for name in data.eval_sets}
  stats = {name: per_k[name][best] for name in data.eval_sets}
  return {"steps": 1, "train_seconds": seconds,
          "examples_per_sec": search.num_train / max(seconds, 1e-9), "splits": splits,
          "gene_stats": stats,
          "extra": {"num_parameters": 0, "k": ks[best],
                    "selection": [{"k": k, "val_mae": v["mae_mean"]} for k, v in zip(ks, val)]}}


def _check_network_memory(config, data: "Data") -> dict:
  """Stops a network run whose estimated training memory cannot fit (Deep-AMTL's
  T x T matrix at full size) before anything is allocated."""
  num_l, num_t = data.train.num_landmarks, data.train.num_targets
  mesh_model = parallel.mesh_shape(config.mesh, jax.device_count())[1]
  num_padded = parallel.padded_targets(num_t, config.mesh.target_multiple, mesh_model)
  regressor, relation = create_model(config, num_padded)
  init = lambda: init_variables(jax.random.PRNGKey(0), regressor, relation, num_l,
                                num_padded)[0]

  def plan():
    try:  # compiling on shapes allocates nothing; XLA counts what the step really holds
      return compiled_step_memory(config, num_l, num_t)["peak"]
    except Exception as e:  # pylint: disable=broad-except  (a backend without the analysis)
      logging.warning("no compiled memory plan (%s); estimating by arithmetic", e)
      return None

  return mtl.check_memory(config, init, num_padded,
                          models.trunk_output_width(config.model, num_l),
                          METHOD_NAMES[config.method], plan=plan)


GENES_NAME = "genes_mae.npz"


def _write_genes_mae(workdir: str, gene_stats: dict) -> None:
  """WORKDIR/genes_mae.npz: per-gene MAE (standardized units) of val and test,
  from the final evaluation's statistics, for the gene-wise comparisons of
  experiments.py."""
  arrays = {f"{name}_mae": metrics.per_gene(stats)["mae"] for name, stats in gene_stats.items()}
  tmp = os.path.join(workdir, f".{GENES_NAME}.tmp-{os.getpid()}.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, os.path.join(workdir, GENES_NAME))


def _run_one(config, workdir: str, data: "Data") -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  if _is_writer():
    results_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
  logging.info("Running %s in %s", METHOD_NAMES[config.method], workdir)
  if config.method in NETWORK_METHODS:
    memory = _check_network_memory(config, data)
    run = _train_network(config, workdir, data)
    run["extra"]["estimated_train_bytes"] = memory["bytes"]
  elif config.method == "knn":
    run = _fit_knn(config, data)
  else:
    run = _fit_linear(config, data)
  gene_stats = run.pop("gene_stats")
  state = run.pop("state", None)
  extra = run.pop("extra")
  results = {"method": config.method, "config": config.to_dict(), **run, **extra}
  if _is_writer():
    results_lib.write_results(workdir, method=config.method, config=config.to_dict(),
                              steps=run["steps"], train_seconds=run["train_seconds"],
                              examples_per_sec=run["examples_per_sec"],
                              splits=run["splits"], extra=extra)
    _write_genes_mae(workdir, gene_stats)
  if state is not None:
    results["state"] = state
    if config.report and jax.process_count() > 1:
      # Restoring for the report takes every process; run it afterwards instead.
      logging.info("Write the per-gene report with: python -m lsmtl_jax.report --workdir=%s",
                   workdir)
    elif config.report:
      from lsmtl_jax import inference, report  # pylint: disable=g-import-not-at-top  (cycle)
      path = report.write_report(workdir, inference.load_run(workdir, jax.local_devices()))
      logging.info("Per-gene report: %s", os.path.join(path, "report.html"))
  test = run["splits"]["test"]
  logging.info("%s test MAE %.4f ± %.4f, CC %.4f ± %.4f", METHOD_NAMES[config.method],
               test["mae_mean"], test["mae_std"], test["cc_mean"], test["cc_std"])
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs config.method (and config.compare_with) on the configured dataset.

  Returns the main method's results: the content of workdir/results.json, and
  for network methods the final training state under "state".
  """
  config = resolve_method(config)
  validate_config(config)
  data = load_data(config)
  main = _run_one(config, workdir, data)
  if not config.compare_with:
    return main
  rows = [main]
  for other in config.compare_with:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.method, sub.compare_with = other, ()
    sub = resolve_method(sub)
    rows.append(_run_one(sub, os.path.join(workdir, "compare", other), data))
  table = results_lib.format_table([dict(r, method=METHOD_NAMES[r["method"]]) for r in rows])
  if _is_writer():
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(table + "\n")
    test = data.eval_sets["test"]
    print(f"\nStandardized units, {test.dataset.num_targets} targets, "
          f"{len(test.indices)} test profiles:\n{table}\n", flush=True)
  return main
