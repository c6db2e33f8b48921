"""ARCHS4 gene counts (human_gene_v2.x.h5) as a matrix.Matrix, and the log2(CPM + 1) view.

The layout, as archs4py reads it:

  data/expression          raw counts, uint32, stored [genes, samples] and chunked
  meta/genes/gene_symbol   per-gene symbol (`symbol` in some releases)
  meta/genes/ensembl_gene  per-gene Ensembl id (`ensembl_gene_id` in some releases)
  meta/samples/geo_accession  per-sample GSM id; series_id, title, ... beside it

A release holds over 1.5 million samples (> 30 GB), so a block of samples is a
block of *columns* of data/expression, read with every gene (the library size
needs them all) and never more than that.

Genes are named by `gene_id_field`: 'symbol' (default), 'ensembl', or the exact
name of a meta/genes field. Rows whose id is empty are not genes of the view
but their counts stay in the library size. Rows that share an id (ARCHS4 maps
several Ensembl genes to one symbol) are summed: counts of one symbol add up,
and the sum keeps every sample's library size unchanged.

`log2cpm1`: log2(counts / library * 1e6 + 1) per sample, the library being the
sample's sum over all rows of the file (not only the selected genes), computed
in float64. A sample without counts has no CPM: its values are NaN and
prepare's `nonfinite` decides what happens to it. `Log2CPM` gives the same view
of any other counts matrix (its library: every column of the file).
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from lsmtl_jax.data import matrix
from lsmtl_jax.data.matrix import PrepareError

EXPRESSION = "data/expression"
GENES = "meta/genes"
SAMPLES = "meta/samples"
SAMPLE_ID = "geo_accession"
ID_FIELDS = {"symbol": ("gene_symbol", "symbol"), "ensembl": ("ensembl_gene", "ensembl_gene_id")}
_SUB = 64  # samples converted to float64 at once: bounds the temporaries at ~70k genes


def looks_like(path: str) -> bool:
  """An existing HDF5 file with ARCHS4's groups (a name ending .h5 says nothing:
  GCTx uses it too)."""
  try:
    if not (os.path.isfile(path) and h5py.is_hdf5(path)):
      return False
    with h5py.File(path, "r") as f:
      return EXPRESSION in f and GENES in f
  except (OSError, ValueError):
    return False


def log2_cpm1(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
  """[samples, genes] counts and per-sample library sizes -> log2(CPM + 1), float64."""
  with np.errstate(divide="ignore", invalid="ignore"):
    cpm = counts / library[:, None] * 1e6
  cpm[library == 0] = np.nan
  return np.log2(cpm + 1.0)


def check_counts(values: np.ndarray, path: str, where) -> None:
  """Raw counts are non-negative integers; `where(row, col)` names an offending cell."""
  if values.dtype.kind == "u":
    return
  bad = values < 0
  if values.dtype.kind == "f":
    bad |= ~np.isfinite(values) | (values != np.floor(values))
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise PrepareError(f"{path}: {where(r, c)} holds {values[r, c].item()!r}, not a count (raw "
                       f"counts are non-negative integers; {int(bad.sum())} such cell(s) in "
                       "this block)")


class Archs4Matrix(matrix.Matrix):
  """An ARCHS4 file read in blocks of samples; counts, or log2(CPM + 1) with `cpm`."""

  def __init__(self, path: str, gene_id_field: str = "symbol", strip_versions: bool = True,
               cpm: bool = False):
    self.path, self.cpm = path, cpm
    self._file = matrix.open_hdf5(path)
    try:
      self._open(gene_id_field or "symbol", strip_versions)
    except PrepareError:
      self._file.close()
      raise
    except (OSError, KeyError, ValueError) as e:
      self._file.close()
      raise PrepareError(f"{path}: unreadable ARCHS4 file: {matrix.first_line(e)}") from None

  def _open(self, field: str, strip_versions: bool) -> None:
    f, path = self._file, self.path
    data = f.get(EXPRESSION)
    if not isinstance(data, h5py.Dataset) or data.ndim != 2:
      raise PrepareError(f"{path}: not an ARCHS4 file: no 2-D /{EXPRESSION}")
    if data.dtype.kind not in "fiu":
      raise PrepareError(f"{path}: /{EXPRESSION} holds {data.dtype}, not counts")
    node = self._gene_field(field)
    raw_ids = matrix.decode_ids(f[node][()])
    sample_node = f"{SAMPLES}/{SAMPLE_ID}"
    if sample_node not in f:
      raise PrepareError(f"{path}: no sample ids at /{sample_node}")
    self.sample_ids = matrix.decode_ids(f[sample_node][()])
    if data.shape != (len(raw_ids), len(self.sample_ids)):
      raise PrepareError(
          f"{path}: /{EXPRESSION} has shape {data.shape}, expected [genes, samples] = "
          f"({len(raw_ids)}, {len(self.sample_ids)}) from /{node} and /{sample_node}")
    matrix.check_unique(self.sample_ids, f"sample (/{sample_node})", path)
    if strip_versions:  # touches Ensembl ids only; symbols pass unchanged
      raw_ids = [matrix.strip_version(g) for g in raw_ids]
    index: dict[str, int] = {}
    rows, extra_rows, extra_to = [], [], []
    for row, gid in enumerate(x.strip() for x in raw_ids):
      if not gid:
        continue
      if gid in index:
        extra_rows.append(row)
        extra_to.append(index[gid])
      else:
        index[gid] = len(rows)
        rows.append(row)
    self.gene_ids = list(index)
    self._rows = np.asarray(rows, np.int64)
    self._extra_rows = np.asarray(extra_rows, np.int64)
    self._extra_to = np.asarray(extra_to, np.int64)
    self.num_merged = len(extra_rows)  # rows summed into an earlier row of the same id
    self._data = data
    self.row_chunk = data.chunks[1] if data.chunks else 1

  def _gene_field(self, field: str) -> str:
    group = self._file.get(GENES)
    names = sorted(group.keys()) if isinstance(group, h5py.Group) else []
    for name in ID_FIELDS.get(field, (field,)):
      if name in names:
        return f"{GENES}/{name}"
    what = ("gene symbols" if field == "symbol" else
            "Ensembl ids" if field == "ensembl" else f"gene id field {field!r}")
    tried = " or ".join(f"/{GENES}/{n}" for n in ID_FIELDS.get(field, (field,)))
    raise PrepareError(f"{self.path}: no {what}: no {tried} (meta/genes has "
                       f"{', '.join(names) or 'nothing'}); set input.gene_id_field to one of them")

  def _read(self, start: int, stop: int) -> np.ndarray:
    try:
      block = self._data[:, start:stop]  # [genes, samples]: one read of whole chunks
    except (OSError, ValueError) as e:
      raise PrepareError(f"{self.path}: cannot read samples {start}-{stop} "
                         f"(truncated file?): {matrix.first_line(e)}") from None
    check_counts(block, self.path, lambda r, c: (
        f"/{EXPRESSION} at gene row {r}, sample {self.sample_ids[start + c]}"))
    out = np.empty((stop - start, len(self._rows)), np.float32)
    for s in range(0, stop - start, _SUB):
      counts = block[:, s:s + _SUB].T.astype(np.float64)
      genes = counts[:, self._rows]
      if len(self._extra_rows):
        np.add.at(genes, (slice(None), self._extra_to), counts[:, self._extra_rows])
      out[s:s + _SUB] = log2_cpm1(genes, counts.sum(axis=1)) if self.cpm else genes
    return out

  def column_metadata(self) -> dict[str, np.ndarray]:
    out = {}
    group = self._file.get(SAMPLES)
    for name, node in (group.items() if isinstance(group, h5py.Group) else ()):
      if name == SAMPLE_ID or not isinstance(node, h5py.Dataset):
        continue
      if node.ndim != 1 or len(node) != self.num_samples:
        raise PrepareError(f"{self.path}: /{SAMPLES}/{name} has shape {node.shape}, expected "
                           f"one value for each of {self.num_samples} samples")
      try:
        out[name] = matrix.decode_metadata(node[()])
      except (OSError, ValueError) as e:
        raise PrepareError(f"{self.path}: cannot read /{SAMPLES}/{name}: "
                           f"{matrix.first_line(e)}") from None
    return out

  def close(self) -> None:
    self._file.close()


class Log2CPM(matrix.Matrix):
  """log2(CPM + 1) of another matrix of raw counts (a GCTx or .h5ad of counts)."""

  def __init__(self, inner: matrix.Matrix):
    self.inner, self.path = inner, inner.path
    self.sample_ids, self.gene_ids = inner.sample_ids, inner.gene_ids
    self.row_chunk = inner.row_chunk

  def _read(self, start: int, stop: int) -> np.ndarray:
    counts = self.inner.read_rows(start, stop)
    check_counts(counts, self.path, lambda r, c: (
        f"sample {self.sample_ids[start + r]}, gene {self.gene_ids[c]}"))
    out = np.empty(counts.shape, np.float32)
    for s in range(0, len(counts), _SUB):
      part = counts[s:s + _SUB].astype(np.float64)
      out[s:s + _SUB] = log2_cpm1(part, part.sum(axis=1))
    return out

  def column_metadata(self) -> dict[str, np.ndarray]:
    return self.inner.column_metadata()

  def close(self) -> None:
    self.inner.close()
