"""A seeded generator of GEO-like expression compendia, written as a prepared dataset.

The structure, and why Deep-LSMTL should help on it:

* Every sample has a tissue (one of `num_tissues`) and `num_programs` latent
  regulatory programs z drawn around its tissue's centre.
* Genes come in `num_modules` co-regulated modules. A module's activity is a
  nonlinear function of z: a linear part, a saturating tanh part, and a
  pairwise interaction of two programs (which no linear model can see).
* Landmarks are mostly linear read-outs of the programs (plus their module), so
  the programs can be recovered from them; targets follow their module's
  nonlinear activity (plus a weaker secondary module), so a nonlinear
  regressor beats a linear one.
* Noise is heteroscedastic: each gene has its own noise level and lowly
  expressed values are noisier, as on microarrays. Noisy targets share their
  module's signal with cleaner ones, so a model that learns how targets relate
  (the masked-task bottleneck) can borrow strength across a module.
* Values are mapped to the 4-15 log2 range, quantile-normalized to a reference
  (the mean sorted training profile) and standardized per gene with
  training-split statistics, as docs/data.md ("The D-GEX preparation") prepares GEO.

Generation streams in row blocks whose randomness derives from (seed, block),
so any size fits in bounded memory and the output is reproducible.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os

import numpy as np

from lsmtl_jax import __version__
from lsmtl_jax.data import store

GEO_RANGE = (4.11, 14.97)  # the range of D-GEX's quantile-normalized GEO values
_BLOCK_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  num_samples: int = 8000
  num_landmarks: int = 943
  num_targets: int = 9520
  num_programs: int = 24
  num_modules: int = 120
  num_tissues: int = 12
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  seed: int = 0

  def validate(self) -> None:
    for name in ("num_samples", "num_landmarks", "num_targets", "num_programs",
                 "num_modules", "num_tissues"):
      if getattr(self, name) <= 0:
        raise ValueError(f"synthetic data: {name} must be positive, got {getattr(self, name)}")
    if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(
        self.split_fractions) <= 0:
      raise ValueError(f"synthetic data: split_fractions must be three positive numbers "
                       f"summing to 1, got {self.split_fractions}")
    if self.num_samples < 10:
      raise ValueError("synthetic data: num_samples must be at least 10")


@dataclasses.dataclass(frozen=True)
class _GeneModel:
  tissue_centres: np.ndarray      # [tissues, programs]
  module_linear: np.ndarray       # [programs, modules]
  module_saturating: np.ndarray   # [programs, modules]
  module_pair: np.ndarray         # [2, modules] program indices of the interaction
  tissue_module_shift: np.ndarray  # [tissues, modules]
  readout_programs: np.ndarray    # [programs, genes] direct linear read-out (landmarks)
  readout_modules: np.ndarray     # [modules, genes] sparse module loadings
  base_level: np.ndarray          # [genes]
  spread: np.ndarray              # [genes]
  noise: np.ndarray               # [genes]
  primary_module: np.ndarray      # [genes]


def _gene_model(spec: SyntheticSpec) -> _GeneModel:
  rng = np.random.default_rng([spec.seed, 0])
  k, m, c = spec.num_programs, spec.num_modules, spec.num_tissues
  num_genes = spec.num_landmarks + spec.num_targets
  is_landmark = np.arange(num_genes) < spec.num_landmarks

  def sparse_directions(rows, cols, per_col):
    out = np.zeros((rows, cols))
    for j in range(cols):
      picked = rng.choice(rows, size=per_col, replace=False)
      out[picked, j] = rng.normal(size=per_col)
    return out / np.linalg.norm(out, axis=0, keepdims=True)

  # Landmarks load only on the first half of the modules; the other half is
  # seen through the programs alone, so their targets need a nonlinear model.
  visible = np.where(is_landmark, max(m // 2, 1), m)
  primary = rng.integers(0, visible)
  secondary = rng.integers(0, visible)
  readout_modules = np.zeros((m, num_genes))
  sign = rng.choice([-1.0, 1.0], size=num_genes)
  readout_modules[primary, np.arange(num_genes)] = sign * rng.uniform(0.7, 1.2, num_genes)
  readout_modules[secondary, np.arange(num_genes)] += rng.normal(0, 0.35, num_genes)
  # Landmarks read the programs almost linearly, so a regressor can recover z.
  readout_programs = rng.normal(0, 1, (k, num_genes)) * np.where(is_landmark, 1.0, 0.15)
  readout_programs[:, is_landmark] /= np.sqrt(k) / 1.5
  readout_modules[:, is_landmark] *= 0.6
  noise = np.exp(rng.normal(np.log(0.35), 0.5, num_genes))
  noise[is_landmark] *= 0.6
  return _GeneModel(
      tissue_centres=rng.normal(0, 0.9, (c, k)),
      module_linear=sparse_directions(k, m, 3),
      module_saturating=sparse_directions(k, m, 3),
      module_pair=np.stack([rng.integers(0, k, m), rng.integers(0, k, m)]),
      tissue_module_shift=rng.normal(0, 0.4, (c, m)),
      readout_programs=readout_programs,
      readout_modules=readout_modules,
      base_level=rng.uniform(6.0, 11.0, num_genes),
      spread=rng.uniform(0.5, 1.4, num_genes),
      noise=noise,
      primary_module=primary,
  )


def _raw_block(spec: SyntheticSpec, model: _GeneModel, block: int, rows: int) -> np.ndarray:
  """Unnormalized log2 expression of one block of samples, [rows, genes]."""
  rng = np.random.default_rng([spec.seed, 1, block])
  f32 = np.float32
  tissue = rng.integers(0, spec.num_tissues, rows)
  z = (model.tissue_centres[tissue] + rng.standard_normal((rows, spec.num_programs))).astype(f32)
  linear = z @ model.module_linear
  saturating = np.tanh(2.5 * (z @ model.module_saturating))
  pair = z[:, model.module_pair[0]] * z[:, model.module_pair[1]] / 1.5
  activity = (0.2 * linear + saturating + 1.2 * pair + model.tissue_module_shift[tissue])
  signal = (activity.astype(f32) @ model.readout_modules.astype(f32)
            + z @ model.readout_programs.astype(f32))
  level = model.base_level.astype(f32) + model.spread.astype(f32) * signal / f32(1.6)
  # Microarray-like: low expression is noisier on the log scale.
  noise_sd = model.noise.astype(f32) * (1 + f32(0.8) * np.exp((4 - level) / 2))
  return level + noise_sd * rng.standard_normal(level.shape, dtype=f32)


def _blocks(spec: SyntheticSpec, model: _GeneModel, pool=None, depth: int = 0):
  """(start row, raw block) in order; with a worker pool, `depth` blocks are
  made ahead in the workers. A block's values depend on (seed, block) alone and
  every sum over blocks runs in block order, so a pool gives the same bits."""
  starts = range(0, spec.num_samples, _BLOCK_ROWS)
  if pool is None:
    for block, start in enumerate(starts):
      yield start, _raw_block(spec, model, block, min(_BLOCK_ROWS, spec.num_samples - start))
    return
  pending = collections.deque()
  for block, start in enumerate(starts):
    rows = min(_BLOCK_ROWS, spec.num_samples - start)
    pending.append((start, pool.apply_async(_worker_block, (block, rows))))
    if len(pending) >= depth:
      first, result = pending.popleft()
      yield first, result.get()
  while pending:
    first, result = pending.popleft()
    yield first, result.get()


_WORKER_STATE = {}


def _worker_init(spec: SyntheticSpec) -> None:
  _WORKER_STATE["spec"], _WORKER_STATE["model"] = spec, _gene_model(spec)


def _worker_block(block: int, rows: int) -> np.ndarray:
  return _raw_block(_WORKER_STATE["spec"], _WORKER_STATE["model"], block, rows)


def _quantile_normalize(raw: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Each value becomes the reference value of its rank within its sample."""
  order = np.argsort(raw, axis=1, kind="stable")
  out = np.empty(raw.shape, reference.dtype)
  np.put_along_axis(out, order, np.broadcast_to(reference, raw.shape), axis=1)
  return out


def split_indices(num_samples: int, fractions, seed: int) -> dict[str, np.ndarray]:
  order = np.random.default_rng([seed, 2]).permutation(num_samples)
  n_train = int(round(fractions[0] * num_samples))
  n_val = int(round(fractions[1] * num_samples))
  return {"train": np.sort(order[:n_train]),
          "val": np.sort(order[n_train:n_train + n_val]),
          "test": np.sort(order[n_train + n_val:])}


def generate(spec: SyntheticSpec, path: str, workers: int = 1) -> store.Dataset:
  """Writes the synthetic compendium to `path` as a prepared dataset.

  workers > 1 makes the blocks in that many spawned processes (the paper's
  111,009 profiles take ~8 CPU-minutes); the dataset is the same to the bit."""
  spec.validate()
  if workers > 1:
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=_worker_init, initargs=(spec,)) as pool:
      return _generate(spec, path, _gene_model(spec),
                       lambda: _blocks(spec, None, pool, 2 * workers))
  model = _gene_model(spec)
  return _generate(spec, path, model, lambda: _blocks(spec, model))


def _generate(spec: SyntheticSpec, path: str, model: _GeneModel, blocks) -> store.Dataset:
  splits = split_indices(spec.num_samples, spec.split_fractions, spec.seed)
  is_train = np.zeros(spec.num_samples, bool)
  is_train[splits["train"]] = True
  num_genes = spec.num_landmarks + spec.num_targets

  # Pass 1: quantile reference = mean sorted training profile, stretched to GEO's range.
  sorted_sum = np.zeros(num_genes)
  for start, raw in blocks():
    train_rows = is_train[start:start + raw.shape[0]]
    sorted_sum += np.sort(raw[train_rows], axis=1).sum(axis=0)
  reference = sorted_sum / is_train.sum()
  lo, hi = GEO_RANGE
  reference = lo + (reference - reference[0]) * (hi - lo) / (reference[-1] - reference[0])

  # Pass 2: per-gene statistics of the normalized training rows (float64 sums).
  total, total_sq = np.zeros(num_genes), np.zeros(num_genes)
  for start, raw in blocks():
    qn = _quantile_normalize(raw, reference)[is_train[start:start + raw.shape[0]]]
    total += qn.sum(axis=0)
    total_sq += np.square(qn).sum(axis=0)
  n = is_train.sum()
  mean = total / n
  std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))

  def standardized_blocks():
    for _, raw in blocks():
      yield (_quantile_normalize(raw, reference) - mean) / (std + store.STD_EPS)

  landmark_ids = [f"LM{i:05d}" for i in range(spec.num_landmarks)]
  target_ids = [f"TG{i:05d}" for i in range(spec.num_targets)]
  meta = {
      "name": "synthetic",
      "library_version": __version__,
      "landmarks": {"ids": landmark_ids, "symbols": landmark_ids},
      "targets": {"ids": target_ids, "symbols": target_ids},
      "sample_ids": [f"SYN{i:07d}" for i in range(spec.num_samples)],
      "splits": {k: v.tolist() for k, v in splits.items()},
      "standardization": {"mean": mean.tolist(), "std": std.tolist(),
                          "eps": store.STD_EPS, "fit_on": "train"},
      "quantile_reference": reference.tolist(),
      "preprocessing": {"source": "lsmtl_jax.data.synthetic",
                        "spec": dataclasses.asdict(spec),
                        "quantile_normalization": "to mean sorted training profile",
                        "standardization": "per gene, training split statistics"},
      "synthetic": {"target_module": model.primary_module[spec.num_landmarks:].tolist()},
  }
  return store.write_dataset(path, standardized_blocks(), spec.num_samples, meta)


def cached(spec: SyntheticSpec, cache_dir: str, workers: int = 1) -> store.Dataset:
  """Opens the dataset for `spec` under `cache_dir`, generating it on first use
  (with `workers` processes: generate)."""
  spec.validate()
  name = (f"synthetic-v1-n{spec.num_samples}-l{spec.num_landmarks}-t{spec.num_targets}"
          f"-k{spec.num_programs}-m{spec.num_modules}-c{spec.num_tissues}-s{spec.seed}"
          f"-{'-'.join(f'{f:g}' for f in spec.split_fractions)}")
  path = os.path.join(os.path.expanduser(cache_dir), name)
  if os.path.exists(os.path.join(path, store.META_NAME)):
    return store.open_dataset(path)
  try:
    return generate(spec, path, workers)
  except (OSError, store.DatasetError):
    # Runs started side by side on an empty cache all generate it; the first
    # rename wins and the data is the same (a function of the spec), so the
    # others use that one.
    if os.path.exists(os.path.join(path, store.META_NAME)):
      return store.open_dataset(path)
    raise
