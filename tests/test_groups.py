"""Group-aware splits (split.group_by): real GCTx, h5ad, ARCHS4 and CSV + sample table
inputs through prepare; no group in two splits, fractions as close as whole groups
allow, deterministic from the seed; the errors; the default split unchanged."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lsmtl_jax.data import formats
from lsmtl_jax.data import groups
from lsmtl_jax.data import h5ad
from lsmtl_jax.data import prepare_lib
from lsmtl_jax.data import synthetic_gctx
from lsmtl_jax.data.formats import PrepareError

from configs.prepare import default
from conftest import REPO
from test_archs4 import write_archs4

NUM_LM, NUM_TG = 5, 9


def _sizes_and_donors(seed=0):
  """Donors of 1-9 samples (unequal, as in a cohort), four samples without a value."""
  rng = np.random.default_rng([seed, 7])
  sizes = rng.integers(1, 10, 24)
  donors = [f"P{g:02d}" for g, s in enumerate(sizes) for _ in range(s)]
  for i in (3, 17, 40, 41):
    donors[i] = ""
  return donors


def _values(n, num_genes, seed=0):
  rng = np.random.default_rng([seed, 8])
  return (rng.uniform(4, 12, num_genes) + rng.normal(0, 1, (n, 3)) @ rng.normal(
      0, 1, (3, num_genes)) + rng.normal(0, 0.2, (n, num_genes))).astype(np.float32)


def _lists(tmp, gene_ids):
  lm, tg = os.path.join(tmp, "lm.txt"), os.path.join(tmp, "tg.txt")
  with open(lm, "w") as f:
    f.write("\n".join(gene_ids[:NUM_LM]) + "\n")
  with open(tg, "w") as f:
    f.write("\n".join(gene_ids[NUM_LM:NUM_LM + NUM_TG]) + "\n")
  return lm, tg


def _config(path, lm, tg, out, **split):
  cfg = default.get_config()
  cfg.input.path, cfg.output = str(path), str(out)
  cfg.genes.landmark_ids, cfg.genes.target_ids = lm, tg
  cfg.block_rows = 16
  for k, v in split.items():
    cfg.split[k] = v
  return cfg


@pytest.fixture(name="gctx")
def _gctx(tmp_path):
  donors = _sizes_and_donors()
  n, genes = len(donors), [f"G{j}" for j in range(NUM_LM + NUM_TG)]
  samples = [f"GSM{1000 + i}" for i in range(n)]
  path = str(tmp_path / "cohort.gctx")
  formats.write_gctx(path, _values(n, len(genes)), samples, genes, chunk_rows=8,
                     col_meta={"donor": donors, "batch": [f"B{i % 2}" for i in range(n)],
                               "age": np.arange(n) % 7 * 10.0})
  return path, donors, samples, _lists(str(tmp_path), genes)


def _check_grouped(ds, labels_by_sample, fractions):
  """Independent of groups.py: from meta.json's sample ids and row splits."""
  ids, splits = ds.meta["sample_ids"], ds.meta["splits"]
  split_of = {}
  for name, rows in splits.items():
    for r in rows:
      key = labels_by_sample[ids[r]] or f"missing:{ids[r]}"
      assert split_of.setdefault(key, name) == name, f"group {key} in two splits"
  assert sorted(r for rows in splits.values() for r in rows) == list(range(len(ids)))
  sizes = {}
  for s in ids:
    key = labels_by_sample[s] or f"missing:{s}"
    sizes[key] = sizes.get(key, 0) + 1
  n = len(ids)
  report = ds.meta["preprocessing"]["split"]["groups"]
  for k, name in enumerate(("train", "val", "test")):
    # The greedy assignment stops a split within one group of its target.
    assert abs(len(splits[name]) - fractions[k] * n) <= max(sizes.values())
    assert report["achieved_fractions"][k] == pytest.approx(len(splits[name]) / n)
    assert report["num_groups"][name] == sum(v == name for v in split_of.values())
  assert report["requested_fractions"] == list(fractions)
  assert sum(report["num_groups"].values()) == len(sizes)
  return splits


def test_gctx_grouped_split_keeps_donors_whole_and_is_seeded(gctx, tmp_path):
  path, donors, samples, (lm, tg) = gctx
  by_sample = dict(zip(samples, donors))
  fractions = (0.7, 0.15, 0.15)
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    cfg = _config(path, lm, tg, tmp_path / name, group_by="donor", fractions=fractions)
    cfg.seed = seed
    ds = prepare_lib.prepare(cfg, log=lambda _: None)
    runs[name] = _check_grouped(ds, by_sample, fractions)
    rep = ds.meta["preprocessing"]["split"]["groups"]
    assert rep["field"] == "donor" and rep["samples_with_missing_value"] == 4
  assert runs["a"] == runs["b"]
  assert runs["a"] != runs["c"]  # the seed chooses among groups of equal size


def test_default_split_is_the_random_split_of_before(gctx, tmp_path):
  path, _, samples, (lm, tg) = gctx
  n = len(samples)
  for name, extra in (("plain", {}), ("empty", {"group_by": ""})):
    cfg = _config(path, lm, tg, tmp_path / name, **extra)
    cfg.seed = 3
    ds = prepare_lib.prepare(cfg, log=lambda _: None)
    # The reference: the seeded permutation cut at the rounded fractions.
    order = np.random.default_rng([3, 2]).permutation(n)
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    assert ds.meta["splits"] == {"train": sorted(order[:n_train].tolist()),
                                 "val": sorted(order[n_train:n_train + n_val].tolist()),
                                 "test": sorted(order[n_train + n_val:].tolist())}
    assert "groups" not in ds.meta["preprocessing"]["split"]


def test_h5ad_obs_field(tmp_path):
  donors = _sizes_and_donors(seed=1)
  n, genes = len(donors), [f"ENSG{j:011d}" for j in range(NUM_LM + NUM_TG)]
  samples = [f"cell{i}" for i in range(n)]
  path = str(tmp_path / "cohort.h5ad")
  h5ad.write_h5ad(path, _values(n, len(genes), 1), samples, genes,
                  obs={"donor_id": donors, "n_counts": np.arange(n)})
  lm, tg = _lists(str(tmp_path), genes)
  ds = prepare_lib.prepare(_config(path, lm, tg, tmp_path / "out", group_by="donor_id"),
                           log=lambda _: None)
  _check_grouped(ds, dict(zip(samples, donors)), (0.8, 0.1, 0.1))


def test_archs4_sample_field_and_a_split_left_empty(tmp_path):
  n, symbols = 70, [f"G{j}" for j in range(NUM_LM + NUM_TG)]
  rng = np.random.default_rng(4)
  counts = rng.poisson(30, (len(symbols), n))
  samples = [f"GSM{500 + i}" for i in range(n)]
  path = str(tmp_path / "human_gene_v2.2.h5")
  write_archs4(path, counts, symbols, samples)  # series_id: GSE0, GSE1, GSE2 in turn
  lm, tg = _lists(str(tmp_path), symbols)
  series = {s: f"GSE{i % 3}" for i, s in enumerate(samples)}
  ds = prepare_lib.prepare(_config(path, lm, tg, tmp_path / "ok", group_by="series_id",
                                   fractions=(0.4, 0.3, 0.3)), log=lambda _: None)
  splits = _check_grouped(ds, series, (0.4, 0.3, 0.3))
  assert [len(splits[k]) for k in ("train", "val", "test")] == [24, 23, 23]
  # Three series of 23-24 cannot make 80/10/10: the first two go to training.
  with pytest.raises(PrepareError, match=r"human_gene_v2.2.h5: split.group_by='series_id'.*"
                     r"3 groups.*\(val, test would be empty\)"):
    prepare_lib.prepare(_config(path, lm, tg, tmp_path / "bad", group_by="series_id"),
                        log=lambda _: None)
  assert not os.path.exists(tmp_path / "bad")


def test_csv_with_a_sample_table(tmp_path):
  donors = _sizes_and_donors(seed=2)
  n, genes = len(donors), [f"G{j}" for j in range(NUM_LM + NUM_TG)]
  samples = [f"S{i}" for i in range(n)]
  values = _values(n, len(genes), 2)
  path = str(tmp_path / "expr.csv")
  with open(path, "w") as f:
    f.write("gene," + ",".join(samples) + "\n")
    for j, g in enumerate(genes):
      f.write(g + "," + ",".join(f"{v:.5f}" for v in values[:, j]) + "\n")
  table = tmp_path / "samples.tsv"
  order = np.random.default_rng(0).permutation(n)  # rows in any order, extra rows ignored
  lines = ["title\tsample\tsubject"] + [f"t{i}\t {samples[i]} \t{donors[i]}" for i in order]
  table.write_text("\n".join(lines + ["tx\tS999\tP99"]) + "\n")
  lm, tg = _lists(str(tmp_path), genes)
  cfg = _config(path, lm, tg, tmp_path / "out", group_by="subject", sample_table=str(table),
                sample_id_column="sample")
  ds = prepare_lib.prepare(cfg, log=lambda _: None)
  _check_grouped(ds, dict(zip(samples, donors)), (0.8, 0.1, 0.1))
  roles = [x["role"] for x in ds.meta["preprocessing"]["inputs"]]
  assert "sample_table" in roles  # checksummed with the other inputs

  cfg.output = str(tmp_path / "refused")
  table.write_text("\n".join(lines[:-1]) + "\n")  # the last sample has no row
  with pytest.raises(PrepareError, match=rf"samples.tsv: 1 of the data's {n} samples have no "
                                         rf"row \(first 'S{order[-1]}'"):
    prepare_lib.prepare(cfg, log=lambda _: None)
  assert not os.path.exists(cfg.output)
  cfg.split.sample_id_column = "gsm"
  with pytest.raises(PrepareError, match=r"samples.tsv: split.sample_id_column: no column "
                                         r"'gsm' \(the table's columns: title, sample, subject"):
    prepare_lib.prepare(cfg, log=lambda _: None)


def test_missing_field_and_too_few_groups_are_one_line_errors(gctx, tmp_path):
  path, _, _, (lm, tg) = gctx
  cases = (("donr", r"cohort.gctx: split.group_by: no per-sample field 'donr' \(the file's "
                    r"sample fields: age, batch, donor; or give split.sample_table\)"),
           ("batch", r"cohort.gctx: split.group_by='batch' has 2 distinct value\(s\), too few "
                     r"for 3 splits"))
  for field, message in cases:
    with pytest.raises(PrepareError, match=message):
      prepare_lib.prepare(_config(path, lm, tg, tmp_path / "x", group_by=field),
                          log=lambda _: None)
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.prepare", "--config=configs/prepare/default.py",
       f"--config.input.path={path}", f"--config.genes.landmark_ids={lm}",
       f"--config.genes.target_ids={tg}", f"--config.output={tmp_path / 'cli'}",
       "--config.split.group_by=batch"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()  # info log lines first (absl), then the error
  assert [ln for ln in lines if not ln.startswith("I")] == lines[-1:] == [
      f"error: {path}: split.group_by='batch' has 2 distinct value(s), too few for 3 splits "
      "(0.8, 0.1, 0.1)"]
  assert not os.path.exists(tmp_path / "cli")


def test_missing_values_are_groups_of_their_own_and_assignment_meets_the_fractions():
  values = np.array(["a", "a", "", np.nan, "-666", "b", "b", "b", None, "c"], object)
  m = formats.ArrayMatrix("m.npy", np.zeros((10, 1), np.float32),
                          [f"s{i}" for i in range(10)], ["g"], {"f": values})
  cfg = default.get_config().split
  cfg.group_by = "f"
  labels, info = groups.read_labels(cfg, m)
  assert info["samples_with_missing_value"] == 4 and info["num_groups_in_input"] == 7
  assert labels[0] == labels[1] and len({labels[i] for i in (2, 3, 4, 8)}) == 4
  # Many groups: each split ends within one group of its target, every seed.
  rng = np.random.default_rng(0)
  big = np.repeat(np.arange(300), rng.integers(1, 12, 300))
  for seed in range(5):
    splits, rep = groups.assign(big, (0.8, 0.1, 0.1), seed)
    for k, s in enumerate(("train", "val", "test")):
      assert abs(len(splits[s]) - (0.8, 0.1, 0.1)[k] * len(big)) <= 11
      assert len(np.intersect1d(big[splits[s]], big[splits[("train", "val", "test")[k - 1]]])) == 0


def test_synthetic_gctx_donor_offsets(tmp_path):
  probes = synthetic_gctx.probe_ids(40, 0)
  lm, tg = synthetic_gctx.write_maps(str(tmp_path / "maps"), probes, 4, 8, 0)
  gene_probes = synthetic_gctx.read_map_probes(lm) + synthetic_gctx.read_map_probes(tg)
  paths = {}
  for name, kw in (("plain", {}), ("zero", {"group_size": 5, "group_effect": 0.0}),
                   ("donors", {"group_size": 5, "group_effect": 0.5})):
    paths[name] = str(tmp_path / f"{name}.gctx")
    synthetic_gctx.generate_gctx(paths[name], 30, probes, gene_probes, 0, 0.0, block_rows=8,
                                 **kw)
  read = {k: h5py.File(p, "r") for k, p in paths.items()}
  x = {k: f["0/DATA/0/matrix"][()].astype(np.float64) for k, f in read.items()}
  np.testing.assert_array_equal(x["plain"], x["zero"])  # the groups add nothing else
  assert "0/META/COL/donor" not in read["plain"]
  donor = [s.decode() for s in read["donors"]["0/META/COL/donor"][()]]
  assert donor == [f"D{i // 5}" for i in range(30)]
  diff = x["donors"] - x["zero"]
  unclipped = (x["donors"] > 2) & (x["donors"] < 16) & (x["zero"] > 2) & (x["zero"] < 16)
  col = {p: j for j, p in enumerate(probes)}
  for g in range(6):  # one offset per donor and gene, across blocks of 8 rows
    rows = np.arange(5 * g, 5 * g + 5)
    for members in gene_probes:
      cells = diff[np.ix_(rows, [col[p] for p in members])][unclipped[np.ix_(
          rows, [col[p] for p in members])]]
      if cells.size:
        np.testing.assert_allclose(cells, cells[0], atol=1e-5)
  assert 0.3 < diff[unclipped].std() < 0.7
  for f in read.values():
    f.close()
