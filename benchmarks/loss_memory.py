"""Memory and speed of the vocabulary projection in the loss: chunked (scan + remat) vs full logits.

Reproduce (CPU host; libtpu must be installed for the TPU rows, no TPU needed):

    JAX_PLATFORMS=cpu python -m benchmarks.loss_memory

Prints markdown tables of
  1. XLA's compiled memory analysis (from abstract shapes, no data) of the student loss + its
     gradient w.r.t. the hidden states and the vocabulary matrix, and of the teacher's scoring pass,
     at B=1, D=2048, V=151936 (the Qwen3-1.7B head, bf16), T=8192 and T=32768, chunked against full
     logits, compiled for one TPU v5p chip (`jax.experimental.topologies`) and for this CPU; also
     the chunked loss with a float32 master vocabulary matrix (its gradient summed in float32);
  2. for a range of chunk sizes and for full logits, the student loss+grad's TPU temporaries at
     T=32768 and its CPU time per call at B=1, T=1024, D=256, V=32000 (float32).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tropd_jax import objectives, scoring

GiB = 1 << 30
K = 64
CFG = objectives.ObjectiveConfig.preset("tropd", top_k=K)


def student_loss(h_BTD, w_VD, tokens_BT, teacher, completion_BT, prefix_BT, u_BT, *, chunk_size):
  """The training loss from the student's hidden states; `chunk_size=None` projects all at once."""
  if chunk_size is None:
    stats = scoring.student_stats_from_logits(
        scoring.project(h_BTD, w_VD), tokens_BT, teacher, completion_BT, prefix_BT
    )
  else:
    stats = scoring.student_token_stats(
        h_BTD, w_VD, tokens_BT, teacher, completion_BT, prefix_BT, chunk_size=chunk_size
    )
  loss_BT, _ = objectives.per_token_loss(stats, u_BT, CFG)
  return objectives.token_mean(loss_BT, stats.loss_mask)


def teacher_pass(h_BTD, w_VD, tokens_BT, *, chunk_size):
  if chunk_size is None:
    return scoring.teacher_scores_from_logits(scoring.project(h_BTD, w_VD), tokens_BT, K)
  return scoring.score_teacher(h_BTD, w_VD, tokens_BT, top_k=K, chunk_size=chunk_size)


def loss_and_grad(chunk_size):
  return jax.jit(jax.value_and_grad(functools.partial(student_loss, chunk_size=chunk_size), (0, 1)))


def abstract_inputs(T, D, V, dtype, sharding=None):
  """ShapeDtypeStructs of (h, w, tokens) and of the rest of the loss's inputs."""
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  hwt = (spec((1, T, D), dtype), spec((V, D), dtype), spec((1, T), jnp.int32))
  teacher = jax.tree.map(lambda x: spec(x.shape, x.dtype),
                         jax.eval_shape(functools.partial(teacher_pass, chunk_size=T), *hwt))
  rest = (teacher, spec((1, T), jnp.bool_), spec((1, T), jnp.bool_), spec((1, T), jnp.float32))
  return hwt, rest


def memory(fn, args) -> str | tuple[float, float, float]:
  """(temp, argument, output) GiB of `fn` compiled for `args`' shardings, or why it failed."""
  try:
    stats = fn.lower(*args).compile().memory_analysis()
  except Exception as e:  # noqa: BLE001 - reported in the table: compile can fail for size
    return f"fails to compile: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
  return (stats.temp_size_in_bytes / GiB, stats.argument_size_in_bytes / GiB,
          stats.output_size_in_bytes / GiB)


def best_times(fns: dict, args, repeats=10) -> dict[str, float]:
  """Best wall time (s) per call of each of `fns` over `repeats` rounds, after a warm-up.

  The calls are interleaved so that every function sees the same load on a shared machine.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  best = dict.fromkeys(fns, float("inf"))
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def tpu_sharding():
  """A replicated sharding over one chip of a v5p topology (the smallest libtpu describes)."""
  topology = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  return NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), P())


def fmt(result):
  if isinstance(result, str):
    return f"| {result} | | |"
  return "| " + " | ".join(f"{x:.3f}" for x in result) + " |"


def memory_table(platforms, lengths, chunk_size, D, V):
  print("## Compiled memory (GiB), B=1, D=%d, V=%d, bf16, K=%d\n" % (D, V, K))
  print("| platform | pass | T | path | temp | argument | output |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for platform, sharding in platforms.items():
    for T in lengths:
      (h, w, tokens), rest = abstract_inputs(T, D, V, jnp.bfloat16, sharding)
      master_w = jax.ShapeDtypeStruct(w.shape, jnp.float32, sharding=sharding)
      for path, C, w_VD in ((f"chunked C={chunk_size}", chunk_size, w),
                            (f"chunked C={chunk_size}, f32 master w", chunk_size, master_w),
                            ("full logits", None, w)):
        print(f"| {platform} | student loss+grad | {T} | {path} "
              + fmt(memory(loss_and_grad(C), (h, w_VD, tokens, *rest))), flush=True)
      for path, C in ((f"chunked C={chunk_size}", chunk_size), ("full logits", None)):
        fn = jax.jit(functools.partial(teacher_pass, chunk_size=C))
        print(f"| {platform} | teacher scoring | {T} | {path} " + fmt(memory(fn, (h, w, tokens))),
              flush=True)
  print()


def concrete_inputs(T, D, V, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  h = jax.random.normal(keys[0], (1, T, D))
  w = jax.random.normal(keys[1], (V, D)) / np.sqrt(D)
  tokens = jax.random.randint(keys[2], (1, T), 0, V)
  teacher_w = jax.random.normal(keys[4], (V, D)) / np.sqrt(D)
  teacher = jax.jit(functools.partial(teacher_pass, chunk_size=256))(
      jax.random.normal(keys[3], (1, T, D)), teacher_w, tokens)
  ones = jnp.ones((1, T), bool)
  return h, w, tokens, teacher, ones, ~ones, jax.random.uniform(keys[5], (1, T))


def speed_table(chunk_size, chunk_sizes, tpu, T, D, V, cpu_shape):
  """Student loss+grad: TPU temporaries at length T and CPU time at `cpu_shape`, per chunk size."""
  cpu_T, cpu_D, cpu_V = cpu_shape
  print(f"## Student loss+grad per chunk size: TPU v5p temp (T={T}, D={D}, V={V}, bf16) and CPU "
        f"time per call (B=1, T={cpu_T}, D={cpu_D}, V={cpu_V}, f32; best of 10, interleaved)\n")
  print("| path | TPU temp GiB | CPU ms | CPU vs full |")
  print("| --- | --- | --- | --- |")
  (h, w, tokens), rest = abstract_inputs(T, D, V, jnp.bfloat16, tpu)
  sizes = {f"chunked C={C}" + (" (default)" if C == chunk_size else ""): C
           for C in sorted({*chunk_sizes, chunk_size})}
  sizes["full logits"] = None
  times = best_times({name: loss_and_grad(C) for name, C in sizes.items()},
                     concrete_inputs(*cpu_shape))
  for name, C in sizes.items():
    result = memory(loss_and_grad(C), (h, w, tokens, *rest)) if tpu else "n/a"
    temp = result if isinstance(result, str) else f"{result[0]:.3f}"
    ratio = times[name] / times["full logits"]
    print(f"| {name} | {temp} | {1e3 * times[name]:.1f} | {ratio:.2f}x |", flush=True)
  print()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunk_size", type=int, default=scoring.DEFAULT_CHUNK_SIZE)
  parser.add_argument("--sweep", default="128,256,512,1024", help="chunk sizes to compare")
  parser.add_argument("--lengths", default="8192,32768")
  args = parser.parse_args(argv)
  print("Command: JAX_PLATFORMS=cpu python -m benchmarks.loss_memory "
        + shlex.join(sys.argv[1:] if argv is None else argv) + "\n")
  D, V = 2048, 151936
  cpu_shape = (1024, 256, 32000)
  try:
    tpu = tpu_sharding()
  except Exception as e:  # noqa: BLE001 - the CPU rows are still worth printing
    print(f"No TPU topology ({type(e).__name__}: {e}); CPU rows only.\n")
    tpu = None
  platforms = {"tpu v5p (1 chip)": tpu} if tpu else {}
  platforms["cpu"] = None
  lengths = [int(x) for x in args.lengths.split(",")]
  memory_table(platforms, lengths, args.chunk_size, D, V)
  sweep = [int(x) for x in args.sweep.split(",")]
  speed_table(args.chunk_size, sweep, tpu, lengths[-1], D, V, cpu_shape)


if __name__ == "__main__":
  main()
