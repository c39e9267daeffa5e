"""Writes a run's student as a Hugging Face checkpoint (safetensors + config.json + tokenizer).

  python -m tropd_jax.export --config=configs/demo.py --config.workdir=runs/demo \
      --out=students/demo [--dtype=bfloat16] [--step=40] [--max_shard_size=1GB]
  python -m tropd_jax.export --workdir=gs://bucket/tropd/aime --out=gs://bucket/students/aime

The run is named as in ``tropd_jax.student``: ``--config`` with its overrides (as ``main`` takes
it), or ``--workdir`` alone for the config the run recorded in ``run_config.json``. ``--step``
defaults to the newest checkpoint whose parameters can be read (a damaged newest one is skipped
with a warning); the step used is printed.

Only the ``params`` subtree of the checkpoint is read (an orbax partial restore: the optimizer
state is never read), straight into host memory, cast to ``--dtype`` (default: the student
checkpoint's own dtype in its config.json) as each tensor is read: no accelerator memory is used,
so any machine that can read the work directory exports any student. The files are written one
at a time with the ``safetensors`` library, sharded above ``--max_shard_size`` with
``model.safetensors.index.json``; the host holds one file's tensors and one tensor being read,
so peak host memory is about ``min(exported bytes, max_shard_size)`` + the largest tensor's
saved bytes above the interpreter's own (benchmarks/export_memory.py measures it). On a
multi-host run, process 0 reads and writes; the others wait. ``--out`` must not hold a
checkpoint already: nothing is overwritten.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import fsspec
import jax
import ml_collections

from tropd_jax import cli
from tropd_jax import student as student_lib
from tropd_jax.models import hf_io

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "1GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


@dataclasses.dataclass(frozen=True)
class Exported:
  """What ``export`` wrote.

  Attributes:
    step: the checkpoint's step.
    dtype: the dtype of the written tensors.
    files: the weight files, in order.
    num_bytes: bytes of tensors written (all files).
  """

  step: int
  dtype: str
  files: tuple[str, ...]
  num_bytes: int


def parse_size(text: str | int) -> int:
  """Bytes of a size such as ``2GB``, ``500MB``, ``1GiB`` or ``123456``."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
  if not match:
    raise ValueError(f"size {text!r} is not a number of bytes like 2GB, 500MB or 1GiB.")
  size = int(float(match[1]) * _UNITS[(match[2] or "").upper()])
  if size < 1:
    raise ValueError(f"size {text!r} must be at least one byte.")
  return size


def _check_new_output(out: str) -> None:
  fs, path = fsspec.core.url_to_fs(out)
  if fs.exists(f"{path}/config.json") or fs.glob(f"{path}/*.safetensors"):
    raise FileExistsError(f"{out} already holds a checkpoint; export to a new --out directory.")


def export(config: ml_collections.ConfigDict, out: str, *, step: int | None = None,
           dtype: str | None = None,
           max_shard_bytes: int = parse_size(DEFAULT_MAX_SHARD_SIZE)) -> Exported | None:
  """Writes the run's student at ``step`` to ``out`` as an HF checkpoint (on process 0).

  Args:
    config: the run's config (``workdir``, ``student.path``).
    out: the output directory (local or fsspec URL); must not hold a checkpoint.
    step: the checkpoint's step; None: the newest whose parameters can be read.
    dtype: ``bfloat16`` or ``float32``; None: the student checkpoint's config.json dtype.
    max_shard_bytes: the most tensor bytes per file (and so held on the host at once).

  Returns:
    What was written (``Exported``); None on processes other than 0.
  """
  try:
    return _export(config, out, step=step, dtype=dtype, max_shard_bytes=max_shard_bytes)
  finally:
    if jax.process_count() > 1:  # The others wait until process 0 is done, or has failed.
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("tropd_jax.export")


def _export(config, out: str, *, step, dtype, max_shard_bytes) -> Exported | None:
  if jax.process_index() != 0:
    return None
  cfg = student_lib.student_config(config, dtype)
  abstract = student_lib.abstract_params(cfg)
  _check_new_output(out)
  checkpointer = student_lib.open_checkpoints(config.workdir)

  def write(s: int) -> list[str]:
    def read(paths):
      return student_lib.read_params(checkpointer, s, {p: abstract[p] for p in paths}, host=True)

    log.info("writing the parameters of step %d to %s (%s)", s, out, cfg.dtype)
    return hf_io.write_hf_checkpoint(out, cfg, read, tokenizer_dir=config.student.path,
                                     max_shard_bytes=max_shard_bytes)

  try:
    used, files = student_lib.with_newest_readable(checkpointer, step, write)
  finally:
    checkpointer.close()
  return Exported(used, cfg.dtype, tuple(files), hf_io.num_bytes(cfg))


def main(argv) -> None:
  del argv
  from tropd_jax import metrics

  metrics.configure_console_logging()
  try:
    config = student_lib.run_config(cli.config_flag_value(_CONFIG), _WORKDIR.value)
    result = export(config, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                    max_shard_bytes=parse_size(_MAX_SHARD_SIZE.value))
  except (ValueError, FileNotFoundError, FileExistsError,
          student_lib.UnreadableCheckpointError) as e:
    raise cli.UserError(str(e)) from e  # cli.run prints it as one line, exit status 2.
  if result is not None:
    print(f"wrote the student at step {result.step} of {config.workdir} to {_OUT.value}: "
          f"{result.dtype}, {len(result.files)} file(s), {result.num_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config file (path.py[:variant]), overridable with "
      "--config.a.b=value; or give --workdir instead.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's work directory; its "
                                 "run_config.json is the config (instead of --config).")
  _OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://); must be new.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable).")
  _DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Dtype of the exported "
                             "weights (default: the student checkpoint's config.json dtype).")
  _MAX_SHARD_SIZE = flags.DEFINE_string(
      "max_shard_size", DEFAULT_MAX_SHARD_SIZE, "Most bytes per safetensors file (e.g. 1GB, "
      "500MB); bounds the host memory of the export.")
  flags.mark_flags_as_required(["out"])
  cli.run(lambda: app.run(main, flags_parser=cli.parse_absl_flags))
