"""Landmark relevance maps of a trained run: python -m lsmtl_jax.interpret --workdir=RUN

Runs LRP (`relevance.py`) on profiles of one split and writes WORKDIR/relevance/
(built in a temporary directory, then renamed; an older one is replaced):

  relevance_matrix.npy      [targets, landmarks] mean relevance over --matrix_samples
                            profiles (one LRP pass per target, batched)
  sample_relevance.npy      [samples, landmarks] each profile's map for its whole
                            predicted profile
  target_clusters.npy       k-means (seeded) of the matrix's rows: --target_clusters
  landmark_groups.npy       k-means of its columns: --landmark_groups
  sample_clusters.npy       k-means of the per-sample maps: --sample_clusters
  fig6a_sample_clusters.png / .npy   sample cluster x landmark (mean map per cluster)
  fig6b_target_clusters.png / .npy   target cluster x landmark, over all profiles
  fig6c_groups.png / .npy            landmark group x target cluster
  fig6d_matrix.png                   the matrix, rows and columns ordered by cluster
  ids.json                  landmark, target and sample ids, and which ids index
                            the rows and columns of each array

Clustering is on unit-normalized rows (cosine-like), so clusters group patterns
of relevance rather than magnitudes. Landmark columns in 6a/6b are ordered by
landmark group, then by id order within a group.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from lsmtl_jax import fileio
from lsmtl_jax import inference
from lsmtl_jax import kmeans
from lsmtl_jax import relevance
from lsmtl_jax.data import store

OUT_DIR = "relevance"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _heatmap(path, values, title, xlabel, ylabel, xbounds=None, ybounds=None):
  plt = _pyplot()
  limit = float(np.percentile(np.abs(values), 99)) or 1.0
  fig, ax = plt.subplots(figsize=(10, 5))
  im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                 interpolation="nearest")
  for b in xbounds or ():
    ax.axvline(b - 0.5, color="k", lw=0.4)
  for b in ybounds or ():
    ax.axhline(b - 0.5, color="k", lw=0.4)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  fig.colorbar(im, ax=ax, label="mean LRP relevance")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _bounds(sorted_labels: np.ndarray) -> list[int]:
  return list(np.flatnonzero(np.diff(sorted_labels)) + 1)


def interpret(workdir: str, split: str = "val", num_samples: int = 1000,
              matrix_samples: int = 64, rule: str = "epsilon", eps: float = 1e-2,
              initial: str = "abs", sample_clusters: int = 20, target_clusters: int = 20,
              landmark_groups: int = 10, seed: int = 0, log=lambda s: None) -> str:
  if rule not in relevance.RULES:
    raise ValueError(f"--rule must be one of {relevance.RULES}, got {rule!r}")
  if initial not in relevance.INITIAL:
    raise ValueError(f"--initial must be one of {relevance.INITIAL}, got {initial!r}")
  for name, v in (("num_samples", num_samples), ("matrix_samples", matrix_samples),
                  ("sample_clusters", sample_clusters), ("target_clusters", target_clusters),
                  ("landmark_groups", landmark_groups)):
    if v <= 0:
      raise ValueError(f"--{name} must be positive, got {v}")
  t0 = time.perf_counter()
  inference.check_finished(workdir)
  final = os.path.join(workdir, OUT_DIR)
  fileio.check_atomic_dir(final)
  run = inference.load_run(workdir)
  rows = run.dataset.split(split)
  # Evenly spaced over the split, so the subset is fixed and spans it.
  pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(num_samples, len(rows)))
                        .round().astype(np.int64))]
  x = run.dataset.read_rows(pick)[:, :run.num_landmarks].astype(np.float32)
  graph = relevance.fold(run.config.model, run.variables, run.num_targets)
  kw = dict(rule=rule, eps=eps, initial=initial)

  sub = x[np.unique(np.linspace(0, len(x) - 1, min(matrix_samples, len(x))).round()
                    .astype(np.int64))]
  matrix = relevance.mean_matrix(graph, sub, **kw)
  log(f"relevance matrix {matrix.shape} over {len(sub)} profiles: "
      f"{time.perf_counter() - t0:.1f} s")
  samples = relevance.per_sample(graph, x, **kw)
  t_labels, _ = kmeans.kmeans(relevance.unit_rows(matrix), target_clusters, seed)
  l_labels, _ = kmeans.kmeans(relevance.unit_rows(matrix.T), landmark_groups, seed)
  s_labels, _ = kmeans.kmeans(relevance.unit_rows(samples), sample_clusters, seed)
  n_t, n_l, n_s = t_labels.max() + 1, l_labels.max() + 1, s_labels.max() + 1
  by_target = relevance.by_target_groups(graph, x, t_labels, n_t, **kw)  # [n_t, L]
  by_sample = np.stack([samples[s_labels == c].mean(0) for c in range(n_s)])  # [n_s, L]
  groups = np.stack([by_target[:, l_labels == g].mean(1) for g in range(n_l)])  # [n_l, n_t]
  log(f"clusters and maps: {time.perf_counter() - t0:.1f} s")

  l_order, t_order = relevance.cluster_order(l_labels), relevance.cluster_order(t_labels)
  with fileio.atomic_dir(final) as tmp:
    arrays = {
        "relevance_matrix": (matrix, "targets", "landmarks"),
        "sample_relevance": (samples, "samples", "landmarks"),
        "target_clusters": (t_labels, "targets", None),
        "landmark_groups": (l_labels, "landmarks", None),
        "sample_clusters": (s_labels, "samples", None),
        "fig6a_sample_clusters": (by_sample, "sample_clusters", "landmarks"),
        "fig6b_target_clusters": (by_target, "target_clusters", "landmarks"),
        "fig6c_groups": (groups, "landmark_groups", "target_clusters"),
    }
    for name, (a, _, _) in arrays.items():
      np.save(os.path.join(tmp, f"{name}.npy"), a)
    sample_ids = [run.meta["sample_ids"][i] for i in pick] if "sample_ids" in run.meta else [
        str(i) for i in pick]
    with open(os.path.join(tmp, "ids.json"), "w") as f:
      json.dump({"landmarks": run.landmark_ids, "targets": run.target_ids,
                 "samples": sample_ids, "split": split,
                 "arrays": {k: {"rows": r, "cols": c} for k, (_, r, c) in arrays.items()},
                 "settings": {"rule": rule, "eps": eps, "initial": initial,
                              "num_samples": len(x), "matrix_samples": len(sub), "seed": seed,
                              "best_step": run.best_step}}, f)
    lb = _bounds(l_labels[l_order])
    _heatmap(os.path.join(tmp, "fig6a_sample_clusters.png"), by_sample[:, l_order],
             f"(a) landmark relevance per sample cluster ({len(x)} {split} profiles)",
             f"landmarks, ordered by {n_l} groups", f"sample cluster (k-means, {n_s})",
             xbounds=lb)
    _heatmap(os.path.join(tmp, "fig6b_target_clusters.png"), by_target[:, l_order],
             "(b) landmark relevance per target cluster (mean over profiles and the "
             "cluster's targets)", f"landmarks, ordered by {n_l} groups",
             f"target cluster (k-means, {n_t})", xbounds=lb)
    _heatmap(os.path.join(tmp, "fig6c_groups.png"), groups,
             "(c) landmark group x target cluster (mean relevance per landmark)",
             f"target cluster ({n_t})", f"landmark group ({n_l})")
    _heatmap(os.path.join(tmp, "fig6d_matrix.png"), matrix[t_order][:, l_order],
             f"(d) relevance of each landmark for each target (mean over {len(sub)} profiles)",
             f"landmarks, ordered by {n_l} groups", f"targets, ordered by {n_t} clusters",
             xbounds=lb, ybounds=_bounds(t_labels[t_order]))
  return final


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  F = flags.FLAGS
  if len(argv) > 1:
    cli.refuse(f"unexpected arguments {argv[1:]}")
  t0 = time.perf_counter()
  try:
    path = interpret(F.workdir, F.split, F.num_samples, F.matrix_samples, F.rule, F.eps,
                     F.initial, F.sample_clusters, F.target_clusters, F.landmark_groups, F.seed,
                     log=lambda s: print(s, file=sys.stderr))
  except (inference.RunError, store.DatasetError, ValueError) as e:  # OutputError included
    cli.refuse(str(e))
  except OSError as e:  # the maps could not be written after all (e.g. a full disk)
    cli.refuse(f"{os.path.join(F.workdir, OUT_DIR)}: cannot write: {e.strerror or e}")
  print(f"interpret: relevance maps in {path} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A finished training run.")
  flags.DEFINE_string("split", "val", "Which split's profiles to explain.")
  flags.DEFINE_integer("num_samples", 1000, "Profiles explained (evenly spaced over the split).")
  flags.DEFINE_integer("matrix_samples", 64, "Profiles averaged into the target x landmark "
                       "matrix (one LRP pass per target each).")
  flags.DEFINE_enum("rule", "epsilon", relevance.RULES, "LRP rule for every dense layer.")
  flags.DEFINE_float("eps", 1e-2, "Stabilizer of the epsilon rule.")
  flags.DEFINE_enum("initial", "abs", relevance.INITIAL, "Initial relevance of target t: "
                    "|y_t| (abs) or y_t (signed).")
  flags.DEFINE_integer("sample_clusters", 20, "k-means clusters of samples.")
  flags.DEFINE_integer("target_clusters", 20, "k-means clusters of targets.")
  flags.DEFINE_integer("landmark_groups", 10, "k-means groups of landmarks.")
  flags.DEFINE_integer("seed", 0, "k-means seed.")
  flags.mark_flag_as_required("workdir")
  from lsmtl_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
