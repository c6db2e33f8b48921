"""The notebook API against the CLI: the same input written to a file predict
reads, `python -m lsmtl_jax.predict` run on it, and the arrays compared bit for
bit, for an AnnData, a DataFrame and a numpy array; the same errors; and an
`import lsmtl_jax` that pulls in neither pandas nor anndata."""

import os
import subprocess
import sys

import numpy as np
import pytest

import lsmtl_jax
from lsmtl_jax import export
from lsmtl_jax import inference
from lsmtl_jax import predict

from conftest import REPO
from test_predict import trained_run

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

N = 70  # profiles; --block_rows=32 below makes three blocks, the last one short


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  workdir = trained_run(tmp_path_factory)
  path = str(tmp_path_factory.mktemp("api_model") / "tiny.lsmtl")
  export.export(workdir, path)
  return path


@pytest.fixture(scope="module")
def profiles(model_path):
  """Expression profiles: the landmarks shuffled, two extra genes, one an
  Ensembl id with a version suffix (stripped by the AnnData/table readers)."""
  run = inference.load_model(model_path)
  rng = np.random.default_rng(5)
  scale, offset = run.landmark_scale_and_offset()
  lm = rng.standard_normal((N, run.num_landmarks)) * scale + offset
  values = np.concatenate([lm, rng.standard_normal((N, 2))], axis=1).astype(np.float32)
  genes = list(run.landmark_ids) + ["ENSG00000175063.12", "extra"]
  order = rng.permutation(len(genes))
  return values[:, order], [genes[i] for i in order], [f"p{i}" for i in range(N)]


def _cli(model, inp, out, *flags):
  proc = subprocess.run(
      [sys.executable, "-m", "lsmtl_jax.predict", f"--model={model}", f"--input={inp}",
       f"--output={out}", "--intervals=0.9", "--block_rows=32", "--batch_size=16", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return proc


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
  assert np.array_equal(a, b, equal_nan=True)  # bit for bit, NaN where imputed


KW = dict(intervals=0.9, block_rows=32, batch_size=16)


def test_anndata_in_anndata_out_equals_the_cli(model_path, profiles, tmp_path):
  values, genes, samples = profiles
  adata = anndata.AnnData(X=values, obs=pd.DataFrame({"dose": np.arange(N) * 0.5},
                                                     index=samples),
                          var=pd.DataFrame(index=genes))
  adata.write_h5ad(tmp_path / "in.h5ad")
  proc = _cli(model_path, tmp_path / "in.h5ad", tmp_path / "out.h5ad")
  assert proc.returncode == 0, proc.stderr[-2000:]
  full = lsmtl_jax.load_model(model_path).predict(adata, **KW)
  cli = {k: anndata.read_h5ad(tmp_path / f"out{s}.h5ad")
         for k, s in (("prediction", ""), ("lower", ".lower"), ("upper", ".upper"))}
  _same(full.X, cli["prediction"].X)
  _same(full.layers["lower"], cli["lower"].X)
  _same(full.layers["upper"], cli["upper"].X)
  assert list(full.obs_names) == samples and list(full.obs["dose"]) == list(adata.obs["dose"])
  assert list(full.var_names) == list(cli["prediction"].var_names)
  pd.testing.assert_frame_equal(full.var, cli["prediction"].var, check_exact=True)
  assert full.var["imputed"].sum() == 0
  L = int(full.var["is_landmark"].sum())
  assert (full.layers["lower"][:, L:] < full.X[:, L:]).all()  # real bounds, not copies
  assert np.isfinite(full.X).all() and full.X[:, L:].std() > 0


def test_dataframe_in_dataframes_out_equals_the_cli(model_path, profiles, tmp_path):
  values, genes, samples = profiles
  df = pd.DataFrame(values, index=samples, columns=genes)
  df.T.to_csv(tmp_path / "in.csv")  # the table reader's layout: genes as rows
  proc = _cli(model_path, tmp_path / "in.csv", tmp_path / "out.npy")
  assert proc.returncode == 0, proc.stderr[-2000:]
  model = lsmtl_jax.load_model(model_path)
  out = model.predict(df, **KW)
  assert isinstance(out, lsmtl_jax.Prediction)
  for frame, suffix in ((out.values, ""), (out.lower, ".lower"), (out.upper, ".upper")):
    assert list(frame.index) == samples and list(frame.columns) == model.gene_ids
    _same(frame.to_numpy(), np.load(tmp_path / f"out{suffix}.npy"))
  plain = model.predict(df, block_rows=32, batch_size=16)  # no intervals: one DataFrame
  _same(plain.to_numpy(), out.values.to_numpy())


def test_array_with_gene_ids_equals_the_cli_and_a_workdir_loads_alike(model_path, profiles,
                                                                      tmp_path,
                                                                      tmp_path_factory):
  values, genes, _ = profiles
  np.save(tmp_path / "in.npy", values)
  (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
  proc = _cli(model_path, tmp_path / "in.npy", tmp_path / "out.npy",
              f"--gene_ids={tmp_path / 'genes.txt'}", "--output_units=standardized")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for source in (model_path, trained_run(tmp_path_factory)):  # a model file, a workdir
    pred, lower, upper = lsmtl_jax.load_model(source).predict(
        values, genes=genes, output_units="standardized", **KW)
    _same(pred, np.load(tmp_path / "out.npy"))
    _same(lower, np.load(tmp_path / "out.lower.npy"))
    _same(upper, np.load(tmp_path / "out.upper.npy"))


def test_properties_match_the_cli_gene_metadata(model_path, profiles, tmp_path):
  values, genes, samples = profiles
  adata = anndata.AnnData(X=values, obs=pd.DataFrame(index=samples),
                          var=pd.DataFrame(index=genes))
  adata.write_h5ad(tmp_path / "in.h5ad")
  assert _cli(model_path, tmp_path / "in.h5ad", tmp_path / "out.h5ad").returncode == 0
  var = anndata.read_h5ad(tmp_path / "out.h5ad").var
  model = lsmtl_jax.load_model(model_path)
  assert model.gene_ids == list(var.index) == model.landmark_ids + model.target_ids
  assert model.symbols == list(var["symbol"])
  assert len(model.landmark_ids) == model.num_landmarks == int(var["is_landmark"].sum())
  rel = model.reliability
  for field in ("val_cc", "val_mae", "val_mae_z", "is_landmark", "well_inferred"):
    np.testing.assert_array_equal(rel[field], var[field].to_numpy())


def test_errors_carry_the_cli_message(model_path, profiles, tmp_path):
  values, genes, samples = profiles
  keep = [i for i, g in enumerate(genes) if g != lsmtl_jax.load_model(model_path).landmark_ids[0]]
  df = pd.DataFrame(values[:, keep], index=samples, columns=[genes[i] for i in keep])
  df.T.to_csv(tmp_path / "in.csv")
  proc = _cli(model_path, tmp_path / "in.csv", tmp_path / "out.npy")
  line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(line) == 1
  with pytest.raises(predict.PredictError) as e:
    lsmtl_jax.load_model(model_path).predict(df, **KW)
  assert str(e.value) == line[0].replace(f"error: {tmp_path / 'in.csv'}", "the DataFrame")
  imputed = lsmtl_jax.load_model(model_path).predict(df, impute_missing=True, **KW)
  assert np.isnan(imputed.lower.iloc[:, 0]).all()  # an imputed landmark has no interval
  with pytest.raises(predict.PredictError, match="--input_units must be one of"):
    lsmtl_jax.load_model(model_path).predict(df, units="log")
  with pytest.raises(inference.RunError):
    lsmtl_jax.load_model(str(tmp_path / "missing.lsmtl"))


def test_import_needs_neither_pandas_nor_anndata():
  code = ("import sys, lsmtl_jax, lsmtl_jax.api; lsmtl_jax.load_model; "
          "print(sorted(m for m in ('pandas', 'anndata') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"
  light = subprocess.run([sys.executable, "-c", "import sys, lsmtl_jax; print('jax' in "
                          "sys.modules)"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert light.stdout.strip() == "False"
