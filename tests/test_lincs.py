"""CMap LINCS Level 3 GCTx: prepare with configs/prepare/cmap.py (landmarks from
pr_is_lm, Entrez ids, symbols from pr_gene_symbol), train a tiny model on it,
predict on a LINCS file that lacks two landmarks. The files are written with
h5py field by field in the layout of GSE92742 / GSE70138; every result is
checked against numpy."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lsmtl_jax import inference
from lsmtl_jax import predict
from lsmtl_jax import train
from lsmtl_jax.data import formats
from lsmtl_jax.data import prepare_lib
from lsmtl_jax.data import store
from lsmtl_jax.data.formats import PrepareError

from configs.prepare import cmap
from conftest import REPO

N_GENES, N_LM, N_SAMPLES, RANK = 40, 12, 300, 4


def _layout(seed=0):
  """Per-gene and per-sample fields as a LINCS release has them, and values from
  a low-rank model (4 programs) that the 12 landmarks measure."""
  rng = np.random.default_rng(seed)
  entrez = rng.choice(np.arange(1, 60000), N_GENES, replace=False)
  is_lm = np.zeros(N_GENES, np.int64)
  is_lm[np.sort(rng.choice(N_GENES, N_LM, replace=False))] = 1  # scattered, as in LINCS
  is_bing = is_lm.copy()
  is_bing[rng.choice(np.flatnonzero(is_lm == 0), 17, replace=False)] = 1
  rows = {"id": [str(e) for e in entrez], "pr_gene_id": entrez.astype(np.int64),
          "pr_gene_symbol": [f"SYM{e}" for e in entrez],
          "pr_gene_title": [f"gene {e}" for e in entrez],
          "pr_is_lm": is_lm, "pr_is_bing": is_bing}
  programs = rng.normal(0, 1, (N_SAMPLES, RANK))
  loadings = rng.normal(0, 0.8, (RANK, N_GENES))
  values = (rng.uniform(5, 11, N_GENES) + programs @ loadings
            + 0.4 * np.tanh(programs[:, :1] * programs[:, 1:2]) * loadings[2]
            + rng.normal(0, 0.1, (N_SAMPLES, N_GENES)))
  cols = {"id": [f"CPC004_A375_6H_X{i % 3 + 1}_B3_DUO52HI53LO:{'ABCDEFGHIJ'[i // 30]}{i % 30:02d}"
                 for i in range(N_SAMPLES)],
          "pert_id": [f"BRD-K{i % 17:08d}" for i in range(N_SAMPLES)],
          "cell_id": [("A375", "MCF7", "PC3")[i % 3] for i in range(N_SAMPLES)],
          "pert_dose": np.where(np.arange(N_SAMPLES) % 5 == 0, -666.0, 10.0)}
  return values.astype(np.float32), rows, cols


def _strings(v):
  return np.array([s.encode() for s in v], dtype="S")


def write_lincs(path, values, rows, cols, chunk_rows=64):
  """GCTx as CMap writes it: the matrix [samples, genes] (cid x rid), ids and
  text fields as fixed-length byte strings, flags and Entrez ids as integers."""
  with h5py.File(path, "w") as f:
    f.attrs["version"] = "GCTX1.0"
    f.attrs["src"] = os.path.basename(path)
    f.create_dataset("0/DATA/0/matrix", data=values,
                     chunks=(min(chunk_rows, len(values)), values.shape[1]))
    for group, fields in (("0/META/ROW", rows), ("0/META/COL", cols)):
      for name, v in fields.items():
        v = np.asarray(v)
        f.create_dataset(f"{group}/{name}", data=_strings(v) if v.dtype.kind in "UO" else v)


def _quiet(_):
  pass


def _config(data, out, **overrides):
  cfg = cmap.get_config()
  cfg.input.path, cfg.output, cfg.block_rows = str(data), str(out), 64
  for key, value in overrides.items():
    section, leaf = key.split(".") if "." in key else (None, key)
    (cfg[section] if section else cfg)[leaf] = value
  return cfg


def _standardized_f64(values, columns, train_rows):
  """The independent reference: quantile normalization onto the training rows'
  mean sorted profile (continuous values, so no ties), then training statistics."""
  x = values[:, columns].astype(np.float64)
  reference = np.sort(x[train_rows], axis=1).mean(axis=0)
  qn = reference[np.argsort(np.argsort(x, axis=1), axis=1)]
  mean, std = qn[train_rows].mean(0), qn[train_rows].std(0)
  return (qn - mean) / (std + store.STD_EPS), reference


@pytest.fixture(scope="module")
def lincs(tmp_path_factory):
  """The LINCS file and its dataset, prepared by the real command line."""
  tmp = tmp_path_factory.mktemp("lincs")
  values, rows, cols = _layout()
  data = tmp / "GSE92742_Broad_LINCS_Level3_INF_mlr12k_n300x40.gctx"
  write_lincs(data, values, rows, cols)
  out = tmp / "cmap"
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.prepare", "--config=configs/prepare/cmap.py",
       f"--config.input.path={data}", f"--config.output={out}", "--config.block_rows=64"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith(f"prepared {out}: 300 samples, {N_LM} landmarks, "
                                f"{N_GENES - N_LM} targets")
  return {"tmp": tmp, "data": data, "values": values, "rows": rows, "cols": cols,
          "ds": store.open_dataset(str(out))}


def test_prepare_takes_flagged_rows_in_file_order_with_entrez_ids_and_symbols(lincs):
  ds, rows, values = lincs["ds"], lincs["rows"], lincs["values"]
  lm = np.flatnonzero(rows["pr_is_lm"] == 1)
  tg = np.flatnonzero(rows["pr_is_lm"] == 0)
  assert ds.meta["landmarks"]["ids"] == [rows["id"][j] for j in lm]
  assert ds.meta["landmarks"]["symbols"] == [rows["pr_gene_symbol"][j] for j in lm]
  assert ds.meta["targets"]["ids"] == [rows["id"][j] for j in tg]
  assert ds.meta["targets"]["symbols"] == [rows["pr_gene_symbol"][j] for j in tg]
  assert ds.meta["sample_ids"] == lincs["cols"]["id"]
  flags = ds.meta["preprocessing"]["gene_selection"]["flags"]
  assert flags["flagged_landmarks"] == N_LM and flags["landmark_flag"] == "pr_is_lm"
  assert [len(ds.split(s)) for s in ("train", "val", "test")] == [240, 30, 30]

  expected, reference = _standardized_f64(values, np.concatenate([lm, tg]), ds.split("train"))
  np.testing.assert_allclose(ds.meta["quantile_reference"], reference, rtol=1e-12)
  np.testing.assert_allclose(ds.array.read().result(), expected, atol=2e-5)


def test_replicates_of_a_perturbation_stay_in_one_split(lincs, tmp_path):
  """group_by=pert_id from /0/META/COL, and from an inst_info table for a GCTx
  that carries only the ids (as on GEO): the same split, and its training rows
  alone fit the normalization."""
  values, rows, cols = lincs["values"], lincs["rows"], lincs["cols"]
  ds = prepare_lib.prepare(_config(lincs["data"], tmp_path / "by_pert",
                                   **{"split.group_by": "pert_id"}), log=_quiet)
  split_of = {}
  for name in ("train", "val", "test"):
    for r in ds.split(name):
      assert split_of.setdefault(cols["pert_id"][r], name) == name
  assert len(split_of) == 17
  groups_rep = ds.meta["preprocessing"]["split"]["groups"]
  assert sum(groups_rep["num_groups"].values()) == 17
  lm, tg = np.flatnonzero(rows["pr_is_lm"] == 1), np.flatnonzero(rows["pr_is_lm"] == 0)
  expected, _ = _standardized_f64(values, np.concatenate([lm, tg]), ds.split("train"))
  np.testing.assert_allclose(ds.array.read().result(), expected, atol=2e-5)

  bare = tmp_path / "ids_only.gctx"
  write_lincs(bare, values, rows, {"id": cols["id"]})
  info = tmp_path / "GSE92742_Broad_LINCS_inst_info.txt"
  info.write_text("inst_id\trna_plate\tpert_id\tcell_id\n" + "".join(
      f"{i}\t{i.split(':')[0]}\t{p}\t{c}\n"
      for i, p, c in zip(cols["id"], cols["pert_id"], cols["cell_id"])))
  from_table = prepare_lib.prepare(_config(bare, tmp_path / "by_table", **{
      "split.group_by": "pert_id", "split.sample_table": str(info)}), log=_quiet)
  assert from_table.meta["splits"] == ds.meta["splits"]


def test_id_field_target_flag_and_a_gene_info_table(lincs, tmp_path):
  values, rows, cols, ds = lincs["values"], lincs["rows"], lincs["cols"], lincs["ds"]
  # Entrez ids from pr_gene_id (integers) give the row ids' dataset, bit for bit.
  by_field = prepare_lib.prepare(_config(lincs["data"], tmp_path / "f",
                                         **{"genes.id_field": "pr_gene_id"}), log=_quiet)
  assert by_field.meta["landmarks"] == ds.meta["landmarks"]
  assert by_field.meta["targets"] == ds.meta["targets"]
  np.testing.assert_array_equal(by_field.array.read().result(), ds.array.read().result())

  # pr_is_bing narrows the targets to the best-inferred non-landmarks.
  bing = prepare_lib.prepare(_config(lincs["data"], tmp_path / "b",
                                     **{"genes.target_flag": "pr_is_bing"}), log=_quiet)
  tg = np.flatnonzero((rows["pr_is_bing"] == 1) & (rows["pr_is_lm"] == 0))
  assert bing.meta["targets"]["ids"] == [rows["id"][j] for j in tg] and len(tg) == 17
  assert bing.meta["landmarks"] == ds.meta["landmarks"]
  assert bing.meta["preprocessing"]["gene_selection"]["flags"]["not_targets"] == (
      N_GENES - N_LM - 17)
  lm = np.flatnonzero(rows["pr_is_lm"] == 1)
  expected, _ = _standardized_f64(values, np.concatenate([lm, tg]), bing.split("train"))
  np.testing.assert_allclose(bing.array.read().result(), expected, atol=2e-5)

  # GEO's files: ids only in the GCTx, the fields in gene_info.txt (rows shuffled).
  bare = tmp_path / "bare.gctx"
  write_lincs(bare, values, {"id": rows["id"]}, {"id": cols["id"]})
  order = np.random.default_rng(3).permutation(N_GENES)
  info = tmp_path / "gene_info.txt"
  info.write_text("pr_gene_id\tpr_gene_symbol\tpr_gene_title\tpr_is_lm\tpr_is_bing\n" + "".join(
      f"{rows['id'][j]}\t{rows['pr_gene_symbol'][j]}\t{rows['pr_gene_title'][j]}\t"
      f"{rows['pr_is_lm'][j]}\t{rows['pr_is_bing'][j]}\n" for j in order))
  from_info = prepare_lib.prepare(_config(bare, tmp_path / "i", **{"genes.gene_info": str(info)}),
                                  log=_quiet)
  assert from_info.meta["landmarks"] == ds.meta["landmarks"]
  assert from_info.meta["targets"] == ds.meta["targets"]
  np.testing.assert_array_equal(from_info.array.read().result(), ds.array.read().result())
  roles = [x["role"] for x in from_info.meta["preprocessing"]["inputs"]]
  assert roles == ["data", "gene_info"]

  # The other release (GSE70138) onto this one's reference, as its test set:
  # its genes sit in another order and come back in the reference's.
  other, _, _ = _layout(seed=0)
  other = other[:50] + np.random.default_rng(4).normal(0, 0.3, (50, N_GENES)).astype(np.float32)
  later = tmp_path / "GSE70138.gctx"
  write_lincs(later, other[:, order], {k: np.asarray(v)[order] for k, v in rows.items()},
              {k: np.asarray(v)[:50] for k, v in cols.items()})
  mapped = prepare_lib.prepare(_config(later, tmp_path / "m", reference_dataset=ds.path,
                                       **{"split.mode": "test"}), log=_quiet)
  assert mapped.meta["landmarks"] == ds.meta["landmarks"]
  assert mapped.meta["targets"] == ds.meta["targets"]
  lm_tg = np.concatenate([lm, np.flatnonzero(rows["pr_is_lm"] == 0)])
  reference = np.asarray(ds.meta["quantile_reference"])
  stats = ds.meta["standardization"]
  x = other[:, lm_tg].astype(np.float64)
  qn = reference[np.argsort(np.argsort(x, axis=1), axis=1)]
  np.testing.assert_allclose(mapped.array.read().result(),
                             (qn - stats["mean"]) / (np.asarray(stats["std"]) + stats["eps"]),
                             atol=2e-5)


def _bad_cases(tmp, values, rows, cols):
  """(name, config, what the one-line message must say); each file differs from a
  good LINCS file in one field."""
  cases = []
  out = tmp / "out"

  def gctx(name, **fields):
    path = tmp / f"{name}.gctx"
    write_lincs(path, values, {**rows, **fields}, cols)
    return path

  def add(name, needle, data=None, **overrides):
    data = data or gctx("good")
    cases.append((name, _config(data, out, **overrides), needle, str(data)))

  add("flag field absent", "no /0/META/ROW/pr_is_landmark for genes.landmark_flag; its row "
      "fields are pr_gene_id", **{"genes.landmark_flag": "pr_is_landmark"})
  two = rows["pr_is_lm"].copy()
  two[5] = 2
  add("flag not 0/1", f"/0/META/ROW/pr_is_lm must be 0 or 1 for every gene; 1 gene(s) have "
      f"another value, first {rows['id'][5]}: 2", data=gctx("two", pr_is_lm=two))
  missing = rows["pr_is_lm"].astype(np.float64)
  missing[7] = -666
  add("flag missing", f"must be 0 or 1 for every gene; 1 gene(s) have another value, first "
      f"{rows['id'][7]}: nan", data=gctx("missing", pr_is_lm=missing))
  add("flag as words", "must be 0 or 1 for every gene; 40 gene(s) have another value, "
      f"first {rows['id'][0]}: 'no'",
      data=gctx("words", pr_is_lm=np.where(rows["pr_is_lm"] == 1, "yes", "no")))
  add("no landmarks", "/0/META/ROW/pr_is_lm: no gene is flagged 1, so there are no landmarks",
      data=gctx("none", pr_is_lm=np.zeros(N_GENES, np.int64)))
  add("no targets", "no gene has pr_is_lm = 0, so there are no targets",
      data=gctx("all", pr_is_lm=np.ones(N_GENES, np.int64)))
  add("no bing targets", "no gene has pr_is_lm = 0 and pr_is_bing = 1",
      data=gctx("bing", pr_is_bing=rows["pr_is_lm"]), **{"genes.target_flag": "pr_is_bing"})
  add("field of the wrong length", "/0/META/ROW/pr_is_lm has shape (39,), expected one value "
      f"for each of {N_GENES} genes", data=gctx("short", pr_is_lm=rows["pr_is_lm"][:39]))
  add("id field absent", "no /0/META/ROW/pr_entrez for genes.id_field",
      **{"genes.id_field": "pr_entrez"})
  dup = rows["pr_gene_id"].copy()
  dup[9] = dup[3]
  add("duplicate ids", f"/0/META/ROW/pr_gene_id: gene id {dup[3]} repeats (rows "
      f"{rows['id'][3]} and {rows['id'][9]})", data=gctx("dup", pr_gene_id=dup),
      **{"genes.id_field": "pr_gene_id"})
  gone = rows["pr_gene_id"].copy()
  gone[11] = -666
  add("missing id", f"/0/META/ROW/pr_gene_id is missing for 1 gene(s), first row "
      f"{rows['id'][11]}", data=gctx("gone", pr_gene_id=gone), **{"genes.id_field": "pr_gene_id"})
  bare = tmp / "bare.gctx"
  write_lincs(bare, values, {"id": rows["id"]}, {"id": cols["id"]})
  add("GEO file without gene_info", "no row metadata besides the ids (as on GEO); give the "
      "release's gene info table as genes.gene_info", data=bare)
  info = tmp / "gene_info.txt"
  info.write_text("pr_gene_id\tpr_gene_symbol\tpr_is_lm\n" + "".join(
      f"{rows['id'][j]}\t{rows['pr_gene_symbol'][j]}\t{rows['pr_is_lm'][j]}\n"
      for j in range(1, N_GENES)))
  add("gene_info lacks a gene", f"1 of the data's {N_GENES} genes have no line (first "
      f"{rows['id'][0]})", data=bare, **{"genes.gene_info": str(info)})
  add("gene_info lacks the column", "no column 'pr_is_bing' for genes.target_flag", data=bare,
      **{"genes.gene_info": str(info), "genes.target_flag": "pr_is_bing"})
  table = tmp / "lincs.tsv"
  formats.write_table(str(table), values, cols["id"], rows["id"])
  add("a table without gene_info", "genes.landmark_flag reads per-gene fields, which only a "
      "GCTx carries", data=table, **{"input.format": "auto"})
  add("flag without landmark_flag", "config: genes.target_flag is used with "
      "genes.landmark_flag", **{"genes.landmark_flag": "", "genes.target_flag": "pr_is_bing"})
  add("flag and id list", "config: genes.landmark_flag and genes.landmark_ids both choose",
      **{"genes.landmark_ids": str(info)})
  add("target flag = landmark flag", "config: genes.target_flag is genes.landmark_flag",
      **{"genes.target_flag": "pr_is_lm"})
  return cases


def test_bad_flags_ids_and_tables_fail_with_one_line(tmp_path):
  values, rows, cols = _layout()
  values, cols = values[:40], {k: v[:40] for k, v in cols.items()}
  cases = _bad_cases(tmp_path, values, rows, cols)
  before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  for name, cfg, needle, data in cases:
    with pytest.raises(PrepareError) as e:
      prepare_lib.prepare(cfg, log=_quiet)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, (name, msg)
    if not msg.startswith("config:"):  # the file at fault is named
      assert msg.startswith(str(tmp_path)), (name, msg)
    assert not os.path.exists(cfg.output), name
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], name
  assert {p: p.read_bytes() for p in before} == before  # inputs opened read-only


@pytest.fixture(scope="module")
def cmap_run(lincs):
  """A tiny network trained on the prepared LINCS dataset."""
  from configs import tiny
  config = tiny.get_config()
  config.data.synthetic.enabled = False
  config.data.path = lincs["ds"].path
  config.train.num_steps = 60
  config.train.eval_every = 20
  config.train.checkpoint_every = 20
  workdir = lincs["tmp"] / "run"
  train.train_and_evaluate(config, str(workdir))
  return inference.load_run(str(workdir))


def _lincs_input(lincs, path, drop, samples):
  """The file's profiles `samples` as a LINCS GCTx without the genes `drop`,
  its rows shuffled (landmarks are found by Entrez id, not position)."""
  keep = np.setdiff1d(np.arange(N_GENES), drop)
  keep = keep[np.random.default_rng(1).permutation(len(keep))]
  rows = {k: np.asarray(v)[keep] for k, v in lincs["rows"].items()}
  cols = {k: np.asarray(v)[samples] for k, v in lincs["cols"].items()}
  write_lincs(path, lincs["values"][samples][:, keep], rows, cols)
  return keep


def test_predict_on_a_lincs_file_names_missing_landmarks_and_imputes_on_request(
    lincs, cmap_run, tmp_path):
  run, rows, ds = cmap_run, lincs["rows"], lincs["ds"]
  test = ds.split("test")
  lm_rows = np.flatnonzero(rows["pr_is_lm"] == 1)
  drop = lm_rows[[2, 7]]
  inp, out = tmp_path / "lincs_test.gctx", tmp_path / "full.gctx"
  keep = _lincs_input(lincs, inp, drop, test)

  proc = subprocess.run([sys.executable, "-m", "lsmtl_jax.predict", f"--workdir={run.workdir}",
                         f"--input={inp}", f"--output={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  named = ", ".join(f"{rows['id'][j]} ({rows['pr_gene_symbol'][j]})" for j in drop)
  assert errors[0] == (f"error: {inp}: 2 of {N_LM} landmarks missing: {named}; pass "
                       "--impute_missing to fill them with training means")
  assert sorted(os.listdir(tmp_path)) == ["lincs_test.gctx"]

  summary = predict.predict_file(run.workdir, str(inp), str(out),
                                 predict.Options(impute_missing=True))
  assert summary["imputed_landmarks"] == 2 and summary["profiles"] == len(test)
  meta = predict.read_gctx_row_metadata(str(out))
  assert list(meta["id"]) == run.landmark_ids + run.target_ids
  assert list(meta["symbol"]) == ds.meta["landmarks"]["symbols"] + ds.meta["targets"]["symbols"]
  imputed = np.isin(run.landmark_ids, [rows["id"][j] for j in drop])
  np.testing.assert_array_equal(meta["imputed"], np.concatenate(
      [imputed, np.zeros(run.num_targets, bool)]).astype(np.int8))
  with formats.open_matrix(str(out)) as m:
    got = m.read_rows(0, m.num_samples)
    assert m.sample_ids == [lincs["cols"]["id"][i] for i in test]
    col_meta = m.column_metadata()
  assert list(col_meta["cell_id"]) == [lincs["cols"]["cell_id"][i] for i in test]

  # numpy: each run landmark found by Entrez id among the shuffled rows; the two
  # absent ones at the training mean (z = 0); the network applied to that.
  position = {rows["id"][j]: k for k, j in enumerate(keep)}
  x = lincs["values"][test][:, keep].astype(np.float64)
  scale, offset = run.landmark_scale_and_offset()
  z = np.zeros((len(test), run.num_landmarks))
  for i, gid in enumerate(run.landmark_ids):
    if gid in position:
      z[:, i] = (x[:, position[gid]] - offset[i]) / scale[i]
  np.testing.assert_allclose(got[:, :run.num_landmarks], z * scale + offset, rtol=1e-6,
                             atol=1e-5)
  tg_scale, tg_offset = run.target_scale_and_offset()
  y = inference.Predictor(run, 64)(z.astype(np.float32)).astype(np.float64)
  np.testing.assert_allclose(got[:, run.num_landmarks:], y * tg_scale + tg_offset, rtol=1e-5,
                             atol=2e-4)
  # The model learned the low-rank structure: its targets follow the measured ones.
  truth = lincs["values"][test][:, rows["pr_is_lm"] == 0].astype(np.float64)
  cc = [np.corrcoef(truth[:, j], got[:, run.num_landmarks + j])[0, 1]
        for j in range(run.num_targets)]
  assert np.median(cc) > 0.5, np.median(cc)
