"""What every reader of an expression matrix shares: the samples x genes view
(`Matrix`), the one error type of bad input (`PrepareError`, a one-line message
naming the file), and id and metadata decoding. The format modules (formats.py,
archs4.py, h5ad.py) build on it; it imports none of them.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import h5py
import numpy as np

# CMap's missing value for numeric metadata (cmapPy's parse turns it into NaN).
MISSING = -666
_VERSION_SUFFIX = re.compile(r"^(ENS[A-Z]+\d+)\.\d+(_PAR_Y)?$")  # ENSG, ENST, ENSGR (old PAR), ENSMUSG


class PrepareError(ValueError):
  """Bad input or configuration for prepare; the message is one line naming the file."""


def strip_version(gene_id: str) -> str:
  """ENSG00000175063.12 -> ENSG00000175063 (Ensembl ids only; others unchanged)."""
  m = _VERSION_SUFFIX.match(gene_id)
  if m is None:
    return gene_id
  return m.group(1) + (m.group(2) or "")


def check_unique(ids: Sequence[str], what: str, path: str) -> None:
  seen: dict[str, int] = {}
  dups = []
  for i, x in enumerate(ids):
    if x in seen:
      dups.append((x, seen[x], i))
    else:
      seen[x] = i
  if dups:
    x, a, b = dups[0]
    raise PrepareError(f"{path}: {len(dups)} duplicate {what} id(s), first {x!r} at "
                       f"positions {a} and {b}")


def decode_ids(ids) -> list[str]:
  return [x.decode() if isinstance(x, bytes) else str(x) for x in ids]


def decode_metadata(values: np.ndarray) -> np.ndarray:
  """A stored metadata field as read back: strings decoded, numeric -666 as NaN."""
  v = np.asarray(values)
  if v.dtype.kind == "f":
    return np.where(v == MISSING, np.nan, v)
  if v.dtype.kind in "SO":
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in v], object)
  return v


def first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


class Matrix:
  """A samples x genes matrix behind a file. Subclasses implement `_read`."""

  path: str
  sample_ids: list[str]
  gene_ids: list[str]
  row_chunk: int = 1  # rows per storage chunk; block reads align to it

  @property
  def num_samples(self) -> int:
    return len(self.sample_ids)

  @property
  def num_genes(self) -> int:
    return len(self.gene_ids)

  def read_rows(self, start: int, stop: int) -> np.ndarray:
    return self._read(start, stop)

  def column_metadata(self) -> dict[str, np.ndarray]:
    """Per-sample fields besides the id (GCTx /0/META/COL, GCT 1.3 column
    metadata rows), one value per sample; empty where the format has none."""
    return {}

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_hdf5(path: str, hint: str = "") -> h5py.File:
  """The file read-only, or PrepareError naming it (`hint`: what a reader of
  that format suspects, e.g. "truncated or not GCTx?")."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file")
  try:
    # A 64 MB chunk cache so that a block of rows decompresses each chunk once.
    return h5py.File(path, "r", rdcc_nbytes=64 << 20)
  except OSError as e:
    hint = f" ({hint})" if hint else ""
    raise PrepareError(f"{path}: not a readable HDF5 file{hint}: {first_line(e)}") from None
