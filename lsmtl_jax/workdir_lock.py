"""One writer per output: an exclusive lock held from a job's start to its end.

A training run, the experiment runner, prepare and predict each take the lock
of what they write (`hold`) before they change anything there; a second
process that would write the same place is refused with one line naming the
holder (pid, host, start time). The lock is `fcntl.flock` on a small file,
WORKDIR/.lock for a folder that exists (`hold`), .NAME.lock beside a file or a
folder made by rename (`hold_beside`: prepare's dataset, predict's output),
holding the holder's record as JSON.

A holder that dies (kill -9, out of memory) loses the lock with it: the kernel
releases a flock when its process ends, so the next run takes it at once. A
holder that ends normally also removes the file. On a filesystem shared by
hosts, a flock is only as good as the filesystem's lock support (NFSv4 shares
them, and releases a lost client's when its lease expires; some mounts keep
flock local to one host). So the holder also touches the file every
HEARTBEAT_S seconds, and a taker that gets the flock but finds a record of a
process on another host whose heartbeat is younger than STALE_S refuses too;
a record from another host older than that (a lost VM) is taken over. On the
same host the flock is trusted alone.

Within one process the lock is re-entrant (a run's nested calls share it);
the fd is not inherited by child processes (Python opens files close-on-exec),
so the experiment runner's children lock their own run folders freely.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

LOCK_NAME = ".lock"
HEARTBEAT_S = 20.0
STALE_S = 120.0  # a foreign record with no heartbeat for this long: its host is gone

_held: dict[str, int] = {}  # lock path -> nesting depth, in this process
_held_guard = threading.Lock()


class LockError(RuntimeError):
  """The output is held by another process; the message is one line naming it."""


def _record(role: str) -> dict:
  now = datetime.datetime.now(datetime.timezone.utc)
  return {"pid": os.getpid(), "host": socket.gethostname(), "role": role,
          "started": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
          "command": " ".join(sys.argv)[:300]}


def _read_record(fd: int) -> dict:
  try:
    data = os.pread(fd, 4096, 0)
    return json.loads(data.decode()) if data.strip() else {}
  except (OSError, ValueError):
    return {}


def _holder_text(record: dict) -> str:
  if not record:
    return "another process (it has not written its record yet)"
  return (f"pid {record.get('pid', '?')} on {record.get('host', '?')} since "
          f"{record.get('started', '?')}")


def _same_inode(fd: int, path: str) -> bool:
  """Whether `path` still names the file open at `fd`: a holder removes its
  file on release, so a taker that opened it just before must open it anew."""
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _open_locked(path: str, what: str) -> int:
  """The lock file's fd with the flock held, or LockError naming the holder."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        os.close(fd)
        raise
      record = {}
      for _ in range(20):  # the holder writes its record just after its flock
        record = _read_record(fd)
        if record:
          break
        time.sleep(0.05)
      os.close(fd)
      raise LockError(f"{what}: in use by {_holder_text(record)} ({path}); wait for it to "
                      "end, or stop it and run again") from None
    if _same_inode(fd, path):
      return fd
    os.close(fd)  # removed by its holder between our open and flock: again


def _check_foreign(fd: int, path: str, what: str) -> None:
  """Refuses a record of a live process on another host (see the module doc)."""
  record = _read_record(fd)
  host = record.get("host")
  if not host or host == socket.gethostname():
    return
  age = time.time() - os.fstat(fd).st_mtime
  if age < STALE_S:
    raise LockError(f"{what}: in use by {_holder_text(record)} ({path}, its heartbeat "
                    f"{age:.0f} s ago; its lock is taken over once that passes "
                    f"{STALE_S:g} s); wait for it to end, or stop it and run again")


class _Heartbeat(threading.Thread):

  def __init__(self, path: str):
    super().__init__(name=f"lock heartbeat {path}", daemon=True)
    self.path, self.stop = path, threading.Event()

  def run(self):
    while not self.stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)


@contextlib.contextmanager
def _hold_file(path: str, what: str, role: str) -> Iterator[str]:
  path = os.path.abspath(path)
  with _held_guard:
    if path in _held:
      _held[path] += 1
      nested = True
    else:
      nested = False
  if nested:
    try:
      yield path
    finally:
      with _held_guard:
        _held[path] -= 1
    return
  fd = _open_locked(path, what)
  try:
    _check_foreign(fd, path, what)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_record(role)) + "\n").encode(), 0)
  except BaseException:
    os.close(fd)
    raise
  heartbeat = _Heartbeat(path)
  heartbeat.start()
  with _held_guard:
    _held[path] = 1
  try:
    yield path
  finally:
    with _held_guard:
      del _held[path]
    heartbeat.stop.set()
    # Removed while still held, so a taker that opened it meanwhile sees a
    # removed file (_same_inode) rather than a free lock on a stale inode.
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)


def role_name(process_index: int = 0) -> str:
  """The lock file of one process of a multi-process job: process 0, the
  writer, holds LOCK_NAME; process k holds LOCK_NAME.process-k."""
  return LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.process-{process_index}"


@contextlib.contextmanager
def hold(workdir: str, process_index: int = 0) -> Iterator[str]:
  """Holds WORKDIR's lock (made if missing, with the workdir) for the block.
  A workdir this call made is removed again if it is left empty."""
  made = []
  top = os.path.abspath(workdir)
  while not os.path.isdir(top):
    made.append(top)
    top = os.path.dirname(top)
  os.makedirs(workdir, exist_ok=True)
  try:
    with _hold_file(os.path.join(workdir, role_name(process_index)), workdir,
                    f"process {process_index}") as path:
      yield path
  finally:
    for folder in made:  # deepest first; a folder with anything in it stays
      with contextlib.suppress(OSError):
        os.rmdir(folder)


@contextlib.contextmanager
def hold_beside(path: str) -> Iterator[str]:
  """Holds the lock of an output that is a file or a folder made by rename
  (.NAME.lock in its folder, which is made if missing)."""
  head, tail = os.path.split(os.path.abspath(path))
  os.makedirs(head, exist_ok=True)
  with _hold_file(os.path.join(head, f".{tail}.lock"), path, "writer") as lock_path:
    yield lock_path
