"""Orbax checkpoints of a run: student parameters, optimizer state, step, RNG, data position.

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save resumes from the last complete one. A
checkpoint that exists but cannot be read (a damaged file) is skipped with a
warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores ``{"params", "opt_state"}`` pytrees plus JSON metadata."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    if "://" not in directory:
      directory = os.path.abspath(directory)  # Orbax takes absolute paths only.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(directory, options=options)
    self.directory = directory

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], *, force=False) -> bool:
    """Saves at ``step`` if due (or ``force``); returns whether it saved."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )

  def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict, dict]:
    """``(state, meta)`` of the checkpoint at ``step``; arrays take ``abstract_state``'s shardings."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[int, dict, dict] | None:
    """``(step, state, meta)`` of the newest readable checkpoint, or None if there is none.

    Args:
      abstract_state: the state's pytree of ``jax.ShapeDtypeStruct`` with shardings;
        the restored arrays take those shardings.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back.
        older = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "starting fresh"
        log.warning("checkpoint at step %d in %s is unreadable (%s: %s); %s.", step,
                    self.directory, type(e).__name__, str(e).splitlines()[0][:200], older)
        continue
      return step, state, meta
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree) -> Any:
  """``ShapeDtypeStruct``s (with shardings) of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
