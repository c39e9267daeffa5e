"""Building blocks: parameters with logical axes, RMSNorm, RoPE, SwiGLU.

Shape key: B batch, T query length, S key length, D d_model, F d_ff,
N query heads, G kv heads, Q = N // G, H head dim, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax.models.config import ModelConfig, RopeScaling


def expand_to(v, ndim: int):
  """Adds leading unit axes to ``v`` (explicit broadcasting; rank promotion is off)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def param(rngs: nnx.Rngs | None, shape, dtype, axes, init: str = "normal") -> nnx.Param:
  """A parameter sharded by its logical ``axes`` on the current mesh, if any.

  ``rngs=None`` (or ``init='ones'/'zeros'``) gives a constant; the loaders
  overwrite every value, so random init only matters for fresh models.
  """
  if init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  value = mesh_lib.shard(value.astype(dtype), axes)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32 (as HF does)."""

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = param(None, (dim,), dtype, ("norm",), init="ones")
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return expand_to(self.scale[...], x.ndim) * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
  """Inverse frequencies ``[H/2]`` with the config's scaling (default, linear, llama3)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  if scaling.rope_type == "llama3":
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def rope_tables(positions_BT, inv_freq_h):
  """float32 ``(cos, sin)``, each ``[B, T, 1, H]``: the rotary embedding at ``positions_BT``."""
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * expand_to(inv_freq_h, 3)
  angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], -1)
  return jnp.cos(angles_BTH)[:, :, None, :], jnp.sin(angles_BTH)[:, :, None, :]


def rotate(x_BTnH, rope):
  """Rotary embedding in the rotate-half layout HF uses, with ``rope = rope_tables(...)``;
  float32 math."""
  cos, sin = rope
  x32 = x_BTnH.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BTnH.dtype)


def computed_once(x, always_true_ints):
  """``x`` computed into a buffer of its own, on XLA:CPU.

  XLA:CPU fuses an elementwise producer into each of its consumers, and removes optimization
  barriers: a value read by many fusions (rotary sines and cosines read by every layer, queries
  gathered per KV entry) is recomputed in each. A conditional's result is a buffer, and fusion
  does not cross into it. Its predicate ``all(always_true_ints >= 0)`` is always true; being
  data-dependent, it is not folded away.
  """
  return jax.lax.cond(jnp.all(always_true_ints >= 0), lambda y: y,
                      lambda y: jax.tree.map(jnp.zeros_like, y), x)


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dt = cfg.param_dtype
    self.gate_DF = param(rngs, (cfg.d_model, cfg.d_ff), dt, ("embed", "mlp"))
    self.up_DF = param(rngs, (cfg.d_model, cfg.d_ff), dt, ("embed", "mlp"))
    self.down_FD = param(rngs, (cfg.d_ff, cfg.d_model), dt, ("mlp", "embed"))

  def __call__(self, x_BTD):
    gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_DF[...])
    up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.up_DF[...])
    h_BTF = mesh_lib.shard(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
    return jnp.einsum("BTF,FD->BTD", h_BTF, self.down_FD[...])
