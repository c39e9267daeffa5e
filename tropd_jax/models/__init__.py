"""Decoder-only transformers (Qwen2, Qwen3, Llama 3) and their HF checkpoints."""

from tropd_jax.models.paged_attention import PagedKVCache
from tropd_jax.models.config import HUB_PRESETS, PRESETS, ModelConfig, RopeScaling
from tropd_jax.models.hf_io import from_pretrained, load_config, save_pretrained
from tropd_jax.models.tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer
from tropd_jax.models.transformer import (
    Transformer,
    abstract_model,
    init_model,
    param_shardings,
)

__all__ = [
    "HUB_PRESETS", "PRESETS", "PagedKVCache", "ModelConfig", "RopeScaling", "Transformer", "Tokenizer",
    "abstract_model", "check_same_tokenizer", "from_pretrained", "init_model",
    "load_config", "load_tokenizer", "param_shardings", "save_pretrained",
]
