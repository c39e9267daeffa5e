"""Trains the tally task's tokenizer, teacher and student, and writes them with the task's data.

  python -m tropd_jax.tally.make_models [--out=tropd_jax/tally/assets]

Writes ``<out>/teacher`` and ``<out>/student`` (HF checkpoints: config.json, model.safetensors,
tokenizer.json with a chat template), ``<out>/train.jsonl`` (distillation prompts) and
``<out>/heldout.jsonl`` (evaluation problems), then prints each model's held-out accuracy. The
two models share one character-level tokenizer (byte-level BPE without merges) and are trained
from scratch by next-token prediction on worked solutions (``tropd_jax.tally.task``), with the
loss on the response tokens only (``tropd_jax.demo.sft``, shared with the demo):

- the teacher on a fresh problem for every sequence, its lines worded ``plus`` 94 % of the time
  (``add`` and ``more`` 3 % each) and its opening and closing sentences the first way 97 % of the
  time: it can continue any wording, but prefers its own;
- the student (smaller) on solutions worded ``add`` or ``more`` 45 % of the time each (``plus``
  10 %), the second opening and closing half the time, in which a line that adds a 9 forgets
  the carry 70 % of the time. It writes in another style than the teacher on most lines and
  slips on a few, so most of the tokens the teacher finds unlikely in its rollouts are choices
  of wording, and a few are its errors.

Seeds are fixed, but XLA's CPU kernels are not bit-reproducible across machines, so a rerun gives
models of the same quality, not the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random

from tropd_jax import models
from tropd_jax.demo import sft
from tropd_jax.tally import ASSETS, task

log = logging.getLogger(__name__)

SEQ_LEN = 352  # Chat-templated prompt (59 tokens) + the longest solution (287) and its end token.
MAX_POSITIONS = 512
MAX_NEW_TOKENS = 304
HELDOUT_SEED, TRAIN_SEED = 1234, 5678
NUM_HELDOUT, NUM_TRAIN = 128, 4096
EVAL_TEMPERATURE, EVAL_K = 0.6, 2


@dataclasses.dataclass(frozen=True)
class Recipe(sft.Recipe):
  """One model: its size and training (``sft.Recipe``), and the mixture of its solutions."""

  mixture: task.Mixture = task.Mixture(wordings=(1.0, 0.0, 0.0), other_sentences=0.0,
                                       slip_prob=0.0)


# Two heads a layer: at 320 positions attention is most of a step's time on a CPU, and two
# suffice for the label lookup and the two addends.
TEACHER = Recipe("teacher", d_model=96, num_layers=3, num_heads=2, d_ff=384, steps=1000,
                 batch=32, lr=3e-3, seed=0,
                 mixture=task.Mixture(wordings=(0.94, 0.03, 0.03), other_sentences=0.03,
                                      slip_prob=0.0))
STUDENT = Recipe("student", d_model=96, num_layers=3, num_heads=2, d_ff=256, steps=1000,
                 batch=32, lr=3e-3, seed=1,
                 mixture=task.Mixture(wordings=(0.1, 0.45, 0.45), other_sentences=0.5,
                                      slip_prob=0.7))


def build_tokenizer(out_dir: str) -> models.Tokenizer:
  """One token per character: the task's text needs no merges, and a tiny model adds digits."""
  corpus = ["user\n" + p.prompt for p in task.make_problems(100, seed=0)]
  return sft.build_tokenizer(out_dir, corpus, vocab_size=sft.BYTES + len(sft.SPECIAL_TOKENS))


def _batches(recipe: Recipe, tokenizer: models.Tokenizer, exclude: set[str]) -> sft.Batches:
  """Endless ``(tokens [B, T], mask [B, T])`` batches of ``recipe``'s training solutions."""
  rng = random.Random(recipe.seed)
  while True:
    rows = []
    while len(rows) < recipe.batch:
      problem = task.random_problem(rng)
      if problem.prompt in exclude:
        continue
      solution = task.draw_solution(problem, recipe.mixture, rng)
      rows.append(sft.encode(tokenizer, problem.prompt, solution, SEQ_LEN))
    yield sft.stack(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tropd_jax.tally.make_models",
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
                  sft.Evaluation(EVAL_TEMPERATURE, EVAL_K, MAX_NEW_TOKENS, "configs/tally.py"), max_positions=MAX_POSITIONS)


if __name__ == "__main__":
  main()
