"""python -m lsmtl_jax.prepare: the D-GEX preparation against independent float64 references."""

import hashlib
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lsmtl_jax.data import dedup
from lsmtl_jax.data import formats
from lsmtl_jax.data import prepare_lib
from lsmtl_jax.data import store
from lsmtl_jax.data import synthetic_gctx
from lsmtl_jax.data.formats import PrepareError

from configs.prepare import default
from conftest import REPO

SHARED_DATA = os.path.join(REPO, "..", "shared", "data")


def _case(tmp, n=90, num_lm=6, num_tg=14, dup=0.0, seed=0):
  """A small GEO-shaped GCTx (8-row chunks) with generated maps over its probes."""
  tmp = str(tmp)
  probes = synthetic_gctx.probe_ids(60, seed)
  lm, tg = synthetic_gctx.write_maps(os.path.join(tmp, "maps"), probes, num_lm, num_tg, seed)
  gene_probes = synthetic_gctx.read_map_probes(lm) + synthetic_gctx.read_map_probes(tg)
  data = os.path.join(tmp, "data.gctx")
  synthetic_gctx.generate_gctx(data, n, probes, gene_probes, seed, dup, block_rows=32,
                               chunk_rows=8)
  return data, lm, tg


def _config(data, lm, tg, out, **overrides):
  cfg = default.get_config()
  cfg.input.path, cfg.genes.landmark_map, cfg.genes.target_map = data, lm, tg
  cfg.output = str(out)
  cfg.block_rows = 16
  cfg.dedup.num_clusters = 4
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _quiet(_):
  pass


def _read_map(path):
  return [ln.rstrip("\n").split("\t") for ln in open(path) if ln.strip()]


def _genes_f64(data, maps):
  """Probe means per gene, float64, straight from h5py: the independent reference."""
  with h5py.File(data, "r") as f:
    raw = f["0/DATA/0/matrix"][()].astype(np.float64)
    ids = [x.decode() for x in f["0/META/ROW/id"][()]]
    samples = [x.decode() for x in f["0/META/COL/id"][()]]
  col = {p: j for j, p in enumerate(ids)}
  out, gene_ids = [], []
  for m in maps:
    for sym, ens, probes in _read_map(m):
      out.append(np.mean([raw[:, col[p]] for p in probes.split(",")], axis=0))
      gene_ids.append(ens)
  return np.stack(out, axis=1), gene_ids, samples


def _expression(ds):
  z = ds.array.read().result().astype(np.float64)
  stats = ds.meta["standardization"]
  return z * (np.asarray(stats["std"]) + stats["eps"]) + np.asarray(stats["mean"])


def test_probe_averaging_matches_hand_computation(tmp_path):
  values = np.array([[1, 2, 10, 7], [3, 5, 20, 8]], np.float32)
  path = str(tmp_path / "m.gctx")
  formats.write_gctx(path, values, ["s1", "s2"], ["p1_at", "p2_s_at", "p3_at", "p4_x_at"])
  (tmp_path / "lm.txt").write_text("A\tENSG1\tp3_at\n")
  (tmp_path / "tg.txt").write_text("B\tENSG2\tp1_at,p2_s_at,p4_x_at\nC\tENSG3\tp2_s_at,p9_at\n")
  cfg = _config(path, str(tmp_path / "lm.txt"), str(tmp_path / "tg.txt"), tmp_path / "o")
  with formats.open_matrix(path) as m:
    sel = prepare_lib.select_genes(cfg, m, None)
    stream = prepare_lib.GeneStream(m, sel, 2, "none")
    genes = stream.genes(m.read_rows(0, 2))
  # A = p3; B = (p1 + p2 + p4) / 3; C = p2 alone (p9 is not in the data).
  np.testing.assert_allclose(genes, [[10, 10 / 3, 2], [20, 16 / 3, 5]])
  assert sel.report["data_columns_absent"] == 1 and sel.report["targets_lost"] == []


def _rank_map_reference(values, reference):
  """Loops in float64: tied values share the mean reference value of their ranks."""
  out = np.empty(values.shape)
  for i, row in enumerate(values):
    srt = np.sort(row)
    for j, v in enumerate(row):
      ranks = np.flatnonzero(srt == v)
      out[i, j] = np.mean(reference[ranks])
  return out


def test_rank_map_against_float64_loops():
  rng = np.random.default_rng(0)
  reference = np.sort(rng.normal(8, 2, 12))
  values = rng.normal(0, 1, (5, 12))
  values[1, [2, 5, 7]] = 0.0  # ties, RNA-seq zeros
  values[3, :] = 1.0  # a constant row
  got = prepare_lib.rank_map(values, reference)
  np.testing.assert_allclose(got, _rank_map_reference(values, reference), rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.sort(got[0]), reference)  # no ties: a permutation
  big = rng.normal(0, 1, (600, 12))  # more rows than one internal slice
  np.testing.assert_allclose(prepare_lib.rank_map(big, reference),
                             _rank_map_reference(big, reference), atol=1e-12)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("prep")
  data, lm, tg = _case(tmp)
  ds = prepare_lib.prepare(_config(data, lm, tg, tmp / "out", **{"dedup.enabled": False}),
                           log=_quiet)
  return ds, data, lm, tg


def test_quantile_reference_and_statistics_from_train_only(prepared):
  ds, data, lm, tg = prepared
  genes, gene_ids, samples = _genes_f64(data, [lm, tg])
  assert ds.meta["landmarks"]["ids"] + ds.meta["targets"]["ids"] == gene_ids
  assert ds.meta["sample_ids"] == samples
  train = ds.split("train")
  reference = np.sort(genes[train], axis=1).mean(axis=0)
  np.testing.assert_allclose(ds.meta["quantile_reference"], reference, rtol=1e-12)
  expression = _expression(ds)
  # Every profile is the reference in its own rank order ...
  expected = _rank_map_reference(genes, reference)
  np.testing.assert_allclose(expression, expected, atol=2e-5)
  # ... and the statistics are the training rows' alone.
  stats = ds.meta["standardization"]
  np.testing.assert_allclose(stats["mean"], expected[train].mean(0), atol=1e-9)
  np.testing.assert_allclose(stats["std"], expected[train].std(0), atol=1e-9)
  assert not np.allclose(stats["mean"], expected.mean(0), atol=1e-6)
  assert stats["fit_on"] == "train"


def test_meta_records_checksums_parameters_and_versions(prepared):
  ds, data, lm, tg = prepared
  pre = ds.meta["preprocessing"]
  by_role = {x["role"]: x for x in pre["inputs"]}
  for role, path in (("data", data), ("landmark_map", lm), ("target_map", tg)):
    assert by_role[role]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert pre["config"]["seed"] == 0 and pre["config"]["dedup"]["threshold"] == 1.0
  assert {"numpy", "h5py", "tensorstore", "lsmtl_jax"} <= set(pre["versions"])
  parts = [ds.split(s) for s in ("train", "val", "test")]
  assert sorted(np.concatenate(parts).tolist()) == list(range(ds.num_samples))
  assert [len(p) for p in parts] == [72, 9, 9]


def test_split_is_reproducible_and_seeded(prepared, tmp_path):
  ds, data, lm, tg = prepared
  again = prepare_lib.prepare(_config(data, lm, tg, tmp_path / "again",
                                      **{"dedup.enabled": False}), log=_quiet)
  assert again.meta["splits"] == ds.meta["splits"]
  np.testing.assert_array_equal(again.array.read().result(), ds.array.read().result())
  other = prepare_lib.prepare(_config(data, lm, tg, tmp_path / "seed1", seed=1,
                                      **{"dedup.enabled": False}), log=_quiet)
  assert other.meta["splits"]["train"] != ds.meta["splits"]["train"]


def test_second_platform_is_rank_mapped_onto_the_stored_reference(prepared, tmp_path):
  ds, data, lm, tg = prepared
  # An RNA-seq-like cohort: genes as rows by Ensembl id (with versions), other values.
  ids = ds.meta["landmarks"]["ids"] + ds.meta["targets"]["ids"]
  rng = np.random.default_rng(5)
  values = np.exp(rng.normal(1, 1.5, (11, len(ids) + 3)))
  values[0, :4] = 0.0  # tied zeros
  formats.write_table(str(tmp_path / "cohort.txt"), values, [f"HG{i}" for i in range(11)],
                      [f"{g}.7" for g in ids] + ["ENSG99.1", "ENSG98.1", "ENSG97.1"],
                      extra_columns=("sym", "chr", "coord"))
  cfg = _config(str(tmp_path / "cohort.txt"), "", "", tmp_path / "cohort",
                reference_dataset=ds.path, **{"split.mode": "test", "input.format": "table",
                                              "input.first_value_column": 4,
                                              "dedup.enabled": False})
  out = prepare_lib.prepare(cfg, log=_quiet)
  assert out.meta["splits"] == {"test": list(range(11))}
  assert out.meta["landmarks"] == ds.meta["landmarks"] and out.meta["targets"] == ds.meta["targets"]
  assert out.meta["standardization"]["mean"] == ds.meta["standardization"]["mean"]
  reference = np.asarray(ds.meta["quantile_reference"])
  expected = _rank_map_reference(values[:, :len(ids)], reference)
  np.testing.assert_allclose(_expression(out), expected, atol=2e-5)


def test_dedup_equals_brute_force(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.normal(0, 1, (300, 40)) * 0.6
  x[:, :3] += rng.normal(0, 4, (300, 1))  # cluster structure
  src = rng.integers(0, 150, 40)
  x[150 + np.arange(40)] = x[src] + rng.normal(0, 0.05, (40, 40))  # near copies
  x[200:210] = x[190:200] + rng.normal(0, 0.2, (10, 40))  # borderline ones
  eligible = np.ones(300, bool)
  eligible[7] = False

  def blocks(order):
    starts = list(range(0, 300, 64))
    for i in (order if order is not None else range(len(starts))):
      yield starts[i], x[starts[i]:starts[i] + 64]

  for sketch_dim, threshold, max_rows in ((16, 1.0, 1000), (2, 4.0, 7), (40, 3.0, 50)):
    result = dedup.run(blocks, 300, eligible, lambda rows: x[rows], num_clusters=5,
                       threshold=threshold, sketch_dim=sketch_dim, seed=0, max_rows=max_rows)
    labels = result["labels"]
    brute = dedup.brute_force_keep(x, labels, threshold)
    np.testing.assert_array_equal(result["keep"], brute & eligible)
    assert (~result["keep"][150:190]).sum() >= 20 if threshold == 1.0 else True
  again = dedup.run(blocks, 300, eligible, lambda rows: x[rows], num_clusters=5,
                    threshold=4.0, sketch_dim=2, seed=0, max_rows=7)
  np.testing.assert_array_equal(again["labels"], labels)


def test_dedup_in_prepare_drops_planted_copies(tmp_path):
  data, lm, tg = _case(tmp_path, n=120, dup=0.1)
  ds = prepare_lib.prepare(_config(data, lm, tg, tmp_path / "out", **{"dedup.enabled": True}),
                           log=_quiet)
  report = ds.meta["preprocessing"]["dedup"]
  genes, _, samples = _genes_f64(data, [lm, tg])
  assert report["num_dropped"] >= 8 and ds.num_samples == 120 - report["num_dropped"]
  dropped = [samples.index(s) for s in report["dropped_sample_ids"]]
  for i in dropped:  # each dropped sample has an earlier close neighbour
    assert np.min(np.linalg.norm(genes[:i] - genes[i], axis=1)) < 1.0


def test_copy_targets_are_detected_reported_and_dropped(tmp_path):
  rng = np.random.default_rng(1)
  values = rng.normal(8, 1, (40, 6)).astype(np.float32)
  values[:, 4] = values[:, 0]  # probe e copies landmark probe a bit for bit
  path = str(tmp_path / "m.gctx")
  formats.write_gctx(path, values, [f"s{i}" for i in range(40)],
                     ["a_at", "b_at", "c_at", "d_at", "e_at", "f_at"])
  (tmp_path / "lm.txt").write_text("A\tENSG1\ta_at\nB\tENSG2\tb_at\n")
  (tmp_path / "tg.txt").write_text("A\tENSG1\tc_at\nD\tENSG4\td_at\nE\tENSG5\te_at\n"
                                   "F\tENSG6\tf_at\n")
  cfg = _config(path, str(tmp_path / "lm.txt"), str(tmp_path / "tg.txt"), tmp_path / "o")
  ds = prepare_lib.prepare(cfg, log=_quiet)
  copies = ds.meta["preprocessing"]["copy_targets"]
  assert copies["by_id"] == ["ENSG1"]
  assert copies["by_values"] == [{"target": "ENSG5", "landmark": "ENSG1"}]
  assert ds.meta["targets"]["ids"] == ["ENSG4", "ENSG6"]
  cfg = _config(path, str(tmp_path / "lm.txt"), str(tmp_path / "tg.txt"), tmp_path / "k",
                **{"genes.copy_targets": "keep"})
  assert prepare_lib.prepare(cfg, log=_quiet).meta["targets"]["ids"] == [
      "ENSG1", "ENSG4", "ENSG5", "ENSG6"]


def _sha(paths):
  return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def _bad_inputs(tmp_path):
  """(name, config, text the message must hold), each a config for one bad input."""
  data, lm, tg = _case(tmp_path, n=40)
  out = tmp_path / "out"
  cases = []
  add = lambda name, needle, d=data, l=lm, t=tg, **kw: cases.append(  # noqa: E731
      (name, _config(d, l, t, out, **kw), needle))
  add("missing file", "no such file", d=str(tmp_path / "absent.gctx"))
  trunc = str(tmp_path / "trunc.gctx")
  with open(data, "rb") as f, open(trunc, "wb") as g:
    g.write(f.read()[:os.path.getsize(data) * 2 // 3])
  add("truncated", "trunc.gctx", d=trunc)
  other = str(tmp_path / "other.h5")
  with h5py.File(other, "w") as f:
    f["x"] = np.zeros(3)
  add("not gctx", "not a GCTx file", d=other, **{"input.format": "gctx"})
  with h5py.File(data, "r") as f:
    values = f["0/DATA/0/matrix"][()]
    rows, cols = list(f["0/META/ROW/id"][()]), list(f["0/META/COL/id"][()])
  def h5(name, v, r, c):
    p = str(tmp_path / name)
    with h5py.File(p, "w") as f:
      f["0/DATA/0/matrix"], f["0/META/ROW/id"], f["0/META/COL/id"] = v, np.array(r), np.array(c)
    return p
  add("orientation", "stored genes x samples", d=h5("t.gctx", values.T, rows, cols))
  add("duplicate samples", "duplicate sample", d=h5("ds.gctx", values, rows, cols[:-1] + cols[:1]))
  add("duplicate genes", "duplicate gene", d=h5("dg.gctx", values, rows[:-1] + rows[:1], cols))
  table = tmp_path / "cells.tsv"
  ids = [r.decode() for r in rows]
  formats.write_table(str(table), values, [c.decode() for c in cols], ids)
  text = table.read_text().split("\n")
  text[3] = text[3].replace(text[3].split("\t")[5], "n/a", 1)
  table.write_text("\n".join(text))
  add("non-numeric", "non-numeric cell 'n/a'", d=str(table))
  nan = values.copy()
  lm_probe = _read_map(lm)[0][2]
  nan[5, ids.index(lm_probe)] = np.nan
  nan[9, ids.index(lm_probe)] = np.inf
  add("nan", f"2 NaN/Inf value(s) in the selected columns, first at sample "
      f"{cols[5].decode()}, column {lm_probe}", d=h5("nan.gctx", nan, rows, cols))
  allnan = values.copy()
  allnan[:, ids.index(lm_probe)] = np.nan
  add("empty", "empty dataset", d=h5("allnan.gctx", allnan, rows, cols), nonfinite="drop")
  lost = tmp_path / "lm_lost.txt"
  lost.write_text(open(lm).read() + "GONE\tENSG77\t999999_at,999998_at\n")
  add("landmark lost", "1 landmark(s) have none of their ids in the data", l=str(lost))
  both = tmp_path / "tg_both.txt"
  both.write_text(open(tg).read() + open(lm).readline())
  add("gene in both maps", "gene in both maps", t=str(both), **{"genes.copy_targets": "error"})
  cols3 = tmp_path / "lm_cols.txt"
  cols3.write_text(open(lm).read() + "X\tENSG5\n")
  add("map columns", "has 2 tab-separated columns, expected 3", l=str(cols3))
  return cases, [data, lm, tg]


def test_bad_inputs_fail_cleanly(tmp_path):
  cases, inputs = _bad_inputs(tmp_path)
  paths = [p for p in inputs] + [c.input.path for _, c, _ in cases if os.path.exists(c.input.path)]
  before = _sha(paths)
  for name, cfg, needle in cases:
    with pytest.raises(PrepareError) as e:
      prepare_lib.prepare(cfg, log=_quiet)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, (name, msg)
    assert not os.path.exists(cfg.output), name
    assert not [p for p in os.listdir(os.path.dirname(cfg.output)) if ".tmp-" in p], name
  assert _sha(paths) == before


def _cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "lsmtl_jax.prepare", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def _flags(cfg):
  return ["--config=" + os.path.join(REPO, "configs", "prepare", "default.py"),
          f"--config.input.path={cfg.input.path}", f"--config.output={cfg.output}",
          f"--config.genes.landmark_map={cfg.genes.landmark_map}",
          f"--config.genes.target_map={cfg.genes.target_map}",
          f"--config.nonfinite={cfg.nonfinite}"]


def test_cli_exit_code_2_and_one_line(tmp_path):
  cases, inputs = _bad_inputs(tmp_path)
  picked = [c for c in cases if c[0] in ("missing file", "truncated", "nan", "map columns")]
  before = _sha(inputs)
  for name, cfg, needle in picked:
    r = _cli(_flags(cfg), REPO)
    assert r.returncode == 2, (name, r.stderr[-500:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], (name, r.stderr[-500:])
    assert not os.path.exists(cfg.output)
  assert _sha(inputs) == before


def test_cli_end_to_end_opens_as_a_dataset(tmp_path):
  data, lm, tg = _case(tmp_path, n=60, dup=0.05)
  cfg = _config(data, lm, tg, tmp_path / "geo")
  args = _flags(cfg)
  args[0] = "--config=" + os.path.join(REPO, "configs", "prepare", "geo.py")
  r = _cli(args + ["--config.dedup.num_clusters=3"], REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  ds = store.open_dataset(str(tmp_path / "geo"))
  values = ds.array.read().result()
  assert values.shape == (ds.num_samples, 6 + 14) and np.isfinite(values).all()
  assert ds.meta["preprocessing"]["dedup"]["num_dropped"] == 60 - ds.num_samples > 0
  train = values[ds.split("train")]
  np.testing.assert_allclose(train.mean(0), 0, atol=1e-3)
  r = _cli(args, REPO)  # the output exists now: refused, left as it is
  assert r.returncode == 2 and "already exists" in r.stderr
  assert store.open_dataset(str(tmp_path / "geo")).num_samples == ds.num_samples


def test_real_dgex_maps_on_a_geo_shaped_gctx(tmp_path):
  lm, tg = (os.path.join(SHARED_DATA, f) for f in ("dgex_map_lm.txt", "dgex_map_tg.txt"))
  if not (os.path.isfile(lm) and os.path.isfile(tg)):
    pytest.skip("D-GEX map files (dgex_map_lm.txt, dgex_map_tg.txt) not present beside the checkout")
  gene_probes = synthetic_gctx.read_map_probes(lm) + synthetic_gctx.read_map_probes(tg)
  probes = synthetic_gctx.probe_ids(synthetic_gctx.GEO_PROBES, 0,
                                    [p for g in gene_probes for p in g])
  data = str(tmp_path / "geo.gctx")
  synthetic_gctx.generate_gctx(data, 40, probes, gene_probes, duplicate_fraction=0.0)
  cfg = _config(data, lm, tg, tmp_path / "geo", **{"dedup.enabled": False})
  ds = prepare_lib.prepare(cfg, log=_quiet)
  assert ds.num_landmarks == 943 and ds.num_targets == 9520 - 445
  assert len(ds.meta["preprocessing"]["copy_targets"]["by_id"]) == 445
  assert ds.meta["landmarks"]["symbols"][0] == "UBE2C"
  assert ds.meta["preprocessing"]["gene_columns"]["ENSG00000175063"] == ["202954_at"]
  meta = json.load(open(os.path.join(ds.path, "meta.json")))
  assert meta["format"] == store.FORMAT


def test_nonfinite_impute_or_drop(tmp_path):
  data, lm, tg = _case(tmp_path, n=50, dup=0.1)
  with h5py.File(data, "r") as f:
    values = f["0/DATA/0/matrix"][()]
    rows, cols = f["0/META/ROW/id"][()], f["0/META/COL/id"][()]
  probe = _read_map(lm)[0][2]
  values[[5, 9], [r.decode() for r in rows].index(probe)] = np.nan
  nan = str(tmp_path / "nan.gctx")
  with h5py.File(nan, "w") as f:
    f["0/DATA/0/matrix"], f["0/META/ROW/id"], f["0/META/COL/id"] = values, rows, cols
  on = {"dedup.enabled": True}
  dropped = prepare_lib.prepare(_config(nan, lm, tg, tmp_path / "d", nonfinite="drop", **on),
                                log=_quiet)
  kept = set(dropped.meta["sample_ids"])
  assert cols[5].decode() not in kept and cols[9].decode() not in kept
  assert dropped.meta["preprocessing"]["dedup"]["num_dropped"] > 0
  imputed = prepare_lib.prepare(_config(nan, lm, tg, tmp_path / "i", nonfinite="impute", **on),
                                log=_quiet)
  assert cols[5].decode() in imputed.meta["sample_ids"]
  assert imputed.meta["preprocessing"]["nonfinite"]["count"] == 2
  assert np.isfinite(imputed.array.read().result()).all()


def test_impute_fills_with_the_training_rows_mean_only(tmp_path):
  """nonfinite=impute: each gene's fill is the mean of its finite *training* values.
  Validation and test rows carry a large negative offset in that gene, so a mean over all
  rows would fill (and rank) visibly differently."""
  from lsmtl_jax.data import synthetic
  n = 60
  data, lm, tg = _case(tmp_path, n=n)
  with h5py.File(data, "r") as f:
    values = f["0/DATA/0/matrix"][()].astype(np.float32)
    rows, cols = f["0/META/ROW/id"][()], f["0/META/COL/id"][()]
  ids = [r.decode() for r in rows]
  probes = [ids.index(p) for p in _read_map(lm)[0][2].split(",")]
  splits = synthetic.split_indices(n, (0.8, 0.1, 0.1), 0)  # prepare's split, nothing dropped
  train = splits["train"]
  held_out = np.setdiff1d(np.arange(n), train)
  for p in probes:
    values[held_out, p] -= 40.0
  nan_rows = [int(train[3]), int(held_out[0]), int(held_out[-1])]
  for p in probes:
    values[nan_rows, p] = np.nan
  nan = str(tmp_path / "nan.gctx")
  with h5py.File(nan, "w") as f:
    f["0/DATA/0/matrix"], f["0/META/ROW/id"], f["0/META/COL/id"] = values, rows, cols
  ds = prepare_lib.prepare(_config(nan, lm, tg, tmp_path / "i", nonfinite="impute",
                                   **{"dedup.enabled": False}), log=_quiet)
  assert ds.meta["splits"]["train"] == train.tolist()
  assert ds.meta["preprocessing"]["nonfinite"]["imputed_with"].endswith("training rows")

  # The independent float64 reference: fill, quantile-normalize on train, standardize.
  genes, _, _ = _genes_f64(nan, [lm, tg])
  assert np.isnan(genes[nan_rows, 0]).all()
  fill = np.nanmean(genes[train], axis=0)
  filled = np.where(np.isnan(genes), fill, genes)
  reference = np.sort(filled[train], axis=1).mean(axis=0)
  expected = _rank_map_reference(filled, reference)
  np.testing.assert_allclose(ds.meta["quantile_reference"], reference, rtol=1e-12)
  np.testing.assert_allclose(_expression(ds), expected, atol=2e-5)
  np.testing.assert_allclose(ds.meta["standardization"]["mean"], expected[train].mean(0),
                             atol=1e-9)
  # A mean over every row would have ranked the imputed held-out values elsewhere.
  everyone = np.where(np.isnan(genes), np.nanmean(genes, axis=0), genes)
  assert not np.allclose(_rank_map_reference(everyone, reference)[nan_rows],
                         expected[nan_rows], atol=1e-3)


def test_impute_without_training_rows_is_refused(prepared, tmp_path):
  """Another platform's evaluation set has no training rows to take a mean from."""
  ds, _, _, _ = prepared
  ids = ds.meta["landmarks"]["ids"] + ds.meta["targets"]["ids"]
  values = np.exp(np.random.default_rng(2).normal(1, 1, (9, len(ids))))
  values[2, 0] = np.nan
  formats.write_table(str(tmp_path / "cohort.txt"), values, [f"S{i}" for i in range(9)], ids)
  cfg = _config(str(tmp_path / "cohort.txt"), "", "", tmp_path / "t", nonfinite="impute",
                reference_dataset=ds.path, **{"split.mode": "test", "input.format": "table",
                                              "dedup.enabled": False})
  with pytest.raises(PrepareError, match="split.mode=test leaves no training rows; set "
                                         "nonfinite=drop"):
    prepare_lib.prepare(cfg, log=_quiet)
  assert not os.path.exists(cfg.output)


def test_id_lists_and_maps_with_a_byte_order_mark_keep_their_first_gene(tmp_path):
  bom = b"\xef\xbb\xbf"
  (tmp_path / "ids.txt").write_bytes(bom + b"ENSG1\r\nENSG2\tSYM2\r\n")
  assert [g.gene_id for g in prepare_lib.read_ids(str(tmp_path / "ids.txt"))] == ["ENSG1",
                                                                                  "ENSG2"]
  (tmp_path / "map.txt").write_bytes(bom + b"A\tENSG1\tp1_at\nB\tENSG2\tp2_at,p3_at\n")
  genes = prepare_lib.read_map(str(tmp_path / "map.txt"))
  assert [(g.symbol, g.gene_id) for g in genes] == [("A", "ENSG1"), ("B", "ENSG2")]
