"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from hf_fixtures import FAST_COMPILE  # noqa: E402

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()

# One XLA compilation cache for the session, shared with the commands the tests start: the
# suite compiles the same tiny programs in many tests and processes. A new directory each
# session, so no program of an earlier version is ever loaded.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tropd-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """The longest tests (marked ``slow``) start first, so two workers finish together."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
