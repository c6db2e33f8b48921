"""The on-disk dataset every method trains from: a zarr3 TensorStore plus meta.json.

Layout of a dataset directory::

    DIR/meta.json            gene ids, sample ids, splits, per-gene statistics, provenance
    DIR/expression.zarr/     float32 [samples, landmarks + targets], standardized

Columns hold the landmarks first, then the targets. Rows are stored in shards of
`SHARD_ROWS` rows, each shard split into one-row inner chunks, so a random batch
of rows costs one small read per row instead of whole multi-row chunks.

A dataset verifies itself, so that damage is an error and never data:

* every inner chunk carries a crc32c checksum (and the shard index its own), so
  a flipped or truncated byte fails the read that touches it;
* every chunk is stored, even one equal to the fill value, and reads refuse
  missing chunks (`fill_missing_data_reads: false`): a lost shard file or
  chunk is an error, not rows of zeros;
* meta.json records each shard file's size (`integrity.shards`), checked when
  the dataset is opened.

Any of these raises `DatasetError` naming the dataset and the rows affected.
Datasets written before the checksums (no `integrity` in meta.json) are still
read strictly, without the size check.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
import time
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


# Temporary outputs. A writer puts a file or folder under a hidden temporary name
# beside its final path, carrying its pid (`.NAME.tmp-PID...`, the convention of
# lsmtl_jax.fileio), and renames it when complete. A writer that was killed
# leaves its temporary behind; the next writer of the same path removes it once
# that pid no longer runs.


def temp_prefix(path: str) -> str:
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.tmp-")


def temp_name(path: str, suffix: str = "") -> str:
  """This process's temporary name for `path`."""
  return f"{temp_prefix(path)}{os.getpid()}{suffix}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  return True


def remove_abandoned(path: str) -> list[str]:
  """Removes the temporaries of `path` whose writing process is gone; returns them."""
  prefix = temp_prefix(path)
  removed = []
  for tmp in glob.glob(glob.escape(prefix) + "*"):
    pid = tmp[len(prefix):].split(".", 1)[0].split("-", 1)[0]
    if not pid.isdigit() or _alive(int(pid)):
      continue
    if os.path.isdir(tmp) and not os.path.islink(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      try:
        os.remove(tmp)
      except FileNotFoundError:
        pass
    removed.append(tmp)
  return removed


INTEGRITY = "crc32c per chunk, every chunk stored, shard sizes in meta.json"


def _zarr3_spec(path: str, shape: tuple[int, int] | None = None) -> dict[str, Any]:
  spec: dict[str, Any] = {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": os.path.abspath(path)},
      # A missing chunk is an error, never the fill value.
      "fill_missing_data_reads": False,
  }
  if shape is not None:
    # Rows equal to the fill value are stored too, so a missing chunk always means damage.
    spec["store_data_equal_to_fill_value"] = True
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
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "crc32c"}],
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
      try:
        self.in_memory = self.array.read().result()
      except ValueError as e:
        raise self.damaged(np.arange(self.num_samples), e) from None
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
    return _ReorderedRead(future, order, lambda e: self.damaged(rows, e))

  def damaged(self, rows: np.ndarray, error: BaseException) -> DatasetError:
    """The one-line error for a failed read of `rows`: which of them are damaged.

    Re-reads the rows asked for shard by shard, and the rows of a failing shard
    one by one (only on this error path), to name exactly the rows lost.
    """
    rows = np.unique(np.asarray(rows, np.int64))
    bad: list[int] = []
    reason = _one_line(error)
    for shard in np.unique(rows // SHARD_ROWS):
      in_shard = rows[rows // SHARD_ROWS == shard]
      try:
        self.array[in_shard, :].read().result()
        continue
      except ValueError:
        pass
      for r in in_shard:
        try:
          self.array[int(r), :].read().result()
        except ValueError as e:
          if not bad:
            reason = _one_line(e)
          bad.append(int(r))
    if not bad:  # it failed once and not again: name the rows asked for
      bad = rows.tolist()
    # TensorStore names the shard by its absolute path: keep the part inside the dataset.
    reason = reason.replace(f'"{os.path.abspath(self.path)}{os.sep}', '"')
    return DatasetError(f"{self.path}: damaged dataset: {len(bad)} row(s) cannot be read "
                        f"(rows {_ranges(bad)}): {reason}; prepare or generate it again")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _ranges(rows: list[int], limit: int = 6) -> str:
  """[3, 4, 5, 9] -> '3-5, 9'; at most `limit` ranges, then how many more rows."""
  spans: list[list[int]] = []
  for r in rows:
    if spans and r == spans[-1][1] + 1:
      spans[-1][1] = r
    else:
      spans.append([r, r])
  text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans[:limit])
  if len(spans) > limit:
    text += f", ... ({sum(b - a + 1 for a, b in spans[limit:])} more)"
  return text


class _Ready:
  def __init__(self, values: np.ndarray):
    self._values = values

  def result(self) -> np.ndarray:
    return self._values


class _ReorderedRead:
  """A pending sorted read whose result is put back in the caller's row order."""

  def __init__(self, future: ts.Future, order: np.ndarray, on_error):
    self._future = future
    self._order = order
    self._on_error = on_error

  def result(self) -> np.ndarray:
    try:
      values = self._future.result()
    except ValueError as e:  # NOT_FOUND (missing chunk), DATA_LOSS (checksum, truncation)
      raise self._on_error(e) from None
    out = np.empty_like(values)
    out[self._order] = values
    return out


def _shard_rows(key: str, num_rows: int) -> tuple[int, int]:
  """'c/3/0' -> the rows it holds, [768, 1024)."""
  index = int(key.split("/")[1])
  return index * SHARD_ROWS, min(num_rows, (index + 1) * SHARD_ROWS)


def _shard_files(array_path: str, num_rows: int) -> list[dict[str, Any]]:
  """The manifest of a just-written array: every shard file, its rows and its size."""
  out = []
  for i in range(-(-num_rows // SHARD_ROWS)):
    key = f"c/{i}/0"
    path = os.path.join(array_path, *key.split("/"))
    if not os.path.isfile(path):
      raise DatasetError(f"{array_path}: shard file {key} was not written")
    lo, hi = _shard_rows(key, num_rows)
    out.append({"key": key, "rows": [lo, hi], "bytes": os.path.getsize(path)})
  return out


def _check_shards(path: str, integrity: Any, num_rows: int, meta_path: str) -> None:
  """Every shard file of the manifest is there, with the size it was written with."""
  array_path = os.path.join(path, ARRAY_NAME)
  shards = integrity.get("shards") if isinstance(integrity, dict) else None
  if not isinstance(shards, list) or len(shards) != -(-num_rows // SHARD_ROWS):
    raise DatasetError(f"{meta_path}: integrity.shards does not list the "
                       f"{-(-num_rows // SHARD_ROWS)} shard files of {num_rows} rows")
  for entry in shards:
    try:
      key, size = str(entry["key"]), int(entry["bytes"])
      lo, hi = _shard_rows(key, num_rows)
    except (KeyError, TypeError, ValueError, IndexError):
      raise DatasetError(f"{meta_path}: integrity.shards has a malformed entry "
                         f"{str(entry)[:80]}") from None
    file = os.path.join(array_path, *key.split("/"))
    where = f"{path}: damaged dataset: rows {lo}-{hi - 1} (shard file {ARRAY_NAME}/{key})"
    if not os.path.isfile(file):
      raise DatasetError(f"{where} are missing; prepare or generate it again")
    actual = os.path.getsize(file)
    if actual != size:
      raise DatasetError(f"{where} are damaged: the file has {actual} bytes, {size} when "
                         "written (truncated or overwritten); prepare or generate it again")


def _check_meta(meta: Any, meta_path: str, num_rows: int, num_cols: int) -> None:
  """meta.json's lists agree with each other and with the stored array."""
  def bad(field: str, why: str):
    raise DatasetError(f"{meta_path}: {field} {why}")

  if not isinstance(meta, dict):
    bad("(top level)", "is not a JSON object")
  num_genes = 0
  for role in ("landmarks", "targets"):
    node = meta.get(role)
    ids = node.get("ids") if isinstance(node, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
      bad(f"{role}.ids", "is missing or not a non-empty list of strings")
    if "symbols" in node and (not isinstance(node["symbols"], list)
                              or len(node["symbols"]) != len(ids)):
      n = len(node["symbols"]) if isinstance(node["symbols"], list) else "no"
      bad(f"{role}.symbols", f"has {n} entries for {len(ids)} {role}.ids")
    num_genes += len(ids)
  if num_cols != num_genes:
    bad("landmarks.ids + targets.ids", f"name {num_genes} genes, the stored array "
        f"({ARRAY_NAME}) has {num_cols} columns")
  if "sample_ids" in meta and (not isinstance(meta["sample_ids"], list)
                               or len(meta["sample_ids"]) != num_rows):
    n = len(meta["sample_ids"]) if isinstance(meta["sample_ids"], list) else "no"
    bad("sample_ids", f"has {n} entries, the stored array {num_rows} rows")
  splits = meta.get("splits")
  if not isinstance(splits, dict) or not splits:
    bad("splits", "is missing or empty")
  for name, rows in splits.items():
    arr = np.asarray(rows) if isinstance(rows, list) else None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
      bad(f"splits.{name}", "is not a list of row numbers")
    if arr.size and (arr.min() < 0 or arr.max() >= num_rows):
      row = int(arr.min() if arr.min() < 0 else arr.max())
      bad(f"splits.{name}", f"holds row {row}, the stored array has {num_rows} rows")
  stats = meta.get("standardization")
  if stats is not None:
    if not isinstance(stats, dict):
      bad("standardization", "is not an object")
    for field in ("mean", "std"):
      v = stats.get(field)
      if not isinstance(v, list) or len(v) != num_genes:
        n = len(v) if isinstance(v, list) else "no"
        bad(f"standardization.{field}", f"has {n} entries for {num_genes} genes")
    if not isinstance(stats.get("eps"), (int, float)) or isinstance(stats.get("eps"), bool):
      bad("standardization.eps", "is not a number")
  ref = meta.get("quantile_reference")
  if ref is not None and (not isinstance(ref, list) or len(ref) != num_genes):
    n = len(ref) if isinstance(ref, list) else "no"
    bad("quantile_reference", f"has {n} entries for {num_genes} genes")


def open_dataset(path: str) -> Dataset:
  meta_path = os.path.join(path, META_NAME)
  if not os.path.isdir(path):
    raise DatasetError(f"{path}: dataset directory does not exist")
  if not os.path.isfile(meta_path):
    raise DatasetError(f"{meta_path}: missing; not a prepared lsmtl_jax dataset")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{meta_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  except (UnicodeDecodeError, OSError) as e:
    raise DatasetError(f"{meta_path}: unreadable ({_one_line(e)})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else None
    raise DatasetError(f"{meta_path}: format is {got!r}, expected {FORMAT!r}")
  array_path = os.path.join(path, ARRAY_NAME)
  try:
    array = ts.open(_zarr3_spec(array_path), open=True, read=True).result()
  except ValueError as e:
    raise DatasetError(f"{array_path}: cannot open ({_one_line(e)})") from None
  if array.rank != 2:
    raise DatasetError(f"{array_path}: rank {array.rank} array, expected [samples, genes]")
  num_rows, num_cols = (int(x) for x in array.shape)
  _check_meta(meta, meta_path, num_rows, num_cols)
  if "integrity" in meta:
    _check_shards(path, meta["integrity"], num_rows, meta_path)
  return Dataset(path=path, meta=meta, array=array)


def write_dataset(path: str, blocks: Iterable[np.ndarray], num_samples: int,
                  meta: Mapping[str, Any]) -> Dataset:
  """Writes row blocks and metadata to a temporary directory, then renames it to `path`.

  A crash leaves no directory at `path` that `open_dataset` would accept, only a
  temporary that the next write of `path` removes. The size of every shard file
  goes into meta.json (`integrity`), for the check on open.
  """
  if os.path.exists(path):
    raise DatasetError(f"{path}: already exists; remove it or choose another path")
  num_genes = len(meta["landmarks"]["ids"]) + len(meta["targets"]["ids"])
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  remove_abandoned(path)
  writing = None
  try:  # a signal may land while mkdtemp returns: the cleanup finds it by its prefix
    tmp = tempfile.mkdtemp(prefix=os.path.basename(temp_name(path, "-")), dir=parent)
    array_path = os.path.join(tmp, ARRAY_NAME)
    writing = ts.open(_zarr3_spec(array_path, (num_samples, num_genes)),
                      create=True, delete_existing=True)
    array = writing.result()
    writing = None
    start = 0
    for block in blocks:
      block = np.asarray(block, np.float32)
      if block.ndim != 2 or block.shape[1] != num_genes:
        raise DatasetError(f"{path}: block of shape {block.shape}, expected [*, {num_genes}]")
      writing = array[start:start + block.shape[0]].write(block)
      writing.result()
      writing = None
      start += block.shape[0]
    if start != num_samples:
      raise DatasetError(f"{path}: wrote {start} rows, expected {num_samples}")
    integrity = {"checks": INTEGRITY, "shard_rows": SHARD_ROWS,
                 "shards": _shard_files(array_path, num_samples)}
    full_meta = {"format": FORMAT, **meta, "integrity": integrity}
    with open(os.path.join(tmp, META_NAME), "w") as f:
      json.dump(full_meta, f)
    os.rename(tmp, path)
  except BaseException:
    _remove_after(writing, glob.glob(glob.escape(temp_name(path, "-")) + "*"))
    raise
  return open_dataset(path)


def _remove_after(writing, temporaries: list[str]) -> None:
  """Removes this process's temporaries of a dataset once its last open or write
  has settled: a signal can interrupt the wait for one that TensorStore's
  threads go on with, and a file landing after the removal would leave the
  folder behind."""
  if writing is not None:
    try:
      writing.result()
    except BaseException:  # pylint: disable=broad-except
      pass  # its outcome no longer matters, only that it ended
  for tmp in temporaries:
    for _ in range(20):
      shutil.rmtree(tmp, ignore_errors=True)
      if not os.path.exists(tmp):
        break
      time.sleep(0.05)
