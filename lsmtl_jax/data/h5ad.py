"""AnnData .h5ad in and out, with h5py after anndata's on-disk spec (no anndata needed).

The layout (anndata's "fileformat-prose" page):

  /         attrs encoding-type 'anndata', encoding-version '0.1.0'
  X         [obs, var] = [samples, genes]: a dense dataset (encoding-type 'array',
            '0.2.0'), or a CSR group (encoding-type 'csr_matrix', '0.1.0', attr
            shape; datasets data, indices, indptr)
  obs, var  dataframes: group attrs encoding-type 'dataframe', '0.2.0', _index (the
            name of the index dataset), column-order; a column is a dataset
            ('array', or 'string-array' for strings) or a 'categorical' group
            (categories, codes; code -1 is missing)
  layers, obsm, obsp, varm, varp, uns   dicts, written empty and not read

Rows are read in blocks: a dense X by rows (whole chunks), a CSR X through the
indptr slice of the block. A CSC X would have to be read whole for any row, so
it is refused with the one-line conversion to make. Files of anndata before
0.7 (obs as a compound dataset) are refused too; their CSR X (attr
h5sparse_format) is read.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from lsmtl_jax.data import matrix
from lsmtl_jax.data import store
from lsmtl_jax.data.matrix import PrepareError

ROOT_ATTRS = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
EMPTY_DICTS = ("layers", "obsm", "obsp", "varm", "varp", "uns")
INDEX = "_index"


def _attr(node, key: str, default=None):
  v = node.attrs.get(key, default)
  return v.decode() if isinstance(v, bytes) else v


def _encoding(node) -> str | None:
  legacy = {"csr": "csr_matrix", "csc": "csc_matrix"}.get(_attr(node, "h5sparse_format"))
  return _attr(node, "encoding-type") or legacy


def _strings(values) -> np.ndarray:
  return np.array(matrix.decode_ids(values), object)


def read_column(node, n: int, where: str) -> np.ndarray | None:
  """One dataframe column, or None for an encoding this reader does not know."""
  enc = _encoding(node)
  if isinstance(node, h5py.Dataset):
    values = node[()]
    if values.ndim != 1 or len(values) != n:
      raise PrepareError(f"{where} has shape {values.shape}, expected {n} values")
    return _strings(values) if values.dtype.kind in "SOU" else values
  if enc == "categorical":
    categories = read_column(node["categories"], len(node["categories"]), where)
    codes = read_column(node["codes"], n, where)
    missing = "" if categories.dtype == object else np.nan
    out = np.empty(n, object if categories.dtype == object else np.float64)
    out[:] = missing
    known = codes >= 0
    out[known] = categories[codes[known]]
    return out
  if enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
    values, mask = read_column(node["values"], n, where), node["mask"][()].astype(bool)
    if values.dtype == object:
      return np.where(mask, "", values).astype(object)
    return np.where(mask, np.nan, values.astype(np.float64))
  return None


class H5adMatrix(matrix.Matrix):
  """The X of an .h5ad, samples (obs) as rows, genes (var) as columns."""

  def __init__(self, path: str, gene_id_field: str = "", strip_versions: bool = True):
    self.path = path
    self._file = matrix.open_hdf5(path, "truncated, or not .h5ad?")
    try:
      self._open(gene_id_field, strip_versions)
    except PrepareError:
      self._file.close()
      raise
    except (OSError, KeyError, ValueError, TypeError) as e:
      self._file.close()
      raise PrepareError(f"{path}: unreadable .h5ad: {matrix.first_line(e)}") from None

  def _open(self, gene_id_field: str, strip_versions: bool) -> None:
    f, path = self._file, self.path
    if "X" not in f:
      layers = sorted(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
      also = f" (it has layers {', '.join(layers)}; this reader reads X)" if layers else ""
      raise PrepareError(f"{path}: no /X matrix{also}")
    self.sample_ids = list(self._index("obs"))
    if gene_id_field in ("", INDEX, "index"):
      genes = self._index("var")
    else:
      var = f["var"]
      if gene_id_field not in var:
        raise PrepareError(f"{path}: var has no column {gene_id_field!r} (columns: "
                           f"{', '.join(c for c in var if c != _attr(var, INDEX)) or 'none'})")
      genes = read_column(var[gene_id_field], len(self._index("var")), f"{path}: /var/"
                          f"{gene_id_field}")
      if genes is None or genes.dtype != object:
        raise PrepareError(f"{path}: /var/{gene_id_field} is not a column of strings")
    self.gene_ids = [matrix.strip_version(g) if strip_versions else g for g in genes]
    x = f["X"]
    n, g = len(self.sample_ids), len(self.gene_ids)
    if isinstance(x, h5py.Dataset):
      if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise PrepareError(f"{path}: /X is {x.dtype} of shape {x.shape}, not a 2-D "
                           "numeric matrix")
      shape = x.shape
      self.row_chunk = x.chunks[0] if x.chunks else 1
      self._indptr = None
    else:
      enc = _encoding(x)
      if enc == "csc_matrix":
        raise PrepareError(
            f"{path}: /X is stored column-compressed (csc_matrix), which has no row blocks; "
            "convert it once with anndata: a = anndata.read_h5ad(IN); a.X = a.X.tocsr(); "
            "a.write_h5ad(OUT)")
      if enc != "csr_matrix":
        raise PrepareError(f"{path}: /X is a group of encoding {enc!r}; dense or csr_matrix "
                           "are read")
      shape = tuple(int(v) for v in (_attr(x, "shape") if _attr(x, "shape") is not None
                                     else _attr(x, "h5sparse_shape")))
      self._indptr = x["indptr"][()].astype(np.int64)
      self._sparse = (x["data"], x["indices"])
      nnz = len(x["data"])
      if (len(self._indptr) != shape[0] + 1 or self._indptr[0] != 0
          or self._indptr[-1] != nnz or (np.diff(self._indptr) < 0).any()
          or len(x["indices"]) != nnz):
        raise PrepareError(f"{path}: /X is not a valid CSR matrix (indptr of "
                           f"{len(self._indptr)} entries for {shape[0]} rows and {nnz} "
                           "values, or not increasing)")
      if x["data"].dtype.kind not in "fiu":
        raise PrepareError(f"{path}: /X/data holds {x['data'].dtype}, not numbers")
    if shape != (n, g):
      raise PrepareError(f"{path}: /X has shape {shape}, expected [obs, var] = ({n}, {g})")
    matrix.check_unique(self.sample_ids, "sample (obs index)", path)
    matrix.check_unique(self.gene_ids, f"gene (var {gene_id_field or 'index'})", path)
    self._x = x

  def _index(self, name: str) -> np.ndarray:
    node = self._file.get(name)
    if not isinstance(node, h5py.Group) or _attr(node, INDEX) not in node:
      hint = (" (a compound dataset, as anndata before 0.7 wrote; re-save the file with a "
              "current anndata)" if isinstance(node, h5py.Dataset) else "")
      raise PrepareError(f"{self.path}: /{name} is not a dataframe with an index{hint}")
    return _strings(node[_attr(node, INDEX)][()])

  def _read(self, start: int, stop: int) -> np.ndarray:
    try:
      if self._indptr is None:
        return np.asarray(self._x[start:stop], dtype=np.float32)
      lo, hi = self._indptr[start], self._indptr[stop]
      data, cols = (np.asarray(d[lo:hi]) for d in self._sparse)
    except (OSError, ValueError) as e:
      raise PrepareError(f"{self.path}: cannot read rows {start}-{stop} (truncated file?): "
                         f"{matrix.first_line(e)}") from None
    g = self.num_genes
    if len(cols) and (cols.min() < 0 or cols.max() >= g):
      raise PrepareError(f"{self.path}: /X/indices holds column {int(cols.max())} in rows "
                         f"{start}-{stop}, beyond the {g} genes")
    rows = np.repeat(np.arange(stop - start), np.diff(self._indptr[start:stop + 1]))
    out = np.zeros((stop - start, g), np.float32)
    keys = rows * g + cols
    if (np.diff(keys) > 0).all():
      out[rows, cols] = data
    else:  # unsorted or repeated entries: repeated ones add up, as scipy's toarray does
      np.add.at(out, (rows, cols), data)
    return out

  def column_metadata(self) -> dict[str, np.ndarray]:
    """The obs columns this reader can decode (arrays, strings, categoricals, nullables)."""
    obs = self._file["obs"]
    order = _attr(obs, "column-order")
    names = ([c.decode() if isinstance(c, bytes) else str(c) for c in order]
             if order is not None and len(order) else
             [c for c in obs if c != _attr(obs, INDEX)])
    out = {}
    for name in names:
      values = read_column(obs[name], self.num_samples, f"{self.path}: /obs/{name}")
      if values is not None:
        out[name] = values
    return out

  def close(self) -> None:
    self._file.close()


# Writing.


def _string_dataset(group, name: str, values) -> None:
  ds = group.create_dataset(name, data=np.array([str(v) for v in values], object),
                            dtype=h5py.string_dtype())
  ds.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def _write_frame(f, name: str, index: Sequence[str], columns: Mapping[str, Sequence],
                 path: str) -> None:
  group = f.create_group(name)
  names = list(columns)
  group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0",
                      INDEX: INDEX})
  group.attrs["column-order"] = (np.array(names, dtype=h5py.string_dtype()) if names
                                 else np.array([], np.float64))  # as anndata writes none
  _string_dataset(group, INDEX, index)
  for col, values in columns.items():
    if not col or col == INDEX or "/" in col:
      raise PrepareError(f"{path}: {name} column name {col!r} cannot be stored in .h5ad")
    v = np.asarray(values)
    if v.ndim != 1 or len(v) != len(index):
      raise PrepareError(f"{path}: {name} column {col!r} has {v.shape}, expected "
                         f"{len(index)} values")
    if v.dtype.kind in "biuf":
      ds = group.create_dataset(col, data=v)
      ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    else:
      _string_dataset(group, col, v)


def write_h5ad(path: str, blocks: Iterable[np.ndarray] | np.ndarray, sample_ids: Sequence[str],
               gene_ids: Sequence[str], *, var: Mapping[str, Sequence] | None = None,
               obs: Mapping[str, Sequence] | None = None) -> None:
  """A dense float32 X [samples, genes] streamed from row blocks, obs and var
  dataframes, under a temporary name (`store.temp_name`) renamed when complete."""
  n, g = len(sample_ids), len(gene_ids)
  if isinstance(blocks, np.ndarray):
    blocks = [blocks]
  store.remove_abandoned(path)
  tmp = store.temp_name(path)
  try:
    with h5py.File(tmp, "w") as f:
      f.attrs.update(ROOT_ATTRS)
      rows = max(1, min(n, (1 << 20) // max(1, 4 * g)))  # ~1 MiB chunks of whole rows
      x = f.create_dataset("X", shape=(n, g), dtype=np.float32,
                           chunks=(rows, g) if n and g else None)
      x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
      _write_frame(f, "obs", sample_ids, obs or {}, path)
      _write_frame(f, "var", gene_ids, var or {}, path)
      for name in EMPTY_DICTS:
        f.create_group(name).attrs.update({"encoding-type": "dict",
                                           "encoding-version": "0.1.0"})
      start = 0
      for block in blocks:
        block = np.asarray(block, np.float32)
        x[start:start + len(block)] = block
        start += len(block)
      if start != n:
        raise ValueError(f"{path}: wrote {start} rows, expected {n}")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
