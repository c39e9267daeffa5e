"""The decoder-only transformer (Qwen2 / Qwen3 / Llama 3) in Flax NNX.

Shape key: B batch, T length, S cache slots, D d_model, V vocab (embedding rows).

``hidden`` returns final-normed hidden states ``[B, T, D]``; ``head_weight``
returns the vocabulary matrix ``[V, D]`` (the embedding table when tied), so
later stages can project to the vocabulary chunk by chunk. ``model(tokens)``
gives full ``[B, T, V]`` float32 logits for convenience and tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax.models.attention import Attention, KVCache
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.layers import RMSNorm, SwiGLU, param, rope_inv_freq

_ACT_AXES = ("batch", "length", "embed")


class Block(nnx.Module):
  """Pre-norm attention + SwiGLU with residuals."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_impl: str = "einsum"):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs, attention_impl)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.param_dtype)
    self.mlp = SwiGLU(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, inv_freq_h, kv, q_segment_BT, k_segment_BS, q_slot_T,
               index):
    attn_BTD, kv = self.attn(self.attn_norm(x_BTD), positions_BT, inv_freq_h, kv, q_segment_BT,
                             k_segment_BS, q_slot_T, index)
    x_BTD = mesh_lib.shard(x_BTD + attn_BTD, _ACT_AXES)
    x_BTD = mesh_lib.shard(x_BTD + self.mlp(self.mlp_norm(x_BTD)), _ACT_AXES)
    return x_BTD, kv


class Transformer(nnx.Module):
  """A causal LM. Build it under ``jax.set_mesh(mesh)`` to shard it at creation.

  Args:
    cfg: the architecture.
    rngs: initializer randomness.
    remat: recompute each block in the backward pass (saves activation memory).
    attention_impl: ``einsum`` (reference), ``splash`` (fused TPU kernel for attention
      without a cache) or ``auto`` (``splash`` on TPU); see ``models.attention``.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: bool = False,
               attention_impl: str = "einsum"):
    self.cfg = cfg
    self.remat = remat
    dt = cfg.param_dtype
    self.embed_VD = param(rngs, (cfg.vocab_size, cfg.d_model), dt, ("vocab", "embed"))
    self.blocks = nnx.List([Block(cfg, rngs, attention_impl) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt)
    if not cfg.tie_word_embeddings:
      self.lm_head_VD = param(rngs, (cfg.vocab_size, cfg.d_model), dt, ("vocab", "embed"))

  def head_weight(self) -> jax.Array:
    """The vocabulary projection ``[V, D]``: logits = h @ w.T."""
    return (self.embed_VD if self.cfg.tie_word_embeddings else self.lm_head_VD)[...]

  def hidden(
      self,
      tokens_BT: jax.Array,
      *,
      positions_BT: jax.Array | None = None,
      mask_BT: jax.Array | None = None,
      segment_ids_BT: jax.Array | None = None,
      cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states ``[B, T, D]`` and the updated cache.

    Args:
      tokens_BT: int32 token ids.
      positions_BT: RoPE positions; default: count of real tokens before each.
      mask_BT: True for real tokens, False for padding (never attended to).
      segment_ids_BT: int, without a cache only: several sequences packed in a row, each a
        segment (1, 2, ...; 0 for padding) that attends only to itself. Give ``positions_BT``
        (each sequence's own) with it.
      cache: if given, the tokens are written at ``cache.index`` and attend to
        every filled slot before them; the returned cache has ``index + T``.
    """
    b, t = tokens_BT.shape
    if segment_ids_BT is not None:
      if cache is not None or positions_BT is None:
        raise ValueError("segment_ids_BT needs positions_BT and no cache.")
      mask_BT = segment_ids_BT > 0
    if mask_BT is None:
      mask_BT = jnp.ones((b, t), bool)
    mask_BT = mask_BT.astype(bool)
    if cache is None:
      q_segment_BT = k_segment_BS = (mask_BT.astype(jnp.int32) if segment_ids_BT is None
                                     else segment_ids_BT.astype(jnp.int32))
      q_slot_T = jnp.arange(t)
      index = None
      if positions_BT is None:
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1, 0)
    else:
      if positions_BT is None:
        positions_BT = jnp.maximum(cache.positions(mask_BT), 0)
      index = cache.index
      key_mask_BS = jax.lax.dynamic_update_slice(cache.mask_BS, mask_BT, (0, index))
      q_segment_BT = jnp.ones((b, t), jnp.int32)
      k_segment_BS = key_mask_BS.astype(jnp.int32)
      q_slot_T = index + jnp.arange(t)
    inv_freq_h = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)

    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
    x_BTD = mesh_lib.shard(x_BTD, _ACT_AXES)
    # No backward pass runs through a cache (sampling), and remat inside its decode loop fails.
    run_block = nnx.remat(Block.__call__) if self.remat and cache is None else Block.__call__
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x_BTD, (k, v) = run_block(block, x_BTD, positions_BT, inv_freq_h, kv, q_segment_BT,
                                k_segment_BS, q_slot_T, index)
      new_k.append(k)
      new_v.append(v)
    h_BTD = self.final_norm(x_BTD)
    if cache is not None:
      cache = KVCache(tuple(new_k), tuple(new_v), key_mask_BS, cache.index + t)
    return h_BTD, cache

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Full float32 logits ``[B, T, V]`` (tests and short sequences only)."""
    return jnp.einsum(
        "BTD,VD->BTV", h_BTD, self.head_weight(), preferred_element_type=jnp.float32
    )

  def __call__(self, tokens_BT, *, positions_BT=None, mask_BT=None):
    h_BTD, _ = self.hidden(tokens_BT, positions_BT=positions_BT, mask_BT=mask_BT)
    return self.logits(h_BTD)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    return KVCache.init(self.cfg, batch, max_len, dtype)


def param_shardings(model_or_state, mesh: jax.sharding.Mesh):
  """NamedShardings for every parameter, from its ``logical_axes`` metadata."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

  def one(var):
    return mesh_lib.named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(cfg: ModelConfig, **kwargs) -> Transformer:
  """The model with ``ShapeDtypeStruct`` leaves: no memory, no compute."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), **kwargs))


def init_model(cfg: ModelConfig, seed: int = 0, mesh=None, **kwargs) -> Transformer:
  """A randomly initialized model, sharded on ``mesh`` when given."""
  if mesh is None:
    return Transformer(cfg, rngs=nnx.Rngs(seed), **kwargs)
  with jax.set_mesh(mesh):
    return Transformer(cfg, rngs=nnx.Rngs(seed), **kwargs)


def with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
  return cfg if dtype is None else dataclasses.replace(cfg, dtype=dtype)
