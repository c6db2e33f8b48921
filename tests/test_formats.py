"""Matrix readers and writers: round trips for every format and their input errors."""

import os

import h5py
import numpy as np
import pytest

from lsmtl_jax.data import formats
from lsmtl_jax.data.formats import PrepareError


def _case(n=7, g=5, seed=0):
  rng = np.random.default_rng(seed)
  values = rng.normal(8, 2, (n, g)).astype(np.float32)
  return values, [f"GSM{i}" for i in range(n)], [f"{200000 + j}_s_at" for j in range(g)]


def test_gctx_round_trip_in_cmappy_layout(tmp_path):
  values, samples, genes = _case(23, 6)
  path = str(tmp_path / "m.gctx")
  formats.write_gctx(path, (values[i:i + 5] for i in range(0, 23, 5)), samples, genes,
                     chunk_rows=4)
  with h5py.File(path, "r") as f:  # cmapPy: [samples, genes]; ROW = genes, COL = samples
    assert f["0/DATA/0/matrix"].shape == (23, 6)
    assert len(f["0/META/ROW/id"]) == 6 and len(f["0/META/COL/id"]) == 23
    assert f.attrs["version"] == "GCTX1.0"
  with formats.open_matrix(path) as m:
    assert m.sample_ids == samples and m.gene_ids == genes and m.row_chunk == 4
    np.testing.assert_array_equal(m.read_rows(0, 23), values)
    np.testing.assert_array_equal(m.read_rows(9, 14), values[9:14])


def test_gctx_reads_variable_length_string_ids(tmp_path):
  values, samples, genes = _case()
  path = str(tmp_path / "vlen.gctx")
  with h5py.File(path, "w") as f:  # as some cmapR/cmapPy versions write ids
    f.create_dataset("0/DATA/0/matrix", data=values)
    f.create_dataset("0/META/ROW/id", data=genes, dtype=h5py.string_dtype())
    f.create_dataset("0/META/COL/id", data=samples, dtype=h5py.string_dtype())
  with formats.open_matrix(path) as m:
    assert m.gene_ids == genes and m.sample_ids == samples
    np.testing.assert_array_equal(m.read_rows(2, 4), values[2:4])


def test_gct_round_trip_and_v12(tmp_path):
  values, samples, genes = _case()
  path = str(tmp_path / "m.gct")
  formats.write_gct(path, values, samples, genes)
  m = formats.open_matrix(path)
  assert m.sample_ids == samples and m.gene_ids == genes
  np.testing.assert_array_equal(m.read_rows(0, 7), values)
  v12 = tmp_path / "v12.gct"
  v12.write_text("#1.2\n2\t3\nName\tDescription\tA\tB\tC\n"
                 "g1\tna\t1\t2\t3\ng2\tna\t4\t5\t6.5\n")
  m = formats.open_matrix(str(v12))
  np.testing.assert_array_equal(m.read_rows(0, 3), [[1, 4], [2, 5], [3, 6.5]])


def test_table_round_trip_tab_and_csv(tmp_path):
  values, samples, genes = _case()
  for name, delim in (("m.tsv", "\t"), ("m.csv", ",")):
    path = str(tmp_path / name)
    formats.write_table(path, values, samples, genes, delimiter=delim)
    m = formats.open_matrix(path)
    assert m.sample_ids == samples and m.gene_ids == genes
    np.testing.assert_array_equal(m.read_rows(0, 7), values)


def test_geuvadis_table_strips_versions(tmp_path):
  path = tmp_path / "GD462.GeneQuantRPKM.txt"
  path.write_text("TargetID\tGene_Symbol\tChr\tCoord\tHG00096\tHG00097\n"
                  "ENSG00000175063.12\tUBE2C\t20\t44441215\t1.5\t0\n"
                  "ENSG00000171174.9\tRBKS\t2\t28004269\t3\t2.25\n")
  m = formats.open_matrix(str(path), "table", id_column=0, first_value_column=4)
  assert m.gene_ids == ["ENSG00000175063", "ENSG00000171174"]
  assert m.sample_ids == ["HG00096", "HG00097"]
  np.testing.assert_array_equal(m.read_rows(0, 2), [[1.5, 3], [0, 2.25]])


def test_npy_round_trip(tmp_path):
  values, samples, genes = _case()
  np.save(tmp_path / "m.npy", values)
  (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
  (tmp_path / "samples.txt").write_text("\n".join(samples) + "\n")
  m = formats.open_matrix(str(tmp_path / "m.npy"), gene_ids=str(tmp_path / "genes.txt"),
                          sample_ids=str(tmp_path / "samples.txt"))
  assert m.gene_ids == genes and m.sample_ids == samples
  np.testing.assert_array_equal(m.read_rows(3, 7), values[3:7])


def test_strip_version():
  assert formats.strip_version("ENSG00000175063.12") == "ENSG00000175063"
  assert formats.strip_version("ENSG00000002586.18_PAR_Y") == "ENSG00000002586_PAR_Y"
  assert formats.strip_version("ENSGR0000124334.12") == "ENSGR0000124334"  # GENCODE PAR
  assert formats.strip_version("202954_at") == "202954_at"
  assert formats.strip_version("ENSG00000175063") == "ENSG00000175063"


def _gctx(path, values, samples, genes):
  with h5py.File(path, "w") as f:
    f.create_dataset("0/DATA/0/matrix", data=values)
    f.create_dataset("0/META/ROW/id", data=np.array([g.encode() for g in genes]))
    f.create_dataset("0/META/COL/id", data=np.array([s.encode() for s in samples]))


def test_gctx_errors_name_the_file_and_the_problem(tmp_path):
  values, samples, genes = _case()
  cases = {}
  cases["missing"] = (str(tmp_path / "nope.gctx"), "no such file")
  p = tmp_path / "text.gctx"
  p.write_text("not hdf5\n")
  cases["not hdf5"] = (str(p), "not a readable HDF5")
  p = str(tmp_path / "full.gctx")
  formats.write_gctx(p, values, samples, genes)
  t = str(tmp_path / "truncated.gctx")
  with open(p, "rb") as f, open(t, "wb") as g:
    g.write(f.read()[:os.path.getsize(p) // 2])
  cases["truncated"] = (t, "HDF5")
  p = str(tmp_path / "other.h5")
  with h5py.File(p, "w") as f:
    f.create_dataset("x", data=values)
  cases["not gctx"] = (p, "not a GCTx file")
  p = str(tmp_path / "transposed.gctx")
  _gctx(p, values.T, samples, genes)
  cases["transposed"] = (p, "stored genes x samples")
  p = str(tmp_path / "shape.gctx")
  _gctx(p, values, samples[:-1], genes)
  cases["shape"] = (p, "does not match")
  p = str(tmp_path / "dupsample.gctx")
  _gctx(p, values, samples[:-1] + [samples[0]], genes)
  cases["duplicate sample"] = (p, "duplicate sample")
  p = str(tmp_path / "dupgene.gctx")
  _gctx(p, values, samples, genes[:-1] + [genes[1]])
  cases["duplicate gene"] = (p, "duplicate gene")
  for name, (path, needle) in cases.items():
    with pytest.raises(PrepareError) as e:
      with formats.open_matrix(path, "gctx") as m:
        m.read_rows(0, m.num_samples)
    msg = str(e.value)
    assert path in msg and needle in msg and "\n" not in msg, (name, msg)


def test_text_errors(tmp_path):
  p = tmp_path / "bad.tsv"
  p.write_text("id\tA\tB\ng1\t1\t2\ng2\t3\tabc\n")
  with pytest.raises(PrepareError, match=r"bad.tsv: line 3, column 3: non-numeric cell 'abc'"):
    formats.open_matrix(str(p))
  p = tmp_path / "ragged.tsv"
  p.write_text("id\tA\tB\ng1\t1\n")
  with pytest.raises(PrepareError, match="ragged.tsv: line 2 has 2 fields"):
    formats.open_matrix(str(p))
  p = tmp_path / "bad.gct"
  p.write_text("#1.3\n1\t2\t0\t0\nid\tA\tB\ng1\t1\tx\n")
  with pytest.raises(PrepareError, match="non-numeric"):
    formats.open_matrix(str(p))
  p = tmp_path / "dup.tsv"
  p.write_text("id\tA\tA\ng1\t1\t2\n")
  with pytest.raises(PrepareError, match="duplicate sample"):
    formats.open_matrix(str(p))


# ----------------------------------------------------------------------------
# Metadata for the CMap tools: numbers as numbers, -666 as missing, the real src
# ----------------------------------------------------------------------------


def _as_cmappy_parses(values):
  """cmapPy 4.0.1's parse_metadata_df: every value to str, then pd.to_numeric with
  errors='ignore' (one unparsable cell keeps the whole field as strings), then
  -666 to NaN. Returns (numeric?, values)."""
  cells = np.asarray(values).astype("str")
  if any(c.lower() == "nan" for c in cells):  # observed: a float NaN field stays strings
    return False, cells
  try:
    numbers = np.array([float(c) for c in cells])
  except ValueError:
    return False, cells
  return True, np.where(numbers == -666, np.nan, numbers)


def test_gctx_metadata_in_cmap_encoding(tmp_path):
  values, samples, genes = _case(3, 4)
  path = str(tmp_path / "out.gctx.tmp-123")  # as a caller writing to a temporary name
  formats.write_gctx(path, values, samples, genes, src="out.gctx",
                     row_meta={"symbol": np.array(["A", "B", "C", "D"], object),
                               "val_cc": np.array([np.nan, np.nan, 0.900847, 0.5]),
                               "is_landmark": np.array([True, True, False, False])},
                     col_meta={"pert_iname": np.array(["DMSO", "x", "y"], object),
                               "pert_dose": np.array([10.0, np.nan, 1.5]),
                               "batch": np.array([1, 2, 3])})
  with h5py.File(path, "r") as f:
    assert f.attrs["src"] == "out.gctx"
    cc = f["0/META/ROW/val_cc"]
    assert cc.dtype == np.float64 and cc[()].tolist() == [-666, -666, 0.900847, 0.5]
    assert f["0/META/ROW/is_landmark"].dtype.kind == "i"
    assert f["0/META/ROW/symbol"].dtype.kind == "S"
    assert f["0/META/COL/pert_dose"][()].tolist() == [10.0, -666, 1.5]
    for node in ("ROW/val_cc", "ROW/is_landmark", "COL/pert_dose", "COL/batch"):
      numeric, parsed = _as_cmappy_parses(f["0/META/" + node][()])
      assert numeric, (node, parsed)
    numeric, parsed = _as_cmappy_parses(f["0/META/ROW/val_cc"][()])
    np.testing.assert_array_equal(parsed, [np.nan, np.nan, 0.900847, 0.5])
    assert not _as_cmappy_parses(f["0/META/ROW/symbol"][()])[0]
  # NaN stored as NaN (the old layout) is what cmapPy returned as the strings 'nan', ...
  assert not _as_cmappy_parses(np.array([np.nan, 0.900847]))[0]
  # ... and the readers here give NaN back for -666.
  rows = formats.read_gctx_metadata(path, formats.ROW_META_GROUP)
  np.testing.assert_array_equal(rows["val_cc"], [np.nan, np.nan, 0.900847, 0.5])
  assert rows["symbol"].tolist() == ["A", "B", "C", "D"]
  with formats.open_matrix(path, "gctx") as m:
    cols = m.column_metadata()
  assert sorted(cols) == ["batch", "pert_dose", "pert_iname"]
  assert cols["pert_iname"].tolist() == ["DMSO", "x", "y"]
  np.testing.assert_array_equal(cols["pert_dose"], [10.0, np.nan, 1.5])
  formats.write_gctx(str(tmp_path / "plain.gctx"), values, samples, genes)
  with h5py.File(str(tmp_path / "plain.gctx"), "r") as f:
    assert f.attrs["src"] == "plain.gctx"


def test_gctx_column_metadata_of_the_wrong_length_is_an_error(tmp_path):
  values, samples, genes = _case()
  path = str(tmp_path / "m.gctx")
  _gctx(path, values, samples, genes)
  with h5py.File(path, "a") as f:
    f["0/META/COL/pert_dose"] = np.arange(3.0)
  with formats.open_matrix(path) as m:
    with pytest.raises(PrepareError) as e:
      m.column_metadata()
  assert str(e.value) == (f"{path}: /0/META/COL/pert_dose has shape (3,), expected one value "
                          f"for each of 7 samples")


def test_gct13_column_metadata_rows(tmp_path):
  p = tmp_path / "cm.gct"
  p.write_text("#1.3\n2\t3\t1\t2\nid\tdesc\tA\tB\tC\n"
               "pert_iname\tna\tDMSO\tx\ty\npert_dose\tna\t10\t-666\t1.5\n"
               "g1\td1\t1\t2\t3\ng2\td2\t4\t5\t6.5\n")
  m = formats.open_matrix(str(p))
  np.testing.assert_array_equal(m.read_rows(0, 3), [[1, 4], [2, 5], [3, 6.5]])
  cols = m.column_metadata()
  assert cols["pert_iname"].tolist() == ["DMSO", "x", "y"]
  np.testing.assert_array_equal(cols["pert_dose"], [10.0, np.nan, 1.5])


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
  bom = b"\xef\xbb\xbf"
  values, samples, genes = _case(3, 2)
  np.save(tmp_path / "m.npy", values)
  (tmp_path / "genes.txt").write_bytes(bom + "\r\n".join(genes).encode() + b"\r\n")
  m = formats.open_matrix(str(tmp_path / "m.npy"), gene_ids=str(tmp_path / "genes.txt"))
  assert m.gene_ids == genes
  formats.write_gct(str(tmp_path / "m.gct"), values, samples, genes)
  (tmp_path / "bom.gct").write_bytes(bom + (tmp_path / "m.gct").read_bytes())
  assert formats.open_matrix(str(tmp_path / "bom.gct")).gene_ids == genes
  formats.write_table(str(tmp_path / "m.tsv"), values, samples, genes)
  (tmp_path / "bom.tsv").write_bytes(bom + (tmp_path / "m.tsv").read_bytes())
  assert formats.open_matrix(str(tmp_path / "bom.tsv")).sample_ids == samples


def test_compressed_inputs_are_named_as_such(tmp_path):
  import gzip
  values, samples, genes = _case(3, 2)
  formats.write_gct(str(tmp_path / "m.gct"), values, samples, genes)
  data = (tmp_path / "m.gct").read_bytes()
  with gzip.open(tmp_path / "m.gct.gz", "wb") as f:
    f.write(data)
  with pytest.raises(PrepareError, match=r"m.gct.gz: a compressed \(.gz\) file; decompress it"):
    formats.open_matrix(str(tmp_path / "m.gct.gz"))
  with pytest.raises(PrepareError, match="set --input_format"):
    formats.detect_format(str(tmp_path / "m.dat"), "--input_format")
  (tmp_path / "gz.gct").write_bytes((tmp_path / "m.gct.gz").read_bytes())  # misnamed
  with pytest.raises(PrepareError, match="gz.gct: a compressed file; decompress it first"):
    formats.open_matrix(str(tmp_path / "gz.gct"))
