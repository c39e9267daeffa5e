"""Continuous batching over a paged KV cache: every sampled row of tropd_jax is drawn here.

Rows wait in a queue; a fixed number of slots decode together. The host admits waiting rows
into free slots (``prefill``: the context runs once, its keys and values go to pages of the
pool, the first token is drawn), then runs a chunk of decode steps (``decode``: one token per
slot and step, a ``lax.while_loop`` that returns early once enough rows have ended), reads
which rows ended, hands their slots and pages to waiting rows, and repeats until the queue is
empty. A row's pages are taken as it grows; when the pool runs short, the youngest row is
put back in the queue and drawn again later (with the same tokens: row ``r`` draws its token
``t`` with ``fold_in(fold_in(key(seed), r), t)``, whatever slot or step it runs in).

On the XLA attention path with one batch shard and the default pool, rows are instead
prefilled ahead into a stage (prefill calls of up to a slot count of rows) and admitted inside
the decode loop (``decode_admitting``) the step a slot's row ends: the slot's live pages pass
to the staged row, its context pages are copied in, and the ended row's tokens are kept for
the host. Slots do not idle until the host refills them, a call runs its whole chunk, and
prefills run at the batch size they are efficient at.

On a mesh the slots and the pool are split over the devices that hold different rows; each
shard's slots use only its own pages (the host allocates per shard), so nothing is gathered
inside the decode loop but a few flags; the weights come in the decode layout
(``sampling.layout``).

Shape key (tropd_jax/__init__.py): B slots, R rows of a prefill call, T context positions,
N the largest budget (``max_new_tokens``), P pages of the pool, Z tokens per page, D, V.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from tropd_jax import mesh as mesh_lib
from tropd_jax.models import paged_attention as paged
from tropd_jax.sampling import draw
from tropd_jax.sampling.config import SamplerConfig
from tropd_jax.sampling.rollout import Rollout

_SLOT_AXES = ("batch",)
_ROW_AXES = ("batch", None)
_COMPILES: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
  """Traces of each engine program so far in this process (``prefill``, ``decode``)."""
  return dict(_COMPILES)


@dataclasses.dataclass(frozen=True)
class Request:
  """One row to draw.

  Attributes:
    context: token ids the row starts from (a prompt, maybe followed by a forced prefix).
    prompt_length: how many of them are the prompt (the rest is the forced prefix).
    budget: the most tokens to draw (at most ``SamplerConfig.max_new_tokens``).
    row_id: the row's index in the call: keys its draws (``fold_in(key(seed), row_id)``).
  """

  context: tuple[int, ...]
  prompt_length: int
  budget: int
  row_id: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """The engine's device state, one entry per slot (slots split over the batch axes).

  Attributes:
    k_pages, v_pages: per layer ``[G, P, Z, H]``, the page pool.
    lengths_B: int32 tokens of the row in the cache (its context and the tokens fed back).
    last_B: int32 the last drawn token (fed at the next step).
    tokens_BN: int32 drawn tokens.
    logp_BN: float32 their log-probs under the filtered distribution they were drawn from.
    count_B: int32 tokens drawn.
    budget_B: int32 the row's budget.
    done_B: bool the row ended (stop id or budget), or the slot is empty.
    keys_B: uint32 [B, 2] the row's key.
  """

  k_pages: tuple[jax.Array, ...]
  v_pages: tuple[jax.Array, ...]
  lengths_B: jax.Array
  last_B: jax.Array
  tokens_BN: jax.Array
  logp_BN: jax.Array
  count_B: jax.Array
  budget_B: jax.Array
  done_B: jax.Array
  keys_B: jax.Array


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """What the last ``Engine.generate`` call did (host-side numbers, for logging).

  Attributes:
    rows: rows drawn.
    tokens: tokens drawn.
    slots, pages, pages_per_row: the engine's shape (global).
    kv_cache_bytes: bytes of the page pool (all devices).
    prefill_calls, decode_calls: program calls.
    decode_steps: decode steps run (each a token for every busy slot).
    occupancy: busy slot-steps / slot-steps run (each call's slots x its decode steps; the
      slots of a call are fewer than ``slots`` once the tail's rows are compacted).
    attended_pages: KV pages decode attention read per step, all shards (mean over steps; the
      XLA path reads its whole live-page list, the Pallas kernel each busy row's pages).
    drain_steps, drain_seconds, drain_occupancy: the tail of the call, after its last row was
      admitted (the last prefill dispatched, or the step of the last admission inside the
      loop; its time interpolated within its call): slots empty and none refills, until the
      longest remaining row ends. Its decode steps, wall time and ``occupancy``.
    compactions: times the tail's rows moved into half as many slots or fewer (rows admitted
      inside the decode loop: ``_StagedScheduler``).
    preemptions: rows put back in the queue for want of pages.
    seconds: wall time of the call.
    compilations: engine compilations so far in this process, per program.
  """

  rows: int = 0
  tokens: int = 0
  slots: int = 0
  pages: int = 0
  pages_per_row: int = 0
  kv_cache_bytes: int = 0
  prefill_calls: int = 0
  decode_calls: int = 0
  decode_steps: int = 0
  occupancy: float = 0.0
  attended_pages: float = 0.0
  drain_steps: int = 0
  drain_seconds: float = 0.0
  drain_occupancy: float = 0.0
  preemptions: int = 0
  compactions: int = 0
  seconds: float = 0.0
  compilations: dict = dataclasses.field(default_factory=dict)

  @property
  def num_compilations(self) -> int:
    return sum(self.compilations.values())


# --- The device programs ------------------------------------------------------------------------


def _per_shard(fn, args, specs, out_specs):
  """``fn(*args)`` per shard of the batch axes (local slot indices); plain without a mesh.

  ``specs`` / ``out_specs``: trees whose leaves are tuples of logical axes (``"batch"`` or
  None per dimension), one per array.
  """
  mesh = mesh_lib.current_mesh()
  batch = () if mesh is None else tuple(
      a for a in mesh_lib.active_rules()["batch"] if mesh.shape[a] > 1)
  if not batch:
    return fn(*args)
  batch = batch[0] if len(batch) == 1 else batch
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  to_spec = lambda axes: PartitionSpec(*(batch if a == "batch" else None for a in axes))
  as_specs = lambda tree: jax.tree.map(to_spec, tree, is_leaf=is_axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=as_specs(specs), out_specs=as_specs(out_specs),
                       check_vma=False)(*args)


def _shard_slots(x, axes):
  return mesh_lib.shard(x, axes + (None,) * (x.ndim - len(axes)))


def _replicated(x):
  return mesh_lib.shard(x, (None,) * x.ndim)


def init_state(model_cfg, config: SamplerConfig, *, slots: int, pages: int, pages_per_row: int,
               dtype, rules) -> DecodeState:
  """An empty state: zero pages, every slot done (``rules``: the decode layout's table)."""
  with mesh_lib.use_rules(dict(rules)):
    return _empty_state(model_cfg, config, slots=slots, pages=pages, pages_per_row=pages_per_row,
                        dtype=dtype)


def _empty_state(model_cfg, config: SamplerConfig, *, slots: int, pages: int, pages_per_row: int,
                 dtype) -> DecodeState:
  cache = paged.PagedKVCache.init(model_cfg.num_layers, model_cfg.num_kv_heads,
                                  model_cfg.head_dim, pages, config.page_size, slots,
                                  pages_per_row, dtype)
  n = config.max_new_tokens
  zeros = lambda shape, dtype: _shard_slots(jnp.zeros(shape, dtype), _SLOT_AXES)
  return DecodeState(
      k_pages=cache.k_pages, v_pages=cache.v_pages, lengths_B=zeros((slots,), jnp.int32),
      last_B=zeros((slots,), jnp.int32), tokens_BN=zeros((slots, n), jnp.int32),
      logp_BN=zeros((slots, n), jnp.float32), count_B=zeros((slots,), jnp.int32),
      budget_B=zeros((slots,), jnp.int32),
      done_B=_shard_slots(jnp.ones((slots,), bool), _SLOT_AXES),
      keys_B=zeros((slots, 2), jnp.uint32))


def prefill(graphdef, params, state: DecodeState, tokens_RT, lengths_R, slots_R, page_table_RP,
            row_ids_R, budgets_R, seed, draw_params=None, *, config: SamplerConfig,
            rules) -> DecodeState:
  """Admits R rows: runs their contexts, caches them, draws each row's first token.

  Args:
    graphdef, params: the model (``nnx.split``), params in the decode layout.
    state: the engine state (donated).
    tokens_RT: int32 contexts, left-aligned; rows split over the shards like the slots, each
      row going to a slot of its own shard.
    lengths_R: int32 context lengths (0: a filler row that admits nothing).
    slots_R: int32 the slot of each row, local to its shard (out of range: filler).
    page_table_RP: int32 each row's pages (local to its shard; 0, scratch, where unused).
    row_ids_R: int32 the rows' ids (their keys).
    budgets_R: int32 the rows' budgets.
    seed: int32 the call's seed.
    draw_params: float32 ``[temperature, top_p]`` (``SamplerConfig.draw_params``); None: the
      config's.
    config: static sampler settings (``SamplerConfig.program()``: what applies, not how much).
    rules: static, the decode layout's logical-axis table (a tuple of items).
  """
  _COMPILES["prefill"] += 1
  with mesh_lib.use_rules(dict(rules)):
    model = nnx.merge(graphdef, params)
    cache = paged.PagedKVCache(state.k_pages, state.v_pages, page_table_RP, lengths_R)
    h_RD, cache = model.prefill(tokens_RT, lengths_R, cache)
    keys_R = draw.fold_in(draw.seed_key(seed), row_ids_R)
    logits_RV = model.logits(h_RD[:, None])[:, 0]
    first_R, logp_R = draw.sample_tokens(logits_RV, draw.token_keys(keys_R, 0), config,
                                         *_draw_values(draw_params))
    done_R = draw.is_stop(first_R, config) | (budgets_R <= 1)

    def admit(state_fields, slots_R, lengths_R, first_R, logp_R, budgets_R, done_R, keys_R):
      lengths_B, last_B, tokens_BN, logp_BN, count_B, budget_B, done_B, keys_B = state_fields
      put = lambda x, v: x.at[slots_R].set(v, mode="drop")
      n = tokens_BN.shape[1]
      first_RN = jnp.zeros((slots_R.shape[0], n), jnp.int32).at[:, 0].set(first_R)
      logp_RN = jnp.zeros((slots_R.shape[0], n), jnp.float32).at[:, 0].set(logp_R)
      return (put(lengths_B, lengths_R), put(last_B, first_R), put(tokens_BN, first_RN),
              put(logp_BN, logp_RN), put(count_B, jnp.ones_like(first_R)),
              put(budget_B, budgets_R), put(done_B, done_R), put(keys_B, keys_R))

    fields = (state.lengths_B, state.last_B, state.tokens_BN, state.logp_BN, state.count_B,
              state.budget_B, state.done_B, state.keys_B)
    slot_specs = (("batch",), ("batch",), ("batch", None), ("batch", None), ("batch",),
                  ("batch",), ("batch",), ("batch", None))
    row_specs = (("batch",),) * 6 + (("batch", None),)
    fields = _per_shard(admit, (fields, slots_R, lengths_R, first_R, logp_R, budgets_R, done_R,
                                keys_R),
                        (slot_specs, *row_specs), slot_specs)
    return DecodeState(cache.k_pages, cache.v_pages, *fields)


def decode(graphdef, params, state: DecodeState, page_table_BP, max_steps, min_ended, release_B,
           draw_params=None, *, config: SamplerConfig, rules, live_pages: int | None = None):
  """Up to ``max_steps`` decode steps of every busy slot; returns early once ``min_ended``
  rows busy at the start have ended (or when none is busy).

  Args:
    graphdef, params: the model, params in the decode layout.
    state: the engine state (donated).
    page_table_BP: int32 the slots' pages (local to each shard), covering every busy row's
      position up to ``lengths + max_steps``.
    max_steps, min_ended: int32 scalars (at most ``config.chunk_steps`` steps run).
    release_B: bool slots to empty first (rows put back in the queue).
    draw_params, config, rules: as ``prefill``.
    live_pages: static. None: attention reads the pool (the Pallas kernel: each row's live
      pages). Else the XLA path: entries per shard of the ``paged.LivePages`` copy the steps
      read and write; it must hold every busy slot's pages up to position
      ``lengths + max_steps - 1`` (the last a call can write).

  Returns:
    ``(state, status)``: status is ``(done_B, count_B, lengths_B, steps)``, replicated.
  """
  _COMPILES["decode"] += 1
  with mesh_lib.use_rules(dict(rules)):
    model = nnx.merge(graphdef, params)
    max_steps = jnp.minimum(max_steps, config.chunk_steps)  # what the pages were planned for
    state = dataclasses.replace(state, done_B=state.done_B | release_B)
    busy_B = ~state.done_B
    if live_pages is None:
      kv = paged.PagedKVCache(state.k_pages, state.v_pages, page_table_BP, state.lengths_B)
      options = dict(impl=config.attention)
    else:
      z, width = config.page_size, page_table_BP.shape[1]
      pages_B = jnp.where(busy_B, jnp.minimum(-(-(state.lengths_B + max_steps) // z), width),
                          0)
      kv = paged.gather_live(state.k_pages, state.v_pages, page_table_BP, state.lengths_B,
                             pages_B, live_pages)
      options = {}
    s = dataclasses.replace(state, k_pages=(), v_pages=())

    def cond(carry):
      step, s, _ = carry
      ended = jnp.sum(s.done_B & busy_B)
      return (step < max_steps) & jnp.any(~s.done_B) & (ended < jnp.maximum(min_ended, 1))

    def body(carry):
      step, s, kv = carry
      s, kv = _decode_step(model, s, kv, draw_params, config, options)
      return step + 1, s, kv

    steps, s, kv = jax.lax.while_loop(cond, body, (jnp.int32(0), s, kv))
    if live_pages is None:
      pools = (kv.k_pages, kv.v_pages)
    else:
      # A slot writes positions lengths ... lengths + steps - 1: at most written_pages pages.
      written_pages = (config.chunk_steps - 1) // config.page_size + 2
      pools = kv.scatter(state.k_pages, state.v_pages, state.lengths_B // config.page_size,
                         written_pages)
    state = dataclasses.replace(s, k_pages=pools[0], v_pages=pools[1])
    status = tuple(_replicated(x) for x in (state.done_B, state.count_B, state.lengths_B))
    return state, status + (steps,)


def _decode_step(model, s: DecodeState, kv, draw_params, config: SamplerConfig, options):
  """One token for every busy slot: feeds ``last_B``, caches it in ``kv``, draws the next."""
  active_B = ~s.done_B
  # An idle slot runs at position 0 (its write lands on its first page, the scratch page once
  # freed, or nowhere) and attends over one token: it never reads past its pages.
  kv = dataclasses.replace(kv, lengths_B=jnp.where(active_B, s.lengths_B, 0))
  h_BD, kv = model.decode(s.last_B, kv, **options)
  next_B, logp_B = draw.sample_tokens(model.logits(h_BD[:, None])[:, 0],
                                      draw.token_keys(s.keys_B, s.count_B), config,
                                      *_draw_values(draw_params))
  at_BN = (jnp.arange(s.tokens_BN.shape[1])[None] == s.count_B[:, None]) & active_B[:, None]
  count_B = s.count_B + active_B.astype(jnp.int32)
  ended_B = draw.is_stop(next_B, config) | (count_B >= s.budget_B)
  s = dataclasses.replace(
      s, lengths_B=s.lengths_B + active_B.astype(jnp.int32),
      last_B=jnp.where(active_B, next_B, s.last_B),
      tokens_BN=jnp.where(at_BN, next_B[:, None], s.tokens_BN),
      logp_BN=jnp.where(at_BN, logp_B[:, None], s.logp_BN),
      count_B=count_B, done_B=s.done_B | (active_B & ended_B))
  return s, kv


def decode_admitting(graphdef, params, state: DecodeState, stage: DecodeState, page_table_BP,
                     pages_B, max_steps, min_ended, release_B, draw_params, waiting_Q, context_QC,
                     num_waiting, queue_waiting, *, config: SamplerConfig, rules, live_pages: int,
                     min_pages: int, admit_per_pass: int):
  """``decode`` (the XLA path) that also admits rows inside its loop: as soon as a slot's row
  ends, the next staged row takes the slot, with no return to the host and no prefill.

  Staged rows were prefilled ahead (``prefill`` into ``stage``, a ``DecodeState`` of their own
  whose pools are ``state``'s): their first token is drawn and their context is in pool pages.
  Admitting one into an ended slot copies its state into the slot and its context pages into
  the slot's live-page entries (the slot's pages pass to the new row, which needs at most
  ``min_pages`` of them in this call); the ended row's tokens go to ``evicted`` first.

  Args:
    state: the engine state (donated); ``stage``: the staged rows (``S`` slots, no pools).
    page_table_BP: int32 the slots' pages; ``pages_B``: int32 how many of them the call
      copies (every busy row's pages up to ``lengths + max_steps``; ``min_pages`` at least in
      a slot that may take a staged row, busy or empty).
    max_steps, min_ended, release_B, draw_params: as ``decode``; ``min_ended`` applies once
      every staged row is admitted and more wait on the host (``queue_waiting``).
    waiting_Q: int32 stage slot of each staged row, in admission order (``num_waiting`` valid).
    context_QC: int32 their context pages (``C`` = the stage's most context pages).
    live_pages: static, entries of the live-page list; ``min_pages``, ``admit_per_pass``:
      static, pages a slot needs to take a staged row and rows admitted per pass.

  Returns:
    ``(state, status)``: status is ``(done_B, count_B, lengths_B, steps, admitted,
    occupant_B, busy, last, busy_at_last, evicted)``: ``admitted`` staged rows went in;
    ``occupant_B`` which one each slot holds (-1: the row it held before the call); ``busy``
    the busy slot-steps; ``last``, ``busy_at_last`` the step of the last admission (-1: none)
    and the busy slot-steps before it; ``evicted`` the rows that left a slot for them
    (``Evicted``, one per admission, in its order).
  """
  _COMPILES["decode"] += 1
  with mesh_lib.use_rules(dict(rules)):
    model = nnx.merge(graphdef, params)
    max_steps = jnp.minimum(max_steps, config.chunk_steps)
    state = dataclasses.replace(state, done_B=state.done_B | release_B)
    b, n = state.tokens_BN.shape
    q, c = context_QC.shape
    z, a = config.page_size, admit_per_pass
    kv = paged.gather_live(state.k_pages, state.v_pages, page_table_BP, state.lengths_B,
                           pages_B, live_pages)
    pools = (state.k_pages, state.v_pages)
    s = dataclasses.replace(state, k_pages=(), v_pages=())
    takes_B = pages_B >= min_pages  # a slot with room for a staged row
    evicted = Evicted(tokens_QN=jnp.zeros((q, n), jnp.int32),
                      logp_QN=jnp.zeros((q, n), jnp.float32), count_Q=jnp.zeros((q,), jnp.int32),
                      slot_Q=jnp.full((q,), -1, jnp.int32),
                      occupant_Q=jnp.full((q,), -1, jnp.int32))
    # carry: (step, state, live pages, staged rows admitted, occupant_B, evicted, busy
    # slot-steps, the step of the last admission, busy slot-steps before it)

    def running(carry):
      step, s, _, admitted, *_ = carry
      staged_left = admitted < num_waiting
      wait_host = ~staged_left & queue_waiting & (jnp.sum(s.done_B) >= jnp.maximum(min_ended, 1))
      return (step < max_steps) & (jnp.any(~s.done_B) | staged_left) & ~wait_host

    def can_admit(carry):
      step, s, _, admitted, *_ = carry
      return (step < max_steps) & (admitted < num_waiting) & jnp.any(s.done_B & takes_B)

    def admit(carry):
      step, s, kv, admitted, occupant_B, ev, busy, _, _ = carry
      free_B = s.done_B & takes_B
      rank_B = jnp.cumsum(free_B) - 1
      count = jnp.minimum(jnp.minimum(jnp.sum(free_B), num_waiting - admitted), a)
      slot_A = jnp.full((a,), b, jnp.int32).at[jnp.where(free_B & (rank_B < count), rank_B, a)
                                              ].set(jnp.arange(b, dtype=jnp.int32), mode="drop")
      valid_A = jnp.arange(a) < count
      index_A = admitted + jnp.arange(a, dtype=jnp.int32)  # into waiting_Q
      staged_A = waiting_Q[jnp.minimum(index_A, q - 1)]
      slot_A = jnp.where(valid_A, slot_A, b)  # b: out of range, dropped
      held_A = jnp.minimum(slot_A, b - 1)
      # The ended rows' tokens leave first.
      into_A = jnp.where(valid_A, index_A, q)
      ev = Evicted(*(x.at[into_A].set(v, mode="drop") for x, v in zip(
          ev, (s.tokens_BN[held_A], s.logp_BN[held_A], s.count_B[held_A], held_A,
               occupant_B[held_A]))))
      # Context pages into the slot's first entries.
      entry_AC = jnp.where(valid_A[:, None],
                           kv.start_B[held_A][:, None] + jnp.arange(c)[None], kv.num_entries)
      page_AC = context_QC[jnp.minimum(index_A, q - 1)]
      keys = tuple(k.at[entry_AC].set(jnp.transpose(p[:, page_AC], (1, 2, 0, 4, 3)),
                                      mode="drop") for k, p in zip(kv.k_EGHZ, pools[0]))
      values = tuple(v.at[entry_AC].set(jnp.moveaxis(p[:, page_AC], 0, 2), mode="drop")
                     for v, p in zip(kv.v_EGZH, pools[1]))
      kv = dataclasses.replace(kv, k_EGHZ=keys, v_EGZH=values)
      put = lambda x, v: x.at[slot_A].set(v, mode="drop")
      s = DecodeState((), (), *(put(x, v[staged_A]) for x, v in zip(
          _fields(s), _fields(stage))))
      return step, s, kv, admitted + count, put(occupant_B, index_A), ev, busy, step, busy

    # One flat loop: a pass admits what it can, then every slot steps (a row waiting for the
    # next pass idles a step). Passes around an inner loop of steps ran slower on XLA:CPU:
    # each entry into the inner loop took 0.5-0.7 ms in a profile, about a third of a step.
    # (A second, larger pass for rows that end together made XLA copy the live-page list at
    # every pass: slower still.)
    def body(carry):
      carry = jax.lax.cond(can_admit(carry), admit, lambda c: c, carry)
      step, s, kv, *rest, busy, last, busy_at_last = carry
      busy = busy + jnp.sum(~s.done_B, dtype=jnp.int32)
      s, kv = _decode_step(model, s, kv, draw_params, config, {})
      return step + 1, s, kv, *rest, busy, last, busy_at_last

    carry = (jnp.int32(0), s, kv, jnp.int32(0), jnp.full((b,), -1, jnp.int32), evicted,
             jnp.int32(0), jnp.int32(-1), jnp.int32(0))
    steps, s, kv, admitted, occupant_B, evicted, busy, *last = jax.lax.while_loop(
        running, body, carry)
    # A slot that took a staged row wrote from its first entry, at most min_pages of them;
    # the others from their page at the call's start, as ``decode``.
    written_pages = max((config.chunk_steps - 1) // z + 2, min_pages)  # static
    first_written_B = jnp.where(occupant_B >= 0, 0, state.lengths_B // z)
    k_pages, v_pages = kv.scatter(*pools, first_written_B, written_pages)
    state = dataclasses.replace(s, k_pages=k_pages, v_pages=v_pages)
    status = (state.done_B, state.count_B, state.lengths_B, steps, admitted, occupant_B, busy,
              *last, evicted)
    return state, status


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Evicted:
  """Rows that left their slot for a staged row inside ``decode_admitting``, one per
  admission (``Q``: the call's staged rows): their drawn tokens and log-probs, how many, the
  slot, and who held it (-1: the row it held at the call's start, else the staged row's
  admission index)."""

  tokens_QN: jax.Array
  logp_QN: jax.Array
  count_Q: jax.Array
  slot_Q: jax.Array
  occupant_Q: jax.Array

  def __iter__(self):
    return iter((self.tokens_QN, self.logp_QN, self.count_Q, self.slot_Q, self.occupant_Q))


def _fields(s: DecodeState) -> tuple[jax.Array, ...]:
  """A state's per-slot fields (all but the pools), in ``DecodeState`` order."""
  return (s.lengths_B, s.last_B, s.tokens_BN, s.logp_BN, s.count_B, s.budget_B, s.done_B,
          s.keys_B)


def compact_slots(fields, index_S, valid_S) -> tuple[jax.Array, ...]:
  """A state's per-slot ``fields`` (``_fields``) for ``S`` slots: slot ``i`` takes slot
  ``index_S[i]``'s row where ``valid_S[i]``, else it is empty."""
  lengths, last, tokens, logp, count, budget, done, keys = (x[index_S] for x in fields)
  return (jnp.where(valid_S, lengths, 0), last, tokens, logp, count, budget, done | ~valid_S,
          keys)


def _draw_values(draw_params):
  return (None, None) if draw_params is None else (draw_params[0], draw_params[1])


def take_rows(tokens_BN, logp_BN, slots_R):
  """The drawn tokens and log-probs of slots ``slots_R`` (global indices), replicated."""
  return _replicated(tokens_BN[slots_R]), _replicated(logp_BN[slots_R])


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted ``prefill`` and ``decode`` of one model structure, sampler config and decode
  layout, their static arguments bound: a call hashes none of them (the host dispatches
  hundreds of calls a rollout; bound once, a call's Python work is about a third of what
  hashing the graphdef, config and rules at every call took). ``decode`` keeps ``live_pages``
  static."""

  prefill: Callable
  decode: Callable
  decode_admitting: Callable


@functools.lru_cache(maxsize=32)
def programs(graphdef, config: SamplerConfig, rules) -> Programs:
  """The ``Programs`` of ``graphdef`` (``nnx.split``), ``config`` (``SamplerConfig.program()``)
  and ``rules`` (the decode layout's table as a tuple of items); equal arguments share them."""
  bind = lambda fn: functools.partial(fn, graphdef, config=config, rules=rules)
  return Programs(
      prefill=jax.jit(bind(prefill), donate_argnames=("state",)),
      decode=jax.jit(bind(decode), static_argnames=("live_pages",), donate_argnames=("state",)),
      decode_admitting=jax.jit(
          bind(decode_admitting), static_argnames=("live_pages", "min_pages", "admit_per_pass"),
          donate_argnames=("state",)))


_take_rows = jax.jit(take_rows)
_compact_slots = jax.jit(compact_slots)
_init_state = jax.jit(init_state, static_argnames=(
    "model_cfg", "config", "slots", "pages", "pages_per_row", "dtype", "rules"))


# --- The host scheduler -------------------------------------------------------------------------


def _host(x) -> np.ndarray:
  """A replicated (or single-process) array's value on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def live_pages_bucket(pages: int, slots_local: int, width: int) -> int:
  """The ``live_pages`` of a decode call whose shards hold at most ``pages`` live pages: the
  smallest of 1 … 8 and 4, 5, 6 or 7 times a power of two that holds them (at most 25 % more
  than needed, four programs per doubling: each is a compilation), at most every page of every
  slot. Attention reads every entry at every step: a coarser bucket costs more a step."""
  n = max(pages, 1)
  if n > 8:
    shift = (n - 1).bit_length() - 3
    n = -(-n >> shift) << shift
  return min(n, slots_local * width)


class Engine:
  """Draws rows for ``model`` (an NNX model, or its ``nnx.split``) with ``config``.

  Args:
    model: a ``models.Transformer`` in the dtype and layout to decode with, or a
      ``(graphdef, params)`` pair.
    config: the ``SamplerConfig``.
    mesh: the device mesh (None: one device).
    layout: the decode layout the params are in (``sampling.layout``): which logical-axis
      table the programs are traced with.
  """

  def __init__(self, model, config: SamplerConfig, *, mesh: jax.sharding.Mesh | None = None,
               layout: str = "replicated"):
    if isinstance(model, tuple):
      self.graphdef, self.params = model
    else:
      self.graphdef, self.params = nnx.split(model)
    self.model_cfg = self.graphdef_cfg()
    # The cache dtype made explicit: an engine that names the model's dtype and one that
    # leaves it to the model run the same programs.
    self.config = config.replace(cache_dtype=config.cache_dtype or self.model_cfg.dtype)
    self.mesh = mesh
    self.layout = layout
    self.rules = tuple(sorted((k, tuple(v)) for k, v in mesh_lib.DECODE_RULES[layout].items()))
    with mesh_lib.use_rules(mesh_lib.DECODE_RULES[layout]):
      self.shards = mesh_lib.batch_shards(mesh)
    self.stats = EngineStats()

  def graphdef_cfg(self):
    return nnx.merge(self.graphdef, self.params).cfg

  def admits_in_loop(self) -> bool:
    """Whether rows are staged and admitted inside the decode loop (``decode_admitting``): on
    the XLA attention path, with one batch shard and the default pool (``num_pages=0``; a
    smaller pool puts rows back in the queue, which the host does between calls)."""
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      impl = paged.resolve_impl(self.config.attention, self.model_cfg.head_dim)
    return impl == "xla" and self.shards == 1 and not self.config.num_pages

  def shape(self, requests: Sequence[Request]) -> tuple[int, int, int]:
    """``(slots, pages, pages_per_row)`` of a call on ``requests`` (global, shard multiples)."""
    cfg, shards = self.config, self.shards
    slots = cfg.slots or len(requests)
    slots = -(-max(slots, 1) // shards) * shards
    if cfg.max_row_tokens:
      row = cfg.max_row_tokens
      pages_per_row = -(-row // cfg.page_size)
    else:
      row = max(cfg.bucket(len(r.context)) + r.budget for r in requests)
      pages_per_row = _pow2_at_least(-(-row // cfg.page_size))
    pages = cfg.num_pages or slots * pages_per_row + shards
    if self.admits_in_loop():  # and the stage's contexts
      pages += slots * stage_context_pages(requests, cfg)
    pages = -(-pages // shards) * shards
    return slots, pages, pages_per_row

  def generate(self, requests: Sequence[Request], *, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> Rollout:
    """Draws every request; returns the ``Rollout`` in request order.

    Args:
      requests: the rows (contexts, budgets, row ids).
      seed: the call's seed, in [0, 2**31).
      progress: called as ``progress(rows_done, tokens_drawn)`` after each decode call.
    """
    t0 = time.perf_counter()
    cfg, shards = self.config, self.shards
    _check_requests(requests, cfg)
    if not 0 <= seed < 2**31:
      raise ValueError(f"seed={seed} must be in [0, 2**31).")
    slots, pages, width = self.shape(requests)
    slots_local, pages_local = slots // shards, pages // shards
    longest = max(len(r.context) + r.budget for r in requests)
    if longest > width * cfg.page_size:
      raise ValueError(
          f"a row of {longest} tokens (context and budget) does not fit the page tables' "
          f"{width * cfg.page_size} tokens; raise sampler.max_row_tokens.")
    need = -(-longest // cfg.page_size)
    if pages_local - 1 < need:
      raise ValueError(
          f"sampler.num_pages={cfg.num_pages} gives each of the {shards} shard(s) "
          f"{pages_local - 1} usable pages, fewer than the {need} pages of one whole row "
          f"({longest} tokens); raise num_pages or set 0.")
    max_position = self.model_cfg.max_position_embeddings
    if longest > max_position:
      raise ValueError(
          f"a row of {longest} tokens (context and budget) is longer than the model's "
          f"{max_position} positions (max_position_embeddings); lower the budget.")
    dtype = jnp.dtype(cfg.cache_dtype or self.model_cfg.dtype)
    self.last_shape = (slots, pages, width)
    layout_rules = mesh_lib.DECODE_RULES[self.layout]
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
    with ctx, mesh_lib.use_rules(layout_rules):
      state = _init_state(self.model_cfg, cfg.program(), slots=slots, pages=pages,
                          pages_per_row=width, dtype=dtype.name, rules=self.rules)
      scheduler = _StagedScheduler if self.admits_in_loop() else _Scheduler
      sched = scheduler(self, requests, slots_local, pages_local, width)
      state = sched.run(state, seed, progress)
    del state
    drain_steps, drain_seconds, drain_busy, drain_slot_steps = sched.drain()
    kv_bytes = paged.PagedKVCache.num_bytes(self.model_cfg.num_layers,
                                            self.model_cfg.num_kv_heads, self.model_cfg.head_dim,
                                            pages, cfg.page_size, dtype)
    rollout = sched.rollout()
    self.stats = EngineStats(
        rows=len(requests), tokens=int(rollout.lengths.sum()), slots=slots, pages=pages,
        pages_per_row=width, kv_cache_bytes=kv_bytes, prefill_calls=sched.prefill_calls,
        decode_calls=sched.decode_calls, decode_steps=sched.decode_steps,
        occupancy=sched.busy_slot_steps / max(sched.slot_steps, 1),
        attended_pages=sched.attended_page_steps / max(sched.decode_steps, 1),
        drain_steps=drain_steps, drain_seconds=drain_seconds,
        drain_occupancy=drain_busy / max(drain_slot_steps, 1),
        preemptions=sched.preemptions, compactions=sched.compactions,
        seconds=time.perf_counter() - t0,
        compilations=compile_counts())
    return rollout


def _check_requests(requests: Sequence[Request], cfg: SamplerConfig) -> None:
  if not requests:
    raise ValueError("no rows to draw: give at least one prompt.")
  for r in requests:
    if not r.context:
      raise ValueError(f"row {r.row_id} has an empty context; every prompt needs a token.")
    if not 1 <= r.budget <= cfg.max_new_tokens:
      raise ValueError(f"row {r.row_id} asks for {r.budget} new tokens; the budget must be in "
                       f"[1, sampler.max_new_tokens={cfg.max_new_tokens}].")
    if not 0 <= r.row_id < 2**31:
      raise ValueError(f"row_id={r.row_id} must be in [0, 2**31).")


class _Scheduler:
  """The host side of one ``Engine.generate`` call: queue, slots, pages, preemption."""

  def __init__(self, engine: Engine, requests: Sequence[Request], slots_local: int,
               pages_local: int, width: int):
    self.engine, self.requests = engine, list(requests)
    self.cfg = engine.config
    self.shards, self.slots_local, self.width = engine.shards, slots_local, width
    self.queue = collections.deque(range(len(requests)))
    self.free_slots = [list(range(slots_local)) for _ in range(self.shards)]
    # Local page 0 of every shard is its scratch page.
    self.free_pages = [list(range(pages_local - 1, 0, -1)) for _ in range(self.shards)]
    self.slot_row = [[None] * slots_local for _ in range(self.shards)]
    self.slot_pages = [[[] for _ in range(slots_local)] for _ in range(self.shards)]
    self.page_table = np.zeros((self.shards * slots_local, width), np.int32)
    self.lengths = np.zeros(self.shards * slots_local, np.int64)
    self.results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self.release = np.zeros(self.shards * slots_local, bool)
    self.prefill_calls = self.decode_calls = self.decode_steps = 0
    self.busy_slot_steps = self.slot_steps = self.preemptions = self.last_steps = 0
    self.compactions = 0
    self.attended_page_steps = 0
    self.tokens_drawn = 0
    # (time, decode steps, busy slot-steps, slot-steps) when the last prefill was dispatched.
    self.last_admission = (time.perf_counter(), 0, 0, 0)
    self.finished_at = self.last_admission[0]
    self.programs = programs(engine.graphdef, self.cfg.program(), engine.rules)
    self.draw_params = self.cfg.draw_params()

  def _put(self, x: np.ndarray, axes) -> np.ndarray | jax.Array:
    """A host array for a program call: placed with its sharding on a mesh; without one, as
    it is (the call transfers it, cheaper than a separate device_put)."""
    mesh = self.engine.mesh
    return x if mesh is None else mesh_lib.put(x, axes, mesh)

  # Pages ---------------------------------------------------------------------------------------

  def _pages_for(self, tokens: int) -> int:
    return -(-tokens // self.cfg.page_size)

  def _grow(self, shard: int, slot: int, tokens: int) -> bool:
    """Gives ``slot`` pages for ``tokens`` positions; False if the shard has too few."""
    have = self.slot_pages[shard][slot]
    need = min(self._pages_for(tokens), self.width) - len(have)
    if need <= 0:
      return True
    if len(self.free_pages[shard]) < need:
      return False
    new = [self.free_pages[shard].pop() for _ in range(need)]
    g = shard * self.slots_local + slot
    self.page_table[g, len(have):len(have) + need] = new
    have.extend(new)
    return True

  def _free(self, shard: int, slot: int) -> None:
    self.free_pages[shard].extend(reversed(self.slot_pages[shard][slot]))
    self.slot_pages[shard][slot] = []
    self.page_table[shard * self.slots_local + slot] = paged.SCRATCH_PAGE
    self.slot_row[shard][slot] = None
    self.free_slots[shard].append(slot)

  # Admission -----------------------------------------------------------------------------------

  def _refill_rows(self) -> int:
    """Rows per shard of a refill's prefill call: a power of two, about ``refill_fraction`` of
    the slots."""
    refill = math.ceil(self.cfg.refill_fraction * self.slots_local)
    return min(_pow2_at_least(refill), _pow2_at_least(self.slots_local))

  def _admit_batch(self) -> list[list[tuple[int, int]]]:
    """Picks waiting rows for free slots: a prefill call's worth per shard at most. While any
    slot is busy, a call admits at most a refill's rows per shard: refills run one prefill
    program, whatever number of slots a decode call freed (more calls if it freed more)."""
    per_shard = [[] for _ in range(self.shards)]
    longest = [0] * self.shards
    filling = any(r is not None for rows in self.slot_row for r in rows)
    most = self._refill_rows() if filling else self.slots_local
    progress = True
    while self.queue and progress:
      progress = False
      for shard in sorted(range(self.shards), key=lambda s: -len(self.free_slots[s])):
        if not self.queue or not self.free_slots[shard] or len(per_shard[shard]) >= most:
          continue
        request = self.requests[self.queue[0]]
        context = max(longest[shard], len(request.context))
        rows = len(per_shard[shard]) + 1
        if rows > 1 and rows * self.cfg.bucket(context) > self.cfg.prefill_tokens:
          continue
        slot = self.free_slots[shard][-1]
        first = min(self.cfg.chunk_steps, request.budget)
        if not self._grow(shard, slot, len(request.context) + first):
          continue
        self.free_slots[shard].pop()
        row = self.queue.popleft()
        self.slot_row[shard][slot] = row
        self.lengths[shard * self.slots_local + slot] = len(request.context)
        per_shard[shard].append((slot, row))
        longest[shard] = context
        progress = True
    return per_shard

  def _prefill(self, state, per_shard, seed):
    # Rows padded to a refill's worth, or (the first fill) to a power of two: few prefill
    # programs to compile.
    refill = self._refill_rows()
    admitted = max(len(a) for a in per_shard)
    rows_local = refill if admitted <= refill else min(_pow2_at_least(admitted),
                                                       _pow2_at_least(self.slots_local))
    placed = [(shard * rows_local + i, slot, row, self.page_table[shard * self.slots_local + slot])
              for shard, admitted in enumerate(per_shard) for i, (slot, row) in enumerate(admitted)]
    tokens, lengths, slots, table, row_ids, budgets = self._prefill_inputs(
        placed, rows_local * self.shards, self.slots_local)
    put = self._put
    state = self.programs.prefill(
        self.engine.params, state, put(tokens, _ROW_AXES), put(lengths, _SLOT_AXES),
        put(slots, _SLOT_AXES), put(table, _ROW_AXES), put(row_ids, _SLOT_AXES),
        put(budgets, _SLOT_AXES), np.int32(seed), self.draw_params)
    self.prefill_calls += 1
    return state

  def _prefill_inputs(self, placed, rows: int, filler_slot: int):
    """The host arrays of a prefill call of ``rows`` rows: ``placed`` holds ``(index, slot,
    row, page-table row)`` of each real one; the others are fillers (slot ``filler_slot``, out
    of range: they admit nothing)."""
    t = self.cfg.bucket(max(len(self.requests[row].context) for _, _, row, _ in placed))
    tokens = np.full((rows, t), self.cfg.pad_id, np.int32)
    lengths = np.zeros(rows, np.int32)
    slots = np.full(rows, filler_slot, np.int32)
    table = np.zeros((rows, self.width), np.int32)
    row_ids = np.zeros(rows, np.int32)
    budgets = np.ones(rows, np.int32)
    for k, slot, row, table_row in placed:
      request = self.requests[row]
      tokens[k, :len(request.context)] = request.context
      lengths[k], slots[k], row_ids[k], budgets[k] = (
          len(request.context), slot, request.row_id, request.budget)
      table[k, :len(table_row)] = table_row
    return tokens, lengths, slots, table, row_ids, budgets

  def _harvest(self, state: DecodeState, ended: list[int], count_B: np.ndarray) -> None:
    """Keeps the drawn tokens of the rows in (global) slots ``ended`` as their results."""
    size = max(self.slots_local, 1)
    for start in range(0, len(ended), size):
      chunk = ended[start:start + size]
      index = np.zeros(size, np.int32)
      index[:len(chunk)] = chunk
      tokens, logp = map(_host, _take_rows(state.tokens_BN, state.logp_BN, index))
      for i, g in enumerate(chunk):
        shard, slot = divmod(g, self.slots_local)
        n = int(count_B[g])
        self.results[self.slot_row[shard][slot]] = (tokens[i, :n].copy(), logp[i, :n].copy())
        self.tokens_drawn += n

  # Growth and preemption -----------------------------------------------------------------------

  def _make_room(self, steps: int) -> None:
    """Pages for every busy row's next ``steps`` positions; preempts the youngest if short."""
    for shard in range(self.shards):
      while True:
        busy = [s for s in range(self.slots_local) if self.slot_row[shard][s] is not None]
        short = next((s for s in busy if not self._grow(
            shard, s, self.lengths[shard * self.slots_local + s] + steps)), None)
        if short is None:
          break
        # The row with the fewest tokens drawn loses the least work.
        youngest = min(busy, key=lambda s: (self.lengths[shard * self.slots_local + s],
                                            -self.slot_row[shard][s]))
        row = self.slot_row[shard][youngest]
        self._free(shard, youngest)
        self.release[shard * self.slots_local + youngest] = True
        self.queue.appendleft(row)
        self.preemptions += 1

  # The loop ------------------------------------------------------------------------------------

  def run(self, state, seed: int, progress):
    self.pallas = paged.resolve_impl(self.cfg.attention, self.engine.model_cfg.head_dim) == "pallas"
    put = self._put
    slots = self.shards * self.slots_local
    while self.queue or any(r is not None for rows in self.slot_row for r in rows):
      while self.queue:
        per_shard = self._admit_batch()
        if not any(per_shard):
          break
        state = self._prefill(state, per_shard, seed)
        self.last_admission = (time.perf_counter(), self.decode_steps, self.busy_slot_steps,
                               self.slot_steps)
      # While rows wait, a call usually returns once refill_fraction of the slots has ended:
      # plan pages and attention for about twice the steps the last call ran, not the whole
      # chunk (a call that reaches its steps returns, and the next one plans again).
      steps = self.cfg.chunk_steps
      if self.queue and self.last_steps:
        steps = min(steps, max(8, 2 * self.last_steps))
      self._make_room(steps)
      busy = [g for g in range(slots)
              if self.slot_row[g // self.slots_local][g % self.slots_local] is not None]
      if not busy:
        if self.queue:  # every row was put back: the pool holds none of them
          raise RuntimeError("the KV-cache pool cannot hold a waiting row; raise num_pages.")
        break
      # The Pallas kernel reads each row's live pages itself: one program for every length.
      # XLA: the pages the busy slots can touch, copied into one list per shard for the
      # call (paged.LivePages), its length from a few sizes.
      live = None
      if not self.pallas:
        pages = [sum(min(self._pages_for(int(self.lengths[g]) + steps), self.width)
                     if self.slot_row[shard][g % self.slots_local] is not None else 0
                     for g in range(shard * self.slots_local, (shard + 1) * self.slots_local))
                 for shard in range(self.shards)]
        live = live_pages_bucket(max(pages), self.slots_local, self.width)
      min_ended = (max(1, math.ceil(self.cfg.refill_fraction * slots)) if self.queue
                   else slots + 1)
      state, status = self.programs.decode(
          self.engine.params, state, put(self.page_table, _ROW_AXES), np.int32(steps),
          np.int32(min_ended), put(self.release, _SLOT_AXES), self.draw_params,
          live_pages=live)
      self.release[:] = False
      done, count, lengths, ran = map(_host, status)
      self.decode_calls += 1
      self.decode_steps += int(ran)
      self.last_steps = int(ran)
      self.busy_slot_steps += int(ran) * len(busy)
      self.slot_steps += int(ran) * slots
      read = (sum(self._pages_for(int(self.lengths[g]) + 1) for g in busy) if live is None
              else live * self.shards)
      self.attended_page_steps += read * int(ran)
      self.lengths[:] = lengths
      ended = [g for g in busy if done[g]]
      self._harvest(state, ended, count)
      for g in ended:
        self._free(*divmod(g, self.slots_local))
      if progress is not None:
        progress(len(self.results), self.tokens_drawn)
    self.finished_at = time.perf_counter()
    return state

  def drain(self) -> tuple[int, float, int, int]:
    """Decode steps, seconds, busy slot-steps and slot-steps after the last admission."""
    at, steps, busy, slot_steps = self.last_admission
    return (self.decode_steps - steps, self.finished_at - at, self.busy_slot_steps - busy,
            self.slot_steps - slot_steps)

  def rollout(self) -> Rollout:
    stops = set(self.cfg.stop_ids)
    tokens, logp, stopped = [], [], []
    for i, request in enumerate(self.requests):
      drawn, lp = self.results[i]
      tokens.append(np.concatenate([np.asarray(request.context, np.int32), drawn]))
      logp.append(lp.astype(np.float32))
      stopped.append(bool(len(drawn)) and int(drawn[-1]) in stops)
    return Rollout(
        tokens=tuple(tokens),
        prompt_lengths=np.asarray([r.prompt_length for r in self.requests], np.int32),
        prefix_lengths=np.asarray([len(r.context) - r.prompt_length for r in self.requests],
                                  np.int32),
        logp=tuple(logp), stopped=np.asarray(stopped, bool))


class _StagedScheduler(_Scheduler):
  """The scheduler of the XLA path on one batch shard with the default pool: the first fill
  is prefilled into the slots, later rows ahead into a stage (prefill calls of up to a whole
  refill of slots), and
  ``decode_admitting`` admits them inside its loop the step a slot's row ends, so slots do not
  idle until the host refills them, and a decode call runs its whole chunk. Once none waits,
  the remaining rows are compacted into fewer slots as they end (``_compact``).

  The pool holds every slot's whole row and the stage's contexts: no row is ever put back.
  """

  def __init__(self, engine: Engine, requests: Sequence[Request], slots_local: int,
               pages_local: int, width: int):
    super().__init__(engine, requests, slots_local, pages_local, width)
    z = self.cfg.page_size
    self.stage_size = slots_local
    self.context_pages = stage_context_pages(requests, self.cfg)
    # Steps a call plans for: every busy row holds the pages of its next ``steps`` positions,
    # which attention reads at every step, written or not; half a page keeps that to half a
    # page a row on average (a call costs about as much as a few steps, in copying the list).
    self.steps = min(self.cfg.chunk_steps, max(8, z // 2))
    # A staged row needs its context and the call's steps in the slot it takes.
    self.min_pages = min(-(-(self.context_pages * z + self.steps) // z), width)
    self.stage_free = list(range(self.stage_size - 1, -1, -1))
    # Rows admitted per pass (a pass a step): rows that end together wait a few steps at most.
    self.admit_per_pass = max(_ADMIT_PER_PASS, slots_local // 8)
    self.staged: collections.deque = collections.deque()  # (stage slot, row, context pages)

  def _stage(self, state: DecodeState, stage: DecodeState, seed: int):
    """Prefills waiting rows into free stage slots (calls of up to a refill of slots)."""
    pool = self.free_pages[0]
    while self.queue and len(self.stage_free) >= max(1, self.stage_size // 2):
      rows = []
      while self.queue and self.stage_free:
        context = self.requests[self.queue[0]].context
        longest = max([len(self.requests[r].context) for _, r, _ in rows] + [len(context)])
        if rows and (len(rows) + 1) * self.cfg.bucket(longest) > self.cfg.prefill_tokens:
          break
        need = self._pages_for(len(context))
        if len(pool) < need:
          raise RuntimeError("the KV-cache pool has no pages for a staged row; raise num_pages.")
        rows.append((self.stage_free.pop(), self.queue.popleft(),
                     [pool.pop() for _ in range(need)]))
      # Rows padded to half the stage or the whole stage (powers of two): few programs.
      count = min(max(_pow2_at_least(len(rows)), _pow2_at_least(self.stage_size // 2)),
                  _pow2_at_least(self.stage_size))
      inputs = self._prefill_inputs([(i, slot, row, pages) for i, (slot, row, pages)
                                     in enumerate(rows)], count, self.stage_size)
      full = dataclasses.replace(stage, k_pages=state.k_pages, v_pages=state.v_pages)
      full = self.programs.prefill(self.engine.params, full, *inputs, np.int32(seed),
                                   self.draw_params)
      state = dataclasses.replace(state, k_pages=full.k_pages, v_pages=full.v_pages)
      stage = dataclasses.replace(full, k_pages=(), v_pages=())
      self.prefill_calls += 1
      self.staged.extend(rows)
    return state, stage

  def _compact(self, state: DecodeState) -> DecodeState:
    """Once no row waits: when the busy rows fit in half the slots (a power of two, at least
    ``_MIN_SLOTS``), they move to the first slots of a state that small. A step's cost follows
    its slots, busy or not: the tail, where rows end one by one and none refills, then costs
    what its rows need. The pools and pages stay; the programs of the smaller states are
    those of the small live-page lists a tail meets anyway (about as many compilations)."""
    busy = [g for g in range(self.slots_local) if self.slot_row[0][g] is not None]
    size = max(_pow2_at_least(len(busy)), _MIN_SLOTS)
    if not busy or 2 * size > self.slots_local:
      return state
    for g in range(self.slots_local):
      if self.slot_row[0][g] is None:
        self._keep_pages(g, 0)
    index = np.zeros(size, np.int32)
    index[:len(busy)] = busy
    state = DecodeState(state.k_pages, state.v_pages, *_compact_slots(
        _fields(state), index, np.arange(size) < len(busy)))
    pad = size - len(busy)
    self.slot_row[0] = [self.slot_row[0][g] for g in busy] + [None] * pad
    self.slot_pages[0] = [self.slot_pages[0][g] for g in busy] + [[] for _ in range(pad)]
    self.page_table = self.page_table[index]
    self.page_table[len(busy):] = paged.SCRATCH_PAGE
    self.lengths = np.where(np.arange(size) < len(busy), self.lengths[index], 0)
    self.release = np.zeros(size, bool)
    self.slots_local = size
    self.compactions += 1
    return state

  def _keep_pages(self, slot: int, pages: int) -> None:
    """Frees the slot's pages past its first ``pages``."""
    have = self.slot_pages[0][slot]
    if len(have) > pages:
      self.free_pages[0].extend(reversed(have[pages:]))
      del have[pages:]
      self.page_table[slot, pages:] = paged.SCRATCH_PAGE

  def run(self, state, seed: int, progress):
    cfg, slots, z = self.cfg, self.slots_local, self.cfg.page_size
    stage = dataclasses.replace(
        _init_state(self.engine.model_cfg, cfg.program(), slots=self.stage_size, pages=2,
                    pages_per_row=1, dtype=state.k_pages[0].dtype.name, rules=self.engine.rules),
        k_pages=(), v_pages=())
    # The first fill goes straight into the slots, as host refills do; later rows are staged.
    while self.queue and self.free_slots[0]:
      per_shard = self._admit_batch()
      if not any(per_shard):
        break
      state = self._prefill(state, per_shard, seed)
      self.last_admission = (time.perf_counter(), 0, 0, 0)
    while self.queue or self.staged or any(r is not None for r in self.slot_row[0]):
      state, stage = self._stage(state, stage, seed)
      if not self.queue and not self.staged:
        state = self._compact(state)
        slots = self.slots_local
      waiting = list(self.staged)
      steps = self.steps
      pages_B = np.zeros(slots, np.int32)
      for g in range(slots):
        tokens = 0
        if self.slot_row[0][g] is not None:
          tokens = int(self.lengths[g]) + steps
        if waiting:
          tokens = max(tokens, self.min_pages * z)
        if tokens and not self._grow(0, g, tokens):
          raise RuntimeError("the KV-cache pool cannot hold every slot's row; raise num_pages.")
        pages_B[g] = min(self._pages_for(tokens), self.width) if tokens else 0
      live = live_pages_bucket(int(pages_B.sum()), slots, self.width)
      # One shape whatever the count (a program per live-list size, as ``decode``).
      waiting_Q = np.zeros(self.stage_size, np.int32)
      context_QC = np.zeros((self.stage_size, self.context_pages), np.int32)
      for i, (slot, _, pages) in enumerate(waiting):
        waiting_Q[i] = slot
        context_QC[i, :len(pages)] = pages
      min_ended = max(1, math.ceil(cfg.refill_fraction * slots))
      started = time.perf_counter()
      state, status = self.programs.decode_admitting(
          self.engine.params, state, stage, self.page_table, pages_B, np.int32(steps),
          np.int32(min_ended), self.release, self.draw_params, waiting_Q, context_QC,
          np.int32(len(waiting)), np.bool_(bool(self.queue)), live_pages=live,
          min_pages=self.min_pages, admit_per_pass=self.admit_per_pass)
      done, count, lengths, ran, admitted, occupant, busy_steps, last, busy_at_last = map(
          _host, status[:-1])
      evicted = Evicted(*map(_host, status[-1]))
      ran, admitted, last = int(ran), int(admitted), int(last)
      if admitted:  # the drain starts after the last admission (interpolated in time)
        now = time.perf_counter()
        self.last_admission = (started + (now - started) * last / max(ran, 1),
                               self.decode_steps + last,
                               self.busy_slot_steps + int(busy_at_last),
                               self.slot_steps + last * slots)
      self.decode_calls += 1
      self.decode_steps += ran
      self.last_steps = ran
      self.busy_slot_steps += int(busy_steps)
      self.slot_steps += ran * slots
      self.attended_page_steps += live * ran
      held = list(self.slot_row[0])
      for i in range(admitted):
        who, slot = int(evicted.occupant_Q[i]), int(evicted.slot_Q[i])
        row = held[slot] if who < 0 else waiting[who][1]
        if row is not None:
          n = int(evicted.count_Q[i])
          self.results[row] = (evicted.tokens_QN[i, :n].copy(), evicted.logp_QN[i, :n].copy())
          self.tokens_drawn += n
      for _ in range(admitted):
        slot, _, pages = self.staged.popleft()
        self.stage_free.append(slot)
        self.free_pages[0].extend(reversed(pages))
      self.lengths[:] = lengths
      for g in range(slots):
        if occupant[g] >= 0:
          self.slot_row[0][g] = waiting[int(occupant[g])][1]
          self._keep_pages(g, self._pages_for(int(lengths[g])))
      ended = [g for g in range(slots) if self.slot_row[0][g] is not None and done[g]]
      self._harvest(state, ended, count)
      for g in ended:  # the slot keeps the pages a staged row will need
        self.slot_row[0][g] = None
        self._keep_pages(g, self.min_pages if (self.queue or self.staged) else 0)
      if progress is not None:
        progress(len(self.results), self.tokens_drawn)
    self.finished_at = time.perf_counter()
    return state


def stage_context_pages(requests: Sequence[Request], cfg: SamplerConfig) -> int:
  """Pages of the longest context of ``requests``, padded to its length bucket (what a staged
  row holds; bucketed, so calls of similar rows share a pool size and their programs)."""
  return max(1, -(-cfg.bucket(max(len(r.context) for r in requests)) // cfg.page_size))


# The fewest staged rows a pass of ``decode_admitting`` admits (a pass a step: more wait).
_ADMIT_PER_PASS = 8
# The fewest slots the tail's rows are compacted into.
_MIN_SLOTS = 4
