"""Drawing one token per row from its logits: vocabulary mask, temperature, top-k, top-p.

Shape key (tropd_jax/__init__.py): B rows, V vocabulary rows, K kept tokens (top-k).

Row ``r`` draws its ``t``-th token with ``fold_in(row_key_r, t)`` (``token_keys``), so its draws
depend on its own key only: not on the slot it sits in, nor on what else is decoded beside it.

Keys are raw threefry key data (uint32 ``[..., 2]``, what ``jax.random.key_data`` gives), and the
hash is written out here (``threefry2x32``): the same bits as ``jax.random.fold_in`` and
``jax.random.gumbel`` (with jax's default ``jax_threefry_partitionable``), which XLA:CPU
otherwise runs as a loop of five trips per call, with copies in each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 hash (20 rounds) of counters ``(x1, x2)`` under key ``(k1, k2)``, all
  uint32 of one shape (or broadcastable): ``jax.random``'s hash, unrolled."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def seed_key(seed) -> jax.Array:
  """uint32 ``[2]``: the data of ``jax.random.key(seed)`` (threefry) for a seed in [0, 2**32)."""
  return jnp.stack([jnp.uint32(0), jnp.asarray(seed).astype(jnp.uint32)])


def fold_in(keys_N2: jax.Array, data_N) -> jax.Array:
  """uint32 ``[N, 2]``: ``jax.random.fold_in`` of each key with its ``data_N`` (ints >= 0);
  a single key ``[2]`` or a single datum is broadcast."""
  data_N = jnp.asarray(data_N).astype(jnp.uint32)
  shape = jnp.broadcast_shapes(keys_N2.shape[:-1], data_N.shape)
  data_N = jnp.broadcast_to(data_N, shape)
  o1, o2 = threefry2x32(keys_N2[..., 0], keys_N2[..., 1], jnp.zeros_like(data_N), data_N)
  return jnp.stack([o1, o2], axis=-1)


def gumbel(keys_B2: jax.Array, v: int) -> jax.Array:
  """float32 ``[B, V]``: ``jax.random.gumbel(key_b, (V,))`` for each row's key."""
  counts_1V = jax.lax.broadcasted_iota(jnp.uint32, (1, v), 1)
  o1, o2 = threefry2x32(keys_B2[:, :1], keys_B2[:, 1:], jnp.zeros_like(counts_1V), counts_1V)
  mantissa = ((o1 ^ o2) >> np.uint32(9)) | np.uint32(0x3F800000)  # [1, 2)
  tiny = jnp.finfo(jnp.float32).tiny
  uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
  uniform = jnp.maximum(tiny, uniform * (1.0 - tiny) + tiny)
  return -jnp.log(-jnp.log(uniform))


def filter_logits(logits_BV: jax.Array, config, temperature=None, top_p=None) -> jax.Array:
  """Float32 logits of the distribution tokens are drawn from: vocab-masked, scaled, filtered.

  Filtered-out tokens get ``-inf``. Tokens tied with the k-th (or the nucleus' last) logit are
  kept, so a set may exceed ``top_k`` only on exact ties. ``config`` decides what is applied
  (greedy or not, the vocabulary mask, top-k, whether a nucleus is cut); ``temperature`` and
  ``top_p`` (float32 scalars, may be traced; default: the config's) set how much.
  """
  temperature = config.temperature if temperature is None else temperature
  top_p = config.top_p if top_p is None else top_p
  logits_BV = logits_BV.astype(jnp.float32)
  v = logits_BV.shape[-1]
  if config.vocab_size is not None and config.vocab_size < v:
    ids_BV = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    logits_BV = jnp.where(ids_BV < config.vocab_size, logits_BV, -jnp.inf)
  if config.greedy:
    return logits_BV
  logits_BV = logits_BV / temperature
  sorted_BK = None
  if 0 < config.top_k < v:
    sorted_BK, _ = jax.lax.top_k(logits_BV, config.top_k)
    logits_BV = jnp.where(logits_BV >= sorted_BK[:, -1:], logits_BV, -jnp.inf)
  if config.top_p < 1:
    if sorted_BK is None:
      threshold_B1 = _nucleus_threshold(logits_BV, top_p)[:, None]
    else:  # Within the top k, sorted already.
      probs_BK = jax.nn.softmax(sorted_BK, axis=-1)
      # Keep a token while the mass strictly above it is below top_p (the first is always kept).
      above_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
      last_B = jnp.sum(above_BK < top_p, axis=-1) - 1
      threshold_B1 = jnp.take_along_axis(sorted_BK, last_B[:, None], axis=-1)
    logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
  return logits_BV


def _ordered(x: jax.Array) -> jax.Array:
  """float32 -> uint32 keys in the same order (sign-magnitude to offset binary)."""
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(u >> 31 == 0, u | jnp.uint32(0x80000000), ~u)


def _from_ordered(key: jax.Array) -> jax.Array:
  u = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(u, jnp.float32)


def _nucleus_threshold(logits_BV: jax.Array, top_p: float) -> jax.Array:
  """[B] the smallest logit of each row's nucleus, by bisection instead of a full sort.

  The nucleus is the most probable tokens down to the first whose cumulative mass reaches
  ``top_p``; its smallest logit is the largest ``t`` with ``mass(logits >= t) >= top_p``.
  Bisecting over the 2**32 float32 bit patterns finds it exactly in 32 masked sums over V
  (a sort of ``[B, V]`` is ~40x slower on CPU).
  """
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)

  def halve(_, bounds):
    lo_B, hi_B = bounds
    mid_B = lo_B + (hi_B - lo_B + 1) // 2
    kept_B = jnp.where(logits_BV >= _from_ordered(mid_B)[:, None], probs_BV, 0.0)
    ok_B = jnp.sum(kept_B, axis=-1) >= top_p
    return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B - 1)

  bounds = (_ordered(jnp.min(logits_BV, axis=-1)), _ordered(jnp.max(logits_BV, axis=-1)))
  lo_B, _ = jax.lax.fori_loop(0, 32, halve, bounds)
  return _from_ordered(lo_B)


def _argmax(x_BV: jax.Array) -> jax.Array:
  """First index of each row's maximum, as ``jnp.argmax``: two plain reductions, which XLA:CPU
  runs several times faster than argmax's variadic (value, index) reduction."""
  ids_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
  at_max_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(at_max_BV, ids_BV, x_BV.shape[-1] - 1), axis=-1)


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, config, temperature=None,
                  top_p=None):
  """Draws one token per row with its key (uint32 ``[B, 2]``); returns ``(tokens_B int32,
  logp_B float32)`` (``temperature``, ``top_p``: as ``filter_logits``)."""
  logits_BV = filter_logits(logits_BV, config, temperature, top_p)
  if config.greedy:
    tokens_B = _argmax(logits_BV)
  else:  # Gumbel-max, as jax.random.categorical, with the faster argmax.
    tokens_B = _argmax(logits_BV + gumbel(keys_B, logits_BV.shape[1]))
  picked_B = jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, picked_B - jax.nn.logsumexp(logits_BV, axis=-1)


def token_keys(row_keys_B2: jax.Array, index_B) -> jax.Array:
  """uint32 ``[B, 2]``: the key of each row's token number ``index_B`` (an int or [B] ints)."""
  return fold_in(row_keys_B2, index_B)


def is_stop(tokens_B: jax.Array, config) -> jax.Array:
  """bool [B]: the token is one of ``config.stop_ids``."""
  if not config.stop_ids:
    return jnp.zeros(tokens_B.shape, bool)
  stop_1K = jnp.asarray(config.stop_ids, jnp.int32)[None]
  return jnp.any(tokens_B[:, None] == stop_1K, axis=-1)
