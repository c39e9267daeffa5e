"""Orbax checkpoints of a run: student parameters, optimizer state, step, RNG, data position.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save resumes from the last complete one. ``Checkpointer.restore_newest_good`` tells
three cases apart:

  damaged      a checkpoint whose files are missing or unreadable: skipped for the one before,
               with a warning naming it; the trainer moves it aside to ``<step>.damaged`` so
               that the resumed run can save that step again (the bytes stay on disk).
  mismatch     a readable checkpoint whose arrays (names, shapes, dtypes) are not the ones of
               the state asked for (another model or optimizer): a ``CheckpointMismatchError``,
               never a fallback, since every older checkpoint of the run would mismatch too.
  none good    checkpoints exist but none restores: a ``NoGoodCheckpointError``, never a
               fresh start over them.

A run therefore only writes into a checkpoint directory it restored from (or one that held no
checkpoint): no checkpoint is replaced or deleted by a run that did not resume from it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import fsspec
import jax
import numpy as np
import orbax.checkpoint as ocp

from tropd_jax.cli import UserError, one_line

log = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"


class CheckpointMismatchError(UserError):
  """A readable checkpoint holds another state than the run builds (a structure mismatch)."""


class NoGoodCheckpointError(UserError):
  """Checkpoints exist, but none of them can be restored."""


def _path_name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _flat(tree) -> dict[tuple, Any]:
  return ocp.tree.to_flat_dict(tree)


def structure_differences(saved_tree, abstract_tree, limit: int = 4) -> list[str]:
  """How a checkpoint's array tree differs from ``abstract_tree`` (empty: it restores into it).

  Only the top-level entries of ``abstract_tree`` are compared, each in full, so a partial tree
  (``{"params": ...}``) matches a checkpoint that also holds the optimizer state.

  Args:
    saved_tree: the checkpoint's tree of array metadata (``shape``, ``dtype``).
    abstract_tree: the wanted tree of ``jax.ShapeDtypeStruct``s.
    limit: at most this many differences are described; a count of the rest follows.
  """
  saved, wanted = _flat(saved_tree), _flat(abstract_tree)
  tops = {path[0] for path in wanted}
  saved = {path: m for path, m in saved.items() if path[0] in tops}
  out = []
  for path in sorted(set(saved) | set(wanted), key=_path_name):
    if path not in wanted:
      out.append(f"{_path_name(path)} is only in the checkpoint")
    elif path not in saved:
      out.append(f"{_path_name(path)} is not in the checkpoint")
    else:
      s, w = saved[path], wanted[path]
      s_shape, w_shape = tuple(getattr(s, "shape", ())), tuple(w.shape)
      s_dtype = np.dtype(s.dtype) if getattr(s, "dtype", None) is not None else None
      if s_shape != w_shape or (s_dtype is not None and s_dtype != np.dtype(w.dtype)):
        out.append(f"{_path_name(path)} is {s_dtype}{list(s_shape)} in the checkpoint, "
                   f"{np.dtype(w.dtype)}{list(w_shape)} in this run")
  if len(out) > limit:
    out = out[:limit] + [f"{len(out) - limit} more"]
  return out


def _all_processes(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (the same answer everywhere)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.asarray(flags).min())


def _first_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {one_line(str(e))[:200]}"


class Checkpointer:
  """Saves and restores ``{"params", "opt_state", "step"}`` pytrees plus JSON metadata."""

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
    self.manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    self.directory = directory

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], *, force=False) -> bool:
    """Saves at ``step`` if due (or ``force``); returns whether it saved."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only; it takes no new checkpoint.")
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints, oldest first (moved-aside ones are not listed)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict, dict]:
    """``(state, meta)`` of the checkpoint at ``step``; arrays take ``abstract_state``'s shardings.

    ``abstract_state`` may hold a part of the saved top-level entries (e.g. only ``params``);
    only that part is read.
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args,
                                         partial_restore=True),
            meta=ocp.args.JsonRestore()),
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

  def _saved_tree(self, step: int):
    """The checkpoint's tree of array metadata; raises if it cannot be read."""
    metadata = self.manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    if not tree:
      raise ValueError("its array metadata cannot be read")
    return tree

  def restore_newest_good(
      self, abstract_tree: dict[str, Any], *, step: int | None = None, set_aside: bool = False,
  ) -> tuple[int, dict, dict] | None:
    """``(step, tree, meta)`` of the newest checkpoint that restores into ``abstract_tree``.

    Newer damaged checkpoints are skipped with a warning naming each (see the module doc).

    Args:
      abstract_tree: ``jax.ShapeDtypeStruct``s (with shardings) of the wanted state, e.g.
        ``{"params", "opt_state", "step"}`` to resume, or only ``{"params": ...}`` to export;
        the restored arrays take these shardings.
      step: restore exactly this step (no fallback); None: the newest good one.
      set_aside: move each damaged checkpoint newer than the restored one to
        ``<step>.damaged`` (the trainer, which will save those steps again; export and evaluate
        only read). Process 0 moves them; every process waits for it.

    Returns:
      None when the directory holds no checkpoint (with ``step`` None).

    Raises:
      CheckpointMismatchError: the newest readable checkpoint holds other arrays.
      NoGoodCheckpointError: checkpoints exist, but none restores (or ``step`` does not).
    """
    steps = self.steps()
    if step is not None:
      if step not in steps:
        raise NoGoodCheckpointError(
            f"no checkpoint at step {step} in {self.directory} (steps there: {steps}).")
      steps = [step]
    if not steps:
      return None
    damaged = []
    for candidate in reversed(steps):
      try:
        saved = self._saved_tree(candidate)
        error = None
      except Exception as e:  # noqa: BLE001 - any unreadable metadata is damage.
        saved, error = None, e
      if not _all_processes(error is None):
        damaged.append((candidate, error))
        self._warn_damaged(candidate, error, steps, damaged)
        continue
      differences = structure_differences(saved, abstract_tree)
      if differences:
        raise CheckpointMismatchError(
            f"the checkpoint at step {candidate} in {self.directory} holds another state than "
            f"this run builds: {'; '.join(differences)}. The config's model, optimizer or "
            "dtypes differ from the run that saved it: run with the config it was saved with "
            "(run_config.json in the work directory) or use a new --config.workdir.")
      try:
        tree, meta = self.restore(candidate, abstract_tree)
        error = None
      except Exception as e:  # noqa: BLE001 - any unreadable array or file is damage.
        tree, meta, error = None, None, e
      if not _all_processes(error is None):
        damaged.append((candidate, error))
        self._warn_damaged(candidate, error, steps, damaged)
        continue
      if set_aside and damaged:
        self._set_aside([s for s, _ in damaged])
      return candidate, tree, meta
    listing = "; ".join(f"step {s}: {_first_line(e) if e else 'unreadable on another process'}"
                        for s, e in damaged)
    raise NoGoodCheckpointError(
        f"no checkpoint in {self.directory} can be restored ({listing}). Nothing was changed: "
        "repair or move those step directories away to start the run over, or use a new "
        "--config.workdir.")

  def _warn_damaged(self, step: int, error, steps: list[int], damaged: list) -> None:
    older = [s for s in steps if s < step]
    then = f"trying step {older[-1]}" if older else "no older checkpoint"
    log.warning("checkpoint %s/%d is damaged (%s); %s.", self.directory, step,
                _first_line(error) if error else "unreadable on another process", then)

  def _set_aside(self, steps: list[int]) -> None:
    """Moves the damaged checkpoints of ``steps`` to ``<step>.damaged`` (process 0)."""
    if jax.process_index() == 0:
      fs, root = fsspec.core.url_to_fs(self.directory)
      for step in steps:
        target = f"{root}/{step}{DAMAGED_SUFFIX}"
        n = 1
        while fs.exists(target):
          target = f"{root}/{step}{DAMAGED_SUFFIX}.{n}"
          n += 1
        fs.mv(f"{root}/{step}", target, recursive=True)
        log.warning("moved the damaged checkpoint %s/%d aside to %s; the run resumes from the "
                    "newest good one.", self.directory, step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("tropd_jax checkpoints set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree) -> Any:
  """``ShapeDtypeStruct``s (with shardings) of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
