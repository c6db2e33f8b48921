"""Training and evaluation: data -> model -> loss -> step -> loop -> results.json.

`train_and_evaluate(config, workdir)` is the whole job; main.py and notebooks
call it. Starting it again on the same workdir resumes from the latest
checkpoint, and because batches, dropout and task masks are all derived from
(seed, step), the resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsmtl_jax import evaluation
from lsmtl_jax import metrics
from lsmtl_jax import models
from lsmtl_jax import objectives
from lsmtl_jax import perf
from lsmtl_jax import results as results_lib
from lsmtl_jax.checkpoints import Checkpoints
from lsmtl_jax.data import loader
from lsmtl_jax.data import store
from lsmtl_jax.data import synthetic
from lsmtl_jax.methods import linear

METHOD_NAMES = {"deep_lsmtl": "Deep-LSMTL", "densenet": "DenseNet", "dgex": "D-GEX",
                "lsr": "LSR"}
NETWORK_METHODS = ("deep_lsmtl", "densenet", "dgex")


class ConfigError(ValueError):
  """A config value out of range; the message names the field."""


# ----------------------------------------------------------------------------
# Config and data
# ----------------------------------------------------------------------------


def resolve_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the chosen method's fixed settings applied."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.method == "densenet":
    config.model.trunk, config.lsmtl.lam = "densenet", 0.0
  elif config.method == "dgex":
    config.model.trunk, config.model.activation, config.lsmtl.lam = "mlp", "tanh", 0.0
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
  need(config.train.num_steps > 0 or config.train.num_epochs > 0,
       "train.num_steps or train.num_epochs must be positive")
  need(config.lsr.ridge >= 0, f"lsr.ridge must be >= 0, got {config.lsr.ridge}")
  for other in config.compare_with:
    need(other in METHOD_NAMES, f"compare_with names unknown method {other!r}")


def load_dataset(config: ml_collections.ConfigDict) -> store.Dataset:
  if config.data.synthetic.enabled:
    fields = dict(config.data.synthetic.to_dict())
    fields.pop("enabled")
    return synthetic.cached(synthetic.SyntheticSpec(**fields), config.data.cache_dir)
  if not config.data.path:
    raise store.DatasetError(
        "config.data.path is empty: prepare a dataset first (python -m lsmtl_jax.prepare "
        "--config=configs/prepare/geo.py ...) and pass --config.data.path=DIR")
  if not os.path.exists(config.data.path):
    raise store.DatasetError(
        f"{config.data.path}: prepared dataset not found; create it with python -m "
        "lsmtl_jax.prepare (see README, 'Real data') or point --config.data.path at it")
  return store.open_dataset(config.data.path)


# ----------------------------------------------------------------------------
# Model, optimizer and state
# ----------------------------------------------------------------------------


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_model(config, num_targets: int):
  """(regressor, relation); relation is None when lam = 0 (no bottleneck at all)."""
  dtype = jnp.dtype(config.model.dtype)
  regressor = models.Regressor(trunk=models.build_trunk(config.model, dtype),
                               num_targets=num_targets, dtype=dtype)
  relation = None
  if config.lsmtl.lam > 0:
    relation = models.TaskRelation(num_targets=num_targets, bottleneck=config.lsmtl.bottleneck,
                                   negative_slope=config.lsmtl.negative_slope, dtype=dtype)
  return regressor, relation


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
    params["relation"] = relation.init(rel_key, jnp.zeros((1, num_targets)))["params"]
  return params, variables.get("batch_stats", {})


def create_train_state(key, config, regressor, relation, num_landmarks, num_targets,
                       tx) -> TrainState:
  params, batch_stats = jax.jit(functools.partial(
      init_variables, regressor=regressor, relation=relation, num_landmarks=num_landmarks,
      num_targets=num_targets))(key)
  return TrainState.create(apply_fn=regressor.apply, params=nn.meta.unbox(params),
                           batch_stats=nn.meta.unbox(batch_stats), tx=tx)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def loss_and_gradients(state: TrainState, batch, *, regressor, relation, config, base_key):
  """(gradients, new batch statistics, step metrics). Dropout and task-mask keys
  derive from (seed, step), so a resumed run draws exactly what it would have."""
  step_key = jax.random.fold_in(base_key, state.step)
  dropout_key, mask_key = jax.random.split(step_key)
  lsmtl = config.lsmtl

  def loss_fn(params):
    y_hat, updates = regressor.apply(
        {"params": params["regressor"], "batch_stats": state.batch_stats}, batch["x"],
        train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    l_task = objectives.task_loss(batch["y"], y_hat, config.loss.task)
    l_rec = jnp.zeros((), jnp.float32)
    if relation is not None:
      mask = objectives.sample_task_mask(mask_key, y_hat.shape, lsmtl.mask_rate,
                                         per_batch=lsmtl.mask_per == "batch")
      g = lambda u: relation.apply({"params": params["relation"]}, u)
      l_rec = objectives.reconstruction_loss(y_hat, mask, g, lsmtl.stop_gradient_target)
    total = l_task + lsmtl.lam * l_rec
    return total, (updates["batch_stats"], l_task, l_rec)

  (loss, (batch_stats, l_task, l_rec)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  step_metrics = {"loss": loss, "task_loss": l_task, "rec_loss": l_rec,
                  "grad_norm": optax.tree.norm(grads)}
  return grads, batch_stats, step_metrics


def train_step(state: TrainState, batch, **kw):
  """One optimizer update: (state, batch) -> (state, metrics)."""
  grads, batch_stats, step_metrics = loss_and_gradients(state, batch, **kw)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), step_metrics


def eval_stats_step(variables, stats, batch, *, regressor):
  y_hat = regressor.apply(variables, batch["x"], train=False)
  return metrics.accumulate(stats, batch["y"], y_hat, batch["weight"])


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


def _is_writer() -> bool:
  return jax.process_index() == 0


def _summary_writer(workdir: str):
  if not _is_writer():
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _evaluate_variables(dataset, split, config, variables, stats_step):
  return evaluation.evaluate(dataset, split, config.train.eval_batch_size,
                             functools.partial(stats_step, variables), config.data.prefetch)


def _train_network(config, workdir: str, dataset: store.Dataset) -> dict[str, Any]:
  num_l, num_t = dataset.num_landmarks, dataset.num_targets
  regressor, relation = create_model(config, num_t)
  order = loader.TrainOrder(dataset.split(config.data.train_split), config.train.batch_size,
                            config.seed)
  num_steps = (config.train.num_steps if config.train.num_steps > 0 else
               config.train.num_epochs * order.steps_per_epoch)
  init_key, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state = create_train_state(init_key, config, regressor, relation, num_l, num_t,
                             create_optimizer(config, num_steps))
  logging.info("%s: %s parameters, %d steps of %d (%d per epoch)", METHOD_NAMES[config.method],
               f"{sum(x.size for x in jax.tree.leaves(state.params)):,}", num_steps,
               config.train.batch_size, order.steps_per_epoch)

  ckpts = Checkpoints(workdir)
  loop = {"step": 0, "best_val_mae": math.inf, "best_step": -1, "evals_since_best": 0,
          "stopped_early": False, "train_seconds": 0.0, "timed_examples": 0,
          "timed_seconds": 0.0}
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, loop = restored
    logging.info("Resumed from step %d in %s", loop["step"], workdir)

  step_fn = jax.jit(functools.partial(train_step, regressor=regressor, relation=relation,
                                      config=config, base_key=base_key), donate_argnums=0)
  stats_step = jax.jit(functools.partial(eval_stats_step, regressor=regressor),
                       donate_argnums=1)
  variables_of = lambda s: {"params": s.params["regressor"], "batch_stats": s.batch_stats}

  flops = perf.train_flops_per_example(config.model, num_l, num_t,
                                       config.lsmtl.bottleneck if relation else 0)
  peak = perf.measured_matmul_peak()
  logging.info("Model FLOPs per training example: %.3g; measured %s matmul peak: %.1f GFLOP/s",
               flops, jax.default_backend(), peak / 1e9)
  writer = _summary_writer(workdir)
  session_start = time.perf_counter()
  train_seconds_before = loop["train_seconds"]

  def save_latest(step):
    loop["step"] = step
    loop["train_seconds"] = train_seconds_before + time.perf_counter() - session_start
    ckpts.save_latest(step, state, loop)

  start_step = int(loop["step"])
  if start_step < num_steps and not loop["stopped_early"]:
    batches = loader.train_batches(dataset, order, start_step, num_steps, config.data.prefetch)
    timer, window, window_steps, first_window = _Throughput(), None, 0, True
    for step in range(start_step, num_steps):
      state, step_metrics = step_fn(state, next(batches))
      window = step_metrics if window is None else jax.tree.map(jnp.add, window, step_metrics)
      window_steps += 1
      done = step + 1

      if done % config.train.log_every == 0 or done == num_steps:
        means = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
        seconds = timer.lap()
        rate = window_steps * config.train.batch_size / seconds
        if not first_window:  # the first window holds the compilation
          loop["timed_examples"] += window_steps * config.train.batch_size
          loop["timed_seconds"] += seconds
        first_window = False
        eta = (num_steps - done) * seconds / window_steps
        logging.info("step %d/%d loss %.5f (task %.5f rec %.5f) | %.0f examples/s, "
                     "MFU %.1f%% | ETA %.0fs", done, num_steps, means["loss"],
                     means["task_loss"], means["rec_loss"], rate, 100 * rate * flops / peak, eta)
        if not math.isfinite(means["loss"]):
          raise FloatingPointError(f"step {done}: training loss is {means['loss']}")
        if writer:
          for k, v in means.items():
            writer.add_scalar(f"train/{k}", v, done)
          writer.add_scalar("train/examples_per_sec", rate, done)
          writer.add_scalar("train/mfu", rate * flops / peak, done)
        window, window_steps = None, 0

      pause_start = time.perf_counter()
      if done % config.train.eval_every == 0 or done == num_steps:
        val, _ = _evaluate_variables(dataset, config.data.val_split, config, variables_of(state),
                                     stats_step)
        improved = val["mae_mean"] < loop["best_val_mae"]
        if improved:
          loop.update(best_val_mae=val["mae_mean"], best_step=done, evals_since_best=0)
          ckpts.save_best(done, variables_of(state), {"step": done, "val": val})
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
  final_step = int(loop["step"])

  best = ckpts.restore_best(variables_of(state))
  best_variables = best[0] if best is not None else variables_of(state)
  splits = {}
  for name, split in (("val", config.data.val_split), ("test", config.data.test_split)):
    splits[name], _ = _evaluate_variables(dataset, split, config, best_variables, stats_step)
  ckpts.close()
  if writer:
    writer.close()
  rate = loop["timed_examples"] / loop["timed_seconds"] if loop["timed_seconds"] else 0.0
  return {"steps": final_step, "train_seconds": loop["train_seconds"],
          "examples_per_sec": rate, "splits": splits,
          "extra": {"best_step": loop["best_step"], "stopped_early": loop["stopped_early"],
                    "flops_per_example": flops, "mfu": rate * flops / peak,
                    "matmul_peak_flops": peak,
                    "num_parameters": int(sum(x.size for x in jax.tree.leaves(state.params)))}}


def _fit_lsr(config, dataset: store.Dataset) -> dict[str, Any]:
  start = time.perf_counter()
  weights, bias = linear.fit(dataset, config.data.train_split, config.train.eval_batch_size,
                             config.lsr.ridge, config.data.prefetch)
  seconds = time.perf_counter() - start
  w, b = jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)
  stats_step = evaluation.make_stats_step(lambda x: x @ w + b)
  splits = {}
  for name, split in (("val", config.data.val_split), ("test", config.data.test_split)):
    splits[name], _ = evaluation.evaluate(dataset, split, config.train.eval_batch_size,
                                          stats_step, config.data.prefetch)
  n_train = len(dataset.split(config.data.train_split))
  return {"steps": 1, "train_seconds": seconds, "examples_per_sec": n_train / seconds,
          "splits": splits, "extra": {"num_parameters": int(w.size + b.size)}}


def _run_one(config, workdir: str, dataset: store.Dataset) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  if _is_writer():
    results_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
  logging.info("Running %s in %s", METHOD_NAMES[config.method], workdir)
  if config.method in NETWORK_METHODS:
    run = _train_network(config, workdir, dataset)
  else:
    run = _fit_lsr(config, dataset)
  results = {"method": config.method, "config": config.to_dict(), **run}
  if _is_writer():
    results_lib.write_results(workdir, method=config.method, config=config.to_dict(),
                              steps=run["steps"], train_seconds=run["train_seconds"],
                              examples_per_sec=run["examples_per_sec"],
                              splits=run["splits"], extra=run["extra"])
  test = run["splits"]["test"]
  logging.info("%s test MAE %.4f ± %.4f, CC %.4f ± %.4f", METHOD_NAMES[config.method],
               test["mae_mean"], test["mae_std"], test["cc_mean"], test["cc_std"])
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs config.method (and config.compare_with) on the configured dataset.

  Returns the main method's results (the content of workdir/results.json).
  """
  config = resolve_method(config)
  validate_config(config)
  dataset = load_dataset(config)
  main = _run_one(config, workdir, dataset)
  if not config.compare_with:
    return main
  rows = [main]
  for other in config.compare_with:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.method, sub.compare_with = other, ()
    sub = resolve_method(sub)
    rows.append(_run_one(sub, os.path.join(workdir, "compare", other), dataset))
  table = results_lib.format_table([dict(r, method=METHOD_NAMES[r["method"]]) for r in rows])
  if _is_writer():
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(table + "\n")
    print(f"\nStandardized units, {dataset.num_targets} targets, "
          f"{len(dataset.split(config.data.test_split))} test profiles:\n{table}\n", flush=True)
  return main
