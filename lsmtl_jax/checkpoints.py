"""Orbax checkpoints of the training state: the latest (to resume) and the best
(by validation MAE, for the final evaluation), each with a JSON record of the
training loop's own state."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from lsmtl_jax import fileio


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be read; the message says why."""


# Orbax checks the shard index but not the data: a flipped bit in a parameter
# would restore silently. Each finished save gets a CRC32 manifest of its files.
CHECKSUMS_NAME = "lsmtl_checksums.json"


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: str):
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != CHECKSUMS_NAME:
        yield rel, path


def _write_checksums(step_dir: str) -> None:
  manifest = {rel: [os.path.getsize(path), _crc32(path)] for rel, path in _files(step_dir)}
  fileio.write_json(os.path.join(step_dir, CHECKSUMS_NAME), manifest)


def _verify_checksums(step_dir: str) -> None:
  """Raises CheckpointError naming the first damaged file; no manifest, no check."""
  path = os.path.join(step_dir, CHECKSUMS_NAME)
  if not os.path.exists(path):
    return
  with open(path) as f:
    manifest = json.load(f)
  for rel, (size, crc) in sorted(manifest.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CheckpointError(f"{rel} is missing")
    if os.path.getsize(full) != size:
      raise CheckpointError(f"{rel} has {os.path.getsize(full)} bytes, {size} were written")
    if _crc32(full) != crc:
      raise CheckpointError(f"{rel} fails its CRC32 check")


def best_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints", "best"))


def read_best(workdir: str, abstract_variables) -> tuple[Any, int]:
  """(variables, step) of the newest readable best save, for using a finished
  run: read only (nothing is created, moved or sealed), CRC-checked like a
  restore for training, a damaged save skipped for the one before it.
  `abstract_variables` are ShapeDtypeStructs (with the shardings wanted)."""
  manager = ocp.CheckpointManager(best_dir(workdir),
                                  options=ocp.CheckpointManagerOptions(create=False),
                                  item_names=("state", "loop"))
  problems = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      _verify_checksums(os.path.join(best_dir(workdir), str(step)))
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_variables)))
    except Exception as e:  # pylint: disable=broad-except  (any damage: fall back)
      problems.append(f"{step}: {type(e).__name__}: {_first_line(e)}")
      if "not compatible with the stored shape" in str(e):
        break  # another config's model: every earlier save has the same shapes
      logging.warning("Best checkpoint %s/%d unreadable (%s); trying the one before it",
                      best_dir(workdir), step, _first_line(e))
      continue
    manager.close()
    return restored.state, step
  # Not closed after a failed restore: Orbax's reads still in flight would meet
  # a closed event loop and print tracebacks after the caller's one error line.
  raise CheckpointError(f"{best_dir(workdir)}: no readable checkpoint ("
                        + ("; ".join(problems) or "none saved") + ")")


def latest_record(workdir: str) -> dict[str, Any] | None:
  """The loop record of the newest latest save that has one, read only (nothing
  is created, moved or sealed), for the checks before a run writes anything;
  None for a workdir without saves."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints", "latest"))
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory,
                                  options=ocp.CheckpointManagerOptions(create=False),
                                  item_names=("state", "loop"))
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return dict(manager.restore(step, args=ocp.args.Composite(
            loop=ocp.args.JsonRestore())).loop)
      except Exception:  # pylint: disable=broad-except  (restoring reports the damage)
        continue
  finally:
    manager.close()
  return None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:200] if text else ""


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=("state", "loop"))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """`latest/` and `best/` keep two saves each, so a damaged newest one has a
  fallback. Orbax writes each save under a temporary name and renames it when
  complete, so a killed save is never taken for a checkpoint."""

  def __init__(self, workdir: str):
    self.root = root = os.path.join(workdir, "checkpoints")
    self.latest = _manager(os.path.join(root, "latest"), max_to_keep=2)
    self.best = _manager(os.path.join(root, "best"), max_to_keep=2)
    # Read once, before this run saves anything, so every process agrees on it.
    self._best_steps_before_run = frozenset(self.best.all_steps())

  def _save(self, manager, step: int, state, loop: dict[str, Any]) -> None:
    # Two managers saving the same step at once collide in Orbax's multi-process
    # barriers (named by step): let the other one finish first.
    for other in (self.latest, self.best):
      if other is not manager:
        other.wait_until_finished()
    manager.wait_until_finished()
    self._seal(manager)
    # The save completes in the background: hand it a snapshot of the record,
    # not the dict the training loop goes on mutating.
    record = json.loads(json.dumps(loop))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(record)), force=True)

  def _restore(self, manager, like_state):
    """The newest readable save: a damaged one is reported and skipped."""
    manager.wait_until_finished()
    problems, damaged = [], []
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        _verify_checksums(os.path.join(str(manager.directory), str(step)))
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like_state)),
            loop=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any damage: fall back)
        problem = f"{manager.directory}/{step}: unreadable ({type(e).__name__}: {_first_line(e)})"
        problems.append(problem)
        damaged.append(step)
        logging.warning("Checkpoint %s; trying the one before it", problem)
        continue
      if problems:
        logging.warning("Restored the earlier checkpoint %s/%d instead", manager.directory, step)
        self._set_aside(manager, damaged)
      return restored.state, dict(restored.loop)
    if problems:
      raise CheckpointError(f"no readable checkpoint in {manager.directory}: "
                            + "; ".join(problems))
    return None

  def _set_aside(self, manager, steps) -> None:
    """Moves damaged saves out of the manager's way (kept for inspection), so
    the replayed steps can be saved again under the same numbers."""
    if jax.process_index() == 0:
      aside = os.path.join(self.root, "damaged")
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        src = os.path.join(str(manager.directory), str(step))
        dst = os.path.join(aside, f"{os.path.basename(str(manager.directory))}-{step}-{os.getpid()}")
        os.rename(src, dst)
        logging.warning("Moved the damaged checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    manager.reload()

  def latest_record(self) -> dict[str, Any] | None:
    """The loop record of the newest save that has one, without touching the state."""
    self.latest.wait_until_finished()
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        return dict(self.latest.restore(step, args=ocp.args.Composite(
            loop=ocp.args.JsonRestore())).loop)
      except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
        continue
    return None

  def save_latest(self, step, state, loop) -> None:
    self._save(self.latest, step, state, loop)

  def save_best(self, step, variables, record) -> None:
    # A run resumed from an older latest checkpoint replays the same steps and
    # may reach a best step already on disk: that save holds the same values.
    if step in self._best_steps_before_run:
      return
    self._save(self.best, step, variables, record)

  def restore_latest(self, like_state):
    """(state, loop record) of the newest save, or None for a fresh workdir."""
    return self._restore(self.latest, like_state)

  def restore_best(self, like_state):
    return self._restore(self.best, like_state)

  def _seal(self, manager) -> None:
    """Writes a checksum manifest into every finished save that lacks one."""
    if jax.process_index() != 0:
      return
    for step in manager.all_steps():
      step_dir = os.path.join(str(manager.directory), str(step))
      if not os.path.exists(os.path.join(step_dir, CHECKSUMS_NAME)):
        _write_checksums(step_dir)

  def wait(self) -> None:
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      self._seal(manager)

  def close(self) -> None:
    self.wait()
    for manager in (self.latest, self.best):
      manager.close()
