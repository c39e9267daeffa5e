"""Writes a run's student as an HF checkpoint.

  python -m tropd_jax.export --workdir=runs/aime_tropd [--step=200] --out=students/step200
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import config as config_lib
from tropd_jax import models
from tropd_jax import train_step as ts


def export(workdir: str, out: str, step: int | None = None) -> int:
  """Restores the student at ``step`` (default: latest) and saves it to ``out``; returns the step."""
  config = config_lib.load_run_config(workdir)
  student = models.from_pretrained(config.student.path, dtype=config.student.dtype)
  params = nnx.state(student, nnx.Param)
  tx = config_lib.settings(config).optimizer.make()
  like = ts.TrainState(params, tx.init(params), jax.numpy.zeros((), jax.numpy.int32))
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", every=1, keep=1 << 30,
                                       async_save=False)
  steps = checkpointer.manager.all_steps()
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(
        f"no checkpoint at step {step} in {workdir}/checkpoints (steps there: {sorted(steps)}).")
  abstract_tree = ckpt_lib.abstract_like(like.as_dict())
  restored, _ = checkpointer.restore(step if step is not None else max(steps), abstract_tree)
  restored = like.replace_leaves(restored)
  nnx.update(student, restored.params)
  models.save_pretrained(student, out, tokenizer_dir=config.student.path)
  checkpointer.close()
  return int(restored.step)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tropd_jax.export", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  parser.add_argument("--out", required=True, help="HF checkpoint directory (local or gs://)")
  args = parser.parse_args(argv)
  step = export(args.workdir, args.out, args.step)
  print(f"wrote the student at step {step} to {args.out}")


if __name__ == "__main__":
  main()
