"""Decode throughput of the tropd_jax sampler vs ``transformers`` ``generate``, same weights.

    JAX_PLATFORMS=cpu python -m tropd_jax.bench.sampler [--batch 16] [--prompt_len 128]
        [--new_tokens 256] [--d_model 512] [--layers 8] [--vocab 32000] [--repeats 2]

Builds a random float32 Qwen3-style model (defaults: ~48M parameters), saves it with
``save_pretrained`` and loads the same file into torch and into JAX. Both decode the same batch
of random equal-length prompts greedily for exactly ``new_tokens`` tokens (no stop token). The
timings cover prefill + decode; ours excludes compilation (a warm-up call, timed separately) and
takes the best of ``--repeats`` calls, and so does torch's (after a short warm-up generate).
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
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  model.save_pretrained(path)
  return transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _time_torch(model, prompts: np.ndarray, new_tokens: int, repeats: int):
  import torch

  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
            eos_token_id=None, min_new_tokens=new_tokens)
  with torch.inference_mode():
    model.generate(ids, max_new_tokens=8, **{**kw, "min_new_tokens": 8})
    best, out = float("inf"), None
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = model.generate(ids, max_new_tokens=new_tokens, **kw)
      best = min(best, time.perf_counter() - t0)
  return best, out[:, prompts.shape[1]:].numpy()


def _time_ours(model, prompts: np.ndarray, new_tokens: int, repeats: int):
  import jax

  from tropd_jax import sampler

  config = sampler.SamplerConfig(
      max_new_tokens=new_tokens, temperature=0.0, length_buckets=(prompts.shape[1],))
  s = sampler.Sampler(model, config)
  rows = prompts.tolist()
  t0 = time.perf_counter()
  jax.block_until_ready(s.rollout(rows))
  warm = time.perf_counter() - t0
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(s.rollout(rows))
    best = min(best, time.perf_counter() - t0)
  return warm - best, best, np.asarray(out.tokens)[:, prompts.shape[1]:], s.stats


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
  p.add_argument("--skip_torch", action="store_true", help="time only the JAX sampler")
  args = p.parse_args(argv)

  import jax
  import torch

  from tropd_jax import models

  rng = np.random.RandomState(0)
  prompts = rng.randint(3, args.vocab, (args.batch, args.prompt_len)).astype(np.int64)
  generated = args.batch * args.new_tokens
  with tempfile.TemporaryDirectory() as path:
    hf = _hf_model(args, path)
    ours = models.from_pretrained(path, dtype="float32")
  print(f"command: python -m tropd_jax.bench.sampler {' '.join(sys.argv[1:] if argv is None else argv)}")
  print(f"model: qwen3 d_model={args.d_model} d_ff={args.d_ff} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} vocab={args.vocab}, "
        f"{ours.cfg.num_params() / 1e6:.1f}M params, float32")
  print(f"batch={args.batch} prompt_len={args.prompt_len} new_tokens={args.new_tokens} greedy, "
        f"no stop; devices: {jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
  compile_s, ours_s, ours_tokens, stats = _time_ours(ours, prompts, args.new_tokens, args.repeats)
  print(f"tropd_jax:    {ours_s:7.2f} s  {generated / ours_s:8.1f} tok/s  "
        f"(compile {compile_s:.1f} s, KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB)")
  if args.skip_torch:
    return
  torch_s, torch_tokens = _time_torch(hf, prompts, args.new_tokens, args.repeats)
  print(f"transformers: {torch_s:7.2f} s  {generated / torch_s:8.1f} tok/s")
  same = (ours_tokens == torch_tokens).all(axis=1)
  print(f"speed-up: {torch_s / ours_s:.2f}x; rows with identical greedy tokens: "
        f"{same.sum()}/{args.batch}")


if __name__ == "__main__":
  main()
