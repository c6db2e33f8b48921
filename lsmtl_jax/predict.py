"""Infer target genes for new landmark profiles with a trained run or a model file.

  python -m lsmtl_jax.predict --workdir=RUN --input=profiles.gctx --output=full.gctx
  python -m lsmtl_jax.predict --model=MODEL --input=profiles.gctx --output=full.gctx

--model is a portable model file (python -m lsmtl_jax.export): it needs no run
directory and no dataset, and gives the same numbers as the run it came from.

Input: GCTx, GCT, CSV/TSV (genes as rows) or .npy ([samples, genes] with
--gene_ids). Landmarks are matched by id, so the input's gene order and any
extra genes do not matter. Units (--input_units):

  expression    log2 values on the training data's scale (quantile-normalized
                like the training compendium); standardized here with the
                training per-gene mean and std
  standardized  already (v - mean) / (std + eps) with the training statistics

--quantile_map is for another platform: each profile's landmark values are
mapped by rank onto the training landmarks' mean sorted profile (any monotone
scale works, e.g. RPKM), then standardized.

The input is read and written in row blocks (--block_rows), so a GCTx of any
number of profiles streams through bounded memory: a reader thread reads ahead
while the model computes, and one writer thread per output file writes the
prediction and both bounds in the same pass (lsmtl_jax/pipeline.py); the busy
seconds of each stage are in the summary (--summary_json). Output (format from its
name, or the input's): the landmarks (in the output units, --output_units) then
every target, one row per profile; per-gene metadata: symbol, is_landmark,
imputed, val_cc, val_mae (expression units), val_mae_z and well_inferred
(a target whose validation CC >= --threshold). GCTx carries it at
/0/META/ROW/<field>, .h5ad as var columns (the flags as bool), GCT 1.3 and
CSV/TSV as annotation columns, .npy in a sidecar OUTPUT.genes.tsv. The output
files are written in a temporary folder beside them and moved into place when
all are complete, so a failed run leaves none of them; the folder of a killed
run carries its pid (.OUTPUT.tmp-PID) and the next run of the same output
removes it.

--intervals=0.9 also writes per-gene split-conformal prediction intervals
(lsmtl_jax/intervals.py) at that coverage: OUT.lower.EXT and OUT.upper.EXT
beside OUT.EXT, in the same format, units, shape and metadata; a target's bounds
are prediction -+ q, its q from held-out profiles (the calibration rows of
data.calibration_fraction, or else the validation split); landmarks' bounds
are their values (NaN where imputed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Iterator

import h5py
import numpy as np

from lsmtl_jax import fileio
from lsmtl_jax import inference
from lsmtl_jax import intervals as intervals_lib
from lsmtl_jax import pipeline
from lsmtl_jax import workdir_lock
from lsmtl_jax.data import formats
from lsmtl_jax.data import h5ad
from lsmtl_jax.data import prepare_lib
from lsmtl_jax.data import store

UNITS = ("expression", "standardized")
ROW_META_FIELDS = ("symbol", "is_landmark", "imputed", "val_cc", "val_mae", "val_mae_z",
                   "well_inferred")
# A profile is "unnormalized" for the chosen units when, in the training
# standardization, its typical landmark sits far outside the training spread.
MEDIAN_ABS_Z_LIMIT = 4.0
EXTREME_Z, EXTREME_FRACTION = 10.0, 0.01


class PredictError(ValueError):
  """Bad input or options; the message is one line naming the file."""


@dataclasses.dataclass
class Options:
  input_units: str = "expression"
  output_units: str = "expression"
  quantile_map: bool = False
  impute_missing: bool = False
  check_units: bool = True
  threshold: float = 0.9
  batch_size: int = 1024
  block_rows: int = 4096
  input_format: str = "auto"
  output_format: str = "auto"
  gene_ids: str = ""
  sample_ids: str = ""
  overwrite: bool = False
  intervals: float = 0.0  # coverage of the prediction intervals to write; 0: none


# Mapping input values to the model's standardized landmarks.


class LandmarkMapper:
  """Raw input rows -> standardized landmarks [n, L] (float64) plus checks."""

  def __init__(self, run: inference.Usable, gene_ids: list[str], path: str, opts: Options):
    self.path, self.opts = path, opts
    index = {g: i for i, g in enumerate(gene_ids)}
    self.columns = np.array([index.get(g, -1) for g in run.landmark_ids])
    self.present = self.columns >= 0
    missing = [g for g, ok in zip(run.landmark_ids, self.present) if not ok]
    # Named with their symbols where the run knows them: a LINCS file's ids are
    # Entrez numbers, which say little to a reader.
    named = [g if s in ("", g) else f"{g} ({s})"
             for g, s, ok in zip(run.landmark_ids, run.landmark_symbols, self.present) if not ok]
    if not self.present.any():  # --impute_missing cannot help: nothing to predict from
      raise PredictError(
          f"{path}: none of the run's {run.num_landmarks} landmarks is in the input: its gene "
          f"ids look like {', '.join(gene_ids[:3]) or '(none)'}, the run's like "
          f"{', '.join(run.landmark_ids[:3])}; give the input the training data's kind of "
          "gene id")
    if missing and not opts.impute_missing:
      shown = ", ".join(named[:10]) + (f", ... ({len(missing) - 10} more)"
                                       if len(missing) > 10 else "")
      raise PredictError(f"{path}: {len(missing)} of {run.num_landmarks} landmarks missing: "
                         f"{shown}; pass --impute_missing to fill them with training means")
    self.missing = missing
    self.scale, self.offset = run.landmark_scale_and_offset()
    self.reference = None
    if opts.quantile_map:
      ref = run.landmark_reference()
      n_present = int(self.present.sum())
      # With missing landmarks, the present ones take evenly spaced quantiles
      # of the full landmark reference.
      self.reference = np.interp(np.linspace(0, 1, n_present),
                                 np.linspace(0, 1, len(ref)), ref)

  def select(self, raw: np.ndarray) -> np.ndarray:
    """The input's landmark columns (the present ones, in the run's order): all
    of a raw block that prediction reads, a twelfth of a LINCS row."""
    return raw[:, self.columns[self.present]]

  def __call__(self, selected: np.ndarray, first_row: int, sample_ids: list[str]) -> np.ndarray:
    values = selected.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
      r, c = np.argwhere(bad)[0]
      gene = np.flatnonzero(self.present)[c]
      raise PredictError(f"{self.path}: {int(bad.sum())} non-finite landmark value(s), first "
                         f"at sample {sample_ids[first_row + r]}, landmark column "
                         f"{self.columns[gene]}")
    z = np.zeros((selected.shape[0], len(self.columns)))
    present = self.present
    if self.reference is not None:
      expression = prepare_lib.rank_map(values, self.reference)
      z[:, present] = (expression - self.offset[present]) / self.scale[present]
    elif self.opts.input_units == "expression":
      z[:, present] = (values - self.offset[present]) / self.scale[present]
    else:
      z[:, present] = values
    if self.opts.check_units and self.reference is None:
      self._check(values, z[:, present], first_row)
    return z  # missing landmarks stay at 0: the training mean

  def _check(self, values: np.ndarray, z: np.ndarray, first_row: int) -> None:
    abs_z = np.abs(z)
    median = float(np.median(abs_z))
    extreme = float((abs_z > EXTREME_Z).mean())
    if median <= MEDIAN_ABS_Z_LIMIT and extreme <= EXTREME_FRACTION:
      return
    if self.opts.input_units == "expression":
      lo = float(np.min(self.offset - 3 * self.scale))
      hi = float(np.max(self.offset + 3 * self.scale))
      expected = f"log2 values like the training landmarks' [{lo:.3g}, {hi:.3g}]"
    else:
      expected = "z-scores, mostly within [-3, 3]"
    raise PredictError(
        f"{self.path}: values look unnormalized for --input_units={self.opts.input_units}: "
        f"observed range [{values.min():.4g}, {values.max():.4g}] in rows from {first_row} "
        f"(median |z| {median:.3g}, {100 * extreme:.1f}% beyond |z| {EXTREME_Z:g}), expected "
        f"{expected}; choose the right --input_units, use --quantile_map for another "
        "platform, or pass --nocheck_units")


# Output files.


WRITTEN_FORMATS = ("gctx", "gct", "table", "npy", "h5ad")


def _output_format(path: str, opts: Options, input_format: str) -> str:
  if opts.output_format != "auto":
    fmt = opts.output_format
  else:
    if formats.compressed_suffix(path):
      raise PredictError(f"{path}: compressed output is not written; name it .gctx, .h5ad, "
                         ".gct, .csv, .tsv or .npy (and compress it afterwards)")
    try:
      fmt = formats.detect_format(path, "--output_format")
    except formats.PrepareError:  # a name that says nothing: write what was read
      fmt = input_format
      if fmt not in WRITTEN_FORMATS:
        raise PredictError(f"{path}: the output's name gives no format and {fmt} files are "
                           "read, not written; name it .gctx, .h5ad, .gct, .csv, .tsv or "
                           ".npy") from None
  if fmt not in WRITTEN_FORMATS:
    raise PredictError(f"{path}: unknown output format {fmt!r} (gctx, gct, table, npy, h5ad)")
  return fmt


def _check_output(output_path: str, input_path: str, opts: Options) -> None:
  """The output can be written, and writing it replaces nothing it must not."""
  out_dir = os.path.dirname(os.path.abspath(output_path))
  if os.path.isdir(output_path):
    raise PredictError(f"{output_path}: is a directory; name a file in it, e.g. "
                       f"{os.path.join(output_path, 'predicted.gctx')}")
  if os.path.lexists(output_path) and not os.path.isfile(output_path):
    raise PredictError(f"{output_path}: exists and is not a regular file; name a new file")
  if os.path.exists(output_path) and not opts.overwrite:
    raise PredictError(f"{output_path}: already exists; pass --overwrite to replace it")
  if os.path.exists(input_path) and os.path.exists(output_path) and os.path.samefile(
      input_path, output_path):
    raise PredictError(f"{output_path}: is the input; write the predictions to another file")
  if not os.path.isdir(out_dir):
    what = "is not a directory" if os.path.exists(out_dir) else "does not exist"
    raise PredictError(f"{output_path}: directory {out_dir} {what}")
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise PredictError(f"{output_path}: directory {out_dir} is not writable")
  probe = store.temp_name(output_path, ".probe")  # before any work: can a file go there?
  try:
    with open(probe, "wb"):
      pass
  except OSError as e:
    raise PredictError(f"{output_path}: cannot write in {out_dir}: "
                       f"{e.strerror or _first_line(e)}") from None
  finally:
    _remove(probe)


def _row_meta_strings(meta: dict[str, np.ndarray], j: int) -> list[str]:
  out = []
  for field in ROW_META_FIELDS:
    v = meta[field][j]
    out.append(str(v) if field == "symbol" else
               str(int(v)) if field in ("is_landmark", "imputed", "well_inferred") else
               f"{float(v):.6g}")
  return out


def write_gct_with_meta(path: str, values: np.ndarray, sample_ids, gene_ids, meta,
                        col_meta=None) -> None:
  """GCT 1.3: genes as rows, the per-gene fields as row-metadata columns, the
  input's per-sample fields (`col_meta`) as column-metadata rows."""
  col_meta = col_meta or {}
  with open(path, "w") as f:
    f.write("#1.3\n")
    f.write(f"{len(gene_ids)}\t{len(sample_ids)}\t{len(ROW_META_FIELDS)}\t{len(col_meta)}\n")
    f.write("\t".join(["id", *ROW_META_FIELDS, *sample_ids]) + "\n")
    for field, v in col_meta.items():  # CMap: 'na' fills the block under the row fields
      f.write("\t".join([field, *(["na"] * len(ROW_META_FIELDS)),
                         *(_gct_meta_cell(x) for x in v)]) + "\n")
    for j, gid in enumerate(gene_ids):
      f.write("\t".join([gid, *_row_meta_strings(meta, j),
                         *(repr(float(v)) for v in values[:, j])]) + "\n")


def _gct_meta_cell(x) -> str:
  if isinstance(x, (float, np.floating)):
    return str(formats.MISSING) if np.isnan(x) else repr(float(x))
  return str(x)


def write_table_with_meta(path: str, values, sample_ids, gene_ids, meta,
                          delimiter: str = "\t") -> None:
  with open(path, "w") as f:
    f.write(delimiter.join(["id", *ROW_META_FIELDS, *sample_ids]) + "\n")
    for j, gid in enumerate(gene_ids):
      f.write(delimiter.join([gid, *_row_meta_strings(meta, j),
                              *(repr(float(v)) for v in values[:, j])]) + "\n")


def write_genes_sidecar(path: str, gene_ids, meta) -> None:
  with open(path, "w") as f:
    f.write("\t".join(["id", *ROW_META_FIELDS]) + "\n")
    for j, gid in enumerate(gene_ids):
      f.write("\t".join([gid, *_row_meta_strings(meta, j)]) + "\n")


def read_gctx_row_metadata(path: str) -> dict[str, np.ndarray]:
  """Every /0/META/ROW field of a GCTx keyed by field name: strings decoded,
  CMap's numeric missing value (-666) as NaN, as cmapPy parses them."""
  with h5py.File(path, "r") as f:
    ids = np.array([x.decode() for x in f[formats.ROW_ID_NODE][()]], object)
  return {"id": ids, **formats.read_gctx_metadata(path, formats.ROW_META_GROUP)}


# The job.


def gene_metadata(run: inference.Usable, imputed: np.ndarray, threshold: float,
                  predictor=None) -> dict[str, np.ndarray]:
  val = run.validation_metrics()
  L, T = run.num_landmarks, run.num_targets
  nan_l = np.full(L, np.nan)
  cc = np.concatenate([nan_l, val["cc"]])
  symbols = run.landmark_symbols + run.target_symbols
  return {
      "symbol": np.array(symbols, object),
      "is_landmark": np.concatenate([np.ones(L, np.int8), np.zeros(T, np.int8)]),
      "imputed": np.concatenate([imputed.astype(np.int8), np.zeros(T, np.int8)]),
      "val_cc": cc,
      "val_mae": np.concatenate([nan_l, val["mae_expression"]]),
      "val_mae_z": np.concatenate([nan_l, val["mae"]]),
      "well_inferred": np.concatenate([np.zeros(L, np.int8),
                                       (np.nan_to_num(val["cc"], nan=-np.inf) >= threshold)
                                       .astype(np.int8)]),
  }


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def interval_paths(output_path: str) -> dict[str, str]:
  """Where --intervals writes the bounds: OUT.lower.EXT and OUT.upper.EXT."""
  root, ext = os.path.splitext(output_path)
  return {"lower": f"{root}.lower{ext}", "upper": f"{root}.upper{ext}"}


def _write_output(out_format: str, path: str, blocks, n: int, sample_ids, gene_ids, meta,
                  col_meta, into: str = "") -> None:
  """One output file, complete or not at all: written under a temporary name
  (its pid in it), renamed when done. With `into`, the file goes into that
  folder under `path`'s base name, for the caller to move into place; errors
  name `path` either way."""
  target = os.path.join(into, os.path.basename(path)) if into else path
  store.remove_abandoned(target)
  tmp = store.temp_name(target)
  try:
    if out_format == "gctx":  # write_gctx writes under the same temporary name itself
      formats.write_gctx(target, blocks, sample_ids, gene_ids,
                         row_meta={field: meta[field] for field in ROW_META_FIELDS},
                         col_meta=col_meta)
    elif out_format == "h5ad":  # so does write_h5ad; 0/1 flags as bool, as pandas masks them
      flags = ("is_landmark", "imputed", "well_inferred")
      h5ad.write_h5ad(target, blocks, sample_ids, gene_ids, obs=col_meta,
                      var={f: meta[f].astype(bool) if f in flags else meta[f]
                           for f in ROW_META_FIELDS})
    elif out_format == "npy":
      _write_npy(tmp, blocks, n, len(gene_ids), path)
      write_genes_sidecar(tmp + ".genes", gene_ids, meta)
      os.replace(tmp + ".genes", target + ".genes.tsv")
      os.replace(tmp, target)
    else:
      values = np.concatenate(list(blocks)) if n else np.zeros((0, len(gene_ids)))
      if out_format == "gct":
        write_gct_with_meta(tmp, values, sample_ids, gene_ids, meta, col_meta)
      else:  # the delimiter follows the output's name, not the temporary one
        delimiter = "," if path.lower().endswith(".csv") else "\t"
        write_table_with_meta(tmp, values, sample_ids, gene_ids, meta, delimiter)
      os.replace(tmp, target)
  except BaseException as e:
    _remove(tmp)
    _remove(tmp + ".genes")
    if isinstance(e, OSError):
      raise PredictError(f"{path}: cannot write: {e.strerror or _first_line(e)}") from None
    raise


def _write_npy(tmp: str, blocks, n: int, g: int, path: str) -> None:
  """An .npy file written block after block with plain writes: a memmap of it
  would count every page written in the process's RSS (9.5 GB at 65,536
  LINCS-shaped profiles with intervals, measured)."""
  with open(tmp, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
        np.dtype("<f4")), "fortran_order": False, "shape": (n, g)})
    rows = 0
    for block in blocks:
      f.write(np.ascontiguousarray(block, "<f4").data)
      rows += len(block)
  if rows != n:
    raise ValueError(f"{path}: wrote {rows} rows, expected {n}")


def _check_space(output_path: str, out_format: str, need: int) -> None:
  """Refuses before any work when the float32 outputs cannot fit: a disk that
  fills up under HDF5 makes it fail to close the file, and that can crash the
  process instead of raising (h5py issues 914 and 1120). The text formats,
  built in memory, are not estimated."""
  if out_format not in ("gctx", "h5ad", "npy"):
    return
  folder = os.path.dirname(os.path.abspath(output_path))
  free = shutil.disk_usage(folder).free
  if need > free:
    raise PredictError(f"{output_path}: the outputs need about {need / 1e9:.3g} GB and "
                       f"{folder} has {free / 1e9:.3g} GB free; free some space or write "
                       "them elsewhere")


def _files_of(path: str, out_format: str) -> list[str]:
  """The files of one output: an .npy output has its genes beside it."""
  return [path, path + ".genes.tsv"] if out_format == "npy" else [path]


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return 0


# Streaming (lsmtl_jax/pipeline.py): a reader thread reads the next blocks'
# landmark columns, this thread predicts, one writer thread per output file
# writes. Memory holds a few blocks whatever the number of profiles.

READ_AHEAD = 2  # landmark blocks read ahead of the compute
# An output block holds every gene (12 times a landmark block on LINCS), so
# each writer has one queued while it writes another.
WRITE_BEHIND = 1
READ_PIECE_BYTES = 32 << 20  # input rows read at once (all their genes), about
ASSEMBLE_ROWS = 32  # rows per float64 pass over the targets: 3 MB, in cache


class BlockPredictor:
  """A block of the input's landmark columns -> the output blocks (prediction
  and, with intervals, lower and upper bounds), float32 in the output units.

  The arithmetic is float64 and the cast to float32 comes last, row by row the
  same whatever the slicing, so the values do not depend on ASSEMBLE_ROWS.
  """

  def __init__(self, run: inference.Usable, mapper: LandmarkMapper,
               predictor: inference.Predictor, opts: Options,
               calibration: intervals_lib.Calibration | None, kinds: list[str]):
    self.mapper, self.predictor, self.opts = mapper, predictor, opts
    self.calibration, self.kinds = calibration, kinds
    self.buffers = pipeline.Buffers()  # the writers hand blocks back here
    self.num_landmarks = run.num_landmarks
    self.num_genes = run.num_landmarks + run.num_targets
    self.lm_scale, self.lm_offset = run.landmark_scale_and_offset()
    self.tg_scale, self.tg_offset = run.target_scale_and_offset()
    self.copy_given = (opts.output_units == opts.input_units and not opts.quantile_map
                       and not mapper.missing)
    self.model_seconds = 0.0

  def __call__(self, start: int, selected: np.ndarray, sample_ids) -> dict[str, np.ndarray]:
    opts, L = self.opts, self.num_landmarks
    expression = opts.output_units == "expression"
    z = self.mapper(selected, start, sample_ids)
    if self.copy_given:  # landmarks exactly as given
      lm = selected.astype(np.float64)
    elif expression:
      lm = z * self.lm_scale + self.lm_offset
    else:
      lm = z
    n, T = len(selected), self.num_genes - L
    out = {kind: self.buffers.take(kind, n, self.num_genes) for kind in self.kinds}
    out["prediction"][:, :L] = lm
    if self.calibration is not None:
      lm_bounds = np.where(self.mapper.present, lm, np.nan)  # imputed: no interval
      out["lower"][:, :L] = out["upper"][:, :L] = lm_bounds
      q = self.calibration.quantile(opts.intervals)
    # Targets in slices that stay in cache, computed in place: p -+ q, then
    # * scale + offset in expression units, float64 until the cast on storing
    # (what calibration.bounds and the expression mapping compute, op for op).
    parts = [("prediction", None)]
    if self.calibration is not None:
      parts += [("lower", np.subtract), ("upper", np.add)]
    # One model batch at a time: its [batch, targets] output is all the block
    # holds besides the output blocks (a whole block's would be 186 MB more on
    # LINCS, made and freed every block).
    p, tmp = np.empty((ASSEMBLE_ROWS, T)), np.empty((ASSEMBLE_ROWS, T))
    z32, b = z.astype(np.float32), self.predictor.batch_size
    for first in range(0, n, b):
      t = time.perf_counter()
      y = self.predictor(z32[first:first + b])
      self.model_seconds += time.perf_counter() - t
      for s in range(0, len(y), ASSEMBLE_ROWS):
        k = min(ASSEMBLE_ROWS, len(y) - s)
        rows, pk, tk = slice(first + s, first + s + k), p[:k], tmp[:k]
        pk[...] = y[s:s + k]
        for kind, op in parts:
          v = pk if op is None else op(pk, q, out=tk)
          if expression:
            v = np.multiply(v, self.tg_scale, out=tk)
            v += self.tg_offset
          out[kind][rows, L:] = v
    return out


def _stream(blocks: Iterator, compute, paths: dict[str, str], writer, out_format: str,
            recycle=None) -> dict[str, float]:
  """pipeline.stream with the outputs written into a folder beside the first
  (its name carries our pid, so the next run removes it if we are killed) and
  moved into place only when all are complete: all of them or none."""
  first = next(iter(paths.values()))
  for path in paths.values():  # what killed runs of these outputs left goes
    store.remove_abandoned(path)
  stage = store.temp_name(first)
  try:
    os.mkdir(stage)
  except OSError as e:
    raise PredictError(f"{first}: cannot write: {e.strerror or _first_line(e)}") from None
  try:
    stages = pipeline.stream(
        blocks, lambda block: compute(*block),
        {kind: writer(path, stage) for kind, path in paths.items()},
        READ_AHEAD, WRITE_BEHIND, recycle)
    _commit(stage, paths, out_format)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  return stages


def _commit(stage: str, paths: dict[str, str], out_format: str) -> None:
  """Moves the finished outputs from `stage` into place; if one cannot go,
  those moved already are removed again."""
  moved = []
  for path in paths.values():
    for name in _files_of(path, out_format):
      try:
        os.replace(os.path.join(stage, os.path.basename(name)), name)
      except OSError as e:
        for done in moved:
          _remove(done)
        raise PredictError(f"{path}: cannot write: {e.strerror or _first_line(e)}") from None
      moved.append(name)
  try:
    os.rmdir(stage)
  except OSError:  # the outputs are complete; the next run removes an empty stage
    pass


def load(workdir: str = "", model: str = "") -> inference.Usable:
  """The run (--workdir) or the model file (--model): exactly one of them."""
  if bool(workdir) == bool(model):
    raise PredictError("give the model to predict with: --workdir=RUN (a finished training "
                       "run) or --model=MODEL (a file from python -m lsmtl_jax.export), "
                       "one of them")
  return inference.load_model(model) if model else inference.load_run(workdir)


def check_options(opts: Options) -> None:
  """Raises PredictError for options out of range (the CLI's flags and the
  notebook API's arguments alike)."""
  if opts.input_units not in UNITS:
    raise PredictError(f"--input_units must be one of {UNITS}, got {opts.input_units!r}")
  if opts.output_units not in UNITS:
    raise PredictError(f"--output_units must be one of {UNITS}, got {opts.output_units!r}")
  if opts.block_rows <= 0 or opts.batch_size <= 0:
    raise PredictError("--block_rows and --batch_size must be positive")
  if not -1.0 <= opts.threshold <= 1.0:
    raise PredictError(f"--threshold is a validation CC, in [-1, 1]; got {opts.threshold:g}")
  if opts.intervals and not 0 < opts.intervals < 1:
    raise PredictError(f"--intervals is a coverage in (0, 1), e.g. 0.9; got {opts.intervals:g}")


def calibration_for(run: inference.Usable, opts: Options,
                    log=lambda s: None) -> intervals_lib.Calibration | None:
  """The run's interval calibration when opts.intervals asks for bounds."""
  if not opts.intervals:
    return None
  calibration = run.calibration(opts.batch_size)
  try:
    calibration.quantile(opts.intervals)
  except intervals_lib.IntervalError as e:
    raise PredictError(f"--intervals={opts.intervals:g}: {e}") from None
  if calibration.source == "validation":
    log(f"intervals: calibrated on the {calibration.num_profiles} validation profiles, which "
        "also chose the checkpoint: mildly optimistic (train with "
        "--config.data.calibration_fraction=0.5 for held-out calibration)")
  return calibration


def predict_file(workdir: str, input_path: str, output_path: str, opts: Options,
                 log=lambda s: None, *, model: str = "") -> dict:
  """Runs the whole prediction with the run at `workdir` or the model file
  `model` (one of them); returns a summary dict. Raises PredictError,
  inference.RunError or formats.PrepareError with one-line messages, and
  workdir_lock.LockError while another process writes the same output."""
  check_options(opts)
  if not output_path:
    raise PredictError("--output is empty; name the file to write")
  input_format = opts.input_format if opts.input_format != "auto" else (
      formats.detect_format(input_path, "--input_format"))
  bound_paths = interval_paths(output_path) if opts.intervals else {}
  for path in (output_path, *bound_paths.values()):
    _check_output(path, input_path, opts)
  out_format = _output_format(output_path, opts, input_format)
  # One writer per output (the bounds go with it): .OUTPUT.lock beside it.
  with workdir_lock.hold_beside(output_path):
    for path in (output_path, *bound_paths.values()):  # its holder may have written it
      _check_output(path, input_path, opts)
    return _predict_locked(workdir, model, input_path, input_format, output_path,
                           bound_paths, out_format, opts, log)


def _predict_locked(workdir, model, input_path, input_format, output_path, bound_paths,
                    out_format, opts, log) -> dict:
  t0 = time.perf_counter()
  run = load(workdir, model)
  calibration = calibration_for(run, opts, log)
  matrix = formats.open_matrix(input_path, input_format, gene_ids=opts.gene_ids,
                               sample_ids=opts.sample_ids)
  with matrix:
    if matrix.num_samples == 0:
      raise PredictError(f"{input_path}: no profiles (0 samples); nothing to predict")
    mapper = LandmarkMapper(run, matrix.gene_ids, input_path, opts)
    if mapper.missing:
      log(f"{input_path}: imputing {len(mapper.missing)} missing landmark(s) with the "
          "training mean")
    predictor = inference.Predictor(run, opts.batch_size)
    meta = gene_metadata(run, ~mapper.present, opts.threshold, predictor)
    gene_ids = run.landmark_ids + run.target_ids
    n = matrix.num_samples
    paths = {"prediction": output_path, **bound_paths}
    _check_space(output_path, out_format, n * len(gene_ids) * 4 * len(paths))
    col_meta = matrix.column_metadata()
    compute = BlockPredictor(run, mapper, predictor, opts, calibration, list(paths))
    chunk = max(1, matrix.row_chunk)
    step = max(chunk, (opts.block_rows // chunk) * chunk)
    log(f"{input_path}: streaming {n} profiles in blocks of {step} -> {output_path}")

    # Whole rows are read (a row's genes are contiguous on disk) in pieces of
    # whole storage chunks of about READ_PIECE_BYTES, so the rows of all the
    # genes never sit in memory at once; only the landmark columns travel on.
    piece = max(chunk, READ_PIECE_BYTES // (4 * matrix.num_genes) // chunk * chunk)

    def read_blocks() -> Iterator[tuple[int, np.ndarray]]:
      for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, np.concatenate([mapper.select(matrix.read_rows(i, min(stop, i + piece)))
                                     for i in range(start, stop, piece)])

    def writer(path: str, into: str):
      return lambda blocks: _write_output(out_format, path, blocks, n, matrix.sample_ids,
                                          gene_ids, meta, col_meta, into=into)

    stages = _stream(read_blocks(), lambda start, selected: compute(start, selected,
                                                                    matrix.sample_ids),
                     paths, writer, out_format,
                     # the text formats keep every block until the end
                     recycle=compute.buffers.give if out_format in ("gctx", "h5ad", "npy")
                     else None)
    stages["model"] = compute.model_seconds
    stages["buffers"] = dict(compute.buffers.allocated)
    read_bytes = n * matrix.num_genes * np.dtype(np.float32).itemsize

  well = int(meta["well_inferred"].sum())
  summary = {"profiles": n, "genes": len(gene_ids), "landmarks": run.num_landmarks,
             "targets": run.num_targets, "well_inferred": well,
             "imputed_landmarks": len(mapper.missing), "seconds": time.perf_counter() - t0,
             "output": output_path, "format": out_format, "stages": stages,
             "read_bytes": read_bytes,
             "written_bytes": sum(_size(p) for path in paths.values()
                                  for p in _files_of(path, out_format))}
  if calibration is not None:
    summary.update(intervals=opts.intervals, interval_files=list(bound_paths.values()),
                   calibration={"source": calibration.source,
                                "profiles": calibration.num_profiles})
  return summary


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  pipeline.fixed_mmap_threshold()  # peak RSS stays flat however many profiles stream
  opts = Options(input_units=FLAGS.input_units, output_units=FLAGS.output_units,
                 quantile_map=FLAGS.quantile_map, impute_missing=FLAGS.impute_missing,
                 check_units=FLAGS.check_units, threshold=FLAGS.threshold,
                 batch_size=FLAGS.batch_size, block_rows=FLAGS.block_rows,
                 input_format=FLAGS.input_format, output_format=FLAGS.output_format,
                 gene_ids=FLAGS.gene_ids, sample_ids=FLAGS.sample_ids,
                 overwrite=FLAGS.overwrite, intervals=FLAGS.intervals)
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    with cli.interruptible():  # a signal unwinds the stage and the lock like an error
      s = predict_file(FLAGS.workdir or "", FLAGS.input, FLAGS.output, opts,
                       log=lambda m: print(m, file=sys.stderr), model=FLAGS.model or "")
  except (PredictError, inference.RunError, formats.PrepareError, store.DatasetError,
          workdir_lock.LockError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except cli.Interrupted as e:
    print(f"error: {FLAGS.output}: interrupted by {e.name}; nothing written (the partial "
          "output was removed)", file=sys.stderr)
    sys.exit(128 + e.signum)
  imputed = f", {s['imputed_landmarks']} imputed" if s["imputed_landmarks"] else ""
  print(f"predict: {s['profiles']} profiles, {s['genes']} genes ({s['landmarks']} landmarks"
        f"{imputed}, {s['targets']} targets), {s['well_inferred']} of {s['targets']} targets "
        f"well inferred (val CC >= {opts.threshold:g}), {s['seconds']:.1f} s -> {s['output']}")
  if "intervals" in s:
    print(f"predict: {100 * s['intervals']:g}% prediction intervals (from "
          f"{s['calibration']['profiles']} {s['calibration']['source']} profiles) -> "
          f"{', '.join(s['interval_files'])}")
  st = s["stages"]
  print(f"predict: streamed in {st['wall']:.1f} s; busy reading {st['read']:.1f} s, computing "
        f"{st['compute']:.1f} s (model {st['model']:.1f} s), writing {st['write']:.1f} s")
  if FLAGS.summary_json:
    try:
      fileio.write_json(FLAGS.summary_json, s)
    except OSError as e:
      print(f"error: --summary_json={FLAGS.summary_json}: cannot write: {e.strerror or e}",
            file=sys.stderr)
      sys.exit(2)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A finished training run (or --model).")
  flags.DEFINE_string("model", None, "A model file from python -m lsmtl_jax.export "
                      "(or --workdir).")
  flags.DEFINE_string("input", None, "Profiles: .gctx/.h5, .h5ad, .gct, .csv/.tsv/.txt, .npy "
                      "or an ARCHS4 .h5.")
  flags.DEFINE_string("output", None, "Where to write; format from the name.")
  flags.DEFINE_enum("input_units", "expression", UNITS, "Units of the input values.")
  flags.DEFINE_enum("output_units", "expression", UNITS, "Units of the written values.")
  flags.DEFINE_bool("quantile_map", False, "Map each profile by rank onto the training "
                    "landmarks' reference (another platform).")
  flags.DEFINE_bool("impute_missing", False, "Fill missing landmarks with training means.")
  flags.DEFINE_bool("check_units", True, "Refuse values that look unnormalized.")
  flags.DEFINE_float("threshold", 0.9, "Validation CC above which a target is well inferred.")
  flags.DEFINE_integer("batch_size", 1024, "Profiles per device batch.")
  flags.DEFINE_integer("block_rows", 4096, "Profiles read and written per block.")
  flags.DEFINE_string("input_format", "auto", "gctx, gct, table, npy, h5ad or archs4; auto: "
                      "from the name.")
  flags.DEFINE_string("output_format", "auto", "gctx, gct, table, npy or h5ad; auto: from the "
                      "name.")
  flags.DEFINE_string("gene_ids", "", "For .npy input: gene ids, one per line.")
  flags.DEFINE_string("sample_ids", "", "For .npy input: sample ids, one per line.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
  flags.DEFINE_float("intervals", 0.0, "Also write prediction intervals at this coverage "
                     "(e.g. 0.9) to OUT.lower.EXT and OUT.upper.EXT; 0: none.")
  flags.DEFINE_string("summary_json", "", "Also write the run's summary (counts, files, "
                      "bytes, busy seconds of each stage) as JSON to this file.")
  flags.mark_flags_as_required(["input", "output"])
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
