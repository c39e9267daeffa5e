"""Trains the demo's tokenizer, teacher and student, and writes them with the demo data.

  python -m tropd_jax.demo.make_models [--out=tropd_jax/demo/assets]

Writes ``<out>/teacher`` and ``<out>/student`` (HF checkpoints: config.json, model.safetensors,
tokenizer.json with a chat template), ``<out>/train.jsonl`` (distillation prompts) and
``<out>/heldout.jsonl`` (evaluation problems), then prints each model's held-out accuracy. The
two models share one byte-level BPE tokenizer (digits split one by one) trained on the task's
text, and are trained here from scratch by supervised next-token prediction on worked solutions
(``tropd_jax.demo.task``), with the loss on the response tokens only (``tropd_jax.demo.sft``):

- the teacher (3 layers, d_model 96, 0.36M parameters) on a fresh problem for every sequence,
  90 % in the ``lines`` style;
- the student (3 layers, d_model 64, 0.18M parameters) on solutions half ``lines`` and half
  ``inline`` of which 60 % of the carries and borrows are forgotten: it copies and adds well but
  is sloppy more often than not (held-out accuracy ~40 %, the teacher's ~97 %), and writes in a
  different style, so the teacher finds both trusted tokens and outliers in its rollouts.

Both train on a laptop CPU in about ten minutes. Seeds are fixed, but XLA's CPU kernels are not
bit-reproducible across machines, so a rerun gives models of the same quality, not the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random

from tropd_jax import models
from tropd_jax.demo import ASSETS, sft, task

log = logging.getLogger(__name__)

SEQ_LEN = 72  # Chat-templated prompt (<= 22 tokens) + the longest solution and its end token.
HELDOUT_SEED, TRAIN_SEED = 1234, 5678
NUM_HELDOUT, NUM_TRAIN = 256, 4096
EVAL_TEMPERATURE, EVAL_K = 0.6, 2
MAX_NEW_TOKENS = 56


@dataclasses.dataclass(frozen=True)
class Recipe(sft.Recipe):
  """One model: its size and training (``sft.Recipe``), and what its solutions look like.

  Attributes:
    pool: distinct training problems (0 = a fresh problem for every sequence).
    inline_frac: fraction of solutions written in the ``inline`` style.
    slip_prob: how often a solution forgets a carry or a borrow (``task.Problem.solution``).
  """

  pool: int = 0
  inline_frac: float = 0.0
  slip_prob: float = 0.0


TEACHER = Recipe("teacher", d_model=96, num_layers=3, num_heads=4, d_ff=256, steps=900,
                 batch=64, lr=3e-3, pool=0, inline_frac=0.1, slip_prob=0.0, seed=0)
STUDENT = Recipe("student", d_model=64, num_layers=3, num_heads=4, d_ff=192, steps=2000,
                 batch=64, lr=3e-3, pool=0, inline_frac=0.5, slip_prob=0.6, seed=1)


def build_tokenizer(out_dir: str) -> models.Tokenizer:
  """The byte-level BPE tokenizer (300 tokens, digits split) trained on the task's text."""
  corpus = []
  for p in task.make_problems(2000, seed=0):
    corpus += ["user\n" + p.prompt, "assistant\n" + p.solution("lines"), p.solution("inline")]
  return sft.build_tokenizer(out_dir, corpus, vocab_size=300)


def _batches(recipe: Recipe, tokenizer: models.Tokenizer, exclude: set[str]) -> sft.Batches:
  """Endless ``(tokens [B, T], mask [B, T])`` batches of ``recipe``'s training data."""
  rng = random.Random(recipe.seed)
  pool = task.make_problems(recipe.pool, recipe.seed, exclude=exclude) if recipe.pool else None
  while True:
    rows = []
    while len(rows) < recipe.batch:
      problem = rng.choice(pool) if pool else task.random_problem(rng)
      if problem.prompt in exclude:
        continue
      style = "inline" if rng.random() < recipe.inline_frac else "lines"
      solution = problem.solution(style, slip_prob=recipe.slip_prob, rng=rng)
      rows.append(sft.encode(tokenizer, problem.prompt, solution, SEQ_LEN))
    yield sft.stack(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tropd_jax.demo.make_models",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=ASSETS, help="output directory (default: the shipped assets)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  heldout = task.make_problems(NUM_HELDOUT, HELDOUT_SEED)
  exclude = {p.prompt for p in heldout}
  train_prompts = task.make_problems(NUM_TRAIN, TRAIN_SEED, exclude=exclude)
  sft.make_assets(args.out, [p.record() for p in heldout], [p.record() for p in train_prompts],
                  build_tokenizer, (TEACHER, STUDENT),
                  lambda recipe, tokenizer: _batches(recipe, tokenizer, exclude),
                  sft.Evaluation(EVAL_TEMPERATURE, EVAL_K, MAX_NEW_TOKENS, "configs/demo.py"))


if __name__ == "__main__":
  main()
