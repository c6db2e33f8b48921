"""A finished run, loaded for use: its config, dataset meta, model and best variables.

`load_run(workdir)` rebuilds the regressor exactly as training did (config.json
-> config_lib.resolve -> build.build_network) and restores the best
checkpoint's {'params', 'batch_stats'} through checkpoints.read_best (CRC
checked), replicated over a data-parallel mesh of every device. `Predictor` then maps standardized
landmarks to standardized targets in fixed-size batches sharded over that mesh.

A run counts as finished when training wrote results.json and a best checkpoint
committed; anything else is refused with a `RunError` naming what is missing.
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
from lsmtl_jax import parallel
from lsmtl_jax import results as results_lib
from lsmtl_jax.data import sources
from lsmtl_jax.data import store
from lsmtl_jax.methods import registry


class RunError(ValueError):
  """A run directory that cannot be used; the message names it and what is missing."""


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

  def landmark_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-landmark (scale, offset) with expression = z * scale + offset (float64)."""
    stats = self.meta["standardization"]
    lo = self.num_landmarks
    mean = np.asarray(stats["mean"], np.float64)[:lo]
    std = np.asarray(stats["std"], np.float64)[:lo]
    return std + stats["eps"], mean

  def target_scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
    return self.dataset.target_scale_and_offset()


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
  network = build.build_network(config, dataset.num_landmarks, dataset.num_targets, mesh)
  replicated = parallel.replicated(mesh)
  regressor = network.regressor

  def init(key):
    return nn.meta.unbox(regressor.init(key, jnp.zeros((1, dataset.num_landmarks)),
                                        train=False))

  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  abstract = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
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


class Predictor:
  """Standardized landmarks [n, L] -> standardized targets [n, T], in fixed batches.

  Every batch has the same shape (the last one is padded), so one program is
  compiled; rows are split over the mesh's 'data' axis.
  """

  def __init__(self, run: Run, batch_size: int = 1024):
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
