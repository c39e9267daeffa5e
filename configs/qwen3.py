"""The Qwen3 pair (METHOD.md §8): Qwen3-8B teacher → Qwen3-1.7B student, sized for a v5e-16.

  python -m tropd_jax.main --config=configs/qwen3.py --config.workdir=gs://my-bucket/tropd/qwen3 \
      --config.data.train_path=<prompts.jsonl>

Any Qwen3-tokenizer teacher works (``--config.teacher.path=nvidia/Qwen3-Nemotron-4B``). The run
is the paper's (128 prompts x 4 rollouts per step, 8096-token responses); on 16 chips of 16 GiB
it fits through sharding and micro-batching (``python -m tropd_jax.aot --config=configs/qwen3.py
--topology=v5e:4x4``): every row of a train micro-batch on its own chip. Variants as in
configs/aime.py: ``--config=configs/qwen3.py:opd``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import aime  # noqa: E402


def get_config(variant: str | None = None):
  c = aime.get_config(variant)
  c.workdir = "runs/qwen3_tropd"
  c.student.path = "Qwen/Qwen3-1.7B"
  c.teacher.path = "Qwen/Qwen3-8B"
  c.mesh.fsdp = -1  # v5e-16: 16-way FSDP.
  c.rollout.micro_batch = 64  # 16 prompts x 4 samples (on-policy), 64 guided rows at a time.
  c.train.micro_batch = 16  # One row per chip per micro-batch (640 rows: 40 micro-batches).
  return c
