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

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
  """A batch of sampled sequences.

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


def pad_to_length(rollout: Rollout, length: int, pad_id: int = 0) -> Rollout:
  """Right-pads every ``[B, L]`` field to ``[B, length]`` (padding slots: masks False)."""
  extra = length - rollout.tokens.shape[1]
  if extra < 0:
    raise ValueError(f"cannot pad a rollout of length {rollout.tokens.shape[1]} to {length}.")
  if extra == 0:
    return rollout
  pad = lambda x, value: jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)
  return dataclasses.replace(
      rollout,
      tokens=pad(rollout.tokens, pad_id),
      prompt_mask=pad(rollout.prompt_mask, False),
      prefix_mask=pad(rollout.prefix_mask, False),
      completion_mask=pad(rollout.completion_mask, False),
      logp=pad(rollout.logp, 0.0),
  )


def concat_rollouts(rollouts: list[Rollout], pad_id: int = 0) -> Rollout:
  """Stacks rollouts along rows, right-padding to the longest ``L`` (e.g. on-policy + guided)."""
  length = max(r.tokens.shape[1] for r in rollouts)
  padded = [pad_to_length(r, length, pad_id) for r in rollouts]
  if len(padded) == 1:
    return padded[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *padded)
