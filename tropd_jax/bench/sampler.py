"""Decode throughput of the tropd_jax sampler vs ``transformers`` ``generate``, same weights.

    JAX_PLATFORMS=cpu python -m tropd_jax.bench.sampler [--batch 16] [--prompt_len 128]
        [--new_tokens 256] [--d_model 512] [--layers 8] [--vocab 32000] [--repeats 2]
        [--cache_dtype bfloat16]

Builds a random float32 Qwen3-style model (defaults: ~48M parameters), saves it with
``save_pretrained`` and loads the same file into torch and into JAX. Both decode the same batch
of random equal-length prompts greedily for exactly ``new_tokens`` tokens (no stop token).

Two numbers per engine, best of ``--repeats`` calls each: ``total`` (prefill + decode, the
generated tokens over the wall time) and ``decode`` (the ``new_tokens - 1`` tokens after the
first, over the time a ``new_tokens`` call takes beyond a 1-token call, i.e. without prefill).
Our timings exclude compilation (warm-up calls; the compile time is printed apart); torch gets
a warm-up generate too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


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


def _best(fn, repeats: int):
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def _time_torch(model, prompts: np.ndarray, new_tokens: int, repeats: int):
  import torch

  ids = torch.tensor(prompts)

  def run(n):
    with torch.inference_mode():
      return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)

  run(8)
  first_s, _ = _best(lambda: run(1), repeats)
  total_s, out = _best(lambda: run(new_tokens), repeats)
  return total_s, first_s, out[:, prompts.shape[1]:].numpy()


def _time_ours(model, prompts: np.ndarray, new_tokens: int, repeats: int, cache_dtype):
  import jax

  from tropd_jax import sampler

  rows = prompts.tolist()

  def make(n):
    config = sampler.SamplerConfig(max_new_tokens=n, temperature=0.0, cache_dtype=cache_dtype,
                                   length_buckets=(prompts.shape[1],))
    s = sampler.Sampler(model, config)
    t0 = time.perf_counter()
    jax.block_until_ready(s.rollout(rows))
    return s, time.perf_counter() - t0

  one, _ = make(1)
  full, warm_s = make(new_tokens)
  first_s, _ = _best(lambda: jax.block_until_ready(one.rollout(rows)), repeats)
  total_s, out = _best(lambda: jax.block_until_ready(full.rollout(rows)), repeats)
  return total_s, first_s, warm_s - total_s, np.asarray(out.tokens)[:, prompts.shape[1]:], full.stats


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--cache_dtype", default=None, help="our KV-cache dtype (default: float32)")
  p.add_argument("--skip_torch", action="store_true", help="time only the JAX sampler")
  args = p.parse_args(argv)

  import jax
  import torch

  from tropd_jax import models

  rng = np.random.RandomState(0)
  prompts = rng.randint(3, args.vocab, (args.batch, args.prompt_len)).astype(np.int64)
  with tempfile.TemporaryDirectory() as path:
    hf = _hf_model(args, path)
    ours = models.from_pretrained(path, dtype="float32")
  argv_text = " ".join(sys.argv[1:] if argv is None else argv)
  print(f"command: JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')} "
        f"python -m tropd_jax.bench.sampler {argv_text}".rstrip())
  print(f"model: qwen3 d_model={args.d_model} d_ff={args.d_ff} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} vocab={args.vocab} (tied), "
        f"{ours.cfg.num_params() / 1e6:.1f}M params, float32 weights")
  print(f"batch={args.batch} prompt_len={args.prompt_len} new_tokens={args.new_tokens}, greedy, "
        f"no stop; jax {jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.1f}")

  b, n = args.batch, args.new_tokens

  def line(name, total_s, first_s, extra=""):
    decode_s = total_s - first_s
    print(f"{name:13s} total {total_s:6.2f} s {b * n / total_s:7.1f} tok/s | decode "
          f"{decode_s:6.2f} s {b * (n - 1) / decode_s:7.1f} tok/s {extra}")
    return total_s, decode_s

  total, first, compile_s, our_tokens, stats = _time_ours(
      ours, prompts, n, args.repeats, args.cache_dtype)
  ours_t = line("tropd_jax", total, first,
                f"(compile {compile_s:.1f} s; KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB "
                f"{args.cache_dtype or 'float32'})")
  if args.skip_torch:
    return
  total, first, torch_tokens = _time_torch(hf, prompts, n, args.repeats)
  torch_t = line("transformers", total, first)
  same = (our_tokens == torch_tokens).all(axis=1).sum()
  print(f"speed-up (transformers time / ours): total {torch_t[0] / ours_t[0]:.2f}x, "
        f"decode {torch_t[1] / ours_t[1]:.2f}x; rows with identical greedy tokens: {same}/{b}")


if __name__ == "__main__":
  main()
