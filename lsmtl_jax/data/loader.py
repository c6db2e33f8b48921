"""Batches read straight from the dataset's TensorStore, prefetched in the background.

Training order is a function of (seed, step) alone: step s lies in epoch
s // steps_per_epoch, whose permutation is drawn from (seed, epoch). A resumed
run therefore sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterator

import numpy as np

from lsmtl_jax.data.store import Dataset

Batch = dict[str, np.ndarray]


def _split_columns(rows: np.ndarray, num_landmarks: int) -> Batch:
  return {"x": rows[:, :num_landmarks], "y": rows[:, num_landmarks:]}


class TrainOrder:
  """Which dataset rows make up the batch of a given step."""

  def __init__(self, indices: np.ndarray, batch_size: int, seed: int):
    if batch_size > len(indices):
      raise ValueError(f"batch size {batch_size} exceeds the {len(indices)} training samples")
    self.indices = np.asarray(indices)
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = len(indices) // batch_size  # the ragged tail is dropped
    self._cached_epoch, self._cached_perm = -1, None

  def positions(self, step: int) -> np.ndarray:
    """Positions into `indices` of step's batch (what a device-resident matrix
    of the rows `indices` is gathered at)."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    if epoch != self._cached_epoch:
      self._cached_perm = np.random.default_rng([self.seed, 3, epoch]).permutation(
          len(self.indices))
      self._cached_epoch = epoch
    return self._cached_perm[pos * self.batch_size:(pos + 1) * self.batch_size]

  def rows(self, step: int) -> np.ndarray:
    return self.indices[self.positions(step)]


def _prefetch(dataset: Dataset, row_batches: Iterator[np.ndarray], depth: int,
              make_batch) -> Iterator[Batch]:
  """Keeps `depth` reads in flight on a background thread; yields in order."""
  out: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def work():
    pending = collections.deque()
    try:
      for rows in row_batches:
        pending.append((rows, dataset.read_rows_async(rows)))
        if len(pending) >= depth:
          r, fut = pending.popleft()
          _put(make_batch(r, fut.result()))
      while pending:
        r, fut = pending.popleft()
        _put(make_batch(r, fut.result()))
      _put(done)
    except BaseException as e:  # surfaced in the consumer thread
      _put(e)

  def _put(item):
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def train_batches(dataset: Dataset, order: TrainOrder, start_step: int, num_steps: int,
                  prefetch: int = 4, local: slice = slice(None)) -> Iterator[Batch]:
  """Batches for steps start_step .. num_steps - 1.

  `local` picks this process's rows of each global batch: a process reads only
  what its devices hold.
  """
  rows = (order.rows(s)[local] for s in range(start_step, num_steps))
  lm = dataset.num_landmarks
  return _prefetch(dataset, rows, prefetch, lambda r, values: _split_columns(values, lm))


def eval_batches(dataset: Dataset, indices: np.ndarray, batch_size: int,
                 prefetch: int = 4, local: slice = slice(None)) -> Iterator[Batch]:
  """The whole split in order; the last batch is padded and carries weight 0 on pads.

  Fixed batch shapes keep the compiled eval step to one program. `local` picks
  this process's rows of each global batch.
  """
  indices = np.asarray(indices)
  lm = dataset.num_landmarks

  def row_batches():
    for start in range(0, len(indices), batch_size):
      rows = indices[start:start + batch_size]
      weight = (np.arange(batch_size) < len(rows)).astype(np.float32)
      rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])
      yield rows[local], weight[local]

  weights = collections.deque()

  def rows_only():
    for rows, weight in row_batches():
      weights.append(weight)
      yield rows

  def make(rows, values):
    batch = _split_columns(values, lm)
    batch["weight"] = weights.popleft()
    return batch

  return _prefetch(dataset, rows_only(), prefetch, make)
