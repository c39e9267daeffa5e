"""A tiny run for tests: paths come from --config.* overrides or the test.

  python -m tropd_jax.main --config=tests/tiny_config.py --config.workdir=... \
      --config.student.path=... --config.teacher.path=... --config.data.train_path=...
"""

from tropd_jax.config import defaults


def get_config(objective: str = "tropd"):
  c = defaults()
  c.steps = 3
  c.student.dtype = "float32"
  c.student.compute_dtype = "float32"
  c.student.remat = False
  c.teacher.dtype = "float32"
  c.mesh.fsdp = -1
  c.data.max_prompt_tokens = 24
  c.rollout.prompts_per_step = 2
  c.rollout.num_samples = 2
  c.rollout.max_new_tokens = 6
  c.rollout.slots = 4
  c.rollout.prompt_buckets = (24,)
  c.guidance.max_teacher_tokens = 6
  c.objective.name = objective
  c.objective.top_k = 8
  c.train.lr = 1e-2
  c.train.micro_batch = 8  # One packed row per device of the 8-device test mesh.
  c.train.score_chunk = 8
  c.checkpoint.every = 1
  c.eval.max_new_tokens = 8  # Within the tiny models' 256 positions.
  c.checkpoint.async_save = False
  return c
