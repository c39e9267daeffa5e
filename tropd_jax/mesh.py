"""Device mesh and the one table that maps logical axes to it.

Every sharding decision in tropd_jax is made here. Parameters and activations
carry *logical* axis names (``embed``, ``mlp``, ``heads``, ...); ``RULES`` maps
each to zero or more mesh axes (``data``, ``fsdp``, ``tensor``). A dimension that
does not divide evenly over its mesh axes is replicated instead (a 2-KV-head
model on ``tensor=4``, a 97-row test vocabulary on ``tensor=2``), so any model
runs on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. One table for parameters and activations.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    "norm": (),
    "topk": (),
}

# The sampler's copy of the weights is laid out for decoding (sampling/layout.py): one token per
# row and step, so an FSDP all-gather of every matrix at every token would dominate. These
# tables replace RULES while the sampler's programs are traced.
DECODE_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    # Weights whole on every chip of the data/fsdp axes (split over tensor only); rows over all
    # of data and fsdp.
    "replicated": {**RULES, "embed": ()},
    # Weights split over fsdp and tensor together (heads, MLP, vocabulary); rows over data only.
    "tensor": {**RULES, "batch": ("data",), "embed": (), "mlp": ("fsdp", "tensor"),
               "heads": ("fsdp", "tensor"), "kv_heads": ("fsdp", "tensor"),
               "vocab": ("fsdp", "tensor")},
}

_ACTIVE_RULES: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar(
    "tropd_mesh_rules", default=RULES)

LogicalAxes = tuple[str | None, ...]


def active_rules() -> Mapping[str, tuple[str, ...]]:
  """The logical-axis table in force (``RULES``, or a decode layout's inside ``use_rules``)."""
  return _ACTIVE_RULES.get()


@contextlib.contextmanager
def use_rules(rules: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
  """Maps logical axes by ``rules`` instead of ``RULES`` within the block (and what it traces)."""
  token = _ACTIVE_RULES.set(rules)
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def batch_shards(mesh) -> int:
  """Devices holding different rows: the product of the ``batch`` axes' sizes (1 without a mesh)."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in active_rules()["batch"])


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 (all remaining devices)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    for name, size in zip(MESH_AXES, sizes):
      if size == 0 or size < -1:
        raise ValueError(f"mesh.{name}={size}: a mesh axis size must be a positive integer or -1.")
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by {known}."
        )
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
          f"but {num_devices} are available; set the sizes so their product is {num_devices}."
      )
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all)."""
  config = config or MeshConfig()
  devices = list(devices if devices is not None else jax.devices())
  shape = config.shape(len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def logical_to_spec(axes: LogicalAxes, shape: Sequence[int], mesh) -> PartitionSpec:
  """The PartitionSpec for a tensor of ``shape`` whose dims are named ``axes``.

  Mesh axes of size 1 are dropped, a mesh axis is used at most once, and a dim
  that does not divide by its mesh axes' product is replicated.
  """
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  rules = active_rules()
  for name, dim in zip(axes, shape):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule in tropd_jax.mesh.RULES")
    mesh_axes = tuple(
        a for a in (rules[name] if name else ()) if mesh.shape[a] > 1 and a not in used
    )
    if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def named_sharding(axes: LogicalAxes, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set with ``jax.set_mesh`` (usable inside jit), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def shard(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Constrains ``x`` to its logical sharding on the current mesh (no-op without one)."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def put(x: np.ndarray | jax.Array, axes: LogicalAxes, mesh: Mesh | None) -> jax.Array:
  """Places a host array on ``mesh`` with its logical sharding (one device without a mesh)."""
  if mesh is None:
    return jax.device_put(x)
  return jax.device_put(x, named_sharding(axes, np.shape(x), mesh))
