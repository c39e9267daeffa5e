"""Paged KV cache for continuous batching: the pool, its writes, and decode attention over it.

Shape key (tropd_jax/__init__.py): B decode slots, T positions of a prefill chunk, N query
heads, G kv heads, Q = N // G, H head dim, P pages, Z tokens per page, S key positions, E
entries of a decode call's live-page list.

Layout. Per layer, keys and values live in a shared pool of pages ``[G, P, Z, H]`` (the layout
of jax's Pallas TPU paged-attention kernel). ``page_table_BP[b, j]`` is the pool page holding
positions ``j·Z … j·Z + Z - 1`` of slot ``b``'s row; ``lengths_B`` counts a slot's cached tokens.
Page 0 is a scratch page: inactive slots and unused page-table entries point at it, so their
writes land there harmlessly, and reads of it are masked by ``lengths_B``.

Sharding. Under a mesh (``jax.set_mesh``) every function here runs per shard (``shard_map``)
and needs no collective: slots and pool pages are split alike over the ``batch`` mesh axes
(``page_shards`` of them), kv heads over ``tensor`` when they divide (else every shard holds
all heads). Page-table entries are *local* to the slot's shard: shard ``s`` holds slots
``[s·B/n, (s+1)·B/n)`` and pool pages ``[s·P/n, (s+1)·P/n)``, entry ``i`` of one of its slots
means global page ``s·P/n + i``, and local page 0 of every shard is that shard's scratch page.
The page allocator must therefore give a slot pages from its own shard's range only.

Decode attention implementations (``impl``):
  ``xla``     gathers the first ``pages_bucket`` page-table columns of every row and masks
              positions past the row's length: cost follows the longest row. The engine's
              XLA decode loop reads ``LivePages`` instead (below).
  ``pallas``  jax's Pallas TPU paged-attention kernel (reads only a row's live pages, in blocks
              of pages); compiled by Mosaic on TPU, run in Pallas' TPU interpret mode elsewhere
              (slow: tests only). It rounds keys and values to bfloat16 inside, whatever the
              pool's dtype.
  ``auto``    ``pallas`` when compiling for a TPU (and H is a multiple of 128, which Mosaic
              needs for the kernel), else ``xla``.

Live pages (the XLA decode loop). A decode call knows, before its first step, every page its
rows can touch (each busy row's pages up to ``lengths + steps``). ``gather_live`` copies them
once into one flat list of ``E`` entries per shard (a row's pages in order, rows one after
the other); the steps write their tokens into that copy and attend over it (a softmax per row
over its own entries: cost follows the rows' total live length, not the longest row, and no
page is gathered per step); ``LivePages.scatter`` puts the pages back into the pool after the
last step. Keys are held ``[E, G, H, Z]`` (positions minor), the layout in which XLA:CPU's
batched dot of a query against a page is fastest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as pallas_paged
from jax.sharding import PartitionSpec

from tropd_jax import mesh as mesh_lib
from tropd_jax.models import attention, layers

PAGED_IMPLS = ("xla", "pallas", "auto")
# Logical axes of the cache's arrays (tropd_jax.mesh.RULES maps them to the mesh).
PAGES_AXES = ("kv_heads", "batch", "length", "head_dim")
PAGE_TABLE_AXES = ("batch", None)
LENGTHS_AXES = ("batch",)
SCRATCH_PAGE = 0
# Key positions per compute block of the Pallas kernel (its default pages_per_compute_block is
# the largest divisor of the page-table width with at most this many tokens).
PALLAS_BLOCK_TOKENS = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Keys and values of every layer in a page pool, the slots' page tables and lengths.

  Attributes:
    k_pages: per layer ``[G, P, Z, H]``.
    v_pages: per layer ``[G, P, Z, H]``.
    page_table_BP: ``int32 [B, Pmax]``, pool page of each page of each slot's row (local to
      the slot's shard under a mesh; 0, the scratch page, where unused).
    lengths_B: ``int32 [B]``, tokens in the cache per slot.
  """

  k_pages: tuple[jax.Array, ...]
  v_pages: tuple[jax.Array, ...]
  page_table_BP: jax.Array
  lengths_B: jax.Array

  @classmethod
  def init(cls, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
           page_size: int, num_slots: int, max_pages_per_row: int,
           dtype=jnp.bfloat16) -> PagedKVCache:
    """An empty cache: zero pages, every page-table entry on the scratch page, lengths 0.

    Under a mesh the arrays take their logical shardings; ``num_slots`` and ``num_pages``
    must then divide by ``page_shards(mesh)``, with at least 2 pages per shard.
    """
    sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 num_pages=num_pages, page_size=page_size, num_slots=num_slots,
                 max_pages_per_row=max_pages_per_row)
    for name, value in sizes.items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"PagedKVCache.init: {name}={value!r} must be a positive integer.")
    mesh = mesh_lib.current_mesh()
    shards = page_shards(mesh)
    _check_divides(shards, num_slots, num_pages)
    if num_pages < 2 * shards:
      raise ValueError(
          f"PagedKVCache.init: num_pages={num_pages} leaves no usable page: each of the "
          f"{shards} shard(s) needs its scratch page and at least one more.")
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    pages = lambda: mesh_lib.shard(jnp.zeros(shape, dtype), PAGES_AXES)
    return cls(
        k_pages=tuple(pages() for _ in range(num_layers)),
        v_pages=tuple(pages() for _ in range(num_layers)),
        page_table_BP=mesh_lib.shard(
            jnp.full((num_slots, max_pages_per_row), SCRATCH_PAGE, jnp.int32), PAGE_TABLE_AXES),
        lengths_B=mesh_lib.shard(jnp.zeros((num_slots,), jnp.int32), LENGTHS_AXES),
    )

  @staticmethod
  def num_bytes(num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                page_size: int, dtype=jnp.bfloat16) -> int:
    """Bytes of the page pool (keys and values of every layer)."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * num_layers * num_kv_heads * num_pages * page_size * head_dim * itemsize

  @property
  def num_layers(self) -> int:
    return len(self.k_pages)

  @property
  def num_pages(self) -> int:
    return self.k_pages[0].shape[1]

  @property
  def page_size(self) -> int:
    return self.k_pages[0].shape[2]

  @property
  def num_slots(self) -> int:
    return self.page_table_BP.shape[0]

  @property
  def max_pages_per_row(self) -> int:
    return self.page_table_BP.shape[1]

  def write_attend(self, layer: int, q_BNH, k_BGH, v_BGH, *, impl: str,
                   pages_bucket: int | None = None) -> tuple[jax.Array, PagedKVCache]:
    """Caches one token per slot at ``lengths_B`` in ``layer``, then attends over each row's
    first ``lengths_B + 1`` tokens; returns ``(out_BNH, cache)`` (``lengths_B`` unchanged)."""
    k = write_decode(self.k_pages[layer], k_BGH, self.page_table_BP, self.lengths_B)
    v = write_decode(self.v_pages[layer], v_BGH, self.page_table_BP, self.lengths_B)
    out_BNH = paged_attention(q_BNH, k, v, self.lengths_B + 1, self.page_table_BP, impl=impl,
                              pages_bucket=pages_bucket)
    put = lambda pages, x: pages[:layer] + (x,) + pages[layer + 1:]
    return out_BNH, dataclasses.replace(self, k_pages=put(self.k_pages, k),
                                        v_pages=put(self.v_pages, v))

  def shardings(self, mesh) -> PagedKVCache:
    """The cache's ``NamedSharding``s on ``mesh`` (of arrays or ``ShapeDtypeStruct``s)."""
    _check_divides(page_shards(mesh), self.num_slots, self.num_pages)
    named = lambda axes, x: mesh_lib.named_sharding(axes, x.shape, mesh)
    return PagedKVCache(
        k_pages=tuple(named(PAGES_AXES, x) for x in self.k_pages),
        v_pages=tuple(named(PAGES_AXES, x) for x in self.v_pages),
        page_table_BP=named(PAGE_TABLE_AXES, self.page_table_BP),
        lengths_B=named(LENGTHS_AXES, self.lengths_B),
    )


def page_shards(mesh) -> int:
  """How many shards split the slots and the pool on ``mesh`` (1 without one)."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in mesh_lib.active_rules()["batch"])


def _check_divides(shards: int, num_slots: int, num_pages: int) -> None:
  if num_slots % shards or num_pages % shards:
    raise ValueError(
        f"{num_slots} slots and {num_pages} pool pages must both be multiples of {shards}, the "
        f"size of the mesh's batch axes {mesh_lib.active_rules()['batch']}: each shard holds "
        "whole slots and its own pages.")


def _per_shard(fn, args, specs, out_spec):
  """``fn(*args)``, per shard under the current mesh (``specs``: functions of the mesh and its
  batch axes, or tuples of them for tuple arguments; ``out_spec``: one such function)."""
  mesh = mesh_lib.current_mesh()
  if mesh is None:
    return fn(*args)
  batch = tuple(a for a in mesh_lib.active_rules()["batch"] if mesh.shape[a] > 1)
  batch = batch[0] if len(batch) == 1 else (batch or None)
  resolve = lambda spec: (tuple(map(resolve, spec)) if isinstance(spec, tuple)
                          else spec(mesh, batch))
  return jax.shard_map(
      fn, mesh=mesh, in_specs=resolve(tuple(specs)), out_specs=out_spec(mesh, batch),
      check_vma=False)(*args)


def _heads(mesh, num_kv_heads: int):
  """The mesh axis of the kv heads (``tensor`` when they divide by it), or None."""
  return mesh_lib.logical_to_spec(("kv_heads",), (num_kv_heads,), mesh)[0]


def _check_pool(pages_GPZH, page_table_BP, num_slots: int, what: str) -> None:
  if pages_GPZH.ndim != 4:
    raise ValueError(f"{what}: pages of shape {pages_GPZH.shape} are not [G, P, Z, H].")
  if page_table_BP.ndim != 2 or page_table_BP.shape[0] != num_slots:
    raise ValueError(f"{what}: page table of shape {page_table_BP.shape} is not "
                     f"[B, Pmax] for B={num_slots} slots.")
  _check_divides(page_shards(mesh_lib.current_mesh()), num_slots, pages_GPZH.shape[1])


def _page_and_offset(page_table_BP, pos_BT, valid_BT, page_size: int):
  """Pool page and in-page offset of positions ``pos_BT``; the scratch page where not valid."""
  width = page_table_BP.shape[1]
  valid_BT = valid_BT & (pos_BT >= 0) & (pos_BT < width * page_size)
  index_BT = jnp.where(valid_BT, pos_BT // page_size, 0)
  page_BT = jnp.take_along_axis(page_table_BP, index_BT, axis=1)
  return jnp.where(valid_BT, page_BT, SCRATCH_PAGE), pos_BT % page_size


def write_decode(pages_GPZH, new_BGH, page_table_BP, pos_B):
  """Writes one token per slot at position ``pos_B`` (one scatter for all slots).

  The token goes to page ``page_table_BP[b, pos // Z]`` at offset ``pos % Z``. Positions
  outside ``[0, Pmax·Z)`` go to the scratch page (the row is full: the token is dropped).

  Args:
    pages_GPZH: the pool of one layer's keys or values.
    new_BGH: the new token's keys or values per slot (cast to the pool's dtype).
    page_table_BP: ``int32``, pool page of each page of each row.
    pos_B: ``int32``, the position of each slot's new token.

  Returns:
    The updated pool.
  """
  pages_GPZH, new_BGH, page_table_BP, pos_B = map(
      jnp.asarray, (pages_GPZH, new_BGH, page_table_BP, pos_B))
  b, g, h = new_BGH.shape
  _check_pool(pages_GPZH, page_table_BP, b, "write_decode")
  if pos_B.shape != (b,) or pages_GPZH.shape[0] != g or pages_GPZH.shape[3] != h:
    raise ValueError(f"write_decode: new values {new_BGH.shape} [B, G, H] and positions "
                     f"{pos_B.shape} [B] do not match pages {pages_GPZH.shape} [G, P, Z, H].")

  def local(pages_GPZH, new_BGH, page_table_BP, pos_B):
    page_B, offset_B = _page_and_offset(
        page_table_BP, pos_B[:, None], jnp.ones((pos_B.shape[0], 1), bool), pages_GPZH.shape[2])
    new_GBH = jnp.swapaxes(new_BGH, 0, 1).astype(pages_GPZH.dtype)
    g, b = new_GBH.shape[:2]
    # Indices for every (head, slot): the scatter's window is a row of H, so any layout with
    # H minor (the Pallas kernel's) writes in place; a [G, H] window makes XLA:TPU keep the
    # pool in a layout of its own and copy the whole pool to the kernel's at every step.
    head_GB = jax.lax.broadcasted_iota(jnp.int32, (g, b), 0)
    page_GB = jnp.broadcast_to(page_B[:, 0][None], (g, b))
    offset_GB = jnp.broadcast_to(offset_B[:, 0][None], (g, b))
    return pages_GPZH.at[head_GB, page_GB, offset_GB].set(new_GBH)

  pages = lambda m, bt: PartitionSpec(_heads(m, g), bt, None, None)
  return _per_shard(
      local, (pages_GPZH, new_BGH, page_table_BP, pos_B),
      (pages, lambda m, bt: PartitionSpec(bt, _heads(m, g), None),
       lambda m, bt: PartitionSpec(bt, None), lambda m, bt: PartitionSpec(bt)),
      pages)


def write_prefill(pages_GPZH, new_BTGH, page_table_BP, start_B, mask_BT):
  """Writes ``T`` tokens per row; real tokens (``mask_BT``) at consecutive positions.

  A real token's position is ``start_B`` plus the count of real tokens before it in its row.
  Padding tokens, and positions outside ``[0, Pmax·Z)``, go to the scratch page.

  Args:
    pages_GPZH: the pool of one layer's keys or values.
    new_BTGH: the tokens' keys or values (cast to the pool's dtype).
    page_table_BP: ``int32``, pool page of each page of each row.
    start_B: ``int32``, the position of each row's first real token.
    mask_BT: ``bool``, True for real tokens.

  Returns:
    The updated pool.
  """
  pages_GPZH, new_BTGH, page_table_BP, start_B, mask_BT = map(
      jnp.asarray, (pages_GPZH, new_BTGH, page_table_BP, start_B, mask_BT))
  b, t, g, h = new_BTGH.shape
  _check_pool(pages_GPZH, page_table_BP, b, "write_prefill")
  if (start_B.shape != (b,) or mask_BT.shape != (b, t) or pages_GPZH.shape[0] != g
      or pages_GPZH.shape[3] != h):
    raise ValueError(f"write_prefill: new values {new_BTGH.shape} [B, T, G, H], starts "
                     f"{start_B.shape} [B] and mask {mask_BT.shape} [B, T] do not match pages "
                     f"{pages_GPZH.shape} [G, P, Z, H].")

  def local(pages_GPZH, new_BTGH, page_table_BP, start_B, mask_BT):
    pos_BT = start_B[:, None] + jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1
    page_BT, offset_BT = _page_and_offset(page_table_BP, pos_BT, mask_BT, pages_GPZH.shape[2])
    new_GBTH = jnp.moveaxis(new_BTGH, 2, 0).astype(pages_GPZH.dtype)
    g, b, t = new_GBTH.shape[:3]
    head_GBT = jax.lax.broadcasted_iota(jnp.int32, (g, b, t), 0)
    shape = (g, b, t)
    return pages_GPZH.at[head_GBT, jnp.broadcast_to(page_BT[None], shape),
                         jnp.broadcast_to(offset_BT[None], shape)].set(new_GBTH)

  pages = lambda m, bt: PartitionSpec(_heads(m, g), bt, None, None)
  rows = lambda m, bt: PartitionSpec(bt, None)
  return _per_shard(
      local, (pages_GPZH, new_BTGH, page_table_BP, start_B, mask_BT),
      (pages, lambda m, bt: PartitionSpec(bt, None, _heads(m, g), None), rows,
       lambda m, bt: PartitionSpec(bt), rows),
      pages)


def resolve_impl(impl: str, head_dim: int) -> str:
  """``xla`` or ``pallas``: ``auto`` picks ``pallas`` when compiling for a TPU and it can.

  Mosaic compiles the kernel only for a head dim that is a multiple of 128.
  """
  if impl not in PAGED_IMPLS:
    raise ValueError(f"paged attention impl={impl!r} is not one of {PAGED_IMPLS}.")
  if impl == "auto":
    tpu = attention.platform(mesh_lib.current_mesh()) == "tpu"
    return "pallas" if tpu and head_dim % 128 == 0 else "xla"
  return impl


def paged_attention(q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP, *, impl: str,
                    pages_bucket: int | None = None, interpret: bool | None = None,
                    pages_per_compute_block: int | None = None):
  """Decode attention: one query per slot over the first ``lengths_B`` tokens of its row.

  Softmax in float32, scale ``H**-0.5``, grouped heads (query head ``n`` reads kv head
  ``n // Q``). A slot of length 0 gets zeros.

  Args:
    q_BNH: one query per slot.
    k_pages_GPZH, v_pages_GPZH: the pools of one layer.
    lengths_B: ``int32``, tokens each query reads (the token just written included).
    page_table_BP: ``int32``, pool page of each page of each row.
    impl: one of ``PAGED_IMPLS``.
    pages_bucket: read only the first ``pages_bucket`` page-table columns (static; default:
      all). It must cover every row: ``lengths_B <= pages_bucket·Z`` (longer rows would read
      only their first ``pages_bucket·Z`` tokens).
    interpret: run the Pallas kernel in Pallas' TPU interpreter; default: unless the target
      is a TPU.
    pages_per_compute_block: pages per block of the Pallas kernel; it must divide the
      (bucketed) page-table width. Default: the largest divisor with at most
      ``PALLAS_BLOCK_TOKENS`` tokens.

  Returns:
    ``[B, N, H]`` in the dtype of ``q_BNH``.
  """
  q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP = map(
      jnp.asarray, (q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP))
  b, n, h = q_BNH.shape
  g, _, z, h_kv = k_pages_GPZH.shape
  _check_pool(k_pages_GPZH, page_table_BP, b, "paged_attention")
  if v_pages_GPZH.shape != k_pages_GPZH.shape or h_kv != h or n % g or lengths_B.shape != (b,):
    raise ValueError(
        f"paged_attention: queries {q_BNH.shape} [B, N, H] (N a multiple of G), lengths "
        f"{lengths_B.shape} [B] and pages {k_pages_GPZH.shape}, {v_pages_GPZH.shape} "
        "[G, P, Z, H] do not match.")
  impl = resolve_impl(impl, h)
  width = page_table_BP.shape[1]
  pages_bucket = width if pages_bucket is None else pages_bucket
  if not isinstance(pages_bucket, int) or not 1 <= pages_bucket <= width:
    raise ValueError(f"paged_attention: pages_bucket={pages_bucket!r} must be an integer in "
                     f"[1, {width}] (the page table's width).")
  if impl == "xla":
    local = _attend_xla
  else:
    if pages_per_compute_block is None:
      most = max(1, PALLAS_BLOCK_TOKENS // z)
      pages_per_compute_block = max(d for d in range(1, pages_bucket + 1)
                                    if pages_bucket % d == 0 and d <= most)
    block = pages_per_compute_block
    if not isinstance(block, int) or block < 1 or pages_bucket % block:
      raise ValueError(
          f"paged_attention: pages_per_compute_block={pages_per_compute_block} does not divide "
          f"the page-table width {pages_bucket}; pick a divisor of it.")
    if interpret is None:
      interpret = attention.platform(mesh_lib.current_mesh()) != "tpu"
    if not interpret and h % 128:
      raise ValueError(f"paged_attention: impl='pallas' compiles for TPU only with a head dim "
                       f"that is a multiple of 128, not H={h}; use impl='xla' or 'auto'.")
    local = functools.partial(_attend_pallas, block_pages=pages_per_compute_block,
                              interpret=interpret)
  bucketed = lambda q, k, v, lengths, table: local(q, k, v, lengths, table[:, :pages_bucket])
  pages = lambda m, bt: PartitionSpec(_heads(m, g), bt, None, None)
  queries = lambda m, bt: PartitionSpec(bt, _heads(m, g), None)
  return _per_shard(
      bucketed, (q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP),
      (queries, pages, pages, lambda m, bt: PartitionSpec(bt),
       lambda m, bt: PartitionSpec(bt, None)),
      queries)


def _attend_xla(q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP):
  """Gathers the table's pages of every row (``[G, B, S, H]``) and attends up to its length."""
  b, n, h = q_BNH.shape
  g, _, z, _ = k_pages_GPZH.shape
  s = page_table_BP.shape[1] * z
  k_GBSH = k_pages_GPZH[:, page_table_BP].reshape(g, b, s, h)
  v_GBSH = v_pages_GPZH[:, page_table_BP].reshape(g, b, s, h)
  q_BGQH = q_BNH.reshape(b, g, n // g, h)
  logits_BGQS = jnp.einsum(
      "BGQH,GBSH->BGQS", q_BGQH, k_GBSH, preferred_element_type=jnp.float32) * (h**-0.5)
  valid_BS = jnp.arange(s)[None, :] < lengths_B[:, None]
  logits_BGQS = jnp.where(valid_BS[:, None, None], logits_BGQS, jnp.finfo(jnp.float32).min)
  probs_BGQS = jax.nn.softmax(logits_BGQS, axis=-1)
  out_BGQH = jnp.einsum("BGQS,GBSH->BGQH", probs_BGQS.astype(v_GBSH.dtype), v_GBSH,
                        preferred_element_type=jnp.float32)
  out_BGQH = jnp.where(lengths_B[:, None, None, None] > 0, out_BGQH, 0.0)
  return out_BGQH.reshape(b, n, h).astype(q_BNH.dtype)


def _attend_pallas(q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP, *,
                   block_pages: int, interpret: bool):
  """jax's Pallas TPU paged-attention kernel (it reads only each row's live pages)."""
  h = q_BNH.shape[-1]
  # The kernel takes no scale and computes in float32: fold the scale into a float32 query.
  q_BNH_f32 = q_BNH.astype(jnp.float32) * (h**-0.5)
  # A length past the table would make the kernel read page indices beyond it; as the XLA
  # path, read at most the table's tokens.
  capacity = page_table_BP.shape[1] * k_pages_GPZH.shape[2]
  lengths_B = jnp.minimum(lengths_B, capacity).astype(jnp.int32)
  mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
  with mode:
    out_BNH = pallas_paged(
        q_BNH_f32, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP.astype(jnp.int32),
        pages_per_compute_block=block_pages, megacore_mode=None)
  return out_BNH.astype(q_BNH.dtype)


def paged_attention_reference(q_BNH, k_pages_GPZH, v_pages_GPZH, lengths_B, page_table_BP):
  """Dense reference for tests: every row's pages as a contiguous ``[B, S, G, H]`` cache.

  Each query head attends to a copy of its kv head's keys, in float32, one plain einsum.
  """
  b, n, h = q_BNH.shape
  g, _, z, _ = k_pages_GPZH.shape
  dense = lambda x: jnp.moveaxis(x[:, page_table_BP], 0, 3).reshape(b, -1, g, h)
  k_BSNH = jnp.repeat(dense(k_pages_GPZH).astype(jnp.float32), n // g, axis=2)
  v_BSNH = jnp.repeat(dense(v_pages_GPZH).astype(jnp.float32), n // g, axis=2)
  logits_BNS = jnp.einsum("BNH,BSNH->BNS", q_BNH.astype(jnp.float32), k_BSNH) / math.sqrt(h)
  valid_BS = jnp.arange(k_BSNH.shape[1])[None, :] < lengths_B[:, None]
  probs_BNS = jax.nn.softmax(jnp.where(valid_BS[:, None], logits_BNS, -jnp.inf), axis=-1)
  out_BNH = jnp.einsum("BNS,BSNH->BNH", jnp.nan_to_num(probs_BNS), v_BSNH)
  return out_BNH.astype(q_BNH.dtype)


# --- Live pages: a decode call's working copy of its rows' pages (the XLA path) ------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LivePages:
  """The pages a decode call's rows can touch, copied out of the pool as one flat list.

  Entry ``e`` is page ``ord_E[e]`` of slot ``row_E[e]``'s row; slot ``b`` owns entries
  ``start_B[b] … start_B[b] + pages_B[b] - 1``. Under a mesh every array is split over the
  ``batch`` mesh axes (``E`` entries and their slots per shard, indices local to the shard)
  and the kv heads over ``tensor`` as the pool's.

  Attributes:
    k_EGHZ: per layer, keys (positions minor).
    v_EGZH: per layer, values.
    page_E: int32 pool page of each entry (the scratch page where no row's).
    row_E: int32 slot of each entry (``B``, an extra segment, where no row's).
    ord_E: int32 which page of its row each entry is.
    start_B: int32 each slot's first entry.
    pages_B: int32 each slot's entries.
    lengths_B: int32 tokens in the cache per slot (the next token's position).
  """

  k_EGHZ: tuple[jax.Array, ...]
  v_EGZH: tuple[jax.Array, ...]
  page_E: jax.Array
  row_E: jax.Array
  ord_E: jax.Array
  start_B: jax.Array
  pages_B: jax.Array
  lengths_B: jax.Array

  @property
  def num_entries(self) -> int:
    """Entries of the list (all shards)."""
    return self.page_E.shape[0]

  def write_attend(self, layer: int, q_BNH, k_BGH, v_BGH) -> tuple[jax.Array, LivePages]:
    """As ``PagedKVCache.write_attend``, on the working copy."""
    q_BNH, k_BGH, v_BGH = map(jnp.asarray, (q_BNH, k_BGH, v_BGH))
    spec = _LiveSpecs(k_BGH.shape[1])
    k, v = _per_shard(
        _write_live, (self.k_EGHZ[layer], self.v_EGZH[layer], k_BGH, v_BGH, self.start_B,
                      self.pages_B, self.lengths_B),
        (spec.entries, spec.entries, spec.heads, spec.heads, spec.slots, spec.slots,
         spec.slots),
        lambda m, bt: (spec.entries(m, bt),) * 2)
    on_cpu = attention.platform(mesh_lib.current_mesh()) == "cpu"
    out_BNH = _per_shard(
        functools.partial(_attend_live, query_once=on_cpu),
        (q_BNH, k, v, self.row_E, self.ord_E, self.lengths_B + 1),
        (spec.heads, spec.entries, spec.entries, spec.slots, spec.slots, spec.slots),
        spec.heads)
    put = lambda pages, x: pages[:layer] + (x,) + pages[layer + 1:]
    return out_BNH, dataclasses.replace(self, k_EGHZ=put(self.k_EGHZ, k),
                                        v_EGZH=put(self.v_EGZH, v))

  def scatter(self, k_pages, v_pages, first_written_B=None, written_pages: int | None = None
              ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The pools ``k_pages``, ``v_pages`` (per layer ``[G, P, Z, H]``) with this copy's pages
    written back.

    ``first_written_B`` (int32, which page of its row each slot wrote first) and the static
    ``written_pages`` (the most pages a slot wrote): only those entries go back, the rest of
    the copy still equals the pool (default: every entry goes back).
    """
    k_pages, v_pages = tuple(map(jnp.asarray, k_pages)), tuple(map(jnp.asarray, v_pages))
    spec, n = _LiveSpecs(k_pages[0].shape[0]), len(k_pages)
    if first_written_B is None:
      first_written_B, written_pages = jnp.zeros_like(self.start_B), None
    return _per_shard(
        functools.partial(_scatter_live, written_pages=written_pages),
        (k_pages, v_pages, self.k_EGHZ, self.v_EGZH, self.page_E, self.start_B,
         jnp.asarray(first_written_B, jnp.int32)),
        ((spec.pool,) * n, (spec.pool,) * n, (spec.entries,) * n, (spec.entries,) * n,
         spec.slots, spec.slots, spec.slots),
        lambda m, bt: ((spec.pool(m, bt),) * n,) * 2)


@dataclasses.dataclass(frozen=True)
class _LiveSpecs:
  """PartitionSpecs (functions of the mesh and its batch axes) of the live-page arrays."""

  num_kv_heads: int

  def pool(self, mesh, batch):
    return PartitionSpec(_heads(mesh, self.num_kv_heads), batch, None, None)

  def entries(self, mesh, batch):
    return PartitionSpec(batch, _heads(mesh, self.num_kv_heads), None, None)

  def heads(self, mesh, batch):
    return PartitionSpec(batch, _heads(mesh, self.num_kv_heads), None)

  def slots(self, mesh, batch):
    return PartitionSpec(batch)


def gather_live(k_pages, v_pages, page_table_BP, lengths_B, pages_B, num_entries: int
                ) -> LivePages:
  """Copies each slot's first ``pages_B`` pages out of the pools into a ``LivePages`` of
  ``num_entries`` (``E``, static) entries per shard.

  Args:
    k_pages, v_pages: per layer ``[G, P, Z, H]``, the pools.
    page_table_BP: int32, pool page of each page of each row (local to its shard).
    lengths_B: int32 tokens in the cache per slot.
    pages_B: int32 entries per slot (clipped to the table's width); their sum over a shard's
      slots must not exceed ``num_entries`` (a slot past it would read fewer of its pages).
    num_entries: static, entries per shard.
  """
  if not isinstance(num_entries, int) or num_entries < 1:
    raise ValueError(f"gather_live: num_entries={num_entries!r} must be a positive integer.")
  k_pages, v_pages = tuple(map(jnp.asarray, k_pages)), tuple(map(jnp.asarray, v_pages))
  page_table_BP, lengths_B, pages_B = map(jnp.asarray, (page_table_BP, lengths_B, pages_B))
  _check_pool(k_pages[0], page_table_BP, lengths_B.shape[0], "gather_live")
  spec, n = _LiveSpecs(k_pages[0].shape[0]), len(k_pages)
  pages_B = jnp.clip(pages_B, 0, page_table_BP.shape[1]).astype(jnp.int32)
  k, v, page_E, row_E, ord_E, start_B = _per_shard(
      functools.partial(_gather_live, num_entries=num_entries),
      (k_pages, v_pages, page_table_BP, pages_B),
      ((spec.pool,) * n, (spec.pool,) * n, lambda m, bt: PartitionSpec(bt, None), spec.slots),
      lambda m, bt: ((spec.entries(m, bt),) * n, (spec.entries(m, bt),) * n)
      + (spec.slots(m, bt),) * 4)
  return LivePages(k, v, page_E, row_E, ord_E, start_B, pages_B, lengths_B.astype(jnp.int32))


def _gather_live(k_pages, v_pages, page_table_BP, pages_B, *, num_entries: int):
  b, width = page_table_BP.shape
  end_B = jnp.cumsum(pages_B)
  start_B = end_B - pages_B
  row_E = jnp.searchsorted(end_B, jnp.arange(num_entries), side="right").astype(jnp.int32)
  live_E = row_E < b  # b: past every row's entries
  ord_E = jnp.where(live_E, jnp.arange(num_entries) - start_B[jnp.minimum(row_E, b - 1)], 0)
  page_E = jnp.where(live_E, page_table_BP[jnp.minimum(row_E, b - 1),
                                           jnp.clip(ord_E, 0, width - 1)], SCRATCH_PAGE)
  keys = tuple(jnp.transpose(k[:, page_E], (1, 0, 3, 2)) for k in k_pages)  # [E, G, H, Z]
  values = tuple(jnp.swapaxes(v[:, page_E], 0, 1) for v in v_pages)  # [E, G, Z, H]
  return keys, values, page_E.astype(jnp.int32), row_E, ord_E.astype(jnp.int32), \
      start_B.astype(jnp.int32)


def _write_live(k_EGHZ, v_EGZH, k_BGH, v_BGH, start_B, pages_B, pos_B):
  """One token per slot at ``pos_B``: entry ``start_B + pos // Z``, offset ``pos % Z``; a
  position past the slot's entries is dropped."""
  z = k_EGHZ.shape[-1]
  page_B = pos_B // z
  entry_B = jnp.where((pos_B >= 0) & (page_B < pages_B), start_B + page_B, k_EGHZ.shape[0])
  offset_B = pos_B % z
  k_EGHZ = k_EGHZ.at[entry_B, :, :, offset_B].set(k_BGH.astype(k_EGHZ.dtype), mode="drop")
  v_EGZH = v_EGZH.at[entry_B, :, offset_B].set(v_BGH.astype(v_EGZH.dtype), mode="drop")
  return k_EGHZ, v_EGZH


def _attend_live(q_BNH, k_EGHZ, v_EGZH, row_E, ord_E, lengths_B, *, query_once: bool = False):
  """Each row's softmax over its own entries (segment max and sum; entries of no row form an
  extra segment). ``query_once``: compute the queries into a buffer before gathering them per
  entry (``layers.computed_once``; for XLA:CPU: fused into the gather, their norm and rotary
  embedding were recomputed for every entry, ~1.4 µs an entry and layer on the ragged
  benchmark's model)."""
  b, n, h = q_BNH.shape
  e, g, _, z = k_EGHZ.shape
  row = jnp.minimum(row_E, b - 1)
  if query_once:
    q_BNH = layers.computed_once(q_BNH, lengths_B)
  q_EGQH = q_BNH[row].reshape(e, g, n // g, h)
  logits_EGQZ = jnp.einsum("EGQH,EGHZ->EGQZ", q_EGQH, k_EGHZ,
                           preferred_element_type=jnp.float32) * (h**-0.5)
  position_EZ = ord_E[:, None] * z + jnp.arange(z)[None]
  valid_EZ = (row_E < b)[:, None] & (position_EZ < lengths_B[row][:, None])
  logits_EGQZ = jnp.where(valid_EZ[:, None, None], logits_EGQZ, jnp.finfo(jnp.float32).min)
  max_BGQ = jax.ops.segment_max(logits_EGQZ.max(-1), row_E, num_segments=b + 1)[:b]
  probs_EGQZ = jnp.where(valid_EZ[:, None, None],
                         jnp.exp(logits_EGQZ - max_BGQ[row][..., None]), 0.0)
  sum_BGQ = jax.ops.segment_sum(probs_EGQZ.sum(-1), row_E, num_segments=b + 1)[:b]
  part_EGQH = jnp.einsum("EGQZ,EGZH->EGQH", probs_EGQZ.astype(v_EGZH.dtype), v_EGZH,
                         preferred_element_type=jnp.float32)
  out_BGQH = jax.ops.segment_sum(part_EGQH, row_E, num_segments=b + 1)[:b]
  out_BGQH = out_BGQH / jnp.maximum(sum_BGQ, jnp.finfo(jnp.float32).tiny)[..., None]
  out_BGQH = jnp.where(lengths_B[:, None, None, None] > 0, out_BGQH, 0.0)
  return out_BGQH.reshape(b, n, h).astype(q_BNH.dtype)


def _scatter_live(k_pages, v_pages, k_EGHZ, v_EGZH, page_E, start_B, first_written_B, *,
                  written_pages: int | None):
  """Entries of no row are written to the scratch page (several at once: any one wins). With
  ``written_pages``, only each slot's ``written_pages`` entries from its first written one (an
  entry past the list, or another row's, goes back unchanged: harmless)."""
  e = page_E.shape[0]
  if written_pages is not None and written_pages * start_B.shape[0] < e:
    entry_W = jnp.clip(start_B[:, None] + first_written_B[:, None]
                       + jnp.arange(written_pages)[None], 0, e - 1).reshape(-1)
    k_EGHZ = tuple(k[entry_W] for k in k_EGHZ)
    v_EGZH = tuple(v[entry_W] for v in v_EGZH)
    page_E = page_E[entry_W]
  k_pages = tuple(p.at[:, page_E].set(jnp.transpose(k, (1, 0, 3, 2)).astype(p.dtype))
                  for p, k in zip(k_pages, k_EGHZ))
  v_pages = tuple(p.at[:, page_E].set(jnp.swapaxes(v, 0, 1).astype(p.dtype))
                  for p, v in zip(v_pages, v_EGZH))
  return k_pages, v_pages
