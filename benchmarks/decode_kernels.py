"""What bounds a CPU decode step: the 41.6M benchmark's kernels alone, against the memory rate.

    JAX_PLATFORMS=cpu python -m benchmarks.decode_kernels [--rows 1,4,16,64] [--copies 64]

The shapes of ``benchmarks.decode_vs_transformers`` (hidden 512, 8 heads / 4 kv heads of 64,
vocabulary 32,000), float32, each kernel timed alone (best of several passes):

  stream     a jitted sum over 512 MiB: the rate at which this host reads memory;
  head       ``x[rows, 512] @ W[32000, 512].T`` (the tied head), XLA and, if torch is
             installed, torch (``--rows``: the batch; the decode benchmark's is 16);
  attention  a decode step's two batched products over the live pages, as the engine's XLA
             path computes them (``models.paged_attention``: per page and kv head,
             ``q[2, 64] @ K[64, 64]`` and ``p[2, 64] @ V[64, 64]``; 16 rows of 4 pages):
             ``--copies`` distinct key and value arrays are cycled so that each product reads
             from memory, not from a warm cache, as in a step that also reads the weights;
             timed on both cores and pinned to one (``os.sched_setaffinity``, where the host
             has it).

Each figure is printed with the rate it implies (GFLOP/s, GB/s of operand bytes). A kernel far
below the stream rate at few FLOPs per byte is bound by how the kernel runs (its arithmetic, or
one thread), not by memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _best(fn, args_list, repeats: int) -> float:
  """Best seconds per call of ``fn`` over ``repeats`` passes through ``args_list``."""
  import jax

  jax.block_until_ready(fn(*args_list[0]))
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = [fn(*a) for a in args_list]
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / len(args_list))
  return best


def _attention(copies: int, repeats: int) -> tuple[float, float, int]:
  """Seconds per call of the QK and PV products, and their operand bytes (keys or values)."""
  import jax
  import jax.numpy as jnp

  e, g, q, h, z = 64, 4, 2, 64, 64
  rng = np.random.RandomState(0)
  q_EGQH = jnp.asarray(rng.randn(e, g, q, h).astype(np.float32))
  p_EGQZ = jnp.asarray(rng.rand(e, g, q, z).astype(np.float32))
  keys = [jnp.asarray(rng.randn(e, g, h, z).astype(np.float32)) for _ in range(copies)]
  values = [jnp.asarray(rng.randn(e, g, z, h).astype(np.float32)) for _ in range(copies)]
  qk = jax.jit(lambda a, k: jnp.einsum("EGQH,EGHZ->EGQZ", a, k))
  pv = jax.jit(lambda a, v: jnp.einsum("EGQZ,EGZH->EGQH", a, v))
  t_qk = _best(qk, [(q_EGQH, k) for k in keys], repeats)
  t_pv = _best(pv, [(p_EGQZ, v) for v in values], repeats)
  return t_qk, t_pv, keys[0].nbytes


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--rows", default="1,4,16,64", help="comma-separated batch sizes of the head")
  p.add_argument("--copies", type=int, default=64,
                 help="key/value arrays cycled by the attention timing (4 MiB each)")
  p.add_argument("--repeats", type=int, default=8)
  args = p.parse_args(argv)
  try:
    rows = [int(r) for r in args.rows.split(",")]
  except ValueError:
    sys.exit(f"--rows={args.rows!r} must be comma-separated integers, e.g. 1,16,64.")
  if not rows or min(rows) < 1:
    sys.exit(f"--rows={args.rows!r}: every batch size must be at least 1.")
  if args.copies < 1 or args.repeats < 1:
    sys.exit(f"--copies={args.copies} and --repeats={args.repeats} must be at least 1.")

  import jax
  import jax.numpy as jnp

  from benchmarks import host

  print(f"command: JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')} python -m "
        f"benchmarks.decode_kernels {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
  print(f"jax {jax.__version__} {jax.default_backend()}, cpus {os.cpu_count()}, "
        f"load avg before {os.getloadavg()[0]:.1f}")
  stream = host.stream_bandwidth()
  print(f"stream     {stream / 1e9:6.1f} GB/s (jitted sum over 512 MiB)")

  v, d = 32000, 512
  rng = np.random.RandomState(0)
  heads = [jnp.asarray(rng.randn(v, d).astype(np.float32)) for _ in range(4)]  # 4 x 62.5 MiB
  head = jax.jit(lambda x, w: x @ w.T)
  try:
    import torch
  except ImportError:
    torch = None
  for m in rows:
    x = jnp.asarray(rng.randn(m, d).astype(np.float32))
    t = _best(head, [(x, w) for w in heads], args.repeats)
    line = (f"head       rows {m:3d}: XLA {t * 1e3:6.2f} ms ({2 * m * v * d / t / 1e9:5.1f} GFLOP/s,"
            f" {heads[0].nbytes / t / 1e9:5.1f} GB/s)")
    if torch is not None:
      xt, wt = torch.from_numpy(np.array(x)), [torch.from_numpy(np.array(w)) for w in heads]
      with torch.inference_mode():
        tt = _best(lambda a, b: np.asarray(a @ b.T), [(xt, w) for w in wt], args.repeats)
      line += f"; torch ({torch.get_num_threads()} threads) {tt * 1e3:6.2f} ms"
    print(line)
  del heads

  t_qk, t_pv, nbytes = _attention(args.copies, args.repeats)
  print(f"attention  both cores: QK {t_qk * 1e6:6.1f} us ({nbytes / t_qk / 1e9:5.1f} GB/s), "
        f"PV {t_pv * 1e6:6.1f} us ({nbytes / t_pv / 1e9:5.1f} GB/s) per {nbytes / 2**20:.0f} MiB "
        f"of keys or values")
  if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
    cores = os.sched_getaffinity(0)
    try:
      os.sched_setaffinity(0, {min(cores)})
      t1_qk, t1_pv, _ = _attention(args.copies, args.repeats)
    finally:
      os.sched_setaffinity(0, cores)
    print(f"attention  one core:   QK {t1_qk * 1e6:6.1f} us ({nbytes / t1_qk / 1e9:5.1f} GB/s), "
          f"PV {t1_pv * 1e6:6.1f} us ({nbytes / t1_pv / 1e9:5.1f} GB/s)")
  print(f"load avg after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
