"""A finished run, loaded for use: its config, dataset meta, model and best variables.

`load_run(workdir)` rebuilds the regressor exactly as training did (config.json
-> config_lib.resolve -> build.build_network) and restores the best
checkpoint's {'params', 'batch_stats'} through checkpoints.read_best (CRC
checked), replicated over a data-parallel mesh of every device. `Predictor` then maps standardized
landmarks to standardized targets in fixed-size batches sharded over that mesh.

A run counts as finished when training wrote results.json and a best checkpoint
committed; anything else is refused with a `RunError` naming what is missing.

`load_model(path)` opens a portable model file instead (model_file.py, written
by python -m lsmtl_jax.export): no workdir, no dataset. Both a `Run` and a
`Model` offer what prediction reads (the `Usable` interface below): gene ids
and symbols, the standardization, the landmark quantile reference,
per-target validation metrics, the intervals' calibration, and the regressor
with its variables on a mesh, so `Predictor` and predict.py take either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsmtl_jax import build
from lsmtl_jax import checkpoints
from lsmtl_jax import config_lib
from lsmtl_jax import intervals
from lsmtl_jax import metrics
from lsmtl_jax import model_file
from lsmtl_jax import parallel
from lsmtl_jax import results as results_lib
from lsmtl_jax.data import sources
from lsmtl_jax.data import store
from lsmtl_jax.methods import registry


class RunError(ValueError):
  """A run directory (or model file) that cannot be used; the message names it
  and what is missing."""


REFERENCE_ROWS = 4096  # training rows averaged into the landmark quantile reference
READ_ROWS = 512


def _scale_and_offset(stats: dict[str, Any], columns: slice) -> tuple[np.ndarray, np.ndarray]:
  """Per-gene (scale, offset) with expression = z * scale + offset (float64)."""
  mean = np.asarray(stats["mean"], np.float64)[columns]
  std = np.asarray(stats["std"], np.float64)[columns]
  return std + stats["eps"], mean


@dataclasses.dataclass
class Run:
  workdir: str
  config: ml_collections.ConfigDict
  dataset: store.Dataset
  regressor: nn.Module
  variables: dict[str, Any]  # {'params', 'batch_stats'} of the regressor, replicated
  best_step: int
  mesh: jax.sharding.Mesh

  @property
  def meta(self) -> dict[str, Any]:
    return self.dataset.meta

  @property
  def landmark_ids(self) -> list[str]:
    return list(self.meta["landmarks"]["ids"])

  @property
  def target_ids(self) -> list[str]:
    return list(self.meta["targets"]["ids"])

  @property
  def num_landmarks(self) -> int:
    return self.dataset.num_landmarks

  @property
  def num_targets(self) -> int:
    return self.dataset.num_targets

  @property
  def landmark_symbols(self) -> list[str]:
    return list(self.meta["landmarks"].get("symbols", self.landmark_ids))

  @property
  def target_symbols(self) -> list[str]:
    return list(self.meta["targets"].get("symbols", self.target_ids))

  def landmark_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-landmark (scale, offset) with expression = z * scale + offset (float64)."""
    return _scale_and_offset(self.meta["standardization"], slice(0, self.num_landmarks))

  def target_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    return self.dataset.target_scale_and_offset()

  def landmark_reference(self, max_rows: int = REFERENCE_ROWS) -> np.ndarray:
    """Mean sorted landmark profile (expression units, float64) of up to
    `max_rows` training rows, evenly spaced over the training split: the target
    of predict's --quantile_map."""
    train_rows = self.dataset.split(self.config.data.train_split)
    pick = train_rows[np.unique(np.linspace(0, len(train_rows) - 1,
                                            min(max_rows, len(train_rows)))
                                .round().astype(np.int64))]
    scale, offset = self.landmark_scale_and_offset()
    total = np.zeros(self.num_landmarks)
    for start in range(0, len(pick), READ_ROWS):
      z = self.dataset.read_rows(pick[start:start + READ_ROWS])[:, :self.num_landmarks]
      total += np.sort(z.astype(np.float64) * scale + offset, axis=1).sum(0)
    return total / len(pick)

  def validation_metrics(self) -> dict[str, np.ndarray]:
    """Per-target validation CC and MAE (z and expression units), from the
    per-gene sums of training's final evaluation (gene_stats.npz)."""
    stats = results_lib.read_gene_stats(self.workdir)
    if stats is None or "val" not in stats:
      raise RunError(f"{self.workdir}: no {results_lib.GENE_STATS_NAME} with val statistics; "
                     "the run did not finish its final evaluation")
    scale, offset = self.target_scale_and_offset()
    genes = metrics.per_gene(stats["val"])
    return {"cc": genes["cc"], "mae": genes["mae"],
            "mae_expression": metrics.per_gene(metrics.affine(stats["val"], scale,
                                                              offset))["mae"]}

  def calibration(self, batch_size: int = 1024) -> intervals.Calibration:
    """Split-conformal quantiles from the run's held-out calibration rows
    (data.calibration_fraction > 0) or its validation split, predicted now."""
    try:
      held_out, source = sources.calibration_set(self.config, self.dataset)
    except store.DatasetError as e:
      raise RunError(f"{self.workdir}: cannot open the calibration rows: {e}") from None
    rows, dataset = held_out.indices, held_out.dataset
    predictor = Predictor(self, batch_size)
    scores = np.empty((len(rows), self.num_targets), np.float32)
    for start in range(0, len(rows), READ_ROWS):
      block = dataset.read_rows(rows[start:start + READ_ROWS])
      predicted = predictor(block[:, :self.num_landmarks])
      scores[start:start + len(block)] = np.abs(block[:, self.num_landmarks:] - predicted)
    return intervals.Calibration.from_scores(scores, source)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise RunError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def check_finished(workdir: str) -> tuple[dict, int]:
  """(config dict, best step) of a finished network run, or RunError saying why not."""
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: no such run directory")
  config_path = os.path.join(workdir, results_lib.CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise RunError(f"{workdir}: not a run directory (no config.json); train one with "
                   "python -m lsmtl_jax.main --config=... --workdir=...")
  config = _read_json(config_path)
  method = config.get("method")
  if method not in registry.network_names():
    raise RunError(f"{workdir}: method {method!r} has no network checkpoint to use "
                   f"(one of {', '.join(registry.network_names())} is needed)")
  if not os.path.isfile(os.path.join(workdir, results_lib.RESULTS_NAME)):
    raise RunError(f"{workdir}: training has not finished (no results.json); let it finish "
                   "or resume it with the same python -m lsmtl_jax.main command")
  best_dir = os.path.join(workdir, "checkpoints", "best")
  steps = []
  if os.path.isdir(best_dir):
    steps = [int(d) for d in os.listdir(best_dir) if d.isdigit() and os.path.isfile(
        os.path.join(best_dir, d, "commit_success.txt"))]
  if not steps:
    raise RunError(f"{best_dir}: no committed best checkpoint; the run has no finished model")
  return config, max(steps)


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """Every device on the 'data' axis: prediction is batch-parallel, weights replicated."""
  return parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}), devices)


def load_run(workdir: str, devices=None) -> Run:
  """The run's dataset (for its meta and splits), regressor and best variables."""
  config_dict, _ = check_finished(workdir)
  try:
    config = config_lib.resolve(ml_collections.ConfigDict(config_dict))
  except config_lib.ConfigError as e:
    raise RunError(f"{workdir}: {e}") from None
  try:
    dataset = sources.load_dataset(config)
  except store.DatasetError as e:
    raise RunError(f"{workdir}: cannot open the run's dataset: {e}") from None
  mesh = data_mesh(devices)
  regressor, abstract = _regressor_and_abstract(config, dataset.num_landmarks,
                                                dataset.num_targets, mesh)
  try:
    variables, best_step = checkpoints.read_best(workdir, abstract)
  except checkpoints.CheckpointError as e:
    raise RunError(f"cannot restore the model: {e}; was the config changed after "
                   "training?") from None
  variables = dict(variables)
  if not variables.get("batch_stats"):
    variables["batch_stats"] = {}
  return Run(workdir=workdir, config=config, dataset=dataset, regressor=regressor,
             variables=variables, best_step=best_step, mesh=mesh)


@dataclasses.dataclass
class Model:
  """A portable model file, loaded: what a `Run` offers prediction, without
  the run's directory or dataset."""

  path: str
  config: ml_collections.ConfigDict
  regressor: nn.Module
  variables: dict[str, Any]  # {'params', 'batch_stats'}, replicated over the mesh
  best_step: int
  mesh: jax.sharding.Mesh
  landmark_ids: list[str]
  target_ids: list[str]
  landmark_symbols: list[str]
  target_symbols: list[str]
  standardization: dict[str, Any]  # {'mean', 'std': float64 [genes], 'eps'}
  reference: np.ndarray
  validation: dict[str, np.ndarray]
  stored_calibration: intervals.Calibration
  provenance: dict[str, Any]

  @property
  def num_landmarks(self) -> int:
    return len(self.landmark_ids)

  @property
  def num_targets(self) -> int:
    return len(self.target_ids)

  def landmark_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    return _scale_and_offset(self.standardization, slice(0, self.num_landmarks))

  def target_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    return _scale_and_offset(self.standardization, slice(self.num_landmarks, None))

  def landmark_reference(self) -> np.ndarray:
    return self.reference

  def validation_metrics(self) -> dict[str, np.ndarray]:
    return self.validation

  def calibration(self, batch_size: int = 1024) -> intervals.Calibration:  # pylint: disable=unused-argument
    return self.stored_calibration


# What predict.py and Predictor read: a finished run or a loaded model file.
Usable = Run | Model


def _regressor_and_abstract(config, num_landmarks: int, num_targets: int, mesh):
  """The regressor of a resolved config, and ShapeDtypeStructs of its
  {'params', 'batch_stats'} replicated over `mesh`."""
  network = build.build_network(config, num_landmarks, num_targets, mesh)
  replicated = parallel.replicated(mesh)
  regressor = network.regressor

  def init(key):
    return nn.meta.unbox(regressor.init(key, jnp.zeros((1, num_landmarks)), train=False))

  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  abstract = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  return regressor, abstract


def load_model(path: str, devices=None) -> Model:
  """A model file (python -m lsmtl_jax.export): format, version and every
  part's sha256 checked; RunError with one line otherwise."""
  try:
    contents = model_file.read(path)
  except model_file.ModelFileError as e:
    raise RunError(str(e)) from None
  try:
    config = config_lib.resolve(ml_collections.ConfigDict(contents.config))
  except config_lib.ConfigError as e:
    raise RunError(f"{path}: {e}") from None
  landmarks, targets = contents.landmarks["ids"], contents.targets["ids"]
  mesh = data_mesh(devices)
  regressor, abstract = _regressor_and_abstract(config, len(landmarks), len(targets), mesh)
  stored = {"params": contents.variables["params"],
            "batch_stats": contents.variables.get("batch_stats", {})}
  wanted = jax.tree.map(lambda s: (tuple(s.shape), s.dtype.name), abstract)
  got = jax.tree.map(lambda a: (tuple(a.shape), a.dtype.name), stored)
  if wanted != got:
    raise RunError(f"{path}: the stored variables do not fit the model its config builds "
                   f"({len(jax.tree.leaves(got))} arrays stored, "
                   f"{len(jax.tree.leaves(wanted))} expected)")
  variables = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), stored, abstract)
  return Model(
      path=path, config=config, regressor=regressor, variables=variables,
      best_step=int(contents.provenance.get("best_step", -1)), mesh=mesh,
      landmark_ids=list(landmarks), target_ids=list(targets),
      landmark_symbols=list(contents.landmarks.get("symbols", landmarks)),
      target_symbols=list(contents.targets.get("symbols", targets)),
      standardization=contents.standardization, reference=contents.landmark_reference,
      validation=contents.validation, stored_calibration=contents.calibration,
      provenance=contents.provenance)


class Predictor:
  """Standardized landmarks [n, L] -> standardized targets [n, T], in fixed batches.

  Every batch has the same shape (the last one is padded), so one program is
  compiled; rows are split over the mesh's 'data' axis.
  """

  def __init__(self, run: Usable, batch_size: int = 1024):
    data = run.mesh.shape["data"]
    self.batch_size = int(math.ceil(max(1, batch_size) / data) * data)
    self.run = run
    self._sharding = parallel.batch_sharding(run.mesh)
    num_targets = run.num_targets
    regressor = run.regressor
    self._apply = jax.jit(
        lambda v, x: regressor.apply(v, x, train=False)[:, :num_targets],
        in_shardings=(parallel.replicated(run.mesh), self._sharding),
        out_shardings=self._sharding)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    out = np.empty((x.shape[0], self.run.num_targets), np.float32)
    b = self.batch_size
    for start in range(0, x.shape[0], b):
      chunk = x[start:start + b]
      n = chunk.shape[0]
      if n < b:
        chunk = np.concatenate([chunk, np.zeros((b - n, chunk.shape[1]), np.float32)])
      y = self._apply(self.run.variables, jax.device_put(chunk, self._sharding))
      out[start:start + n] = np.asarray(jax.device_get(y))[:n]
    return out
