"""Prefill and the decode loop, jitted as pure functions of the model state.

Shape key: C contexts (distinct prompt + prefix), n samples per context, B = C·n rows,
P context length (a bucket), T prefill chunk, J = P / T chunks, N max_new_tokens,
S = P + N - 1 cache slots, L = P + N, D d_model, V vocabulary rows.

``prefill`` runs each context once, replicates its KV-cache rows ``n`` times and draws every
row's first token; ``decode`` runs a ``lax.while_loop`` over fixed ``[B, N]`` buffers (stopping
when every row has ended, after ``N`` tokens, or when the cache is full), the cache donated, and
returns the finished ``Rollout``. The model graph and the ``SamplerConfig`` are static arguments,
so the jit cache is shared by every ``Sampler`` of the process; each trace bumps
``compile_counts()``.

Row ``r`` draws its token at step ``t`` with ``fold_in(fold_in(key(seed), r), t)``: the draws
depend on the seed and the global row index only, not on how rows are grouped into micro-batches.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax.models.attention import KVCache
from tropd_jax.sampling.config import SamplerConfig
from tropd_jax.sampling.rollout import PaddedRollout

_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
_ROW_AXES = ("batch", "length")
_COMPILES: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
  """Compilations of each sampler phase so far in this process (``prefill``, ``decode``)."""
  return dict(_COMPILES)


def cache_len(config: SamplerConfig, context_len: int) -> int:
  """S: the last drawn token is never fed back, so N - 1 slots follow the context."""
  return context_len + config.max_new_tokens - 1


def filter_logits(logits_BV: jax.Array, config: SamplerConfig) -> jax.Array:
  """Float32 logits of the distribution tokens are drawn from: vocab-masked, scaled, filtered.

  Filtered-out tokens get ``-inf``. Tokens tied with the k-th (or the nucleus' last) logit are
  kept, so a set may exceed ``top_k`` only on exact ties.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  v = logits_BV.shape[-1]
  if config.vocab_size is not None and config.vocab_size < v:
    ids_BV = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    logits_BV = jnp.where(ids_BV < config.vocab_size, logits_BV, -jnp.inf)
  if config.greedy:
    return logits_BV
  logits_BV = logits_BV / config.temperature
  sorted_BK = None
  if 0 < config.top_k < v:
    sorted_BK, _ = jax.lax.top_k(logits_BV, config.top_k)
    logits_BV = jnp.where(logits_BV >= sorted_BK[:, -1:], logits_BV, -jnp.inf)
  if config.top_p < 1:
    if sorted_BK is None:
      threshold_B1 = _nucleus_threshold(logits_BV, config.top_p)[:, None]
    else:  # Within the top k, sorted already.
      probs_BK = jax.nn.softmax(sorted_BK, axis=-1)
      # Keep a token while the mass strictly above it is below top_p (the first is always kept).
      above_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
      last_B = jnp.sum(above_BK < config.top_p, axis=-1) - 1
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


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, config: SamplerConfig):
  """Draws one token per row; returns ``(tokens_B int32, logp_B float32)``."""
  logits_BV = filter_logits(logits_BV, config)
  if config.greedy:
    tokens_B = _argmax(logits_BV)
  else:  # Gumbel-max, as jax.random.categorical, with the faster argmax.
    gumbel_BV = jax.vmap(lambda key: jax.random.gumbel(key, logits_BV.shape[1:]))(keys_B)
    tokens_B = _argmax(logits_BV + gumbel_BV)
  picked_B = jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, picked_B - jax.nn.logsumexp(logits_BV, axis=-1)


def _step_keys(row_keys_B: jax.Array, step) -> jax.Array:
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)


def _is_stop(tokens_B: jax.Array, config: SamplerConfig) -> jax.Array:
  if not config.stop_ids:
    return jnp.zeros(tokens_B.shape, bool)
  stop_1K = jnp.asarray(config.stop_ids, jnp.int32)[None]
  return jnp.any(tokens_B[:, None] == stop_1K, axis=-1)


def _repeat_rows(x, n: int, axes):
  return x if n == 1 else mesh_lib.shard(jnp.repeat(x, n, axis=0), axes)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "n"))
def prefill(graphdef, state, tokens_CP, mask_CP, seed, row_ids_B, *, config: SamplerConfig, n: int):
  """Runs the contexts, replicates each one's cache rows ``n`` times, draws the first tokens.

  Args:
    graphdef, state: ``nnx.split`` of the model.
    tokens_CP: int32 [C, P] left-padded contexts (prompt + forced prefix).
    mask_CP: bool [C, P] real context tokens.
    seed: int32 [] the call's seed.
    row_ids_B: int32 [B] global row index of each row (rows of context c are c·n … c·n + n - 1).
    config: the sampler config (static).
    n: samples per context (static).

  Returns:
    ``(cache, first_B, first_logp_B, row_keys_B)``: the filled cache of B rows and S slots, the
    first drawn token and its log-prob, and each row's key.
  """
  _COMPILES["prefill"] += 1
  model = nnx.merge(graphdef, state)
  c, p = tokens_CP.shape
  cache = model.init_cache(c, cache_len(config, p), config.cache_dtype)
  chunk = config.prefill_chunk if 0 < config.prefill_chunk < p else p
  if chunk == p:
    h_CPD, cache = model.hidden(tokens_CP, mask_BT=mask_CP, cache=cache)
    h_CD = h_CPD[:, -1]
  else:
    # P is a multiple of the chunk (SamplerConfig.bucket); each chunk attends to the cache so far.
    def prefill_chunk(cache, xs):
      h_CTD, cache = model.hidden(xs[0], mask_BT=xs[1], cache=cache)
      return cache, h_CTD[:, -1]

    by_chunk = lambda x: jnp.swapaxes(x.reshape(c, p // chunk, chunk), 0, 1)
    cache, h_JCD = jax.lax.scan(prefill_chunk, cache, (by_chunk(tokens_CP), by_chunk(mask_CP)))
    h_CD = h_JCD[-1]
  cache = KVCache(
      k=tuple(_repeat_rows(k, n, _KV_AXES) for k in cache.k),
      v=tuple(_repeat_rows(v, n, _KV_AXES) for v in cache.v),
      mask_BS=_repeat_rows(cache.mask_BS, n, _ROW_AXES),
      index=cache.index,
  )
  h_B1D = _repeat_rows(h_CD[:, None], n, ("batch", "length", "embed"))
  row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids_B)
  first_B, first_logp_B = sample_tokens(model.logits(h_B1D)[:, 0], _step_keys(row_keys_B, 0), config)
  return cache, first_B, first_logp_B, row_keys_B


@functools.partial(
    jax.jit, static_argnames=("graphdef", "config", "n"), donate_argnames=("cache",)
)
def decode(graphdef, state, cache: KVCache, first_B, first_logp_B, row_keys_B, tokens_CP,
           prompt_mask_CP, prefix_mask_CP, *, config: SamplerConfig, n: int):
  """Draws tokens 1 … N-1 of every row and assembles the ``Rollout`` ``[B, P + N]``.

  Returns ``(rollout, cache)``: handing the cache back lets XLA run the loop in the donated
  buffer instead of a copy; callers drop it.

  Args:
    graphdef, state: ``nnx.split`` of the model.
    cache: the cache from ``prefill`` (donated).
    first_B, first_logp_B, row_keys_B: from ``prefill``.
    tokens_CP, prompt_mask_CP, prefix_mask_CP: the contexts and their masks, [C, P].
    config: the sampler config (static).
    n: samples per context (static).
  """
  _COMPILES["decode"] += 1
  model = nnx.merge(graphdef, state)
  b, steps = first_B.shape[0], config.max_new_tokens
  tokens_BN = jnp.full((b, steps), config.pad_id, jnp.int32).at[:, 0].set(first_B)
  logp_BN = jnp.zeros((b, steps), jnp.float32).at[:, 0].set(first_logp_B)
  init = (jnp.int32(1), first_B, cache, tokens_BN, logp_BN, jnp.ones((b,), jnp.int32),
          _is_stop(first_B, config))

  def cond(carry):
    step, _, cache, _, _, _, done_B = carry
    return (step < steps) & ~jnp.all(done_B) & (cache.index < cache.max_len)

  def body(carry):
    step, last_B, cache, tokens_BN, logp_BN, lengths_B, done_B = carry
    h_B1D, cache = model.hidden(last_B[:, None], cache=cache)
    next_B, logp_B = sample_tokens(model.logits(h_B1D)[:, 0], _step_keys(row_keys_B, step), config)
    next_B = jnp.where(done_B, config.pad_id, next_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, next_B[:, None], (0, step))
    logp_BN = jax.lax.dynamic_update_slice(logp_BN, logp_B[:, None], (0, step))
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    done_B = done_B | _is_stop(next_B, config)
    return step + 1, next_B, cache, tokens_BN, logp_BN, lengths_B, done_B

  _, _, cache, tokens_BN, logp_BN, lengths_B, stopped_B = jax.lax.while_loop(cond, body, init)
  ctx_BP, prompt_BP, prefix_BP = (_repeat_rows(x, n, _ROW_AXES)
                                  for x in (tokens_CP, prompt_mask_CP, prefix_mask_CP))
  none_BN = jnp.zeros((b, steps), bool)
  row = lambda a, z: mesh_lib.shard(jnp.concatenate([a, z], axis=1), _ROW_AXES)
  rollout = PaddedRollout(
      tokens=row(jnp.where(prompt_BP | prefix_BP, ctx_BP, config.pad_id), tokens_BN),
      prompt_mask=row(prompt_BP, none_BN),
      prefix_mask=row(prefix_BP, none_BN),
      completion_mask=row(jnp.zeros_like(prompt_BP), jnp.arange(steps)[None] < lengths_B[:, None]),
      logp=row(jnp.zeros(prompt_BP.shape, jnp.float32), logp_BN),
      lengths=lengths_B,
      stopped=stopped_B,
  )
  return rollout, cache
