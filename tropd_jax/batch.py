"""The training batch: a step's sequences packed into rows, aligned for next-token prediction.

A ``Rollout`` (ragged sequences, on the host) becomes a ``Batch`` by one constructor, ``pack``:
each sequence ``[prompt | teacher prefix | completion]`` is shifted by one (position t reads
token t and predicts token t + 1) and placed, whole, into a row of ``T`` positions next to
other sequences (first fit, longest first). ``segment_ids`` keep the sequences of a row apart
(attention never crosses them) and ``positions`` restart at 0 for each, so a packed row computes
exactly what its sequences would alone, while the compute follows the real token count instead
of ``rows × longest``.

Shape key (tropd_jax/__init__.py): B rows, T positions, M micro-batches.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tropd_jax.sampling.rollout import Rollout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """Packed rows for scoring and training (numpy on the host, jax arrays on the mesh).

  Attributes:
    inputs: int32 [B, T] tokens fed to the models.
    targets: int32 [B, T] the token each position predicts.
    segment_ids: int32 [B, T] which sequence of the row a position belongs to (1, 2, ...);
      0 at padding.
    positions: int32 [B, T] each input's position in its own sequence (RoPE).
    sequence_ids: int32 [B, T] the sequence's index in the step (keys the trust-region draw).
    completion_mask: bool [B, T] targets the student sampled.
    prefix_mask: bool [B, T] targets from a teacher prefix (off-policy guidance).
    sampler_logp: float32 [B, T] the sampler's log-prob of each sampled target (0 elsewhere).
  """

  inputs: jax.Array
  targets: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  sequence_ids: jax.Array
  completion_mask: jax.Array
  prefix_mask: jax.Array
  sampler_logp: jax.Array

  @property
  def loss_mask(self) -> jax.Array:
    """bool [B, T] response targets (completion or teacher prefix): what every loss counts."""
    return self.completion_mask | self.prefix_mask

  @property
  def num_rows(self) -> int:
    return self.inputs.shape[0]

  @staticmethod
  def dtypes() -> dict[str, np.dtype]:
    """Each field's dtype (abstract batches for ahead-of-time compilation use them)."""
    return {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
            "positions": np.int32, "sequence_ids": np.int32, "completion_mask": np.bool_,
            "prefix_mask": np.bool_, "sampler_logp": np.float32}

  @classmethod
  def zeros(cls, rows: int, length: int, pad_id: int = 0) -> Batch:
    """``rows`` rows of padding only."""
    fields = {name: np.zeros((rows, length), dtype) for name, dtype in cls.dtypes().items()}
    fields["inputs"][:] = pad_id
    fields["targets"][:] = pad_id
    return cls(**fields)

  def micro_batches(self, micro_batch: int) -> list[Batch]:
    """Consecutive groups of ``micro_batch`` rows (the row count must be a multiple)."""
    if self.num_rows % micro_batch:
      raise ValueError(f"{self.num_rows} rows do not split into micro-batches of {micro_batch}.")
    return [jax.tree.map(lambda x, i=i: x[i:i + micro_batch], self)
            for i in range(0, self.num_rows, micro_batch)]


@dataclasses.dataclass(frozen=True)
class PackStats:
  """What packing did: ``positions`` computed for ``tokens`` real input positions."""

  rows: int
  positions: int
  tokens: int

  @property
  def padding_ratio(self) -> float:
    """Positions computed per real token (1.0: no padding)."""
    return self.positions / max(self.tokens, 1)


def pack(rollout: Rollout, *, length: int, rows_multiple: int = 1,
         pad_id: int = 0) -> tuple[Batch, PackStats]:
  """Packs every sequence of ``rollout`` into rows of ``length`` positions.

  Args:
    rollout: the step's sequences; sequence ``r`` keeps ``sequence_ids == r``.
    length: T, positions per row; a sequence of ``n`` tokens takes ``n - 1`` of them.
    rows_multiple: the row count is padded (with empty rows) up to a multiple of this
      (the micro-batch size).
    pad_id: token id at padding positions.

  Returns:
    The host ``Batch`` ``[B, T]`` and its ``PackStats``.
  """
  sizes = [len(t) - 1 for t in rollout.tokens]
  if max(sizes, default=0) > length:
    raise ValueError(f"a sequence of {max(sizes) + 1} tokens does not fit in packed rows of "
                     f"{length} positions; raise train.pack_length.")
  bins: list[list[int]] = []  # sequence indices per row
  free: list[int] = []  # positions left per row
  for r in sorted(range(len(sizes)), key=lambda r: -sizes[r]):
    if sizes[r] <= 0:
      continue
    row = next((i for i, f in enumerate(free) if f >= sizes[r]), None)
    if row is None:
      bins.append([])
      free.append(length)
      row = len(bins) - 1
    bins[row].append(r)
    free[row] -= sizes[r]
  rows = -(-max(len(bins), 1) // rows_multiple) * rows_multiple
  batch = Batch.zeros(rows, length, pad_id)
  for row, members in enumerate(bins):
    start = 0
    for segment, r in enumerate(members, start=1):
      tokens = np.asarray(rollout.tokens[r], np.int32)
      n = len(tokens) - 1
      span = slice(start, start + n)
      batch.inputs[row, span] = tokens[:-1]
      batch.targets[row, span] = tokens[1:]
      batch.segment_ids[row, span] = segment
      batch.positions[row, span] = np.arange(n)
      batch.sequence_ids[row, span] = r
      # Target j predicts token j + 1: a prefix token when j + 1 is in [P, P + F).
      context = int(rollout.prompt_lengths[r] + rollout.prefix_lengths[r])
      j = np.arange(n)
      batch.prefix_mask[row, span] = (j + 1 >= rollout.prompt_lengths[r]) & (j + 1 < context)
      batch.completion_mask[row, span] = j + 1 >= context
      logp = np.asarray(rollout.logp[r], np.float32)
      batch.sampler_logp[row, start + context - 1:start + context - 1 + len(logp)] = logp
      start += n
  stats = PackStats(rows=rows, positions=rows * length, tokens=int(sum(max(s, 0) for s in sizes)))
  return batch, stats
