"""pipeline: the reader and writer threads predict streams through. Order,
errors (the same exception object, in the caller's thread), stopping, and
when a written item may be reused; no timing."""

import os
import platform
import subprocess
import sys
import textwrap
import threading

import pytest

from lsmtl_jax import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Boom(Exception):
  pass


def test_the_reader_keeps_order_and_raises_the_generators_error():
  def items():
    yield from range(5)
    raise error

  error = Boom("block 5 unreadable")
  reader = pipeline.Reader(items(), depth=2)
  got = []
  with pytest.raises(Boom) as e:
    for x in reader:
      got.append(x)
  reader.close()
  assert got == [0, 1, 2, 3, 4] and e.value is error


def test_closing_the_reader_stops_its_generator():
  closed = threading.Event()

  def items():
    try:
      for i in range(10**9):
        yield i
    finally:
      closed.set()

  reader = pipeline.Reader(items(), depth=2)
  assert next(iter(reader)) == 0
  reader.close()
  assert closed.is_set()


def test_the_writer_consumes_in_order_and_recycles_only_what_it_is_done_with():
  recycled, seen = [], []

  def consume(items):
    for x in items:
      assert x not in recycled  # still in use
      seen.append((x, list(recycled)))
    return "done"

  writer = pipeline.Writer(consume, depth=1, recycle=recycled.append)
  for x in range(6):
    writer.put(x)
  assert writer.finish() == "done"
  assert [x for x, _ in seen] == list(range(6))
  for x, before in seen:  # when x was handed to consume, everything before it was back
    assert before == list(range(x))
  assert recycled == list(range(6))


def test_a_writers_error_reaches_the_caller_as_is():
  error = Boom("disk full")

  def consume(items):
    for x in items:
      if x == 2:
        raise error

  writer = pipeline.Writer(consume, depth=1)
  with pytest.raises(Boom) as e:
    for x in range(100):  # the queue fills once the writer is gone
      writer.put(x)
    writer.finish()
  assert e.value is error


def test_abort_stops_consume_inside_so_it_can_clean_up():
  cleaned = threading.Event()

  def consume(items):
    try:
      for _ in items:
        pass
    except pipeline.Stopped:
      cleaned.set()
      raise

  writer = pipeline.Writer(consume, depth=1)
  writer.put(1)
  writer.abort()
  assert cleaned.is_set() and writer.error is None


_MAPPED_BYTES = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    import numpy as np
    from lsmtl_jax import pipeline
    class Info(ctypes.Structure):  # glibc's struct mallinfo2
      _fields_ = [(n, ctypes.c_size_t) for n in (
          "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()]
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = Info
    if sys.argv[1] == "fixed":
      assert pipeline.fixed_mmap_threshold()
    a = np.ones(8 << 20, np.uint8); del a  # freeing 8 MB raises glibc's dynamic threshold
    before = libc.mallinfo2().hblkhd
    b = np.ones(4 << 20, np.uint8)
    print(libc.mallinfo2().hblkhd - before)
    """)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_fixed_mmap_threshold_keeps_large_blocks_out_of_the_heap():
  # After a large free, glibc serves a 4 MB block from its heap (kept when freed:
  # peak RSS grew with the profiles predict streamed); with the fixed threshold the
  # block is its own mapping, returned to the system when freed.
  def mapped(mode):
    proc = subprocess.run([sys.executable, "-c", _MAPPED_BYTES, mode], capture_output=True,
                          text=True, cwd=REPO, check=True)
    return int(proc.stdout.strip())
  assert mapped("dynamic") == 0
  assert mapped("fixed") >= 4 << 20


@pytest.mark.parametrize("write_behind", [1, 2])
def test_a_slow_writer_holds_at_most_write_behind_plus_two_blocks(write_behind):
  # The memory a stream holds: blocks taken from Buffers come back once written,
  # so however many blocks stream, at most write_behind queued + one being
  # written + one being computed are ever made (predict's peak RSS bound).
  import time  # pylint: disable=g-import-not-at-top
  buffers = pipeline.Buffers()
  written = []

  def consume(items):
    for block in items:
      time.sleep(0.002)  # slower than the compute: the queue stays full
      written.append(int(block[0, 0]))

  def compute(i):
    out = buffers.take("out", 4, 3)
    out[...] = i
    return {"out": out}

  pipeline.stream(range(60), compute, {"out": consume}, read_ahead=2,
                  write_behind=write_behind, recycle=buffers.give)
  assert written == list(range(60))
  assert buffers.allocated == {"out": write_behind + 2}
