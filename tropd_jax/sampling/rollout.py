"""``Rollout``: the sampled sequences of an engine call, ragged, on the host.

Shape key (tropd_jax/__init__.py): R rows; each row's length is its own.

A row is ``[prompt | forced prefix | completion]`` with no padding: its prompt, the teacher
prefix it was forced to continue (guided rows; empty otherwise), and the tokens the sampler drew
(a final stop id included). ``batch.pack`` turns a rollout into the training batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


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
