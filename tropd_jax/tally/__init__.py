"""The tally task: long worked solutions whose wording differs between teacher and student.

``ASSETS`` holds ``teacher/`` and ``student/`` (HF checkpoints sharing one character-level
tokenizer), ``train.jsonl`` (distillation prompts) and ``heldout.jsonl`` (evaluation problems),
all made by ``python -m tropd_jax.tally.make_models``.
"""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
