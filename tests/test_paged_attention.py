"""Paged KV cache: writes land where the page table says; decode attention over pages equals the
contiguous cache's ``attend``; per-shard runs on a mesh equal one device and need no collective;
the Pallas kernel (interpret mode on CPU) matches and compiles for a TPU topology."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import mesh as mesh_lib
from tropd_jax.models import attention
from tropd_jax.models import paged_attention as pa

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def _allocate(lengths, page_size, pages_per_row, num_pages, rng, first_page=1):
  """A shuffled page table: each row gets the pages its length needs, the rest is scratch."""
  free = list(rng.permutation(np.arange(first_page, num_pages)))
  table = np.zeros((len(lengths), pages_per_row), np.int32)
  for b, length in enumerate(lengths):
    for j in range(-(-length // page_size)):
      table[b, j] = free.pop()
  return table


def _to_pages(x_BSGH, table, num_pages, page_size, rng):
  """Pool ``[G, P, Z, H]`` holding ``x_BSGH`` as ``table`` says; garbage everywhere else."""
  b, s, g, h = x_BSGH.shape
  pages = 100 * rng.randn(g, num_pages, page_size, h).astype(np.float32)
  for row in range(b):
    for j in range(s // page_size):
      if table[row, j]:
        pages[:, table[row, j]] = np.swapaxes(x_BSGH[row, j * page_size:(j + 1) * page_size], 0, 1)
  return pages


def _case(g=2, q=2, lengths=(1, 16, 5, 12), page_size=4, pages_per_row=4, h=16, seed=0):
  """Queries, contiguous keys/values and the same keys/values in a shuffled page pool."""
  rng = np.random.RandomState(seed)
  b, s = len(lengths), pages_per_row * page_size
  lengths = np.asarray(lengths, np.int32)
  num_pages = 1 + int(sum(-(-lengths // page_size))) + 3
  table = _allocate(lengths, page_size, pages_per_row, num_pages, rng)
  k_BSGH, v_BSGH = rng.randn(2, b, s, g, h).astype(np.float32)
  q_BNH = rng.randn(b, g * q, h).astype(np.float32)
  k_pages = _to_pages(k_BSGH, table, num_pages, page_size, rng)
  v_pages = _to_pages(v_BSGH, table, num_pages, page_size, rng)
  return dict(q=q_BNH, k=k_BSGH, v=v_BSGH, k_pages=k_pages, v_pages=v_pages, table=table,
              lengths=lengths)


def _attend_contiguous(c):
  """``attention.attend`` over the contiguous cache: one query reading the row's first tokens."""
  s = c["k"].shape[1]
  key_mask_BS = np.arange(s)[None, :] < c["lengths"][:, None]
  q_segment = np.ones((c["q"].shape[0], 1), np.int32)
  out_BTNH = attention.attend(c["q"][:, None], c["k"], c["v"], q_segment,
                              key_mask_BS.astype(np.int32), jnp.array([s - 1]))
  return np.asarray(out_BTNH[:, 0])


def _paged(c, **kwargs):
  return pa.paged_attention(c["q"], c["k_pages"], c["v_pages"], c["lengths"], c["table"],
                            **kwargs)


@pytest.mark.parametrize("g,q", [(1, 1), (2, 2), (1, 4), (4, 3)])
def test_xla_equals_reference_and_contiguous_attend(g, q):
  c = _case(g=g, q=q, seed=g * 10 + q)
  want = _attend_contiguous(c)
  ref = pa.paged_attention_reference(c["q"], c["k_pages"], c["v_pages"], c["lengths"], c["table"])
  np.testing.assert_allclose(ref, want, atol=2e-6)
  np.testing.assert_allclose(_paged(c, impl="xla"), want, atol=2e-6)


def _live_step(c, lengths_B, num_entries, spare=0, written_only=False):
  """Gathers each row's pages (``spare`` more than its length needs, as for a decode call's
  growth), writes one token per row at ``lengths_B - 1`` and attends over the rows.
  ``written_only``: only the page each row wrote goes back to the pool."""
  z = c["k_pages"].shape[2]
  pages_B = -(-lengths_B // z) + spare
  live = pa.gather_live((c["k_pages"],), (c["v_pages"],), c["table"], lengths_B - 1, pages_B,
                        num_entries)
  out, live = live.write_attend(0, c["q"], c["new_BGH"], c["new_BGH"] + 1)
  if written_only:
    first = np.maximum(lengths_B - 1, 0) // z
    return out, live.scatter((c["k_pages"],), (c["v_pages"],), first, 1)
  return out, live.scatter((c["k_pages"],), (c["v_pages"],))


def _pool_step(c, lengths_B):
  """The same on the pool: write_decode, then the reference attention."""
  k = pa.write_decode(c["k_pages"], c["new_BGH"], c["table"], lengths_B - 1)
  v = pa.write_decode(c["v_pages"], c["new_BGH"] + 1, c["table"], lengths_B - 1)
  return pa.paged_attention_reference(c["q"], k, v, lengths_B, c["table"]), (k, v)


@pytest.mark.parametrize("g,q", [(1, 1), (2, 2), (4, 3)])
def test_live_pages_equal_the_reference(g, q):
  """A decode step on the flat copy of the rows' pages (zero-length rows, spare entries), and
  the pages put back, equal the step on the pool."""
  c = _case(g=g, q=q, lengths=(1, 16, 0, 12, 5, 4), seed=g * 7 + q)
  rng = np.random.RandomState(g)
  c["new_BGH"] = rng.randn(6, g, 16).astype(np.float32)
  lengths = np.maximum(c["lengths"], 1)  # each row writes its last token at lengths - 1
  lengths[2] = 0  # an idle slot: writes nothing, reads nothing
  c["table"][2] = pa.SCRATCH_PAGE
  want, (k_want, v_want) = _pool_step(c, lengths)
  need = int(sum(-(-length // 4) for length in lengths))  # 1 + 4 + 0 + 3 + 2 + 1 = 11
  for entries, written_only in ((need, False), (need + 5, False), (need, True),
                                (need + 5, True)):
    out, (k, v) = _live_step(c, lengths, entries, written_only=written_only)
    np.testing.assert_allclose(out, want, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(k[0])[:, 1:], np.asarray(k_want)[:, 1:])
    np.testing.assert_array_equal(np.asarray(v[0])[:, 1:], np.asarray(v_want)[:, 1:])
  short, _ = _live_step(c, lengths, need - 1)  # The last row loses its page.
  np.testing.assert_allclose(np.asarray(short)[:5], np.asarray(want)[:5], atol=2e-6)
  with pytest.raises(ValueError, match="num_entries=0"):
    _live_step(c, lengths, 0)


def test_live_pages_cost_follows_the_entries():
  c = _case(lengths=(3, 5, 2, 7), pages_per_row=16, seed=5)
  c["new_BGH"] = np.zeros((4, 2, 16), np.float32)
  costs = {}
  for entries in (8, 32):
    fn = jax.jit(lambda *a, n=entries: pa.LivePages.write_attend(
        pa.gather_live(a[1], a[2], a[3], a[4], a[5], n), 0, a[0], a[6], a[6])[0])
    compiled = fn.lower(c["q"], (c["k_pages"],), (c["v_pages"],), c["table"], c["lengths"],
                        np.full(4, 2, np.int32), c["new_BGH"]).compile()
    costs[entries] = compiled.cost_analysis()
  assert 3 < costs[32]["flops"] / costs[8]["flops"] < 5


def _computations(hlo: str) -> dict[str, str]:
  """The compiled HLO's computations by name (each from its header to its closing brace)."""
  out, name = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      name = line.split()[0].lstrip("%")
      out[name] = ""
    elif name is not None:
      out[name] += line + "\n"
  return out


def test_live_attention_computes_the_queries_once_per_slot():
  """The queries' producer (here a sine, as the rotary embedding's) runs once per slot, not
  inside the per-entry gather, which XLA:CPU would otherwise fuse it into."""
  c = _case(lengths=(3, 5, 2, 7), pages_per_row=16, seed=5)
  c["new_BGH"] = np.zeros((4, 2, 16), np.float32)
  fn = jax.jit(lambda *a: pa.LivePages.write_attend(
      pa.gather_live(a[1], a[2], a[3], a[4], a[5], 32), 0, jnp.sin(a[0]) * 3.0, a[6],
      a[6])[0])
  args = (c["q"], (c["k_pages"],), (c["v_pages"],), c["table"], c["lengths"],
          np.full(4, 2, np.int32), c["new_BGH"])
  hlo = fn.lower(*args).compile().as_text()
  sines = [name for name, body in _computations(hlo).items() if "sine(" in body]
  assert sines
  assert not [name for name in sines if "gather(" in _computations(hlo)[name]], sines
  given = jax.jit(lambda *a: pa.LivePages.write_attend(  # the queries computed beforehand
      pa.gather_live(a[1], a[2], a[3], a[4], a[5], 32), 0, a[0], a[6], a[6])[0])
  np.testing.assert_allclose(fn(*args), given(np.sin(c["q"]) * 3.0, *args[1:]), atol=1e-6)


def test_decode_computes_the_rotary_tables_once():
  """Every layer of a decode step reads one set of rotary sines and cosines: XLA:CPU computes
  them in one place, not inside each layer's query and key fusions; the hidden states equal
  those of the model run over the whole sequence."""
  from tropd_jax import models
  cfg = models.ModelConfig(model_type="qwen3", vocab_size=64, d_model=32, d_ff=64, num_layers=3,
                           num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
  model = models.init_model(cfg, seed=1)
  rng = np.random.RandomState(0)
  lengths = np.asarray([3, 6], np.int32)
  tokens = rng.randint(1, 64, (2, 7)).astype(np.int32)
  cache = model.init_cache(num_pages=9, page_size=4, num_slots=2, max_pages_per_row=2)
  table = np.asarray([[1, 2], [3, 4]], np.int32)
  cache = pa.PagedKVCache(cache.k_pages, cache.v_pages, table, lengths)
  _, cache = jax.jit(model.prefill)(tokens, lengths, cache)

  def step(cache, last_B, lengths_B):
    live = pa.gather_live(cache.k_pages, cache.v_pages, table, lengths_B,
                          np.full(2, 2, np.int32), 4)
    return model.decode(last_B, live)[0]

  last = tokens[np.arange(2), lengths]
  hlo = jax.jit(step).lower(cache, last, lengths).compile().as_text()
  sines = [name for name, body in _computations(hlo).items() if " sine(" in body]
  assert len(sines) == 1, sines  # one fusion computes the sines (one more the cosines)
  h_BD = jax.jit(step)(cache, last, lengths)
  full, _ = model.hidden(jnp.asarray(tokens))
  want = np.asarray(full)[np.arange(2), lengths]
  np.testing.assert_allclose(h_BD, want, atol=1e-4)


def test_xla_bucket_reads_only_its_pages():
  """Rows within 2 pages: bucket 2 equals the full table; bucket 1 cuts the longer rows."""
  c = _case(lengths=(1, 8, 5, 3), seed=3)
  full = np.asarray(_paged(c, impl="xla"))
  np.testing.assert_allclose(_paged(c, impl="xla", pages_bucket=2), full, atol=1e-6)
  cut = np.asarray(_paged(c, impl="xla", pages_bucket=1))
  np.testing.assert_allclose(cut[[0, 3]], full[[0, 3]], atol=1e-6)
  assert np.abs(cut[1] - full[1]).max() > 0.1
  # The kernel too reads at most the bucket's tokens (a longer length is cut, not overrun).
  pallas_cut = _paged(c, impl="pallas", interpret=True, pages_bucket=1)
  np.testing.assert_allclose(pallas_cut, cut, atol=3e-2)


def test_length_zero_slot_gives_zeros():
  c = _case(lengths=(0, 6, 0, 1), seed=4)
  for out in (_paged(c, impl="xla"), _paged(c, impl="pallas", interpret=True),
              pa.paged_attention_reference(c["q"], c["k_pages"], c["v_pages"], c["lengths"],
                                           c["table"])):
    np.testing.assert_array_equal(np.asarray(out)[[0, 2]], 0.0)


def test_xla_cost_follows_the_bucket():
  c = _case(lengths=(3, 5, 2, 7), pages_per_row=16, seed=5)
  costs = {}
  for bucket in (2, 8):
    fn = jax.jit(lambda *a, n=bucket: pa.paged_attention(*a, impl="xla", pages_bucket=n))
    compiled = fn.lower(c["q"], c["k_pages"], c["v_pages"], c["lengths"], c["table"]).compile()
    costs[bucket] = compiled.cost_analysis()
  assert 3 < costs[8]["flops"] / costs[2]["flops"] < 5
  assert costs[8]["bytes accessed"] > 2 * costs[2]["bytes accessed"]


def test_pallas_interpret_matches_reference_float32():
  """The kernel rounds keys and values to bfloat16: exact against a reference on rounded ones."""
  c = _case(g=2, q=2, seed=6)
  out = np.asarray(_paged(c, impl="pallas", interpret=True, pages_per_compute_block=2))
  np.testing.assert_allclose(out, _attend_contiguous(c), atol=3e-2)
  rounded = lambda x: jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
  ref = pa.paged_attention_reference(c["q"], rounded(c["k_pages"]), rounded(c["v_pages"]),
                                     c["lengths"], c["table"])
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("g,q", [(1, 8), (2, 1)])
def test_pallas_interpret_matches_reference_bfloat16(g, q):
  c = _case(g=g, q=q, lengths=(9, 16, 1, 4), pages_per_row=6, seed=7)
  bf16 = {k: jnp.asarray(c[k]).astype(jnp.bfloat16) for k in ("q", "k_pages", "v_pages")}
  args = (bf16["q"], bf16["k_pages"], bf16["v_pages"], c["lengths"], c["table"])
  ref = np.asarray(pa.paged_attention_reference(*args).astype(jnp.float32))
  # A bucket of 4 of the 6 table columns covers every row; the default compute block.
  out = pa.paged_attention(*args, impl="pallas", interpret=True, pages_bucket=4)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=2e-2)
  xla = pa.paged_attention(*args, impl="xla")
  np.testing.assert_allclose(np.asarray(xla.astype(jnp.float32)), ref, atol=2e-2)


def test_write_decode_puts_each_token_on_its_page():
  rng = np.random.RandomState(8)
  g, z, h, pages_per_row, num_pages = 2, 4, 8, 3, 12
  table = _allocate([12, 5, 0, 9], z, pages_per_row, num_pages, rng)
  pos = np.array([11, 4, 6, 12], np.int32)  # slot 2 is inactive, slot 3 is past its capacity
  new_BGH = rng.randn(4, g, h).astype(np.float32)
  pages = rng.randn(g, num_pages, z, h).astype(np.float32)
  out = np.asarray(jax.jit(pa.write_decode)(pages, new_BGH, table, pos))
  want = pages.copy()
  for b in (0, 1):
    want[:, table[b, pos[b] // z], pos[b] % z] = new_BGH[b]
  np.testing.assert_array_equal(out[:, 1:], want[:, 1:])
  assert not np.array_equal(out[:, 0], pages[:, 0])  # the inactive slots' tokens went there


def test_write_prefill_puts_real_tokens_at_consecutive_positions():
  rng = np.random.RandomState(9)
  g, z, h, t, pages_per_row, num_pages = 2, 4, 8, 6, 4, 16
  mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0],
                   [1, 0, 1, 1, 0, 1]], bool)
  start = np.array([0, 5, 3, 14], np.int32)  # row 3's last token is past its capacity
  table = _allocate([4, 10, 0, 16], z, pages_per_row, num_pages, rng)
  new_BTGH = rng.randn(4, t, g, h).astype(np.float32)
  pages = rng.randn(g, num_pages, z, h).astype(np.float32)
  out = np.asarray(jax.jit(pa.write_prefill)(pages, new_BTGH, table, start, mask))
  want = pages.copy()
  for b in range(4):
    pos = start[b]
    for i in range(t):
      if mask[b, i]:
        if pos < pages_per_row * z:
          want[:, table[b, pos // z], pos % z] = new_BTGH[b, i]
        pos += 1
  np.testing.assert_array_equal(out[:, 1:], want[:, 1:])


def test_each_write_is_one_scatter():
  pages = jnp.zeros((2, 8, 4, 8))
  table = jnp.zeros((3, 2), jnp.int32)
  decode = jax.jit(pa.write_decode).lower(pages, jnp.zeros((3, 2, 8)), table,
                                          jnp.zeros(3, jnp.int32)).as_text()
  prefill = jax.jit(pa.write_prefill).lower(pages, jnp.zeros((3, 5, 2, 8)), table,
                                            jnp.zeros(3, jnp.int32),
                                            jnp.ones((3, 5), bool)).as_text()
  assert decode.count("\"stablehlo.scatter\"(") == 1
  assert prefill.count("\"stablehlo.scatter\"(") == 1


def test_prefill_then_decode_writes_then_attention_equal_contiguous_attend():
  """The writes build the pool the attention reads: the paged path end to end."""
  rng = np.random.RandomState(10)
  g, q, z, h, t, pages_per_row = 2, 2, 4, 16, 7, 3
  mask = np.ones((3, t), bool)
  mask[0, :3] = False
  mask[2, 5:] = False
  lengths = mask.sum(1) + 1  # prompts, then one decoded token
  table = _allocate(lengths, z, pages_per_row, 1 + 3 * pages_per_row, rng)
  k_BTGH, v_BTGH = rng.randn(2, 3, t + 1, g, h).astype(np.float32)
  k_pages = v_pages = jnp.zeros((g, table.max() + 1, z, h))
  start = np.zeros(3, np.int32)
  k_pages = pa.write_prefill(k_pages, k_BTGH[:, :t], table, start, mask)
  v_pages = pa.write_prefill(v_pages, v_BTGH[:, :t], table, start, mask)
  k_pages = pa.write_decode(k_pages, k_BTGH[:, t], table, lengths - 1)
  v_pages = pa.write_decode(v_pages, v_BTGH[:, t], table, lengths - 1)
  q_BNH = rng.randn(3, g * q, h).astype(np.float32)
  out = pa.paged_attention(q_BNH, k_pages, v_pages, lengths, table, impl="xla")
  key_mask = np.concatenate([mask, np.ones((3, 1), bool)], 1)
  want = attention.attend(q_BNH[:, None], k_BTGH, v_BTGH, np.ones((3, 1), np.int32),
                          key_mask.astype(np.int32), jnp.array([t]))[:, 0]
  np.testing.assert_allclose(out, want, atol=2e-6)


def _sharded_case(shards, slots_per_shard=2, pages_per_shard=9, g=2, q=2, z=4, h=16, seed=11):
  """Local page tables per shard, and the same pool addressed by global page indices."""
  rng = np.random.RandomState(seed)
  b, pages_per_row = shards * slots_per_shard, 4
  lengths = rng.randint(1, pages_per_row * z + 1, b).astype(np.int32)
  lengths[0], lengths[-1] = 1, pages_per_row * z
  local = np.concatenate([
      _allocate(lengths[s * slots_per_shard:(s + 1) * slots_per_shard], z, pages_per_row,
                pages_per_shard, rng) for s in range(shards)])
  shard_B = np.arange(b) // slots_per_shard
  num_pages = shards * pages_per_shard
  return dict(
      lengths=lengths, local=local, glob=local + (shard_B * pages_per_shard)[:, None],
      scratch=np.arange(shards) * pages_per_shard,
      k_pages=rng.randn(g, num_pages, z, h).astype(np.float32),
      v_pages=rng.randn(g, num_pages, z, h).astype(np.float32),
      q=rng.randn(b, g * q, h).astype(np.float32),
      new_BTGH=rng.randn(b, 5, g, h).astype(np.float32),
      mask=rng.rand(b, 5) > 0.3, new_BGH=rng.randn(b, g, h).astype(np.float32))


def _step(c, table, lengths_B, impl, live_pages=None):
  """Prefill a chunk after each row's tokens, decode one more, attend over the grown rows
  (``live_pages``: through a ``LivePages`` copy of that many entries per shard)."""
  start = jnp.maximum(lengths_B - 8, 0)
  k_pages = pa.write_prefill(c["k_pages"], c["new_BTGH"], table, start, c["mask"])
  v_pages, new_v_BGH = c["v_pages"], c["new_BGH"] + 1
  if live_pages is not None:
    live = pa.gather_live((k_pages,), (v_pages,), table, lengths_B - 1,
                          -(-lengths_B // k_pages.shape[2]), live_pages)
    out, live = live.write_attend(0, c["q"], c["new_BGH"], new_v_BGH)
    (k_pages,), (v_pages,) = live.scatter((k_pages,), (v_pages,))
    return (k_pages, v_pages), out
  k_pages = pa.write_decode(k_pages, c["new_BGH"], table, lengths_B - 1)
  v_pages = pa.write_decode(v_pages, new_v_BGH, table, lengths_B - 1)
  out = pa.paged_attention(c["q"], k_pages, v_pages, lengths_B, table, impl=impl,
                           pages_bucket=4)
  return (k_pages, v_pages), out


@pytest.mark.parametrize("impl", ["xla", "xla_live", "pallas"])
def test_eight_devices_equal_one(impl):
  """Mesh data=2, fsdp=2, tensor=2: 4 slot/pool shards with local tables, kv heads split."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  assert pa.page_shards(mesh) == 4
  c = _sharded_case(shards=4)
  live = 8 if impl == "xla_live" else None  # Holds every page of a shard's 2 rows.
  impl = impl.removesuffix("_live")
  step = jax.jit(lambda table, lengths: _step(c, table, lengths, impl, live))
  pages_1, out_1 = step(c["glob"], c["lengths"]) if live is None else jax.jit(
      lambda table, lengths: _step(c, table, lengths, impl, 32))(c["glob"], c["lengths"])
  with jax.set_mesh(mesh):
    pages_8, out_8 = step(c["local"], c["lengths"])
  assert len(out_8.sharding.device_set) == 8
  np.testing.assert_allclose(out_8, out_1, atol=1e-6)
  keep = np.setdiff1d(np.arange(c["k_pages"].shape[1]), c["scratch"])
  for p8, p1 in zip(pages_8, pages_1):
    np.testing.assert_array_equal(np.asarray(p8)[:, keep], np.asarray(p1)[:, keep])
  ref = pa.paged_attention_reference(c["q"], *pages_1, c["lengths"], c["glob"])
  np.testing.assert_allclose(out_1, ref, atol=3e-2 if impl == "pallas" else 2e-6)


def test_sharded_writes_and_attention_need_no_collective():
  """Compiled on 4 devices (slots and pages over fsdp=2, kv heads over tensor=2)."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  c = _sharded_case(shards=2)
  with jax.set_mesh(mesh):
    cache = jax.eval_shape(lambda: pa.PagedKVCache.init(1, 2, 16, 18, 4, 4, 4, jnp.float32))
  shard = cache.shardings(mesh)
  assert shard.k_pages[0].spec == jax.sharding.PartitionSpec("tensor", "fsdp", None, None)
  rows = lambda *rest: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", *rest))
  q_shard = rows("tensor", None)
  fn = jax.jit(
      lambda pages, new_BTGH, new_BGH, mask, q, table, lengths: _step(
          dict(c, k_pages=pages, v_pages=pages, new_BTGH=new_BTGH, new_BGH=new_BGH, mask=mask,
               q=q), table, lengths, "xla"),
      in_shardings=(shard.k_pages[0], rows(None, "tensor", None), rows("tensor", None),
                    rows(None), q_shard, shard.page_table_BP, shard.lengths_B),
      out_shardings=((shard.k_pages[0],) * 2, q_shard))
  with jax.set_mesh(mesh):
    compiled = fn.lower(c["k_pages"], c["new_BTGH"], c["new_BGH"], c["mask"], c["q"],
                        c["local"], c["lengths"]).compile()
  hlo = compiled.as_text()
  assert "scatter" in hlo and "gather" in hlo
  for op in COLLECTIVES:
    assert op not in hlo, op


def test_cache_init_and_bytes():
  cache = pa.PagedKVCache.init(num_layers=3, num_kv_heads=2, head_dim=8, num_pages=10,
                               page_size=4, num_slots=5, max_pages_per_row=3)
  assert (cache.num_layers, cache.num_pages, cache.page_size, cache.num_slots,
          cache.max_pages_per_row) == (3, 10, 4, 5, 3)
  assert cache.k_pages[0].shape == (2, 10, 4, 8) and cache.k_pages[0].dtype == jnp.bfloat16
  assert not cache.page_table_BP.any() and not cache.lengths_B.any()
  total = sum(x.nbytes for x in cache.k_pages + cache.v_pages)
  assert pa.PagedKVCache.num_bytes(3, 2, 8, 10, 4) == total == 2 * 3 * 2 * 10 * 4 * 8 * 2
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 8


def test_mistakes_fail_with_the_bad_value():
  c = _case(seed=12)
  with pytest.raises(ValueError, match="impl='flash'"):
    _paged(c, impl="flash")
  with pytest.raises(ValueError, match="pages_bucket=5"):
    _paged(c, impl="xla", pages_bucket=5)
  with pytest.raises(ValueError, match="pages_per_compute_block=0"):
    _paged(c, impl="pallas", pages_per_compute_block=0)
  with pytest.raises(ValueError, match="pages_per_compute_block=3"):
    _paged(c, impl="pallas", pages_per_compute_block=3)
  with pytest.raises(ValueError, match="page_size=0"):
    pa.PagedKVCache.init(1, 2, 8, 10, 0, 4, 3)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="6 slots and 16 pool pages"):
    pa.PagedKVCache.init(1, 2, 8, 16, 4, 6, 3)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="num_pages=4 leaves no usable page"):
    pa.PagedKVCache.init(1, 2, 8, 4, 4, 8, 3)


def test_auto_is_xla_off_tpu():
  assert pa.resolve_impl("auto", 128) == "xla"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -r requirements-tpu.txt).")
def test_pallas_kernel_compiles_for_v5p():
  """Mosaic compiles the kernel, per shard on a v5p:2x2x1 mesh, with no collective."""
  from tropd_jax import aot

  devices = aot.tpu_devices("v5p:2x2x1")
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=2, tensor=2), devices)
  g, q, h, z, pages_per_row, slots, pages = 2, 4, 128, 16, 8, 8, 64
  with jax.set_mesh(mesh):
    cache = jax.eval_shape(
        lambda: pa.PagedKVCache.init(1, g, h, pages, z, slots, pages_per_row, jnp.bfloat16))
  shard = cache.shardings(mesh)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  q_BNH = jax.ShapeDtypeStruct((slots, g * q, h), jnp.bfloat16, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("fsdp", "tensor", None)))
  fn = jax.jit(lambda q, k, v, lengths, table: pa.paged_attention(
      q, k, v, lengths, table, impl="auto", pages_bucket=4))
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    assert pa.resolve_impl("auto", 128) == "pallas"
    assert pa.resolve_impl("auto", 64) == "xla"  # Mosaic needs H % 128 == 0 for this kernel
    with pytest.raises(ValueError, match="not H=64"):
      jax.eval_shape(functools.partial(pa.paged_attention, impl="pallas"),
                     q_BNH.update(shape=(slots, g * q, 64)),
                     *[jax.ShapeDtypeStruct((g, pages, z, 64), jnp.bfloat16)] * 2,
                     cache.lengths_B, cache.page_table_BP)
    compiled = fn.lower(q_BNH, sds(cache.k_pages[0], shard.k_pages[0]),
                        sds(cache.v_pages[0], shard.v_pages[0]),
                        sds(cache.lengths_B, shard.lengths_B),
                        sds(cache.page_table_BP, shard.page_table_BP)).compile()
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo
  for op in COLLECTIVES:
    assert op not in hlo, op
