"""Sampling: one continuous-batching engine over a paged KV cache, and ``generate``.

Every row tropd_jax samples (rollouts, guided rows, teacher responses, evaluation) goes through
``Engine`` (``sampling.engine``). ``generate(model, prompt_ids, max_new_tokens, ...)`` is the
list-in, list-out convenience::

    gen = sampling.generate(model, [ids], max_new_tokens=256, temperature=0.6, stop_ids=stops)
    gen.completion_ids[0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from tropd_jax.sampling.config import SamplerConfig
from tropd_jax.sampling.engine import Engine, EngineStats, Request, compile_counts
from tropd_jax.sampling.rollout import Rollout

__all__ = [
    "Engine", "EngineStats", "Generation", "Request", "Rollout", "SamplerConfig",
    "compile_counts", "generate", "requests",
]


def requests(prompt_ids: Sequence[Sequence[int]], *, n: int = 1,
             prefix_ids: Sequence[Sequence[int]] | None = None, budget: int | None = None,
             max_new_tokens: int, row_offset: int = 0) -> list[Request]:
  """``n`` rows per prompt (prompt-major: row ``i·n + j`` is sample ``j`` of prompt ``i``).

  Args:
    prompt_ids: each prompt's token ids (non-empty).
    n: rows per prompt.
    prefix_ids: per prompt, forced tokens after the prompt (a teacher response's start); the
      row's budget shrinks by their count, so prefix and drawn tokens share ``max_new_tokens``.
    budget: tokens each row may draw (default ``max_new_tokens``).
    max_new_tokens: the budget of a whole response.
    row_offset: id of the first row (rows of one call must have distinct ids).
  """
  if n < 1:
    raise ValueError(f"n={n}: rows per prompt must be >= 1.")
  prompts = [tuple(int(t) for t in p) for p in prompt_ids]
  if prefix_ids is not None and len(prefix_ids) != len(prompts):
    raise ValueError(f"{len(prefix_ids)} prefixes for {len(prompts)} prompts: give one per prompt.")
  out = []
  for i, prompt in enumerate(prompts):
    prefix = () if prefix_ids is None else tuple(int(t) for t in prefix_ids[i])
    left = (budget or max_new_tokens) - len(prefix)
    if left < 1:
      raise ValueError(f"prompt {i}: a prefix of {len(prefix)} tokens leaves no budget of "
                       f"{budget or max_new_tokens} new tokens to draw.")
    for j in range(n):
      out.append(Request(prompt + prefix, len(prompt), left, row_offset + i * n + j))
  return out


@dataclasses.dataclass(frozen=True)
class Generation:
  """``generate``'s result.

  Attributes:
    completion_ids: per prompt, the drawn ids (ending with the stop id where one was drawn).
    rollout: the full ``Rollout``.
    stats: the engine's ``EngineStats`` of the call.
  """

  completion_ids: list[list[int]]
  rollout: Rollout
  stats: EngineStats


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
    layout: str = "replicated",
    **engine_options,
) -> Generation:
  """Draws one completion per prompt (greedy by default); lists in, lists out.

  Args:
    model: a ``models.Transformer`` (its weights in the dtype and layout to decode with).
    prompt_ids: each prompt's token ids.
    max_new_tokens: the most tokens per completion.
    temperature, top_p, top_k: the sampling distribution (temperature 0: greedy).
    stop_ids: a completion ends after drawing one of these.
    seed: row ``i`` draws with ``fold_in(key(seed), i)``.
    mesh: the device mesh the model lives on.
    micro_batch_size: slots, rows decoded at once (0: one per prompt).
    vocab_size: ids at or beyond it are never drawn.
    layout: the decode layout the weights are in (``sampling.layout``).
    **engine_options: other ``SamplerConfig`` fields (page_size, num_pages, chunk_steps, ...).
  """
  config = SamplerConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
      stop_ids=tuple(stop_ids), vocab_size=vocab_size, slots=micro_batch_size, **engine_options)
  engine = Engine(model, config, mesh=mesh, layout=layout)
  rollout = engine.generate(requests(prompt_ids, max_new_tokens=max_new_tokens), seed=seed)
  return Generation(rollout.completion_ids, rollout, engine.stats)
