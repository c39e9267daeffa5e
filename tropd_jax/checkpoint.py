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
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores ``{"params", "opt_state"}`` pytrees plus JSON metadata."""

  def __init__(self, directory: str, *, every: int = 1, keep: int = 1, async_save: bool = True,
               read_only: bool = False):
    """Opens (and creates) ``directory``; ``read_only``: never creates, saves or deletes.

    (Orbax's own ``read_only`` option warns on every use; without saves nothing is deleted.)
    """
    if "://" not in directory:
      directory = os.path.abspath(directory)  # Orbax takes absolute paths only.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every,
        max_to_keep=None if read_only else keep,
        enable_async_checkpointing=async_save,
        create=not read_only,
    )
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(directory, options=options)
    self.directory = directory

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], *, force=False) -> bool:
    """Saves at ``step`` if due (or ``force``); returns whether it saved."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only; it takes no new checkpoint.")
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

  def restore_params(self, step: int, abstract_params: dict[str, Any], *,
                     host: bool = False) -> dict[str, Any]:
    """The student parameters of the checkpoint at ``step``, without its optimizer state.

    An orbax partial restore: only the arrays named in ``abstract_params`` are read, so the
    optimizer state (twice the parameters under AdamW) is never loaded.

    Args:
      step: the checkpoint's step.
      abstract_params: nested dicts of ``jax.ShapeDtypeStruct`` under string keys, as the
        ``params`` subtree is saved (``{"blocks": {"0": {"attn": {...}}}}``), or any part of it.
        A dtype other than the saved one is cast on the host as the array is read.
      host: read whole arrays into this process's host memory as NumPy arrays (no device, no
        collective); otherwise each device reads its shard of ``abstract_params``' shardings.

    Returns:
      ``abstract_params``' structure holding the arrays.
    """
    item = {"params": abstract_params}
    if host:
      restore_args = jax.tree.map(
          lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), item)
    else:
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))
    return restored["state"]["params"]

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
