"""Orbax checkpoints of the training state: the latest (to resume) and the best
(by validation MAE, for the final evaluation), each with a JSON record of the
training loop's own state."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=("state", "loop"))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """`latest/` keeps the last two saves; `best/` keeps one."""

  def __init__(self, workdir: str):
    root = os.path.join(workdir, "checkpoints")
    self.latest = _manager(os.path.join(root, "latest"), max_to_keep=2)
    self.best = _manager(os.path.join(root, "best"), max_to_keep=1)
    # Read once, before this run saves anything, so every process agrees on it.
    self._best_steps_before_run = frozenset(self.best.all_steps())

  def _save(self, manager, step: int, state, loop: dict[str, Any]) -> None:
    # Two managers saving the same step at once collide in Orbax's multi-process
    # barriers (named by step): let the other one finish first.
    for other in (self.latest, self.best):
      if other is not manager:
        other.wait_until_finished()
    # The save completes in the background: hand it a snapshot of the record,
    # not the dict the training loop goes on mutating.
    record = json.loads(json.dumps(loop))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(record)), force=True)

  @staticmethod
  def _restore(manager, like_state):
    manager.wait_until_finished()
    step = manager.latest_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like_state)), loop=ocp.args.JsonRestore()))
    return restored.state, dict(restored.loop)

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

  def close(self) -> None:
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      manager.close()
