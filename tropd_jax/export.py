"""Writes a run's student as an HF checkpoint.

  python -m tropd_jax.export --workdir=runs/aime_tropd [--step=200] --out=students/step200

Without ``--step`` it takes the newest checkpoint that restores (a damaged newer one is skipped
with a warning naming it) and says which step it wrote.
"""

from __future__ import annotations

import argparse
import logging

from flax import nnx

from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import cli
from tropd_jax import config as config_lib
from tropd_jax import models

log = logging.getLogger(__name__)


@cli.reads_user_input
def export(workdir: str, out: str, step: int | None = None) -> int:
  """Restores the student at ``step`` (default: the newest good one), saves it to ``out``.

  Returns:
    The step written.
  """
  config = config_lib.load_run_config(workdir)
  student = models.from_pretrained(config.student.path, dtype=config.student.dtype)
  params = nnx.state(student, nnx.Param)
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", every=1, keep=1 << 30,
                                       async_save=False)
  # Only the parameters are read (partial restore): no optimizer state is built or loaded.
  abstract = {"params": ckpt_lib.abstract_like(nnx.to_pure_dict(params))}
  try:
    restored = checkpointer.restore_newest_good(abstract, step=step)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: has the run saved a step?")
  step, tree, _ = restored
  nnx.replace_by_pure_dict(params, tree["params"])
  nnx.update(student, params)
  models.save_pretrained(student, out, tokenizer_dir=config.student.path)
  return step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tropd_jax.export", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="default: the newest good checkpoint")
  parser.add_argument("--out", required=True, help="HF checkpoint directory (local or gs://)")
  args = parser.parse_args(argv)
  logging.getLogger().setLevel(logging.WARNING)
  step = export(args.workdir, args.out, args.step)
  print(f"wrote the student at step {step} to {args.out}")


if __name__ == "__main__":
  cli.run(main)
