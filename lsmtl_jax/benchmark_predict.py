"""Predict at LINCS scale: throughput, where the time goes, memory, projections.

  python -m lsmtl_jax.benchmark_predict --workdir=/tmp/bench_predict --profiles=100000 \
    [--input=LINCS.gctx] [--model=MODEL] [--json=FILE]

1. Input: a GCTx in the layout of CMap's LINCS Level 3 file (samples x 12,328
   genes float32, cmapPy chunking, Entrez-style numeric ids at /0/META/ROW/id,
   978 landmarks scattered among them and flagged by pr_is_lm, pr_gene_symbol,
   LINCS-like sample ids), written block by block, never whole in memory; or
   --input. The first --small_profiles rows are cut into a second file.
2. Model: --model, or a short training run (python -m lsmtl_jax.main, demo
   width, 978 landmarks, 11,350 targets, a few steps on the synthetic
   compendium) exported with python -m lsmtl_jax.export and its genes renamed
   to the input's ids. Its weights are nearly untrained: speed does not depend
   on them.
3. The reader and the writer alone: the input read in predict's row blocks,
   as many bytes written with predict's GCTx writer, nothing else running.
4. python -m lsmtl_jax.predict --intervals=0.9 to GCTx, once per file, each in
   a child process: wall time, the child's own peak RSS (wait4), and predict's
   summary (--summary_json): busy seconds of reading, computing (the model
   part apart) and writing, bytes read and written.

Reported: profiles/s, the stage split and whether the stages overlapped (the
sum of the busy seconds over the wall), peak RSS at both sizes and its growth
per profile, MB/s of each I/O stage, FLOPs per profile (2 per multiply-add of
every dense kernel, the padded head included) and the compute stage's FLOP/s,
and the time for the whole LINCS file (1,319,138 profiles) on this CPU (the
measured rate) and on one GPU (the model at --gpu_fraction of --gpu_peak_tflops,
the host work at this CPU's measured rate, the I/O at the rates of step 3: in
the run the I/O threads share the cores with the model, which a GPU frees).

The input was just written, so reads come from the page cache where it fits
in RAM, and writes go to the page cache and the disk behind it: the MB/s are
this machine's with its cache, not a cold disk's (a whole LINCS run, 264 GB,
meets the disk's own rates).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np

import lsmtl_jax
from lsmtl_jax import fileio
from lsmtl_jax import model_file
from lsmtl_jax.data import formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lsmtl_jax.__file__)))
LINCS_PROFILES = 1_319_138  # GSE92742 Level 3 (INF_mlr12k)
LINCS_GENES, LINCS_LANDMARKS = 12_328, 978
WRITE_ROWS = 1000  # rows per generated block: cmapPy's chunk height
HOST_WORK = "host work (standardize, bounds, float32)"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs, not on import: experiments and
  predict define --workdir, --input and --model too, and tests import them all
  into one process."""
  flags.DEFINE_string("workdir", None, "Where the input, model, outputs and report go.")
  flags.DEFINE_integer("profiles", 100_000, "Profiles in the generated input.")
  flags.DEFINE_integer("small_profiles", 0, "Profiles of the second, smaller run that shows "
                       "whether peak RSS grows with the input (0: a tenth, at least four "
                       "blocks so the pipeline fills, at most half).")
  flags.DEFINE_string("input", "", "Reuse this LINCS-shaped GCTx instead of generating one.")
  flags.DEFINE_string("model", "", "Predict with this model file instead of training one.")
  flags.DEFINE_integer("genes", LINCS_GENES, "Genes (rows) of the generated input.")
  flags.DEFINE_integer("landmarks", LINCS_LANDMARKS, "Landmarks of the trained model.")
  flags.DEFINE_string("train_config", "configs/demo.py", "Config of the trained model.")
  flags.DEFINE_integer("hidden", 0, "Width of the trained model (0: the config's).")
  flags.DEFINE_integer("train_steps", 4, "Training steps of the trained model.")
  flags.DEFINE_integer("train_samples", 600, "Synthetic profiles it trains on.")
  flags.DEFINE_float("intervals", 0.9, "Coverage of the prediction intervals written.")
  flags.DEFINE_integer("block_rows", 4096, "predict --block_rows.")
  flags.DEFINE_integer("batch_size", 1024, "predict --batch_size.")
  flags.DEFINE_float("gpu_peak_tflops", 67.0, "The GPU's float32 peak (H100 SXM: 67 TFLOP/s "
                     "without tensor cores).")
  flags.DEFINE_float("gpu_fraction", 0.5, "Fraction of that peak assumed for the model.")
  flags.DEFINE_bool("keep_outputs", True, "Keep the large run's outputs (3 GCTx files).")
  flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")


class BenchmarkError(ValueError):
  """Flags that cannot be measured; the message names them."""


def check_flags() -> None:
  if FLAGS.profiles < 2 and not FLAGS.input:
    raise BenchmarkError(f"--profiles={FLAGS.profiles}: at least 2 (a smaller run is made too)")
  if not 0 < FLAGS.landmarks < FLAGS.genes:
    raise BenchmarkError(f"--landmarks={FLAGS.landmarks} must be positive and fewer than "
                         f"--genes={FLAGS.genes}")
  if not 0 < FLAGS.intervals < 1:
    raise BenchmarkError(f"--intervals={FLAGS.intervals:g} is a coverage in (0, 1)")
  if FLAGS.gpu_peak_tflops <= 0 or not 0 < FLAGS.gpu_fraction <= 1:
    raise BenchmarkError("--gpu_peak_tflops must be positive and --gpu_fraction in (0, 1]")
  for flag in ("input", "model"):
    if FLAGS[flag].value and not os.path.isfile(FLAGS[flag].value):
      raise BenchmarkError(f"--{flag}={FLAGS[flag].value}: no such file")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


RSS_POLL_S = 0.1


def _rss_bytes(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:  # not Linux, or the child has ended
    pass
  return None


def _sample_rss(pid: int, done: threading.Event, samples: list) -> None:
  t0 = time.perf_counter()
  while not done.wait(RSS_POLL_S):
    rss = _rss_bytes(pid)
    if rss is not None:
      samples.append((time.perf_counter() - t0, rss))


def rss_by_quarter(samples: list[tuple[float, int]], wall: float) -> list[int | None]:
  """The highest sampled RSS in each quarter of the run's wall time: flat
  after the first once the stream's buffers are all made, rising if memory
  grows with the profiles streamed."""
  peaks: list[int | None] = [None] * 4
  for t, rss in samples:
    q = min(3, int(4 * t / max(wall, 1e-9)))
    peaks[q] = rss if peaks[q] is None else max(peaks[q], rss)
  return peaks


def _child(cmd: list[str], log_path: str) -> dict:
  """Runs `cmd`; its wall and CPU seconds, its own peak RSS (wait4) and the
  peak of its RSS sampled in each quarter of its wall time."""
  t = time.perf_counter()
  samples: list[tuple[float, int]] = []
  done = threading.Event()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, done, samples), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    lines = [l for l in open(log_path).read().splitlines() if l.strip()]
    last = next((l for l in reversed(lines) if l.startswith("error:")), lines[-1] if lines
                else "")
    raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}; whole output "
                       f"in {log_path}): {last}")
  return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
          # The kernel's high-water mark lags the live count a little (per-thread
          # counters are folded in now and then), so a sample can top it.
          "peak_rss_bytes": max([usage.ru_maxrss * 1024, *(rss for _, rss in samples)]),
          "rss_by_quarter_bytes": rss_by_quarter(samples, wall)}


# The model.


def entrez_ids(landmarks: int, targets: int, seed: int = 0) -> tuple[list[str], list[str]]:
  """Numeric ids like Entrez's for a model's landmarks and targets."""
  ids = np.random.default_rng(seed).choice(np.arange(1, 120_000), landmarks + targets,
                                           replace=False)
  return [str(i) for i in ids[:landmarks]], [str(i) for i in ids[landmarks:]]


def train_model(workdir: str, landmarks: int, targets: int) -> str:
  """A short demo-width run on the synthetic compendium, exported; the path."""
  run = os.path.join(workdir, f"train_{landmarks}x{targets}")
  model = os.path.join(workdir, f"synthetic_{landmarks}x{targets}.lsmtl")
  overrides = [f"--config.data.synthetic.num_landmarks={landmarks}",
               f"--config.data.synthetic.num_targets={targets}",
               f"--config.data.synthetic.num_samples={FLAGS.train_samples}",
               f"--config.data.cache_dir={os.path.join(workdir, 'cache')}",
               f"--config.train.num_steps={FLAGS.train_steps}", "--config.compare_with=()",
               "--config.report=false"]
  if FLAGS.hidden:
    overrides.append(f"--config.model.hidden={FLAGS.hidden}")
  if not os.path.exists(model):
    _log(f"training {FLAGS.train_steps} steps ({landmarks} -> {targets}) in {run} ...")
    config = FLAGS.train_config
    config = os.path.abspath(config) if os.path.exists(config) else os.path.join(REPO, config)
    _child([sys.executable, "-m", "lsmtl_jax.main", f"--config={config}",
            f"--workdir={run}", *overrides], os.path.join(workdir, "train.log"))
    _child([sys.executable, "-m", "lsmtl_jax.export", f"--workdir={run}",
            f"--output={model}"], os.path.join(workdir, "export.log"))
  return model


def renamed(src: str, dst: str, landmark_ids: list[str], target_ids: list[str]) -> str:
  """A copy of the model file `src` whose genes carry the given ids (symbols
  GENE<id>): the same numbers under the input's names."""
  contents = model_file.read(src)
  for part, ids in (("landmarks", landmark_ids), ("targets", target_ids)):
    getattr(contents, part).update(ids=list(ids), symbols=[f"GENE{i}" for i in ids])
  model_file.write(dst, contents)
  return dst


def flops_per_profile(variables: dict) -> int:
  """2 FLOPs per multiply-add of every dense kernel (the padded head included);
  normalization and activations are left out."""
  total = 0
  stack = [variables["params"]]
  while stack:
    node = stack.pop()
    for key, value in node.items():
      if isinstance(value, dict):
        stack.append(value)
      elif key == "kernel" and np.ndim(value) == 2:
        total += 2 * int(np.size(value))
  return total


# The input.


def write_lincs_like(path: str, profiles: int, gene_ids: list[str], is_lm: np.ndarray,
                     mean: np.ndarray, sd: np.ndarray, seed: int = 0) -> None:
  """A LINCS Level 3-shaped GCTx: values mean + sd * N(0, 1) per gene (float32),
  block by block from (seed, block) so any size streams in bounded memory."""
  mean32, sd32 = mean.astype(np.float32), sd.astype(np.float32)

  def blocks():
    for b, start in enumerate(range(0, profiles, WRITE_ROWS)):
      rng = np.random.default_rng([seed, b])
      z = rng.standard_normal((min(WRITE_ROWS, profiles - start), len(gene_ids)), np.float32)
      yield z * sd32 + mean32

  cells = ("A375", "MCF7", "PC3", "VCAP", "HA1E", "HT29", "A549", "HEPG2")
  sample_ids = [f"BEN{i // 384:04d}_{cells[(i // 384) % 8]}_24H_X{1 + (i // 3072) % 3}_B1_"
                f"DUO52HI53LO:{'ABCDEFGHIJKLMNOP'[(i % 384) // 24]}{i % 24 + 1:02d}"
                for i in range(profiles)]
  formats.write_gctx(path, blocks(), sample_ids, gene_ids, row_meta={
      "pr_gene_id": np.array([int(g) if g.isdigit() else -666 for g in gene_ids], np.int64),
      "pr_gene_symbol": np.array([f"GENE{g}" for g in gene_ids], object),
      "pr_is_lm": is_lm})


def cut(src: str, dst: str, rows: int) -> None:
  """The first `rows` profiles of the GCTx `src` with its metadata, streamed."""
  with formats.open_matrix(src, "gctx") as m:
    step = max(1, m.row_chunk) * 4
    blocks = (m.read_rows(s, min(rows, s + step)) for s in range(0, rows, step))
    col = {k: v[:rows] for k, v in m.column_metadata().items()}
    row = formats.read_gctx_metadata(src, formats.ROW_META_GROUP)
    formats.write_gctx(dst, blocks, m.sample_ids[:rows], m.gene_ids, row_meta=row,
                       col_meta=col)


def input_layout(contents: model_file.Contents) -> tuple[list[str], np.ndarray, np.ndarray,
                                                         np.ndarray]:
  """(gene ids, landmark flags, mean, sd) of an input for a model's genes: its
  landmarks at their training mean and spread, the rest around 8 +- 1.5 log2,
  filler ids up to --genes."""
  lm, tg = contents.landmarks["ids"], contents.targets["ids"]
  genes = lm + tg
  genes += [f"9{i:07d}" for i in range(max(0, FLAGS.genes - len(genes)))]
  order = np.random.default_rng(1).permutation(len(genes))  # landmarks scattered
  genes = [genes[i] for i in order]
  is_lm = np.isin(genes, lm).astype(np.int64)
  stats = contents.standardization
  by_id = dict(zip(lm, zip(stats["mean"][:len(lm)], stats["std"][:len(lm)] + stats["eps"])))
  mean = np.array([by_id.get(g, (8.0, 1.5))[0] for g in genes])
  sd = np.array([by_id.get(g, (8.0, 1.5))[1] for g in genes])
  return genes, is_lm, mean, sd


def prepare(workdir: str, model: str = "", large: str = "") -> tuple[str, str, str]:
  """(model, large input, small input), made or reused."""
  if not model:
    lm, tg = entrez_ids(FLAGS.landmarks, FLAGS.genes - FLAGS.landmarks)
    model = os.path.join(workdir, f"model_{len(lm)}x{len(tg)}.lsmtl")
    if not os.path.exists(model):
      renamed(train_model(workdir, len(lm), len(tg)), model, lm, tg)
  contents = model_file.read(model)
  if not large:  # named after the model, whose genes it carries
    stem = os.path.splitext(os.path.basename(model))[0]
    large = os.path.join(workdir, f"lincs_{FLAGS.profiles}_{stem}.gctx")
    if not os.path.exists(large):
      t = time.perf_counter()
      write_lincs_like(large, FLAGS.profiles, *input_layout(contents))
      _log(f"wrote {large} in {time.perf_counter() - t:.0f} s")
  with formats.open_matrix(large, "gctx") as m:
    n = m.num_samples
  rows = FLAGS.small_profiles or max(1, min(n // 2, max(n // 10, 4 * FLAGS.block_rows)))
  if not 0 < rows < n:
    raise BenchmarkError(f"--small_profiles={rows} must be between 1 and the input's "
                         f"{n} profiles, less than all of them")
  small = os.path.join(workdir, f"first_{rows}.gctx")
  cut(large, small, rows)  # always: --input may have changed
  return model, large, small


# Measure and report.


def io_rates(path: str, workdir: str, block_rows: int) -> dict:
  """Bytes/s of reading `path` alone through predict's reader (row blocks of
  GctxMatrix) and of writing as many bytes alone through its writer
  (write_gctx), nothing else running: the I/O stages' rates on a machine
  whose cores the model does not hold, as on a GPU host."""
  probe = os.path.join(workdir, "io_probe.gctx")
  with formats.open_matrix(path, "gctx") as m:
    n = m.num_samples
    chunk = max(1, m.row_chunk)
    step = max(chunk, block_rows // chunk * chunk)
    t, first = time.perf_counter(), None
    for start in range(0, n, step):
      block = m.read_rows(start, min(n, start + step))
      if first is None:
        first = block  # what the write repeats
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    formats.write_gctx(probe, (first[:min(step, n - s)] for s in range(0, n, step)),
                       m.sample_ids, m.gene_ids)
    write_s = time.perf_counter() - t
  written = os.path.getsize(probe)
  os.remove(probe)
  return {"read_bytes_per_s": n * m.num_genes * 4 / read_s,
          "write_bytes_per_s": written / write_s}


def predict_child(model: str, inp: str, out: str, workdir: str) -> dict:
  name = os.path.splitext(os.path.basename(out))[0]
  summary_path = os.path.join(workdir, f"{name}.summary.json")
  cmd = [sys.executable, "-m", "lsmtl_jax.predict", f"--model={model}", f"--input={inp}",
         f"--output={out}", f"--intervals={FLAGS.intervals}", "--overwrite",
         f"--block_rows={FLAGS.block_rows}", f"--batch_size={FLAGS.batch_size}",
         f"--summary_json={summary_path}"]
  _log(f"predict {inp} ...")
  usage = _child(cmd, os.path.join(workdir, f"{name}.log"))
  with open(summary_path) as f:
    return {**usage, "summary": json.load(f)}


def _outputs(child: dict) -> list[str]:
  return [child["summary"]["output"], *child["summary"].get("interval_files", [])]


def analyse(small: dict, large: dict, flops: int, alone: dict) -> dict:
  s = large["summary"]
  st, n = s["stages"], s["profiles"]
  host = st["compute"] - st["model"]
  read_rate = s["read_bytes"] / max(st["read"], 1e-9)
  write_rate = s["written_bytes"] / max(st["write"], 1e-9)
  rate = n / st["wall"]
  startup = large["wall_s"] - st["wall"]  # import, model load, compile, metadata
  ns, nl = small["summary"]["profiles"], n
  growth = ((large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (nl - ns)
            if nl > ns else None)
  gpu_flops = FLAGS.gpu_peak_tflops * 1e12 * FLAGS.gpu_fraction
  per = {"gpu model": LINCS_PROFILES * flops / gpu_flops,
         HOST_WORK: LINCS_PROFILES * host / n,
         "read": LINCS_PROFILES * s["read_bytes"] / n / alone["read_bytes_per_s"],
         "write": LINCS_PROFILES * s["written_bytes"] / n / alone["write_bytes_per_s"]}
  # The compute thread runs the model and the host work one after the other;
  # reads and writes take turns on h5py's lock: the slower of the two bounds.
  bounds = {"compute (gpu model + host work)": per["gpu model"] + per[HOST_WORK],
            "I/O (read + write)": per["read"] + per["write"]}
  dominant = max(bounds, key=bounds.get)
  return {
      "profiles": n, "genes": s["genes"], "landmarks": s["landmarks"], "targets": s["targets"],
      "intervals": s.get("intervals"), "profiles_per_s": rate,
      "profiles_per_s_with_startup": n / large["wall_s"], "wall_s": large["wall_s"],
      "stream_wall_s": st["wall"], "startup_s": startup,
      "stage_s": {k: st[k] for k in ("read", "compute", "model", "write")},
      "host_compute_s": host, "waited_s": {"compute_for_read": st["waited_for_read"],
                                           "compute_for_write": st["waited_for_write"]},
      "stage_sum_over_wall": (st["read"] + st["compute"] + st["write"]) / st["wall"],
      "cpu_s": large["cpu_s"],
      "peak_rss_bytes": {str(ns): small["peak_rss_bytes"], str(nl): large["peak_rss_bytes"]},
      "rss_growth_bytes_per_profile": growth,
      "rss_by_quarter_bytes": {str(ns): small["rss_by_quarter_bytes"],
                               str(nl): large["rss_by_quarter_bytes"]},
      "stream_buffers": {str(ns): small["summary"]["stages"].get("buffers"),
                         str(nl): s["stages"].get("buffers")},
      "output_bytes_per_profile": s["written_bytes"] / n,
      "read_bytes": s["read_bytes"], "written_bytes": s["written_bytes"],
      "read_mb_per_s": read_rate / 1e6, "write_mb_per_s": write_rate / 1e6,
      "alone_read_mb_per_s": alone["read_bytes_per_s"] / 1e6,
      "alone_write_mb_per_s": alone["write_bytes_per_s"] / 1e6,
      "flops_per_profile": flops, "model_flop_per_s": n * flops / max(st["model"], 1e-9),
      "compute_stage_flop_per_s": n * flops / max(st["compute"], 1e-9),
      "lincs": {"profiles": LINCS_PROFILES,
                "cpu_s": startup + LINCS_PROFILES / rate,
                "input_bytes": LINCS_PROFILES * s["read_bytes"] / n,
                "output_bytes": LINCS_PROFILES * s["written_bytes"] / n,
                "gpu_assumed_flop_per_s": gpu_flops, "gpu_parts_s": per,
                "gpu_bounds_s": bounds, "gpu_s": startup + bounds[dominant],
                "gpu_bound_by": dominant},
      "small_run": {"profiles": ns, "wall_s": small["wall_s"],
                    "profiles_per_s": ns / small["summary"]["stages"]["wall"]},
      "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
  }


def _h(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 5400 else (
      f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s")


def _num(x) -> str:
  return "n/a" if x is None else f"{x:,.0f}"


def format_report(r: dict) -> str:
  st, lincs = r["stage_s"], r["lincs"]
  rss = r["peak_rss_bytes"]
  sizes = sorted(rss, key=int)
  rows = [
      ("profiles x genes (landmarks + targets)",
       f"{r['profiles']:,} x {r['genes']:,} ({r['landmarks']:,} + {r['targets']:,}), "
       f"intervals {r['intervals']}"),
      ("profiles/s (streaming; with startup)",
       f"**{r['profiles_per_s']:,.0f}**; {r['profiles_per_s_with_startup']:,.0f}"),
      ("wall (streaming + startup)",
       f"{_h(r['wall_s'])} ({_h(r['stream_wall_s'])} + {_h(r['startup_s'])})"),
      ("busy: read / compute (model, host) / write",
       f"{st['read']:.1f} / {st['compute']:.1f} ({st['model']:.1f}, {r['host_compute_s']:.1f})"
       f" / {st['write']:.1f} s"),
      ("overlap: sum of busy / wall", f"{r['stage_sum_over_wall']:.2f}"),
      ("compute waited for read / for write",
       f"{r['waited_s']['compute_for_read']:.1f} / {r['waited_s']['compute_for_write']:.1f} s"),
      ("peak RSS by profiles", ", ".join(f"{int(k):,}: {rss[k] / 2**20:,.0f} MiB"
                                         for k in sizes)),
      ("peak RSS in each quarter of the run, by profiles",
       "; ".join(f"{int(k):,}: " + " / ".join("-" if v is None else f"{v / 2**20:,.0f}"
                                             for v in r["rss_by_quarter_bytes"][k]) + " MiB"
                 for k in sizes)),
      ("output blocks made (reused after)",
       "; ".join(f"{int(k):,}: " + ", ".join(f"{n} {c}" for n, c in
                                            (r["stream_buffers"][k] or {}).items())
                 for k in sizes)),
      ("RSS growth per profile (output per profile)",
       f"{_num(r['rss_growth_bytes_per_profile'])} B ({r['output_bytes_per_profile']:,.0f} B)"),
      ("read: bytes, MB/s in the run (alone)",
       f"{r['read_bytes'] / 1e9:.2f} GB, {r['read_mb_per_s']:,.0f} "
       f"({r['alone_read_mb_per_s']:,.0f})"),
      ("write: bytes, MB/s in the run (alone)",
       f"{r['written_bytes'] / 1e9:.2f} GB, {r['write_mb_per_s']:,.0f} "
       f"({r['alone_write_mb_per_s']:,.0f})"),
      ("FLOPs per profile", f"{r['flops_per_profile'] / 1e6:,.1f} M"),
      ("FLOP/s: model, compute stage", f"{r['model_flop_per_s'] / 1e9:,.1f} G, "
                                       f"{r['compute_stage_flop_per_s'] / 1e9:,.1f} G"),
      (f"LINCS {lincs['profiles']:,} profiles, this CPU",
       f"**{_h(lincs['cpu_s'])}** ({lincs['input_bytes'] / 1e9:,.0f} GB in, "
       f"{lincs['output_bytes'] / 1e9:,.0f} GB out)"),
      ("LINCS, one GPU (model at "
       f"{lincs['gpu_assumed_flop_per_s'] / 1e12:.1f} TFLOP/s)",
       f"**{_h(lincs['gpu_s'])}**, bound by {lincs['gpu_bound_by']}: "
       + ", ".join(f"{k} {_h(v)}" for k, v in lincs["gpu_parts_s"].items())),
  ]
  return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(FLAGS.workdir)  # the children run in the repository
  try:  # before minutes of work
    check_flags()
    fileio.check_output_dir(workdir)
    check_disk(workdir)
    if FLAGS.json:
      fileio.check_output_dir(os.path.dirname(os.path.abspath(FLAGS.json)))
  except (BenchmarkError, fileio.OutputError, formats.PrepareError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(workdir, exist_ok=True)
  try:
    report = measure(workdir)
  except (BenchmarkError, model_file.ModelFileError, formats.PrepareError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(report))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    fileio.write_json(FLAGS.json, report)


def check_disk(workdir: str) -> None:
  """Refuses before any work when the files cannot fit (a full disk would
  fail predict, and the machine's other users, halfway)."""
  if FLAGS.input:
    with formats.open_matrix(FLAGS.input, "gctx") as m:
      n, genes, files = m.num_samples, m.num_genes, 3.0
  else:
    n, genes, files = FLAGS.profiles, FLAGS.genes, 4.0  # the input and three outputs
  need = n * genes * 4 * (files + 0.2)  # and the first rows cut for the small run
  folder = workdir
  while not os.path.isdir(folder):  # it may not exist yet
    folder = os.path.dirname(folder)
  free = shutil.disk_usage(folder).free
  if need > free:
    raise BenchmarkError(f"--workdir={workdir}: needs about {need / 1e9:.3g} GB of disk, "
                         f"{free / 1e9:.3g} GB are free")


def measure(workdir: str) -> dict:
  model, large, small = prepare(workdir, FLAGS.model and os.path.abspath(FLAGS.model),
                                FLAGS.input and os.path.abspath(FLAGS.input))
  flops = flops_per_profile(model_file.read(model).variables)
  _log("timing the reader and the writer alone ...")
  alone = io_rates(large, workdir, FLAGS.block_rows)
  out_small = os.path.join(workdir, "predicted_small.gctx")
  out_large = os.path.join(workdir, "predicted.gctx")
  small_run = predict_child(model, small, out_small, workdir)
  for path in _outputs(small_run):
    os.remove(path)
  large_run = predict_child(model, large, out_large, workdir)
  report = analyse(small_run, large_run, flops, alone)
  report.update(model=model, input=large, output=out_large)
  if not FLAGS.keep_outputs:
    for path in _outputs(large_run):
      os.remove(path)
  return report


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
