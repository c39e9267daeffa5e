"""The host the CPU benchmarks run on: its memory rate, and XLA:CPU host devices on a mesh.

``ask_host_devices`` must run before jax is imported (it sets ``XLA_FLAGS``); the others import
jax themselves.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def stream_bandwidth(mib: int = 512, repeats: int = 5) -> float:
  """Bytes/s at which this host reads memory: a jitted sum over ``mib`` MiB, best of ``repeats``."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((mib * 2**20 // 4 // 1024, 1024), jnp.float32)
  total = jax.jit(lambda a: a.sum(0))
  total(x).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return x.nbytes / best


def ask_host_devices(n: int) -> None:
  """Asks XLA:CPU for ``n`` host devices (unless ``XLA_FLAGS`` already sets a count); before jax
  is imported."""
  if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n}").strip()


def host_mesh(n: int):
  """A mesh with ``tensor=n`` over the first ``n`` host devices (None for one); exits with one
  line if jax sees fewer."""
  import jax

  from tropd_jax import mesh as mesh_lib

  if jax.device_count() < n:
    sys.exit(f"--host_devices={n}: jax sees {jax.device_count()} device(s) (jax was set up "
             "before this benchmark could ask for more, or XLA_FLAGS sets fewer); run it as "
             "its own process, or pass --host_devices 1.")
  if n == 1:
    return None
  return mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, n), devices=jax.devices()[:n])
