"""Training-step benchmark: examples/s, MFU, memory, the input pipeline, and the
PyTorch reference side by side.

One configuration (a config file plus overrides, as for training)::

  python -m lsmtl_jax.benchmark --config=configs/demo.py [--config.model.hidden=3000 ...]
      [--torch=auto|on|off] [--lam0] [--loader] [--json]

The issue-6 suite (demo size and 3 x 3,000 against PyTorch, the regularizer's
cost, MFU, loader/training ratios for the demo and a GEO-shaped store)::

  python -m lsmtl_jax.benchmark --suite=issue6 [--geo_train=measure] [--json]

(--geo_train=measure also times the paper's 3 x 9,000 model against lam = 0.)

What is measured
  * The jitted train step exactly as training builds it (build.build_network,
    in/out shardings, the state donated), after warm-up; every timed block of
    `--steps` steps ends with block_until_ready. Step time: median over
    `--repeats` blocks, with the min-max spread.
  * Analytic model FLOPs per example (perf.train_flops_per_example: 6 x the
    dense layers' multiply-adds) and MFU against the float32 matmul peak this
    device measures in the same invocation (perf.measured_matmul_peak).
  * Parameter and optimizer-state bytes; peak device memory where the backend
    reports it (CPU does not: the process's peak RSS is printed instead).
  * With --torch, the PyTorch peer lsmtl_jax/torch_peer.py (the same network,
    loss and optimizer; the `bench` extra installs torch) runs as a subprocess
    between the JAX blocks, once per mode (--torch_modes: eager and
    torch.compile, its compile time excluded and reported apart), same machine,
    same batch, same threads; the ratios are computed per repeat. Without torch
    the comparison is skipped and says so; a mode that cannot run here (e.g.
    torch.compile without a C++ compiler) is reported unavailable, with why.
  * With --lam0, the same model with lam = 0 interleaved (which goes first
    alternates, and each block follows an untimed step): Deep-LSMTL's step
    time over the plain DenseNet's, and the regularizer's extra memory
    (O(T k)) beside Deep-AMTL's T x T relation matrix (O(T^2)).
  * With --loader, examples/s of the training loader (loader.train_batches:
    random rows from the zarr3 TensorStore, prefetched) and its ratio to
    training examples/s.

Timings on a shared machine are noisy: every comparison is interleaved within
one invocation and reported as ratios with their spread.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

import lsmtl_jax
from lsmtl_jax import bench_accelerator
from lsmtl_jax import parallel
from lsmtl_jax import perf
from lsmtl_jax import stepbench
from lsmtl_jax import config_lib
from lsmtl_jax import feed
from lsmtl_jax import fileio
from lsmtl_jax.data import loader
from lsmtl_jax.data import sources
from lsmtl_jax.data import store
from lsmtl_jax.methods import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lsmtl_jax.__file__)))
TORCH_PEER_MODULE = "lsmtl_jax.torch_peer"  # the in-repo PyTorch peer (python -m)
TORCH_MODES = ("eager", "compile")
GEO_LANDMARKS, GEO_TARGETS = 943, 9520

# ----------------------------------------------------------------------------
# Pieces (importable; the tests call them on tiny shapes)
# ----------------------------------------------------------------------------


class BenchmarkError(RuntimeError):
  """A benchmark that cannot run as asked; the message names the flag or field."""


# The step timer and the memory readers live in stepbench (the accelerator
# check uses them too); importable from here as before.
StepBench = stepbench.StepBench
tree_bytes = stepbench.tree_bytes
peak_device_memory = stepbench.peak_device_memory
host_peak_rss = stepbench.host_peak_rss
num_threads = stepbench.num_threads


def regularizer_memory(num_targets: int, bottleneck: int) -> dict[str, Any]:
  """Extra float32 parameters and their Adam state: LSMTL's T -> k -> T bottleneck
  (2 T k + T + k) against Deep-AMTL's T x T relation matrix."""
  lsmtl_params = 2 * num_targets * bottleneck + num_targets + bottleneck
  amtl_params = num_targets * num_targets
  return {"targets": num_targets, "bottleneck": bottleneck,
          "lsmtl_params": lsmtl_params, "lsmtl_bytes_with_adam": 3 * 4 * lsmtl_params,
          "amtl_params": amtl_params, "amtl_bytes_with_adam": 3 * 4 * amtl_params,
          "amtl_over_lsmtl": amtl_params / lsmtl_params}


def run_torch_peer(script: str, *, hidden: int, depth: int, batch: int, bottleneck: int,
                   n_in: int, n_out: int, steps: int, warmup: int, threads: int, lam: float,
                   mask_rate: float, dropout: float, mode: str = "eager",
                   timeout: float = 1800) -> dict[str, Any]:
  """One run of the PyTorch peer in `mode` ('eager' or 'compile'); its JSON
  line, or {'skipped': why}. script: '' = the in-repo peer (python -m
  lsmtl_jax.torch_peer), else a file with the same command line."""
  if script and not os.path.isfile(script):
    return {"skipped": f"PyTorch peer not found at {script}"}
  cmd = [sys.executable] + ([script] if script else ["-m", TORCH_PEER_MODULE])
  cmd += ["--hidden", str(hidden), "--layers", str(depth), "--batch",
          str(batch), "--bottleneck", str(bottleneck), "--n_in", str(n_in), "--n_out",
          str(n_out), "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
          "--lam", str(lam), "--mask_rate", str(mask_rate), "--dropout", str(dropout),
          "--mode", mode]
  # The repository first on the path: `-m` finds the peer in a clone that is not installed.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)
  except subprocess.TimeoutExpired:
    return {"skipped": f"PyTorch peer ({mode}) timed out after {timeout:.0f} s"}
  for line in reversed(proc.stdout.strip().splitlines()):
    if line.startswith("{"):  # a measurement, or the peer's own {"skipped": why}
      return json.loads(line)
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if "No module named 'torch'" in proc.stderr:
      last = "torch is not installed (pip install -e '.[bench]'; the CPU build suffices)"
    return {"skipped": f"PyTorch peer failed: {last}"}
  return {"skipped": "PyTorch peer printed no JSON line"}


def _spread(values: Sequence[float]) -> dict[str, float]:
  values = [float(v) for v in values]
  if not values:
    return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
  return {"median": float(np.median(values)), "min": min(values), "max": max(values),
          "n": len(values)}


def measure_loader(dataset: store.Dataset, batch_size: int, num_batches: int,
                   prefetch: int = 4, split: str = "train", seed: int = 0,
                   warmup: int = 2) -> dict[str, Any]:
  """Examples/s of loader.train_batches (random rows of the split, prefetched).

  The first `warmup` batches (thread start, first reads) are not timed.
  """
  indices = dataset.split(split)
  order = loader.TrainOrder(indices, batch_size, seed)
  total = warmup + num_batches
  batches = loader.train_batches(dataset, order, 0, total, prefetch)
  try:
    for _ in range(warmup):
      next(batches)
    start = time.perf_counter()
    rows = 0
    for _ in range(num_batches):
      rows += next(batches)["x"].shape[0]
    seconds = time.perf_counter() - start
  finally:
    batches.close()
  return {"examples_per_s": rows / seconds, "batches": num_batches, "batch_size": batch_size,
          "prefetch": prefetch, "store": dataset.path, "rows_in_store": dataset.num_samples,
          "columns": dataset.num_landmarks + dataset.num_targets}


write_random_store = feed.write_random_store  # the loader timing's store


# ----------------------------------------------------------------------------
# One model size: JAX (lam > 0, optionally lam = 0) and PyTorch, interleaved
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class SizeOptions:
  repeats: int = 5
  steps: int = 5
  warmup: int = 2
  torch: str = "auto"  # 'auto' (run if found), 'on' (required), 'off'
  torch_script: str = ""  # '' = the in-repo peer, lsmtl_jax/torch_peer.py
  torch_modes: tuple[str, ...] = TORCH_MODES
  torch_steps: int = 0  # 0: the same as steps
  lam0: bool = True
  threads: int = 0  # 0: every core this process may use


def benchmark_size(config: ml_collections.ConfigDict, num_landmarks: int, num_targets: int,
                   options: SizeOptions, peak_flops: float, label: str = "",
                   log=print) -> dict[str, Any]:
  """Deep-LSMTL's step (and lam = 0's, and PyTorch's) timed in interleaved repeats."""
  config = ml_collections.ConfigDict(config.to_dict())
  threads = options.threads or num_threads()
  main = StepBench(config, num_landmarks, num_targets)
  lsmtl_on = main.has_relation  # the task-relation bottleneck is built (Deep-LSMTL, lam > 0)
  lam0 = None
  if options.lam0 and lsmtl_on:
    zero = ml_collections.ConfigDict(config.to_dict())
    zero.lsmtl.lam = 0.0
    lam0 = StepBench(zero, num_landmarks, num_targets)
  for bench in (main, lam0):
    if bench is not None:
      bench.warmup(options.warmup)

  model = config.model
  torch_wanted = options.torch != "off" and model.trunk == "densenet"
  torch_kw = dict(hidden=model.hidden, depth=model.depth, batch=config.train.batch_size,
                  bottleneck=config.lsmtl.bottleneck if lsmtl_on else 0, n_in=num_landmarks,
                  n_out=num_targets, steps=options.torch_steps or options.steps,
                  warmup=options.warmup, threads=threads, lam=config.lsmtl.lam,
                  mask_rate=config.lsmtl.mask_rate, dropout=model.dropout)
  times = {"jax": [], "jax_lam0": []}
  modes = tuple(options.torch_modes) if torch_wanted else ()
  peer_times = {m: [] for m in modes}
  peer_skip = {m: None for m in modes}
  peer_info = {m: {} for m in modes}
  peer_compile = {m: [] for m in modes}  # torch.compile + first step, per run (not timed)
  if options.torch_script and not os.path.isfile(options.torch_script):
    peer_skip = {m: f"PyTorch peer not found at {options.torch_script}" for m in modes}
  for rep in range(options.repeats):
    # Alternate which model goes first, and give each an untimed step before
    # its block: whatever ran just before (the peer's process, the other
    # model) leaves cold caches that would otherwise be billed to one side.
    order = [("jax", main), ("jax_lam0", lam0)]
    for name, bench in order if rep % 2 == 0 else order[::-1]:
      if bench is not None:
        bench.block(1)
        times[name].append(bench.block(options.steps))
    for mode in modes:  # a mode that failed once is not run again
      if peer_skip[mode] is None:
        peer = run_torch_peer(options.torch_script, mode=mode, **torch_kw)
        if "skipped" in peer:
          peer_skip[mode] = peer["skipped"]
        else:
          peer_times[mode].append(peer["step_s"])
          peer_info[mode] = {k: peer[k] for k in ("impl", "torch", "threads",
                                                  "flops_per_example") if k in peer}
          if "compile_s" in peer:
            peer_compile[mode].append(peer["compile_s"])
    log(f"  {label} repeat {rep + 1}/{options.repeats}: JAX {times['jax'][-1] * 1e3:.1f} ms"
        + (f", lam=0 {times['jax_lam0'][-1] * 1e3:.1f} ms" if times["jax_lam0"] else "")
        + "".join(f", PyTorch {m} {peer_times[m][-1] * 1e3:.1f} ms" for m in modes
                  if len(peer_times[m]) > rep))
  if modes and options.torch == "on" and not any(peer_times.values()):
    raise BenchmarkError("--torch=on: " + "; ".join(f"{m}: {peer_skip[m]}" for m in modes))

  batch = config.train.batch_size
  flops = main.flops_per_example()
  step = _spread(times["jax"])
  eps = batch / step["median"]
  result: dict[str, Any] = {
      "label": label, "hidden": model.hidden, "depth": model.depth, "trunk": model.trunk,
      "batch": batch, "landmarks": num_landmarks, "targets": num_targets,
      "padded_targets": main.padded_targets, "lam": config.lsmtl.lam,
      "bottleneck": config.lsmtl.bottleneck if lsmtl_on else 0, "dtype": model.dtype,
      "optimizer": config.optim.name, "threads": threads, "steps_per_repeat": options.steps,
      "step_s": step, "examples_per_s": eps,
      "examples_per_s_spread": {"min": batch / step["max"], "max": batch / step["min"]},
      "compile_s": main.compile_seconds, "flops_per_example": flops,
      "achieved_flops": eps * flops, "mfu": eps * flops / peak_flops,
      "param_bytes": main.param_bytes, "opt_state_bytes": main.opt_state_bytes,
      "relation_param_bytes": main.relation_param_bytes,
      "peak_device_bytes": peak_device_memory(),
      "loss_finite": bool(np.isfinite(float(main.last_metrics["loss"]))),
  }
  if lam0 is not None:
    ratios = [a / b for a, b in zip(times["jax"], times["jax_lam0"])]
    result["lam0"] = {"step_s": _spread(times["jax_lam0"]),
                      "examples_per_s": batch / _spread(times["jax_lam0"])["median"],
                      "param_bytes": lam0.param_bytes, "opt_state_bytes": lam0.opt_state_bytes,
                      "lsmtl_over_lam0_step": _spread(ratios),
                      "extra_state_bytes": (main.param_bytes + main.opt_state_bytes
                                            - lam0.param_bytes - lam0.opt_state_bytes)}
    result["regularizer_memory"] = regularizer_memory(num_targets, config.lsmtl.bottleneck)
  if modes:
    # result["torch"][mode]: the peer's step in that mode, or {"skipped": why}.
    result["torch"] = {}
    for mode in modes:
      if peer_times[mode]:
        n = len(peer_times[mode])  # the peer's runs are the first n repeats
        ratios = [t / j for j, t in zip(times["jax"][:n], peer_times[mode])]
        tstep = _spread(peer_times[mode])
        entry = {"step_s": tstep, "examples_per_s": batch / tstep["median"],
                 "jax_over_torch_examples_per_s": _spread(ratios),
                 # the least-disturbed run of each (a quiet machine's estimate)
                 "best_over_best": tstep["min"] / step["min"], **peer_info[mode]}
        if peer_compile[mode]:
          # The first run compiles from scratch; later ones reuse inductor's cache.
          entry["compile_s"] = _spread(peer_compile[mode])
          entry["compile_s_first_run"] = peer_compile[mode][0]
        if peer_skip[mode]:
          entry["note"] = f"stopped after {n} repeats: {peer_skip[mode]}"
      else:
        entry = {"skipped": peer_skip[mode]}
      result["torch"][mode] = entry
  del main, lam0
  return result


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def _mib(n) -> str:
  return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _pm(s: dict[str, float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
  return (fmt.format(s["median"] * scale) + " [" + fmt.format(s["min"] * scale) + "-"
          + fmt.format(s["max"] * scale) + "]")


_PEER_NAMES = {"eager": "PyTorch eager", "compile": "PyTorch compiled"}


def format_report(report: dict[str, Any]) -> str:
  m = report["machine"]
  lines = [f"lsmtl_jax benchmark  (JAX {m['jax']}, backend {m['backend']}, {m['device']}, "
           f"{m['threads']} threads; float32 matmul peak measured "
           f"{m['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, best of before and after)",
           "Step times: median [min-max] over repeats; ratios computed per repeat.", ""]
  for r in report["sizes"]:
    lines.append(f"== {r['label']}: {r['trunk']} {r['depth']} x {r['hidden']}, batch {r['batch']}, "
                 f"T={r['targets']} (head padded to {r['padded_targets']}), lam={r['lam']}, "
                 f"k={r['bottleneck']}, {r['dtype']}, {r['optimizer']}")
    rows = [("JAX step (ms)", _pm(r["step_s"], 1e3)),
            ("JAX examples/s", f"{r['examples_per_s']:,.0f} "
             f"[{r['examples_per_s_spread']['min']:,.0f}-{r['examples_per_s_spread']['max']:,.0f}]"),
            ("FLOPs/example (analytic)", f"{r['flops_per_example'] / 1e6:,.1f} M"),
            ("achieved", f"{r['achieved_flops'] / 1e9:,.1f} GFLOP/s"),
            ("MFU (vs measured peak)", f"{100 * r['mfu']:.1f} %"),
            ("params / optimizer state", f"{_mib(r['param_bytes'])} / {_mib(r['opt_state_bytes'])}"),
            ("peak device memory", _mib(r["peak_device_bytes"]) if r["peak_device_bytes"]
             else "n/a (backend reports none)"),
            ("compile + first step", f"{r['compile_s']:.1f} s")]
    if "lam0" in r:
      z = r["lam0"]
      rm = r["regularizer_memory"]
      rows += [("lam=0 step (ms)", _pm(z["step_s"], 1e3)),
               ("LSMTL / lam=0 step time", _pm(z["lsmtl_over_lam0_step"], 1, "{:.3f}")
                + "  (target <= 1.10)"),
               ("regularizer extra state", f"{_mib(z['extra_state_bytes'])} measured; "
                f"O(T k) = 3 x 4 B x {rm['lsmtl_params']:,} = {_mib(rm['lsmtl_bytes_with_adam'])}"),
               ("Deep-AMTL T x T instead", f"O(T^2) = 3 x 4 B x {rm['amtl_params']:,} = "
                f"{_mib(rm['amtl_bytes_with_adam'])} ({rm['amtl_over_lsmtl']:.0f}x)")]
    for mode, t in r.get("torch", {}).items():
      name = _PEER_NAMES.get(mode, f"PyTorch {mode}")
      if "skipped" in t:
        rows.append((name, ("unavailable: " if mode == "compile" else "skipped: ")
                     + t["skipped"]))
        continue
      rows += [(f"{name} step (ms)", _pm(t["step_s"], 1e3)
                + f"  (torch {t.get('torch', '?')}, {t.get('threads', '?')} threads)"),
               (f"{name} examples/s", f"{t['examples_per_s']:,.0f}")]
      if "compile_s" in t:
        c = t["compile_s"]
        rows.append((f"{name} compile + first step",
                     f"{t['compile_s_first_run']:.1f} s in the first run"
                     + (f", {c['min']:.1f}-{c['max']:.1f} s in all {c['n']} (later runs "
                        "reuse inductor's cache)" if c["n"] > 1 else "") + "; not timed"))
      rows += [(f"JAX / {name} examples/s", _pm(t["jax_over_torch_examples_per_s"], 1, "{:.2f}")
                + "  (target >= 1.2)"),
               (f"  best JAX / best {name}", f"{t['best_over_best']:.2f}")]
      if "note" in t:
        rows.append((f"{name} note", t["note"]))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows] + [""]
  for ld in report.get("loaders", []):
    if "skipped" in ld:
      lines.append(f"== loader {ld['label']}: skipped: {ld['skipped']}")
      continue
    lines.append(f"== loader {ld['label']}: {ld['rows_in_store']:,} rows x {ld['columns']:,} "
                 f"float32 (zarr3, one-row chunks), batch {ld['batch_size']}, prefetch "
                 f"{ld['prefetch']}")
    lines.append(f"  loader examples/s        {ld['examples_per_s']:,.0f}")
    if ld.get("train_examples_per_s"):
      lines.append(f"  training examples/s      {ld['train_examples_per_s']:,.1f}  "
                   f"({ld['train_source']})")
      lines.append(f"  loader / training        {ld['loader_over_training']:.1f}  (target >= 5)")
    lines.append("")
  s = report.get("summary")
  if s:
    lines.append("== summary")
    width = max(len(k) for k in s)
    lines += [f"  {k:<{width}}  {v}" for k, v in s.items()]
  lines.append(f"  host peak RSS: {_mib(report['host_peak_rss'])}")
  return "\n".join(lines)


def machine_info(peak_flops: float) -> dict[str, Any]:
  device = jax.devices()[0]
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)) + (f" ({cpu})" if cpu else ""),
          "devices": jax.device_count(), "threads": num_threads(),
          "matmul_peak_flops": peak_flops, "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "demo.py"),
                                  "Model/training config (as for training).", lock_config=True)
  flags.DEFINE_enum("suite", "", ["", "issue6", "precision", "accelerator"],
                    "issue6: demo size and 3 x 3,000 vs PyTorch, lam=0, loaders, MFU; "
                    "precision: bf16 vs fp32 step; accelerator: the prepared device check "
                    "(lsmtl_jax/bench_accelerator.py).")
  bench_accelerator.define_flags()
  flags.DEFINE_integer("repeats", 5, "Timed blocks per measurement (interleaved).")
  flags.DEFINE_integer("steps", 5, "Steps per timed block.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first compiles).")
  flags.DEFINE_enum("torch", "auto", ["auto", "on", "off"],
                    "Run the PyTorch peer (lsmtl_jax/torch_peer.py) side by side: auto = when "
                    "torch is installed (the `bench` extra); on = required (an error when no "
                    "mode could run).")
  flags.DEFINE_list("torch_modes", list(TORCH_MODES),
                    "The peer's modes: eager, compile (torch.compile; compile time excluded).")
  flags.DEFINE_string("torch_script", "",
                      "Another PyTorch peer script with torch_peer.py's command line "
                      "(default: the in-repo peer).")
  flags.DEFINE_bool("lam0", True, "Also time lam = 0 (the regularizer's cost).")
  flags.DEFINE_bool("loader", True, "Time the loader on the config's dataset.")
  flags.DEFINE_integer("loader_batches", 60, "Batches read to time the loader.")
  flags.DEFINE_integer("geo_rows", 20000,
                       "issue6: rows of the temporary GEO-shaped store (943 + 9,520 float32 "
                       "columns; 20,000 rows = 0.84 GB, deleted afterwards).")
  flags.DEFINE_string("scratch", "", "Where the temporary store goes (default: system temp).")
  flags.DEFINE_enum("geo_train", "estimate", ["estimate", "measure", "off"],
                    "issue6, training examples/s at the geo config (3 x 9,000): 'measure' times "
                    "it and lam = 0 beside it (about 20 GB of memory and 6 minutes on a 2-core "
                    "CPU), 'estimate' derives it from the 3 x 3,000 MFU and the analytic FLOPs.")
  flags.DEFINE_integer("threads", 0, "Threads for the PyTorch reference (0: every core).")
  flags.DEFINE_bool("json", False, "Print the report as JSON instead of the table.")
  flags.DEFINE_string("out", "", "Also write the JSON report to this path.")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _loader_entry(label, dataset, batch, train_eps, source, prefetch) -> dict[str, Any]:
  entry = {"label": label, **measure_loader(dataset, batch, FLAGS.loader_batches, prefetch)}
  if train_eps:
    entry.update(train_examples_per_s=train_eps, train_source=source,
                 loader_over_training=entry["examples_per_s"] / train_eps)
  return entry


def _config_dataset(config):
  """The config's dataset (the synthetic compendium is generated on first use)."""
  try:
    return sources.load_dataset(config), None
  except (store.DatasetError, OSError) as e:
    return None, str(e)


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Everything that can refuse the benchmark, before any timing: the flags,
  the config (resolved and validated, a network method, a mesh that fits the
  devices and divides the batch), the config's dataset when it names one, and
  where the report and the temporary store go. Returns the resolved config."""
  unknown = set(FLAGS.torch_modes) - set(TORCH_MODES)
  if unknown:
    raise BenchmarkError(f"--torch_modes: {sorted(unknown)} not in {list(TORCH_MODES)}")
  for name in ("repeats", "steps", "warmup", "loader_batches", "geo_rows"):
    if FLAGS[name].value < 1:
      raise BenchmarkError(f"--{name} must be at least 1, got {FLAGS[name].value}")
  if FLAGS.threads < 0:
    raise BenchmarkError(f"--threads must be >= 0, got {FLAGS.threads}")
  if FLAGS.torch_script and not os.path.isfile(FLAGS.torch_script):
    raise BenchmarkError(f"--torch_script={FLAGS.torch_script}: no such file")
  if (FLAGS.torch == "on" and not FLAGS.torch_script
      and importlib.util.find_spec("torch") is None):
    raise BenchmarkError("--torch=on: torch is not installed (pip install -e '.[bench]'; the "
                         "CPU build suffices)")
  config = config_lib.concrete_lam(config_lib.resolve(config))
  config_lib.validate(config)
  method = registry.get(config.method)
  if not method.is_network:
    raise BenchmarkError(f"config: method {config.method!r} ({method.label}) is not a network; "
                         "the benchmark times a network's training step")
  data_axis, _ = parallel.mesh_shape(config.mesh, jax.device_count())
  if config.train.batch_size % data_axis:
    raise parallel.MeshError(f"config: train.batch_size={config.train.batch_size} is not "
                             f"divisible by the data axis ({data_axis})")
  if config.data.path and not config.data.synthetic.enabled:
    sources.load_dataset(config)  # a dataset named but missing or malformed: DatasetError
  if FLAGS.out:
    if os.path.isdir(FLAGS.out):
      raise fileio.OutputError(f"--out={FLAGS.out}: is a directory; name a file")
    if os.path.lexists(FLAGS.out) and not os.path.isfile(FLAGS.out):
      raise fileio.OutputError(f"--out={FLAGS.out}: exists and is not a regular file")
    out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(out_dir):
      raise fileio.OutputError(f"--out={FLAGS.out}: directory {out_dir} "
                               + ("is not a directory" if os.path.lexists(out_dir)
                                  else "does not exist"))
    fileio.check_output_dir(out_dir)
  if FLAGS.suite == "issue6" and FLAGS.scratch:
    if not os.path.isdir(FLAGS.scratch):
      raise fileio.OutputError(f"--scratch={FLAGS.scratch}: no such directory")
    fileio.check_output_dir(FLAGS.scratch)
  return config


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  config = check(config)
  options = SizeOptions(repeats=FLAGS.repeats, steps=FLAGS.steps, warmup=FLAGS.warmup,
                        torch=FLAGS.torch, torch_script=FLAGS.torch_script,
                        torch_modes=tuple(FLAGS.torch_modes), lam0=FLAGS.lam0,
                        threads=FLAGS.threads)
  _log("measuring the float32 matmul peak ...")
  peak = perf.measured_matmul_peak()
  report: dict[str, Any] = {"machine": machine_info(peak), "sizes": [], "loaders": []}
  dataset, why = (None, "config has no dataset")
  if config.data.synthetic.enabled or config.data.path:
    dataset, why = _config_dataset(config)
  num_l = dataset.num_landmarks if dataset else config.data.synthetic.num_landmarks
  num_t = dataset.num_targets if dataset else config.data.synthetic.num_targets

  if FLAGS.suite == "issue6":
    sizes = [("demo 2 x 512", 512, 2), ("3 x 3,000", 3000, 3)]
    for label, hidden, depth in sizes:
      c = ml_collections.ConfigDict(config.to_dict())
      c.model.hidden, c.model.depth = hidden, depth
      _log(f"timing {label} ...")
      report["sizes"].append(benchmark_size(c, num_l, num_t, options, peak, label, _log))
  else:
    _log(f"timing {config.model.depth} x {config.model.hidden} ...")
    report["sizes"].append(benchmark_size(config, num_l, num_t, options, peak, "config", _log))

  if FLAGS.loader:
    demo_eps = report["sizes"][0]["examples_per_s"]
    if dataset is None:
      report["loaders"].append({"label": "config dataset", "skipped": why})
    else:
      _log("timing the loader on the config's dataset ...")
      report["loaders"].append(_loader_entry(
          "demo" if FLAGS.suite else "config dataset", dataset, config.train.batch_size,
          demo_eps, f"{report['sizes'][0]['label']}, measured above", config.data.prefetch))
    if FLAGS.suite == "issue6":
      report["loaders"].append(_geo_loader(config, report, peak))

  # On a shared machine one peak measurement can land in a busy moment; MFU uses
  # the best of the peaks measured before and after the timings (conservative).
  peak_after = perf.measured_matmul_peak.__wrapped__()
  best_peak = max(peak, peak_after)
  report["machine"]["matmul_peak_flops"] = best_peak
  report["machine"]["matmul_peak_flops_measured"] = [peak, peak_after]
  for r in report["sizes"]:
    r["mfu"] = r["achieved_flops"] / best_peak
  report["host_peak_rss"] = host_peak_rss()
  report["summary"] = _summary(report)
  return report


def _geo_loader(config, report, peak) -> dict[str, Any]:
  from configs import geo  # pylint: disable=g-import-not-at-top
  geo_config = geo.get_config()
  flops = perf.train_flops_per_example(geo_config.model, GEO_LANDMARKS, GEO_TARGETS,
                                       geo_config.lsmtl.bottleneck)
  train_eps, source = None, ""
  if FLAGS.geo_train == "measure":
    _log("timing the geo config (3 x 9,000) ...")
    # lam = 0 beside it: the regularizer's cost at the size the paper trains
    # (two 3 x 9,000 train states: 19.6 GB peak RSS on a CPU).
    opts = SizeOptions(repeats=3, steps=1, warmup=1, torch="off", lam0=FLAGS.lam0)
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.hidden, c.model.depth = geo_config.model.hidden, geo_config.model.depth
    c.lsmtl.bottleneck = geo_config.lsmtl.bottleneck
    c.train.batch_size = geo_config.train.batch_size
    geo_size = benchmark_size(c, GEO_LANDMARKS, GEO_TARGETS, opts, peak, "geo 3 x 9,000", _log)
    report["sizes"].append(geo_size)
    train_eps, source = geo_size["examples_per_s"], "geo config, measured"
  elif FLAGS.geo_train == "estimate":
    achieved = report["sizes"][-1]["achieved_flops"]
    train_eps = achieved / flops
    source = (f"geo config estimated: {flops / 1e9:.2f} GFLOP/example at the "
              f"{report['sizes'][-1]['label']} rate of {achieved / 1e9:.1f} GFLOP/s")
  parent = FLAGS.scratch or tempfile.gettempdir()
  path = tempfile.mkdtemp(prefix="lsmtl_bench_geo_", dir=parent)
  try:
    _log(f"writing a GEO-shaped store of {FLAGS.geo_rows:,} rows in {path} ...")
    ds = write_random_store(os.path.join(path, "geo"), FLAGS.geo_rows)
    _log("timing the loader on it ...")
    return _loader_entry("geo-shaped store", ds, geo_config.train.batch_size, train_eps, source,
                         config.data.prefetch)
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _summary(report) -> dict[str, str]:
  s = {}
  for r in report["sizes"]:
    for mode, t in r.get("torch", {}).items():
      key = f"JAX/{_PEER_NAMES.get(mode, mode)} examples/s, {r['label']}"
      if "jax_over_torch_examples_per_s" in t:
        s[key] = (_pm(t["jax_over_torch_examples_per_s"], 1, "{:.2f}")
                  + f"; best/best {t['best_over_best']:.2f}  (target >= 1.2)")
      elif "skipped" in t:
        s[key] = ("unavailable: " if mode == "compile" else "skipped: ") + t["skipped"]
    if "lam0" in r:
      s[f"LSMTL/lam=0 step time, {r['label']}"] = _pm(r["lam0"]["lsmtl_over_lam0_step"], 1,
                                                     "{:.3f}") + "  (target <= 1.10)"
    s[f"MFU, {r['label']}"] = f"{100 * r['mfu']:.1f} %  ({r['examples_per_s']:,.0f} examples/s)"
  for ld in report.get("loaders", []):
    if "loader_over_training" in ld:
      s[f"loader/training, {ld['label']}"] = f"{ld['loader_over_training']:.1f}  (target >= 5)"
  return s


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.suite in ("precision", "accelerator"):
    sys.exit(bench_accelerator.main_suite(FLAGS.suite, FLAGS.config))
  try:
    report = run(FLAGS.config)
  except (BenchmarkError, config_lib.ConfigError, parallel.MeshError, store.DatasetError,
          fileio.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.out:
    try:
      fileio.write_text(FLAGS.out, json.dumps(report, indent=1))
    except OSError as e:
      print(f"error: --out={FLAGS.out}: cannot write: {e.strerror or e}", file=sys.stderr)
      sys.exit(2)
  if FLAGS.json:
    print(json.dumps(report, indent=1))
  else:
    print(format_report(report))


if __name__ == "__main__":
  if REPO not in sys.path:  # configs/ is a top-level folder next to the package
    sys.path.insert(0, REPO)
  _define_flags()
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
