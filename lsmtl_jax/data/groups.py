"""Group-aware splits: samples that share a field's value land in one split only.

A random split puts time points of one donor, replicates of one CMap LINCS
perturbation or plate, or samples of one GEO series in both training and test,
so test figures are optimistic. With `split.group_by = FIELD` the samples are
grouped by FIELD's value and whole groups are assigned to the splits:

* The field comes from the input's per-sample metadata (GCTx /0/META/COL,
  GCT 1.3 column metadata rows, h5ad obs, ARCHS4 /meta/samples), or from
  `split.sample_table`: a tab-separated table (comma for .csv) with a header
  row, whose `split.sample_id_column` (default: its first column) holds the
  data's sample ids, matched exactly (case and whitespace kept, the cells
  stripped of surrounding spaces). Every sample of the data must have a row;
  extra rows are ignored.
* A sample whose value is missing (empty, NaN, CMap's -666, "nan", "NA") is
  its own group: it cannot leak through a group it is not known to be in, and
  the count is recorded so a mostly-missing field is visible.
* Assignment: the groups are shuffled by the seed, stably sorted by size
  (largest first), and each goes to the split whose sample count falls
  furthest short of its requested fraction. The fractions are thus met as
  closely as whole groups allow; the seed decides which of the groups of equal
  size go where.

Fewer distinct groups than splits with a positive fraction, or a split left
empty, is an error naming the file and the field; so is a field the input
does not have (the message lists the fields it has).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

import numpy as np

from lsmtl_jax.data.matrix import Matrix
from lsmtl_jax.data.matrix import PrepareError

SPLITS = ("train", "val", "test")
_MISSING_TEXT = {"", "nan", "na", "n/a", "none", "null", "-666", "-666.0"}


def _is_missing(value) -> bool:
  if value is None:
    return True
  if isinstance(value, (float, np.floating)):
    return bool(np.isnan(value)) or value == -666
  return str(value).strip().lower() in _MISSING_TEXT


def _labels_from_metadata(matrix: Matrix, field: str) -> tuple[np.ndarray, str]:
  meta = matrix.column_metadata()
  if field not in meta:
    have = ", ".join(sorted(meta)) or "none"
    raise PrepareError(f"{matrix.path}: split.group_by: no per-sample field {field!r} "
                       f"(the file's sample fields: {have}; or give split.sample_table)")
  return np.asarray(meta[field], object), matrix.path


def read_sample_table(path: str, id_column: str, field: str,
                      sample_ids: Sequence[str]) -> np.ndarray:
  """FIELD's value for each of `sample_ids`, from a table with a header row."""
  if not os.path.isfile(path):
    raise PrepareError(f"{path}: no such file (split.sample_table)")
  delimiter = "," if path.lower().endswith(".csv") else "\t"
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      rows = list(csv.reader(f, delimiter=delimiter))
  except UnicodeDecodeError:
    raise PrepareError(f"{path}: not a UTF-8 text table (split.sample_table)") from None
  rows = [r for r in rows if any(c.strip() for c in r)]
  if not rows:
    raise PrepareError(f"{path}: empty table (split.sample_table)")
  header = [c.strip() for c in rows[0]]
  id_name = id_column or header[0]
  for name, what in ((id_name, "split.sample_id_column"), (field, "split.group_by")):
    if name not in header:
      raise PrepareError(f"{path}: {what}: no column {name!r} (the table's columns: "
                         f"{', '.join(header)})")
  i, j = header.index(id_name), header.index(field)
  value_of: dict[str, str] = {}
  for line_no, r in enumerate(rows[1:], start=2):
    sid = r[i].strip() if i < len(r) else ""
    if not sid:
      continue
    if sid in value_of:
      raise PrepareError(f"{path}: line {line_no}: sample {sid!r} listed twice")
    value_of[sid] = r[j].strip() if j < len(r) else ""
  absent = [s for s in sample_ids if s not in value_of]
  if absent:
    raise PrepareError(f"{path}: {len(absent)} of the data's {len(sample_ids)} samples have no "
                       f"row (first {absent[0]!r}; ids are matched exactly against column "
                       f"{id_name!r})")
  return np.array([value_of[s] for s in sample_ids], object)


def read_labels(split_cfg, matrix: Matrix) -> tuple[np.ndarray, dict[str, Any]] | None:
  """Per input sample, an integer group id (missing values each their own), and
  where it came from; None for an ungrouped split."""
  field = split_cfg.get("group_by", "")
  table = split_cfg.get("sample_table", "")
  if not field:
    if table:
      raise PrepareError(f"{table}: split.sample_table is given but split.group_by is not")
    return None
  if split_cfg.mode != "random":
    raise PrepareError(f"config: split.group_by={field!r} needs split.mode=random "
                       f"(got {split_cfg.mode!r})")
  if table:
    values = read_sample_table(table, split_cfg.get("sample_id_column", ""), field,
                               matrix.sample_ids)
    source = table
  else:
    values, source = _labels_from_metadata(matrix, field)
  missing = np.array([_is_missing(v) for v in values], bool)
  keys = [str(v).strip() for v in values]
  index: dict[str, int] = {}
  labels = np.empty(len(values), np.int64)
  for k, (key, miss) in enumerate(zip(keys, missing)):
    labels[k] = len(index) if miss else index.setdefault(key, len(index))
    if miss:
      index[f"\0missing{k}"] = labels[k]
  info = {"field": field, "source": os.path.abspath(source),
          "num_groups_in_input": len(index), "samples_with_missing_value": int(missing.sum()),
          "missing_value": "each such sample is its own group"}
  check_enough(len(index), split_cfg.fractions, source, field)
  return labels, info


def check_enough(num_groups: int, fractions: Sequence[float], source: str, field: str) -> None:
  wanted = sum(f > 0 for f in fractions)
  if num_groups < max(wanted, 1):
    raise PrepareError(f"{source}: split.group_by={field!r} has {num_groups} distinct "
                       f"value(s), too few for {wanted} splits {tuple(fractions)}")


def assign(labels: np.ndarray, fractions: Sequence[float],
           seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Whole groups to splits (module docstring); row indices per split, and a report."""
  groups, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
  n = len(labels)
  order = np.random.default_rng([seed, 3]).permutation(len(groups))
  order = order[np.argsort(-sizes[order], kind="stable")]
  target = np.asarray(fractions, np.float64) * n
  filled = np.zeros(len(SPLITS))
  split_of = np.empty(len(groups), np.int64)
  for g in order:
    k = int(np.argmax(np.where(target > 0, target - filled, -np.inf)))
    split_of[g] = k
    filled[k] += sizes[g]
  row_split = split_of[inverse]
  splits = {name: np.flatnonzero(row_split == k) for k, name in enumerate(SPLITS)}
  report = {
      "requested_fractions": [float(f) for f in fractions],
      "achieved_fractions": [len(splits[s]) / n for s in SPLITS],
      "num_samples": {s: len(splits[s]) for s in SPLITS},
      "num_groups": {s: int((split_of == k).sum()) for k, s in enumerate(SPLITS)},
      "assignment": "groups shuffled by the seed, stably sorted by size (largest first), "
                    "each to the split furthest short of its requested count",
  }
  return splits, report


def split(labels: np.ndarray, info: dict[str, Any], fractions: Sequence[float], seed: int,
          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """`assign` over the dataset's rows (labels already restricted to them), with the
  checks: enough groups, no requested split empty."""
  check_enough(len(np.unique(labels)), fractions, info["source"], info["field"])
  splits, report = assign(labels, fractions, seed)
  empty = [s for s, f in zip(SPLITS, fractions) if f > 0 and len(splits[s]) == 0]
  if empty:
    raise PrepareError(f"{info['source']}: split.group_by={info['field']!r}: "
                       f"{len(np.unique(labels))} groups cannot fill the split "
                       f"{tuple(fractions)} ({', '.join(empty)} would be empty)")
  report.update(info)
  return splits, report
