"""The sampler's copy of the weights, laid out for decoding.

Training keeps the weights FSDP-sharded: each matrix is gathered when a layer runs. A decode
step runs every layer for one token per row, so that layout would move the whole model over
the interconnect at every token. Once per step the sampler instead gets its own copy in the
compute dtype, in one of two layouts (``mesh.DECODE_RULES``):

  replicated  every matrix whole on each chip of the data/fsdp axes (split over ``tensor``
              only); rows split over data and fsdp. No collective in the decode loop.
  tensor      heads, MLP and vocabulary split over fsdp and tensor together; rows over data
              only. One all-reduce of ``[B, D]`` activations per layer and step.

``choose`` picks ``replicated`` when the copy and the KV pages fit in a chip's HBM beside what
stays resident (the training state, the teacher), else ``tensor``.
"""

from __future__ import annotations

import logging
import math

import jax

from tropd_jax import mesh as mesh_lib

log = logging.getLogger(__name__)

LAYOUTS = ("replicated", "tensor")
# Fraction of HBM the decode copy, the KV pages and what stays resident may fill together.
HBM_FRACTION = 0.85


def tree_bytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``, whole (not per chip)."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def chip_bytes(tree) -> int:
  """Bytes of ``tree`` on one chip: each leaf's shard (leaves need a sharding)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def hbm_bytes(mesh) -> int | None:
  """HBM per device as the runtime reports it (None on a CPU, or when it does not say)."""
  if mesh is None:
    return None
  device = mesh.devices.flat[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
    return None
  return (stats or {}).get("bytes_limit")


def choose(requested: str, *, weight_bytes: int, kv_bytes_per_chip: int, resident_per_chip: int,
           mesh, hbm: int | None) -> tuple[str, str]:
  """The decode layout and why it was chosen.

  Args:
    requested: ``auto`` or one of ``LAYOUTS``.
    weight_bytes: bytes of the whole model in the compute dtype.
    kv_bytes_per_chip: bytes of one chip's share of the KV pages.
    resident_per_chip: bytes that stay on each chip while sampling (training state, teacher).
    mesh: the device mesh.
    hbm: HBM per chip; None: unknown (a CPU), and ``auto`` replicates.
  """
  if requested in LAYOUTS:
    return requested, "set by rollout.decode_layout"
  if requested != "auto":
    raise ValueError(f"decode layout {requested!r} is not one of {('auto',) + LAYOUTS}.")
  tensor = 1 if mesh is None else mesh.shape["tensor"]
  replicated = weight_bytes / tensor + kv_bytes_per_chip + resident_per_chip
  if hbm is None:
    return "replicated", "HBM unknown (no accelerator)"
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  if replicated <= HBM_FRACTION * hbm:
    return "replicated", (f"weights {gib(weight_bytes / tensor)} + KV {gib(kv_bytes_per_chip)} "
                          f"+ resident {gib(resident_per_chip)} per chip fit "
                          f"{HBM_FRACTION:.0%} of {gib(hbm)}")
  return "tensor", (f"weights {gib(weight_bytes / tensor)} + KV {gib(kv_bytes_per_chip)} + "
                    f"resident {gib(resident_per_chip)} per chip exceed {HBM_FRACTION:.0%} "
                    f"of {gib(hbm)}")


def kv_head_shards(mesh, rules, num_kv_heads: int) -> int:
  """Chips that split ``num_kv_heads`` kv heads under the logical-axis table ``rules``."""
  if mesh is None:
    return 1
  with mesh_lib.use_rules(rules):
    spec = mesh_lib.logical_to_spec(("kv_heads",), (num_kv_heads,), mesh)[0]
  axes = () if spec is None else spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[a] for a in axes)


def pool_shards(mesh, layout: str, num_kv_heads: int) -> int:
  """Chips that split the KV pool in ``layout``: its rows over the ``batch`` axes, its kv heads
  over the axes they divide."""
  if mesh is None:
    return 1
  rules = mesh_lib.DECODE_RULES[layout]
  with mesh_lib.use_rules(rules):
    rows = mesh_lib.batch_shards(mesh)
  return rows * kv_head_shards(mesh, rules, num_kv_heads)


def param_shardings(params, mesh, layout: str):
  """Shardings of the sampler's copy of ``params`` (an ``nnx.State`` of Params) in ``layout``."""
  from tropd_jax import models

  with mesh_lib.use_rules(mesh_lib.DECODE_RULES[layout]):
    return models.param_shardings(params, mesh)


def abstract_copy(params, mesh, layout: str, dtype=None):
  """ShapeDtypeStructs of the sampler's copy of ``params`` (``nnx.Param``s of arrays or
  ShapeDtypeStructs): in ``layout``, floating leaves in ``dtype`` (default: their own)."""
  from flax import nnx
  import jax.numpy as jnp

  def one(sharding, var):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    floating = jnp.issubdtype(value.dtype, jnp.floating)
    sds = jax.ShapeDtypeStruct(value.shape, dtype if dtype and floating else value.dtype,
                               sharding=sharding)
    return var.replace(sds) if isinstance(var, nnx.Variable) else sds

  return jax.tree.map(one, param_shardings(params, mesh, layout), params,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
