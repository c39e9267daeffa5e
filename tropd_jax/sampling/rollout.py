"""``Rollout``: what the sampler hands to scoring and training, and its shift-by-one view.

Shape key: B rows, L row length (fixed per call).

Every row has the layout ``[left pad | prompt | forced prefix | completion | right pad]``. A row's
context (prompt + prefix) is left-padded so that all rows of a micro-batch start generating at
the same slot; the completion is followed by padding once the row stops. ``L`` is the longest
micro-batch's bucketed context length plus ``max_new_tokens``. The masks say which slots are
which, so feeding ``tokens`` to the model with ``mask_BT=token_mask`` gives each real token the
RoPE position it had while sampling (its count of real tokens before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaddedRollout:
  """A batch of sampled sequences in one padded ``[B, L]`` layout (the decode loop's output).

  Attributes:
    tokens: int32 [B, L] token ids; ``pad_id`` at padding slots.
    prompt_mask: bool [B, L] prompt tokens.
    prefix_mask: bool [B, L] forced-prefix tokens (teacher response, not sampled by the student).
    completion_mask: bool [B, L] tokens the sampler drew (including a final stop token).
    logp: float32 [B, L] the sampler's log-prob of each drawn token: the log-softmax of the
      temperature-scaled, top-k/top-p filtered logits it was drawn from (the plain model
      log-softmax when greedy); 0 wherever ``completion_mask`` is False.
    lengths: int32 [B] completion lengths (``completion_mask.sum(1)``).
    stopped: bool [B] the row ended with a stop id; False: truncated at ``max_new_tokens``.
  """

  tokens: jax.Array
  prompt_mask: jax.Array
  prefix_mask: jax.Array
  completion_mask: jax.Array
  logp: jax.Array
  lengths: jax.Array
  stopped: jax.Array

  @property
  def token_mask(self) -> jax.Array:
    """bool [B, L] real tokens (prompt, prefix or completion); False at padding."""
    return self.prompt_mask | self.prefix_mask | self.completion_mask

  @property
  def truncated(self) -> jax.Array:
    """bool [B] rows that hit ``max_new_tokens`` without a stop id."""
    return ~self.stopped

  @property
  def prompt_lengths(self) -> jax.Array:
    return jnp.sum(self.prompt_mask, axis=1, dtype=jnp.int32)

  @property
  def prefix_lengths(self) -> jax.Array:
    return jnp.sum(self.prefix_mask, axis=1, dtype=jnp.int32)

  def to_host(self) -> Rollout:
    """The ragged host ``Rollout`` of these rows (gathered from every process)."""
    from jax.experimental import multihost_utils

    get = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)
                               if not x.is_fully_addressable else jax.device_get(x))
    tokens, prompt, prefix, completion, logp, stopped = map(get, (
        self.tokens, self.prompt_mask, self.prefix_mask, self.completion_mask, self.logp,
        self.stopped))
    real = prompt | prefix | completion
    return Rollout(
        tokens=tuple(t[m].astype(np.int32) for t, m in zip(tokens, real)),
        prompt_lengths=prompt.sum(1).astype(np.int32),
        prefix_lengths=prefix.sum(1).astype(np.int32),
        logp=tuple(lp[m].astype(np.float32) for lp, m in zip(logp, completion)),
        stopped=stopped.astype(bool))

  def shifted(self) -> ScoringInputs:
    """The next-token-prediction view the trainer and the teacher score."""
    return ScoringInputs(
        inputs=self.tokens[:, :-1],
        input_mask=self.token_mask[:, :-1],
        targets=self.tokens[:, 1:],
        completion_mask=self.completion_mask[:, 1:],
        prefix_mask=self.prefix_mask[:, 1:],
        sampler_logp=self.logp[:, 1:],
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoringInputs:
  """A ``Rollout`` shifted by one: position t reads ``inputs[:, :t+1]`` and predicts ``targets[:, t]``.

  Run the model as ``model.hidden(inputs, mask_BT=input_mask)`` (default positions: the count of
  real tokens before each, as in sampling), then score ``targets`` where ``loss_mask`` is True.

  Attributes:
    inputs: int32 [B, L-1] ``tokens[:, :-1]``.
    input_mask: bool [B, L-1] real input tokens (attention mask).
    targets: int32 [B, L-1] ``tokens[:, 1:]``.
    completion_mask: bool [B, L-1] targets the student sampled (on-policy tokens).
    prefix_mask: bool [B, L-1] targets from the forced teacher prefix (guidance tokens).
    sampler_logp: float32 [B, L-1] the sampler's log-prob of each sampled target, 0 elsewhere.
  """

  inputs: jax.Array
  input_mask: jax.Array
  targets: jax.Array
  completion_mask: jax.Array
  prefix_mask: jax.Array
  sampler_logp: jax.Array

  @property
  def loss_mask(self) -> jax.Array:
    """bool [B, L-1] response targets (completion or prefix); prompt and padding excluded."""
    return self.completion_mask | self.prefix_mask

  @property
  def positions(self) -> jax.Array:
    """int32 [B, L-1] RoPE position of each input: its count of real tokens before it.

    What ``model.hidden`` computes from ``input_mask`` by default, and what the sampler used.
    """
    return jnp.maximum(jnp.cumsum(self.input_mask, axis=1, dtype=jnp.int32) - 1, 0)


@dataclasses.dataclass(frozen=True)
class Rollout:
  """Sampled sequences on the host, one per request, in request order.

  Attributes:
    tokens: per row, int32 [T_r]: its prompt, forced prefix and completion (a final stop id
      included), no padding.
    prompt_lengths: int32 [R] prompt tokens of each row.
    prefix_lengths: int32 [R] forced-prefix tokens (a teacher response's start; 0 if none).
    logp: per row, float32 [completion length]: the sampler's log-prob of each drawn token (the
      log-softmax of the temperature-scaled, top-k/top-p filtered logits it was drawn from).
    stopped: bool [R] the row ended with a stop id; False: it used its whole budget.
  """

  tokens: tuple[np.ndarray, ...]
  prompt_lengths: np.ndarray
  prefix_lengths: np.ndarray
  logp: tuple[np.ndarray, ...]
  stopped: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def lengths(self) -> np.ndarray:
    """int32 [R] completion lengths."""
    return np.asarray([len(lp) for lp in self.logp], np.int32)

  @property
  def truncated(self) -> np.ndarray:
    """bool [R] rows that used their whole budget without a stop id."""
    return ~self.stopped

  def completion(self, r: int) -> np.ndarray:
    return self.tokens[r][self.prompt_lengths[r] + self.prefix_lengths[r]:]

  @property
  def completion_ids(self) -> list[list[int]]:
    return [self.completion(r).tolist() for r in range(len(self))]

  @classmethod
  def concat(cls, rollouts: Sequence[Rollout]) -> Rollout:
    """The rows of ``rollouts`` one after the other (e.g. on-policy, then guided)."""
    return cls(
        tokens=tuple(t for r in rollouts for t in r.tokens),
        prompt_lengths=np.concatenate([r.prompt_lengths for r in rollouts]),
        prefix_lengths=np.concatenate([r.prefix_lengths for r in rollouts]),
        logp=tuple(lp for r in rollouts for lp in r.logp),
        stopped=np.concatenate([r.stopped for r in rollouts]))
