"""Grouped-query attention and the KV cache the sampler drives.

Shape key: B batch, T query length, S key slots, D d_model, N query heads,
K kv heads, G = N // K, H head dim.

The cache is a fixed ``[B, S, K, H]`` buffer per layer with one write index
shared by all rows. Rows of different lengths are left-padded: ``mask_BS``
says which slots hold real tokens, so padding is never attended to, and a
row's positions count only its real tokens. Prefill writes ``T`` slots at
``index``; decode is the same call with ``T = 1``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.layers import RMSNorm, apply_rope, expand_to, param

_KV_AXES = ("batch", "length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer, plus which slots are filled.

  Attributes:
    k: per layer ``[B, S, K, H]``.
    v: per layer ``[B, S, K, H]``.
    mask_BS: ``bool [B, S]``, True where a slot holds a real (non-pad) token.
    index: ``int32 []``, the next slot to write (shared by all rows).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask_BS: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.param_dtype
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = lambda: mesh_lib.shard(jnp.zeros(shape, dtype), _KV_AXES)
    return cls(
        k=tuple(zeros() for _ in range(cfg.num_layers)),
        v=tuple(zeros() for _ in range(cfg.num_layers)),
        mask_BS=mesh_lib.shard(jnp.zeros((batch, max_len), bool), ("batch", "length")),
        index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.mask_BS.shape[1]

  @staticmethod
  def num_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or cfg.param_dtype).itemsize
    return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * itemsize

  def positions(self, mask_BT: jax.Array) -> jax.Array:
    """Positions of new tokens: each row's count of real tokens before them."""
    done_B = jnp.sum(self.mask_BS, axis=1, dtype=jnp.int32)
    return done_B[:, None] + jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1


def attend(q_BTNH, k_BSKH, v_BSKH, allowed_BTS):
  """Softmax attention with grouped heads; logits and softmax in float32."""
  b, t, n, h = q_BTNH.shape
  k_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h)
  logits_BKGTS = jnp.einsum(
      "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
  ) * (h**-0.5)
  logits_BKGTS = jnp.where(
      allowed_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min
  )
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  out_BTKGH = jnp.einsum(
      "BKGTS,BSKH->BTKGH", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
      preferred_element_type=jnp.float32,
  )
  return out_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)


class Attention(nnx.Module):
  """GQA with RoPE, optional q/k/v (and o) bias and optional q/k RMSNorm."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dt = cfg.param_dtype
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_DNH = param(rngs, (d, n, h), dt, ("embed", "heads", "head_dim"))
    self.k_DKH = param(rngs, (d, k, h), dt, ("embed", "kv_heads", "head_dim"))
    self.v_DKH = param(rngs, (d, k, h), dt, ("embed", "kv_heads", "head_dim"))
    self.o_NHD = param(rngs, (n, h, d), dt, ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias_NH = param(None, (n, h), dt, ("heads", "head_dim"), init="zeros")
      self.k_bias_KH = param(None, (k, h), dt, ("kv_heads", "head_dim"), init="zeros")
      self.v_bias_KH = param(None, (k, h), dt, ("kv_heads", "head_dim"), init="zeros")
    if cfg.o_bias:
      self.o_bias_D = param(None, (d,), dt, ("embed",), init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
    self.cfg = cfg

  def __call__(self, x_BTD, positions_BT, inv_freq_h, kv: tuple | None, allowed_BTS, index):
    """Returns ``(out_BTD, (k_BSKH, v_BSKH))``; writes into ``kv`` at ``index`` if given."""
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_DNH[...])
    k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k_DKH[...])
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v_DKH[...])
    if self.cfg.qkv_bias:
      q_BTNH = q_BTNH + expand_to(self.q_bias_NH[...], 4)
      k_BTKH = k_BTKH + expand_to(self.k_bias_KH[...], 4)
      v_BTKH = v_BTKH + expand_to(self.v_bias_KH[...], 4)
    if self.cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = mesh_lib.shard(apply_rope(q_BTNH, positions_BT, inv_freq_h),
                            ("batch", "length", "heads", "head_dim"))
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq_h)
    if kv is None:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
    else:
      start = (0, index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(kv[0], k_BTKH.astype(kv[0].dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(kv[1], v_BTKH.astype(kv[1].dtype), start)
    k_BSKH = mesh_lib.shard(k_BSKH, _KV_AXES)
    v_BSKH = mesh_lib.shard(v_BSKH, _KV_AXES)
    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)
    out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_NHD[...])
    if self.cfg.o_bias:
      out_BTD = out_BTD + expand_to(self.o_bias_D[...], 3)
    return out_BTD, (k_BSKH, v_BSKH)
