"""Threads that overlap reading, computing and writing a stream of row blocks.

predict streams files of any number of profiles (`stream`): a `Reader` thread
reads the next blocks while the caller computes the current one, and one
`Writer` thread per output file writes the blocks the caller has finished,
handing them back (`Buffers`) for reuse. The queues between them are bounded,
so a few blocks are held whatever the number of rows, and a stage that runs
ahead waits for the slow one.

The stages overlap because h5py and XLA release the GIL during their heavy
work (chunk I/O, matrix products). h5py still makes one HDF5 call at a time
across the process, so reads and writes of HDF5 files take turns with each
other; they overlap the compute, not one another.

An error in any stage stops the others and reaches the caller as the same
exception object, raised in the caller's thread. Each stage counts its busy
seconds (time not spent waiting on a queue), and the caller's waits are
counted too, so a run can tell which stage bounds its speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

_POLL_S = 0.05  # how often a blocked stage looks whether another one failed
_END = object()  # the stream's end, sent after its last item


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20


def fixed_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
  """Makes glibc serve every allocation of `threshold` bytes or more with its
  own mapping, returned to the system when freed; True where it applied.

  glibc raises its threshold up to 32 MB as large blocks are freed, and from
  then on the blocks the stages allocate come from per-thread heaps that keep
  freed memory, so peak RSS grew with the profiles streamed (LINCS-shaped input,
  --intervals: 1.44 GB at 16,384 profiles, 2.43 GB at 100,000; with a fixed 1 MB
  threshold 1.39 and 1.60 GB). A process-wide setting: entry points call it."""
  name = ctypes.util.find_library("c")
  if not name:
    return False
  try:
    libc = ctypes.CDLL(name)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
  except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
    return False


class Stopped(Exception):
  """Raised inside a stage that must stop because another one failed."""


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def _put(q: queue.Queue, item, stop: threading.Event, failed: Callable[[], bool]) -> None:
  while True:
    if stop.is_set() or failed():
      raise Stopped()
    try:
      q.put(item, timeout=_POLL_S)
      return
    except queue.Full:
      pass


def _get(q: queue.Queue, stop: threading.Event, failed: Callable[[], bool]):
  while True:
    try:
      return q.get(timeout=_POLL_S)
    except queue.Empty:
      if stop.is_set() or failed():
        raise Stopped() from None


class Reader:
  """Iterates over `items` (a generator doing the reading) in a thread, up to
  `depth` items ahead of the caller."""

  def __init__(self, items: Iterable[Any], depth: int = 2, name: str = "reader"):
    self.busy = 0.0  # seconds spent producing items
    self.waited = 0.0  # seconds the caller waited for the next item
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(iter(items),), name=name,
                                    daemon=True)
    self._thread.start()

  def _run(self, items: Iterator[Any]) -> None:
    never = lambda: False  # pylint: disable=unnecessary-lambda-assignment
    try:
      while True:
        t = time.perf_counter()
        try:
          item = next(items)
        except StopIteration:
          item = _END
        finally:
          self.busy += time.perf_counter() - t
        _put(self._queue, item, self._stop, never)
        if item is _END:
          return
    except Stopped:
      pass
    except BaseException as e:  # pylint: disable=broad-except
      try:
        _put(self._queue, _Failure(e), self._stop, never)
      except Stopped:
        pass
    finally:
      close = getattr(items, "close", None)
      if close is not None:
        close()

  def __iter__(self) -> Iterator[Any]:
    while True:
      t = time.perf_counter()
      item = _get(self._queue, self._stop, lambda: not self._thread.is_alive()
                  and self._queue.empty())
      self.waited += time.perf_counter() - t
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item

  def close(self) -> None:
    """Stops the thread (if it still runs) and waits for it."""
    self._stop.set()
    self._thread.join()


class Writer:
  """Runs `consume(items)` in a thread, where `items` yields what the caller
  `put`, up to `depth` items behind it. `consume` returns when the items end
  (`finish`); `abort` makes `items` raise `Stopped` inside it instead, so it
  can clean up what it wrote.

  With `recycle`, each item is passed to it once `consume` asks for the next
  one, for a `consume` that keeps no item: the caller can reuse the memory.
  """

  def __init__(self, consume: Callable[[Iterator[Any]], Any], depth: int = 1,
               name: str = "writer", recycle: Callable[[Any], None] | None = None):
    self.busy = 0.0  # seconds in `consume` not spent waiting for items
    self.waited = 0.0  # seconds the caller waited to hand over an item
    self.error: BaseException | None = None
    self.result: Any = None
    self._recycle = recycle
    self._idle = 0.0
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(consume,), name=name, daemon=True)
    self._thread.start()

  def _items(self) -> Iterator[Any]:
    while True:
      t = time.perf_counter()
      try:
        item = _get(self._queue, self._stop, lambda: False)
      finally:
        self._idle += time.perf_counter() - t
      if item is _END:
        return
      yield item
      if self._recycle is not None:  # asked for the next: done with this one
        self._recycle(item)

  def _run(self, consume) -> None:
    t = time.perf_counter()
    try:
      self.result = consume(self._items())
    except Stopped:
      pass
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e
    finally:
      self.busy = time.perf_counter() - t - self._idle

  def _failed(self) -> bool:
    return not self._thread.is_alive()

  def put(self, item: Any) -> None:
    """Hands `item` over; raises the writer's error if it failed."""
    t = time.perf_counter()
    try:
      _put(self._queue, item, self._stop, self._failed)
    except Stopped:
      self._thread.join()
      if self.error is not None:
        raise self.error from None
      raise RuntimeError(f"{self._thread.name} ended before its input did") from None
    finally:
      self.waited += time.perf_counter() - t

  def check(self) -> None:
    """Raises the writer's error now if it failed."""
    if self._failed():
      self._thread.join()
      if self.error is not None:
        raise self.error

  def finish(self) -> Any:
    """Ends the items, waits for `consume` and returns its result (or raises its error)."""
    self.put(_END)
    self._thread.join()
    if self.error is not None:
      raise self.error
    return self.result

  def abort(self) -> None:
    """Stops `consume` (Stopped inside it) and waits for it; its error, if any, is kept."""
    self._stop.set()
    self._thread.join()


def stream(blocks: Iterable[Any], compute: Callable[[Any], dict[str, Any]],
           consumers: dict[str, Callable[[Iterator[Any]], Any]], read_ahead: int = 2,
           write_behind: int = 1, recycle: Callable[[str, Any], None] | None = None
           ) -> dict[str, float]:
  """Reads `blocks` in a `Reader`, computes each in this thread into one item
  per consumer ({name: item}), and feeds each consumer in its own `Writer`;
  `recycle(name, item)` gets each item back once its consumer is done with it.
  Returns the wall seconds, each stage's busy seconds and this thread's waits.
  On any error every thread is stopped and the error raised here."""
  t0 = time.perf_counter()
  reader, writers, compute_s = None, {}, 0.0
  try:
    for name, consume in consumers.items():
      back = (lambda item, name=name: recycle(name, item)) if recycle else None
      writers[name] = Writer(consume, write_behind, name=f"write {name}", recycle=back)
    reader = Reader(blocks, read_ahead, name="read")
    for block in reader:
      for w in writers.values():  # a failed writer stops the run before more work
        w.check()
      t = time.perf_counter()
      out = compute(block)
      compute_s += time.perf_counter() - t
      for name, w in writers.items():
        w.put(out[name])
      del out
    for w in writers.values():
      w.finish()
  except BaseException:
    if reader is not None:
      reader.close()
    for w in writers.values():
      w.abort()
    raise
  reader.close()
  return {"wall": time.perf_counter() - t0, "read": reader.busy, "compute": compute_s,
          "write": sum(w.busy for w in writers.values()),
          "waited_for_read": reader.waited,
          "waited_for_write": sum(w.waited for w in writers.values())}


class Buffers:
  """Arrays handed back by the writers once written, for the next blocks:
  at LINCS scale a fresh 200 MB output block costs more to fault in than to
  fill (measured: the host work of a block halved). As many per name exist
  as are ever in flight at once."""

  def __init__(self):
    self._free: dict[str, list[np.ndarray]] = {}
    self._lock = threading.Lock()
    self.allocated: dict[str, int] = {}  # arrays made per name: the memory the stream holds

  def take(self, name: str, rows: int, cols: int, dtype=np.float32) -> np.ndarray:
    """A [rows, cols] array, reused where one is free (its contents undefined)."""
    with self._lock:
      free = self._free.setdefault(name, [])
      for i, buf in enumerate(free):
        if buf.shape[0] >= rows and buf.shape[1] == cols and buf.dtype == dtype:
          return free.pop(i)[:rows]
      self.allocated[name] = self.allocated.get(name, 0) + 1
    return np.empty((rows, cols), dtype)[:rows]

  def give(self, name: str, block: np.ndarray) -> None:
    with self._lock:
      self._free.setdefault(name, []).append(block.base if block.base is not None else block)
