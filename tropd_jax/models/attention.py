"""Grouped-query attention over the tokens of a row (training, scoring, prefill).

Shape key (tropd_jax/__init__.py): B rows, T query positions, S key positions, D model width,
N query heads, G kv heads, Q = N // G query heads per kv head, H head dim.

Sequences are kept apart by segment ids (packed training rows; 0 marks padding): a query
attends causally to its own segment only. Decoding reads a paged KV cache instead
(``models.paged_attention``).

Attention implementations (``Attention.attention_impl``):
  ``einsum``  the reference: ``[B, G, Q, T, S]`` float32 logits, any platform.
  ``splash``  causal self-attention without a cache (training, teacher scoring) by the
              Pallas splash-attention kernel that ships with jax: logits never leave the
              chip's VMEM. Compiled by Mosaic on TPU; elsewhere it runs in Pallas' interpret
              mode (slow: tests only).
  ``auto``    ``splash`` on TPU, ``einsum`` elsewhere.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from tropd_jax import mesh as mesh_lib
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.layers import RMSNorm, expand_to, param, rope_tables, rotate

_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
ATTENTION_IMPLS = ("einsum", "splash", "auto")
# Queries per block of the blocked path (long prefills): its float32 logits are
# [B, N, QUERY_BLOCK, S] (1 GiB for 8 rows of a 28-head model at S = 9119).
QUERY_BLOCK = 128
# Query and key tile of the splash kernel.
SPLASH_BLOCK = 512


def allowed_slots(q_segment_BT, k_segment_BS, q_slot_T):
  """bool ``[B, T, S]``: query t may read key slot s if s holds a token (segment > 0) of the
  query's own segment, at or before the query's slot ``q_slot_T[t]``."""
  k_slot_S = jnp.arange(k_segment_BS.shape[1])
  same_BTS = (q_segment_BT[:, :, None] == k_segment_BS[:, None, :]) & (k_segment_BS > 0)[:, None]
  return same_BTS & (k_slot_S[None, :] <= q_slot_T[:, None])[None]


def attend(q_BTNH, k_BSGH, v_BSGH, q_segment_BT, k_segment_BS, q_slot_T):
  """Softmax attention with grouped heads; logits and softmax in float32 (the reference).

  Segments (int, 0 = empty slot) keep packed sequences apart: a query reads only its own
  segment's keys, causally by slot.
  """
  b, t, n, h = q_BTNH.shape
  g = k_BSGH.shape[2]
  q_BTGQH = q_BTNH.reshape(b, t, g, n // g, h)
  logits_BGQTS = jnp.einsum(
      "BTGQH,BSGH->BGQTS", q_BTGQH, k_BSGH, preferred_element_type=jnp.float32
  ) * (h**-0.5)
  allowed_BTS = allowed_slots(q_segment_BT, k_segment_BS, q_slot_T)
  logits_BGQTS = jnp.where(
      allowed_BTS[:, None, None], logits_BGQTS, jnp.finfo(jnp.float32).min
  )
  probs_BGQTS = jax.nn.softmax(logits_BGQTS, axis=-1)
  out_BTGQH = jnp.einsum(
      "BGQTS,BSGH->BTGQH", probs_BGQTS.astype(v_BSGH.dtype), v_BSGH,
      preferred_element_type=jnp.float32,
  )
  return out_BTGQH.reshape(b, t, n, h).astype(q_BTNH.dtype)


def attend_blocked(q_BTNH, k_BSGH, v_BSGH, q_segment_BT, k_segment_BS, q_slot_T,
                   block: int = QUERY_BLOCK):
  """``attend`` over blocks of ``block`` queries (``lax.map``): logits are ``[B, G, Q, block, S]``."""
  b, t, n, h = q_BTNH.shape
  if t <= block:
    return attend(q_BTNH, k_BSGH, v_BSGH, q_segment_BT, k_segment_BS, q_slot_T)
  num = -(-t // block)
  pad = num * block - t
  q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_segment_BT = jnp.pad(q_segment_BT, ((0, 0), (0, pad)))
  q_slot_T = jnp.pad(q_slot_T, (0, pad), constant_values=-1)
  q_MBCNH = jnp.moveaxis(q_BTNH.reshape(b, num, block, n, h), 1, 0)
  seg_MBC = jnp.moveaxis(q_segment_BT.reshape(b, num, block), 1, 0)
  out_MBCNH = jax.lax.map(
      lambda xs: attend(xs[0], k_BSGH, v_BSGH, xs[1], k_segment_BS, xs[2]),
      (q_MBCNH, seg_MBC, q_slot_T.reshape(num, block)))
  return jnp.moveaxis(out_MBCNH, 0, 1).reshape(b, num * block, n, h)[:, :t]


def platform(mesh) -> str:
  """The platform programs are compiled for: the mesh's devices' (a TPU topology when compiling
  ahead of time), else the default backend's."""
  device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  return device.platform if device is not None else jax.default_backend()


def splash_attend(q_BTNH, k_BTGH, v_BTGH, segment_ids_BT, *, block: int = SPLASH_BLOCK,
                  interpret: bool | None = None):
  """Causal self-attention over ``T`` tokens (no cache) with the Pallas splash kernel.

  Tokens attend within their segment only (packed sequences); padding (segment 0) is a segment
  of its own that real tokens never read. Padded queries attend among padding only; their
  outputs are meaningless (as with ``attend``).
  ``T`` is padded up to a multiple of the kernel tile. Under a mesh the kernel runs per shard
  (``shard_map``): rows over the batch axes, heads over ``tensor`` when both the query and the
  KV heads divide by it (else every shard computes all heads).

  Args:
    q_BTNH, k_BTGH, v_BTGH: queries, keys and values (N a multiple of G).
    segment_ids_BT: int, the sequence each token belongs to (0: padding).
    block: tile size of the kernel (query and key blocks), rounded down to fit short inputs.
    interpret: run the kernel in Pallas' interpreter; default: unless the target is a TPU.
  """
  b, t, n, h = q_BTNH.shape
  mesh = mesh_lib.current_mesh()
  if interpret is None:
    interpret = platform(mesh) != "tpu"
  block = min(block, 128 * -(-t // 128))
  t_pad = block * -(-t // block)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - t)) + ((0, 0),) * (x.ndim - 2))
  # The kernel takes no scale: fold it into q (in float32, then back to the compute dtype).
  q_BTNH = (q_BTNH.astype(jnp.float32) * h**-0.5).astype(q_BTNH.dtype)
  q_BNTH = jnp.swapaxes(pad(q_BTNH), 1, 2)
  k_BGTH = jnp.swapaxes(pad(k_BTGH), 1, 2)
  v_BGTH = jnp.swapaxes(pad(v_BTGH), 1, 2)
  segment_BT = pad(segment_ids_BT.astype(jnp.int32))
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

  def local(q_BNTH, k_BGTH, v_BGTH, segment_BT):
    heads = q_BNTH.shape[1]
    kernel = splash.make_splash_mha(
        mask=splash.MultiHeadMask([splash.CausalMask((t_pad, t_pad))] * heads),
        block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))
    return jax.vmap(one)(q_BNTH, k_BGTH, v_BGTH, segment_BT)

  if mesh is None:
    out_BNTH = local(q_BNTH, k_BGTH, v_BGTH, segment_BT)
  else:
    q_spec = mesh_lib.logical_to_spec(("batch", "heads", None, None), q_BNTH.shape, mesh)
    kv_spec = mesh_lib.logical_to_spec(("batch", "kv_heads", None, None), k_BGTH.shape, mesh)
    if q_spec[1] != kv_spec[1]:  # GQA groups must stay whole on a shard
      q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    row_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    out_BNTH = jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec), out_specs=q_spec,
        check_vma=False)(q_BNTH, k_BGTH, v_BGTH, segment_BT)
  return jnp.swapaxes(out_BNTH, 1, 2)[:, :t].astype(q_BTNH.dtype)


def resolve_impl(impl: str) -> str:
  """``einsum`` or ``splash``: ``auto`` picks ``splash`` when compiling for a TPU."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS}.")
  if impl == "auto":
    return "splash" if platform(mesh_lib.current_mesh()) == "tpu" else "einsum"
  return impl


class Attention(nnx.Module):
  """GQA with RoPE, optional q/k/v (and o) bias and optional q/k RMSNorm.

  ``attention_impl`` (one of ``ATTENTION_IMPLS``) is a static attribute; change it on a
  loaded model with ``model.set_attributes(attention_impl="splash")``.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_impl: str = "einsum"):
    resolve_impl(attention_impl)
    dt = cfg.param_dtype
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_DNH = param(rngs, (d, n, h), dt, ("embed", "heads", "head_dim"))
    self.k_DGH = param(rngs, (d, k, h), dt, ("embed", "kv_heads", "head_dim"))
    self.v_DGH = param(rngs, (d, k, h), dt, ("embed", "kv_heads", "head_dim"))
    self.o_NHD = param(rngs, (n, h, d), dt, ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias_NH = param(None, (n, h), dt, ("heads", "head_dim"), init="zeros")
      self.k_bias_GH = param(None, (k, h), dt, ("kv_heads", "head_dim"), init="zeros")
      self.v_bias_GH = param(None, (k, h), dt, ("kv_heads", "head_dim"), init="zeros")
    if cfg.o_bias:
      self.o_bias_D = param(None, (d,), dt, ("embed",), init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
    self.cfg = cfg
    self.attention_impl = attention_impl

  def qkv(self, x_BTD, rope):
    """Queries ``[B, T, N, H]``, keys and values ``[B, T, G, H]`` (biases, q/k norm, RoPE with
    ``rope = layers.rope_tables(positions_BT, inv_freq_h)``)."""
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_DNH[...])
    k_BTGH = jnp.einsum("BTD,DGH->BTGH", x_BTD, self.k_DGH[...])
    v_BTGH = jnp.einsum("BTD,DGH->BTGH", x_BTD, self.v_DGH[...])
    if self.cfg.qkv_bias:
      q_BTNH = q_BTNH + expand_to(self.q_bias_NH[...], 4)
      k_BTGH = k_BTGH + expand_to(self.k_bias_GH[...], 4)
      v_BTGH = v_BTGH + expand_to(self.v_bias_GH[...], 4)
    if self.cfg.qk_norm:
      q_BTNH, k_BTGH = self.q_norm(q_BTNH), self.k_norm(k_BTGH)
    q_BTNH = mesh_lib.shard(rotate(q_BTNH, rope), ("batch", "length", "heads", "head_dim"))
    k_BTGH = mesh_lib.shard(rotate(k_BTGH, rope), _KV_AXES)
    return q_BTNH, k_BTGH, mesh_lib.shard(v_BTGH, _KV_AXES)

  def output(self, out_BTNH):
    """The output projection ``[B, T, N, H] -> [B, T, D]``."""
    # Contracting (N, H) in this order, the layout both operands have: an einsum may order
    # them (H, N), and XLA:CPU then transposes the [N, H, D] weight at every decode step.
    out_BTD = jax.lax.dot_general(out_BTNH, self.o_NHD[...], (((2, 3), (0, 1)), ((), ())))
    if self.cfg.o_bias:
      out_BTD = out_BTD + expand_to(self.o_bias_D[...], 3)
    return out_BTD

  def __call__(self, x_BTD, positions_BT, inv_freq_h, segment_ids_BT, *, blocked: bool = False):
    """Causal self-attention within segments; returns ``(out_BTD, (k_BTGH, v_BTGH))``.

    ``segment_ids_BT`` (int; 0 = padding) keeps packed sequences apart. ``blocked``: with the
    einsum implementation, process queries in blocks of ``QUERY_BLOCK`` (long prefills).
    """
    q_BTNH, k_BTGH, v_BTGH = self.qkv(x_BTD, rope_tables(positions_BT, inv_freq_h))
    if resolve_impl(self.attention_impl) == "splash":
      out_BTNH = splash_attend(q_BTNH, k_BTGH, v_BTGH, segment_ids_BT)
    else:
      attend_fn = attend_blocked if blocked else attend
      out_BTNH = attend_fn(q_BTNH, k_BTGH, v_BTGH, segment_ids_BT, segment_ids_BT,
                           jnp.arange(x_BTD.shape[1]))
    return self.output(out_BTNH), (k_BTGH, v_BTGH)
