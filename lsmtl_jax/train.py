"""The training loop: config -> data -> network -> steps -> evaluations -> results.json.

`train_and_evaluate(config, workdir)` is the whole job; main.py, the
experiment runner and notebooks call it, and no module imports this one.
Starting it again on the same workdir resumes from the latest checkpoint, and
because batches, dropout and task masks are all derived from (seed, step), the
resumed run ends where an uninterrupted one would.

What the loop runs is the method's record (methods/): a network method is
built by build.py and stepped here; a closed-form or neighbour method fits
itself (`method.fit`).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from lsmtl_jax import blending
from lsmtl_jax import build
from lsmtl_jax import checkpoints
from lsmtl_jax import config_lib
from lsmtl_jax import evaluation
from lsmtl_jax import inference
from lsmtl_jax import lam_search
from lsmtl_jax import memory
from lsmtl_jax import metrics
from lsmtl_jax import parallel
from lsmtl_jax import perf
from lsmtl_jax import report
from lsmtl_jax import resident
from lsmtl_jax import results as results_lib
from lsmtl_jax import steps
from lsmtl_jax import workdir_lock
from lsmtl_jax.data import loader
from lsmtl_jax.data import sources
from lsmtl_jax.methods import deep_lsmtl
from lsmtl_jax.methods import linear
from lsmtl_jax.methods import registry

# Errors a caller reports as one line (main.py maps each to an exit code).
ConfigError = config_lib.ConfigError
MemoryGuardError = memory.MemoryGuardError
WorkdirError = results_lib.WorkdirError


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


class _ScalarLog:
  """The run's scalars, written by process 0 as JSON lines (metrics.jsonl, what
  report and the notebook read) and as TensorBoard events."""

  def __init__(self, workdir: str):
    self.lines = self.events = None
    if _is_writer():
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.events = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.lines = results_lib.ScalarLines(workdir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self.lines is None:
      return
    self.lines.write(step, scalars)
    for k, v in scalars.items():
      self.events.add_scalar(k, v, step)

  def close(self) -> None:
    if self.lines is not None:
      self.lines.close()
      self.events.close()


def _with_lsr_head(config, network, state, dataset, rows):
  """model.head_init='lsr': the head starts from LSR's ridge solution (lsr.ridge)
  on the rows training uses, so the untrained network predicts what LSR does."""
  start = time.perf_counter()
  weights, bias = linear.fit(dataset, rows, config.train.eval_batch_size, config.lsr.ridge,
                             config.data.prefetch)
  logging.info("Head initialized from LSR (ridge %g, %d training rows) in %.1fs",
               config.lsr.ridge, len(rows), time.perf_counter() - start)
  return build.with_lsr_head(state, network, weights, bias)


def _train_network(config, workdir: str, data: sources.Data, network: build.Network,
                   feed: str) -> dict[str, Any]:
  dataset = data.train
  num_l, num_t = dataset.num_landmarks, dataset.num_targets
  mesh = network.mesh
  placement = parallel.Placement(mesh)
  order = loader.TrainOrder(data.train_indices, config.train.batch_size, config.seed)
  num_steps = (config.train.num_steps if config.train.num_steps > 0 else
               config.train.num_epochs * order.steps_per_epoch)
  init_key, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state, state_shardings = network.create_state(init_key,
                                                build.create_optimizer(config, num_steps))
  num_params_padded = int(sum(x.size for x in jax.tree.leaves(state.params)))
  num_params = network.num_parameters()
  logging.info("%s: %s parameters (%s with the head padded), %d steps of %d (%d per epoch), "
               "mesh %s, %d targets padded to %d", network.method.label, f"{num_params:,}",
               f"{num_params_padded:,}", num_steps, config.train.batch_size,
               order.steps_per_epoch, dict(mesh.shape), num_t, network.num_padded)

  ckpts = checkpoints.Checkpoints(workdir)
  fingerprint = config_lib.fingerprint(config, network.num_padded, list(network.extras))
  loop = {"step": 0, "best_val_mae": math.inf, "best_step": -1, "evals_since_best": 0,
          "stopped_early": False, "train_seconds": 0.0, "timed_examples": 0,
          "timed_seconds": 0.0, "fingerprint": fingerprint}
  record = ckpts.latest_record()  # the fingerprint was checked before anything was written
  if config.model.head_init == "lsr" and record is None:  # a resumed run restores over it
    state = _with_lsr_head(config, network, state, data.train, order.indices)
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, loop = restored
    logging.info("Resumed from step %d in %s", loop["step"], workdir)

  step_fn = network.train_step(state_shardings, base_key)
  stats_step, init_stats = network.eval_step(steps.regressor_variables(state_shardings))

  def evaluate(split: str, variables, with_gene_stats=False, split_step=None):
    eval_set = data.eval_sets[split]
    summary, gene_stats = evaluation.evaluate(
        eval_set.dataset, eval_set.indices, config.train.eval_batch_size,
        split_step or functools.partial(stats_step, variables), init_stats, placement,
        config.data.prefetch)
    return (summary, gene_stats) if with_gene_stats else summary

  flops = perf.train_flops_per_example(config.model, num_l, num_t,
                                       config.lsmtl.bottleneck if network.extras.get(
                                           "task_relation") else 0)
  # Many short runs (a tuning study) skip the ~3 s measurement: no MFU then.
  peak = perf.measured_matmul_peak() if config.train.measure_peak else math.nan
  logging.info("Model FLOPs per training example: %.3g; measured %s matmul peak: %.1f GFLOP/s "
               "per device", flops, jax.default_backend(), peak / 1e9)
  peak *= jax.device_count()
  scalars = _ScalarLog(workdir)
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
      batches = resident.train_batches(feed, dataset, order, start_step, num_steps, mesh,
                                       config.data.prefetch)
      timer, window, window_steps, timed_steps = _Throughput(), None, 0, 0
      for step in range(start_step, num_steps):
        state, step_metrics = step_fn(state, next(batches))
        window = step_metrics if window is None else jax.tree.map(jnp.add, window, step_metrics)
        window_steps += 1
        done = step + 1
        if step == start_step:
          # The first step carries the compilation: time from its end, so even
          # a run shorter than one log window reports its training rate.
          jax.block_until_ready(step_metrics)
          timer.lap()
        else:
          timed_steps += 1

        if done % config.train.log_every == 0 or done == num_steps:
          means = {k: float(v) / window_steps for k, v in placement.fetch(window).items()}
          seconds = timer.lap()
          rate = timed_steps * batch_size / seconds if timed_steps else float("nan")
          if timed_steps:
            loop["timed_examples"] += timed_steps * batch_size
            loop["timed_seconds"] += seconds
          eta = (num_steps - done) * seconds / max(timed_steps, 1)
          second = "  ".join(f"{k} {v:.5f}" for k, v in means.items()
                             if k not in ("loss", "task_loss", "grad_norm"))
          logging.info("step %d/%d loss %.5f (task %.5f %s) | %.0f examples/s, MFU %.1f%% | "
                       "ETA %.0fs", done, num_steps, means["loss"], means["task_loss"], second,
                       rate, 100 * rate * flops / peak, eta)
          check_finite(done)
          row = {f"train/{k}": v for k, v in means.items()}
          if timed_steps:
            row.update({"train/examples_per_sec": rate, "train/mfu": rate * flops / peak})
          scalars.write(done, row)
          window, window_steps, timed_steps = None, 0, 0

        pause_start = time.perf_counter()
        if done % config.train.eval_every == 0 or done == num_steps:
          val = evaluate("val", steps.regressor_variables(state))
          improved = math.isfinite(val["mae_mean"]) and val["mae_mean"] < loop["best_val_mae"]
          if improved:
            loop.update(best_val_mae=val["mae_mean"], best_step=done, evals_since_best=0)
            ckpts.save_best(done, steps.regressor_variables(state), {"step": done, "val": val})
          else:
            loop["evals_since_best"] += 1
          logging.info("step %d val MAE %.5f CC %.5f%s", done, val["mae_mean"], val["cc_mean"],
                       " (best)" if improved else "")
          scalars.write(done, {"val/mae": val["mae_mean"], "val/cc": val["cc_mean"]})
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
    scalars.close()
    raise

  if loop["best_step"] < 0:  # no finite validation MAE: the final state stands in
    ckpts.save_best(int(loop["step"]), steps.regressor_variables(state),
                    {"step": int(loop["step"]), "val": None})
  best = ckpts.restore_best(steps.regressor_variables(state))
  best_variables = best[0] if best is not None else steps.regressor_variables(state)
  final_step, blend_record = None, None
  if blending.enabled(config, network):  # w chosen on validation, then every split
    blended = blending.stats_step(network, config,
                                    state.params[deep_lsmtl.TASK_RELATION])
    weight, blend_record = blending.choose(
        config.lsmtl.test_blend_weights,
        lambda w: evaluate("val", None, split_step=blended(best_variables, w))["mae_mean"])
    final_step = blended(best_variables, weight)
    logging.info("test_blend: w = %g (val MAE %s)", weight, blend_record["val_mae"])
  final = {name: evaluate(name, best_variables, True, final_step) for name in data.eval_sets}
  splits = {name: summary for name, (summary, _) in final.items()}
  gene_stats = {name: stats for name, (_, stats) in final.items()}
  ckpts.close()
  scalars.close()
  rate = loop["timed_examples"] / loop["timed_seconds"] if loop["timed_seconds"] else 0.0
  return {"steps": int(loop["step"]), "train_seconds": loop["train_seconds"],
          "examples_per_sec": rate, "splits": splits, "state": state,
          "gene_stats": gene_stats,
          "extra": {"best_step": loop["best_step"], "stopped_early": loop["stopped_early"],
                    "nonfinite_steps": int(loop.get("nonfinite_steps", 0)),
                    "flops_per_example": flops,
                    "mfu": rate * flops / peak if math.isfinite(peak) else None,
                    "matmul_peak_flops": peak if math.isfinite(peak) else None,
                    "num_parameters": num_params,
                    "num_parameters_padded": num_params_padded,
                    "mesh": dict(mesh.shape), "padded_targets": network.num_padded,
                    "placement": feed,
                    **({"test_blend": blend_record} if blend_record else {})}}


def _preflight(config, workdir: str, data: sources.Data) -> dict[str, Any]:
  """Every check that can refuse this run, before anything is written to its
  workdir: the mesh against the devices and batch sizes, the checkpoints a
  workdir already holds (same config), the memory guard. Returns the network
  (None for a method that fits in closed form), where its training batches come
  from (resident.choose) and its memory estimate, the resident matrix included."""
  method = registry.get(config.method)
  if not method.is_network:
    return {"network": None, "estimate": None}
  network = build.build_network(config, data.train.num_landmarks, data.train.num_targets)
  mesh = network.mesh
  for name in ("batch_size", "eval_batch_size"):
    if config.train[name] % mesh.shape["data"]:
      raise parallel.MeshError(f"config: train.{name}={config.train[name]} is not divisible by "
                               f"the data axis ({mesh.shape['data']})")
  config_lib.check_same_config(
      workdir, checkpoints.latest_record(workdir),
      config_lib.fingerprint(config, network.num_padded, list(network.extras)))
  matrix = resident.bytes_per_device(len(data.train_indices),
                                     data.train.num_landmarks + data.train.num_targets,
                                     mesh.shape["data"])
  feed, why = resident.choose(config.data.placement, matrix, memory.device_memory_bytes(config),
                              jax.default_backend(), jax.process_count())
  logging.info("Training batches from the %s: %s", feed, why)
  estimate = memory.check_memory(network, resident_bytes=matrix if feed == "device" else 0)
  return {"network": network, "feed": feed, "estimate": estimate}


def _run_one(config, workdir: str, data: sources.Data, checked: dict[str, Any]) -> dict[str, Any]:
  method = registry.get(config.method)
  try:
    os.makedirs(workdir, exist_ok=True)
    if _is_writer():
      results_lib.write_json_atomic(os.path.join(workdir, results_lib.CONFIG_NAME),
                                    config.to_dict())
  except OSError as e:
    raise results_lib.WorkdirError(f"{workdir}: cannot write: {e.strerror or e}") from None
  logging.info("Running %s in %s", method.label, workdir)
  if method.is_network:
    run = _train_network(config, workdir, data, checked["network"], checked["feed"])
    run["extra"]["estimated_train_bytes"] = checked["estimate"]["bytes"]
  else:
    run = method.fit(config, data)
  gene_stats = run.pop("gene_stats")
  state = run.pop("state", None)
  extra = run.pop("extra")
  results = {"method": config.method, "config": config.to_dict(), **run, **extra}
  if _is_writer():
    results_lib.write_results(workdir, method=config.method, config=config.to_dict(),
                              steps=run["steps"], train_seconds=run["train_seconds"],
                              examples_per_sec=run["examples_per_sec"],
                              splits=run["splits"], extra=extra)
    results_lib.write_genes_mae(
        workdir, {name: metrics.per_gene(stats)["mae"] for name, stats in gene_stats.items()})
    results_lib.write_gene_stats(workdir, gene_stats)
  if state is not None:
    results["state"] = state
    if config.report and jax.process_count() > 1:
      # Restoring for the report takes every process; run it afterwards instead.
      logging.info("Write the per-gene report with: python -m lsmtl_jax.report --workdir=%s",
                   workdir)
    elif config.report and "test" in run["splits"]:
      path = report.write_report(workdir, inference.load_run(workdir, jax.local_devices()))
      logging.info("Per-gene report: %s", os.path.join(path, "report.html"))
  for name, split in run["splits"].items():
    logging.info("%s %s MAE %.4f ± %.4f, CC %.4f ± %.4f", method.label, name,
                 split["mae_mean"], split["mae_std"], split["cc_mean"], split["cc_std"])
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs config.method (and config.compare_with) on the configured dataset,
  holding the workdir's lock throughout (lsmtl_jax/workdir_lock.py: each
  process of a multi-process job its own file); a workdir another run holds
  raises workdir_lock.LockError before anything is written."""
  results_lib.check_workdir(workdir)
  with workdir_lock.hold(workdir, jax.process_index()):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs config.method (and config.compare_with) on the configured dataset;
  with lsmtl.lam = 'auto', one run per lam candidate (lam_search.py).

  Returns the main method's results: the content of workdir/results.json, and
  for network methods the final training state under "state".
  """
  config = config_lib.resolve(config)
  config_lib.validate(config)
  results_lib.check_workdir(workdir)
  runs = [(config, workdir)]
  for other in config.compare_with:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.method, sub.compare_with = other, ()
    sub = config_lib.resolve(sub)
    config_lib.validate(sub)
    runs.append((sub, os.path.join(workdir, "compare", other)))
  plan = lam_search.expand(runs)  # lsmtl.lam = 'auto': one run per candidate
  data = sources.load_data(config)
  # Nothing is written to a workdir until every run has passed its checks, so
  # a refused run leaves a workdir (a finished run's included) as it was.
  checked = [_preflight(c, w, data) for c, w in plan.runs]
  rows = lam_search.execute(plan, lambda i: _run_one(*plan.runs[i], data, checked[i]),
                            (NonFiniteError,))
  main = rows[0]
  chosen = lam_search.summary(main["lam_search"]) if "lam_search" in main else ""
  if not config.compare_with:
    if chosen and _is_writer():
      print(chosen, flush=True)
    return main
  table = results_lib.format_table([dict(r, method=lam_search.table_label(r)) for r in rows])
  if _is_writer():
    results_lib.write_text_atomic(os.path.join(workdir, "comparison.md"),
                                  table + "\n" + (f"\n{chosen}\n" if chosen else ""))
    test = data.eval_sets["test"]
    print(f"\nStandardized units, {test.dataset.num_targets} targets, "
          f"{len(test.indices)} test profiles:\n{table}\n" + (f"{chosen}\n" if chosen else ""),
          flush=True)
  return main
