"""The sampler: greedy parity with transformers, sampling statistics, masks, sharding, seeds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import make_hf_model, ragged_prompts
from tropd_jax import mesh as mesh_lib
from tropd_jax import models, sampler

KINDS = ("qwen2", "qwen3", "llama")
PAD = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Peaked tiny models (robust greedy argmaxes) per kind, and a diffuse one for statistics."""
  root = tmp_path_factory.mktemp("sampler")
  out = {}
  for kind in KINDS:
    out[kind] = (str(root / kind), make_hf_model(root / kind, kind, peaked=6.0))
  out["diffuse"] = (str(root / "diffuse"), make_hf_model(root / "diffuse", "qwen3", seed=1))
  return out


@pytest.fixture(scope="module")
def jax_models(checkpoints):
  return {name: models.from_pretrained(path) for name, (path, _) in checkpoints.items()}


def hf_greedy(hf, prompts, max_new_tokens, stop_ids=()):
  """transformers' greedy completions of a left-padded ragged batch, cut after the first stop."""
  width = max(map(len, prompts))
  ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  out = hf.generate(
      ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
      pad_token_id=PAD, eos_token_id=list(stop_ids) or None,
  )[:, width:].tolist()
  completions = []
  for row in out:
    ends = [i for i, t in enumerate(row) if t in stop_ids]
    completions.append(row[: ends[0] + 1] if ends else row)
  return completions


def full_logits(model, rollout: sampler.Rollout) -> np.ndarray:
  """float32 [B, L-1, V] logits at every input position (the training-time forward pass)."""
  batch = rollout.shifted()
  return np.asarray(model(batch.inputs, positions_BT=batch.positions, mask_BT=batch.input_mask))


def completions(rollout: sampler.Rollout, field: str = "tokens") -> np.ndarray:
  """[B, max_new_tokens] values of ``field`` at the completion slots (rows never stop here)."""
  values, mask = np.asarray(getattr(rollout, field)), np.asarray(rollout.completion_mask)
  return np.stack([v[m] for v, m in zip(values, mask)])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers(kind, checkpoints, jax_models):
  _, hf = checkpoints[kind]
  model = jax_models[kind]
  prompts = ragged_prompts(np.random.RandomState(0), [5, 9, 2, 7])
  ours = sampler.generate(model, prompts, max_new_tokens=10).completion_ids
  assert ours == hf_greedy(hf, prompts, 10)
  assert all(len(c) == 10 for c in ours)

  # Stop on a token greedy emits mid-way (and on EOS): rows end right after it, as in transformers.
  stop = next(row[i] for row in ours for i in range(2, 8) if row[i] not in row[:i])
  stop_ids = (stop, 2)
  stopped = sampler.generate(model, prompts, max_new_tokens=10, stop_ids=stop_ids)
  assert stopped.completion_ids == hf_greedy(hf, prompts, 10, stop_ids)
  assert any(len(c) < 10 for c in stopped.completion_ids)
  rollout = stopped.rollout
  ends_in_stop = [c[-1] in stop_ids for c in stopped.completion_ids]
  np.testing.assert_array_equal(np.asarray(rollout.stopped), ends_in_stop)
  np.testing.assert_array_equal(np.asarray(rollout.lengths), [len(c) for c in stopped.completion_ids])


def test_sampling_matches_softmax(checkpoints, jax_models):
  """Temperature 1: first-token and second-token frequencies over many rows match the model."""
  model = jax_models["diffuse"]
  prompt = ragged_prompts(np.random.RandomState(1), [6])[0]
  rows = 16384
  config = sampler.SamplerConfig(max_new_tokens=2, temperature=1.0, length_buckets=(8,))
  rollout = sampler.Sampler(model, config).rollout([prompt], n=rows, seed=3)
  first, second = np.asarray(rollout.tokens[:, -2]), np.asarray(rollout.tokens[:, -1])
  v = model.cfg.vocab_size

  p_first = np.asarray(jax.nn.softmax(model(jnp.asarray([prompt]))[0, -1]), np.float64)
  contexts = jnp.asarray([prompt + [a] for a in range(v)])
  p_next = np.asarray(jax.nn.softmax(model(contexts)[:, -1]), np.float64)  # [V (first), V]
  p_second = p_first @ p_next

  for empirical_ids, p in ((first, p_first), (second, p_second)):
    freq = np.bincount(empirical_ids, minlength=v) / rows
    tv = 0.5 * np.abs(freq - p).sum()
    expected_tv = 0.5 * np.sqrt(2 / (np.pi * rows)) * np.sqrt(p * (1 - p)).sum()
    assert tv < 2.5 * expected_tv, (tv, expected_tv)
  # The stored log-prob is the model's (temperature 1, nothing filtered).
  np.testing.assert_allclose(
      np.asarray(rollout.logp[:, -2]), np.log(p_first[first]), atol=1e-4)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.6, 1.0), (8, 0.8, 0.7)])
def test_top_k_top_p_stay_in_their_set(top_k, top_p, temperature, jax_models):
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(2), [3, 6])
  config = sampler.SamplerConfig(
      max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p, length_buckets=(8,))
  rollout = sampler.Sampler(model, config).rollout(prompts, n=64, seed=5)
  batch = rollout.shifted()
  logits = full_logits(model, rollout).astype(np.float64) / temperature
  targets, sampled = np.asarray(batch.targets), np.asarray(batch.completion_mask)
  logp = np.asarray(batch.sampler_logp)
  assert sampled.sum() == 2 * 64 * 6
  for b, t in zip(*np.nonzero(sampled)):
    z = logits[b, t]
    order = np.argsort(-z)
    keep = order[:top_k] if top_k else order
    probs = np.exp(z[keep] - z[keep].max())
    probs /= probs.sum()
    above = np.cumsum(probs) - probs
    keep = keep[above < top_p]
    assert targets[b, t] in keep
    kept_logp = z[keep] - np.log(np.exp(z[keep] - z[keep].max()).sum()) - z[keep].max()
    np.testing.assert_allclose(logp[b, t], kept_logp[list(keep).index(targets[b, t])], atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_greedy_matches_one_device(shape, checkpoints, jax_models):
  path, _ = checkpoints["qwen3"]
  prompts = ragged_prompts(np.random.RandomState(3), [4, 7, 1, 5, 6, 3, 2, 7])
  expected = sampler.generate(jax_models["qwen3"], prompts, 8, stop_ids=(2,)).completion_ids
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*shape))
  model = models.from_pretrained(path, mesh=mesh)
  got = sampler.generate(model, prompts, 8, stop_ids=(2,), mesh=mesh)
  assert got.completion_ids == expected
  assert got.rollout.tokens.sharding.spec[0] == mesh_lib.logical_to_spec(
      ("batch",), (8,), mesh)[0]


def test_prefix_rows_layout_and_masks(jax_models):
  model = jax_models["qwen2"]
  rng = np.random.RandomState(4)
  prompts = ragged_prompts(rng, [3, 6, 4])
  prefixes = ragged_prompts(rng, [2, 0, 5])
  config = sampler.SamplerConfig(
      max_new_tokens=5, temperature=0.0, length_buckets=(4, 16), prefill_chunk=4)
  s = sampler.Sampler(model, config)
  rollout = s.rollout(prompts, prefixes, n=2)
  assert rollout.tokens.shape == (6, 16 + 5) and s.stats.context_lengths == (16,)
  tokens = np.asarray(rollout.tokens)
  prompt_m, prefix_m, comp_m = (np.asarray(m) for m in
                                (rollout.prompt_mask, rollout.prefix_mask, rollout.completion_mask))
  assert not (prompt_m & prefix_m).any() and not ((prompt_m | prefix_m) & comp_m).any()
  # The forced prefix continued greedily is the prompt + prefix as a plain prompt, continued.
  plain = sampler.generate(model, [p + q for p, q in zip(prompts, prefixes)], 5).completion_ids
  for r in range(6):
    i = r // 2
    assert tokens[r][prompt_m[r]].tolist() == prompts[i]
    assert tokens[r][prefix_m[r]].tolist() == prefixes[i]
    assert tokens[r][comp_m[r]].tolist() == plain[i]
    real = np.nonzero(prompt_m[r] | prefix_m[r] | comp_m[r])[0]
    assert real.tolist() == list(range(real[0], real[-1] + 1))  # contiguous: pad | row | pad
    assert real[-1] == 15 + len(plain[i])  # the completion starts at the bucket's edge
    assert (tokens[r][~np.asarray(rollout.token_mask[r])] == PAD).all()
  np.testing.assert_array_equal(rollout.prefix_lengths, [2, 2, 0, 0, 5, 5])
  batch = rollout.shifted()
  np.testing.assert_array_equal(batch.targets, tokens[:, 1:])
  np.testing.assert_array_equal(batch.loss_mask, (prefix_m | comp_m)[:, 1:])


def test_reproducible_and_independent_of_micro_batches(jax_models):
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(5), [2, 7, 4, 3, 5])
  config = sampler.SamplerConfig(max_new_tokens=6, temperature=1.0, length_buckets=(4, 8))

  def run(micro_batch_size=0, seed=0, **kw):
    cfg = dataclasses.replace(config, micro_batch_size=micro_batch_size)
    s = sampler.Sampler(model, cfg)
    return s.rollout(prompts[kw.pop("start", 0):], n=2, seed=seed, **kw), s.stats

  whole, stats = run()
  assert stats.micro_batches == 1
  again, _ = run()
  split, split_stats = run(micro_batch_size=4)
  assert split_stats.micro_batches == 3 and split_stats.context_lengths == (8, 4, 8)
  for a, b in ((whole, again), (whole, split)):
    np.testing.assert_array_equal(completions(a), completions(b))
    np.testing.assert_allclose(completions(a, "logp"), completions(b, "logp"), atol=1e-5)
  # A later call's rows, given their global index, draw what the same rows drew in one call.
  tail, _ = run(start=3, row_offset=6)
  np.testing.assert_array_equal(completions(tail), completions(whole)[6:])
  other, _ = run(seed=1)
  assert (completions(other) != completions(whole)).any()
  # The two samples of a prompt share its prefill but not their draws.
  toks = completions(whole)
  assert (toks[0::2] != toks[1::2]).any()


def test_compilations_bounded_by_buckets_and_cache_bytes(jax_models):
  model = jax_models["llama"]
  config = sampler.SamplerConfig(max_new_tokens=3, temperature=0.0, length_buckets=(4, 8), pad_id=1)
  s = sampler.Sampler(model, config)
  rng = np.random.RandomState(6)
  s.rollout(ragged_prompts(rng, [5, 2]))
  before = s.stats.num_compilations
  s.rollout(ragged_prompts(rng, [8, 6]))  # same bucket, same shapes: no new compilation
  assert s.stats.num_compilations == before
  assert s.stats.kv_cache_bytes == models.KVCache.num_bytes(model.cfg, 2, 8 + 3 - 1)
  s.rollout(ragged_prompts(rng, [3, 1]), n=2)  # bucket 4, replicated cache rows
  assert s.stats.num_compilations == before + 2
  assert s.stats.kv_cache_bytes == models.KVCache.num_bytes(model.cfg, 2 + 4, 4 + 3 - 1)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplerConfig(top_p=0.0)
  with pytest.raises(ValueError, match="length_buckets"):
    sampler.SamplerConfig(length_buckets=(8, 4))
  with pytest.raises(ValueError, match="micro_batch_size"):
    sampler.SamplerConfig(micro_batch_size=3).rows_per_micro_batch(8, 2)
  assert sampler.SamplerConfig(stop_ids=[2, 3]).stop_ids == (2, 3)
  assert sampler.SamplerConfig(length_buckets=(4, 8)).bucket(9) == 16
  assert sampler.SamplerConfig(length_buckets=(4, 12), prefill_chunk=8).bucket(9) == 16
