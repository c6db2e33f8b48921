"""Duplicate-sample removal as D-GEX did it, seeded and out of core.

D-GEX clusters the compendium with MiniBatchKMeans (100 clusters) and, within
each cluster, drops a sample closer than Euclidean 1.0 to an earlier kept one.
Here:

1. Mini-batch k-means streams over row blocks in a seeded random block order,
   initialized by k-means++ on the first block(s); centres move by per-centre
   running means (Sculley 2010, as sklearn's MiniBatchKMeans).
2. One pass assigns every row to its nearest centre and keeps a sketch of it:
   its coordinates in an orthonormal basis Q (the span of the centred centres,
   where most between-sample variance lies, topped up with random directions)
   and the norm of its residual outside Q. For two rows
   ||x - y||^2 >= ||Q'x - Q'y||^2 + (|r_x| - |r_y|)^2, so pairs whose sketch bound
   is already >= the threshold can never be duplicates.
3. The few pairs within a cluster that the bound cannot rule out are checked
   exactly on the full rows (read again in bounded memory), and the greedy
   rule runs in row order on the exact distances. The result equals the brute
   force rule over all pairs within each cluster.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from lsmtl_jax.kmeans import MiniBatchKMeans
from lsmtl_jax.kmeans import assign


def sketch_basis(centres: np.ndarray, dim: int, seed: int) -> np.ndarray:
  """Orthonormal [genes, dim]: the centred centres' span first, random directions after."""
  genes = centres.shape[1]
  dim = min(dim, genes)
  rng = np.random.default_rng([seed, 12])
  spanning = (centres - centres.mean(axis=0)).T[:, :max(0, dim - 1)]
  extra = rng.standard_normal((genes, dim - spanning.shape[1]))
  q, r = np.linalg.qr(np.concatenate([spanning, extra], axis=1))
  # Drop directions QR could not make independent (repeated or zero centres).
  good = np.abs(np.diag(r)) > 1e-9 * max(1.0, np.abs(np.diag(r)).max())
  return q[:, good]


def sketch(x: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  s = x @ basis
  resid = np.sqrt(np.maximum(np.sum(x * x, axis=1) - np.sum(s * s, axis=1), 0.0))
  return s, resid


def candidate_pairs(labels: np.ndarray, sketches: np.ndarray, resid: np.ndarray,
                    threshold: float, tile: int = 2048) -> np.ndarray:
  """Pairs (i, j), j < i, same cluster, whose sketch lower bound is under the threshold.

  `labels` < 0 marks rows that take no part. Rows are global indices.
  """
  out = []
  # Slack for rounding in the bound (its terms come from float64 sums).
  scale = np.max(np.sum(sketches ** 2, axis=1) + resid ** 2) if len(resid) else 0.0
  limit = threshold ** 2 + 1e-9 * max(scale, 1.0) + 1e-9
  for c in np.unique(labels[labels >= 0]):
    members = np.flatnonzero(labels == c)
    if len(members) < 2:
      continue
    s = sketches[members] - sketches[members].mean(axis=0)
    sq = np.sum(s * s, axis=1)
    r = resid[members]
    for a in range(0, len(members), tile):
      sa = s[a:a + tile]
      for b in range(0, a + tile, tile):
        if b >= len(members):
          break
        sb = s[b:b + tile]
        d2 = sq[a:a + tile, None] + sq[None, b:b + tile] - 2.0 * (sa @ sb.T)
        d2 += (r[a:a + tile, None] - r[None, b:b + tile]) ** 2
        ii, jj = np.nonzero(d2 < limit)
        ii, jj = ii + a, jj + b
        keep = jj < ii
        if keep.any():
          out.append(np.stack([members[ii[keep]], members[jj[keep]]], axis=1))
  if not out:
    return np.zeros((0, 2), np.int64)
  return np.concatenate(out).astype(np.int64)


def exact_distances(pairs: np.ndarray, load_rows: Callable[[np.ndarray], np.ndarray],
                    max_rows: int) -> np.ndarray:
  """Euclidean distance of each pair, loading at most 2 * max_rows rows at a time."""
  dist = np.empty(len(pairs))
  if not len(pairs):
    return dist
  rows = np.unique(pairs)
  num_chunks = -(-len(rows) // max(1, max_rows))
  chunks = np.array_split(rows, num_chunks)
  bounds = np.array([c[0] for c in chunks])
  chunk_of = lambda r: np.searchsorted(bounds, r, side="right") - 1  # noqa: E731
  ca, cb = chunk_of(pairs[:, 0]), chunk_of(pairs[:, 1])
  lo, hi = np.minimum(ca, cb), np.maximum(ca, cb)
  for a in range(num_chunks):
    if not np.any(lo == a):
      continue
    xa = load_rows(chunks[a])
    for b in range(a, num_chunks):
      sel = np.flatnonzero((lo == a) & (hi == b))
      if not len(sel):
        continue
      xb = xa if b == a else load_rows(chunks[b])
      # Chunks come from sorted unique rows, so chunk a then chunk b is sorted too.
      both = chunks[a] if b == a else np.concatenate([chunks[a], chunks[b]])
      values = xa if b == a else np.concatenate([xa, xb])
      pos_i = np.searchsorted(both, pairs[sel, 0])
      pos_j = np.searchsorted(both, pairs[sel, 1])
      diff = values[pos_i] - values[pos_j]
      dist[sel] = np.sqrt(np.sum(diff * diff, axis=1))
  return dist


def greedy_keep(num_rows: int, pairs: np.ndarray, dist: np.ndarray, threshold: float,
                eligible: np.ndarray | None = None) -> np.ndarray:
  """Row order greedy: drop a row closer than `threshold` to an earlier kept row."""
  keep = np.ones(num_rows, bool) if eligible is None else eligible.copy()
  close = pairs[dist < threshold]
  if not len(close):
    return keep
  close = close[np.argsort(close[:, 0], kind="stable")]
  i_vals, starts = np.unique(close[:, 0], return_index=True)
  ends = np.append(starts[1:], len(close))
  for i, s, e in zip(i_vals, starts, ends):
    if keep[i] and keep[close[s:e, 1]].any():
      keep[i] = False
  return keep


def brute_force_keep(x: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
  """The rule on all pairs, for tests: O(n^2) memory."""
  keep = np.ones(len(x), bool)
  for i in range(len(x)):
    for j in range(i):
      if keep[j] and labels[j] == labels[i] and np.linalg.norm(x[i] - x[j]) < threshold:
        keep[i] = False
        break
  return keep


def run(blocks: Callable[[Iterable[int] | None], Iterable[tuple[int, np.ndarray]]],
        num_rows: int, eligible: np.ndarray, load_rows: Callable[[np.ndarray], np.ndarray],
        *, num_clusters: int, threshold: float, sketch_dim: int, seed: int,
        max_rows: int, kmeans: MiniBatchKMeans | None = None,
        log: Callable[[str], None] = lambda s: None) -> dict:
  """The whole procedure. `blocks(order)` streams (start, float64 gene block)."""
  if kmeans is None:
    kmeans = MiniBatchKMeans(min(num_clusters, int(eligible.sum())), seed)
    for start, x in blocks(None):
      kmeans.update(x[eligible[start:start + len(x)]])
  centres = kmeans.finish()
  basis = sketch_basis(centres, sketch_dim, seed)
  labels = np.full(num_rows, -1, np.int32)
  sketches = np.zeros((num_rows, basis.shape[1]))
  resid = np.zeros(num_rows)
  for start, x in blocks(None):
    stop = start + len(x)
    labels[start:stop] = assign(x, centres)
    sketches[start:stop], resid[start:stop] = sketch(x, basis)
  labels[~eligible] = -1
  sketches[~eligible], resid[~eligible] = 0.0, 0.0  # (dropped rows may hold NaN)
  log(f"dedup: {len(centres)} clusters, sketch of {basis.shape[1]} dimensions")
  pairs = candidate_pairs(labels, sketches, resid, threshold)
  del sketches
  log(f"dedup: {len(pairs)} candidate pairs to check exactly")
  dist = exact_distances(pairs, load_rows, max_rows)
  keep = greedy_keep(num_rows, pairs, dist, threshold, eligible)
  return {"keep": keep, "labels": labels, "num_candidates": int(len(pairs)),
          "num_close_pairs": int(np.sum(dist < threshold)),
          "num_clusters": int(len(centres))}
