"""Supervised training of the embedded tasks' tiny models: tokenizer, architecture, loop, accuracy.

Shared by ``tropd_jax.demo.make_models`` and ``tropd_jax.tally.make_models``: each task draws its
own worked solutions and passes them here as ``(tokens [B, T], loss mask [B, T])`` batches; the
models are Qwen2-style with tied embeddings, trained from scratch by next-token prediction on the
response tokens only, and written as HF checkpoints by ``models.save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tropd_jax import evaluate, models

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BYTES = 256
"""Byte-level alphabet: a vocabulary of ``BYTES + len(SPECIAL_TOKENS)`` merges nothing, so every
character is one token."""

Batches = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One model's size and supervised training.

  Attributes:
    name: output directory name.
    d_model, num_layers, num_heads, d_ff: the architecture (a Qwen2-style model, tied embeddings).
    steps: optimizer steps; batch: sequences per step; lr: AdamW peak learning rate (linear
      warmup over ``warmup`` steps, then cosine decay to lr / 20).
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
  seed: int
  warmup: int = 50


def build_tokenizer(out_dir: str, corpus: Iterable[str], *, vocab_size: int,
                    split_digits: bool = True) -> models.Tokenizer:
  """Trains a byte-level BPE tokenizer on ``corpus`` and saves it with the chat template.

  Args:
    out_dir: where ``tokenizer.json`` (and the chat template) go.
    corpus: the task's text.
    vocab_size: tokens in all; ``BYTES + len(SPECIAL_TOKENS)`` learns no merges (one token per
      character).
    split_digits: one token per digit, whatever the merges (as Qwen's tokenizer does); it keeps
      the arithmetic learnable by tiny models.
  """
  from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
  from tokenizers import models as tok_models
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(tok_models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)
  return models.load_tokenizer(out_dir)


def model_config(recipe: Recipe, tokenizer: models.Tokenizer,
                 max_positions: int = 256) -> models.ModelConfig:
  eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  return models.ModelConfig(
      model_type="qwen2", vocab_size=tokenizer.vocab_size, d_model=recipe.d_model,
      d_ff=recipe.d_ff, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
      num_kv_heads=recipe.num_heads, head_dim=recipe.d_model // recipe.num_heads,
      qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=max_positions,
      dtype="float32", eos_token_id=(eos,))


def encode(tokenizer: models.Tokenizer, prompt: str, solution: str, seq_len: int):
  """``(tokens [seq_len], loss mask [seq_len])``: prompt + solution + end token, right-padded."""
  prompt_ids = tokenizer.encode_prompt(prompt)
  ids = prompt_ids + tokenizer.encode(solution) + [tokenizer.stop_ids[0]]
  if len(ids) > seq_len:
    raise ValueError(f"{prompt!r} takes {len(ids)} tokens; raise seq_len={seq_len}.")
  tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros(seq_len, bool)
  mask[len(prompt_ids):len(ids)] = True
  return tokens, mask


def stack(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """``encode`` rows as one ``(tokens [B, T], mask [B, T])`` batch."""
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def train(recipe: Recipe, tokenizer: models.Tokenizer, batches: Batches, *,
          max_positions: int = 256, log_every: int = 100) -> models.Transformer:
  """Next-token training of a fresh model on ``batches`` (response tokens only)."""
  model = models.init_model(model_config(recipe, tokenizer, max_positions), seed=recipe.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, recipe.warmup, recipe.steps,
                                                recipe.lr / 20)
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

  start = time.perf_counter()
  for i in range(recipe.steps):
    params, opt_state, loss = step(params, opt_state, *next(batches))
    if (i + 1) % log_every == 0 or i + 1 == recipe.steps:
      log.info("%s step %d/%d: loss %.4f (%.0f s)", recipe.name, i + 1, recipe.steps,
               float(loss), time.perf_counter() - start)
  nnx.update(model, params)
  return model


def accuracy(model: models.Transformer, tokenizer: models.Tokenizer, problems: list[dict],
             temperature: float, k: int, max_new_tokens: int) -> float:
  """avg@k on ``problems`` through the evaluation path of training runs."""
  generate_fn = evaluate.sampler_generate_fn(model, tokenizer, None, max_new_tokens=max_new_tokens,
                                             temperature=temperature)
  return evaluate.evaluate(generate_fn, tokenizer, problems, k=k)["avg@k"]


def write_jsonl(path: str, records: Sequence[dict]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """How ``make_assets`` reports each model's held-out accuracy: as the task's config evaluates
  (avg@``k`` sampled at ``temperature``), and greedy; ``config`` names that config."""

  temperature: float
  k: int
  max_new_tokens: int
  config: str


def make_assets(out: str, heldout: Sequence[dict], train_prompts: Sequence[dict],
                build_tokenizer: Callable[[str], models.Tokenizer],
                recipes: Sequence[Recipe],
                batches: Callable[[Recipe, models.Tokenizer], Batches],
                evaluation: Evaluation, *, max_positions: int = 256) -> dict[str, float]:
  """Writes a task's assets into ``out`` and returns each model's sampled held-out accuracy.

  ``heldout.jsonl`` and ``train.jsonl`` (the records given), then one HF checkpoint per recipe
  (``<out>/<recipe.name>``: trained on ``batches(recipe, tokenizer)``, saved with the tokenizer
  that ``build_tokenizer(dir)`` trains and writes), each evaluated on the held-out records.
  """
  start = time.perf_counter()
  write_jsonl(os.path.join(out, "heldout.jsonl"), heldout)
  write_jsonl(os.path.join(out, "train.jsonl"), train_prompts)
  tok_dir = os.path.join(out, "tokenizer")
  tokenizer = build_tokenizer(tok_dir)
  accuracies, problems, ev = {}, list(heldout), evaluation
  for recipe in recipes:
    model = train(recipe, tokenizer, batches(recipe, tokenizer), max_positions=max_positions)
    models.save_pretrained(model, os.path.join(out, recipe.name), tokenizer_dir=tok_dir)
    sampled = accuracy(model, tokenizer, problems, ev.temperature, ev.k, ev.max_new_tokens)
    greedy = accuracy(model, tokenizer, problems, 0.0, 1, ev.max_new_tokens)
    log.info("%s (%d parameters): held-out accuracy %.1f%% sampled at temperature %.1f "
             "(avg@%d, as %s evaluates), %.1f%% greedy", recipe.name, model.cfg.num_params(),
             100 * sampled, ev.temperature, ev.k, ev.config, 100 * greedy)
    accuracies[recipe.name] = sampled
  shutil.rmtree(tok_dir)
  log.info("done in %.0f s", time.perf_counter() - start)
  return accuracies
