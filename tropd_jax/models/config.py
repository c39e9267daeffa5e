"""ModelConfig: the architecture of one decoder-only transformer.

Covers the Qwen2/Qwen2.5 (q/k/v bias), Qwen3 (q/k RMSNorm) and Llama 3 (llama3
RoPE scaling) families. Built from a Hugging Face ``config.json`` in either the
legacy layout (top-level ``rope_theta``/``rope_scaling``/``torch_dtype``) or the
newer one (``rope_parameters``/``dtype``), or from a named preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

MODEL_TYPES = ("qwen2", "qwen3", "llama")
ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling; ``rope_type='default'`` means none."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (hashable, so it can be a static jit argument)."""

  model_type: str
  vocab_size: int  # Rows of the embedding table (may exceed the tokenizer's size).
  d_model: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 32_768
  dtype: str = "float32"  # Parameter dtype; compute accumulates in float32.
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(
          f"model_type={self.model_type!r} is not supported; use one of {MODEL_TYPES}."
      )
    if self.rope_scaling.rope_type not in ROPE_TYPES:
      raise ValueError(
          f"rope_scaling.rope_type={self.rope_scaling.rope_type!r} is not supported; "
          f"use one of {ROPE_TYPES}."
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
      )
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {tuple(_DTYPES)}.")

  @property
  def param_dtype(self):
    return _DTYPES[self.dtype]

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  def num_params(self) -> int:
    d, f, h = self.d_model, self.d_ff, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + embed + d

  # --- Hugging Face config.json --------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike, *, dtype: str | None = None):
    """Builds a config from an HF ``config.json`` dict or path (legacy or new layout)."""
    if not isinstance(hf, dict):
      with open(hf) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(
          f"model_type={model_type!r} in config.json is not supported; "
          f"tropd_jax loads {MODEL_TYPES}."
      )
    rope = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    scaling = {**legacy_scaling, **rope}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", 8192)
        ),
    )
    if hf.get("use_sliding_window"):
      raise ValueError(
          "use_sliding_window=true in config.json: sliding-window attention is not "
          "supported; set it to false (full attention)."
      )
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    if dtype is None:
      dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return cls(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 32_768)),
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The HF ``config.json`` dict (legacy layout, which every reader accepts)."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    rope_scaling = None
    if self.rope_scaling.rope_type != "default":
      rope_scaling = {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor}
      if self.rope_scaling.rope_type == "llama3":
        rope_scaling.update(
            low_freq_factor=self.rope_scaling.low_freq_factor,
            high_freq_factor=self.rope_scaling.high_freq_factor,
            original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
        )
    eos = list(self.eos_token_id)
    hf = {
        "architectures": [arch[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "intermediate_size": self.d_ff,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "torch_dtype": self.dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "use_cache": True,
    }
    if self.model_type != "qwen2":
      hf["attention_bias"] = self.o_bias
    if self.model_type == "qwen2":
      hf["use_sliding_window"] = False
    return hf

  # --- Presets --------------------------------------------------------------

  @classmethod
  def preset(cls, name: str, **overrides) -> ModelConfig:
    """A named size: ``ModelConfig.preset('qwen3_1p7b', dtype='bfloat16')``."""
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def _qwen2(**kw) -> ModelConfig:
  return ModelConfig(
      model_type="qwen2", qkv_bias=True, rope_theta=10_000.0, max_position_embeddings=131_072,
      dtype="bfloat16", bos_token_id=151646, eos_token_id=(151643,), **kw,
  )


def _qwen3(**kw) -> ModelConfig:
  return ModelConfig(
      model_type="qwen3", qk_norm=True, head_dim=128, rope_theta=1_000_000.0,
      max_position_embeddings=40_960, vocab_size=151_936, dtype="bfloat16",
      bos_token_id=151643, eos_token_id=(151645,), **kw,
  )


PRESETS: dict[str, ModelConfig] = {
    # DeepSeek-R1-Distill-Qwen-1.5B (the paper's student).
    "deepseek_r1_distill_qwen_1p5b": _qwen2(
        vocab_size=151_936, d_model=1536, d_ff=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128,
    ),
    # Skywork-OR1-(Math-)7B, a DeepSeek-R1-Distill-Qwen-7B descendant (the paper's teacher).
    "skywork_or1_7b": _qwen2(
        vocab_size=152_064, d_model=3584, d_ff=18_944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128,
    ),
    "qwen3_1p7b": _qwen3(
        d_model=2048, d_ff=6144, num_layers=28, num_heads=16, num_kv_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3_4b": _qwen3(
        d_model=2560, d_ff=9728, num_layers=36, num_heads=32, num_kv_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3_8b": _qwen3(
        d_model=4096, d_ff=12_288, num_layers=36, num_heads=32, num_kv_heads=8,
    ),
    "llama3_8b": ModelConfig(
        model_type="llama", vocab_size=128_256, d_model=4096, d_ff=14_336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
        max_position_embeddings=131_072, dtype="bfloat16", bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    ),
}
PRESETS["qwen3_nemotron_4b"] = PRESETS["qwen3_4b"]


# Hub checkpoints whose architecture is one of the presets: their config.json need not be fetched
# to compile for them ahead of time (``tropd_jax.aot``).
HUB_PRESETS: dict[str, str] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "deepseek_r1_distill_qwen_1p5b",
    "Skywork/Skywork-OR1-Math-7B": "skywork_or1_7b",
    "Skywork/Skywork-OR1-7B": "skywork_or1_7b",
    "Qwen/Qwen3-1.7B": "qwen3_1p7b",
    "Qwen/Qwen3-4B": "qwen3_4b",
    "Qwen/Qwen3-8B": "qwen3_8b",
    "nvidia/Qwen3-Nemotron-4B": "qwen3_nemotron_4b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3_8b",
}
