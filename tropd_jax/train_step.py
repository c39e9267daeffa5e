"""The jitted phases of a step: teacher scoring, and the student update.

Shape key: R rollout rows in the step, M micro-batches, B rows per micro-batch
(R = M·B), L positions (a rollout row minus its last token), K teacher top-k.

Both phases are pure functions of arrays, built once per run by
``make_teacher_scorer`` / ``make_train_step`` and jitted with explicit
shardings; the update donates the training state. Parameters are kept in
their master dtype (float32) and cast to the compute dtype inside the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax import objectives, scoring
from tropd_jax.objectives import ObjectiveConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """The rows a step trains on, aligned for next-token prediction.

  Attributes:
    inputs: [R, L] int32 tokens fed to the models (a rollout row without its last token).
    targets: [R, L] int32 the token each position predicts (the row shifted left by one).
    input_mask: [R, L] bool real input tokens (padding is never attended to).
    completion_mask: [R, L] bool targets the student sampled.
    prefix_mask: [R, L] bool targets from a teacher prefix (off-policy guidance).
    row_ids: [R] int32 global row index (keys the trust-region noise).
    sampler_logp: [R, L] float32 the sampler's log-prob of each sampled target (0 elsewhere);
      compared with the training forward pass to log the rollout/train mismatch.
  """

  inputs: jax.Array
  targets: jax.Array
  input_mask: jax.Array
  completion_mask: jax.Array
  prefix_mask: jax.Array
  row_ids: jax.Array
  sampler_logp: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Student parameters (master dtype), optimizer state and the step counter."""

  params: Any
  opt_state: Any
  step: jax.Array


def lr_schedule(*, lr: float, schedule: str, warmup_steps: int, steps: int) -> optax.Schedule:
  """The learning rate at each update: constant (after a linear warmup) or warmup + cosine."""
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), steps)
  if warmup_steps:
    return optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.constant_schedule(lr)


def make_optimizer(*, lr: float, schedule: str, warmup_steps: int, steps: int,
                   weight_decay: float, b1: float, b2: float, grad_clip: float):
  """AdamW with global-norm clipping and a constant or cosine learning rate."""
  tx = optax.adamw(lr_schedule(lr=lr, schedule=schedule, warmup_steps=warmup_steps, steps=steps),
                   b1=b1, b2=b2, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx


def _split_micro(tree, micro_batch: int):
  """[R, ...] leaves -> [M, B, ...] with B = micro_batch."""
  def split(x):
    if x.shape[0] % micro_batch:
      raise ValueError(f"{x.shape[0]} rows do not divide into micro-batches of {micro_batch}.")
    return x.reshape(x.shape[0] // micro_batch, micro_batch, *x.shape[1:])
  return jax.tree.map(split, tree)


def _merge_micro(tree):
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def _rows_sharded(tree):
  """Rows over the batch mesh axes, as the step's batch (else XLA may replicate the outputs)."""
  return jax.tree.map(lambda x: mesh_lib.shard(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def _cast(params, dtype):
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                      params)


def _hidden(graphdef, params, batch: Batch, compute_dtype):
  model = nnx.merge(graphdef, _cast(params, compute_dtype))
  h_BLD, _ = model.hidden(batch.inputs, mask_BT=batch.input_mask)
  return h_BLD, model.head_weight()


def make_teacher_scorer(graphdef, *, top_k: int, chunk_size: int, vocab_size: int,
                        micro_batch: int, compute_dtype=jnp.bfloat16) -> Callable:
  """``score(params, batch) -> TeacherScores [R, L(, K)]``: no gradient, micro-batched."""

  def score_one(params, mb: Batch) -> scoring.TeacherScores:
    h_BLD, w_VD = _hidden(graphdef, params, mb, compute_dtype)
    return scoring.score_teacher(h_BLD, w_VD, mb.targets, top_k=top_k, chunk_size=chunk_size,
                                 vocab_size=vocab_size)

  def score(params, batch: Batch) -> scoring.TeacherScores:
    params = jax.lax.stop_gradient(params)
    scores = jax.lax.map(lambda mb: score_one(params, mb), _split_micro(batch, micro_batch))
    return _rows_sharded(_merge_micro(scores))

  return score


def make_student_logp(graphdef, *, chunk_size: int, vocab_size: int, micro_batch: int,
                      compute_dtype=jnp.bfloat16) -> Callable:
  """``logp(params, batch) -> [R, L]``: the training model's log-prob of each target (no grad).

  The rollout-time ``s̄_t`` for updates after the first when ``ppo_epochs > 1``.
  """

  def one(params, mb: Batch):
    h_BLD, w_VD = _hidden(graphdef, params, mb, compute_dtype)
    return scoring.score_teacher(h_BLD, w_VD, mb.targets, top_k=1, chunk_size=chunk_size,
                                 vocab_size=vocab_size).logp

  def logp(params, batch: Batch):
    params = jax.lax.stop_gradient(params)
    return _rows_sharded(
        _merge_micro(jax.lax.map(lambda mb: one(params, mb), _split_micro(batch, micro_batch))))

  return logp


def make_train_step(graphdef, tx, obj_cfg: ObjectiveConfig, *, chunk_size: int, vocab_size: int,
                    micro_batch: int, compute_dtype=jnp.bfloat16) -> Callable:
  """``step(state, batch, teacher, key, old_logp) -> (state, metrics)``.

  Gradients are accumulated over micro-batches of ``micro_batch`` rows with a
  token-mean over the whole step. A non-finite loss or gradient leaves
  ``params`` and ``opt_state`` unchanged and reports ``finite = 0``.
  """

  def micro_loss(params, mb: Batch, teacher: scoring.TeacherScores, u_BL, old_logp_BL,
                 denominator):
    h_BLD, w_VD = _hidden(graphdef, params, mb, compute_dtype)
    stats = scoring.student_token_stats(
        h_BLD, w_VD, mb.targets, teacher, mb.completion_mask, mb.prefix_mask,
        chunk_size=chunk_size, vocab_size=vocab_size)
    loss_BL, metrics = objectives.per_token_loss(stats, u_BL, obj_cfg, old_logp_BL)
    gap_BL = jnp.abs(mb.sampler_logp - jax.lax.stop_gradient(stats.student_logp))
    metrics["rollout/logp_mismatch"] = (jnp.sum(jnp.where(mb.completion_mask, gap_BL, 0.0)),
                                        jnp.sum(mb.completion_mask, dtype=jnp.int32))
    return objectives.token_mean(loss_BL, stats.loss_mask, denominator), metrics

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: Batch, teacher: scoring.TeacherScores, key, old_logp_RL):
    u_RL = objectives.trust_noise(key, state.step, batch.row_ids, batch.targets.shape[1])
    denominator = jnp.maximum(jnp.sum(batch.completion_mask | batch.prefix_mask), 1)
    micro = _split_micro((batch, teacher, u_RL, old_logp_RL), micro_batch)

    def accumulate(carry, xs):
      grads, metrics = carry
      mb, mb_teacher, u_BL, old_BL = xs
      g, m = grad_fn(state.params, mb, mb_teacher, u_BL, old_BL, denominator)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_metrics = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(lambda: micro_loss(state.params, *first, denominator)[1]))
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), micro)

    means = objectives.metric_means(metrics)
    loss = sum(v for k, v in means.items() if k.startswith("loss/"))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(keep(new_params, state.params), keep(new_opt, state.opt_state),
                           state.step + 1)
    means.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                 tokens=denominator.astype(jnp.float32))
    return new_state, means

  return step


def opt_state_shardings(tx, params) -> Any:
  """Shardings for ``tx.init(params)``: parameter-shaped leaves (Adam's moments) like their
  parameter, the rest (step counts) replicated. A plain ``jax.jit(tx.init)`` leaves them to XLA.

  ``params``: arrays or ShapeDtypeStructs with NamedShardings. Call it outside ``jax.set_mesh``
  (optax traces ``tx.init`` on placeholders).
  """
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  return optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def state_shardings(state: TrainState):
  return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(batch_like, mesh) -> Any:
  """Rows over the batch mesh axes for every field of a Batch / TeacherScores pytree."""
  return jax.tree.map(
      lambda x: mesh_lib.named_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh),
      batch_like)
