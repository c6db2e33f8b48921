"""The on-disk dataset every method trains from: a zarr3 TensorStore plus meta.json.

Layout of a dataset directory::

    DIR/meta.json            gene ids, sample ids, splits, per-gene statistics, provenance
    DIR/expression.zarr/     float32 [samples, landmarks + targets], standardized

Columns hold the landmarks first, then the targets. Rows are stored in shards of
`SHARD_ROWS` rows, each shard split into one-row inner chunks, so a random batch
of rows costs one small read per row instead of whole multi-row chunks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np
import tensorstore as ts

FORMAT = "lsmtl_jax.dataset/1"
ARRAY_NAME = "expression.zarr"
META_NAME = "meta.json"
SHARD_ROWS = 256
STD_EPS = 1e-3  # D-GEX standardizes as (v - mean) / (std + 1e-3)


class DatasetError(ValueError):
  """A dataset directory that is missing or malformed; the message names it."""


def _zarr3_spec(path: str, shape: tuple[int, int] | None = None) -> dict[str, Any]:
  spec: dict[str, Any] = {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": os.path.abspath(path)},
  }
  if shape is not None:
    num_rows, num_cols = shape
    spec["metadata"] = {
        "shape": [num_rows, num_cols],
        "data_type": "float32",
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [SHARD_ROWS, num_cols]}},
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, num_cols],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
            },
        }],
    }
  return spec


@dataclasses.dataclass
class Dataset:
  """An opened dataset: metadata in memory, expression values on disk."""

  path: str
  meta: dict[str, Any]
  array: ts.TensorStore
  in_memory: np.ndarray | None = None

  def load_into_memory(self) -> "Dataset":
    """Reads the whole array once; later row reads come from RAM."""
    if self.in_memory is None:
      self.in_memory = self.array.read().result()
    return self

  @property
  def num_landmarks(self) -> int:
    return len(self.meta["landmarks"]["ids"])

  @property
  def num_targets(self) -> int:
    return len(self.meta["targets"]["ids"])

  @property
  def num_samples(self) -> int:
    return int(self.array.shape[0])

  def split(self, name: str) -> np.ndarray:
    splits = self.meta["splits"]
    if name not in splits:
      raise DatasetError(f"{self.path}: no split named {name!r} (has {sorted(splits)})")
    return np.asarray(splits[name], dtype=np.int64)

  def target_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-target (scale, offset) with expression = z * scale + offset."""
    stats = self.meta["standardization"]
    lo = self.num_landmarks
    mean = np.asarray(stats["mean"], np.float64)[lo:]
    std = np.asarray(stats["std"], np.float64)[lo:]
    return std + stats["eps"], mean

  def read_rows(self, rows: np.ndarray) -> np.ndarray:
    """Rows in the order asked for; reads go to disk in sorted order."""
    return self.read_rows_async(rows).result()

  def read_rows_async(self, rows: np.ndarray):
    rows = np.asarray(rows, dtype=np.int64)
    if self.in_memory is not None:
      return _Ready(self.in_memory[rows])
    order = np.argsort(rows, kind="stable")
    future = self.array[rows[order], :].read()
    return _ReorderedRead(future, order)


class _Ready:
  def __init__(self, values: np.ndarray):
    self._values = values

  def result(self) -> np.ndarray:
    return self._values


class _ReorderedRead:
  """A pending sorted read whose result is put back in the caller's row order."""

  def __init__(self, future: ts.Future, order: np.ndarray):
    self._future = future
    self._order = order

  def result(self) -> np.ndarray:
    values = self._future.result()
    out = np.empty_like(values)
    out[self._order] = values
    return out


def open_dataset(path: str) -> Dataset:
  meta_path = os.path.join(path, META_NAME)
  if not os.path.isdir(path):
    raise DatasetError(f"{path}: dataset directory does not exist")
  if not os.path.isfile(meta_path):
    raise DatasetError(f"{meta_path}: missing; not a prepared lsmtl_jax dataset")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{meta_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  if meta.get("format") != FORMAT:
    raise DatasetError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
  try:
    array = ts.open(_zarr3_spec(os.path.join(path, ARRAY_NAME)), open=True,
                    read=True).result()
  except ValueError as e:
    raise DatasetError(f"{os.path.join(path, ARRAY_NAME)}: cannot open ({e})") from None
  num_genes = len(meta["landmarks"]["ids"]) + len(meta["targets"]["ids"])
  if array.rank != 2 or array.shape[1] != num_genes:
    raise DatasetError(f"{path}: array shape {tuple(array.shape)} does not match "
                       f"{num_genes} genes in {META_NAME}")
  return Dataset(path=path, meta=meta, array=array)


def write_dataset(path: str, blocks: Iterable[np.ndarray], num_samples: int,
                  meta: Mapping[str, Any]) -> Dataset:
  """Writes row blocks and metadata to a temporary directory, then renames it to `path`.

  A crash leaves no directory at `path` that `open_dataset` would accept.
  """
  if os.path.exists(path):
    raise DatasetError(f"{path}: already exists; remove it or choose another path")
  num_genes = len(meta["landmarks"]["ids"]) + len(meta["targets"]["ids"])
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  try:
    array = ts.open(_zarr3_spec(os.path.join(tmp, ARRAY_NAME), (num_samples, num_genes)),
                    create=True, delete_existing=True).result()
    start = 0
    for block in blocks:
      block = np.asarray(block, np.float32)
      if block.ndim != 2 or block.shape[1] != num_genes:
        raise DatasetError(f"{path}: block of shape {block.shape}, expected [*, {num_genes}]")
      array[start:start + block.shape[0]].write(block).result()
      start += block.shape[0]
    if start != num_samples:
      raise DatasetError(f"{path}: wrote {start} rows, expected {num_samples}")
    full_meta = {"format": FORMAT, **meta}
    with open(os.path.join(tmp, META_NAME), "w") as f:
      json.dump(full_meta, f)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return open_dataset(path)
