"""Rollouts from the student: bucketed prefill + a jitted KV-cache decode loop, in micro-batches.

``Sampler(model, config, mesh=mesh).rollout(prompts, prefixes, n=4, seed=step)`` returns a
``Rollout`` ``[B, L]`` (layout and masks in ``tropd_jax.sampling.rollout``). The sampler reads the
model's current weights at every call (``nnx.state``: no copy, no reshard), so it samples from the
very object the trainer updates. Rows are sharded over the mesh's ``data``/``fsdp`` axes, the model
over ``tensor``, as the parameters and the model's logical axes say.

``generate(model, prompt_ids, max_new_tokens, ...)`` is the list-in, list-out convenience.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax.models.attention import KVCache
from tropd_jax.sampling.config import SamplerConfig
from tropd_jax.sampling.decode import cache_len, compile_counts, decode, prefill
from tropd_jax.sampling.rollout import Rollout, ScoringInputs, concat_rollouts

__all__ = [
    "Generation", "Rollout", "Sampler", "SamplerConfig", "SamplerStats", "ScoringInputs",
    "compile_counts", "concat_rollouts", "generate",
]


@dataclasses.dataclass(frozen=True)
class SamplerStats:
  """What the last ``rollout`` call did (host-side numbers, for logging).

  Attributes:
    rows: sequences sampled.
    micro_batches: prefill + decode rounds.
    context_lengths: the bucketed context length P of each micro-batch.
    kv_cache_bytes: bytes of the largest KV cache allocated (one micro-batch, all devices):
      ``B·S`` slots for decoding plus ``C·S`` for the contexts' prefill before replication.
    compilations: sampler compilations so far in this process, per phase.
  """

  rows: int = 0
  micro_batches: int = 0
  context_lengths: tuple[int, ...] = ()
  kv_cache_bytes: int = 0
  compilations: dict = dataclasses.field(default_factory=dict)

  @property
  def num_compilations(self) -> int:
    return sum(self.compilations.values())


class Sampler:
  """Draws rollouts from ``model`` with ``config``.

  Args:
    model: a ``models.Transformer`` (loaded on ``mesh`` when one is given).
    config: the ``SamplerConfig``.
    mesh: the device mesh; calls run under ``jax.set_mesh(mesh)``. None: the current mesh, if any.
  """

  def __init__(self, model, config: SamplerConfig, *, mesh: jax.sharding.Mesh | None = None):
    self.model = model
    self.config = config
    self.mesh = mesh
    self.graphdef = nnx.graphdef(model)
    self.stats = SamplerStats()

  def rollout(
      self,
      prompt_ids: Sequence[Sequence[int]],
      prefix_ids: Sequence[Sequence[int]] | None = None,
      *,
      n: int = 1,
      seed: int = 0,
      row_offset: int = 0,
  ) -> Rollout:
    """Samples ``n`` continuations of each prompt (after its forced prefix, if any).

    Rows come out prompt-major: row ``i·n + j`` is sample ``j`` of prompt ``i``. Each prompt's
    context is prefilled once and its cache rows replicated ``n`` times.

    Args:
      prompt_ids: token ids of each prompt (non-empty).
      prefix_ids: per prompt, forced tokens appended after the prompt (a teacher response
        prefix; may be empty); marked in ``Rollout.prefix_mask``, never sampled.
      n: samples per prompt.
      seed: the call's seed (e.g. the training step). Row r's draws depend only on
        ``(seed, row_offset + r)``, so results do not depend on the micro-batch size.
      row_offset: global index of the first row: give two calls with the same seed disjoint
        ranges (e.g. on-policy rows, then guided rows) so their draws are independent.

    Returns:
      The ``Rollout`` of ``len(prompt_ids) · n`` rows.
    """
    cfg = self.config
    contexts, prompt_lens = _contexts(prompt_ids, prefix_ids)
    if n < 1:
      raise ValueError(f"n={n}: samples per prompt must be >= 1.")
    num_rows = len(contexts) * n
    if not 0 <= seed < 2**31 or not 0 <= row_offset <= 2**31 - num_rows:
      raise ValueError(f"seed={seed}, row_offset={row_offset}: both must fit in [0, 2**31).")
    per_mb = cfg.rows_per_micro_batch(num_rows, n) // n
    cache_dtype = cfg.cache_dtype or self.model.cfg.dtype
    state = nnx.state(self.model)
    put = lambda x: mesh_lib.put(x, ("batch", "length")[: np.ndim(x)], self.mesh)
    outs, lengths, cache_bytes = [], [], 0
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      for start in range(0, len(contexts), per_mb):
        ids = list(range(start, min(start + per_mb, len(contexts))))
        real_rows = len(ids) * n
        ids += [ids[-1]] * (per_mb - len(ids))  # fixed shapes: copies, dropped below
        p = cfg.bucket(max(len(contexts[i]) for i in ids))
        tokens, prompt_mask, prefix_mask = map(put, _pack(
            [contexts[i] for i in ids], [prompt_lens[i] for i in ids], p, cfg.pad_id))
        row_ids = put((row_offset + np.asarray(ids, np.int32)[:, None] * n
                       + np.arange(n, dtype=np.int32)[None]).reshape(-1))
        cache, first, first_logp, keys = prefill(
            self.graphdef, state, tokens, prompt_mask | prefix_mask, np.int32(seed), row_ids,
            config=cfg, n=n)
        out, _ = decode(self.graphdef, state, cache, first, first_logp, keys, tokens,
                        prompt_mask, prefix_mask, config=cfg, n=n)
        outs.append(out if real_rows == per_mb * n else
                    jax.tree.map(lambda x: x[:real_rows], out))
        lengths.append(p)
        # Decoding holds B = C·n rows; prefill's C-row cache is alive while it is replicated.
        cache_rows = per_mb * n + (per_mb if n > 1 else 0)
        cache_bytes = max(cache_bytes, KVCache.num_bytes(
            self.model.cfg, cache_rows, cache_len(cfg, p), cache_dtype))
      result = concat_rollouts(outs, cfg.pad_id)
      if len(outs) > 1 and self.mesh is not None:
        result = jax.tree.map(put, result)
    self.stats = SamplerStats(
        rows=num_rows, micro_batches=len(outs), context_lengths=tuple(lengths),
        kv_cache_bytes=cache_bytes, compilations=compile_counts())
    return result


def _contexts(prompt_ids, prefix_ids):
  prompts = [[int(t) for t in p] for p in prompt_ids]
  if not prompts or any(not p for p in prompts):
    raise ValueError("prompt_ids must hold at least one prompt, and every prompt a token.")
  if prefix_ids is None:
    return prompts, [len(p) for p in prompts]
  if len(prefix_ids) != len(prompts):
    raise ValueError(f"{len(prefix_ids)} prefixes for {len(prompts)} prompts: give one per prompt.")
  return [p + [int(t) for t in q] for p, q in zip(prompts, prefix_ids)], [len(p) for p in prompts]


def _pack(contexts, prompt_lens, p: int, pad_id: int):
  """Left-pads contexts to ``[C, P]``; returns tokens and the prompt / prefix masks."""
  c = len(contexts)
  tokens = np.full((c, p), pad_id, np.int32)
  prompt_mask = np.zeros((c, p), bool)
  prefix_mask = np.zeros((c, p), bool)
  for i, (ctx, m) in enumerate(zip(contexts, prompt_lens)):
    start = p - len(ctx)
    tokens[i, start:] = ctx
    prompt_mask[i, start:start + m] = True
    prefix_mask[i, start + m:] = True
  return tokens, prompt_mask, prefix_mask


@dataclasses.dataclass(frozen=True)
class Generation:
  """``generate``'s result.

  Attributes:
    completion_ids: per prompt, the generated ids (ending with the stop id where one was hit).
    rollout: the full ``Rollout``.
  """

  completion_ids: list[list[int]]
  rollout: Rollout


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    *,
    mesh: jax.sharding.Mesh | None = None,
    micro_batch_size: int = 0,
    vocab_size: int | None = None,
) -> Generation:
  """Samples one completion per prompt (greedy by default); lists in, lists out.

  ``vocab_size``: ids ``>= vocab_size`` are never sampled (None: every embedding row).
  """
  config = SamplerConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
      stop_ids=tuple(stop_ids), micro_batch_size=micro_batch_size, vocab_size=vocab_size,
  )
  rollout = Sampler(model, config, mesh=mesh).rollout(prompt_ids, seed=seed)
  tokens, mask = jax.device_get((rollout.tokens, rollout.completion_mask))
  return Generation([row[m].tolist() for row, m in zip(tokens, mask)], rollout)
