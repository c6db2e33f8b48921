"""Where a run's rows come from: the training dataset (the synthetic demo
compendium or a prepared directory) and its validation and test sets.

Validation and test are splits of the training dataset or, in the
cross-platform setting (data.val_path / data.test_path), the named split of
another prepared dataset with the same genes in the same order.

data.calibration_fraction > 0 holds that fraction of the validation rows out
(a fixed-seed subset): training never evaluates on them, so they can calibrate
prediction intervals (lsmtl_jax/intervals.py) without having chosen the model.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from lsmtl_jax.data import store
from lsmtl_jax.data import synthetic


def open_prepared(path: str) -> store.Dataset:
  if not os.path.exists(path):
    raise store.DatasetError(
        f"{path}: prepared dataset not found; create it with python -m lsmtl_jax.prepare "
        "(see docs/data.md) or point --config.data.path at it")
  return store.open_dataset(path)


def load_dataset(config: ml_collections.ConfigDict) -> store.Dataset:
  """The training dataset: the synthetic demo compendium or a prepared directory."""
  if config.data.synthetic.enabled:
    fields = dict(config.data.synthetic.to_dict())
    fields.pop("enabled")
    spec = synthetic.SyntheticSpec(**fields)
    if jax.process_count() > 1:  # one writer; the others wait, then open it
      if jax.process_index() == 0:
        synthetic.cached(spec, config.data.cache_dir)
      multihost_utils.sync_global_devices("synthetic dataset ready")
    return synthetic.cached(spec, config.data.cache_dir)
  if not config.data.path:
    raise store.DatasetError(
        "config.data.path is empty: prepare a dataset first (python -m lsmtl_jax.prepare "
        "--config=configs/prepare/geo.py ...) and pass --config.data.path=DIR")
  return open_prepared(config.data.path)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  dataset: store.Dataset
  indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class Data:
  """The training dataset, the rows training uses, where validation and test
  rows come from, and the calibration rows held out of validation (or None)."""

  train: store.Dataset
  eval_sets: dict[str, EvalSet]
  train_indices: np.ndarray
  calibration: EvalSet | None = None


def train_indices(config: ml_collections.ConfigDict, dataset: store.Dataset) -> np.ndarray:
  """The training split's rows, or data.max_train of them: a subset drawn with
  a fixed seed (not the run's), so every method and seed of a study sees the
  same profiles, and a smaller subset is part of a larger one."""
  rows = dataset.split(config.data.train_split)
  limit = config.data.get("max_train", 0)
  if 0 < limit < len(rows):
    picked = np.random.default_rng(20260).permutation(len(rows))[:limit]
    rows = np.sort(rows[picked])
  return rows


def eval_set(config: ml_collections.ConfigDict, name: str, train_ds: store.Dataset) -> EvalSet:
  """All rows of the 'val' or 'test' split, from the training dataset or data.<name>_path."""
  path, split = config.data[f"{name}_path"], config.data[f"{name}_split"]
  ds = open_prepared(path) if path else train_ds
  if ds is not train_ds:
    for kind in ("landmarks", "targets"):
      if ds.meta[kind]["ids"] != train_ds.meta[kind]["ids"]:
        raise store.DatasetError(f"{path}: its {kind} differ from the training dataset's "
                                 f"({train_ds.path}); prepare both with the same gene maps")
  return EvalSet(ds, ds.split(split))


CALIBRATION_SEED = 20261  # fixed: the same rows for every method and seed


def split_off_calibration(rows: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(validation rows, calibration rows): round(fraction * n) of `rows`, drawn
  with a fixed seed from the sorted rows (so their order does not matter),
  held out; both sorted."""
  rows = np.sort(np.asarray(rows, np.int64))
  count = int(round(fraction * len(rows)))
  if not 0 < count < len(rows):
    raise store.DatasetError(
        f"config.data.calibration_fraction={fraction:g} of {len(rows)} validation rows "
        f"leaves {count} for calibration and {len(rows) - count} for validation; both need "
        "at least one")
  held = np.zeros(len(rows), bool)
  held[np.random.default_rng(CALIBRATION_SEED).permutation(len(rows))[:count]] = True
  return np.sort(rows[~held]), np.sort(rows[held])


def calibration_fraction(config: ml_collections.ConfigDict) -> float:
  return float(config.data.get("calibration_fraction", 0.0))


def calibration_set(config: ml_collections.ConfigDict,
                    train_ds: store.Dataset) -> tuple[EvalSet, str]:
  """(rows, source) that calibrate prediction intervals: the held-out
  calibration rows ('calibration'), or with data.calibration_fraction 0 the
  whole validation split ('validation')."""
  val = eval_set(config, "val", train_ds)
  fraction = calibration_fraction(config)
  if fraction > 0:
    return EvalSet(val.dataset, split_off_calibration(val.indices, fraction)[1]), "calibration"
  return val, "validation"


def check_data(config: ml_collections.ConfigDict) -> None:
  """What load_data opens, opened and checked (datasets, splits, gene order,
  the calibration share) without reading rows and without JAX (the synthetic
  compendium is generated by the run that needs it; only its external
  evaluation sets are checked): raises DatasetError."""
  train_ds = None if config.data.synthetic.enabled else load_dataset(config)
  if train_ds is not None:
    train_ds.split(config.data.train_split)
  for name in ("val", "test"):
    path, split = config.data[f"{name}_path"], config.data[f"{name}_split"]
    if name == "test" and not split:  # a tuning candidate: test unseen
      continue
    if train_ds is not None:
      rows = eval_set(config, name, train_ds).indices
      if name == "val" and calibration_fraction(config) > 0:
        split_off_calibration(rows, calibration_fraction(config))
    elif path:
      open_prepared(path).split(split)


def load_data(config: ml_collections.ConfigDict) -> Data:
  train_ds = load_dataset(config)
  eval_sets = {}
  calibration = None
  for name in ("val", "test"):
    if name == "test" and not config.data.test_split:  # a tuning candidate: test unseen
      continue
    eval_sets[name] = eval_set(config, name, train_ds)
  fraction = calibration_fraction(config)
  if fraction > 0:
    val = eval_sets["val"]
    val_rows, calibration_rows = split_off_calibration(val.indices, fraction)
    eval_sets["val"] = EvalSet(val.dataset, val_rows)
    calibration = EvalSet(val.dataset, calibration_rows)
  rows = train_indices(config, train_ds)
  if config.data.in_memory:  # after every check: a refused run reads nothing
    train_ds.load_into_memory()
  return Data(train_ds, eval_sets, rows, calibration)
