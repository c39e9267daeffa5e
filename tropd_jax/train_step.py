"""Every jitted phase of a training step, built once: scoring, gradients, the update, the hand-off.

``build_phases`` returns the phases a step runs, each jitted once with explicit shardings and
donation; ``train``, ``aot`` and ``export`` all use these same functions (``aot`` feeds them
abstract shapes from ``abstract_state`` and ``abstract_batch``):

  score        teacher scores of one packed micro-batch (no gradient)            ``[B, T(, K)]``
  logp         the student's log-prob of each target (``ppo_epochs > 1`` only)   ``[B, T]``
  accumulate   adds one micro-batch's gradient and metric sums to the accumulators (donated)
  apply        clips and applies the summed gradient (state donated); skips a non-finite step
  to_sampler   the student's weights in the compute dtype and the sampler's layout

Micro-batches are dispatched one by one from the host, so a step may hold any number of them
(packing makes it vary) without a new compilation. Parameters stay in their master dtype and
are cast to the compute dtype inside each phase. Shape key: tropd_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax import models, objectives, scoring
from tropd_jax.batch import Batch
from tropd_jax.config import Settings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Student parameters (master dtype), optimizer state and the step counter."""

  params: Any
  opt_state: Any
  step: jax.Array

  def as_dict(self) -> dict[str, Any]:
    """The checkpoint tree: plain arrays (``nnx.Param`` wrappers taken off, as the export and
    evaluation commands read the ``params`` subtree); no array is copied."""
    unwrap = lambda x: x.get_value() if isinstance(x, nnx.Variable) else x
    strip = lambda tree: jax.tree.map(unwrap, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {"params": strip(self.params), "opt_state": strip(self.opt_state), "step": self.step}

  def replace_leaves(self, tree: dict[str, Any]) -> TrainState:
    """This state with ``tree``'s leaves (a restored checkpoint tree: same leaves, same order),
    its ``nnx.Param`` wrappers kept."""
    leaves = jax.tree.leaves(tree)
    structure = jax.tree.structure(
        {"params": self.params, "opt_state": self.opt_state, "step": self.step})
    if len(leaves) != structure.num_leaves:
      raise ValueError(f"a checkpoint of {len(leaves)} arrays does not fit a train state of "
                       f"{structure.num_leaves}.")
    return TrainState(**jax.tree.unflatten(structure, leaves))


def cast(tree, dtype):
  """Floating leaves of ``tree`` in ``dtype`` (arrays or ShapeDtypeStructs)."""
  def one(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(one, tree)


def _rows_sharded(tree):
  """Rows over the batch mesh axes (else XLA may replicate a phase's outputs)."""
  return jax.tree.map(lambda x: mesh_lib.shard(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def _hidden(graphdef, params, mb: Batch, compute_dtype):
  model = nnx.merge(graphdef, cast(params, compute_dtype))
  h_BTD, _ = model.hidden(mb.inputs, positions_BT=mb.positions, segment_ids_BT=mb.segment_ids)
  return h_BTD, model.head_weight()


# --- The phases as pure functions ---------------------------------------------------------------


def teacher_scores(graphdef, params, mb: Batch, *, top_k: int, chunk_size: int, vocab_size: int,
                   compute_dtype) -> scoring.TeacherScores:
  """The teacher's view of every position of a micro-batch (no gradient)."""
  params = jax.lax.stop_gradient(params)
  h_BTD, w_VD = _hidden(graphdef, params, mb, compute_dtype)
  return _rows_sharded(scoring.score_teacher(h_BTD, w_VD, mb.targets, top_k=top_k,
                                             chunk_size=chunk_size, vocab_size=vocab_size))


def student_logp(graphdef, params, mb: Batch, *, chunk_size: int, vocab_size: int,
                 compute_dtype) -> jax.Array:
  """[B, T] the training model's log-prob of each target: ``s̄_t`` of later PPO epochs."""
  params = jax.lax.stop_gradient(params)
  h_BTD, w_VD = _hidden(graphdef, params, mb, compute_dtype)
  return _rows_sharded(scoring.score_teacher(h_BTD, w_VD, mb.targets, top_k=1,
                                             chunk_size=chunk_size, vocab_size=vocab_size).logp)


def micro_loss(graphdef, params, mb: Batch, teacher: scoring.TeacherScores, key, step,
               denominator, old_logp_BT, *, obj: objectives.ObjectiveConfig, chunk_size: int,
               vocab_size: int, compute_dtype) -> tuple[jax.Array, objectives.Metrics]:
  """One micro-batch's share of the step's token-mean loss, and its metric sums."""
  h_BTD, w_VD = _hidden(graphdef, params, mb, compute_dtype)
  stats = scoring.student_token_stats(
      h_BTD, w_VD, mb.targets, teacher, mb.completion_mask, mb.prefix_mask,
      chunk_size=chunk_size, vocab_size=vocab_size)
  u_BT = objectives.trust_noise(key, step, mb.sequence_ids, mb.positions)
  loss_BT, metrics = objectives.per_token_loss(stats, u_BT, obj, old_logp_BT)
  gap_BT = jnp.abs(mb.sampler_logp - jax.lax.stop_gradient(stats.student_logp))
  metrics["rollout/logp_mismatch"] = (jnp.sum(jnp.where(mb.completion_mask, gap_BT, 0.0)),
                                      jnp.sum(mb.completion_mask, dtype=jnp.int32))
  return objectives.token_mean(loss_BT, mb.loss_mask, denominator), metrics


def apply_update(tx: optax.GradientTransformation, state: TrainState, grads, metrics):
  """Applies the summed gradient; a non-finite loss or gradient leaves the state unchanged."""
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
  means.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
  return new_state, means


# --- Abstract shapes and shardings --------------------------------------------------------------


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


def abstract_params(cfg: models.ModelConfig, mesh, **kwargs):
  """``(graphdef, params)`` of a model: parameters as sharded ShapeDtypeStructs (no memory)."""
  graphdef, state = nnx.split(models.abstract_model(cfg, **kwargs))
  state = jax.tree.map(
      lambda var, sharding: var.replace(
          jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)),
      state, models.param_shardings(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, nnx.state(state, nnx.Param) if isinstance(state, nnx.State) else state


def abstract_state(tx, params) -> TrainState:
  """The ``TrainState`` of ``params`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs."""
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  as_sds = jax.tree.map(lambda x: sds(x, x.sharding), params)
  opt = jax.tree.map(sds, jax.eval_shape(tx.init, as_sds), opt_state_shardings(tx, as_sds))
  mesh = jax.tree.leaves(opt)[0].sharding.mesh
  step = jax.ShapeDtypeStruct((), jnp.int32,
                              sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return TrainState(as_sds, opt, step)


def init_state(tx, params, mesh) -> TrainState:
  """A fresh ``TrainState``: the optimizer state sharded like the parameters."""
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params))(params)
  return TrainState(params, opt_state, mesh_lib.put(np.zeros((), np.int32), (), mesh))


def state_shardings(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(mesh, batch_like=None):
  """Rows over the batch mesh axes for every field of a ``Batch`` / ``TeacherScores``."""
  batch_like = batch_like if batch_like is not None else Batch.zeros(1, 1)
  return jax.tree.map(
      lambda x: mesh_lib.named_sharding(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x),
                                        mesh), batch_like)


def abstract_batch(rows: int, length: int, mesh) -> Batch:
  """A ``Batch`` ``[rows, length]`` of ShapeDtypeStructs with the run's shardings."""
  return Batch(**{
      name: jax.ShapeDtypeStruct(
          (rows, length), dtype,
          sharding=mesh_lib.named_sharding(("batch", None), (rows, length), mesh))
      for name, dtype in Batch.dtypes().items()})


def put_batch(batch: Batch, mesh) -> Batch:
  """A host ``Batch`` on the mesh, rows over the batch axes."""
  return Batch(**{f.name: mesh_lib.put(getattr(batch, f.name), ("batch", None), mesh)
                  for f in dataclasses.fields(Batch)})


# --- The phase builder --------------------------------------------------------------------------


@dataclasses.dataclass
class Phases:
  """The jitted phases of a run (see the module docstring); each compiles once."""

  score: Callable
  logp: Callable
  zeros: Callable
  accumulate: Callable
  apply: Callable
  to_sampler: Callable
  tx: optax.GradientTransformation

  def jitted(self) -> dict[str, Callable]:
    return {"score": self.score, "logp": self.logp, "zeros": self.zeros,
            "accumulate": self.accumulate, "apply": self.apply, "to_sampler": self.to_sampler}

  def compilations(self) -> dict[str, int]:
    """Programs compiled so far by each phase (1 each once a step has run)."""
    return {name: fn._cache_size() for name, fn in self.jitted().items()}


def build_phases(settings: Settings, mesh, *, student_graphdef, teacher_graphdef,
                 state_shardings: TrainState, vocab_size: int,
                 sampler_shardings=None) -> Phases:
  """Jits every phase of a step once, with its shardings and donation.

  Args:
    settings: the run's settings.
    mesh: the device mesh.
    student_graphdef, teacher_graphdef: ``nnx.graphdef`` of the two models.
    state_shardings: the ``TrainState``'s shardings (a tree of NamedShardings).
    vocab_size: the tokenizer's vocabulary (rows beyond it get no probability).
    sampler_shardings: shardings of the sampler's copy of the student's weights (the decode
      layout); None: the parameters' own.
  """
  t, obj = settings.train, settings.objective
  compute = jnp.dtype(settings.student.compute_dtype)
  common = dict(chunk_size=t.score_chunk, vocab_size=vocab_size)
  tx = settings.optimizer.make()
  param_shardings = state_shardings.params
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def zeros(params):
    """Zero accumulators: float32 gradients like the parameters, and every metric's sums."""
    grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    shapes = jax.eval_shape(lambda: micro_loss(
        student_graphdef, params, Batch.zeros(1, 1), _zero_scores(obj.top_k),
        jax.random.key_data(jax.random.key(0)), 0, 1.0, None, obj=obj, compute_dtype=compute,
        **common)[1])
    return grads, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  grad_fn = jax.grad(micro_loss, argnums=1, has_aux=True)

  def accumulate(acc, params, mb, teacher, key, step, denominator, old_logp_BT):
    grads, metrics = acc
    g, m = grad_fn(student_graphdef, params, mb, teacher, key, step, denominator, old_logp_BT,
                   obj=obj, compute_dtype=compute, **common)
    return jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)

  grad_shardings = param_shardings
  with jax.set_mesh(mesh):
    return Phases(
        score=jax.jit(lambda params, mb: teacher_scores(
            teacher_graphdef, params, mb, top_k=obj.top_k, compute_dtype=jnp.dtype(
                settings.teacher.dtype), **common)),
        logp=jax.jit(lambda params, mb: student_logp(student_graphdef, params, mb,
                                                     compute_dtype=compute, **common)),
        zeros=jax.jit(zeros, out_shardings=(grad_shardings, replicated)),
        accumulate=jax.jit(accumulate, out_shardings=(grad_shardings, replicated),
                           donate_argnums=(0,)),
        apply=jax.jit(lambda state, grads, metrics: apply_update(tx, state, grads, metrics),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
        to_sampler=jax.jit(lambda params: cast(params, compute),
                           out_shardings=sampler_shardings or param_shardings),
        tx=tx)


def _zero_scores(top_k: int) -> scoring.TeacherScores:
  return scoring.TeacherScores(
      logp=jnp.zeros((1, 1)), topk_ids=jnp.zeros((1, 1, top_k), jnp.int32),
      topk_logp=jnp.zeros((1, 1, top_k)), tail_logp=jnp.zeros((1, 1)), entropy=jnp.zeros((1, 1)))
