"""Padding after packing: positions computed per real token for a config's step at given lengths.

    python -m benchmarks.packing --config=configs/aime.py [--response_tokens=4048]
        [--prompt_tokens=512] [--seed=0]

Draws a step's sequences as the config shapes them (``prompts_per_step`` prompts, each with
``num_samples`` on-policy and ``guidance.per_prompt`` guided rows): prompt lengths uniform in
[32, 2·prompt_tokens - 32], response lengths exponential with mean ``response_tokens`` cut at
``rollout.max_new_tokens`` (a guided row's response includes its teacher prefix). It packs them
exactly as the trainer does (``batch.pack``) and prints ``train/padding_ratio`` (positions
computed / real tokens) next to what one row per sequence, padded to the step's longest, costs.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv) -> None:
  from tropd_jax import config as config_lib
  from tropd_jax.batch import pack
  from tropd_jax.sampling.rollout import Rollout

  s = config_lib.settings(_CONFIG.value)
  r = s.rollout
  rng = np.random.RandomState(_SEED.value)
  prompt_tokens = _PROMPT_TOKENS.value or s.max_prompt_tokens // 2
  response_tokens = _RESPONSE_TOKENS.value or r.max_new_tokens // 2
  tokens, prompts = [], []
  for _ in range(r.prompts_per_step):
    p = int(rng.randint(32, max(2 * prompt_tokens - 32, 33)))
    for _ in range(r.num_samples + r.guided_per_prompt):
      n = int(min(max(rng.exponential(response_tokens), 1), r.max_new_tokens))
      tokens.append(np.zeros(p + n, np.int32))
      prompts.append(p)
  rollout = Rollout(tokens=tuple(tokens), prompt_lengths=np.asarray(prompts, np.int32),
                    prefix_lengths=np.zeros(len(tokens), np.int32),
                    logp=tuple(np.zeros(len(t) - p, np.float32) for t, p in zip(tokens, prompts)),
                    stopped=np.ones(len(tokens), bool))
  _, stats = pack(rollout, length=s.train.pack_length, rows_multiple=s.train.micro_batch)
  longest = max(len(t) for t in tokens) - 1
  print(f"command: python -m benchmarks.packing {' '.join(sys.argv[1:])}")
  print(f"{len(tokens)} sequences, mean prompt {np.mean(prompts):.0f}, mean response "
        f"{np.mean([len(t) - p for t, p in zip(tokens, prompts)]):.0f} tokens; packed rows of "
        f"{s.train.pack_length}, micro-batches of {s.train.micro_batch}")
  print(f"packed: {stats.rows} rows, {stats.positions} positions for {stats.tokens} tokens: "
        f"train/padding_ratio {stats.padding_ratio:.3f}")
  print(f"one row per sequence padded to the longest ({longest}): "
        f"{len(tokens) * longest / stats.tokens:.3f}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.")
  _RESPONSE_TOKENS = flags.DEFINE_integer("response_tokens", None, "Mean response length.")
  _PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", None, "Mean prompt length.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the drawn lengths.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
