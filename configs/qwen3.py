"""The Qwen3 pair (METHOD.md §8): Qwen3-8B teacher → Qwen3-1.7B student, sized for a v5e-16.

  python -m tropd_jax.main --config=configs/qwen3.py --config.workdir=gs://my-bucket/tropd/qwen3 \
      --config.data.train_path=<prompts.jsonl>

Any Qwen3-tokenizer teacher works (``--config.teacher.path=nvidia/Qwen3-Nemotron-4B``). The run
is the paper's (128 prompts x 4 rollouts per step, 8096-token responses); on 16 chips of 16 GiB
it fits through sharding and micro-batching (``python -m tropd_jax.aot --config=configs/qwen3.py
--topology=v5e:4x4``). Variants as in configs/aime.py: ``--config=configs/qwen3.py:opd``.
"""

from configs import aime


def get_config(variant: str | None = None):
  c = aime.get_config(variant)
  c.workdir = "runs/qwen3_tropd"
  c.student.path = "Qwen/Qwen3-1.7B"
  c.teacher.path = "Qwen/Qwen3-8B"
  # v5e-16 (16 GiB chips): 4-way FSDP x 4-way tensor parallelism (heads, MLP, vocabulary).
  c.mesh.fsdp = 4
  c.mesh.tensor = 4
  c.rollout.slots = 64  # 16 rows per group of 4 chips sharing their rows.
  c.train.micro_batch = 4  # One packed row per FSDP shard per micro-batch.
  return c
