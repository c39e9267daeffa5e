"""Decode throughput of the sampling engine vs ``transformers`` ``generate``, same weights.

    JAX_PLATFORMS=cpu python -m benchmarks.decode_vs_transformers [--batch 16] [--prompt_len 128]
        [--new_tokens 256] [--rounds 5] [--host_devices 2]

Builds a random float32 Qwen3-shaped model (defaults: hidden 512, 8 layers, 8 heads / 4 kv heads,
vocabulary 32,000, tied: 41.5M parameters), saves it with ``save_pretrained`` and loads the same
file into torch and into JAX. Both decode the same batch of random equal-length prompts greedily
for exactly ``new_tokens`` tokens (no stop token). Rounds alternate between the engines in one
process (ours, ours split, torch, ours, ...) so that a change in the machine's load affects
each; each engine's best round is reported (five rounds by default: on a shared host one round
in three can run 10-20 % slow):

  total   prefill + decode: generated tokens over the wall time of a call;
  decode  the ``new_tokens - 1`` tokens after the first, over the time a call takes beyond a
          1-token call (prefill and the first token excluded).

Ours runs twice per round: on one XLA:CPU device, and split over ``--host_devices`` host
devices (default 2; ``XLA_FLAGS=--xla_force_host_platform_device_count``, set here before jax
is imported; a ``tensor`` mesh axis of that size, decode layout ``replicated``: heads, MLP and
vocabulary split over the devices, one all-reduce per layer). XLA:CPU runs one device's
program one operation at a time, and attention's small products and the other small
operations of a step use a single core; devices run their programs side by side, so a split
keeps every core busy (transformers runs torch's intra-op threads, ``torch threads`` below).
``--host_devices 1`` runs the single device only.

Our timings exclude compilation (a warm-up call; its time is printed). Measure on a quiet
machine: torch slows down more than XLA when other processes share the cores.

Last, what memory allows: a decode step reads every weight once and the keys and values of
every row's live tokens. Those bytes over the rate at which this host streams memory (a jitted
sum over 512 MiB, best of 5) bound a step's time from below, whatever the engine; the bound is
printed as tokens/s and as a multiple of transformers' decode rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks import host


def _hf_model(args, path: str):
  import torch
  import transformers

  cfg = transformers.Qwen3Config(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, head_dim=args.d_model // args.heads,
      max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
  )
  torch.manual_seed(0)
  transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(path)
  return transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _torch_runner(model, prompts: np.ndarray):
  import torch

  ids = torch.tensor(prompts)

  def run(n):
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompts.shape[1]:].numpy()

  return run


def _our_runner(model, prompts: np.ndarray, args, mesh=None):
  from tropd_jax import sampling

  rows = prompts.tolist()
  on_mesh = {} if mesh is None else {"mesh": mesh, "layout": "replicated"}

  def run(n):
    gen = sampling.generate(model, rows, n, micro_batch_size=len(rows),
                            chunk_steps=args.chunk_steps, page_size=args.page_size,
                            length_buckets=(prompts.shape[1],), **on_mesh)
    return np.asarray(gen.completion_ids), gen.stats

  return run


def _timed(fn, n):
  t0 = time.perf_counter()
  out = fn(n)
  return time.perf_counter() - t0, out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=1536)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--chunk_steps", type=int, default=64)
  p.add_argument("--page_size", type=int, default=64)
  p.add_argument("--host_devices", type=int, default=2,
                 help="also run ours split over this many host devices (1: one device only)")
  args = p.parse_args(argv)
  n_dev = args.host_devices
  split_sizes = {"heads": args.heads, "kv_heads": args.kv_heads, "d_ff": args.d_ff,
                 "vocab": args.vocab}
  if n_dev < 1 or any(size % n_dev for size in split_sizes.values()):
    sys.exit(f"--host_devices={n_dev} must be at least 1 and divide "
             + ", ".join(f"--{k}={v}" for k, v in split_sizes.items())
             + " (they are split over the devices).")
  host.ask_host_devices(n_dev)

  import jax
  import torch

  from tropd_jax import models

  mesh = host.host_mesh(n_dev)
  rng = np.random.RandomState(0)
  prompts = rng.randint(3, args.vocab, (args.batch, args.prompt_len)).astype(np.int64)
  with tempfile.TemporaryDirectory() as path:
    hf = _hf_model(args, path)
    ours = models.from_pretrained(path, dtype="float32")
    split = None if mesh is None else models.from_pretrained(path, dtype="float32", mesh=mesh)
  argv_text = " ".join(sys.argv[1:] if argv is None else argv)
  print(f"command: JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')} "
        f"python -m benchmarks.decode_vs_transformers {argv_text}".rstrip())
  print(f"model: qwen3 d_model={args.d_model} d_ff={args.d_ff} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} vocab={args.vocab} (tied), "
        f"{ours.cfg.num_params() / 1e6:.1f}M params, float32 weights")
  print(f"batch={args.batch} prompt_len={args.prompt_len} new_tokens={args.new_tokens}, greedy, "
        f"no stop; jax {jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load avg before {os.getloadavg()[0]:.1f}")
  b, n = args.batch, args.new_tokens
  runs = {"ours": _our_runner(ours, prompts, args)}
  labels = {"ours": "tropd_jax x1"}
  if mesh is not None:
    runs["split"] = _our_runner(split, prompts, args, mesh)
    labels["split"] = f"tropd_jax x{n_dev}"
  runs["torch"], labels["torch"] = _torch_runner(hf, prompts), "transformers"
  compile_s = {}
  for name in runs:
    t0 = time.perf_counter()
    runs[name](1)
    runs[name](n if name != "torch" else 8)
    compile_s[name] = time.perf_counter() - t0
  best = {name: [np.inf, np.inf] for name in runs}
  outs = {}
  for _ in range(args.rounds):
    for name, run in runs.items():
      first_s, _ = _timed(run, 1)
      total_s, out = _timed(run, n)
      best[name][0] = min(best[name][0], total_s)
      best[name][1] = min(best[name][1], total_s - first_s)
      outs[name] = out
  stats = outs["ours"][1]

  def line(name, extra=""):
    total_s, decode_s = best[name]
    print(f"{labels[name]:13s} total {total_s:6.2f} s {b * n / total_s:7.1f} tok/s | decode "
          f"{decode_s:6.2f} s {b * (n - 1) / decode_s:7.1f} tok/s {extra}")

  line("ours", f"(compile {compile_s['ours']:.1f} s; KV pages "
       f"{stats.kv_cache_bytes / 2**20:.1f} MiB float32, {stats.decode_calls} decode calls)")
  if "split" in runs:
    line("split", f"(compile {compile_s['split']:.1f} s; mesh tensor={n_dev}, heads, MLP and "
         "vocabulary split over the devices)")
  line("torch")
  for name in [k for k in runs if k != "torch"]:
    same = (outs[name][0] == outs["torch"]).all(axis=1).sum()
    print(f"speed-up of {labels[name]} (transformers time / ours): total "
          f"{best['torch'][0] / best[name][0]:.2f}x, decode {best['torch'][1] / best[name][1]:.2f}x;"
          f" rows with identical greedy tokens: {same}/{b}")
  print(f"load avg after {os.getloadavg()[0]:.1f}")
  token_kv = stats.kv_cache_bytes / (stats.pages * args.page_size)  # every layer's k and v
  weights = ours.cfg.num_params() * 4
  live = b * (args.prompt_len + (n - 1) / 2) * token_kv  # mean over the decode steps
  read = stats.attended_pages * stats.kv_cache_bytes / stats.pages
  bandwidth = host.stream_bandwidth()
  floor_s = (weights + live) / bandwidth
  torch_rate = b * (n - 1) / best["torch"][1]
  print(f"memory per decode step: weights {weights / 2**20:.0f} MiB, live keys and values "
        f"{live / 2**20:.0f} MiB (ours read {read / 2**20:.0f} MiB: whole pages, and the call's "
        f"next steps' positions); this host streams {bandwidth / 1e9:.1f} GB/s: a step takes at "
        f"least {floor_s * 1e3:.1f} ms, {b / floor_s:.0f} tok/s at most, "
        f"{b / floor_s / torch_rate:.2f}x transformers' decode rate")


if __name__ == "__main__":
  main()
