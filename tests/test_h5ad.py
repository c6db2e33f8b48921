"""AnnData .h5ad: files written by the anndata library read by ours (dense and
CSR X, obs and var), ours read by anndata, bad files refused in one line, and
predict to .h5ad (with interval files) against predict to GCTx."""

import os

import h5py
import numpy as np
import pytest

import anndata  # the test extra: the product reads and writes .h5ad without it
import pandas as pd
import scipy.sparse as sp

from lsmtl_jax import predict
from lsmtl_jax.data import formats
from lsmtl_jax.data import h5ad
from lsmtl_jax.data.formats import PrepareError

from test_predict import trained_run


def _adata(n=9, g=6, seed=0, sparse=False):
  rng = np.random.default_rng(seed)
  x = rng.poisson(1.5, (n, g)).astype(np.float32) * rng.normal(1, 0.1, (n, g)).astype(np.float32)
  obs = pd.DataFrame({"tissue": pd.Categorical(rng.choice(["liver", "lung"], n)),
                      "depth": rng.integers(1000, 9000, n),
                      "title": [f"sample {i}" for i in range(n)]},
                     index=[f"GSM{100 + i}" for i in range(n)])
  var = pd.DataFrame({"feature_name": pd.Categorical([f"SYM{j}" for j in range(g)])},
                     index=[f"ENSG{j:011d}" for j in range(g)])
  return anndata.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs, var=var), x


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_files_written_by_anndata_read_the_same(tmp_path, sparse):
  adata, x = _adata(sparse=sparse)
  path = str(tmp_path / "a.h5ad")
  adata.write_h5ad(path)
  with h5py.File(path, "r") as f:  # the layout under test is the one asked for
    assert h5ad._encoding(f["X"]) == ("csr_matrix" if sparse else "array")
  assert formats.detect_format(path) == "h5ad"
  with formats.open_matrix(path) as m:
    assert m.sample_ids == list(adata.obs_names) and m.gene_ids == list(adata.var_names)
    whole = m.read_rows(0, m.num_samples)
    blocks = np.concatenate([m.read_rows(s, min(9, s + 4)) for s in range(0, 9, 4)])
    meta = m.column_metadata()
  np.testing.assert_array_equal(whole, x)
  np.testing.assert_array_equal(blocks, x)
  assert list(meta) == ["tissue", "depth", "title"]
  assert list(meta["tissue"]) == list(adata.obs["tissue"].astype(str))
  np.testing.assert_array_equal(meta["depth"], adata.obs["depth"].to_numpy())
  assert list(meta["title"]) == list(adata.obs["title"])
  with formats.open_matrix(path, gene_id_field="feature_name") as m:  # symbols from a column
    assert m.gene_ids == [f"SYM{j}" for j in range(6)]


def test_unsorted_and_repeated_csr_entries_add_up_as_scipy_does(tmp_path):
  # indices out of order within a row and a repeated (row, column) pair: legal CSR
  data = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
  indices = np.array([2, 0, 2, 1, 1], np.int32)
  indptr = np.array([0, 3, 3, 5], np.int64)
  want = sp.csr_matrix((data, indices, indptr), shape=(3, 3)).toarray()
  path = str(tmp_path / "u.h5ad")
  with h5py.File(path, "w") as f:
    f.attrs.update(h5ad.ROOT_ATTRS)
    x = f.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                    "shape": np.array([3, 3])})
    x["data"], x["indices"], x["indptr"] = data, indices, indptr
    h5ad._write_frame(f, "obs", ["a", "b", "c"], {}, path)
    h5ad._write_frame(f, "var", ["g0", "g1", "g2"], {}, path)
  with formats.open_matrix(path) as m:
    np.testing.assert_array_equal(m.read_rows(0, 3), want)
  assert want[0, 2] == 4.0 and want[2, 1] == 9.0


def test_our_file_reads_in_anndata(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.normal(8, 2, (11, 5)).astype(np.float32)
  samples, genes = [f"S{i}" for i in range(11)], [f"G{j}" for j in range(5)]
  var = {"symbol": np.array(list("ABCDE"), object), "val_cc": np.array([np.nan, .5, .6, .7, .8]),
         "is_landmark": np.array([True, True, False, False, False])}
  obs = {"batch": np.array(["x", "y"] * 5 + ["x"], object), "dose": np.arange(11.0)}
  path = str(tmp_path / "ours.h5ad")
  h5ad.write_h5ad(path, (x[i:i + 4] for i in range(0, 11, 4)), samples, genes, var=var, obs=obs)
  assert os.listdir(tmp_path) == ["ours.h5ad"]  # the temporary is gone
  a = anndata.read_h5ad(path)
  np.testing.assert_array_equal(a.X, x)
  assert list(a.obs_names) == samples and list(a.var_names) == genes
  assert list(a.var.columns) == ["symbol", "val_cc", "is_landmark"]
  assert list(a.var["symbol"]) == list("ABCDE") and a.var["is_landmark"].dtype == bool
  np.testing.assert_array_equal(a.var["val_cc"].to_numpy(), var["val_cc"])
  assert list(a.obs["batch"]) == list(obs["batch"])
  np.testing.assert_array_equal(a.obs["dose"].to_numpy(), obs["dose"])
  with formats.open_matrix(path) as m:
    np.testing.assert_array_equal(m.read_rows(3, 9), x[3:9])
  with pytest.raises(PrepareError, match="var column name 'a/b' cannot be stored"):
    h5ad.write_h5ad(str(tmp_path / "bad.h5ad"), x, samples, genes, var={"a/b": np.zeros(5)})
  assert os.listdir(tmp_path) == ["ours.h5ad"]


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
  adata, _ = _adata()
  cases = {}

  def edited(name, edit):
    path = str(tmp_path / name)
    adata.write_h5ad(path)
    with h5py.File(path, "a") as f:
      edit(f)
    return path

  def no_x(f):
    f["layers"]["counts"] = f["X"][()]
    del f["X"]

  cases["X missing"] = (edited("nox.h5ad", no_x), "no /X matrix (it has layers counts")
  cscp = str(tmp_path / "csc.h5ad")
  anndata.AnnData(sp.csc_matrix(adata.X), obs=adata.obs, var=adata.var).write_h5ad(cscp)
  cases["csc"] = (cscp, "column-compressed (csc_matrix)")

  def short_obs(f):
    del f["obs/_index"]
    f["obs/_index"] = np.array([b"a", b"b"])

  cases["shape"] = (edited("shape.h5ad", short_obs), "/X has shape (9, 6), expected")

  def dup_var(f):
    names = f["var/_index"][()]
    names[1] = names[0]
    del f["var/_index"]
    f["var/_index"] = names

  cases["duplicate gene"] = (edited("dup.h5ad", dup_var), "duplicate gene (var index)")
  cases["no column"] = (edited("col.h5ad", lambda f: None), "var has no column 'gene_symbols'")
  text = tmp_path / "text.h5ad"
  text.write_text("not hdf5")
  cases["not hdf5"] = (str(text), "not a readable HDF5 file")
  for name, (path, needle) in cases.items():
    field = "gene_symbols" if name == "no column" else ""
    with pytest.raises(PrepareError) as e:
      with formats.open_matrix(path, gene_id_field=field) as m:
        m.read_rows(0, m.num_samples)
    msg = str(e.value)
    assert msg.startswith(path + ": ") and needle in msg and "\n" not in msg, (name, msg)

  sparse, _ = _adata(sparse=True)
  bad = str(tmp_path / "idx.h5ad")
  sparse.write_h5ad(bad)
  with h5py.File(bad, "a") as f:
    f["X/indices"][0] = 99
  with formats.open_matrix(bad) as m, pytest.raises(PrepareError, match="beyond the 6 genes"):
    m.read_rows(0, 9)


def test_predict_to_h5ad_equals_predict_to_gctx(tmp_path_factory, tmp_path):
  from lsmtl_jax import inference
  run = inference.load_run(trained_run(tmp_path_factory))
  rows = run.dataset.split("test")
  z = run.dataset.read_rows(rows)[:, :run.num_landmarks]
  scale, offset = run.landmark_scale_and_offset()
  x = (z * scale + offset).astype(np.float32)
  ids = [run.meta["sample_ids"][i] for i in rows]
  batch = np.array(["a", "b"] * (len(ids) // 2) + ["a"] * (len(ids) % 2), object)
  anndata.AnnData(x, obs=pd.DataFrame({"batch": batch}, index=ids),
                  var=pd.DataFrame(index=run.landmark_ids)).write_h5ad(tmp_path / "in.h5ad")
  formats.write_gctx(str(tmp_path / "in.gctx"), x, ids, run.landmark_ids,
                     col_meta={"batch": batch})
  opts = predict.Options(intervals=0.8, block_rows=7)
  predict.predict_file(run.workdir, str(tmp_path / "in.gctx"), str(tmp_path / "ref.gctx"), opts)
  summary = predict.predict_file(run.workdir, str(tmp_path / "in.h5ad"),
                                 str(tmp_path / "out.h5ad"), opts)
  assert summary["format"] == "h5ad"
  assert summary["interval_files"] == [str(tmp_path / "out.lower.h5ad"),
                                       str(tmp_path / "out.upper.h5ad")]
  meta = predict.read_gctx_row_metadata(str(tmp_path / "ref.gctx"))
  for ours, ref in (("out", "ref"), ("out.lower", "ref.lower"), ("out.upper", "ref.upper")):
    a = anndata.read_h5ad(tmp_path / f"{ours}.h5ad")
    with formats.open_matrix(str(tmp_path / f"{ref}.gctx")) as m:
      np.testing.assert_array_equal(a.X, m.read_rows(0, m.num_samples))
    assert list(a.obs_names) == ids and list(a.obs["batch"]) == list(batch)
    assert list(a.var_names) == run.landmark_ids + run.target_ids
    assert list(a.var.columns) == list(predict.ROW_META_FIELDS)
    for field in predict.ROW_META_FIELDS:
      got = a.var[field].to_numpy()
      if field == "symbol":
        assert list(got) == list(meta[field])
      elif field in ("is_landmark", "imputed", "well_inferred"):  # 0/1 flags as pandas masks
        assert got.dtype == bool
        np.testing.assert_array_equal(got, meta[field].astype(bool))
      else:
        np.testing.assert_array_equal(got, meta[field])
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith("out")) == [
      "out.h5ad", "out.lower.h5ad", "out.upper.h5ad"]
