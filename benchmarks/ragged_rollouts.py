"""Useful tokens/s of the sampling engine when rows end at different lengths, vs fixed lengths.

    JAX_PLATFORMS=cpu python -m benchmarks.ragged_rollouts [--prompts 1024] [--slots 64]
        [--fixed_tokens 128] [--budget 1024] [--rounds 3] [--host_devices 1]

A tiny Qwen3 (d_model 128, 2 layers, vocabulary 256) whose final norm is zeroed: its logits are
uniform, so at temperature 1 every token is equally likely. Two runs of ``--prompts`` random
prompts (16-48 tokens) through ``sampling.generate`` with ``--slots`` slots:

  fixed      no stop id: every row draws exactly ``--fixed_tokens`` tokens;
  geometric  two stop ids (each drawn with probability 1/128 per token): lengths are
             geometric with mean ~128, cut at ``--budget``.

``--host_devices 2``: the model split over two host devices on a ``tensor`` mesh axis
(``--xla_force_host_platform_device_count=2`` is added to ``XLA_FLAGS`` before jax is imported).

Useful tokens/s = tokens drawn (a final stop id included) / wall time of the call (compilation
excluded: each run is called once before the timed rounds). ``--rounds`` rounds alternate the
two runs (fixed, geometric, fixed, ...) so that a change in the machine's load touches both;
each run's best round is reported. A sampler that decodes every row of a batch until its
longest one ends, over the whole allocated cache, makes a small fraction of the fixed rate on
the geometric run; continuous batching over a paged cache keeps slots busy and attention over
the live length. Here (XLA attention, one batch shard, the default pool) rows are prefilled
ahead, a slot count at a time, and admitted inside the decode loop the step a slot's row ends
(``sampling.engine.decode_admitting``): no slot idles until the host refills it.

Also printed per run: the KV pages decode attention read per step (``EngineStats.
attended_pages``) and the bytes they hold. With geometric lengths a slot is more often held by
a long row than by a short one (a row's chance to be in flight grows with its length), so each
step attends over more cached tokens than in the fixed run: on a model as small as this one,
where attention is a large part of a step, that alone keeps the ratio below 1. And the run's
tail (``EngineStats.drain_*``): after the last refill no slot is refilled, and the steps run at
falling occupancy until the longest remaining row ends (in the geometric run, the longest of 64
geometric remainders); the engine moves the remaining rows into fewer slots as they end
(``EngineStats.compactions``), so the tail's steps cost what its rows need.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import host


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--prompts", type=int, default=1024)
  p.add_argument("--slots", type=int, default=64)
  p.add_argument("--fixed_tokens", type=int, default=128)
  p.add_argument("--budget", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--chunk_steps", type=int, default=64)
  p.add_argument("--page_size", type=int, default=64)
  p.add_argument("--refill_fraction", type=float, default=None,
                 help="SamplerConfig.refill_fraction (default: the library's)")
  p.add_argument("--host_devices", type=int, default=1,
                 help="split the model over this many host devices (a tensor mesh axis)")
  args = p.parse_args(argv)
  n_dev = args.host_devices
  if n_dev not in (1, 2):
    sys.exit(f"--host_devices={n_dev} must be 1 or 2 (the model's 2 kv heads are split over "
             "the devices).")
  host.ask_host_devices(n_dev)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tropd_jax import models, sampling

  mesh = host.host_mesh(n_dev)

  cfg = models.ModelConfig(model_type="qwen3", vocab_size=256, d_model=128, d_ff=256,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True,
                           tie_word_embeddings=True, max_position_embeddings=4096)
  model = models.init_model(cfg, mesh=mesh)
  graphdef, state = nnx.split(model)
  scale = state["final_norm"]["scale"]
  scale.set_value(jnp.zeros_like(scale.get_value()))
  model = nnx.merge(graphdef, state)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, 256, rng.randint(16, 49)).tolist() for _ in range(args.prompts)]
  stops = (1, 2)

  extra = {} if args.refill_fraction is None else {"refill_fraction": args.refill_fraction}

  def run(budget, stop_ids, rows):
    t0 = time.perf_counter()
    gen = sampling.generate(model, rows, budget, temperature=1.0, stop_ids=stop_ids, seed=0,
                            micro_batch_size=args.slots, chunk_steps=args.chunk_steps,
                            page_size=args.page_size, length_buckets=(64,), mesh=mesh,
                            **extra)
    return time.perf_counter() - t0, gen

  print(f"command: JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')} python -m "
        f"benchmarks.ragged_rollouts {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
  print(f"{args.prompts} prompts, {args.slots} slots, page size {args.page_size}, "
        f"at most {args.chunk_steps} decode steps per call; "
        f"jax {jax.devices()[0].platform} x{n_dev}"
        f"{' (tensor mesh)' if mesh is not None else ''}, "
        f"cpus {os.cpu_count()}, load avg before {os.getloadavg()[0]:.1f}")
  runs = (("fixed", args.fixed_tokens, ()), ("geometric", args.budget, stops))
  for _, budget, stop_ids in runs:
    run(budget, stop_ids, prompts)  # the same call first: it compiles every shape it meets
  best = {}
  for _ in range(args.rounds):
    for name, budget, stop_ids in runs:
      seconds, gen = run(budget, stop_ids, prompts)
      if name not in best or seconds < best[name][0]:
        best[name] = (seconds, gen)
  rates = {}
  for name, _, _ in runs:
    seconds, gen = best[name]
    tokens = int(gen.rollout.lengths.sum())
    rates[name] = tokens / seconds
    st = gen.stats
    page_bytes = st.kv_cache_bytes / st.pages  # keys and values of every layer
    print(f"{name:9s} {tokens:8d} tokens in {seconds:6.2f} s: {rates[name]:8.0f} tokens/s "
          f"(mean length {tokens / args.prompts:.0f}, longest {gen.rollout.lengths.max()}; "
          f"{st.decode_steps} decode steps, {seconds / st.decode_steps * 1e3:.2f} ms a step, "
          f"slot occupancy {st.occupancy:.2f}, {st.decode_calls} decode and "
          f"{st.prefill_calls} prefill calls; attention "
          f"read {st.attended_pages:.0f} KV pages a step, "
          f"{st.attended_pages * page_bytes / 2**20:.1f} MiB; pool {st.kv_cache_bytes / 2**20:.1f} "
          f"MiB; after the last refill {st.drain_steps} steps, {st.drain_seconds:.2f} s, "
          f"occupancy {st.drain_occupancy:.2f})")
  print(f"geometric / fixed useful tokens/s: {rates['geometric'] / rates['fixed']:.2f} (best "
        f"of {args.rounds} interleaved rounds each); load avg after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
