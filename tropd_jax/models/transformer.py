"""The decoder-only transformer (Qwen2 / Qwen3 / Llama 3) in Flax NNX.

Shape key (tropd_jax/__init__.py): B rows, T positions, D model width, V vocabulary rows.

``hidden`` returns final-normed hidden states ``[B, T, D]``; ``head_weight``
returns the vocabulary matrix ``[V, D]`` (the embedding table when tied), so
later stages can project to the vocabulary chunk by chunk. ``model(tokens)``
gives full ``[B, T, V]`` float32 logits for convenience and tests. ``prefill`` and
``decode`` run the sampler's rows over a paged KV cache (``models.paged_attention``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax.models import attention as attention_lib
from tropd_jax.models import paged_attention as paged
from tropd_jax.models.attention import Attention
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.layers import (RMSNorm, SwiGLU, computed_once, param, rope_inv_freq,
                                     rope_tables)

_ACT_AXES = ("batch", "length", "embed")


class Block(nnx.Module):
  """Pre-norm attention + SwiGLU with residuals."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_impl: str = "einsum"):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs, attention_impl)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.param_dtype)
    self.mlp = SwiGLU(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, inv_freq_h, segment_ids_BT, blocked: bool = False):
    attn_BTD, kv = self.attn(self.attn_norm(x_BTD), positions_BT, inv_freq_h, segment_ids_BT,
                             blocked=blocked)
    return self._mlp(x_BTD + attn_BTD), kv

  def _mlp(self, x_BTD):
    x_BTD = mesh_lib.shard(x_BTD, _ACT_AXES)
    return mesh_lib.shard(x_BTD + self.mlp(self.mlp_norm(x_BTD)), _ACT_AXES)

  def decode(self, x_B1D, rope, write_attend):
    """One token per row, rotated by ``rope`` (``layers.rope_tables`` at the rows' positions).
    ``write_attend(q_BNH, k_BGH, v_BGH)`` caches the token's keys and values and attends over
    the row; it returns ``(out_BNH, cache)``."""
    q_B1NH, k_B1GH, v_B1GH = self.attn.qkv(self.attn_norm(x_B1D), rope)
    out_BNH, cache = write_attend(q_B1NH[:, 0], k_B1GH[:, 0], v_B1GH[:, 0])
    return self._mlp(x_B1D + self.attn.output(out_BNH[:, None])), cache


@nnx.remat
def _remat_block(block: Block, x_BTD, positions_BT, inv_freq_h, segment_ids_BT):
  """A training block, recomputed in the backward pass (all arguments are arrays)."""
  return block(x_BTD, positions_BT, inv_freq_h, segment_ids_BT)


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
  ) -> tuple[jax.Array, tuple]:
    """Final-normed hidden states ``[B, T, D]``, and each layer's keys and values.

    Args:
      tokens_BT: int32 token ids.
      positions_BT: RoPE positions; default: count of real tokens before each.
      mask_BT: True for real tokens, False for padding (never attended to).
      segment_ids_BT: int, several sequences packed in a row, each a segment (1, 2, ...; 0 for
        padding) that attends only to itself. Give ``positions_BT`` (each sequence's own) with it.

    Returns:
      ``(h_BTD, kv)``: kv holds ``(k_BTGH, v_BTGH)`` per layer (what ``prefill`` caches).
    """
    b, t = tokens_BT.shape
    if segment_ids_BT is None:
      mask_BT = jnp.ones((b, t), bool) if mask_BT is None else mask_BT.astype(bool)
      segment_ids_BT = mask_BT.astype(jnp.int32)
      if positions_BT is None:
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1, 0)
    elif positions_BT is None:
      raise ValueError("segment_ids_BT needs positions_BT (each sequence's own positions).")
    return self._blocks(tokens_BT, positions_BT, segment_ids_BT.astype(jnp.int32))

  def _blocks(self, tokens_BT, positions_BT, segment_ids_BT, *, blocked: bool = False,
              remat: bool | None = None):
    inv_freq_h = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
    x_BTD = mesh_lib.shard(jnp.take(self.embed_VD[...], tokens_BT, axis=0), _ACT_AXES)
    remat = self.remat if remat is None else remat
    kv = []
    for block in self.blocks:
      if remat:  # Recompute the block in the backward pass (training).
        x_BTD, layer_kv = _remat_block(block, x_BTD, positions_BT, inv_freq_h, segment_ids_BT)
      else:
        x_BTD, layer_kv = block(x_BTD, positions_BT, inv_freq_h, segment_ids_BT, blocked)
      kv.append(layer_kv)
    return self.final_norm(x_BTD), tuple(kv)

  def prefill(self, tokens_BT: jax.Array, lengths_B: jax.Array,
              cache: paged.PagedKVCache) -> tuple[jax.Array, paged.PagedKVCache]:
    """Runs each row's context and writes its keys and values into the row's pages.

    Args:
      tokens_BT: int32 contexts, left-aligned (``lengths_B`` real tokens, then padding).
      lengths_B: int32 context lengths.
      cache: the pages; ``cache.page_table_BP`` holds these rows' page tables (``B`` rows).

    Returns:
      ``(h_BD, cache)``: the final-normed hidden state of each row's last context token (it
      predicts the first sampled token), and the cache with the rows written from position 0.
    """
    b, t = tokens_BT.shape
    mask_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
    positions_BT = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    h_BTD, kv = self._blocks(tokens_BT, positions_BT, mask_BT.astype(jnp.int32), blocked=True,
                             remat=False)
    start_B = jnp.zeros((b,), jnp.int32)
    k_pages = tuple(paged.write_prefill(p, k, cache.page_table_BP, start_B, mask_BT)
                    for p, (k, _) in zip(cache.k_pages, kv))
    v_pages = tuple(paged.write_prefill(p, v, cache.page_table_BP, start_B, mask_BT)
                    for p, (_, v) in zip(cache.v_pages, kv))
    h_BD = jnp.take_along_axis(h_BTD, jnp.maximum(lengths_B - 1, 0)[:, None, None], axis=1)[:, 0]
    return h_BD, dataclasses.replace(cache, k_pages=k_pages, v_pages=v_pages)

  def decode(self, tokens_B: jax.Array, cache, **attention_options):
    """One token per row, at position ``cache.lengths_B`` (then cached there).

    Args:
      tokens_B: int32 the rows' last tokens.
      cache: a ``paged.PagedKVCache`` (``attention_options``: ``impl``, ``pages_bucket``) or
        a ``paged.LivePages`` (no options).

    Returns ``(h_BD, cache)``: the final-normed hidden state of each new token and the cache
    with its keys and values written (``lengths_B`` is left to the caller: a finished row's
    length stays).
    """
    inv_freq_h = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
    x_B1D = mesh_lib.shard(jnp.take(self.embed_VD[...], tokens_B[:, None], axis=0), _ACT_AXES)
    # Every layer rotates by the same sines and cosines: computed once, not in each layer's
    # fusions (XLA:CPU would recompute them there; measured ~0.15 ms a layer and step at
    # batch 16 and 8 query heads).
    rope = rope_tables(cache.lengths_B[:, None], inv_freq_h)
    if attention_lib.platform(mesh_lib.current_mesh()) == "cpu":
      rope = computed_once(rope, cache.lengths_B)
    for layer, block in enumerate(self.blocks):
      x_B1D, cache = block.decode(
          x_B1D, rope, functools.partial(cache.write_attend, layer, **attention_options))
    return self.final_norm(x_B1D)[:, 0], cache

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Full float32 logits ``[B, T, V]`` (tests and short sequences only)."""
    return jnp.einsum(
        "BTD,VD->BTV", h_BTD, self.head_weight(), preferred_element_type=jnp.float32
    )

  def __call__(self, tokens_BT, *, positions_BT=None, mask_BT=None):
    h_BTD, _ = self.hidden(tokens_BT, positions_BT=positions_BT, mask_BT=mask_BT)
    return self.logits(h_BTD)

  def init_cache(self, *, num_pages: int, page_size: int, num_slots: int,
                 max_pages_per_row: int, dtype=None) -> paged.PagedKVCache:
    """An empty paged KV cache for this model (see ``models.paged_attention``)."""
    return paged.PagedKVCache.init(
        self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, num_pages, page_size,
        num_slots, max_pages_per_row, dtype or self.cfg.param_dtype)


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
