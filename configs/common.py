"""What the configs share: objective variants, and the paper's settings (METHOD.md §8).

Config files import it as ``from configs import common`` (the ``configs`` package is installed
with tropd_jax).
"""

from tropd_jax.config import defaults
from tropd_jax.objectives import OBJECTIVES


def base(variant: str | None):
  """``defaults()`` with ``objective.name`` set from a config file's variant (``:opd``, ...)."""
  if variant is not None and variant not in OBJECTIVES:
    raise ValueError(f"config variant {variant!r} is not one of {sorted(OBJECTIVES)}.")
  c = defaults()
  c.objective.name = variant or "tropd"
  return c


def paper(c):
  """The paper's single-domain math run on ``c``: steps, optimizer, rollouts, objective."""
  c.seed = 0
  c.steps = 200
  c.student.dtype = "float32"  # Master weights; AdamW at lr 5e-6 needs float32.
  c.student.compute_dtype = "bfloat16"
  c.student.remat = True
  c.teacher.dtype = "bfloat16"
  c.data.max_prompt_tokens = 1024
  c.rollout.prompts_per_step = 128
  c.rollout.num_samples = 4
  c.rollout.max_new_tokens = 8096
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.guidance.per_prompt = 1
  c.objective.top_k = 64
  c.objective.beta = 0.001
  c.train.lr = 5e-6
  c.train.schedule = "constant"
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.eval.k = 32
  c.eval.max_new_tokens = 8096
  return c
