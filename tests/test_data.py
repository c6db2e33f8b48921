"""The dataset store, the demo generator, the loaders and the LSR baseline."""

import json
import os

import numpy as np
import pytest

from lsmtl_jax.data import loader
from lsmtl_jax.data import store
from lsmtl_jax.data import synthetic
from lsmtl_jax.methods import linear

from conftest import TINY_SPEC


def _read_all(ds):
  return ds.array.read().result()


def test_generator_is_deterministic(tiny_dataset, tmp_path):
  again = synthetic.generate(TINY_SPEC, str(tmp_path / "again"))
  np.testing.assert_array_equal(_read_all(again), _read_all(tiny_dataset))
  assert again.meta["splits"] == tiny_dataset.meta["splits"]


def test_splits_partition_the_samples(tiny_dataset):
  parts = [tiny_dataset.split(s) for s in ("train", "val", "test")]
  allrows = np.concatenate(parts)
  assert len(allrows) == TINY_SPEC.num_samples == len(np.unique(allrows))
  assert len(parts[0]) == 240 and len(parts[1]) == 30 and len(parts[2]) == 30


def test_values_are_quantile_normalized_then_standardized_on_train(tiny_dataset):
  meta, values = tiny_dataset.meta, _read_all(tiny_dataset).astype(np.float64)
  stats = meta["standardization"]
  mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
  expression = values * (std + stats["eps"]) + mean
  reference = np.asarray(meta["quantile_reference"])
  # Every profile is a permutation of the reference (quantile normalization) ...
  np.testing.assert_allclose(np.sort(expression, axis=1), np.broadcast_to(reference, values.shape),
                             atol=2e-5)
  # ... which spans D-GEX's GEO range ...
  assert reference[0] == pytest.approx(4.11) and reference[-1] == pytest.approx(14.97)
  # ... and the standardization statistics come from the training split alone.
  train = expression[tiny_dataset.split("train")]
  np.testing.assert_allclose(train.mean(0), mean, atol=1e-4)
  np.testing.assert_allclose(train.std(0), std, atol=1e-4)
  assert not np.allclose(expression.mean(0), mean, atol=1e-4)


def test_targets_share_module_structure(tiny_dataset):
  """Targets of one module correlate more with each other than across modules."""
  values = _read_all(tiny_dataset)[:, TINY_SPEC.num_landmarks:]
  module = np.asarray(tiny_dataset.meta["synthetic"]["target_module"])
  corr = np.abs(np.corrcoef(values.T))
  same = module[:, None] == module[None, :]
  off_diag = ~np.eye(len(module), dtype=bool)
  assert corr[same & off_diag].mean() > corr[~same].mean() + 0.1


def test_read_rows_keeps_requested_order(tiny_dataset):
  full = _read_all(tiny_dataset)
  rows = np.array([17, 3, 250, 3, 0])
  np.testing.assert_array_equal(tiny_dataset.read_rows(rows), full[rows])


def test_train_order_is_a_function_of_seed_and_step(tiny_dataset):
  train = tiny_dataset.split("train")
  a, b = loader.TrainOrder(train, 32, seed=1), loader.TrainOrder(train, 32, seed=1)
  for step in (0, 5, 7, 8, 20, 3):  # out of order, across epochs
    np.testing.assert_array_equal(a.rows(step), b.rows(step))
  epoch = np.concatenate([a.rows(s) for s in range(a.steps_per_epoch)])
  assert len(np.unique(epoch)) == len(epoch) == 7 * 32 and set(epoch) <= set(train)
  assert not np.array_equal(a.rows(0), a.rows(a.steps_per_epoch))
  assert not np.array_equal(a.rows(0), loader.TrainOrder(train, 32, seed=2).rows(0))


def test_train_batches_resume_mid_stream(tiny_dataset):
  order = loader.TrainOrder(tiny_dataset.split("train"), 32, seed=0)
  full = list(loader.train_batches(tiny_dataset, order, 0, 12))
  tail = list(loader.train_batches(tiny_dataset, order, 9, 12))
  assert len(full) == 12 and len(tail) == 3
  for a, b in zip(full[9:], tail):
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])
  assert full[0]["x"].shape == (32, TINY_SPEC.num_landmarks)
  assert full[0]["y"].shape == (32, TINY_SPEC.num_targets)


def test_eval_batches_cover_split_once_with_padding_weights(tiny_dataset):
  val = tiny_dataset.split("val")
  batches = list(loader.eval_batches(tiny_dataset, val, 8))
  assert [b["weight"].sum() for b in batches] == [8, 8, 8, 6]
  ys = np.concatenate([b["y"][b["weight"] > 0] for b in batches])
  np.testing.assert_array_equal(ys, _read_all(tiny_dataset)[val, TINY_SPEC.num_landmarks:])


def test_write_dataset_is_atomic(tmp_path, tiny_dataset):
  meta = {k: v for k, v in tiny_dataset.meta.items() if k != "format"}

  def blocks():
    yield np.zeros((10, 64), np.float32)
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    store.write_dataset(str(tmp_path / "ds"), blocks(), 300, meta)
  assert os.listdir(tmp_path) == []
  with pytest.raises(store.DatasetError, match="wrote 10 rows, expected 300"):
    store.write_dataset(str(tmp_path / "ds"), [np.zeros((10, 64))], 300, meta)
  assert os.listdir(tmp_path) == []


def test_open_dataset_errors_name_the_path(tmp_path):
  with pytest.raises(store.DatasetError, match="does not exist"):
    store.open_dataset(str(tmp_path / "nope"))
  (tmp_path / "d").mkdir()
  with pytest.raises(store.DatasetError, match="meta.json: missing"):
    store.open_dataset(str(tmp_path / "d"))
  (tmp_path / "d" / "meta.json").write_text("{not json")
  with pytest.raises(store.DatasetError, match="not valid JSON"):
    store.open_dataset(str(tmp_path / "d"))
  (tmp_path / "d" / "meta.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(store.DatasetError, match="format"):
    store.open_dataset(str(tmp_path / "d"))


def test_lsr_matches_numpy_lstsq(tiny_dataset):
  values = _read_all(tiny_dataset).astype(np.float64)
  train = values[tiny_dataset.split("train")]
  x, y = train[:, :TINY_SPEC.num_landmarks], train[:, TINY_SPEC.num_landmarks:]
  weights, bias = linear.fit(tiny_dataset, "train", batch_size=50, ridge=0.0)
  design = np.c_[x, np.ones(len(x))]
  want, *_ = np.linalg.lstsq(design, y, rcond=None)
  np.testing.assert_allclose(weights, want[:-1], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(bias, want[-1], rtol=1e-6, atol=1e-8)
  # Ridge shrinks the weights.
  w_ridge, _ = linear.fit(tiny_dataset, "train", batch_size=50, ridge=1.0)
  assert np.linalg.norm(w_ridge) < np.linalg.norm(weights)


def test_in_memory_reads_equal_store_reads(tiny_dataset):
  rows = np.array([5, 250, 5, 17])
  from_store = tiny_dataset.read_rows(rows)
  copy = store.open_dataset(tiny_dataset.path).load_into_memory()
  np.testing.assert_array_equal(copy.read_rows(rows), from_store)
  order = loader.TrainOrder(copy.split("train"), 32, seed=0)
  a = list(loader.train_batches(copy, order, 0, 3))
  b = list(loader.train_batches(tiny_dataset, order, 0, 3))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["y"], y["y"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shares_of_a_batch_cover_it_once(tiny_dataset, processes):
  """Each process reads its slice of every global batch: no row twice, none missing."""
  order = loader.TrainOrder(tiny_dataset.split("train"), 32, seed=3)
  per = 32 // processes
  for step in (0, 6, 7, 20):
    shares = [np.concatenate([b["x"] for b in loader.train_batches(
        tiny_dataset, order, step, step + 1, local=slice(p * per, (p + 1) * per))])
              for p in range(processes)]
    whole = next(loader.train_batches(tiny_dataset, order, step, step + 1))["x"]
    np.testing.assert_array_equal(np.concatenate(shares), whole)
