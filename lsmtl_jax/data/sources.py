"""Where a run's rows come from: the training dataset (the synthetic demo
compendium or a prepared directory) and its validation and test sets.

Validation and test are splits of the training dataset or, in the
cross-platform setting (data.val_path / data.test_path), the named split of
another prepared dataset with the same genes in the same order.
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
  """The training dataset, the rows training uses, and where validation and
  test rows come from."""

  train: store.Dataset
  eval_sets: dict[str, EvalSet]
  train_indices: np.ndarray


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


def load_data(config: ml_collections.ConfigDict) -> Data:
  train_ds = load_dataset(config)
  if config.data.in_memory:
    train_ds.load_into_memory()
  eval_sets = {}
  for name, path, split in (("val", config.data.val_path, config.data.val_split),
                            ("test", config.data.test_path, config.data.test_split)):
    if name == "test" and not split:  # a tuning candidate: test is never looked at
      continue
    ds = open_prepared(path) if path else train_ds
    if ds is not train_ds:
      for kind in ("landmarks", "targets"):
        if ds.meta[kind]["ids"] != train_ds.meta[kind]["ids"]:
          raise store.DatasetError(f"{path}: its {kind} differ from the training dataset's "
                                   f"({train_ds.path}); prepare both with the same gene maps")
    eval_sets[name] = EvalSet(ds, ds.split(split))
  return Data(train_ds, eval_sets, train_indices(config, train_ds))
