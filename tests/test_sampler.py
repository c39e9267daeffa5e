"""The sampling engine: greedy parity with transformers, statistics, refills, pages, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import make_hf_model, ragged_prompts
from tropd_jax import mesh as mesh_lib
from tropd_jax import models, sampling

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


def draw(model, prompts, *, n=1, prefixes=None, seed=0, row_offset=0, **config):
  """A rollout of ``n`` rows per prompt through the engine, and the engine's stats."""
  config.setdefault("max_new_tokens", 6)
  config.setdefault("length_buckets", (8, 16))
  cfg = sampling.SamplerConfig(**config)
  engine = sampling.Engine(model, cfg)
  rows = sampling.requests(prompts, n=n, prefix_ids=prefixes, max_new_tokens=cfg.max_new_tokens,
                           row_offset=row_offset)
  return engine.generate(rows, seed=seed), engine.stats


def row_logits(model, tokens) -> np.ndarray:
  """float32 [T-1, V] logits at every position of a row (the training-time forward pass)."""
  return np.asarray(model(jnp.asarray([tokens[:-1]]))[0])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers(kind, checkpoints, jax_models):
  _, hf = checkpoints[kind]
  model = jax_models[kind]
  prompts = ragged_prompts(np.random.RandomState(0), [5, 9, 2, 7])
  ours = sampling.generate(model, prompts, max_new_tokens=10).completion_ids
  assert ours == hf_greedy(hf, prompts, 10)
  assert all(len(c) == 10 for c in ours)

  # Stop on a token greedy emits mid-way (and on EOS): rows end right after it, as in transformers.
  stop = next(row[i] for row in ours for i in range(2, 8) if row[i] not in row[:i])
  stop_ids = (stop, 2)
  want = hf_greedy(hf, prompts, 10, stop_ids)
  # Two slots for four rows, refilled every few steps: the rows still draw what they draw alone.
  for slots in (0, 2):
    stopped = sampling.generate(model, prompts, max_new_tokens=10, stop_ids=stop_ids,
                                micro_batch_size=slots, chunk_steps=3, page_size=4)
    assert stopped.completion_ids == want
  assert any(len(c) < 10 for c in stopped.completion_ids)
  rollout = stopped.rollout
  np.testing.assert_array_equal(rollout.stopped, [c[-1] in stop_ids for c in want])
  np.testing.assert_array_equal(rollout.lengths, [len(c) for c in want])
  assert stopped.stats.slots == 2 and stopped.stats.prefill_calls >= 2


def test_keys_and_noise_are_jax_randoms():
  """The written-out hash gives jax.random's bits: fold_in and Gumbel noise, bit for bit (the
  drawn tokens are those jax.random.categorical-style sampling would give)."""
  from tropd_jax.sampling import draw as draw_lib
  seed_key = jax.random.key(7, impl="threefry2x32")
  np.testing.assert_array_equal(draw_lib.seed_key(7), jax.random.key_data(seed_key))
  ids = jnp.asarray([0, 1, 5, 2**31 - 1], jnp.int32)
  keys = jax.jit(draw_lib.fold_in)(draw_lib.seed_key(7), ids)
  want = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(seed_key, i)))(ids)
  np.testing.assert_array_equal(keys, want)
  tokens = jax.jit(draw_lib.token_keys)(keys, jnp.asarray([0, 3, 1000, 7]))
  noise = jax.jit(draw_lib.gumbel, static_argnums=1)(tokens, 1000)
  wrapped = jax.random.wrap_key_data(tokens, impl="threefry2x32")
  want = jax.vmap(lambda k: jax.random.gumbel(k, (1000,)))(wrapped)
  np.testing.assert_array_equal(noise, want)


def test_sampling_matches_softmax(jax_models):
  """Temperature 1: first-token and second-token frequencies over many rows match the model."""
  model = jax_models["diffuse"]
  prompt = ragged_prompts(np.random.RandomState(1), [6])[0]
  rows = 16384
  rollout, _ = draw(model, [prompt], n=rows, seed=3, max_new_tokens=2, temperature=1.0)
  first = np.asarray([t[-2] for t in rollout.tokens])
  second = np.asarray([t[-1] for t in rollout.tokens])
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
  np.testing.assert_allclose([lp[0] for lp in rollout.logp], np.log(p_first[first]), atol=1e-4)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (8, 0.8, 0.7)])
def test_top_k_top_p_stay_in_their_set(top_k, top_p, temperature, jax_models):
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(2), [3, 6])
  rollout, _ = draw(model, prompts, n=32, seed=5, temperature=temperature, top_k=top_k,
                    top_p=top_p)
  assert rollout.lengths.sum() == 2 * 32 * 6
  for r, tokens in enumerate(rollout.tokens):
    logits = row_logits(model, tokens).astype(np.float64) / temperature
    p = int(rollout.prompt_lengths[r])
    for i, target in enumerate(tokens[p:]):
      z = logits[p - 1 + i]
      order = np.argsort(-z)
      keep = order[:top_k] if top_k else order
      probs = np.exp(z[keep] - z[keep].max())
      probs /= probs.sum()
      above = np.cumsum(probs) - probs
      keep = keep[above < top_p]
      assert target in keep
      kept_logp = z[keep] - np.log(np.exp(z[keep] - z[keep].max()).sum()) - z[keep].max()
      np.testing.assert_allclose(rollout.logp[r][i], kept_logp[list(keep).index(target)],
                                 atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])  # data x fsdp x tensor
def test_sharded_greedy_matches_one_device(shape, checkpoints, jax_models):
  path, _ = checkpoints["qwen3"]
  prompts = ragged_prompts(np.random.RandomState(3), [4, 7, 1, 5, 6, 3, 2, 7])
  expected = sampling.generate(jax_models["qwen3"], prompts, 8, stop_ids=(2,)).completion_ids
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*shape))
  model = models.from_pretrained(path, mesh=mesh)
  for layout in ("replicated", "tensor"):
    got = sampling.generate(model, prompts, 8, stop_ids=(2,), mesh=mesh, layout=layout,
                            micro_batch_size=4, chunk_steps=3, page_size=4)
    assert got.completion_ids == expected, layout


def test_tensor_mesh_admits_in_the_loop_and_matches_one_device(checkpoints, jax_models):
  """Heads split over two devices, one batch shard: rows are admitted inside the decode loop
  (the live-page copy split by kv head), with the same tokens as one device."""
  path, _ = checkpoints["qwen3"]
  prompts = ragged_prompts(np.random.RandomState(4), [4, 7, 1, 5, 6, 3, 2, 7, 5, 2])
  expected = sampling.generate(jax_models["qwen3"], prompts, 8, stop_ids=(2,)).completion_ids
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 2), jax.devices()[:2])
  model = models.from_pretrained(path, mesh=mesh)
  config = sampling.SamplerConfig(max_new_tokens=8, stop_ids=(2,), slots=8, chunk_steps=3,
                                  page_size=4, temperature=0.0)
  engine = sampling.Engine(model, config, mesh=mesh, layout="tensor")
  assert engine.admits_in_loop()
  got = sampling.generate(model, prompts, 8, stop_ids=(2,), mesh=mesh, layout="tensor",
                          micro_batch_size=8, chunk_steps=3, page_size=4)
  assert got.completion_ids == expected
  assert got.stats.compactions >= 1  # the tail's rows moved to fewer slots on the mesh too


def test_prefix_rows(jax_models):
  model = jax_models["qwen2"]
  rng = np.random.RandomState(4)
  prompts = ragged_prompts(rng, [3, 6, 4])
  prefixes = ragged_prompts(rng, [2, 0, 5])
  rollout, _ = draw(model, prompts, n=2, prefixes=prefixes, temperature=0.0, max_new_tokens=8)
  np.testing.assert_array_equal(rollout.prompt_lengths, [3, 3, 6, 6, 4, 4])
  np.testing.assert_array_equal(rollout.prefix_lengths, [2, 2, 0, 0, 5, 5])
  # The forced prefix continued greedily is the prompt + prefix as a plain prompt, continued,
  # and the prefix counts against the row's budget.
  plain = sampling.generate(model, [p + q for p, q in zip(prompts, prefixes)], 8).completion_ids
  for r in range(6):
    i = r // 2
    assert rollout.tokens[r].tolist() == prompts[i] + prefixes[i] + rollout.completion(r).tolist()
    assert rollout.completion(r).tolist() == plain[i][:8 - len(prefixes[i])]
  with pytest.raises(ValueError, match="leaves no budget"):
    sampling.requests(prompts, prefix_ids=[[1] * 8, [], []], max_new_tokens=8)


@pytest.mark.slow
def test_reproducible_and_independent_of_slots(jax_models):
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(5), [2, 7, 4, 3, 5])

  def tokens(rollout):
    return [t.tolist() for t in rollout.tokens]

  whole, stats = draw(model, prompts, n=2, temperature=1.0, stop_ids=(5, 9))
  assert stats.slots == 10 and stats.prefill_calls == 1
  again, _ = draw(model, prompts, n=2, temperature=1.0, stop_ids=(5, 9))
  assert tokens(whole) == tokens(again)
  for slots in (3, 1):
    split, split_stats = draw(model, prompts, n=2, temperature=1.0, stop_ids=(5, 9),
                              slots=slots, chunk_steps=2, page_size=2)
    assert tokens(split) == tokens(whole), slots
    for a, b in zip(split.logp, whole.logp):
      np.testing.assert_allclose(a, b, atol=1e-5)
    assert split_stats.prefill_calls > 1
  # A later call's rows, given their ids, draw what the same rows drew in one call.
  tail, _ = draw(model, prompts[3:], n=2, row_offset=6, temperature=1.0, stop_ids=(5, 9))
  assert tokens(tail) == tokens(whole)[6:]
  other, _ = draw(model, prompts, n=2, seed=1, temperature=1.0, stop_ids=(5, 9))
  assert tokens(other) != tokens(whole)
  # The two samples of a prompt draw independently.
  assert any(a != b for a, b in zip(tokens(whole)[0::2], tokens(whole)[1::2]))


@pytest.mark.slow
def test_a_small_pool_preempts_and_redraws_the_same_tokens(jax_models):
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(6), [3, 4, 2, 5, 3, 4])
  want, _ = draw(model, prompts, temperature=1.0, max_new_tokens=12)
  full, full_stats = draw(model, prompts, temperature=1.0, max_new_tokens=12, slots=4,
                          page_size=2, chunk_steps=2)
  # 4 slots but pages for about two whole rows: rows wait for pages or are put back.
  got, stats = draw(model, prompts, temperature=1.0, max_new_tokens=12, slots=4, page_size=2,
                    num_pages=1 + 2 * 9, chunk_steps=2)
  assert [t.tolist() for t in got.tokens] == [t.tolist() for t in want.tokens]
  assert [t.tolist() for t in full.tokens] == [t.tolist() for t in want.tokens]
  assert stats.preemptions > 0 and full_stats.preemptions == 0
  assert stats.kv_cache_bytes < full_stats.kv_cache_bytes / 2


def test_compilations_bounded_and_kv_bytes(jax_models):
  model = jax_models["llama"]
  rng = np.random.RandomState(7)
  cfg = dict(max_new_tokens=3, temperature=0.0, length_buckets=(4, 8), slots=2, page_size=4)
  draw(model, ragged_prompts(rng, [5, 2]), **cfg)
  before = sampling.compile_counts()
  # The same length buckets and live pages: nothing new.
  _, stats = draw(model, ragged_prompts(rng, [7, 3]), **cfg)
  assert sampling.compile_counts() == before
  assert stats.kv_cache_bytes == models.PagedKVCache.num_bytes(
      model.cfg.num_layers, model.cfg.num_kv_heads, model.cfg.head_dim, stats.pages, 4,
      jnp.float32)
  # Every slot's whole row, the scratch page and a staged context per slot (8 tokens: 2 pages).
  assert stats.pages == 2 * stats.pages_per_row + 1 + 2 * 2


def test_temperature_and_top_p_share_programs(jax_models):
  """Evaluation (temperature 0.6) and rollouts (1.0) of one shape run the same programs; a
  nucleus is its own program, the value of top_p is not; the draws follow the values."""
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(11), [3, 5, 2, 4])
  cfg = dict(max_new_tokens=5, slots=2, page_size=4, stop_ids=(5,))
  hot, _ = draw(model, prompts, temperature=1.0, **cfg)
  before = sampling.compile_counts()
  cold, _ = draw(model, prompts, temperature=0.6, **cfg)
  assert sampling.compile_counts() == before
  # Log-probs under the distribution drawn from: the sharper one's top tokens gain.
  first = lambda rollout: np.asarray([lp[0] for lp in rollout.logp])
  assert np.abs(first(hot) - first(cold)).max() > 1e-3
  draw(model, prompts, temperature=0.6, top_p=0.9, **cfg)
  nucleus = sampling.compile_counts()
  assert nucleus != before
  draw(model, prompts, temperature=1.0, top_p=0.5, **cfg)
  assert sampling.compile_counts() == nucleus


def test_refills_share_one_prefill_program(jax_models):
  """However many slots a decode call frees, host refills (an explicit pool size: rows may be
  put back, so the host refills between calls) prefill the same number of rows."""
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(12), [3, 2, 4, 3, 2, 4, 3, 2, 3, 4, 2, 3])
  before = sampling.compile_counts().get("prefill", 0)
  _, stats = draw(model, prompts, temperature=1.0, max_new_tokens=8, stop_ids=(3, 5, 7),
                  slots=8, chunk_steps=8, length_buckets=(8,), refill_fraction=0.25,
                  num_pages=9)
  assert stats.prefill_calls >= 3
  # The first fill (8 rows) and refills (2 rows, as many calls as needed).
  assert sampling.compile_counts()["prefill"] - before <= 2
  # The tail after the last refill: some of the steps, with slots emptying.
  assert 0 < stats.drain_steps < stats.decode_steps
  assert 0 < stats.drain_occupancy < 1 and 0 < stats.drain_seconds < stats.seconds
  # Every row admitted at once (at most a pass's worth): the whole call is its tail.
  _, whole = draw(model, prompts[:8], temperature=1.0, max_new_tokens=8, stop_ids=(3, 5, 7),
                  length_buckets=(8,))
  assert whole.prefill_calls == 1 and whole.drain_steps == whole.decode_steps
  assert whole.drain_occupancy == pytest.approx(whole.occupancy)


def test_rows_admitted_inside_the_decode_loop(jax_models):
  """With the default pool, rows prefilled ahead take a slot inside the decode loop the step
  its row ends: the same tokens as host refills, in fewer decode calls, with (nearly) no idle
  slot while rows wait."""
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(13), [3, 5, 2, 4, 6, 3, 2, 5, 4, 3, 6, 2, 3,
                                                       4, 5, 2, 3, 4, 2, 5])
  cfg = dict(temperature=1.0, max_new_tokens=12, stop_ids=(3, 5, 7), slots=4, page_size=4,
             chunk_steps=8, length_buckets=(8,))
  staged, staged_stats = draw(model, prompts, **cfg)
  hosted, hosted_stats = draw(model, prompts, num_pages=1 + 4 * 5, **cfg)
  assert [t.tolist() for t in staged.tokens] == [t.tolist() for t in hosted.tokens]
  np.testing.assert_allclose(np.concatenate(staged.logp), np.concatenate(hosted.logp),
                             atol=1e-5)
  assert staged_stats.prefill_calls < hosted_stats.prefill_calls
  assert staged_stats.decode_calls < hosted_stats.decode_calls
  assert staged_stats.decode_steps <= hosted_stats.decode_steps
  # Until the last row is admitted, slots are (nearly) always busy.
  before = staged_stats.decode_steps - staged_stats.drain_steps
  busy_before = (staged_stats.occupancy * staged_stats.decode_steps
                 - staged_stats.drain_occupancy * staged_stats.drain_steps)
  assert busy_before / before > 0.9


def test_tail_rows_move_to_fewer_slots(jax_models):
  """Once no row waits, the busy rows are compacted into fewer slots as rows end: the same
  tokens and log-probs as host refills (which keep every slot), with busier slot-steps."""
  model = jax_models["diffuse"]
  prompts = ragged_prompts(np.random.RandomState(21), [3, 5, 2, 4, 6, 3, 2, 5, 4, 3, 6, 2, 3,
                                                       4, 5, 2, 3, 4, 2, 5, 3, 4, 6, 2])
  cfg = dict(temperature=1.0, max_new_tokens=24, stop_ids=(3, 5, 7), slots=16, page_size=4,
             chunk_steps=8, length_buckets=(8,))
  staged, staged_stats = draw(model, prompts, **cfg)
  hosted, hosted_stats = draw(model, prompts, num_pages=1 + 16 * 8, **cfg)
  assert staged_stats.compactions >= 1 and hosted_stats.compactions == 0
  assert [t.tolist() for t in staged.tokens] == [t.tolist() for t in hosted.tokens]
  np.testing.assert_allclose(np.concatenate(staged.logp), np.concatenate(hosted.logp),
                             atol=1e-5)
  assert staged_stats.drain_occupancy > hosted_stats.drain_occupancy


def test_bad_settings_name_the_field(jax_models):
  model = jax_models["qwen2"]
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplerConfig(top_p=0.0)
  with pytest.raises(ValueError, match="length_buckets"):
    sampling.SamplerConfig(length_buckets=(8, 4))
  with pytest.raises(ValueError, match="sampler.slots"):
    sampling.SamplerConfig(slots=-1)
  assert sampling.SamplerConfig(stop_ids=[2, 3]).stop_ids == (2, 3)
  assert sampling.SamplerConfig(length_buckets=(4, 8)).bucket(9) == 16
  prompts = ragged_prompts(np.random.RandomState(8), [3, 4])
  with pytest.raises(ValueError, match="num_pages=3"):
    draw(model, prompts, max_new_tokens=12, page_size=2, num_pages=3)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    draw(model, prompts, max_new_tokens=300)


def test_decode_loop_moves_no_weights_on_a_mesh(checkpoints):
  """4 devices (fsdp=4): the decode layout's loop holds no weight all-gather; the training
  layout's program gathers the weights (what the check would catch inside the loop)."""
  from flax import nnx

  from tropd_jax import hlo_cost
  from tropd_jax.sampling import engine as engine_lib
  from tropd_jax.sampling import layout as layout_lib

  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[:4])
  model = models.from_pretrained(checkpoints["qwen3"][0], mesh=mesh)
  graphdef, params = nnx.split(model)
  weight_bytes = layout_lib.tree_bytes(params)
  config = sampling.SamplerConfig(max_new_tokens=8, page_size=4, slots=4)
  engine = sampling.Engine((graphdef, params), config, mesh=mesh)
  slots, pages, width = 4, 4 * 8 + 4, 8
  with jax.set_mesh(mesh), mesh_lib.use_rules(mesh_lib.DECODE_RULES["replicated"]):
    state = engine_lib._init_state(model.cfg, config, slots=slots, pages=pages,
                                   pages_per_row=width, dtype="float32", rules=engine.rules)
    table = mesh_lib.put(np.zeros((slots, width), np.int32), ("batch", None), mesh)
    release = mesh_lib.put(np.zeros(slots, bool), ("batch",), mesh)

    def cost_of(params):
      compiled = engine_lib.programs(graphdef, config, engine.rules).decode.lower(
          params, state, table, np.int32(8), np.int32(9), release,
          live_pages=width).compile()
      return hlo_cost.analyze(compiled.as_text(), unknown_trip_count=8)

    decode_params = jax.jit(lambda p: p, out_shardings=layout_lib.param_shardings(
        params, mesh, "replicated"))(params)
    cost = cost_of(decode_params)
    assert hlo_cost.weight_collectives_in_loops(cost, 0.01 * weight_bytes) == []
    assert cost.collective_bytes < 0.01 * weight_bytes
    # FSDP-sharded weights are gathered (XLA:CPU hoists it out of the loop; XLA:TPU does not).
    gathered = [c for c in cost_of(params).collectives if c.kind == "all-gather"]
    assert sum(c.total_bytes for c in gathered) > 0.5 * weight_bytes
