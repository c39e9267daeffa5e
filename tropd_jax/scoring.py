"""Vocabulary projection, chunk by chunk: the teacher's scores and the student's token statistics.

An objective needs, per response position, a handful of numbers from each model's next-token
distribution (METHOD.md §10). This module computes them from hidden states and the vocabulary
matrix without ever holding `[B, T, V]` logits: a `lax.scan` over position chunks projects C
positions at a time and keeps only `[B, T]`- and `[B, T, K]`-sized results. On the student side
every chunk is rematerialized (`jax.checkpoint`), so the backward pass recomputes a chunk's logits
instead of storing them; peak memory grows with `C·V`, not `T·V`.

Logits are accumulated in float32 whatever the dtype of the inputs. Rows of the vocabulary matrix
at or beyond `vocab_size` (embedding padding: Qwen2-7B has 152064 rows for a 151936-token
tokenizer) get logit `-inf`, so teacher and student are compared over the tokenizer's vocabulary.

Shape key:
  B: batch       T: time (positions)   D: model width   V: vocabulary rows
  C: chunk       N: number of chunks   K: teacher top-k
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from tropd_jax import mesh as mesh_lib

# Positions per scan step. On one TPU v5p chip the student loss+grad at D=2048, V=151936 (bf16)
# needs 0.3 GiB of temporaries at C=256, at T=8192 and T=32768 alike; C=128 runs 1.4x slower on
# the CPU, C>=512 no faster with 2-4x the memory (benchmarks/loss_memory.py).
DEFAULT_CHUNK_SIZE = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeacherScores:
  """The frozen teacher's view of every position (no gradient).

  Attributes:
    logp: [B, T] float32 log-prob of the target token.
    topk_ids: [B, T, K] int32 the K most probable token ids, most probable first.
    topk_logp: [B, T, K] float32 their log-probs (normalized over the whole vocabulary).
    tail_logp: [B, T] float32 log of the probability mass outside the top-k.
    entropy: [B, T] float32 entropy of the next-token distribution, in nats.
  """

  logp: jax.Array
  topk_ids: jax.Array
  topk_logp: jax.Array
  tail_logp: jax.Array
  entropy: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenStats:
  """Everything a per-token objective reads, for each response position.

  Fields marked (grad) carry the gradient to the student's parameters; all others are constants.
  Position t holds the statistics of predicting the target token `tokens[:, t]`.

  Attributes:
    student_logp: [B, T] float32 (grad) student log-prob of the target token, `s_t`.
    teacher_logp: [B, T] float32 teacher log-prob of the target token, `τ_t`.
    teacher_topk_ids: [B, T, K] int32 the teacher's top-k token ids `K_t`.
    teacher_topk_logp: [B, T, K] float32 teacher log-probs at `K_t`.
    student_topk_logp: [B, T, K] float32 (grad) student log-probs at `K_t` (full-vocabulary
      normalization).
    teacher_tail_logp: [B, T] float32 log of the teacher's mass outside `K_t`.
    student_tail_logp: [B, T] float32 (grad) log of the student's mass outside `K_t`.
    teacher_entropy: [B, T] float32 teacher entropy, nats.
    student_entropy: [B, T] float32 student entropy, nats (detached: used to select tokens only).
    completion_mask: [B, T] bool tokens the student sampled (on-policy continuation).
    prefix_mask: [B, T] bool teacher-prefix tokens of guided rollouts (off-policy guidance).
  """

  student_logp: jax.Array
  teacher_logp: jax.Array
  teacher_topk_ids: jax.Array
  teacher_topk_logp: jax.Array
  student_topk_logp: jax.Array
  teacher_tail_logp: jax.Array
  student_tail_logp: jax.Array
  teacher_entropy: jax.Array
  student_entropy: jax.Array
  completion_mask: jax.Array
  prefix_mask: jax.Array

  @property
  def loss_mask(self) -> jax.Array:
    """[B, T] bool response tokens (completion or teacher prefix); padding and prompt excluded."""
    return self.completion_mask | self.prefix_mask


def project(h_BTD: jax.Array, w_VD: jax.Array, vocab_size: int | None = None) -> jax.Array:
  """Float32 logits `[B, T, V]`, with `-inf` at rows `>= vocab_size` (default: all rows real).

  The matmul runs in `h_BTD`'s dtype (the compute dtype): `w_VD` may stay in its master dtype.
  """
  w_VD = w_VD.astype(h_BTD.dtype)
  logits_BTV = jnp.einsum("BTD,VD->BTV", h_BTD, w_VD, preferred_element_type=jnp.float32)
  return mask_vocab(logits_BTV, vocab_size)


def mask_vocab(logits_BTV: jax.Array, vocab_size: int | None) -> jax.Array:
  """Sets the logits of ids `>= vocab_size` to `-inf` (float32); `None` keeps every id."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  if vocab_size is None or vocab_size == logits_BTV.shape[-1]:
    return logits_BTV
  if not 0 < vocab_size <= logits_BTV.shape[-1]:
    raise ValueError(f"vocab_size={vocab_size} must be in [1, {logits_BTV.shape[-1]}].")
  ids_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, logits_BTV.ndim - 1)
  return jnp.where(ids_BTV < vocab_size, logits_BTV, -jnp.inf)


def _entropy(logits_BTV: jax.Array, lse_BT: jax.Array) -> jax.Array:
  """`H = lse − Σ p·z`, with masked (`-inf`) logits contributing exactly 0 (no `0·inf`)."""
  p_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
  finite_BTV = jnp.where(jnp.isfinite(logits_BTV), logits_BTV, 0.0)
  return lse_BT - jnp.sum(p_BTV * finite_BTV, axis=-1)


def _tail_logp(logits_BTV: jax.Array, lse_BT: jax.Array, topk_ids_BTK: jax.Array) -> jax.Array:
  """Log-mass outside `topk_ids`, summed directly (not `log(1 − Σ top-k)`, which cancels badly)."""
  in_topk_BTV = jnp.put_along_axis(
      jnp.zeros(logits_BTV.shape, bool), topk_ids_BTK, True, axis=-1, inplace=False
  )
  tail_lse_BT = jax.nn.logsumexp(jnp.where(in_topk_BTV, -jnp.inf, logits_BTV), axis=-1)
  return tail_lse_BT - lse_BT


def _gather(x_BTV: jax.Array, ids_BTK: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BTV, ids_BTK, axis=-1)


def teacher_scores_from_logits(
    logits_BTV: jax.Array, tokens_BT: jax.Array, top_k: int
) -> TeacherScores:
  """`TeacherScores` from float32 logits (already vocab-masked); any T, no chunking."""
  if not 0 < top_k < logits_BTV.shape[-1]:
    raise ValueError(f"top_k={top_k} must be in [1, {logits_BTV.shape[-1]}) (the vocabulary).")
  logits_BTV = jax.lax.stop_gradient(logits_BTV)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # On a 2-D view: XLA:TPU lowers a rank-2 top-k to its TopK op, a rank-3 one to a full sort.
  *lead, v = logits_BTV.shape
  topk_logits, topk_ids = jax.lax.top_k(logits_BTV.reshape(-1, v), top_k)
  topk_logits_BTK = topk_logits.reshape(*lead, top_k)
  topk_ids_BTK = topk_ids.reshape(*lead, top_k)
  return TeacherScores(
      logp=_gather(logits_BTV, tokens_BT[..., None])[..., 0] - lse_BT,
      topk_ids=topk_ids_BTK.astype(jnp.int32),
      topk_logp=topk_logits_BTK - lse_BT[..., None],
      tail_logp=_tail_logp(logits_BTV, lse_BT, topk_ids_BTK),
      entropy=_entropy(logits_BTV, lse_BT),
  )


def _student_fields(
    logits_BTV: jax.Array, tokens_BT: jax.Array, topk_ids_BTK: jax.Array
) -> dict[str, jax.Array]:
  """The student's fields of `TokenStats` from float32 logits (already vocab-masked)."""
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  return dict(
      student_logp=_gather(logits_BTV, tokens_BT[..., None])[..., 0] - lse_BT,
      student_topk_logp=_gather(logits_BTV, topk_ids_BTK) - lse_BT[..., None],
      student_tail_logp=_tail_logp(logits_BTV, lse_BT, topk_ids_BTK),
      student_entropy=jax.lax.stop_gradient(_entropy(logits_BTV, lse_BT)),
  )


def _join(
    student: dict[str, jax.Array],
    teacher: TeacherScores,
    completion_mask_BT: jax.Array,
    prefix_mask_BT: jax.Array,
) -> TokenStats:
  return TokenStats(
      teacher_logp=teacher.logp,
      teacher_topk_ids=teacher.topk_ids,
      teacher_topk_logp=teacher.topk_logp,
      teacher_tail_logp=teacher.tail_logp,
      teacher_entropy=teacher.entropy,
      completion_mask=completion_mask_BT.astype(bool),
      prefix_mask=prefix_mask_BT.astype(bool),
      **student,
  )


def student_stats_from_logits(
    logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    teacher: TeacherScores,
    completion_mask_BT: jax.Array,
    prefix_mask_BT: jax.Array,
) -> TokenStats:
  """`TokenStats` from the student's full float32 logits (already vocab-masked), no chunking."""
  student = _student_fields(logits_BTV, tokens_BT, teacher.topk_ids)
  return _join(student, teacher, completion_mask_BT, prefix_mask_BT)


def token_stats(
    student_logits_BTV: jax.Array,
    teacher_logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    top_k: int,
    *,
    completion_mask_BT: jax.Array | None = None,
    prefix_mask_BT: jax.Array | None = None,
    vocab_size: int | None = None,
) -> TokenStats:
  """Reference `TokenStats` from full `[B, T, V]` logits (tests and small models).

  Args:
    student_logits_BTV: [B, T, V] student logits (gradient flows through them).
    teacher_logits_BTV: [B, T, V] teacher logits (detached).
    tokens_BT: [B, T] int target ids, aligned with the logits (position t predicts `tokens[:, t]`).
    top_k: K, the size of the teacher's top-k support.
    completion_mask_BT: [B, T] sampled-token mask; default all True.
    prefix_mask_BT: [B, T] teacher-prefix mask; default all False.
    vocab_size: the tokenizer's real vocabulary; logits at ids `>= vocab_size` are ignored.

  Returns:
    The same `TokenStats` as `score_teacher` + `student_token_stats` on the hidden states.
  """
  if completion_mask_BT is None:
    completion_mask_BT = jnp.ones(tokens_BT.shape, bool)
  if prefix_mask_BT is None:
    prefix_mask_BT = jnp.zeros(tokens_BT.shape, bool)
  teacher_logits_BTV = mask_vocab(teacher_logits_BTV, vocab_size)
  student_logits_BTV = mask_vocab(student_logits_BTV, vocab_size)
  teacher = teacher_scores_from_logits(teacher_logits_BTV, tokens_BT, top_k)
  return student_stats_from_logits(
      student_logits_BTV, tokens_BT, teacher, completion_mask_BT, prefix_mask_BT
  )


def _scan_chunks(chunk_fn: Callable, inputs, chunk_size: int):
  """Maps `chunk_fn` over position chunks of `inputs` with `lax.scan`.

  Args:
    chunk_fn: pytree of [B, C, ...] arrays -> pytree of [B, C, ...] arrays.
    inputs: pytree of [B, T, ...] arrays.
    chunk_size: C; T need not be a multiple (inputs are zero-padded up to N·C, outputs cut back).

  Returns:
    The pytree of chunk outputs reassembled to [B, T, ...].
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be a positive integer.")
  B, T = jax.tree.leaves(inputs)[0].shape[:2]
  C = min(chunk_size, T)
  N = -(-T // C)

  def to_chunks(x_BT):
    x_BT = jnp.pad(x_BT, [(0, 0), (0, N * C - T)] + [(0, 0)] * (x_BT.ndim - 2))
    return jnp.moveaxis(x_BT.reshape(B, N, C, *x_BT.shape[2:]), 1, 0)

  def from_chunks(y_NBC):
    y_BNC = jnp.moveaxis(y_NBC, 0, 1)
    return y_BNC.reshape(B, N * C, *y_BNC.shape[3:])[:, :T]

  chunks = jax.tree.map(to_chunks, inputs)
  _, outputs = jax.lax.scan(lambda _, chunk: (None, chunk_fn(chunk)), None, chunks)
  return jax.tree.map(from_chunks, outputs)


def _gathered(w_VD: jax.Array) -> jax.Array:
  """The vocabulary matrix with its model-width axis whole (vocabulary rows stay sharded).

  Constrained once before the chunk scan, so an FSDP-sharded matrix is gathered once per call
  (and its gradient reduced once) instead of in every chunk.
  """
  return mesh_lib.shard(w_VD, ("vocab", None))


def score_teacher(
    h_BTD: jax.Array,
    w_VD: jax.Array,
    tokens_BT: jax.Array,
    *,
    top_k: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
) -> TeacherScores:
  """The teacher pass: chunked projection, keeping only `[B, T, K]`-sized results (no gradient).

  Args:
    h_BTD: [B, T, D] the teacher's hidden states after the final norm.
    w_VD: [V, D] the teacher's vocabulary matrix (tied embedding or lm_head, any float dtype).
    tokens_BT: [B, T] int target ids aligned with `h_BTD` (the caller shifts by one).
    top_k: K.
    chunk_size: C, positions per scan step.
    vocab_size: the tokenizer's real vocabulary (default V); rows beyond it get no probability.

  Returns:
    `TeacherScores` with [B, T] and [B, T, K] fields.
  """
  h_BTD, w_VD = jax.lax.stop_gradient((h_BTD, w_VD))
  w_VD = _gathered(w_VD)

  def chunk_scores(xs):
    h_BCD, tokens_BC = xs
    return teacher_scores_from_logits(project(h_BCD, w_VD, vocab_size), tokens_BC, top_k)

  return _scan_chunks(chunk_scores, (h_BTD, tokens_BT), chunk_size)


def student_token_stats(
    h_BTD: jax.Array,
    w_VD: jax.Array,
    tokens_BT: jax.Array,
    teacher: TeacherScores,
    completion_mask_BT: jax.Array,
    prefix_mask_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
) -> TokenStats:
  """The student pass, inside the loss: chunked, rematerialized projection joined with `teacher`.

  Gradients flow to `h_BTD` and `w_VD` through `student_logp`, `student_topk_logp` and
  `student_tail_logp`. The backward pass recomputes each chunk's `[B, C, V]` logits. The gradient
  of `w_VD` is summed over chunks in `w_VD`'s dtype: pass the float32 master matrix (the matmul
  still runs in `h_BTD`'s dtype) to sum in float32, at the cost of one compute-dtype copy of it
  among the temporaries; a bfloat16 `w_VD` sums in bfloat16.

  Args:
    h_BTD: [B, T, D] the student's hidden states after the final norm.
    w_VD: [V, D] the student's vocabulary matrix (master or compute dtype).
    tokens_BT: [B, T] int target ids aligned with `h_BTD`.
    teacher: `TeacherScores` for the same tokens (from `score_teacher`).
    completion_mask_BT: [B, T] bool sampled-token mask.
    prefix_mask_BT: [B, T] bool teacher-prefix mask.
    chunk_size: C, positions per scan step.
    vocab_size: the tokenizer's real vocabulary (default V).

  Returns:
    `TokenStats` for every position.
  """

  w_VD = _gathered(w_VD)

  @jax.checkpoint
  def chunk_stats(xs):
    h_BCD, tokens_BC, topk_ids_BCK = xs
    return _student_fields(project(h_BCD, w_VD, vocab_size), tokens_BC, topk_ids_BCK)

  student = _scan_chunks(chunk_stats, (h_BTD, tokens_BT, teacher.topk_ids), chunk_size)
  return _join(student, teacher, completion_mask_BT, prefix_mask_BT)
