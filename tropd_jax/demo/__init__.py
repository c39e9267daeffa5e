"""The embedded demo: a synthetic reasoning task and the tiny teacher and student shipped for it.

``ASSETS`` holds ``teacher/`` and ``student/`` (HF checkpoints sharing one tokenizer),
``train.jsonl`` (distillation prompts) and ``heldout.jsonl`` (evaluation problems), all made by
``python -m tropd_jax.demo.make_models``.
"""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
