"""Expression matrix readers and writers: GCTx, GCT text, tab/CSV tables, .npy
(ARCHS4 counts and AnnData .h5ad have their own modules, archs4.py and h5ad.py).

Every reader presents the same view, samples x genes, whatever the file's
orientation: `sample_ids`, `gene_ids` (the file's column/probe ids) and
`read_rows(start, stop)` returning float32 `[stop - start, num_genes]`.

GCTx is HDF5 in the layout cmapPy and cmapR write: the matrix at
`/0/DATA/0/matrix` is stored `[samples, genes]` (cmapPy writes
`data_df.transpose()`, its data frame being genes x samples), gene ids at
`/0/META/ROW/id` (length = matrix.shape[1]) and sample ids at `/0/META/COL/id`
(length = matrix.shape[0]). It is read in row blocks, never whole, so a file
larger than memory is fine. The text formats are parsed into memory (convert a
large text matrix to GCTx with `write_gctx` first). Files are opened read-only.

Every problem with an input raises `PrepareError` with a one-line message that
names the file.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from lsmtl_jax.data import archs4
from lsmtl_jax.data import h5ad
from lsmtl_jax.data import matrix
from lsmtl_jax.data import store

# The shared pieces live in matrix.py, below the readers of every format.
PrepareError = matrix.PrepareError
Matrix = matrix.Matrix
strip_version = matrix.strip_version
decode_metadata = matrix.decode_metadata
_check_unique = matrix.check_unique
_decode = matrix.decode_ids
_first_line = matrix.first_line

DATA_NODE = "0/DATA/0/matrix"
ROW_ID_NODE = "0/META/ROW/id"  # genes
COL_ID_NODE = "0/META/COL/id"  # samples
ROW_META_GROUP = "0/META/ROW"  # per-gene fields beside id
COL_META_GROUP = "0/META/COL"  # per-sample fields beside id
GCTX_VERSION = "GCTX1.0"
MISSING = matrix.MISSING


def metadata_array(values, field: str, path: str) -> np.ndarray:
  """One metadata field as CMap writes it: numbers as a numeric dataset (NaN as
  -666, booleans as 0/1), anything else as fixed-length UTF-8 bytes. cmapPy and
  cmapR then parse numbers as numbers, and -666 as missing."""
  v = np.asarray(values)
  if v.ndim != 1:
    raise PrepareError(f"{path}: metadata field {field!r} is not one value per id")
  if v.dtype.kind == "b":
    return v.astype(np.int8)
  if v.dtype.kind in "iu":
    return v
  if v.dtype.kind == "f":
    return np.where(np.isnan(v), MISSING, v).astype(np.float64)
  return np.array([x if isinstance(x, bytes) else str(x).encode() for x in v], dtype="S")


def read_gctx_metadata(path: str, group: str) -> dict[str, np.ndarray]:
  """Every field of /0/META/ROW or /0/META/COL but id, decoded (decode_metadata)."""
  with h5py.File(path, "r") as f:
    if group not in f:
      return {}
    return {name: decode_metadata(node[()]) for name, node in f[group].items()
            if name != "id" and isinstance(node, h5py.Dataset)}


class GctxMatrix(Matrix):
  """A GCTx file read in row blocks through h5py."""

  def __init__(self, path: str):
    self.path = path
    self._file = matrix.open_hdf5(path, "truncated or not GCTx?")
    try:
      for node in (DATA_NODE, ROW_ID_NODE, COL_ID_NODE):
        if node not in self._file:
          raise PrepareError(f"{path}: not a GCTx file: no /{node}")
      data = self._file[DATA_NODE]
      if not isinstance(data, h5py.Dataset) or data.ndim != 2:
        raise PrepareError(f"{path}: /{DATA_NODE} is not a 2-D dataset")
      if data.dtype.kind not in "fiu":
        raise PrepareError(f"{path}: /{DATA_NODE} holds {data.dtype}, not numbers")
      self.gene_ids = _decode(self._file[ROW_ID_NODE][()])
      self.sample_ids = _decode(self._file[COL_ID_NODE][()])
      n_rows, n_cols = data.shape
      if (n_rows, n_cols) != (len(self.sample_ids), len(self.gene_ids)):
        hint = ""
        if (n_rows, n_cols) == (len(self.gene_ids), len(self.sample_ids)):
          hint = " (it is stored genes x samples; cmapPy's layout is samples x genes)"
        raise PrepareError(
            f"{path}: matrix shape {data.shape} does not match {len(self.sample_ids)} "
            f"sample ids (/0/META/COL/id) x {len(self.gene_ids)} gene ids "
            f"(/0/META/ROW/id){hint}")
      _check_unique(self.sample_ids, "sample (/0/META/COL/id)", path)
      _check_unique(self.gene_ids, "gene (/0/META/ROW/id)", path)
      self._data = data
      self.row_chunk = data.chunks[0] if data.chunks else 1
    except PrepareError:
      self._file.close()
      raise
    except (OSError, KeyError, ValueError) as e:
      self._file.close()
      raise PrepareError(f"{path}: unreadable GCTx: {_first_line(e)}") from None

  def _read(self, start: int, stop: int) -> np.ndarray:
    try:
      return np.asarray(self._data[start:stop], dtype=np.float32)
    except (OSError, ValueError) as e:
      raise PrepareError(f"{self.path}: cannot read rows {start}-{stop} "
                         f"(truncated file?): {_first_line(e)}") from None

  def column_metadata(self) -> dict[str, np.ndarray]:
    out = {}
    group = self._file.get(COL_META_GROUP)
    for name, node in (group.items() if group is not None else ()):
      if name == "id" or not isinstance(node, h5py.Dataset):
        continue
      try:
        values = node[()]
      except (OSError, ValueError) as e:
        raise PrepareError(f"{self.path}: cannot read /{COL_META_GROUP}/{name}: "
                           f"{_first_line(e)}") from None
      if values.ndim != 1 or len(values) != self.num_samples:
        raise PrepareError(f"{self.path}: /{COL_META_GROUP}/{name} has shape {values.shape}, "
                           f"expected one value for each of {self.num_samples} samples")
      out[name] = decode_metadata(values)
    return out

  def close(self) -> None:
    self._file.close()


class ArrayMatrix(Matrix):
  """A matrix held in memory or memory-mapped (.npy)."""

  def __init__(self, path: str, values: np.ndarray, sample_ids: list[str],
               gene_ids: list[str], column_meta: dict[str, np.ndarray] | None = None):
    self.path, self._values = path, values
    self.sample_ids, self.gene_ids = sample_ids, gene_ids
    self._column_meta = column_meta or {}
    if values.ndim != 2 or values.shape != (len(sample_ids), len(gene_ids)):
      raise PrepareError(f"{path}: matrix shape {values.shape} does not match "
                         f"{len(sample_ids)} samples x {len(gene_ids)} genes")
    _check_unique(sample_ids, "sample", path)
    _check_unique(gene_ids, "gene", path)

  def _read(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self._values[start:stop], dtype=np.float32)

  def column_metadata(self) -> dict[str, np.ndarray]:
    return dict(self._column_meta)


def _parse_floats(cells: Sequence[str], path: str, line_no: int, first_col: int) -> list[float]:
  out = []
  for j, c in enumerate(cells):
    try:
      out.append(float(c))
    except ValueError:
      raise PrepareError(f"{path}: line {line_no}, column {first_col + j + 1}: "
                         f"non-numeric cell {c[:40]!r}") from None
  return out


def _open_text(path: str):
  """A text input: UTF-8, a leading byte order mark dropped (Excel and Windows
  tools write one, and it would glue itself to the first id)."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file")
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic[:2] == b"\x1f\x8b" or magic[:4] in (b"PK\x03\x04", b"\x28\xb5\x2f\xfd") or (
        magic[:3] == b"BZh"):
      raise PrepareError(f"{path}: a compressed file; decompress it first")
    return open(path, "r", encoding="utf-8-sig", newline="")
  except OSError as e:
    raise PrepareError(f"{path}: cannot open: {_first_line(e)}") from None


def read_gct(path: str, strip_versions: bool = False) -> ArrayMatrix:
  """GCT text, v1.2 or v1.3: genes as rows, samples as columns (transposed here)."""
  with _open_text(path) as f:
    try:
      lines = f.read().split("\n")
    except UnicodeDecodeError:
      raise PrepareError(f"{path}: not a text file") from None
  if lines and lines[-1] == "":
    lines.pop()
  lines = [ln.rstrip("\r") for ln in lines]
  if len(lines) < 3 or lines[0].strip() not in ("#1.2", "#1.3"):
    raise PrepareError(f"{path}: not a GCT file (first line must be #1.2 or #1.3)")
  version = lines[0].strip()
  try:
    dims = [int(x) for x in lines[1].split("\t") if x.strip()]
  except ValueError:
    raise PrepareError(f"{path}: line 2: dimensions are not integers") from None
  if version == "#1.3":
    if len(dims) != 4:
      raise PrepareError(f"{path}: line 2: GCT 1.3 needs 4 dimensions, found {len(dims)}")
    n_rows, n_cols, n_row_meta, n_col_meta = dims
  else:
    if len(dims) != 2:
      raise PrepareError(f"{path}: line 2: GCT 1.2 needs 2 dimensions, found {len(dims)}")
    n_rows, n_cols = dims
    n_row_meta, n_col_meta = 1, 0  # the Description column
  header = lines[2].split("\t")
  first = 1 + n_row_meta
  if len(header) != first + n_cols:
    raise PrepareError(f"{path}: line 3 has {len(header)} fields, expected {first + n_cols}")
  sample_ids = header[first:]
  column_meta = {}
  for k, line in enumerate(lines[3:3 + n_col_meta]):
    cells = line.split("\t")
    if len(cells) != first + n_cols:
      raise PrepareError(f"{path}: line {4 + k} (column metadata) has {len(cells)} fields, "
                         f"expected {first + n_cols}")
    column_meta[cells[0]] = _typed(cells[first:])
  body = lines[3 + n_col_meta:]
  if len(body) != n_rows:
    raise PrepareError(f"{path}: {len(body)} data lines, header says {n_rows}")
  gene_ids, values = [], np.empty((n_rows, n_cols), np.float32)
  for i, line in enumerate(body):
    cells = line.split("\t")
    line_no = 4 + n_col_meta + i
    if len(cells) != first + n_cols:
      raise PrepareError(f"{path}: line {line_no} has {len(cells)} fields, "
                         f"expected {first + n_cols}")
    gid = cells[0]
    gene_ids.append(strip_version(gid) if strip_versions else gid)
    values[i] = _parse_floats(cells[first:], path, line_no, first)
  return ArrayMatrix(path, np.ascontiguousarray(values.T), sample_ids, gene_ids, column_meta)


def _typed(cells: Sequence[str]) -> np.ndarray:
  """A text metadata field as numbers where every cell is one (-666 and NaN
  spellings as missing), else as strings."""
  for kind in (int, float):
    try:
      v = np.array([kind(c) for c in cells])
    except ValueError:
      continue
    return np.where(v == MISSING, np.nan, v) if kind is float else v
  return np.array(list(cells), object)


def read_table(path: str, id_column: int = 0, first_value_column: int = 1,
               delimiter: str = "auto", strip_versions: bool = True) -> ArrayMatrix:
  """A delimited matrix, genes as rows, one header line naming the samples.

  GEUVADIS 1000G (GD462.GeneQuantRPKM...txt): tab, gene id (with version) in
  column 0, values from column 4 (`id_column=0, first_value_column=4`).
  """
  if delimiter == "auto":
    delimiter = "," if path.endswith(".csv") else "\t"
  with _open_text(path) as f:
    try:
      header = f.readline().rstrip("\r\n").split(delimiter)
      if len(header) <= first_value_column:
        raise PrepareError(f"{path}: line 1 has {len(header)} fields; values are expected "
                           f"from column {first_value_column + 1}")
      sample_ids = [s.strip('"') for s in header[first_value_column:]]
      gene_ids, rows = [], []
      for line_no, line in enumerate(f, start=2):
        line = line.rstrip("\r\n")
        if not line:
          continue
        cells = line.split(delimiter)
        if len(cells) != len(header):
          raise PrepareError(f"{path}: line {line_no} has {len(cells)} fields, "
                             f"header has {len(header)}")
        gid = cells[id_column].strip('"')
        gene_ids.append(strip_version(gid) if strip_versions else gid)
        rows.append(_parse_floats(cells[first_value_column:], path, line_no,
                                  first_value_column))
    except UnicodeDecodeError:
      raise PrepareError(f"{path}: not a text file") from None
  if not rows:
    raise PrepareError(f"{path}: no data lines")
  values = np.asarray(rows, np.float32).T
  return ArrayMatrix(path, np.ascontiguousarray(values), sample_ids, gene_ids)


def _read_id_file(path: str) -> list[str]:
  with _open_text(path) as f:
    try:
      return [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError:
      raise PrepareError(f"{path}: not a UTF-8 text file of ids") from None


def read_npy(path: str, gene_ids_path: str, sample_ids_path: str = "") -> ArrayMatrix:
  """A [samples, genes] .npy, memory-mapped; ids come from one-per-line text files."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file")
  if not gene_ids_path:
    raise PrepareError(f"{path}: a .npy matrix needs input.gene_ids (one id per line)")
  try:
    values = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise PrepareError(f"{path}: not a readable .npy file: {_first_line(e)}") from None
  if values.dtype.kind not in "fiu":
    raise PrepareError(f"{path}: holds {values.dtype}, not numbers")
  gene_ids = _read_id_file(gene_ids_path)
  sample_ids = (_read_id_file(sample_ids_path) if sample_ids_path else
                [f"S{i}" for i in range(values.shape[0] if values.ndim else 0)])
  return ArrayMatrix(path, values, sample_ids, gene_ids)


COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".zst")
EXTENSIONS = ".gctx/.h5/.hdf5 (GCTx or ARCHS4), .h5ad, .gct, .csv/.tsv/.txt or .npy"


def compressed_suffix(path: str) -> str | None:
  lower = path.lower()
  return next((ext for ext in COMPRESSED if lower.endswith(ext)), None)


def detect_format(path: str, flag: str = "input.format") -> str:
  """The format a file name says; `flag` is what the caller's user sets instead."""
  lower = path.lower()
  for ext, fmt in ((".gctx", "gctx"), (".h5ad", "h5ad"), (".h5", "gctx"), (".hdf5", "gctx"),
                   (".gct", "gct"), (".npy", "npy"), (".csv", "table"), (".tsv", "table"),
                   (".txt", "table")):
    if lower.endswith(ext):
      if ext in (".h5", ".hdf5"):  # ARCHS4 shares the extension; its groups tell it apart
        return "archs4" if archs4.looks_like(path) else fmt
      return fmt
  ext = compressed_suffix(path)
  if ext:
    raise PrepareError(f"{path}: a compressed ({ext}) file; decompress it first (it reads "
                       f"{EXTENSIONS})")
  raise PrepareError(f"{path}: cannot tell the format from the name ({EXTENSIONS}); "
                     f"set {flag}")


def open_matrix(path: str, fmt: str = "auto", *, id_column: int = 0,
                first_value_column: int = 1, delimiter: str = "auto",
                strip_versions: bool = True, gene_ids: str = "",
                sample_ids: str = "", transform: str = "none",
                gene_id_field: str = "") -> Matrix:
  """`transform='log2cpm1'` presents raw counts as log2(CPM + 1) (archs4.py);
  `gene_id_field` picks the gene ids of ARCHS4 (meta/genes) and .h5ad (var) files."""
  fmt = detect_format(path) if fmt == "auto" else fmt
  if gene_id_field and fmt not in ("archs4", "h5ad"):
    raise PrepareError(f"{path}: input.gene_id_field={gene_id_field!r} is for ARCHS4 and "
                       f".h5ad files; a {fmt} file names its genes by its row ids")
  if fmt in ("archs4", "h5ad") or transform == "log2cpm1":
    # These readers build on Matrix, so they are imported here, on use.
    cpm = transform == "log2cpm1"
    if fmt == "archs4":
      return archs4.Archs4Matrix(path, gene_id_field or "symbol", strip_versions, cpm=cpm)
    m = (h5ad.H5adMatrix(path, gene_id_field, strip_versions) if fmt == "h5ad" else
         open_matrix(path, fmt, id_column=id_column, first_value_column=first_value_column,
                     delimiter=delimiter, strip_versions=strip_versions, gene_ids=gene_ids,
                     sample_ids=sample_ids))
    return archs4.Log2CPM(m) if cpm else m
  if fmt == "gctx":
    m = GctxMatrix(path)
    if strip_versions:
      m.gene_ids = [strip_version(g) for g in m.gene_ids]
      _check_unique(m.gene_ids, "gene (after stripping version suffixes)", path)
    return m
  if fmt == "gct":
    return read_gct(path, strip_versions)
  if fmt == "table":
    return read_table(path, id_column, first_value_column, delimiter, strip_versions)
  if fmt == "npy":
    return read_npy(path, gene_ids, sample_ids)
  raise PrepareError(f"{path}: unknown format {fmt!r} (gctx, gct, table, npy, archs4, h5ad)")


# Writers. All write [samples, genes] values with sample and gene ids.


def write_gctx(path: str, blocks: Iterable[np.ndarray] | np.ndarray, sample_ids: Sequence[str],
               gene_ids: Sequence[str], chunk_rows: int | None = None,
               compression: str | None = None, *, src: str | None = None,
               row_meta: Mapping[str, Sequence] | None = None,
               col_meta: Mapping[str, Sequence] | None = None) -> None:
  """Writes a GCTx in cmapPy's layout, block by block, to `path` via a temporary name.

  Chunks default to cmapPy's choice for a [samples, genes] matrix: up to 1,000
  rows by as many columns as fit in 1 MB. The temporary carries the pid
  (`store.temp_name`); one left by a killed writer is removed on the next write. `row_meta` (per gene) and `col_meta`
  (per sample) fields go beside the ids in CMap's encoding (`metadata_array`).
  The `src` attribute names the file: `src`, or the base name of `path`
  (callers that write to a temporary name pass the final one).
  """
  n, g = len(sample_ids), len(gene_ids)
  if isinstance(blocks, np.ndarray):
    blocks = [blocks]
  if chunk_rows is None:
    chunk = (max(1, min(n, 1000)), max(1, min(g, (1 << 18) // max(1, min(n, 1000)))))
  else:
    chunk = (max(1, min(n, chunk_rows)), g)
  fields = []
  for group, meta, count in ((ROW_META_GROUP, row_meta, g), (COL_META_GROUP, col_meta, n)):
    for name, values in (meta or {}).items():
      if name == "id" or not name or "/" in name:
        raise ValueError(f"{path}: metadata field name {name!r} is reserved or not a name")
      values = metadata_array(values, name, path)
      if len(values) != count:
        raise ValueError(f"{path}: metadata field {name!r} has {len(values)} values, "
                         f"expected {count}")
      fields.append((f"{group}/{name}", values))
  store.remove_abandoned(path)
  tmp = store.temp_name(path)
  try:
    with h5py.File(tmp, "w") as f:
      f.attrs["version"] = GCTX_VERSION
      f.attrs["src"] = src if src is not None else os.path.basename(path)
      data = f.create_dataset(DATA_NODE, shape=(n, g), dtype=np.float32,
                              chunks=chunk if n and g else None, compression=compression)
      f.create_dataset(ROW_ID_NODE, data=np.array([s.encode() for s in gene_ids], dtype="S"))
      f.create_dataset(COL_ID_NODE, data=np.array([s.encode() for s in sample_ids], dtype="S"))
      for node, values in fields:
        f.create_dataset(node, data=values)
      start = 0
      for block in blocks:
        block = np.asarray(block, np.float32)
        data[start:start + block.shape[0]] = block
        start += block.shape[0]
      if start != n:
        raise ValueError(f"{path}: wrote {start} rows, expected {n}")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_gct(path: str, values: np.ndarray, sample_ids: Sequence[str],
              gene_ids: Sequence[str]) -> None:
  """GCT 1.3 text with no metadata fields: genes as rows."""
  values = np.asarray(values)
  with open(path, "w") as f:
    f.write("#1.3\n")
    f.write(f"{len(gene_ids)}\t{len(sample_ids)}\t0\t0\n")
    f.write("\t".join(["id", *sample_ids]) + "\n")
    for j, gid in enumerate(gene_ids):
      f.write("\t".join([gid, *(repr(float(v)) for v in values[:, j])]) + "\n")


def write_table(path: str, values: np.ndarray, sample_ids: Sequence[str],
                gene_ids: Sequence[str], delimiter: str = "\t",
                extra_columns: Sequence[str] = ()) -> None:
  """Genes as rows; `extra_columns` are annotation columns between the id and the values."""
  values = np.asarray(values)
  with open(path, "w") as f:
    f.write(delimiter.join(["id", *extra_columns, *sample_ids]) + "\n")
    for j, gid in enumerate(gene_ids):
      f.write(delimiter.join([gid, *(["."] * len(extra_columns)),
                              *(repr(float(v)) for v in values[:, j])]) + "\n")
