"""Chunked scoring = full-logits reference = NumPy, on one device and on the 8-device mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tropd_jax import objectives, scoring

B, T, D, K = 4, 13, 16, 5
V, VOCAB = 98, 97  # embedding rows > tokenizer vocabulary, as in Qwen2-7B


def make_inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  h_BTD = jax.random.normal(keys[0], (B, T, D))
  w_VD = jax.random.normal(keys[1], (V, D)) * 0.7
  teacher_h_BTD = jax.random.normal(keys[2], (B, T, D))
  teacher_w_VD = jax.random.normal(keys[3], (V, D)) * 0.7
  tokens_BT = jax.random.randint(keys[4], (B, T), 0, VOCAB)
  completion_BT = jnp.arange(T)[None, :] < jnp.array([[T], [9], [T], [4]])  # right padding
  prefix_BT = jnp.zeros((B, T), bool).at[2, :3].set(True)
  completion_BT = completion_BT & ~prefix_BT
  return h_BTD, w_VD, teacher_h_BTD, teacher_w_VD, tokens_BT, completion_BT, prefix_BT


def test_reference_matches_numpy():
  h, w, th, tw, tokens, completion, prefix = make_inputs()
  zs, zt = scoring.project(h, w, VOCAB), scoring.project(th, tw, VOCAB)
  stats = objectives.token_stats(zs, zt, tokens, K, completion_mask_BT=completion,
                                 prefix_mask_BT=prefix, vocab_size=VOCAB)

  def log_softmax(z):  # over the real vocabulary only
    z = np.asarray(z, np.float64)[..., :VOCAB]
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ls, lt = log_softmax(zs), log_softmax(zt)
  ids = np.argsort(-lt, -1, kind="stable")[..., :K]
  in_k = np.zeros(lt.shape, bool)
  np.put_along_axis(in_k, ids, True, -1)
  take = lambda x, i: np.take_along_axis(x, i, -1)
  tail = lambda l: np.log(np.where(in_k, 0, np.exp(l)).sum(-1))
  entropy = lambda l: -(np.exp(l) * l).sum(-1)
  want = dict(
      student_logp=take(ls, np.asarray(tokens)[..., None])[..., 0],
      teacher_logp=take(lt, np.asarray(tokens)[..., None])[..., 0],
      teacher_topk_ids=ids, teacher_topk_logp=take(lt, ids), student_topk_logp=take(ls, ids),
      teacher_tail_logp=tail(lt), student_tail_logp=tail(ls),
      teacher_entropy=entropy(lt), student_entropy=entropy(ls),
      completion_mask=completion, prefix_mask=prefix,
  )
  for name, value in want.items():
    np.testing.assert_allclose(getattr(stats, name), value, rtol=1e-5, atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(stats.loss_mask, completion | prefix)


def test_padding_rows_of_the_vocabulary_get_no_probability():
  h, w, th, tw, tokens, completion, prefix = make_inputs()
  padded = scoring.score_teacher(th, tw.at[VOCAB:].set(100.0), tokens, top_k=K, chunk_size=4,
                                 vocab_size=VOCAB)
  sliced = scoring.score_teacher(th, tw[:VOCAB], tokens, top_k=K, chunk_size=4)
  assert int(padded.topk_ids.max()) < VOCAB
  for name in ("logp", "topk_ids", "topk_logp", "tail_logp", "entropy"):
    np.testing.assert_allclose(getattr(padded, name), getattr(sliced, name), rtol=1e-6,
                               err_msg=name)


def _loss_weights(seed=1):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (B, T)), jax.random.normal(keys[1], (B, T, K)),
          jax.random.normal(keys[2], (B, T)))


def _stats_loss(stats, weights):
  """A loss touching every differentiable field, plus an objective that reads the others."""
  a_BT, b_BTK, c_BT = weights
  linear = (jnp.sum(a_BT * stats.student_logp) + jnp.sum(b_BTK * stats.student_topk_logp)
            + jnp.sum(c_BT * stats.student_tail_logp))
  cfg = objectives.ObjectiveConfig.preset("tropd", top_k=K, fkl_support="topk_tail", beta=0.1)
  loss_BT, _ = objectives.per_token_loss(stats, jnp.full((B, T), 0.5), cfg)
  return linear + objectives.token_mean(loss_BT, stats.loss_mask)


def reference_loss(h, w, th, tw, tokens, completion, prefix, weights):
  stats = objectives.token_stats(scoring.project(h, w), scoring.project(th, tw), tokens, K,
                                 completion_mask_BT=completion, prefix_mask_BT=prefix,
                                 vocab_size=VOCAB)
  return _stats_loss(stats, weights), stats


def chunked_loss(h, w, th, tw, tokens, completion, prefix, weights, *, chunk_size):
  teacher = scoring.score_teacher(th, tw, tokens, top_k=K, chunk_size=chunk_size, vocab_size=VOCAB)
  stats = scoring.student_token_stats(h, w, tokens, teacher, completion, prefix,
                                      chunk_size=chunk_size, vocab_size=VOCAB)
  return _stats_loss(stats, weights), stats


def _assert_same(chunked, reference):
  (loss, stats), grads = chunked
  (want_loss, want_stats), want_grads = reference
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for name in scoring.TokenStats.__dataclass_fields__:
    np.testing.assert_allclose(getattr(stats, name), getattr(want_stats, name), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  for grad, want in zip(grads, want_grads):
    # Sharded reductions sum in another order: allow float32 noise relative to the largest entry.
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@functools.cache
def _reference():
  inputs = make_inputs()
  return jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True))(
      *inputs, _loss_weights())


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64], ids=lambda c: f"C={c}")
def test_chunked_matches_reference(chunk_size):
  loss_and_grad = jax.value_and_grad(
      functools.partial(chunked_loss, chunk_size=chunk_size), argnums=(0, 1), has_aux=True)
  _assert_same(jax.jit(loss_and_grad)(*make_inputs(), _loss_weights()), _reference())


def test_chunked_matches_reference_on_a_sharded_mesh():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  batch, vocab = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P("tensor"))
  h, w, th, tw, tokens, completion, prefix = make_inputs()
  shardings = (batch, vocab, batch, vocab, batch, batch, batch)
  sharded = jax.device_put((h, w, th, tw, tokens, completion, prefix), shardings)
  loss_and_grad = jax.value_and_grad(
      functools.partial(chunked_loss, chunk_size=4), argnums=(0, 1), has_aux=True)
  result = jax.jit(loss_and_grad)(*sharded, jax.device_put(_loss_weights(), batch))
  _, (grad_h, grad_w) = result
  assert grad_h.sharding.is_equivalent_to(batch, 3) and grad_w.sharding.is_equivalent_to(vocab, 2)
  _assert_same(result, _reference())


def test_bfloat16_inputs_give_float32_stats():
  h, w, th, tw, tokens, completion, prefix = make_inputs()
  teacher = scoring.score_teacher(th.astype(jnp.bfloat16), tw.astype(jnp.bfloat16), tokens,
                                  top_k=K, chunk_size=4, vocab_size=VOCAB)
  stats = scoring.student_token_stats(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), tokens,
                                      teacher, completion, prefix, chunk_size=4, vocab_size=VOCAB)
  for leaf in jax.tree.leaves(stats):
    assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_)
    assert bool(jnp.all(jnp.isfinite(leaf)))


def test_float32_master_matrix_gets_a_float32_gradient():
  h, w, th, tw, tokens, completion, prefix = make_inputs()
  chunked = functools.partial(chunked_loss, chunk_size=4)
  grad_h, grad_w = jax.jit(jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1)))(
      h.astype(jnp.bfloat16), w, th, tw, tokens, completion, prefix, _loss_weights())
  assert grad_h.dtype == jnp.bfloat16 and grad_w.dtype == jnp.float32
  _, (want_h, want_w) = _reference()
  for grad, want in ((grad_h, want_h), (grad_w, want_w)):  # bfloat16 matmuls: loose tolerance
    atol = 0.05 * float(jnp.abs(want).max())
    np.testing.assert_allclose(grad.astype(jnp.float32), want, atol=atol)
