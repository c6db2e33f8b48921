"""The D-GEX preparation, out of core: an expression matrix in, a training dataset out.

Steps (docs/data.md, "The D-GEX preparation", with the original's defects fixed):

1. Gene selection: D-GEX map files (symbol, Ensembl id, comma-separated probes;
   a gene is the mean of its probes), plain id lists, or per-gene 0/1 flags
   such as CMap LINCS's pr_is_lm (`gene_flags.py`). Targets that copy a
   landmark (same gene id, a shared data column, or identical values) are
   reported and dropped by default.
2. Non-finite values: an error by default (count and first location), or
   imputed with the gene's mean over the training rows (never validation or
   test), or their samples dropped.
3. Duplicate samples: mini-batch k-means then the within-cluster distance rule
   (`dedup.py`), seeded.
4. A seeded split (80/10/10), whole groups of samples per split (`groups.py`,
   split.group_by), or the whole dataset as one split.
5. Quantile normalization to the mean sorted profile of the *training* rows
   (one streaming pass), ties sharing the mean of their ranks' reference
   values; or, for another platform, by rank onto a stored reference.
6. Per-gene standardization (v - mean) / (std + 1e-3) with training-split
   statistics only, or a stored dataset's statistics for another platform.
7. `store.write_dataset` (temporary directory, renamed when complete), with
   every parameter, the input checksums and library versions in meta.json.

Memory is bounded by a few row blocks, the per-row sketches of the dedup step
(sketch_dim float64 values per row) and `memory_budget_mb` for exact checks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
import tensorstore as ts

from lsmtl_jax import __version__
from lsmtl_jax import kmeans as kmeans_lib
from lsmtl_jax import workdir_lock
from lsmtl_jax.data import dedup
from lsmtl_jax.data import formats
from lsmtl_jax.data import gene_flags
from lsmtl_jax.data import groups
from lsmtl_jax.data import store
from lsmtl_jax.data import synthetic
from lsmtl_jax.data.formats import PrepareError

_SPLITS = ("train", "val", "test")
_RANK_ROWS = 256
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


# Gene maps.


@dataclasses.dataclass
class Gene:
  symbol: str
  gene_id: str
  keys: list[str]  # data column ids whose mean is the gene's value
  columns: np.ndarray | None = None  # their indices in the matrix


def read_map(path: str) -> list[Gene]:
  """A D-GEX map: tab-separated symbol, Ensembl id, comma-separated probes."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file")
  genes, seen = [], {}
  try:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark is not an id
      for line_no, line in enumerate(f, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
          continue
        fields = line.split("\t")
        if len(fields) != 3:
          raise PrepareError(f"{path}: line {line_no} has {len(fields)} tab-separated "
                             f"columns, expected 3 (symbol, Ensembl id, probes)")
        symbol, gene_id, probes = (x.strip() for x in fields)
        probes = [p.strip() for p in probes.split(",") if p.strip()]
        if not symbol or not probes:
          raise PrepareError(f"{path}: line {line_no}: empty symbol or probe list")
        gene_id = formats.strip_version(gene_id) if gene_id else symbol
        if gene_id in seen:
          raise PrepareError(f"{path}: line {line_no}: gene {gene_id} repeats line "
                             f"{seen[gene_id]}")
        seen[gene_id] = line_no
        genes.append(Gene(symbol, gene_id, probes))
  except UnicodeDecodeError:
    raise PrepareError(f"{path}: not a text file") from None
  if not genes:
    raise PrepareError(f"{path}: no genes")
  return genes


def read_ids(path: str) -> list[Gene]:
  """One gene id per line (optionally `id<TAB>symbol`)."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file")
  genes, seen = [], set()
  try:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark is not an id
      for line_no, line in enumerate(f, start=1):
        fields = [x.strip() for x in line.rstrip("\r\n").split("\t")]
        if not fields[0]:
          continue
        if len(fields) > 2:
          raise PrepareError(f"{path}: line {line_no} has {len(fields)} columns, expected "
                             f"1 or 2 (id, symbol)")
        gid = formats.strip_version(fields[0])
        if gid in seen:
          raise PrepareError(f"{path}: line {line_no}: gene {gid} listed twice")
        seen.add(gid)
        genes.append(Gene(fields[1] if len(fields) == 2 else gid, gid, [gid]))
  except UnicodeDecodeError:
    raise PrepareError(f"{path}: not a UTF-8 text file of gene ids") from None
  if not genes:
    raise PrepareError(f"{path}: no genes")
  return genes


def _map_keys(genes: list[Gene], key: str, path: str) -> None:
  if key == "probes":
    return
  for g in genes:
    g.keys = [g.gene_id if key == "ensembl" else g.symbol]
  if key not in ("ensembl", "symbol"):
    raise PrepareError(f"{path}: genes.map_key must be probes, ensembl or symbol, got {key!r}")


@dataclasses.dataclass
class Selection:
  landmarks: list[Gene]
  targets: list[Gene]
  report: dict[str, Any]

  @property
  def genes(self) -> list[Gene]:
    return self.landmarks + self.targets

  def averaging(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns to gather, start of each gene in them, probes per gene)."""
    cols = np.concatenate([g.columns for g in self.genes]).astype(np.int64)
    counts = np.array([len(g.columns) for g in self.genes])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return cols, starts, counts


def _resolve(genes: list[Gene], index: dict[str, int]) -> tuple[list[Gene], list[Gene], int]:
  kept, lost, absent = [], [], 0
  for g in genes:
    cols = [index[k] for k in g.keys if k in index]
    absent += len(g.keys) - len(cols)
    if cols:
      g.columns = np.asarray(cols, np.int64)
      kept.append(g)
    else:
      lost.append(g)
  return kept, lost, absent


def select_genes(cfg, matrix: formats.Matrix, reference_meta: dict | None) -> Selection:
  gcfg = cfg.genes
  if gcfg.landmark_map or gcfg.target_map:
    if not (gcfg.landmark_map and gcfg.target_map):
      raise PrepareError("config: genes.landmark_map and genes.target_map go together")
    lm, tg = read_map(gcfg.landmark_map), read_map(gcfg.target_map)
    _map_keys(lm, gcfg.map_key, gcfg.landmark_map)
    _map_keys(tg, gcfg.map_key, gcfg.target_map)
    sources = (gcfg.landmark_map, gcfg.target_map)
  elif gcfg.landmark_ids or gcfg.target_ids:
    if not (gcfg.landmark_ids and gcfg.target_ids):
      raise PrepareError("config: genes.landmark_ids and genes.target_ids go together")
    lm, tg = read_ids(gcfg.landmark_ids), read_ids(gcfg.target_ids)
    sources = (gcfg.landmark_ids, gcfg.target_ids)
  elif gcfg.landmark_flag:
    flagged = gene_flags.select(gcfg, matrix)
    lm, tg = ([Gene(flagged.symbols[j], flagged.ids[j], [matrix.gene_ids[j]]) for j in cols]
              for cols in (flagged.landmarks, flagged.targets))
    sources = (flagged.source, flagged.source)
  elif reference_meta is not None:
    lm = [Gene(s, i, [i]) for i, s in zip(reference_meta["landmarks"]["ids"],
                                          reference_meta["landmarks"]["symbols"])]
    tg = [Gene(s, i, [i]) for i, s in zip(reference_meta["targets"]["ids"],
                                          reference_meta["targets"]["symbols"])]
    sources = ("reference dataset landmarks", "reference dataset targets")
  else:
    raise PrepareError("config: no genes: set genes.landmark_map and genes.target_map, "
                       "genes.landmark_ids and genes.target_ids, genes.landmark_flag, or "
                       "reference_dataset")
  report: dict[str, Any] = {"landmarks_listed": len(lm), "targets_listed": len(tg)}
  if gcfg.landmark_flag:
    report["flags"] = flagged.report

  # A data column may feed one landmark or target only: the same probe in both
  # maps would make a target read an input.
  lm_keys = {k: g for g in lm for k in g.keys}
  lm_ids = {g.gene_id: g for g in lm}
  copies_by_id = [g for g in tg if g.gene_id in lm_ids or any(k in lm_keys for k in g.keys)]
  report["copy_targets_by_id"] = [g.gene_id for g in copies_by_id]
  if copies_by_id:
    first = copies_by_id[0]
    what = (f"{len(copies_by_id)} target(s) are also landmarks (same gene id or data column; "
            f"first {first.symbol} {first.gene_id})")
    if cfg.genes.copy_targets == "error":
      raise PrepareError(f"{sources[1]}: gene in both maps: {what}")
    if cfg.genes.copy_targets == "drop":
      dropped = {id(g) for g in copies_by_id}
      tg = [g for g in tg if id(g) not in dropped]
      report["copy_targets_by_id_dropped"] = True
    elif any(set(g.keys) & set(lm_keys) for g in copies_by_id):
      shared = next(g for g in copies_by_id if set(g.keys) & set(lm_keys))
      raise PrepareError(f"{sources[1]}: gene in both maps: target {shared.symbol} reads "
                         f"the same data column as a landmark; set genes.copy_targets=drop")

  index = {gid: j for j, gid in enumerate(matrix.gene_ids)}
  lm, lm_lost, lm_absent = _resolve(lm, index)
  tg, tg_lost, tg_absent = _resolve(tg, index)
  report.update({"data_columns_absent": lm_absent + tg_absent,
                 "landmarks_lost": [g.gene_id for g in lm_lost],
                 "targets_lost": [g.gene_id for g in tg_lost]})
  if lm_lost and not gcfg.allow_missing_landmarks:
    raise PrepareError(
        f"{matrix.path}: {len(lm_lost)} landmark(s) have none of their ids in the data "
        f"(first {lm_lost[0].symbol}: {','.join(lm_lost[0].keys[:3])}); "
        f"{len(tg_lost)} target(s) lost too; set genes.allow_missing_landmarks=True to go on")
  if reference_meta is not None:
    # Another platform must yield exactly the reference dataset's columns.
    for role, kept, lost in (("landmarks", lm, lm_lost), ("targets", tg, tg_lost)):
      want = reference_meta[role]["ids"]
      by_id = {g.gene_id: g for g in kept}
      missing = [i for i in want if i not in by_id]
      if missing:
        raise PrepareError(f"{matrix.path}: {len(missing)} of the reference dataset's {role} "
                           f"are not in the data (first {missing[0]})")
      if role == "landmarks":
        lm = [by_id[i] for i in want]
      else:
        tg = [by_id[i] for i in want]
  if not lm or not tg:
    raise PrepareError(f"{matrix.path}: empty dataset after gene selection "
                       f"({len(lm)} landmarks, {len(tg)} targets)")
  report.update({"landmarks": len(lm), "targets": len(tg)})
  return Selection(lm, tg, report)


# Quantile normalization.


def _by_row_slices(fn: Callable[[np.ndarray], np.ndarray], values: np.ndarray) -> np.ndarray:
  """fn over slices of _RANK_ROWS rows on a few threads (NumPy sorts release the GIL)."""
  global _POOL
  slices = [values[i:i + _RANK_ROWS] for i in range(0, len(values), _RANK_ROWS)]
  if len(slices) == 1:
    return fn(values)
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1))
  return np.concatenate(list(_POOL.map(fn, slices)))


def rank_map(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Each value becomes the reference value of its rank in its row (float64).

  Tied values share the mean reference value over their ranks, so a gene's
  value does not depend on the column order (RNA-seq zeros tie by thousands).
  """
  values = np.asarray(values)
  if len(values) > _RANK_ROWS:  # bounds the dozen [rows, genes] temporaries below
    return _by_row_slices(lambda v: rank_map(v, reference), values)
  n, g = values.shape
  order = np.argsort(values, axis=1, kind="stable")
  srt = np.take_along_axis(values, order, axis=1)
  pos = np.broadcast_to(np.arange(g), (n, g))
  new_run = np.ones((n, g), bool)
  new_run[:, 1:] = srt[:, 1:] != srt[:, :-1]
  start = np.maximum.accumulate(np.where(new_run, pos, 0), axis=1)
  last = np.ones((n, g), bool)
  last[:, :-1] = new_run[:, 1:]
  end = np.minimum.accumulate(np.where(last, pos, g - 1)[:, ::-1], axis=1)[:, ::-1]
  csum = np.concatenate([[0.0], np.cumsum(np.asarray(reference, np.float64))])
  mapped = (csum[end + 1] - csum[start]) / (end - start + 1)
  out = np.empty((n, g))
  np.put_along_axis(out, order, mapped, axis=1)
  return out


# Streaming over the input.


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(8 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class GeneStream:
  """Row blocks of the input as float64 gene values (probe means), fixes applied."""

  def __init__(self, matrix: formats.Matrix, selection: Selection, block_rows: int,
               transform: str):
    self.matrix = matrix
    self.cols, self.starts, self.counts = selection.averaging()
    chunk = max(1, matrix.row_chunk)
    # Whole storage chunks per block, so no chunk is decompressed twice.
    self.block_rows = max(chunk, (block_rows // chunk) * chunk)
    self.transform = transform
    self.impute: np.ndarray | None = None  # per-gene values for non-finite entries
    self.bytes_read = 0

  def genes(self, raw: np.ndarray) -> np.ndarray:
    if len(raw) > _RANK_ROWS:
      return _by_row_slices(self.genes, raw)
    picked = raw[:, self.cols].astype(np.float64)
    if self.transform == "log2p1":
      picked = np.log2(np.maximum(picked, 0.0) + 1.0)
    out = np.add.reduceat(picked, self.starts, axis=1) / self.counts
    if self.impute is not None:
      bad = ~np.isfinite(out)
      if bad.any():
        out[bad] = np.broadcast_to(self.impute, out.shape)[bad]
    return out

  def read(self, start: int, stop: int) -> np.ndarray:
    raw = self.matrix.read_rows(start, stop)
    self.bytes_read += raw.nbytes
    return raw

  def blocks(self, rows: np.ndarray | None = None,
             order: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, raw block, gene block); only windows holding a row of `rows` if given."""
    n = self.matrix.num_samples
    starts = list(range(0, n, self.block_rows))
    if order is not None:
      starts = [starts[i] for i in order]
    for start in starts:
      stop = min(n, start + self.block_rows)
      if rows is not None and not rows[start:stop].any():
        continue
      raw = self.read(start, stop)
      yield start, raw, self.genes(raw)

  def load_rows(self, rows: np.ndarray) -> np.ndarray:
    """Gene values of the given sorted rows, reading only the windows that hold them."""
    mask = np.zeros(self.matrix.num_samples, bool)
    mask[rows] = True
    parts = [g[mask[s:s + len(g)]] for s, _, g in self.blocks(mask)]
    return np.concatenate(parts) if parts else np.zeros((0, len(self.counts)))


def _validate_config(cfg) -> None:
  def bad(field, why):
    raise PrepareError(f"config: {field} {why}")
  if not cfg.input.path:
    bad("input.path", "is required")
  if not cfg.output:
    bad("output", "is required")
  if cfg.block_rows < 1:
    bad("block_rows", f"must be positive, got {cfg.block_rows}")
  if cfg.nonfinite not in ("error", "impute", "drop"):
    bad("nonfinite", f"must be error, impute or drop, got {cfg.nonfinite!r}")
  if cfg.genes.copy_targets not in ("drop", "error", "keep"):
    bad("genes.copy_targets", f"must be drop, error or keep, got {cfg.genes.copy_targets!r}")
  if cfg.input.transform not in ("none", "log2p1", "log2cpm1"):
    bad("input.transform", f"must be none, log2p1 or log2cpm1, got {cfg.input.transform!r}")
  if cfg.split.mode not in ("random", *_SPLITS):
    bad("split.mode", f"must be random, train, val or test, got {cfg.split.mode!r}")
  f = tuple(cfg.split.fractions)
  if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6 or f[0] <= 0:
    bad("split.fractions", f"must be three non-negative numbers summing to 1, got {f}")
  if cfg.reference_dataset and cfg.split.mode == "random":
    bad("split.mode", "must be train, val or test with reference_dataset (another "
        "platform is evaluated whole)")
  gene_flags.check_config(cfg.genes)
  if cfg.dedup.enabled and (cfg.dedup.num_clusters < 1 or cfg.dedup.threshold < 0
                            or cfg.dedup.sketch_dim < 1):
    bad("dedup", "num_clusters and sketch_dim must be positive, threshold non-negative")


def _check_output(out: str) -> None:
  """Before any work: the output is new, and its folder can take it. A temporary
  of a killed earlier run of the same output is removed."""
  if os.path.lexists(out):
    raise PrepareError(f"{out}: output already exists; remove it or choose another path")
  ancestor = os.path.dirname(out)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise PrepareError(f"{out}: cannot create the output: {ancestor} is not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise PrepareError(f"{out}: cannot create the output: {ancestor} is not writable")
  if ancestor == os.path.dirname(out):
    store.remove_abandoned(out)
    probe = store.temp_name(out, ".probe")
    try:
      with open(probe, "wb"):
        pass
      os.remove(probe)
    except OSError as e:
      raise PrepareError(f"{out}: cannot write in {ancestor}: {e.strerror or e}") from None


def _versions() -> dict[str, str]:
  return {"lsmtl_jax": __version__, "python": platform.python_version(),
          "numpy": np.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
          "tensorstore": ts.__version__ if hasattr(ts, "__version__") else "unknown"}


def prepare(cfg, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> store.Dataset:
  """Runs the whole preparation described by a configs/prepare config."""
  _validate_config(cfg)
  t0 = time.time()
  out = os.path.abspath(cfg.output)
  _check_output(out)
  with workdir_lock.hold_beside(out):  # one writer per output: .OUTPUT.lock beside it
    _check_output(out)  # its holder may have finished it meanwhile
    return _prepare_held(cfg, out, t0, log)


def _prepare_held(cfg, out: str, t0: float, log: Callable[[str], None]) -> store.Dataset:
  reference_meta = None
  if cfg.reference_dataset:
    try:
      reference_meta = store.open_dataset(cfg.reference_dataset).meta
    except store.DatasetError as e:
      raise PrepareError(f"reference_dataset: {e}") from None

  inputs = [("data", cfg.input.path)]
  for role, p in (("landmark_map", cfg.genes.landmark_map), ("target_map", cfg.genes.target_map),
                  ("landmark_ids", cfg.genes.landmark_ids), ("target_ids", cfg.genes.target_ids),
                  ("gene_info", cfg.genes.gene_info), ("gene_ids", cfg.input.gene_ids),
                  ("sample_ids", cfg.input.sample_ids),
                  ("sample_table", cfg.split.get("sample_table", ""))):
    if p:
      inputs.append((role, p))
  if reference_meta is not None:
    inputs.append(("reference_meta", os.path.join(cfg.reference_dataset, store.META_NAME)))
  for role, p in inputs:
    if not os.path.isfile(p):
      raise PrepareError(f"{p}: no such file ({role})")
    if not os.access(p, os.R_OK):
      raise PrepareError(f"{p}: not readable ({role})")

  matrix = formats.open_matrix(
      cfg.input.path, cfg.input.format, id_column=cfg.input.id_column,
      first_value_column=cfg.input.first_value_column, delimiter=cfg.input.delimiter,
      strip_versions=cfg.input.strip_versions, gene_ids=cfg.input.gene_ids,
      sample_ids=cfg.input.sample_ids, transform=cfg.input.transform,
      gene_id_field=cfg.input.gene_id_field)
  with matrix:
    return _prepare_open(cfg, matrix, reference_meta, inputs, out, t0, log)


def _prepare_open(cfg, matrix, reference_meta, inputs, out, t0, log) -> store.Dataset:
  n = matrix.num_samples
  if n == 0:
    raise PrepareError(f"{matrix.path}: no samples")
  log(f"{matrix.path}: {n} samples x {matrix.num_genes} columns")
  grouping = groups.read_labels(cfg.split, matrix)  # before the passes: errors come early
  sel = select_genes(cfg, matrix, reference_meta)
  log(f"genes: {len(sel.landmarks)} landmarks, {len(sel.targets)} targets "
      f"({len(sel.report['landmarks_lost'])} landmarks and {len(sel.report['targets_lost'])} "
      f"targets lost; {sel.report['data_columns_absent']} map ids absent from the data; "
      f"{len(sel.report['copy_targets_by_id'])} copy targets by id)")
  stream = GeneStream(matrix, sel, cfg.block_rows, cfg.input.transform)
  num_genes = len(sel.genes)
  num_lm = len(sel.landmarks)
  id_of = np.asarray(matrix.gene_ids, object)

  # Pass 1: validation, per-gene sums of finite values, column hashes (exact
  # copy detection) and, when deduplicating, mini-batch k-means.
  finite_rows = np.ones(n, bool)
  gsum, gcount = np.zeros(num_genes), np.zeros(num_genes)
  hashers = [hashlib.blake2b(digest_size=16) for _ in range(num_genes)]
  num_bad, first_bad = 0, None
  num_blocks = -(-n // stream.block_rows)
  block_order = np.random.default_rng([cfg.seed, 10]).permutation(num_blocks)
  kmeans = (kmeans_lib.MiniBatchKMeans(min(cfg.dedup.num_clusters, n), cfg.seed)
            if cfg.dedup.enabled else None)
  for start, raw, genes in stream.blocks(order=block_order if kmeans else None):
    finite = np.isfinite(genes)
    if not finite.all():
      raw_bad = ~np.isfinite(raw[:, stream.cols])
      num_bad += int(raw_bad.sum())
      r, c = np.argwhere(raw_bad)[0] if raw_bad.any() else np.argwhere(~finite)[0]
      loc = (start + r, matrix.sample_ids[start + r],
             id_of[stream.cols[c]] if raw_bad.any() else sel.genes[c].gene_id)
      if first_bad is None or loc[0] < first_bad[0]:
        first_bad = loc
      finite_rows[start:start + len(genes)] = finite.all(axis=1)
    gsum += np.where(finite, genes, 0.0).sum(axis=0)
    gcount += finite.sum(axis=0)
    by_gene = np.ascontiguousarray(genes.T)
    for j in range(num_genes):
      hashers[j].update(by_gene[j].tobytes())
    if kmeans is not None:
      kmeans.update(genes[finite.all(axis=1)])
  log(f"pass 1 (validate, hash{', k-means' if kmeans else ''}): {time.time() - t0:.1f} s")
  nonfinite_report = {"count": num_bad, "policy": cfg.nonfinite}
  imputing = False
  if num_bad or not finite_rows.all():
    _, sid, gid = first_bad
    nonfinite_report.update({"first_sample": sid, "first_column": str(gid),
                             "samples_affected": int((~finite_rows).sum())})
    where = f"first at sample {sid}, column {gid}"
    if cfg.nonfinite == "error":
      raise PrepareError(f"{matrix.path}: {num_bad} NaN/Inf value(s) in the selected "
                         f"columns, {where}; set nonfinite=impute or nonfinite=drop")
    if cfg.nonfinite == "impute":
      # Provisional fill for the duplicate search only (it compares all rows
      # anyway); the stored values are filled with the training rows' mean below.
      stream.impute = np.where(gcount > 0, gsum / np.maximum(gcount, 1), 0.0)
      imputing = True
      finite_rows[:] = True
    log(f"non-finite: {num_bad} value(s) ({where}); {cfg.nonfinite}")

  # Targets whose values equal a landmark's, bit for bit, in every sample.
  digests = [h.digest() for h in hashers]
  lm_digest = {d: i for i, d in enumerate(digests[:num_lm])}
  value_copies = [j for j in range(num_lm, num_genes) if digests[j] in lm_digest]
  copy_report = {
      "by_id": sel.report["copy_targets_by_id"],
      "by_values": [{"target": sel.genes[j].gene_id,
                     "landmark": sel.genes[lm_digest[digests[j]]].gene_id}
                    for j in value_copies]}
  if value_copies:
    first = copy_report["by_values"][0]
    msg = (f"{len(value_copies)} target(s) are exact copies of a landmark "
           f"(first {first['target']} = {first['landmark']})")
    if cfg.genes.copy_targets == "error":
      raise PrepareError(f"{matrix.path}: {msg}")
    log(msg)
  keep_cols = np.ones(num_genes, bool)
  if value_copies and cfg.genes.copy_targets == "drop" and reference_meta is None:
    keep_cols[value_copies] = False
    copy_report["by_values_dropped"] = True
  copy_report["dropped"] = cfg.genes.copy_targets == "drop" and reference_meta is None
  if keep_cols.sum() <= num_lm:
    raise PrepareError(f"{matrix.path}: empty dataset: no targets left after removing copies")
  landmarks = sel.landmarks
  targets = [g for g, k in zip(sel.targets, keep_cols[num_lm:]) if k]
  col_keep = np.flatnonzero(keep_cols)

  def gene_blocks(rows=None, order=None):
    for start, _, genes in stream.blocks(rows, order):
      yield start, genes[:, col_keep]

  # Duplicate removal among the usable rows.
  usable = finite_rows.copy()
  dedup_report: dict[str, Any] = {"enabled": bool(cfg.dedup.enabled)}
  if cfg.dedup.enabled and usable.any():
    budget_rows = max(16, (cfg.memory_budget_mb << 20) // (2 * 8 * len(col_keep)))
    kmeans.restrict(col_keep)  # cluster on the genes that stay
    result = dedup.run(lambda order: gene_blocks(None, order), n, usable,
                       lambda rows: stream.load_rows(rows)[:, col_keep],
                       num_clusters=cfg.dedup.num_clusters, threshold=cfg.dedup.threshold,
                       sketch_dim=cfg.dedup.sketch_dim, seed=cfg.seed, max_rows=budget_rows,
                       kmeans=kmeans, log=log)
    dropped = usable & ~result["keep"]
    usable = result["keep"]
    dedup_report.update({k: result[k] for k in ("num_clusters", "num_candidates",
                                                "num_close_pairs")})
    dedup_report.update({"num_clusters_asked": cfg.dedup.num_clusters,
                         "threshold": cfg.dedup.threshold, "sketch_dim": cfg.dedup.sketch_dim,
                         "kmeans": "mini-batch, one streaming epoch, k-means++ init, seeded",
                         "space": "selected genes after probe averaging, before quantile "
                                  "normalization",
                         "num_dropped": int(dropped.sum()),
                         "dropped_sample_ids": [matrix.sample_ids[i]
                                                for i in np.flatnonzero(dropped)]})
    log(f"dedup: dropped {int(dropped.sum())} of {n} samples ({time.time() - t0:.1f} s)")
  rows = np.flatnonzero(usable)
  if len(rows) == 0:
    raise PrepareError(f"{matrix.path}: empty dataset: no samples left after filtering")

  # Split over the dataset's rows (the kept input rows, in input order).
  group_report = None
  if grouping is not None:
    splits, group_report = groups.split(grouping[0][rows], grouping[1],
                                        tuple(cfg.split.fractions), cfg.seed)
    log(f"split by {group_report['field']}: groups per split {group_report['num_groups']}")
  elif cfg.split.mode == "random":
    splits = synthetic.split_indices(len(rows), tuple(cfg.split.fractions), cfg.seed)
    empty = [k for k, v in splits.items() if len(v) == 0 and
             cfg.split.fractions[_SPLITS.index(k)] > 0]
    if empty:
      raise PrepareError(f"{matrix.path}: {len(rows)} samples are too few for the split "
                         f"{tuple(cfg.split.fractions)} ({', '.join(empty)} would be empty)")
  else:
    splits = {cfg.split.mode: np.arange(len(rows))}
  in_train = np.zeros(n, bool)
  if "train" in splits:
    in_train[rows[splits["train"]]] = True
  if imputing:
    stream.impute = _training_means(stream, in_train, sel, matrix.path, cfg.split.mode)
    nonfinite_report["imputed_with"] = "per-gene mean of the finite values of the training rows"
    log(f"non-finite values imputed with the means of {int(in_train.sum())} training rows")

  if reference_meta is not None:
    reference = np.asarray(reference_meta["quantile_reference"], np.float64)
    mean = np.asarray(reference_meta["standardization"]["mean"], np.float64)
    std = np.asarray(reference_meta["standardization"]["std"], np.float64)
    if len(reference) != len(col_keep) or len(mean) != len(col_keep):
      raise PrepareError(f"{cfg.reference_dataset}: reference of {len(reference)} genes, "
                         f"data has {len(col_keep)}")
    fit_on = f"reference dataset {reference_meta.get('name', cfg.reference_dataset)} (train)"
  else:
    if not in_train.any():
      raise PrepareError("config: without reference_dataset the dataset needs a train split "
                         "to fit the quantile reference and statistics on")
    # Pass: quantile reference = mean sorted training profile.
    total = np.zeros(len(col_keep))
    for start, genes in gene_blocks(in_train):
      picked = genes[in_train[start:start + len(genes)]]
      total += _by_row_slices(lambda v: np.sort(v, axis=1), picked).sum(axis=0)
    reference = total / in_train.sum()
    # Pass: per-gene statistics of the normalized training rows, shifted sums in float64.
    shift = reference.mean()
    s1, s2 = np.zeros(len(col_keep)), np.zeros(len(col_keep))
    for start, genes in gene_blocks(in_train):
      qn = rank_map(genes[in_train[start:start + len(genes)]], reference) - shift
      s1 += qn.sum(axis=0)
      s2 += np.square(qn).sum(axis=0)
    m = in_train.sum()
    mean = s1 / m + shift
    std = np.sqrt(np.maximum(s2 / m - (s1 / m) ** 2, 0.0))
    fit_on = "train"
    log(f"reference and statistics from {m} training samples ({time.time() - t0:.1f} s)")

  def standardized():
    for start, genes in gene_blocks(usable):
      picked = genes[usable[start:start + len(genes)]]
      yield ((rank_map(picked, reference) - mean) / (std + store.STD_EPS)).astype(np.float32)

  checks = []
  if cfg.checksum_inputs:
    for role, p in inputs:
      checks.append({"role": role, "path": os.path.abspath(p), "bytes": os.path.getsize(p),
                     "sha256": sha256(p)})
  else:
    checks = [{"role": r, "path": os.path.abspath(p), "bytes": os.path.getsize(p)}
              for r, p in inputs]
  meta = {
      "name": cfg.name,
      "library_version": __version__,
      "landmarks": {"ids": [g.gene_id for g in landmarks],
                    "symbols": [g.symbol for g in landmarks]},
      "targets": {"ids": [g.gene_id for g in targets], "symbols": [g.symbol for g in targets]},
      "sample_ids": [matrix.sample_ids[i] for i in rows],
      "splits": {k: np.asarray(v).tolist() for k, v in splits.items()},
      "standardization": {"mean": mean.tolist(), "std": std.tolist(), "eps": store.STD_EPS,
                          "fit_on": fit_on},
      "quantile_reference": reference.tolist(),
      "preprocessing": {
          "source": "lsmtl_jax.prepare",
          "config": json.loads(cfg.to_json()),
          "inputs": checks,
          "versions": _versions(),
          "input_shape": [n, matrix.num_genes],
          "gene_selection": {k: v for k, v in sel.report.items()},
          "gene_columns": {g.gene_id: [matrix.gene_ids[c] for c in g.columns]
                           for g in landmarks + targets},
          "probe_averaging": "mean of the gene's columns present in the data (float64)",
          "transform": cfg.input.transform,
          "nonfinite": nonfinite_report,
          "copy_targets": copy_report,
          "dedup": dedup_report,
          "split": {"mode": cfg.split.mode, "fractions": list(cfg.split.fractions),
                    "seed": cfg.seed, **({"groups": group_report} if group_report else {})},
          "quantile_normalization": (
              "by rank onto the reference dataset's quantile reference" if reference_meta
              else "to the mean sorted profile of the training split") +
              "; ties take the mean reference value of their ranks",
          "standardization": f"per gene (v - mean) / (std + {store.STD_EPS}), "
                             f"statistics of {fit_on}",
          "reference_dataset": (os.path.abspath(cfg.reference_dataset)
                                if reference_meta else None),
      },
  }
  log(f"writing {len(rows)} samples x {len(col_keep)} genes to {out}")
  try:
    ds = store.write_dataset(out, standardized(), len(rows), meta)
  except store.DatasetError as e:
    raise PrepareError(str(e)) from None
  except OSError as e:  # e.g. an unwritable or full output disk; the temporary is gone
    raise PrepareError(f"{out}: cannot write: {e.strerror or e}") from None
  _verify(ds, len(rows), len(col_keep))
  elapsed = time.time() - t0
  log(f"done in {elapsed:.1f} s; read {stream.bytes_read / 2**20:.0f} MB "
      f"({stream.bytes_read / 2**20 / max(elapsed, 1e-9):.0f} MB/s)")
  return ds


def _training_means(stream: GeneStream, in_train: np.ndarray, sel: Selection, path: str,
                    split_mode: str) -> np.ndarray:
  """Per-gene mean of the finite values of the training rows: what nonfinite=impute fills
  in, so validation and test values never reach the training data."""
  if not in_train.any():
    raise PrepareError(f"{path}: nonfinite=impute fills each gene with its training rows' "
                       f"mean, and split.mode={split_mode} leaves no training rows; set "
                       "nonfinite=drop")
  stream.impute = None
  total, count = np.zeros(len(sel.genes)), np.zeros(len(sel.genes))
  for start, _, genes in stream.blocks(in_train):
    picked = genes[in_train[start:start + len(genes)]]
    finite = np.isfinite(picked)
    total += np.where(finite, picked, 0.0).sum(axis=0)
    count += finite.sum(axis=0)
  if not count.all():
    gene = sel.genes[int(np.flatnonzero(count == 0)[0])]
    raise PrepareError(f"{path}: gene {gene.symbol} ({gene.gene_id}) has no finite value in "
                       f"the {int(in_train.sum())} training rows, so nonfinite=impute has no "
                       f"mean to fill in; set nonfinite=drop")
  return total / count


def _verify(ds: store.Dataset, num_rows: int, num_genes: int) -> None:
  """A cheap read-back: shape, and finite first and last rows."""
  if tuple(ds.array.shape) != (num_rows, num_genes):
    raise PrepareError(f"{ds.path}: written shape {tuple(ds.array.shape)}, "
                       f"expected {(num_rows, num_genes)}")
  ends = ds.read_rows(np.array([0, num_rows - 1]))
  if not np.isfinite(ends).all():
    raise PrepareError(f"{ds.path}: non-finite values written")
