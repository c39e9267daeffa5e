"""One finished tiny training run, shared by the export, evaluation and metrics tests.

Two steps of tests/tiny_config.py on tiny Qwen2 checkpoints (tests/hf_fixtures.py), a checkpoint
after each step and an evaluation on two problem sets before the first step and after the last.
Made once per test session (it takes a while on a CPU), in a temporary directory removed at exit;
tests copy it before changing anything.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import tiny_config as tiny_config_file
from hf_fixtures import make_hf_model, make_tokenizer

PROMPTS = ["the cat sat", "12 + 34", "on the mat", "cat 46", "the 12 mat", "sat on 34"]
SETS = {"set_a": [("the cat", "12"), ("12 + 34", "46")],
        "set_b": [("sat on", "mat"), ("cat 46", "46"), ("the mat", "12")]}


@functools.lru_cache(maxsize=None)
def tiny_run() -> tuple[str, dict]:
  """``(root, config overrides)`` of the finished run; its work directory is ``root/run``."""
  from tropd_jax import train

  root = tempfile.mkdtemp(prefix="tropd_tiny_run_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  make_hf_model(f"{root}/teacher", "qwen2", seed=1, layers=2, d_model=32, peaked=3.0)
  make_hf_model(f"{root}/student", "qwen2", seed=2, layers=1, d_model=32, peaked=3.0)
  for name in ("teacher", "student"):
    make_tokenizer(f"{root}/{name}")
  with open(f"{root}/train.jsonl", "w") as f:
    for i, p in enumerate(PROMPTS):
      f.write(json.dumps({"problem": p, "answer": str(i)}) + "\n")
  for name, problems in SETS.items():
    with open(f"{root}/{name}.jsonl", "w") as f:
      for problem, answer in problems:
        f.write(json.dumps({"problem": problem, "answer": answer}) + "\n")
  overrides = {
      "workdir": f"{root}/run", "student.path": f"{root}/student",
      "teacher.path": f"{root}/teacher", "data.train_path": f"{root}/train.jsonl",
      "data.system_prompt": "Box the answer.", "steps": 2, "checkpoint.keep": 3,
      "eval.paths": (f"{root}/set_a.jsonl", f"{root}/set_b.jsonl"), "eval.k": 2,
      "eval.max_new_tokens": 6, "eval.temperature": 1.0, "eval.top_p": 0.9,
  }
  train.run_training(config(overrides))
  return root, overrides


def config(overrides: dict, **more):
  """tests/tiny_config.py with ``overrides`` and ``more`` (dotted names) applied."""
  c = tiny_config_file.get_config()
  c.update_from_flattened_dict({**overrides, **more})
  return c


def copy_run(root: str, dest: str) -> str:
  """A copy of the run's work directory at ``dest`` (for tests that change it)."""
  shutil.copytree(os.path.join(root, "run"), dest)
  return dest
