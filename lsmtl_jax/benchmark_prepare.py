"""Prepare throughput and peak memory on a generated GEO-shaped GCTx.

  python -m lsmtl_jax.benchmark_prepare --workdir=/tmp/bench --samples=20000 \
    [--maps_from=map_lm.txt,map_tg.txt]

Writes a samples x 22,268 GCTx (cmapPy chunking) with matching maps, times a
plain h5py read of the whole file in row blocks, then runs
`python -m lsmtl_jax.prepare --config=configs/prepare/geo.py` on it in a child
process and reports its wall time, MB/s of input file per second, and peak
RSS (the child's ru_maxrss). Both reads find the file in the page cache when
it fits in RAM; the comparison is of the work done per byte, not the disk.
"""

import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import h5py
import numpy as np

import lsmtl_jax
from lsmtl_jax.data import formats
from lsmtl_jax.data import synthetic_gctx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lsmtl_jax.__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the GCTx, maps and dataset go.")
flags.DEFINE_integer("samples", 20000, "Samples in the generated GCTx.")
flags.DEFINE_integer("probes", synthetic_gctx.GEO_PROBES, "Probes (columns).")
flags.DEFINE_string("maps_from", "", "LM_MAP,TG_MAP of D-GEX; default: generated maps.")
flags.DEFINE_bool("dedup", True, "Run the duplicate removal (the GEO config does).")


def h5py_read(path: str) -> tuple[float, int]:
  t = time.time()
  total = 0
  with h5py.File(path, "r", rdcc_nbytes=64 << 20) as f:
    data = f[formats.DATA_NODE]
    step = data.chunks[0] if data.chunks else 1000
    for start in range(0, data.shape[0], step):
      total += np.asarray(data[start:start + step]).nbytes
  return time.time() - t, total


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  data = os.path.join(FLAGS.workdir, f"geo_{FLAGS.samples}x{FLAGS.probes}.gctx")
  maps_dir = os.path.join(FLAGS.workdir, "maps")
  gene_probes, include = [], []
  if FLAGS.maps_from:
    lm, tg = FLAGS.maps_from.split(",")
    gene_probes = synthetic_gctx.read_map_probes(lm) + synthetic_gctx.read_map_probes(tg)
    include = [p for g in gene_probes for p in g]
  probes = synthetic_gctx.probe_ids(FLAGS.probes, 0, include)
  if not FLAGS.maps_from:
    lm, tg = synthetic_gctx.write_maps(maps_dir, probes, 943, 9520, 0)
    gene_probes = synthetic_gctx.read_map_probes(lm) + synthetic_gctx.read_map_probes(tg)
  if not os.path.exists(data):
    t = time.time()
    synthetic_gctx.generate_gctx(data, FLAGS.samples, probes, gene_probes)
    print(f"generated {data} in {time.time() - t:.0f} s", flush=True)
  size = os.path.getsize(data)
  read_s, read_bytes = h5py_read(data)
  out = os.path.join(FLAGS.workdir, "dataset")
  if os.path.exists(out):
    import shutil
    shutil.rmtree(out)
  cmd = [sys.executable, "-m", "lsmtl_jax.prepare",
         f"--config={os.path.join(REPO, 'configs', 'prepare', 'geo.py')}",
         f"--config.input.path={data}", f"--config.genes.landmark_map={lm}",
         f"--config.genes.target_map={tg}", f"--config.output={out}",
         f"--config.dedup.enabled={FLAGS.dedup}", "--alsologtostderr"]
  t = time.time()
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  prep_s = time.time() - t
  if r.returncode != 0:
    sys.exit(f"prepare failed ({r.returncode}):\n{r.stderr[-3000:]}")
  peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  m = re.search(r"read (\d+) MB", r.stderr)
  result = {
      "samples": FLAGS.samples, "probes": FLAGS.probes, "file_mb": size / 2**20,
      "h5py_read_s": read_s, "h5py_read_mb_per_s": read_bytes / 2**20 / read_s,
      "prepare_s": prep_s, "prepare_mb_per_s": size / 2**20 / prep_s,
      "prepare_bytes_read_mb": int(m.group(1)) if m else None,
      "prepare_peak_rss_mb": peak_mb, "dedup": FLAGS.dedup, "cpus": os.cpu_count(),
      "log_tail": [ln.split("] ", 1)[-1] for ln in r.stderr.splitlines()[-8:]],
  }
  with open(os.path.join(FLAGS.workdir, "benchmark_prepare.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1))
  print("\n".join(result["log_tail"]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
