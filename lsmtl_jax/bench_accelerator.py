"""The prepared accelerator check, and the precision suite, behind benchmark's --suite.

  python -m lsmtl_jax.benchmark --suite=accelerator --out=check.json [--markdown=check.md]
  python -m lsmtl_jax.benchmark --suite=accelerator --dry_run [--assume_device=H100]
  python -m lsmtl_jax.benchmark --suite=accelerator --toy --out=toy.json   # the CPU test
  python -m lsmtl_jax.benchmark --suite=precision [--precision_sizes=...]

The check runs, in order, each part inside its budget (lsmtl_jax/bench_plan.py
holds the plan and its estimate): the tests that exercise devices (pytest in a
child process on the device); the train step in float32 and bfloat16 at the
demo size, 3 x 3,000 and 3 x 9,000 on device-resident batches, with MFU
against the device's known peaks and the measured matmul peak, and peak device
memory beside the memory guard's estimate; predict on 100,000 LINCS-shaped
profiles (benchmark_predict in a child); and a short paper-scale run
(Deep-LSMTL, the lam = 0 DenseNet and LSR on a GEO-sized synthetic
compendium), with the input path's feed rate beside the step's. One JSON and
one Markdown report, each written atomically; a part that fails is recorded
with its error and the others still run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable

from absl import flags
import jax
import ml_collections

import lsmtl_jax
from lsmtl_jax import bench_plan
from lsmtl_jax import bench_precision
from lsmtl_jax import feed
from lsmtl_jax import fileio
from lsmtl_jax import memory
from lsmtl_jax import perf
from lsmtl_jax import stepbench
from lsmtl_jax import train
from lsmtl_jax.data import loader
from lsmtl_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lsmtl_jax.__file__)))
FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("precision_sizes", bench_precision.DEFAULT_SIZES,
                      "precision: DEPTHxHIDDEN@BATCH,... (3 x 9,000 at batch 64 on a CPU).")
  flags.DEFINE_float("block_seconds", 2.0, "precision/accelerator: seconds per timed block "
                     "(steps per block are chosen from a probe step).")
  flags.DEFINE_bool("dry_run", False, "accelerator: print the plan and its estimate; run "
                    "nothing.")
  flags.DEFINE_string("assume_device", "", "accelerator --dry_run: plan for this device_kind "
                      "(e.g. H100, H200, 'TPU v5 lite') instead of the one found.")
  flags.DEFINE_integer("assume_host_cores", 0, "accelerator --dry_run: plan for a host with "
                       "this many CPU cores (the lent H100/H200 machines have 16) instead of "
                       "this one's.")
  flags.DEFINE_bool("toy", False, "accelerator: toy sizes (the machinery in seconds on a CPU).")
  flags.DEFINE_string("markdown", "", "accelerator: the Markdown report (default: --out with "
                      ".md).")
  flags.DEFINE_list("parts", ["device_tests", "steps", "predict", "paper"],
                    "accelerator: the parts to run.")
  flags.DEFINE_integer("predict_profiles", -1, "accelerator: profiles to predict (-1: the "
                       "plan's, 0: skip).")
  flags.DEFINE_integer("paper_steps", 0, "accelerator: training steps of each paper-scale "
                       "network (0: as many as its budget allows).")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# The parts
# ----------------------------------------------------------------------------


def child_env(platform: str) -> dict[str, str]:
  """Children run on this process's platform (tests/conftest.py defaults to cpu)
  and allocate on demand, beside this process."""
  path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return {**os.environ, "JAX_PLATFORMS": platform, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
          "PYTHONPATH": os.pathsep.join(path)}


def junit_counts(path: str) -> dict[str, Any]:
  """passed/failed/errors/skipped and the names of what failed, from pytest's junit XML."""
  root = ET.parse(path).getroot()
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped_tests": 0, "failures": []}
  for case in root.iter("testcase"):
    name = f"{case.get('classname', '')}::{case.get('name', '')}"
    kinds = {child.tag for child in case}
    if "failure" in kinds:
      counts["failed"] += 1
      counts["failures"].append(name)
    elif "error" in kinds:
      counts["errors"] += 1
      counts["failures"].append(name)
    elif "skipped" in kinds:
      counts["skipped_tests"] += 1
    else:
      counts["passed"] += 1
  return counts


def device_tests(tests, platform: str, budget_s: float, scratch: str) -> dict[str, Any]:
  xml = os.path.join(scratch, "device_tests.xml")
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--junitxml={xml}", *tests]
  out = {"command": " ".join(cmd[1:]), "platform": platform}
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(platform), capture_output=True,
                          text=True, timeout=budget_s, check=False)
  except subprocess.TimeoutExpired:
    out["stopped"] = f"still running at its budget of {budget_s:.0f} s"
    return out
  out["returncode"] = proc.returncode
  out["tail"] = proc.stdout.strip().splitlines()[-3:]
  if os.path.isfile(xml):
    out.update(junit_counts(xml))
  return out


def step_size(config, size, landmarks: int, targets: int, repeats: int, block_s: float,
              peaks: dict | None, measured: dict[str, float]) -> dict[str, Any]:
  pair = bench_precision.DtypePair(config, size, landmarks, targets)
  row = {"label": size.label, **bench_precision.measure_pair(pair, repeats, block_s)}
  for dtype in bench_precision.DTYPES:
    achieved = row[dtype]["achieved_flops"]
    row[dtype]["mfu_measured_peak"] = achieved / measured[dtype]
    row[dtype]["mfu_known_peak"] = achieved / peaks[dtype] if peaks else None
  row["guard_estimate_bytes"] = memory.estimate_training_bytes(pair.bench.network)["bytes"]
  # Sizes run smallest first and each pair is freed before the next, so the
  # process's peak after a size is that size's peak.
  row["peak_device_bytes"] = stepbench.peak_device_memory()
  del pair
  gc.collect()
  return row


def steps_part(config, sizes: bench_plan.Sizes, peaks, measured, budget_s) -> dict[str, Any]:
  start, rows = time.perf_counter(), []
  for size in bench_plan.parse_sizes(sizes.step_sizes, 256, "--step_sizes"):
    if time.perf_counter() - start > budget_s:
      rows.append({"label": size.label, "skipped": f"past the part's budget of {budget_s} s"})
      continue
    log(f"accelerator: steps {size.label} ...")
    c = ml_collections.ConfigDict(config.to_dict())
    c.lsmtl.bottleneck = 128 if size.hidden <= 512 else 256
    rows.append(step_size(c, size, sizes.landmarks, sizes.targets, sizes.repeats,
                          sizes.block_seconds, peaks, measured))
  return {"sizes": rows}


def measure_feed(config, dataset, batch_size: int, batches: int) -> dict[str, Any]:
  """Examples/s each input path delivers onto the devices (lsmtl_jax/feed.py):
  the host loader (placement 'host') and the gather from the resident matrix
  (placement 'device', what the paper run trains with). `examples_per_s` is the
  paper run's own feed."""
  order = loader.TrainOrder(dataset.split("train"), batch_size, config.seed)
  host = feed.host_feed_rate(dataset, order, batches, prefetch=config.data.prefetch)
  device = feed.device_feed_rate(dataset, order, batches)
  used = config.data.get("placement", "host")
  return {"source": f"placement '{used}' (lsmtl_jax/feed.py)", "batch_size": batch_size,
          "batches": batches, "host_examples_per_s": host, "device_examples_per_s": device,
          "examples_per_s": host if used == "host" else device}


def paper_config(config, sizes: bench_plan.Sizes, scratch: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  syn = c.data.synthetic
  syn.enabled, syn.num_samples = True, sizes.paper_profiles
  syn.num_landmarks, syn.num_targets = sizes.landmarks, sizes.targets
  c.data.path, c.data.cache_dir = "", os.path.join(scratch, "cache")
  c.model.trunk, c.model.depth, c.model.hidden = "densenet", sizes.paper_depth, sizes.paper_hidden
  c.model.dtype = "auto"
  c.lsmtl.lam, c.lsmtl.bottleneck, c.lsmtl.mask_rate = 0.1, 256, 0.1
  c.optim.learning_rate = 5e-4
  c.train.batch_size, c.train.eval_batch_size = sizes.paper_batch, 1024
  c.compare_with = ("lsr", "densenet")
  if "placement" in c.data:  # the device-resident feed, where the data section has it
    c.data.placement = "device"
  return c


GENERATE = """
import json, sys
from lsmtl_jax.data import synthetic
synthetic.cached(synthetic.SyntheticSpec(**json.loads(sys.argv[1])), sys.argv[2],
                 workers=int(sys.argv[3]))
"""


class Generation:
  """The paper part's compendium, generated by a child process on the host's
  cores from the start of the check, while the device parts run."""

  def __init__(self, config):
    fields = dict(config.data.synthetic.to_dict())
    fields.pop("enabled")
    self.started = time.perf_counter()
    self.proc = subprocess.Popen(
        [sys.executable, "-c", GENERATE, json.dumps(fields), config.data.cache_dir,
         str(bench_plan.generator_workers())], cwd=REPO,
        env=child_env("cpu"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  def wait(self, timeout: float) -> dict[str, Any]:
    waited = time.perf_counter()
    try:
      _, err = self.proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.communicate()
      raise RuntimeError(f"the compendium was not generated within the paper part's budget "
                         f"({time.perf_counter() - self.started:.0f} s since the check began)")
    if self.proc.returncode != 0:
      raise RuntimeError(f"generating the compendium failed: "
                         f"{(err.strip().splitlines() or ['no output'])[-1]}")
    now = time.perf_counter()
    return {"generate_s": now - self.started, "waited_s": now - waited}

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate()


def paper_part(config, sizes, budget_s, generation: Generation, step_s: float | None,
               max_steps: int) -> dict[str, Any]:
  start = time.perf_counter()
  gen = generation.wait(budget_s / 2)
  dataset = sources.load_dataset(config)  # the child's compendium, from the cache
  fed = measure_feed(config, dataset, sizes.paper_batch, sizes.feed_batches)
  per_step = max(step_s or 0.0, sizes.paper_batch / fed["examples_per_s"])
  reserve = 40.0 if sizes.paper_hidden > 1000 else 5.0  # compiles, LSR, the evaluations
  left = budget_s - (time.perf_counter() - start) - reserve
  steps = max(1, int(left / 2 / per_step))
  if max_steps:
    steps = min(steps, max_steps)
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.num_steps, c.train.num_epochs = steps, 0
  c.train.eval_every = c.train.checkpoint_every = steps
  c.train.log_every = max(1, steps // 10)
  c.train.patience = 10**6
  workdir = os.path.join(os.path.dirname(c.data.cache_dir), "paper_run")
  log(f"accelerator: paper-scale run, {steps:,} steps each ...")
  t = time.perf_counter()
  train.train_and_evaluate(c, workdir)
  out = {"profiles": sizes.paper_profiles, "steps_each": steps, **gen, "feed": fed,
         "step_s_assumed": per_step, "train_and_evaluate_s": time.perf_counter() - t,
         "test_mae": {}, "epochs_each": steps * sizes.paper_batch / len(dataset.split("train"))}
  for name, path in (("deep_lsmtl", workdir), ("lsr", os.path.join(workdir, "compare", "lsr")),
                     ("densenet", os.path.join(workdir, "compare", "densenet"))):
    with open(os.path.join(path, "results.json")) as f:
      out["test_mae"][name] = json.load(f)["splits"]["test"]["mae_mean"]
  return out


def predict_part(profiles: int, platform: str, budget_s: float, scratch: str) -> dict[str, Any]:
  workdir = os.path.join(scratch, "predict")
  report = os.path.join(scratch, "predict.json")
  cmd = [sys.executable, "-m", "lsmtl_jax.benchmark_predict", f"--workdir={workdir}",
         f"--profiles={profiles}", f"--json={report}", "--nokeep_outputs"]
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(platform), capture_output=True,
                          text=True, timeout=budget_s, check=False)
  except subprocess.TimeoutExpired:
    return {"stopped": f"still running at its budget of {budget_s:.0f} s"}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if proc.returncode != 0 or not os.path.isfile(report):
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
  with open(report) as f:
    return summarize_predict(json.load(f))


def summarize_predict(r: dict[str, Any]) -> dict[str, Any]:
  return {"profiles": r["profiles"], "profiles_per_s": r["profiles_per_s"],
          "wall_s": r["wall_s"], "startup_s": r["startup_s"], "stage_s": r["stage_s"],
          "stage_sum_over_wall": r["stage_sum_over_wall"],
          "peak_rss_bytes": r["peak_rss_bytes"]}


# ----------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------


def device_found() -> tuple[str, str]:
  device = jax.devices()[0]
  return device.platform, getattr(device, "device_kind", str(device))


def run_check(config, sizes: bench_plan.Sizes, parts_wanted, scratch: str,
              paper_steps: int = 0,
              save: Callable[[dict], None] = lambda r: None) -> dict[str, Any]:
  """Runs the parts in order; `save(report)` after each (a stopped run keeps them)."""
  platform, kind = device_found()
  log("accelerator: measuring the float32 and bfloat16 matmul peaks ...")
  side = 256 if sizes.landmarks < 100 else 4096  # toy sizes: a toy matmul
  measured = {d: perf.measured_matmul_peak(d, side) for d in bench_precision.DTYPES}
  peaks = perf.known_peak(kind)
  plan = bench_plan.make_plan(platform, kind, sizes, measured)
  report = {"suite": "accelerator", "platform": platform, "device_kind": kind,
            "devices": jax.device_count(), "jax": jax.__version__, "known_peak": peaks,
            "measured_matmul_peak": measured, "plan": [dataclasses.asdict(p) for p in plan],
            "plan_total": bench_plan.total_seconds(plan), "parts": {}}
  budgets = {p.name: p.budget_s for p in plan}
  sizes = dataclasses.replace(sizes, paper_profiles=plan[-1].detail["profiles"])
  paper = paper_config(config, sizes, scratch)
  generation = None
  if "paper" in parts_wanted:
    log(f"accelerator: generating {sizes.paper_profiles:,} synthetic GEO-shaped profiles in a "
        "child process, beside the device parts ...")
    generation = Generation(paper)
  runners: dict[str, Callable[[], dict]] = {
      "device_tests": lambda: device_tests(sizes.tests, platform, budgets["device_tests"],
                                           scratch),
      "steps": lambda: steps_part(config, sizes, peaks, measured, budgets["steps"]),
      "predict": lambda: predict_part(sizes.predict_profiles, platform, budgets["predict"],
                                      scratch),
      "paper": lambda: paper_part(paper, sizes, budgets["paper"], generation,
                                  _paper_step(report, sizes), paper_steps or sizes.paper_max_steps),
  }
  estimates = {p.name: p.estimate_s for p in plan}
  try:
    _run_parts(report, runners, parts_wanted, sizes, estimates, budgets, save)
  finally:
    if generation is not None:
      generation.stop()
  report["peak_device_bytes"] = stepbench.peak_device_memory()
  report["host_peak_rss"] = stepbench.host_peak_rss()
  return report


def _run_parts(report, runners, parts_wanted, sizes, estimates, budgets, save) -> None:
  for name in runners:
    if name not in parts_wanted or (name == "predict" and not sizes.predict_profiles):
      report["parts"][name] = {"skipped": "not asked for" if name not in parts_wanted
                               else "--predict_profiles=0"}
      continue
    start = time.perf_counter()
    try:
      result = runners[name]()
    except Exception as e:  # pylint: disable=broad-except  (the other parts still run)
      result = {"error": f"{type(e).__name__}: {e}"}
    result.update(wall_s=time.perf_counter() - start, estimate_s=estimates[name],
                  budget_s=budgets[name])
    report["parts"][name] = result
    save(report)


def _paper_step(report, sizes) -> float | None:
  """The measured bf16 step at the paper's size and batch, if the steps part timed it."""
  label = bench_plan.Size(sizes.paper_depth, sizes.paper_hidden, sizes.paper_batch).label
  for row in report["parts"].get("steps", {}).get("sizes", []):
    if row.get("label") == label and "bfloat16" in row:
      return row["bfloat16"]["step_s"]["median"]
  return None


def _tf(x) -> str:
  return "n/a" if x is None else f"{x / 1e12:.3g}"


def _gib(x) -> str:
  return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def format_markdown(r: dict[str, Any]) -> str:
  """The report a reader checks first; the JSON holds everything."""
  peaks = r["known_peak"]
  lines = [f"# Accelerator check: {r['device_kind']} ({r['platform']}, {r['devices']} "
           f"device{'s' if r['devices'] != 1 else ''}, jax {r['jax']})", "",
           f"Measured matmul peak: fp32 {_tf(r['measured_matmul_peak']['float32'])}, bf16 "
           f"{_tf(r['measured_matmul_peak']['bfloat16'])} TFLOP/s; known peak: "
           + (f"{peaks['name']} fp32/tf32 {_tf(peaks['float32'])}, bf16 {_tf(peaks['bfloat16'])}"
              " TFLOP/s" if peaks else "none listed for this device"), "",
           "| part | wall | estimate | budget | result |", "|---|---|---|---|---|"]
  for name, p in r["parts"].items():
    lines.append(f"| {name} | {p.get('wall_s', 0):.0f} s | {p.get('estimate_s', 0):.0f} s | "
                 f"{p.get('budget_s', 0):.0f} s | {_outcome(name, p)} |")
  steps = r["parts"].get("steps", {})
  if steps.get("sizes"):
    lines += ["", "## Train step (device-resident batches; fp32 and bf16 interleaved)", "",
              "| size | fp32 ms | bf16 ms | bf16/fp32 | MFU fp32 (known / measured peak) | "
              "MFU bf16 (known / measured) | peak device memory | guard estimate |",
              "|---|---|---|---|---|---|---|---|"]
    for s in steps["sizes"]:
      if "skipped" in s:
        lines.append(f"| {s['label']} | skipped: {s['skipped']} |||||||")
        continue
      f, b = s["float32"], s["bfloat16"]
      mfu = lambda t: (f"{100 * t['mfu_known_peak']:.1f} %" if t["mfu_known_peak"] is not None
                       else "n/a") + f" / {100 * t['mfu_measured_peak']:.1f} %"
      lines.append(f"| {s['label']} | {1e3 * f['step_s']['median']:.2f} | "
                   f"{1e3 * b['step_s']['median']:.2f} | "
                   f"{s['bf16_over_fp32_step']['median']:.2f} | {mfu(f)} | {mfu(b)} | "
                   f"{_gib(s['peak_device_bytes'])} | {_gib(s['guard_estimate_bytes'])} |")
  paper = r["parts"].get("paper", {})
  if "feed" in paper:
    lines += ["", f"Feed: host {paper['feed']['host_examples_per_s']:,.0f}, device "
              f"{paper['feed']['device_examples_per_s']:,.0f} examples/s; the run's: "
              f"{paper['feed']['examples_per_s']:,.0f} examples/s from "
              f"{paper['feed']['source']}; the paper-size step consumes "
              f"{paper['feed']['batch_size'] / paper['step_s_assumed']:,.0f} examples/s "
              "(the slower of the two sets the run's steps)."]
  if "test_mae" in paper:
    lines += ["", f"## Paper-scale run: {paper['profiles']:,} synthetic GEO-shaped profiles, "
              f"{paper['steps_each']:,} steps each ({paper['epochs_each']:.2f} epochs)", "",
              "| method | test MAE |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in paper["test_mae"].items()]
  lines += ["", f"Peak device memory (process): {_gib(r.get('peak_device_bytes'))}; host peak "
            f"RSS {_gib(r.get('host_peak_rss'))}."]
  return "\n".join(lines) + "\n"


def _outcome(name: str, p: dict[str, Any]) -> str:
  for key in ("skipped", "stopped", "error"):
    if key in p:
      return f"{key}: {p[key]}"
  if name == "device_tests":
    return (f"{p.get('passed', 0)} passed, {p.get('failed', 0)} failed, {p.get('errors', 0)} "
            f"errors, {p.get('skipped_tests', 0)} skipped" + (
                f" ({', '.join(p['failures'][:5])})" if p.get("failures") else ""))
  if name == "predict":
    return f"{p['profiles_per_s']:,.0f} profiles/s over {p['profiles']:,}"
  if name == "paper":
    return ", ".join(f"{k} {v:.4f}" for k, v in p["test_mae"].items())
  return f"{sum('float32' in s for s in p.get('sizes', []))} sizes timed"


# ----------------------------------------------------------------------------
# Command line (benchmark.py's --suite=accelerator|precision)
# ----------------------------------------------------------------------------


def sizes_from_flags() -> bench_plan.Sizes:
  sizes = dataclasses.replace(bench_plan.TOY if FLAGS.toy else bench_plan.Sizes(),
                              block_seconds=(0.05 if FLAGS.toy else 0.5))
  if FLAGS.predict_profiles >= 0:
    sizes = dataclasses.replace(sizes, predict_profiles=FLAGS.predict_profiles)
  if FLAGS.assume_host_cores:
    sizes = dataclasses.replace(sizes, host_cores=FLAGS.assume_host_cores)
  return sizes


def _outputs() -> tuple[str, str]:
  json_path = FLAGS.out
  md_path = FLAGS.markdown or (os.path.splitext(json_path)[0] + ".md" if json_path else "")
  for flag, path in (("--out", json_path), ("--markdown", md_path)):
    if path:
      if os.path.isdir(path):
        raise fileio.OutputError(f"{flag}={path}: is a directory; name a file")
      fileio.check_output_dir(os.path.dirname(os.path.abspath(path)))
  return json_path, md_path


def main_suite(suite: str, config) -> int:
  """Runs --suite=accelerator or precision; returns the exit status."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # children share the device
  try:
    json_path, md_path = _outputs()
    unknown = set(FLAGS.parts) - {"device_tests", "steps", "predict", "paper"}
    if unknown:
      raise bench_plan.PlanError(f"--parts: unknown {sorted(unknown)}")
    if suite == "precision":
      return _precision(config, json_path)
    sizes = sizes_from_flags()
    platform, kind = device_found()
    if FLAGS.dry_run:
      kind = FLAGS.assume_device or kind
      plan = bench_plan.make_plan(platform if not FLAGS.assume_device else "cuda", kind, sizes)
      print(bench_plan.format_plan(plan, kind))
      return 0
  except (bench_plan.PlanError, fileio.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  def save(report):
    if json_path:
      fileio.write_text(json_path, json.dumps(report, indent=1, default=float))
    if md_path:
      fileio.write_text(md_path, format_markdown(report))

  scratch = tempfile.mkdtemp(prefix="lsmtl_accel_", dir=FLAGS.scratch or None)
  try:
    report = run_check(config, sizes, FLAGS.parts, scratch, FLAGS.paper_steps, save)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  save(report)
  print(json.dumps(report, indent=1, default=float) if FLAGS.json else format_markdown(report))
  return 0


def _precision(config, json_path: str) -> int:
  data = config.data.synthetic
  sizes = bench_precision.parse_sizes(FLAGS.precision_sizes, config.train.batch_size)
  report = bench_precision.run_suite(config, sizes, data.num_landmarks, data.num_targets,
                                     FLAGS.repeats, FLAGS.block_seconds, log)
  if json_path:
    fileio.write_text(json_path, json.dumps(report, indent=1))
  print(json.dumps(report, indent=1) if FLAGS.json else bench_precision.format_report(report))
  return 0
