"""A model you can use from a notebook: in memory, no files.

  import lsmtl_jax
  model = lsmtl_jax.load_model("tiny.lsmtl")    # or a finished workdir
  full = model.predict(adata)                   # AnnData in, AnnData out
  full = model.predict(df, intervals=0.9)       # DataFrame in: (values, lower, upper)
  full = model.predict(x, genes=ids)            # numpy in: numpy out

The numbers are those of `python -m lsmtl_jax.predict` on the same input, bit
for bit: the same landmark mapping (predict.LandmarkMapper), model batches
(inference.Predictor), block arithmetic (predict.BlockPredictor), per-gene
metadata and errors (predict.PredictError and the readers' PrepareError, with
the CLI's one-line messages). Values are taken as float32, as every file
reader reads them, and gene ids are matched as the CLI matches them: Ensembl
version suffixes stripped for AnnData and DataFrames (like the .h5ad and
table readers), kept for arrays (like .npy).

Output columns are the model's landmarks then its targets (`gene_ids`). With
`intervals`, an AnnData carries the bounds as layers 'lower' and 'upper'; a
DataFrame or an array comes back as a Prediction(values, lower, upper).
pandas and anndata are imported only when such an object is passed or made,
so `import lsmtl_jax` (and this module) needs neither.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from lsmtl_jax import inference
from lsmtl_jax import predict as predict_lib
from lsmtl_jax.data import formats
from lsmtl_jax.data import matrix as matrix_lib

_log = logging.getLogger("lsmtl_jax")
FLAGS = ("is_landmark", "imputed", "well_inferred")


class Prediction(NamedTuple):
  """A DataFrame's or an array's prediction with its interval bounds."""
  values: Any
  lower: Any
  upper: Any


class _SparseRows(formats.ArrayMatrix):
  """An AnnData's sparse X, densified a block at a time."""

  def _read(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self._values[start:stop].toarray(), dtype=np.float32)


def _is_anndata(data) -> bool:
  return all(hasattr(data, a) for a in ("obs", "var", "X", "obs_names", "var_names"))


def _is_dataframe(data) -> bool:
  return all(hasattr(data, a) for a in ("columns", "index", "to_numpy")) and not hasattr(
      data, "X")


def load_model(path: str, devices=None) -> "Model":
  """A model file (python -m lsmtl_jax.export) or a finished training workdir.
  Raises inference.RunError with the CLI's one-line message otherwise."""
  if os.path.isdir(path):
    return Model(inference.load_run(path, devices), path)
  return Model(inference.load_model(path, devices), path)


class Model:
  """A trained model: `predict` and the per-gene facts of its output columns."""

  def __init__(self, run: inference.Usable, path: str = ""):
    self._run, self.path = run, path
    self._predictors: dict[int, inference.Predictor] = {}

  def __repr__(self) -> str:
    return (f"lsmtl_jax.Model({self.path!r}: {self.num_landmarks} landmarks -> "
            f"{self.num_targets} targets)")

  @property
  def num_landmarks(self) -> int:
    return self._run.num_landmarks

  @property
  def num_targets(self) -> int:
    return self._run.num_targets

  @property
  def landmark_ids(self) -> list[str]:
    return list(self._run.landmark_ids)

  @property
  def target_ids(self) -> list[str]:
    return list(self._run.target_ids)

  @property
  def gene_ids(self) -> list[str]:
    """The output columns: landmarks, then targets."""
    return self.landmark_ids + self.target_ids

  @property
  def symbols(self) -> list[str]:
    return list(self._run.landmark_symbols) + list(self._run.target_symbols)

  @property
  def reliability(self) -> dict[str, np.ndarray]:
    """Per output column: val_cc, val_mae (expression units), val_mae_z (NaN for
    landmarks), is_landmark and well_inferred (validation CC >= 0.9), as
    predict writes them."""
    meta = predict_lib.gene_metadata(self._run, np.zeros(self.num_landmarks, bool), 0.9)
    return {k: meta[k].astype(bool) if k in FLAGS else meta[k]
            for k in ("val_cc", "val_mae", "val_mae_z", "is_landmark", "well_inferred")}

  def _predictor(self, batch_size: int) -> inference.Predictor:
    if batch_size not in self._predictors:  # compiled once per batch size
      self._predictors[batch_size] = inference.Predictor(self._run, batch_size)
    return self._predictors[batch_size]

  def predict(self, data, intervals: float | None = None, *, units: str = "expression",
              output_units: str = "expression", quantile_map: bool = False,
              impute_missing: bool = False, check_units: bool = True,
              threshold: float = 0.9, genes: Sequence[str] | None = None,
              samples: Sequence[str] | None = None, gene_id_field: str = "",
              batch_size: int = 1024, block_rows: int = 4096):
    """Every gene for each profile (row) of `data`: an AnnData, a pandas
    DataFrame (profiles as rows, gene ids as columns) or a [profiles, genes]
    array with `genes` (and optionally `samples`) naming its columns and rows.
    The keywords are predict's flags (--input_units is `units`); `intervals`
    is --intervals' coverage. Raises predict.PredictError or
    formats.PrepareError with the CLI's one-line messages."""
    opts = predict_lib.Options(
        input_units=units, output_units=output_units, quantile_map=quantile_map,
        impute_missing=impute_missing, check_units=check_units, threshold=threshold,
        batch_size=batch_size, block_rows=block_rows, intervals=float(intervals or 0.0))
    predict_lib.check_options(opts)
    if _is_anndata(data):
      return self._predict_anndata(data, opts, gene_id_field)
    if gene_id_field:
      raise predict_lib.PredictError("gene_id_field picks an AnnData's var column; a "
                                     "DataFrame or an array names its genes itself")
    if _is_dataframe(data):
      gene_ids = [matrix_lib.strip_version(str(c)) for c in data.columns]
      m = formats.ArrayMatrix("the DataFrame", data.to_numpy(), [str(i) for i in data.index],
                              gene_ids)
      out = self._run_matrix(m, opts)
      import pandas as pd  # pylint: disable=g-import-not-at-top
      frames = {k: pd.DataFrame(v, index=data.index, columns=self.gene_ids)
                for k, v in out["values"].items()}
      return _result(frames)
    values = np.asarray(data)
    if genes is None:
      raise predict_lib.PredictError("the array: name its columns with genes=[gene ids]")
    sample_ids = ([str(s) for s in samples] if samples is not None else
                  [f"S{i}" for i in range(values.shape[0] if values.ndim else 0)])
    if values.dtype.kind not in "fiu":
      raise predict_lib.PredictError(f"the array: holds {values.dtype}, not numbers")
    m = formats.ArrayMatrix("the array", values, sample_ids, [str(g) for g in genes])
    return _result(self._run_matrix(m, opts)["values"])

  def _predict_anndata(self, adata, opts: predict_lib.Options, gene_id_field: str):
    if gene_id_field in ("", "_index", "index"):
      raw_ids = list(adata.var_names)
    elif gene_id_field not in adata.var.columns:
      raise formats.PrepareError(f"the AnnData: var has no column {gene_id_field!r} "
                                 f"(columns: {', '.join(adata.var.columns) or 'none'})")
    else:
      raw_ids = list(adata.var[gene_id_field])
    gene_ids = [matrix_lib.strip_version(str(g)) for g in raw_ids]
    x = adata.X
    kind = _SparseRows if hasattr(x, "toarray") else formats.ArrayMatrix
    m = kind("the AnnData", x if hasattr(x, "toarray") else np.asarray(x),
             [str(s) for s in adata.obs_names], gene_ids)
    out = self._run_matrix(m, opts)
    import anndata  # pylint: disable=g-import-not-at-top
    import pandas as pd  # pylint: disable=g-import-not-at-top
    meta = out["meta"]
    var = pd.DataFrame({f: meta[f].astype(bool) if f in FLAGS else meta[f]
                        for f in predict_lib.ROW_META_FIELDS},
                       index=pd.Index(self.gene_ids))
    values = out["values"]
    result = anndata.AnnData(
        X=values["prediction"], obs=adata.obs.copy(), var=var,
        layers={k: values[k] for k in ("lower", "upper") if k in values})
    result.uns["lsmtl"] = {"model": self.path, "units": opts.output_units,
                           "intervals": opts.intervals, **out["calibration"]}
    return result

  def _run_matrix(self, m: formats.Matrix, opts: predict_lib.Options) -> dict:
    """predict_file's computation on an in-memory matrix, block by block."""
    run, n = self._run, m.num_samples
    if n == 0:
      raise predict_lib.PredictError(f"{m.path}: no profiles (0 samples); nothing to predict")
    calibration = predict_lib.calibration_for(run, opts, _log.warning)
    mapper = predict_lib.LandmarkMapper(run, m.gene_ids, m.path, opts)
    if mapper.missing:
      _log.info("%s: imputing %d missing landmark(s) with the training mean", m.path,
                len(mapper.missing))
    predictor = self._predictor(opts.batch_size)
    meta = predict_lib.gene_metadata(run, ~mapper.present, opts.threshold, predictor)
    kinds = ["prediction"] + (["lower", "upper"] if calibration is not None else [])
    compute = predict_lib.BlockPredictor(run, mapper, predictor, opts, calibration, kinds)
    values = {k: np.empty((n, len(self.gene_ids)), np.float32) for k in kinds}
    for start in range(0, n, opts.block_rows):
      stop = min(n, start + opts.block_rows)
      block = compute(start, mapper.select(m.read_rows(start, stop)), m.sample_ids)
      for k in kinds:
        values[k][start:stop] = block[k]
        compute.buffers.give(k, block[k])
    info = {} if calibration is None else {
        "calibration": {"source": calibration.source, "profiles": calibration.num_profiles}}
    return {"values": values, "meta": meta, "calibration": info}


def _result(values: dict[str, Any]):
  if "lower" in values:
    return Prediction(values["prediction"], values["lower"], values["upper"])
  return values["prediction"]
