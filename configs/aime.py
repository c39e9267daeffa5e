"""The paper's single-domain math run (METHOD.md §8): Skywork-OR1-Math-7B → DeepSeek-R1-Distill-Qwen-1.5B.

Launch (on a TPU VM; paths may be local, gs:// or hub ids):

  python -m tropd_jax.main --config=configs/aime.py \
      --config.workdir=gs://my-bucket/tropd/aime \
      --config.data.train_path=gs://my-bucket/data/openthoughts3_math.jsonl

Baselines of METHOD.md §6 are variants: ``--config=configs/aime.py:opd`` (also topk_fkl, jsd,
entropy_opd, eopd, clip_outlier, mask_outlier, fkl_outlier, tropd). Any field can be overridden
with ``--config.a.b=value``; every field is documented in tropd_jax/config.py.
"""

from tropd_jax.config import defaults
from tropd_jax.objectives import OBJECTIVES


def get_config(variant: str | None = None):
  c = defaults()
  c.workdir = "runs/aime_tropd"  # Use a gs:// URL on TPU VMs.
  c.seed = 0
  c.steps = 200

  c.student.path = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
  c.student.dtype = "float32"  # Master weights; AdamW at lr 5e-6 needs float32.
  c.student.compute_dtype = "bfloat16"
  c.student.remat = True
  c.teacher.path = "Skywork/Skywork-OR1-Math-7B"
  c.teacher.dtype = "bfloat16"

  c.mesh.data = 1
  c.mesh.fsdp = -1  # All chips: parameters, optimizer state and rows sharded.
  c.mesh.tensor = 1

  c.data.train_path = "open-thoughts/OpenThoughts3-1.2M-math.jsonl"  # Local copy or gs:// URL.
  c.data.prompt_key = "problem"
  c.data.max_prompt_tokens = 1024

  c.rollout.prompts_per_step = 128
  c.rollout.num_samples = 4
  c.rollout.max_new_tokens = 8096
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.micro_batch = 64

  c.guidance.per_prompt = 1

  c.objective.name = variant or "tropd"
  c.objective.top_k = 64
  c.objective.beta = 0.001

  c.train.lr = 5e-6
  c.train.schedule = "constant"
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.micro_batch = 8
  c.train.score_chunk = 512

  c.checkpoint.every = 20
  c.checkpoint.keep = 3

  # The paper's sets, each a JSONL of {problem, answer}; reported per set and as their mean, e.g.
  # --config.eval.paths="('gs://my-bucket/data/aime24.jsonl', 'gs://my-bucket/data/aime25.jsonl',
  # 'gs://my-bucket/data/amc23.jsonl')".
  c.eval.paths = ()
  c.eval.k = 32
  c.eval.max_new_tokens = 8096
  if variant is not None and variant not in OBJECTIVES:
    raise ValueError(f"config variant {variant!r} is not one of {sorted(OBJECTIVES)}.")
  return c
