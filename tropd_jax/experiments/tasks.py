"""The embedded tasks the experiments run on, each named by its config file in ``configs/``."""

from __future__ import annotations

import os

from tropd_jax.cli import UserError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
TASKS = {
    "demo": "demo.py",  # Short chained arithmetic: the outlier tokens are the student's errors.
    "tally": "tally.py",  # Long running totals: most outlier tokens are the student's wording.
}


def config_file(task: str) -> str:
  """The config file of ``task`` (a key of ``TASKS``)."""
  if task not in TASKS:
    raise UserError(f"--task={task!r} is not one of {sorted(TASKS)}.")
  return os.path.join(CONFIGS_DIR, TASKS[task])
