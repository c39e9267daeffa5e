"""Packing a step's sequences into rows: the layout, and packed = one-sequence-per-row numerics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax import models, objectives
from tropd_jax import train_step as ts
from tropd_jax.batch import Batch, pack
from tropd_jax.sampling.rollout import Rollout

V = 61


def make_rollout(lengths, seed=0):
  """Sequences of (prompt, prefix, completion) lengths with random tokens and log-probs."""
  rng = np.random.RandomState(seed)
  tokens, logp = [], []
  for p, f, c in lengths:
    tokens.append(rng.randint(3, V - 1, p + f + c).astype(np.int32))
    logp.append(-rng.rand(c).astype(np.float32))
  return Rollout(tokens=tuple(tokens),
                 prompt_lengths=np.asarray([p for p, _, _ in lengths], np.int32),
                 prefix_lengths=np.asarray([f for _, f, _ in lengths], np.int32),
                 logp=tuple(logp), stopped=np.ones(len(lengths), bool))


def test_pack_layout_masks_and_positions():
  rollout = make_rollout([(3, 0, 4), (2, 3, 2), (4, 0, 9)])
  batch, stats = pack(rollout, length=12, rows_multiple=2, pad_id=0)
  assert batch.inputs.shape == (2, 12) and stats.rows == 2
  assert stats.tokens == 6 + 6 + 12 and stats.padding_ratio == pytest.approx(24 / 24)
  # The longest sequence fills row 0 (positions 0..11); the other two share row 1.
  assert list(batch.segment_ids[0]) == [1] * 12
  assert list(batch.segment_ids[1]) == [1] * 6 + [2] * 6
  assert list(batch.positions[1]) == list(range(6)) * 2
  for r in range(3):
    at = batch.sequence_ids == r
    at &= batch.segment_ids > 0
    seq = rollout.tokens[r]
    np.testing.assert_array_equal(batch.inputs[at], seq[:-1])
    np.testing.assert_array_equal(batch.targets[at], seq[1:])
    p, f = rollout.prompt_lengths[r], rollout.prefix_lengths[r]
    j = np.arange(len(seq) - 1)
    np.testing.assert_array_equal(batch.prefix_mask[at], (j + 1 >= p) & (j + 1 < p + f))
    np.testing.assert_array_equal(batch.completion_mask[at], j + 1 >= p + f)
    np.testing.assert_allclose(batch.sampler_logp[at][j + 1 >= p + f], rollout.logp[r])
  assert not (batch.loss_mask & (batch.segment_ids == 0)).any()


def test_pack_pads_rows_and_names_a_sequence_too_long():
  rollout = make_rollout([(2, 0, 3)])
  batch, stats = pack(rollout, length=8, rows_multiple=4)
  assert batch.num_rows == 4 and stats.padding_ratio == pytest.approx(32 / 4)
  assert len(batch.micro_batches(2)) == 2
  with pytest.raises(ValueError, match="train.pack_length"):
    pack(make_rollout([(5, 0, 6)]), length=8)


def one_per_row(rollout: Rollout, length: int) -> Batch:
  """The unpacked reference: sequence r alone in row r, right-padded."""
  batch = Batch.zeros(len(rollout), length)
  for r in range(len(rollout)):
    single = Rollout(tokens=(rollout.tokens[r],), prompt_lengths=rollout.prompt_lengths[r:r + 1],
                     prefix_lengths=rollout.prefix_lengths[r:r + 1], logp=(rollout.logp[r],),
                     stopped=rollout.stopped[r:r + 1])
    row, _ = pack(single, length=length)
    for f in dataclasses.fields(Batch):
      getattr(batch, f.name)[r] = getattr(row, f.name)[0]
  batch.sequence_ids[:] = np.arange(len(rollout))[:, None]
  return batch


CFG = models.ModelConfig(model_type="qwen3", vocab_size=V, d_model=32, d_ff=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
OBJ = objectives.ObjectiveConfig.preset("tropd", top_k=6)


def _stats_and_grads(mesh, batch: Batch):
  """Loss, gradient and per-token stats of ``batch`` through the trainer's own functions."""
  student = models.init_model(CFG, seed=1, mesh=mesh)
  teacher = models.init_model(CFG.replace(num_layers=3), seed=2, mesh=mesh)
  s_graph, params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  common = dict(chunk_size=5, vocab_size=V - 1, compute_dtype=jnp.float32)
  key = jax.random.key_data(jax.random.key(0))
  denominator = np.float32(batch.loss_mask.sum())

  def run(params, t_params, batch):
    scores = ts.teacher_scores(t_graph, t_params, batch, top_k=OBJ.top_k, **common)
    loss_and_grad = jax.value_and_grad(ts.micro_loss, argnums=1, has_aux=True)
    (loss, metrics), grads = loss_and_grad(s_graph, params, batch, scores, key, 3, denominator,
                                           None, obj=OBJ, **common)
    logp = ts.student_logp(s_graph, params, batch, **common)
    return loss, grads, scores, logp, objectives.metric_means(metrics)

  with jax.set_mesh(mesh):
    placed = ts.put_batch(batch, mesh)
    return jax.jit(run)(params, t_params, placed)


@pytest.mark.parametrize("shape", [None, dict(data=2, fsdp=2, tensor=2)])
def test_packed_equals_one_sequence_per_row(shape):
  rollout = make_rollout([(3, 0, 7), (2, 4, 3), (5, 0, 12), (4, 2, 1), (2, 0, 5), (6, 0, 9),
                          (3, 3, 6), (2, 0, 2)], seed=1)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**shape) if shape else None,
                            devices=None if shape else jax.devices()[:1])
  packed, stats = pack(rollout, length=20, rows_multiple=4)
  assert stats.rows < len(rollout)  # several sequences share rows
  alone = one_per_row(rollout, 20)
  out_p = jax.device_get(_stats_and_grads(mesh, packed))
  out_a = jax.device_get(_stats_and_grads(mesh, alone))
  np.testing.assert_allclose(out_p[0], out_a[0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out_p[1]), jax.tree.leaves(out_a[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for name in out_p[4]:
    np.testing.assert_allclose(out_p[4][name], out_a[4][name], rtol=1e-5, atol=1e-6,
                               err_msg=name)

  def by_token(batch, scores, logp):
    keep = np.asarray(batch.segment_ids) > 0
    order = np.lexsort((batch.positions[keep], batch.sequence_ids[keep]))
    fields = {f.name: np.asarray(getattr(scores, f.name))[keep][order]
              for f in dataclasses.fields(scores)}
    fields["student_logp"] = np.asarray(logp)[keep][order]
    return fields

  got, want = by_token(packed, out_p[2], out_p[3]), by_token(alone, out_a[2], out_a[3])
  for name in want:
    if name == "topk_ids":
      np.testing.assert_array_equal(got[name], want[name])
    else:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
