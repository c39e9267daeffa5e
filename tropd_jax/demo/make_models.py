"""Trains the demo's tokenizer, teacher and student, and writes them with the demo data.

  python -m tropd_jax.demo.make_models [--out=tropd_jax/demo/assets]

Writes ``<out>/teacher`` and ``<out>/student`` (HF checkpoints: config.json, model.safetensors,
tokenizer.json with a chat template), ``<out>/train.jsonl`` (distillation prompts) and
``<out>/heldout.jsonl`` (evaluation problems), then prints each model's held-out accuracy. The
two models share one byte-level BPE tokenizer (digits split one by one) trained on the task's
text, and are trained here from scratch by supervised next-token prediction on worked solutions
(``tropd_jax.demo.task``), with the loss on the response tokens only:

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
import os
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tropd_jax import evaluate, models
from tropd_jax.demo import ASSETS, task

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SEQ_LEN = 72  # Chat-templated prompt (<= 22 tokens) + the longest solution and its end token.
HELDOUT_SEED, TRAIN_SEED = 1234, 5678
NUM_HELDOUT, NUM_TRAIN = 256, 4096
EVAL_TEMPERATURE, EVAL_K = 0.6, 2


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one model is made: its size and its supervised training.

  Attributes:
    name: output directory name.
    d_model, num_layers, num_heads, d_ff: the architecture (a Qwen2-style model, tied embeddings).
    steps: optimizer steps; batch: sequences per step; lr: AdamW peak learning rate (cosine decay).
    pool: distinct training problems (0 = a fresh problem for every sequence).
    inline_frac: fraction of solutions written in the ``inline`` style.
    slip_prob: how often a solution forgets a carry or a borrow (``task.Problem.solution``).
    seed: initialization, data and style draws.
  """

  name: str
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  steps: int
  batch: int
  lr: float
  pool: int
  inline_frac: float
  slip_prob: float
  seed: int


TEACHER = Recipe("teacher", d_model=96, num_layers=3, num_heads=4, d_ff=256, steps=900,
                 batch=64, lr=3e-3, pool=0, inline_frac=0.1, slip_prob=0.0, seed=0)
STUDENT = Recipe("student", d_model=64, num_layers=3, num_heads=4, d_ff=192, steps=2000,
                 batch=64, lr=3e-3, pool=0, inline_frac=0.5, slip_prob=0.6, seed=1)


def build_tokenizer(out_dir: str) -> models.Tokenizer:
  """Trains the byte-level BPE tokenizer on the task's text and saves it with the chat template."""
  from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
  from tokenizers import models as tok_models
  from transformers import PreTrainedTokenizerFast

  corpus = []
  for p in task.make_problems(2000, seed=0):
    corpus += ["user\n" + p.prompt, "assistant\n" + p.solution("lines"), p.solution("inline")]
  tok = Tokenizer(tok_models.BPE())
  # One token per digit (as Qwen's tokenizer does) keeps the arithmetic learnable by tiny models.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)
  return models.load_tokenizer(out_dir)


def model_config(recipe: Recipe, tokenizer: models.Tokenizer) -> models.ModelConfig:
  eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  return models.ModelConfig(
      model_type="qwen2", vocab_size=tokenizer.vocab_size, d_model=recipe.d_model,
      d_ff=recipe.d_ff, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
      num_kv_heads=recipe.num_heads, head_dim=recipe.d_model // recipe.num_heads,
      qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=256, dtype="float32",
      eos_token_id=(eos,))


def encode(tokenizer: models.Tokenizer, problem: task.Problem, solution: str):
  """``(tokens [SEQ_LEN], loss mask [SEQ_LEN])``: prompt + solution + end token, right-padded."""
  prompt = tokenizer.encode_prompt(problem.prompt)
  response = tokenizer.encode(solution) + [tokenizer.stop_ids[0]]
  ids = prompt + response
  if len(ids) > SEQ_LEN:
    raise ValueError(f"{problem.prompt!r} takes {len(ids)} tokens; raise SEQ_LEN={SEQ_LEN}.")
  tokens = np.full(SEQ_LEN, tokenizer.pad_id, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros(SEQ_LEN, bool)
  mask[len(prompt):len(ids)] = True
  return tokens, mask


def _batches(recipe: Recipe, tokenizer: models.Tokenizer, exclude: set[str]):
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
      rows.append(encode(tokenizer, problem, solution))
    yield np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def train(recipe: Recipe, tokenizer: models.Tokenizer, exclude: set[str]) -> models.Transformer:
  """Supervised next-token training of a fresh model on ``recipe``'s worked solutions."""
  model = models.init_model(model_config(recipe, tokenizer), seed=recipe.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, 50, recipe.steps, recipe.lr / 20)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  def loss_fn(params, tokens_BT, mask_BT):
    logits_BTV = nnx.merge(graphdef, params)(tokens_BT[:, :-1],
                                             mask_BT=tokens_BT[:, :-1] != tokenizer.pad_id)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:])
    mask_BT = mask_BT[:, 1:]
    return jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)) / jnp.sum(mask_BT)

  @jax.jit
  def step(params, opt_state, tokens_BT, mask_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT, mask_BT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batches = _batches(recipe, tokenizer, exclude)
  start = time.perf_counter()
  for i in range(recipe.steps):
    params, opt_state, loss = step(params, opt_state, *next(batches))
    if (i + 1) % 100 == 0 or i + 1 == recipe.steps:
      log.info("%s step %d/%d: loss %.4f (%.0f s)", recipe.name, i + 1, recipe.steps,
               float(loss), time.perf_counter() - start)
  nnx.update(model, params)
  return model


def accuracy(model: models.Transformer, tokenizer: models.Tokenizer, problems: list[dict],
             temperature: float, k: int) -> float:
  """avg@k on ``problems`` through the evaluation path of training runs."""
  generate_fn = evaluate.sampler_generate_fn(model, tokenizer, None, max_new_tokens=56,
                                             temperature=temperature)
  return evaluate.evaluate(generate_fn, tokenizer, problems, k=k)["avg@k"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tropd_jax.demo.make_models",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=ASSETS, help="output directory (default: the shipped assets)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  start = time.perf_counter()
  heldout = task.make_problems(NUM_HELDOUT, HELDOUT_SEED)
  exclude = {p.prompt for p in heldout}
  train_prompts = task.make_problems(NUM_TRAIN, TRAIN_SEED, exclude=exclude)
  task.write_jsonl(os.path.join(args.out, "heldout.jsonl"), [p.record() for p in heldout])
  task.write_jsonl(os.path.join(args.out, "train.jsonl"), [p.record() for p in train_prompts])
  tok_dir = os.path.join(args.out, "tokenizer")
  tokenizer = build_tokenizer(tok_dir)
  records = [p.record() for p in heldout]
  for recipe in (TEACHER, STUDENT):
    model = train(recipe, tokenizer, exclude)
    models.save_pretrained(model, os.path.join(args.out, recipe.name), tokenizer_dir=tok_dir)
    log.info("%s (%d parameters): held-out accuracy %.1f%% sampled at temperature %.1f "
             "(avg@%d, as configs/demo.py evaluates), %.1f%% greedy", recipe.name,
             model.cfg.num_params(), 100 * accuracy(model, tokenizer, records, EVAL_TEMPERATURE, EVAL_K),
             EVAL_TEMPERATURE, EVAL_K, 100 * accuracy(model, tokenizer, records, 0.0, 1))
  import shutil

  shutil.rmtree(tok_dir)
  log.info("done in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
  main()
