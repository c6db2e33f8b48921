"""Writing files so that a reader never sees half of one: every output is
written under a temporary name beside its final path, then renamed.

A temporary name carries the writer's pid (`.NAME.tmp-PID...`), so a later
writer of the same path can tell an abandoned one (its process is gone) from
one being written, and remove it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


class OutputError(ValueError):
  """An output location that cannot take what would be written; the message names it."""


def _temp_prefix(path: str) -> str:
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.tmp-")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_abandoned(path: str) -> list[str]:
  """Removes temporaries of `path` whose writing process no longer exists."""
  removed = []
  for tmp in glob.glob(glob.escape(_temp_prefix(path)) + "*"):
    pid = tmp[len(_temp_prefix(path)):].split(".", 1)[0].split("-", 1)[0]
    if pid.isdigit() and not _alive(int(pid)):
      if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(tmp)
      removed.append(tmp)
  return removed


def check_output_dir(path: str) -> None:
  """Raises OutputError unless a folder can be created or written at `path`:
  it is a folder or can be made one, and a file can be created in it (or in the
  nearest folder above it that exists). Nothing is left behind."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise OutputError(f"{path}: exists and is not a directory")
  ancestor = os.path.abspath(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise OutputError(f"{path}: cannot create it: {ancestor} is not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise OutputError(f"{path}: {ancestor} is not writable")
  probe = f"{_temp_prefix(os.path.join(ancestor, 'probe'))}{os.getpid()}"
  try:
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    raise OutputError(f"{path}: cannot write in {ancestor}: {e.strerror or e}") from None


def check_atomic_dir(final: str) -> None:
  """Raises OutputError, before any work, unless atomic_dir(final) can build
  the folder beside `final` and put it in place: `final` is a folder or absent."""
  if os.path.islink(final) or (os.path.lexists(final) and not os.path.isdir(final)):
    raise OutputError(f"{final}: exists and is not a directory; move it away")
  check_output_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path` (ending in `suffix`, for writers that
  choose a format by extension); on success it replaces `path`, on any error
  it is removed."""
  remove_abandoned(path)
  tmp = f"{_temp_prefix(path)}{os.getpid()}{suffix}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_dir(final: str) -> Iterator[str]:
  """Yields a temporary sibling folder of `final`; on success it replaces
  `final`, on any error it is removed, so a half-written folder is never left."""
  remove_abandoned(final)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(_temp_prefix(final)) + f"{os.getpid()}-",
                         dir=os.path.dirname(os.path.abspath(final)))
  try:
    yield tmp
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_text(path: str, text: str) -> None:
  with atomic_file(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException) -> OSError | None:
  """The 'no space left' (or quota) error behind `error`, if one is: libraries
  that write checkpoints and logs wrap it in their own exceptions, or only
  keep its message."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FULL:
      return error
    if any(os.strerror(code) in str(error) for code in _FULL):
      return error if isinstance(error, OSError) else OSError(errno.ENOSPC, str(error))
    error = error.__cause__ or error.__context__
  return None
