"""k-means, one implementation for the package's numpy uses: k-means++
initialization, full-batch Lloyd iterations (relevance maps' clusters) and
streaming mini-batch k-means (duplicate removal in prepare).

Deep-CNMTL's clustering of head columns runs inside the jitted train step and
so has its own JAX version (methods/mtl.py, deterministic farthest-point start).
"""

from __future__ import annotations

import numpy as np


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  centres = np.empty((k, x.shape[1]))
  centres[0] = x[rng.integers(len(x))]
  d2 = np.sum((x - centres[0]) ** 2, axis=1)
  for c in range(1, k):
    total = d2.sum()
    pick = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=d2 / total)
    centres[c] = x[pick]
    d2 = np.minimum(d2, np.sum((x - centres[c]) ** 2, axis=1))
  return centres


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  d2 = (np.sum(centres ** 2, axis=1)[None, :] - 2.0 * (x @ centres.T))
  return np.argmin(d2, axis=1).astype(np.int32)


class MiniBatchKMeans:
  """Streaming mini-batch k-means; feed row blocks with `update`."""

  def __init__(self, num_clusters: int, seed: int):
    self.k = num_clusters
    self.rng = np.random.default_rng([seed, 11])
    self.centres: np.ndarray | None = None
    self.counts = np.zeros(num_clusters)
    self._pending: list[np.ndarray] = []

  def update(self, x: np.ndarray) -> None:
    if self.centres is None:
      # Initialize once enough rows have been seen for k-means++ to pick from.
      self._pending.append(x)
      if sum(len(p) for p in self._pending) < 4 * self.k:
        return
      x = np.concatenate(self._pending)
      self._pending = []
      self.centres = kmeans_plus_plus(x, self.k, self.rng)
    labels = assign(x, self.centres)
    n_c = np.bincount(labels, minlength=self.k).astype(np.float64)
    onehot = np.zeros((len(x), self.k))
    onehot[np.arange(len(x)), labels] = 1.0
    sums = onehot.T @ x
    seen = n_c > 0
    total = self.counts + n_c
    self.centres[seen] = ((self.centres[seen] * self.counts[seen, None] + sums[seen])
                          / total[seen, None])
    self.counts = total

  def restrict(self, columns: np.ndarray) -> None:
    """Keeps only these feature columns (genes dropped after the k-means pass)."""
    if self.centres is not None:
      self.centres = self.centres[:, columns]
    self._pending = [p[:, columns] for p in self._pending]

  def finish(self) -> np.ndarray:
    if self.centres is None:  # fewer rows than 4k: plain k-means++ on all of them
      x = np.concatenate(self._pending)
      self._pending = []
      self.centres = kmeans_plus_plus(x, min(self.k, len(x)), self.rng)
      self.k = len(self.centres)
    return self.centres


def kmeans(data: np.ndarray, k: int, seed: int = 0, iterations: int = 100,
           ) -> tuple[np.ndarray, np.ndarray]:
  """(labels [n], centres [k, d]) of float64 k-means; the same seed gives the same result.

  Clusters are numbered by decreasing size (ties by first member), so labels do
  not depend on the initialization's order. k is capped at the number of rows.
  """
  data = np.asarray(data, np.float64)
  n = len(data)
  k = max(1, min(k, n))
  centres = kmeans_plus_plus(data, k, np.random.default_rng([seed, 11]))
  labels = np.full(n, -1)
  for _ in range(iterations):
    dist = (np.square(data).sum(1)[:, None] - 2 * data @ centres.T
            + np.square(centres).sum(1)[None])
    new = np.argmin(dist, axis=1)
    for c in range(k):  # an emptied cluster takes the point farthest from its centre
      if not (new == c).any():
        far = int(np.argmax(dist[np.arange(n), new]))
        new[far] = c
    if np.array_equal(new, labels):
      break
    labels = new
    for c in range(k):
      centres[c] = data[labels == c].mean(0)
  sizes = np.bincount(labels, minlength=k)
  first = np.array([np.flatnonzero(labels == c)[0] for c in range(k)])
  order = np.lexsort((first, -sizes))  # new cluster i is old cluster order[i]
  rename = np.empty(k, np.int64)
  rename[order] = np.arange(k)
  return rename[labels], centres[order]
