"""The Qwen3 pair (METHOD.md §8): Qwen3-Nemotron-4B-style teacher → Qwen3-1.7B student.

  python -m tropd_jax.main --config=configs/qwen3.py --config.workdir=gs://my-bucket/tropd/qwen3 \
      --config.teacher.path=<Qwen3-4B-class teacher> --config.data.train_path=<prompts.jsonl>

Variants as in configs/aime.py: ``--config=configs/qwen3.py:opd``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import aime  # noqa: E402


def get_config(variant: str | None = None):
  c = aime.get_config(variant)
  c.workdir = "runs/qwen3_tropd"
  c.student.path = "Qwen/Qwen3-1.7B"
  c.teacher.path = "nvidia/Qwen3-Nemotron-4B"  # Any Qwen3-tokenizer teacher.
  return c
