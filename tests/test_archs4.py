"""ARCHS4 gene-count files: the reader on small files in the exact layout, its
log2(CPM + 1) against numpy in float64, block reads against whole reads, prepare
through configs/prepare/archs4.py against prepare of the numpy reference, and
bad files refused in one line."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lsmtl_jax.data import archs4
from lsmtl_jax.data import formats
from lsmtl_jax.data import prepare_lib
from lsmtl_jax.data import store
from lsmtl_jax.data.formats import PrepareError

from configs.prepare import default
from conftest import REPO


def write_archs4(path, counts, symbols, samples, *, symbol_field="gene_symbol",
                 ensembl=None, ensembl_field="ensembl_gene", chunks=(None, 4), dtype=np.uint32):
  """counts [genes, samples] as ARCHS4 stores them, with its meta groups."""
  counts = np.asarray(counts)
  with h5py.File(path, "w") as f:
    f.create_dataset("data/expression", data=counts.astype(dtype),
                     chunks=(chunks[0] or counts.shape[0], chunks[1]), compression="gzip")
    if symbol_field:
      f.create_dataset(f"meta/genes/{symbol_field}", data=symbols,
                       dtype=h5py.string_dtype("utf-8"))
    if ensembl is not None:
      f.create_dataset(f"meta/genes/{ensembl_field}", data=np.array([e.encode() for e in ensembl]))
    if samples is not None:
      f.create_dataset("meta/samples/geo_accession", data=np.array([s.encode() for s in samples]))
      f.create_dataset("meta/samples/series_id", data=np.array(
          [f"GSE{i % 3}".encode() for i in range(len(samples))]))
      f.create_dataset("meta/samples/title", data=[f"sample {i}" for i in range(len(samples))],
                       dtype=h5py.string_dtype("utf-8"))


def _counts(genes, samples, seed=0):
  rng = np.random.default_rng(seed)
  depth = rng.integers(50, 400, samples)
  return rng.poisson(rng.gamma(0.8, 1.0, (genes, 1)) * depth[None, :] / 5)


def _reference(counts, symbols):
  """log2(CPM + 1) per sample in float64: duplicate symbols summed, empty ones
  left out, the library over every row."""
  counts = np.asarray(counts, np.float64)
  library = counts.sum(axis=0)
  names = list(dict.fromkeys(s for s in symbols if s))
  summed = np.stack([counts[[i for i, s in enumerate(symbols) if s == n]].sum(axis=0)
                     for n in names])
  with np.errstate(invalid="ignore"):  # 0 / 0: the sample without counts
    return names, np.log2(summed / library * 1e6 + 1).T


SYMBOLS = ["TP53", "GAPDH", "TP53", "", "ACTB", "MYC", "GAPDH", "EGFR", "KRAS", "CDK1"]


def test_log2_cpm_against_numpy_and_blocks_against_whole(tmp_path):
  counts = _counts(len(SYMBOLS), 11)
  counts[:, 4] = 0  # a sample without counts: no CPM
  samples = [f"GSM{100 + i}" for i in range(11)]
  ens = [f"ENSG{j:011d}.{j % 3 + 1}" for j in range(len(SYMBOLS))]
  path = str(tmp_path / "human_gene_v2.2.h5")
  write_archs4(path, counts, SYMBOLS, samples, ensembl=ens)
  assert formats.detect_format(path) == "archs4"
  names, want = _reference(counts, SYMBOLS)
  with formats.open_matrix(path, transform="log2cpm1") as m:
    assert m.gene_ids == names == ["TP53", "GAPDH", "ACTB", "MYC", "EGFR", "KRAS", "CDK1"]
    assert m.sample_ids == samples and m.num_merged == 2 and m.row_chunk == 4
    whole = m.read_rows(0, 11)
    blocks = np.concatenate([m.read_rows(s, min(11, s + 3)) for s in range(0, 11, 3)])
    meta = m.column_metadata()
  assert np.isnan(whole[4]).all() and np.isnan(want[4]).all()
  np.testing.assert_allclose(whole, want, rtol=2e-7)
  np.testing.assert_array_equal(blocks, whole)
  assert meta["series_id"].tolist()[:4] == ["GSE0", "GSE1", "GSE2", "GSE0"]
  assert meta["title"].tolist()[1] == "sample 1"
  with formats.open_matrix(path) as m:  # counts, duplicates summed
    raw = m.read_rows(0, 11)
  np.testing.assert_array_equal(raw[:, 0], counts[0] + counts[2])
  np.testing.assert_array_equal(raw[:, 2], counts[4])
  with formats.open_matrix(path, gene_id_field="ensembl") as m:  # versions stripped
    assert m.gene_ids == [e.split(".")[0] for e in ens] and m.num_merged == 0
    np.testing.assert_array_equal(m.read_rows(2, 5), counts[:, 2:5].T)


def test_older_field_names_and_the_generic_counts_view(tmp_path):
  counts = _counts(6, 5, seed=1)
  syms = ["A", "B", "C", "D", "E", "F"]
  path = str(tmp_path / "old.hdf5")
  write_archs4(path, counts, syms, [f"GSM{i}" for i in range(5)], symbol_field="symbol",
               ensembl=syms, ensembl_field="ensembl_gene_id", chunks=(2, 2))
  _, want = _reference(counts, syms)
  with formats.open_matrix(path, transform="log2cpm1") as m:
    assert m.gene_ids == syms
    np.testing.assert_allclose(m.read_rows(0, 5), want, rtol=2e-7)
  # Counts in a GCTx: the same view, the library over the file's columns.
  gctx = str(tmp_path / "counts.gctx")
  formats.write_gctx(gctx, counts.T.astype(np.float32), [f"S{i}" for i in range(5)], syms)
  assert formats.detect_format(gctx) == "gctx"
  with formats.open_matrix(gctx, transform="log2cpm1") as m:
    np.testing.assert_allclose(m.read_rows(1, 4), want[1:4], rtol=2e-7)
  formats.write_gctx(gctx, counts.T.astype(np.float32) + 0.5, [f"S{i}" for i in range(5)], syms)
  with formats.open_matrix(gctx, transform="log2cpm1") as m, pytest.raises(
      PrepareError, match=r"counts.gctx: sample S0, gene A holds .*, not a count"):
    m.read_rows(0, 5)


def _lists(tmp_path, landmarks, targets):
  lm, tg = tmp_path / "landmarks.txt", tmp_path / "targets.txt"
  lm.write_text("\n".join(landmarks) + "\n")
  tg.write_text("\n".join(targets) + "\n")
  return str(lm), str(tg)


def test_prepare_from_archs4_equals_prepare_of_the_numpy_reference(tmp_path):
  n, symbols = 70, [f"G{j}" for j in range(24)] + ["G3", "", "MT-X"]
  counts = _counts(len(symbols), n, seed=2)
  counts[:, 9] = 0  # dropped: no library
  samples = [f"GSM{500 + i}" for i in range(n)]
  path = str(tmp_path / "human_gene_v2.2.h5")
  write_archs4(path, counts, symbols, samples, chunks=(None, 8))
  lm, tg = _lists(tmp_path, [f"G{j}" for j in range(6)], [f"G{j}" for j in range(6, 24)])
  out = tmp_path / "archs4"
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.prepare", "--config=configs/prepare/archs4.py",
       f"--config.input.path={path}", f"--config.genes.landmark_ids={lm}",
       f"--config.genes.target_ids={tg}", f"--config.output={out}", "--config.block_rows=16"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = store.open_dataset(str(out))

  # The same preparation of the float64 reference in a GCTx, NaN row and all.
  names, want = _reference(counts, symbols)
  gctx = str(tmp_path / "reference.gctx")
  formats.write_gctx(gctx, want.astype(np.float32), samples, names)
  cfg = default.get_config()
  cfg.input.path, cfg.output = gctx, str(tmp_path / "reference")
  cfg.genes.landmark_ids, cfg.genes.target_ids = lm, tg
  cfg.nonfinite, cfg.block_rows = "drop", 16
  ref = prepare_lib.prepare(cfg, log=lambda _: None)

  assert got.meta["sample_ids"] == ref.meta["sample_ids"] == samples[:9] + samples[10:]
  assert got.meta["landmarks"] == ref.meta["landmarks"]
  assert got.meta["targets"] == ref.meta["targets"]
  assert got.meta["splits"] == ref.meta["splits"]
  np.testing.assert_allclose(got.meta["quantile_reference"], ref.meta["quantile_reference"],
                             rtol=1e-6)
  # In expression units: a gene nearly constant in training has std + eps near
  # 1e-3, which would magnify float32 rounding in the z-scores.
  np.testing.assert_allclose(_expression(got), _expression(ref), atol=1e-5)
  pre = got.meta["preprocessing"]
  assert pre["transform"] == "log2cpm1" and pre["nonfinite"]["samples_affected"] == 1
  assert pre["gene_columns"]["G3"] == ["G3"]  # the two G3 rows, summed as one column


def _expression(ds):
  stats = ds.meta["standardization"]
  z = ds.array.read().result().astype(np.float64)
  return z * (np.asarray(stats["std"]) + stats["eps"]) + np.asarray(stats["mean"])


def _bad_files(tmp_path):
  counts, samples = _counts(5, 4), [f"GSM{i}" for i in range(4)]
  syms = ["A", "B", "C", "D", "E"]
  cases = {}

  def add(name, needle, **kw):
    p = str(tmp_path / f"{name.replace(' ', '_')}.h5")
    args = {"counts": counts, "symbols": syms, "samples": samples, **kw}
    write_archs4(p, args.pop("counts"), args.pop("symbols"), args.pop("samples"), **args)
    cases[name] = (p, needle)
    return p

  p = add("no expression", "not an ARCHS4 file: no 2-D /data/expression")
  with h5py.File(p, "a") as f:  # still told apart from GCTx by meta/genes: the message says why
    f["data/other"] = f["data/expression"][()]
    del f["data/expression"]
  add("no symbols", "no gene symbols: no /meta/genes/gene_symbol or /meta/genes/symbol "
      "(meta/genes has ensembl_gene)", symbol_field="", ensembl=syms)
  frac = counts.astype(np.float64)
  frac[1, 2] = 2.5
  add("non-integer", "/data/expression at gene row 1, sample GSM2 holds 2.5, not a count",
      counts=frac, dtype=np.float32)
  neg = counts.copy()
  neg[2, 3] = -4
  add("negative", "/data/expression at gene row 2, sample GSM3 holds -4, not a count",
      counts=neg, dtype=np.int32)
  add("orientation", "has shape (4, 5), expected [genes, samples] = (5, 4)", counts=counts.T,
      chunks=(None, 2))
  add("no samples", "no sample ids at /meta/samples/geo_accession", samples=None)
  return cases


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
  for name, (path, needle) in _bad_files(tmp_path).items():
    with pytest.raises(PrepareError) as e:
      with formats.open_matrix(path, "archs4", transform="log2cpm1") as m:
        m.read_rows(0, m.num_samples)
    msg = str(e.value)
    assert msg.startswith(path + ": ") and needle in msg and "\n" not in msg, (name, msg)


def test_prepare_refuses_bad_counts_and_writes_nothing(tmp_path):
  path, needle = _bad_files(tmp_path)["negative"]
  lm, tg = _lists(tmp_path, ["A", "B"], ["C", "D", "E"])
  from configs.prepare import archs4 as archs4_config
  cfg = archs4_config.get_config()
  cfg.input.path, cfg.output = path, str(tmp_path / "out")
  cfg.genes.landmark_ids, cfg.genes.target_ids = lm, tg
  with pytest.raises(PrepareError, match="not a count"):
    prepare_lib.prepare(cfg, log=lambda _: None)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(("out", ".out"))]
  assert archs4.looks_like(path) and not archs4.looks_like(str(tmp_path / "absent.h5"))


def test_predict_output_named_without_a_format_from_archs4_input_is_refused():
  from lsmtl_jax import predict
  opts = predict.Options()
  with pytest.raises(predict.PredictError, match=r"^out: the output's name gives no format and "
                     r"archs4 files are read, not written; name it \.gctx"):
    predict._output_format("out", opts, "archs4")
  assert predict._output_format("out.gctx", opts, "archs4") == "gctx"
  assert predict._output_format("out", opts, "gct") == "gct"  # the input's format, as before
