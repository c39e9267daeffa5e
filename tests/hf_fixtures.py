"""Tiny real Hugging Face checkpoints made on the spot with transformers + tokenizers."""

from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 97

FAST_COMPILE = "--xla_backend_optimization_level=0"
"""XLA flags of every test process: tiny programs compile about a third faster unoptimized."""


def xla_flags(devices: int | None = None) -> str:
  """``XLA_FLAGS`` for a command a test starts: ``devices`` simulated CPU devices (None: 1)."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
  return FAST_COMPILE + count

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hf_config(kind: str, *, tie: bool = False, kv_heads: int = 2, vocab: int = VOCAB,
              layers: int = 2, d_model: int = 32, heads: int = 4):
  import transformers

  common = dict(
      vocab_size=vocab, hidden_size=d_model, intermediate_size=48, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
      tie_word_embeddings=tie, eos_token_id=2, bos_token_id=1,
  )
  if kind == "qwen2":
    return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common)
  if kind == "qwen3":
    return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(head_dim=16, **common)
  if kind == "llama":
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        rope_scaling=scaling, rope_theta=500_000.0, **common)
  raise ValueError(kind)


def make_hf_model(path, kind: str = "qwen2", *, seed: int = 0, legacy: bool = False,
                  peaked: float = 1.0, **kw):
  """Saves a random float32 model to ``path``; returns the torch model.

  ``legacy=True`` rewrites config.json in the layout of real hub checkpoints
  (top-level ``rope_theta``/``rope_scaling``/``torch_dtype``). ``peaked``
  scales the final norm so greedy argmaxes do not hinge on rounding.
  """
  import torch

  cls, cfg = hf_config(kind, **kw)
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
    model.model.norm.weight.mul_(peaked)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  if legacy:
    to_legacy(os.path.join(path, "config.json"))
  return model


def to_legacy(config_path: str) -> None:
  with open(config_path) as f:
    hf = json.load(f)
  rope = hf.pop("rope_parameters", None) or {}
  hf["rope_theta"] = rope.pop("rope_theta", 10_000.0)
  hf["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
  hf["torch_dtype"] = hf.pop("dtype", "float32")
  with open(config_path, "w") as f:
    json.dump(hf, f, indent=2)


def make_tokenizer(path, vocab: int = VOCAB, corpus: list[str] | None = None) -> None:
  """Trains a byte-level BPE ``tokenizer.json`` of at most ``vocab`` tokens into ``path``."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  specials = ["<|endoftext|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = corpus or ["the cat sat on the mat 12 + 34 = 46\n", "user\nassistant\nsystem\n"] * 20
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|bos|>",
      pad_token="<|endoftext|>", unk_token=None,
  )
  fast.chat_template = CHAT_TEMPLATE
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)


def ragged_prompts(rng: np.random.RandomState, lengths, vocab: int = VOCAB) -> list[list[int]]:
  return [list(rng.randint(3, vocab, n)) for n in lengths]
