"""A run's student after the fact: its config, and its parameters at a saved step (params only).

Shared by ``tropd_jax.export`` and ``tropd_jax.evaluate``. The parameters are read with an orbax
partial restore of the ``params`` subtree of ``{"params", "opt_state", "step"}``, in the dtype
asked for (cast as each shard is read) and sharded over a mesh, so the optimizer state is never
built or read.

Which config describes the run (both commands):

  --config=FILE [--config.a.b=v ...]   the file with its overrides, as ``tropd_jax.main`` builds
                                       it; ``--config.workdir`` names the run's directory.
  --workdir=DIR                        DIR/run_config.json, the config the run recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
import jax
import ml_collections

from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import config as config_lib
from tropd_jax import mesh as mesh_lib
from tropd_jax import models
from tropd_jax.models import hf_io

log = logging.getLogger(__name__)

T = TypeVar("T")


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint's parameters could not be read (damaged, incomplete or of another model)."""


def run_config(config: ml_collections.ConfigDict | None,
               workdir: str | None) -> ml_collections.ConfigDict:
  """The run's config: ``config`` (from ``--config``) or ``<workdir>/run_config.json``, validated.

  Raises:
    ValueError: both or neither given, or the config is invalid (the message names the field).
  """
  if (config is None) == (not workdir):
    raise ValueError("give the run as --config=FILE (with --config.workdir=DIR) or as "
                     "--workdir=DIR (its run_config.json), not both.")
  if config is None:
    config = config_lib.load_run_config(workdir)
  return config_lib.validate(config)


def run_tokenizer(config: ml_collections.ConfigDict):
  """``(tokenizer, vocab_size)`` of the run: the student's tokenizer (with the data's chat
  template arguments), checked to be the teacher's, and the vocabulary both models share."""
  t_tok = models.load_tokenizer(config.teacher.path)
  s_tok = models.load_tokenizer(config.student.path,
                                chat_template_kwargs=config.data.chat_template_kwargs)
  vocab_size = models.check_same_tokenizer(
      t_tok, s_tok, models.load_config(config.teacher.path).vocab_size,
      models.load_config(config.student.path).vocab_size)
  return s_tok, vocab_size


def student_config(config: ml_collections.ConfigDict, dtype: str | None = None):
  """The student's ``ModelConfig`` (its checkpoint's config.json), in ``dtype`` (None: its own)."""
  return models.load_config(config.student.path, dtype=dtype)


def run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's mesh when it fits the devices here, else every device on the ``fsdp`` axis."""
  try:
    return mesh_lib.make_mesh(config_lib.settings(config).mesh)
  except ValueError as e:
    log.info("the run's mesh does not fit here (%s); sharding over all %d devices instead.",
             e, jax.device_count())
    return mesh_lib.make_mesh(mesh_lib.MeshConfig())


def abstract_params(cfg, mesh: jax.sharding.Mesh | None = None
                    ) -> dict[tuple, jax.ShapeDtypeStruct]:
  """``{parameter path: ShapeDtypeStruct}`` of a ``cfg`` student in ``cfg.dtype``, sharded on
  ``mesh`` by the parameters' logical axes (None: unsharded, for host reads)."""
  out = {}
  for path, var in hf_io.model_params(models.abstract_model(cfg)):
    sharding = None if mesh is None else mesh_lib.named_sharding(
        var.get_metadata()["logical_axes"], var.shape, mesh)
    out[path] = jax.ShapeDtypeStruct(var.shape, cfg.param_dtype, sharding=sharding)
  return out


def nest(flat: Mapping[tuple, Any]) -> dict[str, Any]:
  """``{("blocks", 0, "mlp", "up_DF"): x}`` -> ``{"blocks": {"0": {"mlp": {"up_DF": x}}}}``.

  Orbax keys a saved tree by strings: list indices become ``"0"``, ``"1"``, ...
  """
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = leaf
  return out


def leaf(tree: Mapping[str, Any], path: tuple) -> Any:
  for key in path:
    tree = tree[str(key)]
  return tree


def open_checkpoints(workdir: str) -> ckpt_lib.Checkpointer:
  """The run's checkpoints, opened read-only (nothing is created, saved or deleted)."""
  directory = f"{str(workdir).rstrip('/')}/checkpoints"
  fs, path = fsspec.core.url_to_fs(directory)
  if not fs.isdir(path):
    raise FileNotFoundError(f"no checkpoints under {workdir!r}: is it the run's work directory "
                            "(--config.workdir or --workdir)?")
  return ckpt_lib.Checkpointer(directory, read_only=True, async_save=False)


def with_newest_readable(checkpointer: ckpt_lib.Checkpointer, step: int | None,
                         fn: Callable[[int], T]) -> tuple[int, T]:
  """``(step, fn(step))`` for ``step``, or for the newest step whose parameters can be read.

  ``fn`` raises ``UnreadableCheckpointError`` for a step it cannot read; without an explicit
  ``step`` the next older one is tried, with a warning naming the damaged one.

  Raises:
    FileNotFoundError: no checkpoint, or none at ``step`` (the message lists the steps there).
    UnreadableCheckpointError: ``step`` (or every step) cannot be read.
  """
  steps = sorted(checkpointer.manager.all_steps(), reverse=True)
  where = checkpointer.directory
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {where}: the run has saved none yet.")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {where} (steps there: "
                              f"{sorted(steps)}); pass one of them, or no step for the latest.")
    return step, fn(step)
  first_error = None
  for i, candidate in enumerate(steps):
    try:
      return candidate, fn(candidate)
    except UnreadableCheckpointError as e:
      first_error = first_error or e
      older = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"
      log.warning("%s; %s.", e, older)
  raise UnreadableCheckpointError(f"no checkpoint in {where} can be read; the newest: "
                                  f"{first_error}")


def read_params(checkpointer: ckpt_lib.Checkpointer, step: int,
                abstract: Mapping[tuple, jax.ShapeDtypeStruct], *,
                host: bool = False) -> dict[tuple, Any]:
  """``{path: array}`` of the ``abstract`` parameters at ``step`` (params only, cast on read).

  ``host``: NumPy arrays in this process's memory instead of arrays sharded on devices.
  """
  try:
    tree = checkpointer.restore_params(step, nest(abstract), host=host)
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "cannot read".
    message = str(e).splitlines()[0][:300] if str(e) else ""
    raise UnreadableCheckpointError(
        f"the parameters of step {step} in {checkpointer.directory} cannot be read "
        f"({type(e).__name__}: {message})") from e
  return {path: leaf(tree, path) for path in abstract}


def restore_student(config: ml_collections.ConfigDict, *, step: int | None = None,
                    dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[models.Transformer, int]:
  """The run's student at ``step`` (default: the newest readable), in ``dtype``, on ``mesh``.

  Args:
    config: the run's config (``workdir`` and ``student.path`` are read).
    step: the checkpoint's step; None: the newest one that can be read.
    dtype: the parameters' dtype (default: the student checkpoint's config.json dtype).
    mesh: where to place them (default: ``run_mesh(config)``).

  Returns:
    ``(model, step)``.
  """
  cfg = student_config(config, dtype)
  mesh = mesh or run_mesh(config)
  abstract = abstract_params(cfg, mesh)
  checkpointer = open_checkpoints(config.workdir)
  try:
    used, arrays = with_newest_readable(
        checkpointer, step, lambda s: read_params(checkpointer, s, abstract))
  finally:
    checkpointer.close()
  model = models.abstract_model(cfg)
  for path, var in hf_io.model_params(model):
    var.set_value(arrays[path])
  return model, used

