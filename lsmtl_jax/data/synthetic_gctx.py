"""A GEO-shaped GCTx of any size, with HG-U133A-style probe ids, written in row blocks.

  python -m lsmtl_jax.data.synthetic_gctx --out=geo_like.gctx --samples=20000 \
    --maps_from=map_lm.txt,map_tg.txt        # use the D-GEX maps' real probe ids
  python -m lsmtl_jax.data.synthetic_gctx --out=geo_like.gctx --samples=2000 \
    --write_maps=DIR                         # or generate matching map files

Probes of one mapped gene share the gene's signal (plus probe noise), so probe
averaging and landmark -> target regression mean something. A gene's signal
is a nonlinear function of a few latent programs. A fraction of samples are
near copies (distance well under 1.0) of an earlier sample in their block,
for the duplicate removal to find. Values are log2-like, in about 2-16.

With `group_size` R > 0 the samples come in groups of R consecutive samples
(donors, GEO series) named in the column field `donor` (D0, D1, ...), and each
group adds its own offset to every gene: N(0, group_effect^2) per mapped gene
(shared by the gene's probes), independent across genes and groups. A target's
offset is thus not a function of the landmarks' in general, only recognisable
through the group: a model can learn it from other samples of the group and
nothing else, which is what a random split lets it do and a grouped one does
not. group_effect is in log2 units (the gene signal's sd is about 1.2-1.5).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from lsmtl_jax.data import formats

GEO_PROBES = 22268  # HG-U133A probes in bgedv2_QNORM.gctx
_SUFFIXES = ("_at", "_s_at", "_x_at", "_at", "_at", "_s_at")


def probe_ids(num: int, seed: int = 0, include: Sequence[str] = ()) -> list[str]:
  """`include` first, then HG-U133A-style ids (200000_s_at ...) up to `num`."""
  out, seen = list(dict.fromkeys(include))[:num], set(include)
  rng = np.random.default_rng([seed, 20])
  n = 200000
  while len(out) < num:
    pid = f"{n}{_SUFFIXES[int(rng.integers(len(_SUFFIXES)))]}"
    n += 1
    if pid not in seen:
      seen.add(pid)
      out.append(pid)
  return out


def read_map_probes(path: str) -> list[list[str]]:
  with open(path) as f:
    return [ln.rstrip("\n").split("\t")[2].split(",") for ln in f if ln.strip()]


def write_maps(directory: str, probes: Sequence[str], num_landmarks: int, num_targets: int,
               seed: int = 0) -> tuple[str, str]:
  """D-GEX-style maps over `probes`: one probe per landmark, 1-13 per target."""
  rng = np.random.default_rng([seed, 21])
  order = rng.permutation(len(probes))
  # D-GEX's targets: ~60 % one probe, ~23 % two, a tail up to 13.
  counts = np.minimum(rng.geometric(0.58, num_targets), 13)
  need = num_landmarks + counts.sum()
  if need > len(probes):
    raise ValueError(f"{need} probes needed for the maps, only {len(probes)} exist")
  os.makedirs(directory, exist_ok=True)
  paths = (os.path.join(directory, "map_lm.txt"), os.path.join(directory, "map_tg.txt"))
  pos = 0
  with open(paths[0], "w") as f:
    for i in range(num_landmarks):
      f.write(f"LMG{i}\tENSG{90000000000 + i:011d}\t{probes[order[pos]]}\n")
      pos += 1
  with open(paths[1], "w") as f:
    for i, c in enumerate(counts):
      picked = ",".join(probes[j] for j in order[pos:pos + c])
      pos += c
      f.write(f"TGG{i}\tENSG{91000000000 + i:011d}\t{picked}\n")
  return paths


def generate_gctx(path: str, num_samples: int, probes: Sequence[str],
                  gene_probes: Sequence[Sequence[str]] = (), seed: int = 0,
                  duplicate_fraction: float = 0.02, num_programs: int = 16,
                  block_rows: int = 1000, chunk_rows: int | None = None,
                  group_size: int = 0, group_effect: float = 0.5) -> None:
  num_probes = len(probes)
  rng = np.random.default_rng([seed, 22])
  # Each probe reads one "unit": its mapped gene's, or its own when unmapped.
  index = {p: i for i, p in enumerate(probes)}
  unit = np.full(num_probes, -1)
  for g, members in enumerate(gene_probes):
    for p in members:
      if p in index:
        unit[index[p]] = g
  free = unit < 0
  unit[free] = len(gene_probes) + np.arange(free.sum())
  num_units = int(unit.max()) + 1
  w_lin = rng.normal(0, 1 / np.sqrt(num_programs), (num_programs, num_units)).astype(np.float32)
  w_sat = rng.normal(0, 1.5 / np.sqrt(num_programs), (num_programs, num_units)).astype(np.float32)
  base = rng.uniform(5.0, 12.0, num_probes).astype(np.float32)
  scale = rng.uniform(0.4, 1.2, num_probes).astype(np.float32)
  noise = np.exp(rng.normal(np.log(0.15), 0.4, num_probes)).astype(np.float32)
  centres = rng.normal(0, 1, (12, num_programs)).astype(np.float32)
  group = np.arange(num_samples) // group_size if group_size > 0 else None

  def blocks():
    for b, start in enumerate(range(0, num_samples, block_rows)):
      rows = min(block_rows, num_samples - start)
      r = np.random.default_rng([seed, 23, b])
      z = centres[r.integers(0, len(centres), rows)] + r.standard_normal(
          (rows, num_programs), dtype=np.float32)
      signal = z @ w_lin + np.tanh(z @ w_sat)
      x = base + scale * signal[:, unit]
      if group is not None:
        x += _group_offsets(seed, group[start:start + rows], num_units, group_effect)[:, unit]
      x += noise * r.standard_normal(x.shape, dtype=np.float32)
      # Near copies of earlier samples of the block (technical replicates).
      num_dup = int(round(duplicate_fraction * rows))
      if num_dup and rows > 1:
        dst = r.choice(np.arange(1, rows), size=min(num_dup, rows - 1), replace=False)
        src = (r.random(len(dst)) * dst).astype(int)
        x[dst] = x[src] + r.normal(0, 1e-3, (len(dst), num_probes)).astype(np.float32)
      yield np.clip(x, 2.0, 16.0)

  sample_ids = [f"GSM{1000000 + i}" for i in range(num_samples)]
  col_meta = {"donor": [f"D{g}" for g in group]} if group is not None else None
  formats.write_gctx(path, blocks(), sample_ids, list(probes), chunk_rows=chunk_rows,
                     col_meta=col_meta)


def _group_offsets(seed: int, group: np.ndarray, num_units: int, sd: float) -> np.ndarray:
  """Per sample, its group's offset per unit; a group's draw depends on its id
  only, so a group spanning two blocks gets one offset."""
  out = np.empty((len(group), num_units), np.float32)
  for g in np.unique(group):
    r = np.random.default_rng([seed, 24, int(g)])
    out[group == g] = sd * r.standard_normal(num_units, dtype=np.float32)
  return out


FLAGS = flags.FLAGS


def _define_flags():
  """Only when run as a program, so importing this module defines no flags."""
  flags.DEFINE_string("out", None, "GCTx file to write.")
  flags.DEFINE_integer("samples", 2000, "Number of samples.")
  flags.DEFINE_integer("probes", GEO_PROBES, "Number of probes (columns).")
  flags.DEFINE_string("maps_from", "", "LM_MAP,TG_MAP: take probe ids and gene structure from "
                      "these D-GEX map files.")
  flags.DEFINE_string("write_maps", "", "Directory to write generated map_lm.txt / map_tg.txt.")
  flags.DEFINE_integer("landmarks", 943, "Landmarks in generated maps.")
  flags.DEFINE_integer("targets", 9520, "Targets in generated maps.")
  flags.DEFINE_float("duplicate_fraction", 0.02, "Fraction of samples that are near copies.")
  flags.DEFINE_integer("group_size", 0, "Samples per group (donor); 0: no groups.")
  flags.DEFINE_float("group_effect", 0.5, "Sd of a group's per-gene offset (log2 units).")
  flags.DEFINE_integer("chunk_rows", 0, "HDF5 chunk rows (0: cmapPy's default chunking).")
  flags.DEFINE_integer("seed", 0, "Seed.")


def main(argv):
  del argv
  gene_probes: list[list[str]] = []
  include: list[str] = []
  if FLAGS.maps_from:
    for p in FLAGS.maps_from.split(","):
      gene_probes += read_map_probes(p)
    include = [p for g in gene_probes for p in g]
  probes = probe_ids(FLAGS.probes, FLAGS.seed, include)
  if FLAGS.write_maps:
    paths = write_maps(FLAGS.write_maps, probes, FLAGS.landmarks, FLAGS.targets, FLAGS.seed)
    gene_probes = read_map_probes(paths[0]) + read_map_probes(paths[1])
    print("maps:", *paths)
  generate_gctx(FLAGS.out, FLAGS.samples, probes, gene_probes, FLAGS.seed,
                FLAGS.duplicate_fraction, chunk_rows=FLAGS.chunk_rows or None,
                group_size=FLAGS.group_size, group_effect=FLAGS.group_effect)
  print(f"wrote {FLAGS.out}: {FLAGS.samples} samples x {len(probes)} probes "
        f"({os.path.getsize(FLAGS.out) / 2**20:.0f} MB)")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
