"""The dataset store, the demo generator, the loaders and the LSR baseline."""

import dataclasses
import json
import os
import shutil

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


def test_generator_in_worker_processes_gives_the_same_bits(tmp_path):
  spec = dataclasses.replace(TINY_SPEC, num_samples=2 * synthetic._BLOCK_ROWS + 300)  # 3 blocks
  one = synthetic.generate(spec, str(tmp_path / "one"))
  pooled = synthetic.generate(spec, str(tmp_path / "pooled"), workers=2)
  np.testing.assert_array_equal(_read_all(pooled), _read_all(one))
  assert pooled.meta == one.meta


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


# ----------------------------------------------------------------------------
# Self-verifying datasets: a lost or damaged chunk is an error, never a fill value
# ----------------------------------------------------------------------------


def _small_dataset(path, num_rows=600, num_genes=7, integrity=True):
  """Three shards (256, 256, 88 rows) of known values; row 3 is all zeros (the fill value)."""
  values = np.random.default_rng(0).normal(size=(num_rows, num_genes)).astype(np.float32)
  values[3] = 0.0
  meta = {"landmarks": {"ids": ["L0", "L1"]},
          "targets": {"ids": [f"T{i}" for i in range(num_genes - 2)]},
          "splits": {"train": list(range(500)), "val": list(range(500, num_rows))}}
  ds = store.write_dataset(str(path), [values[:100], values[100:333], values[333:]], num_rows,
                           meta)
  if not integrity:  # as written before the checksums and the manifest
    meta_path = os.path.join(str(path), "meta.json")
    full = json.load(open(meta_path))
    del full["integrity"]
    json.dump(full, open(meta_path, "w"))
  return ds, values


def _shard(ds, i):
  return os.path.join(ds.path, store.ARRAY_NAME, "c", str(i), "0")


def test_every_row_is_stored_and_read_back_exactly(tmp_path):
  ds, values = _small_dataset(tmp_path / "d")
  np.testing.assert_array_equal(ds.read_rows(np.arange(600)), values)
  np.testing.assert_array_equal(ds.read_rows(np.array([3])), 0.0)  # a fill-value row: stored
  shards = ds.meta["integrity"]["shards"]
  assert [s["rows"] for s in shards] == [[0, 256], [256, 512], [512, 600]]
  assert all(os.path.getsize(_shard(ds, i)) == s["bytes"] for i, s in enumerate(shards))


def test_deleted_shard_file_is_an_error_naming_dataset_and_rows(tmp_path):
  ds, _ = _small_dataset(tmp_path / "d")
  os.remove(_shard(ds, 1))
  # Opened before the damage: the read fails, naming exactly the rows it lost.
  with pytest.raises(store.DatasetError) as e:
    ds.read_rows(np.array([5, 300, 2, 511, 512]))
  msg = str(e.value)
  assert msg.startswith(f"{ds.path}: damaged dataset: 2 row(s) cannot be read (rows 300, 511)")
  assert "\n" not in msg
  with pytest.raises(store.DatasetError, match=r"256 row\(s\) cannot be read \(rows 256-511\)"):
    ds.load_into_memory()
  np.testing.assert_array_equal(ds.read_rows(np.array([0, 599])).shape, (2, 7))  # others fine
  # Opened after it: the manifest check refuses the dataset at once.
  with pytest.raises(store.DatasetError) as e:
    store.open_dataset(ds.path)
  assert str(e.value) == (f"{ds.path}: damaged dataset: rows 256-511 (shard file "
                          f"expression.zarr/c/1/0) are missing; prepare or generate it again")


def test_truncated_shard_file_is_an_error_naming_dataset_and_rows(tmp_path):
  ds, _ = _small_dataset(tmp_path / "d")
  with open(_shard(ds, 2), "r+b") as f:
    f.truncate(3000)
  with pytest.raises(store.DatasetError) as e:
    ds.read_rows(np.array([520, 10]))
  msg = str(e.value)
  assert msg.startswith(f"{ds.path}: damaged dataset: 1 row(s) cannot be read (rows 520)")
  assert "\n" not in msg
  with pytest.raises(store.DatasetError, match=r"rows 512-599 .* has 3000 bytes, 6916 when "
                                               r"written \(truncated"):
    store.open_dataset(ds.path)


def test_flipped_byte_is_an_error_naming_the_row(tmp_path):
  ds, _ = _small_dataset(tmp_path / "d")
  row_bytes = 7 * 4 + 4  # float32 values and their crc32c
  with open(_shard(ds, 0), "r+b") as f:
    f.seek(30 * row_bytes + 5)
    byte = f.read(1)
    f.seek(30 * row_bytes + 5)
    f.write(bytes([byte[0] ^ 1]))
  reopened = store.open_dataset(ds.path)  # same size: only the checksum can tell
  with pytest.raises(store.DatasetError, match=r"1 row\(s\) cannot be read \(rows 30\): "
                                               r"DATA_LOSS.*Digest mismatch"):
    reopened.read_rows(np.arange(20, 40))


def test_datasets_without_a_manifest_are_read_strictly(tmp_path):
  ds, values = _small_dataset(tmp_path / "d", integrity=False)
  ds = store.open_dataset(ds.path)
  np.testing.assert_array_equal(ds.read_rows(np.arange(600)), values)
  os.remove(_shard(ds, 0))
  with pytest.raises(store.DatasetError, match=r"rows 0-255\).*is missing"):
    store.open_dataset(ds.path).read_rows(np.arange(256))


def test_demo_dataset_verifies_itself(tiny_dataset, tmp_path):
  assert tiny_dataset.meta["integrity"]["shard_rows"] == store.SHARD_ROWS
  copy = tmp_path / "tiny"
  shutil.copytree(tiny_dataset.path, copy)
  os.remove(os.path.join(copy, store.ARRAY_NAME, "c", "0", "0"))
  with pytest.raises(store.DatasetError, match=r"rows 0-255 \(shard file"):
    store.open_dataset(str(copy))


@pytest.mark.parametrize("field, damage, needle", [
    ("sample_ids", lambda m: m["sample_ids"].pop(), "sample_ids has 299 entries, the stored "
                                                    "array 300 rows"),
    ("splits", lambda m: m["splits"]["val"].append(300), "splits.val holds row 300, the stored "
                                                         "array has 300 rows"),
    ("splits type", lambda m: m["splits"].__setitem__("val", "all"), "splits.val is not a list"),
    ("mean", lambda m: m["standardization"]["mean"].pop(), "standardization.mean has 63 entries "
                                                           "for 64 genes"),
    ("symbols", lambda m: m["targets"]["symbols"].pop(), "targets.symbols has 39 entries for 40"),
    ("ids", lambda m: [m["targets"][k].pop() for k in ("ids", "symbols")], "name 63 genes, the stored array "
                                                 "(expression.zarr) has 64 columns"),
    ("no landmarks", lambda m: m.pop("landmarks"), "landmarks.ids is missing"),
    ("reference", lambda m: m["quantile_reference"].pop(), "quantile_reference has 63 entries"),
])
def test_meta_that_disagrees_with_the_store_is_refused(tiny_dataset, tmp_path, field, damage,
                                                       needle):
  copy = tmp_path / "tiny"
  shutil.copytree(tiny_dataset.path, copy)
  meta = json.loads((copy / "meta.json").read_text())
  damage(meta)
  (copy / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(store.DatasetError) as e:
    store.open_dataset(str(copy))
  msg = str(e.value)
  assert msg.startswith(f"{copy / 'meta.json'}: ") and needle in msg, msg


def test_loaders_surface_a_damaged_read_as_one_dataset_error(tmp_path):
  ds, _ = _small_dataset(tmp_path / "d")
  os.remove(_shard(ds, 1))
  order = loader.TrainOrder(np.arange(600), 64, seed=0)
  with pytest.raises(store.DatasetError, match=r"damaged dataset: \d+ row\(s\) cannot be read"):
    for _ in loader.train_batches(ds, order, 0, order.steps_per_epoch):
      pass
  with pytest.raises(store.DatasetError, match=r"44 row\(s\) cannot be read \(rows 256-299\)"):
    list(loader.eval_batches(ds, np.arange(600), 100))  # the batch of rows 200-299


def test_a_cache_another_run_fills_first_is_used(tmp_path, monkeypatch):
  # Runs started side by side on an empty cache each generate the dataset; the
  # one that finds it written when its own write is refused opens that one.
  real_generate = synthetic.generate

  def another_run_finishes_first(spec, path, workers=1):
    real_generate(spec, path, workers)  # the other run
    return real_generate(spec, path, workers)  # ours: refused, the dataset now exists

  monkeypatch.setattr(synthetic, "generate", another_run_finishes_first)
  ds = synthetic.cached(TINY_SPEC, str(tmp_path))
  expected = real_generate(TINY_SPEC, str(tmp_path / "reference"))
  np.testing.assert_array_equal(ds.read_rows(np.arange(ds.num_samples)),
                                expected.read_rows(np.arange(expected.num_samples)))
  assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_two_processes_filling_an_empty_cache_both_succeed(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  code = ("import sys, dataclasses; from lsmtl_jax.data import synthetic; "
          "from conftest import TINY_SPEC; "
          "ds = synthetic.cached(dataclasses.replace(TINY_SPEC, num_samples=3000), sys.argv[1]); "
          "print(ds.num_samples)")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  assert [o.strip() for o, _ in outs] == ["3000", "3000"]
  assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
