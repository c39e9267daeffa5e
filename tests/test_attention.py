"""Fused attention against the einsum reference: splash kernel (Pallas interpret mode on CPU), blocked prefill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax import mesh as mesh_lib
from tropd_jax import models
from tropd_jax.models import attention

CFG = models.ModelConfig(
    model_type="qwen2", vocab_size=97, d_model=64, d_ff=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, qkv_bias=True)


def _batch(b=4, t=11, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, CFG.vocab_size, (b, t))
  mask = np.ones((b, t), bool)
  mask[0, :4] = False  # left padding
  mask[-1, -3:] = False  # right padding
  return jnp.asarray(ids), jnp.asarray(mask)


def _qkv(b=2, t=11, n=4, k=2, h=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
          jax.random.normal(keys[2], (b, t, k, h)))


def test_splash_matches_einsum_on_real_tokens():
  q, k, v = _qkv()
  mask = jnp.asarray(np.array([[False] * 3 + [True] * 8, [True] * 9 + [False] * 2]))
  seg = mask.astype(jnp.int32)
  ref = attention.attend(q, k, v, seg, seg, jnp.arange(11))
  out = attention.splash_attend(q, k, v, seg, interpret=True)
  np.testing.assert_allclose(np.asarray(out)[np.asarray(mask)], np.asarray(ref)[np.asarray(mask)],
                             atol=2e-5)


def test_splash_multi_block_matches_einsum():
  """T = 300 with 128-token tiles: several query and key blocks, a padded last one."""
  q, k, v = _qkv(b=1, t=300, n=2, k=1)
  mask = jnp.ones((1, 300), bool).at[0, :5].set(False)
  seg = mask.astype(jnp.int32)
  ref = attention.attend(q, k, v, seg, seg, jnp.arange(300))
  out = attention.splash_attend(q, k, v, seg, block=128, interpret=True)
  np.testing.assert_allclose(np.asarray(out)[0, 5:], np.asarray(ref)[0, 5:], atol=2e-5)


def test_packed_segments_attend_only_to_themselves():
  """Three sequences packed in a row (and padding): each equals the sequence run alone."""
  q, k, v = _qkv(b=1, t=12, n=4, k=2)
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0]])
  packed = attention.attend(q, k, v, seg, seg, jnp.arange(12))
  spans = [(0, 4), (4, 7), (7, 11)]
  for a, b in spans:
    one = jnp.ones((1, b - a), jnp.int32)
    alone = attention.attend(q[:, a:b], k[:, a:b], v[:, a:b], one, one, jnp.arange(b - a))
    np.testing.assert_allclose(packed[:, a:b], alone, atol=1e-6)
  splash = attention.splash_attend(q, k, v, seg, interpret=True)
  np.testing.assert_allclose(splash[:, :11], packed[:, :11], atol=2e-5)


def _loss_and_grads(model, ids, mask):
  def loss(m):
    logits = m(ids, mask_BT=mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0) ** 2) / 1e3
  return nnx.value_and_grad(loss)(model)


def test_model_splash_logits_and_grads_match_einsum():
  ids, mask = _batch()
  model = models.init_model(CFG, remat=True)
  ref_logits = model(ids, mask_BT=mask)
  ref_loss, ref_grads = _loss_and_grads(model, ids, mask)
  model.set_attributes(attention_impl="splash")
  logits = model(ids, mask_BT=mask)
  np.testing.assert_allclose(np.asarray(logits)[np.asarray(mask)],
                             np.asarray(ref_logits)[np.asarray(mask)], atol=1e-5)
  loss, grads = _loss_and_grads(model, ids, mask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_splash_on_a_mesh_matches_einsum():
  """shard_map over rows (data, fsdp) and heads (tensor), inside jit, as in training."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  ids, mask = _batch()
  model = models.init_model(CFG, mesh=mesh)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, mask_BT=m))
  with jax.set_mesh(mesh):
    ref = fwd(state, ids, mask)
    model.set_attributes(attention_impl="splash")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, mask_BT=m))
    out = fwd(state, ids, mask)
  np.testing.assert_allclose(np.asarray(out)[np.asarray(mask)], np.asarray(ref)[np.asarray(mask)],
                             atol=1e-5)


def test_blocked_attention_matches_einsum_with_a_cache():
  q, k, v = _qkv(b=2, t=10, n=4, k=2)
  key_mask = jnp.asarray(np.random.RandomState(1).rand(2, 10) > 0.3).at[:, 0].set(True)
  q_slot = jnp.arange(3, 10)
  q_seg = jnp.ones((2, 7), jnp.int32)
  k_seg = key_mask.astype(jnp.int32)
  ref = attention.attend(q[:, 3:], k, v, q_seg, k_seg, q_slot)
  out = attention.attend_blocked(q[:, 3:], k, v, q_seg, k_seg, q_slot, block=3)
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_paged_prefill_and_decode_with_splash_model_match_einsum():
  """The sampler's prefill runs the model's attention (splash when set); decode reads pages."""
  import dataclasses

  ids, _ = _batch(b=2, t=9)
  lengths = jnp.asarray([9, 6])
  model = models.init_model(CFG)
  outs = []
  for impl in ("einsum", "splash"):
    model.set_attributes(attention_impl=impl)
    cache = model.init_cache(num_pages=8, page_size=4, num_slots=2, max_pages_per_row=3)
    cache = dataclasses.replace(cache, page_table_BP=jnp.asarray([[1, 2, 3], [4, 5, 6]]))
    h, cache = model.prefill(ids, lengths, cache)
    cache = dataclasses.replace(cache, lengths_B=lengths)
    h_next, _ = model.decode(ids[:, 0], cache, impl="xla")
    outs.append((h, h_next))
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
  np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)


def test_auto_is_einsum_off_tpu_and_bad_names_fail():
  assert attention.resolve_impl("auto") == "einsum"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    models.init_model(CFG.replace(num_layers=1), attention_impl="flash")
