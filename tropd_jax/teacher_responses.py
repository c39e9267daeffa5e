"""The teacher's responses for off-policy guidance (METHOD.md §4), generated ahead of training.

  python -m tropd_jax.teacher_responses --config=configs/aime.py [--config.a.b=value] \
      [--batch_prompts=1024] [--limit=N]

generates a response for every prompt of the run's prompt set that the work directory's cache
(``<workdir>/teacher_responses``) does not hold yet, in large engine batches, and saves each batch
as it finishes: an interrupted command resumes where it stopped, and a run started later finds
the responses there. A run that meets a prompt without a response generates the missing ones of
its next ``guidance.lookahead_steps`` steps at once (``generate``), so responses made ahead keep
the teacher's decoding out of every step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm
from flax import nnx

from tropd_jax import config as config_lib
from tropd_jax import data as data_lib
from tropd_jax import mesh as mesh_lib
from tropd_jax import models, sampling
from tropd_jax import student as student_lib
from tropd_jax.sampling import layout as layout_lib

log = logging.getLogger(__name__)

CACHE = "teacher_responses"
SEED_STEP = 2**30  # The responses' seed: rollout_seed(config.seed, SEED_STEP), no training step.


def cache_path(workdir: str) -> str:
  return f"{workdir.rstrip('/')}/{CACHE}"


def seed_of(run_seed: int) -> int:
  return int(np.random.SeedSequence([run_seed, SEED_STEP]).generate_state(1)[0] % 2**31)


def row_id(prompt_key: int) -> int:
  """The engine row id of a prompt's response: its dataset key mixed into [0, 2**31)."""
  return int(np.random.SeedSequence(prompt_key).generate_state(1)[0] % 2**31)


def all_prompts(config, tokenizer):
  """Every prompt of ``data.train_path`` within the budget, in file order (one pass)."""
  source = data_lib.Source(config.data.train_path)
  fmt = data_lib.PromptFormat.from_config(config.data)
  source.check_field(fmt.prompt_key, "data.prompt_key")
  columns = [k for k in (fmt.prompt_key, fmt.answer_key) if k]
  for unit in source.units:
    for row, record in enumerate(source.read(unit, columns)):
      prompt = data_lib.to_prompt(record, source.key(unit, row), tokenizer, fmt,
                                  source.where(unit, row))
      if prompt is not None:
        yield prompt


def engine(teacher: models.Transformer, settings: config_lib.Settings, tokenizer, vocab_size: int,
           mesh, resident_per_chip: int = 0) -> sampling.Engine:
  """An engine over the teacher with the run's guidance settings, its weights copied into their
  decode layout (``sampling.layout``)."""
  params = nnx.state(teacher, nnx.Param)
  layout, why = layout_lib.choose(
      settings.rollout.decode_layout, weight_bytes=layout_lib.tree_bytes(params),
      kv_bytes_per_chip=0, resident_per_chip=resident_per_chip + layout_lib.chip_bytes(params),
      mesh=mesh, hbm=layout_lib.hbm_bytes(mesh))
  log.info("teacher decode layout: %s (%s)", layout, why)
  with jax.set_mesh(mesh):
    params = jax.jit(lambda p: p, out_shardings=layout_lib.param_shardings(
        params, mesh, layout))(params)
  config = settings.rollout.sampler(stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                                    vocab_size=vocab_size, teacher=True)
  return sampling.Engine((nnx.graphdef(teacher), params), config, mesh=mesh, layout=layout)


def generate(teacher_engine: sampling.Engine, prompts: Sequence[data_lib.Prompt],
             cache: data_lib.TeacherResponseCache, *, seed: int,
             progress: Callable[[int, int], None] | None = None) -> int:
  """Generates and caches the responses of ``prompts`` the cache lacks; returns how many.

  A prompt's response depends on its index in the dataset only (its row id), never on which
  other prompts are generated with it.
  """
  missing = list({p.index: p for p in prompts if cache.get(p.index) is None}.values())
  if not missing:
    return 0
  budget = teacher_engine.config.max_new_tokens
  rows = [sampling.Request(tuple(p.ids), len(p.ids), budget, row_id(p.index)) for p in missing]
  rollout = teacher_engine.generate(rows, seed=seed, progress=progress)
  cache.add({p.index: rollout.completion(i).tolist() for i, p in enumerate(missing)})
  st = teacher_engine.stats
  log.info("generated %d teacher responses: %d tokens in %.0f s (%.0f tokens/s)", len(missing),
           st.tokens, st.seconds, st.tokens / max(st.seconds, 1e-9))
  return len(missing)


def run(config, *, batch_prompts: int = 1024, limit: int = 0) -> dict:
  """Generates every missing response of the run's prompt set; returns counts."""
  settings = config_lib.settings(config)
  if not settings.objective.guidance:
    raise ValueError(f"objective {settings.objective.name!r} uses no guidance: there are no "
                     "teacher responses to generate (use configs/...:tropd or "
                     "--config.objective.guidance=True).")
  if config.data.teacher_response_key:
    raise ValueError(f"data.teacher_response_key={config.data.teacher_response_key!r}: the "
                     "responses come from the data; there is nothing to generate.")
  if batch_prompts < 1:
    raise ValueError(f"--batch_prompts={batch_prompts} must be >= 1.")
  mesh = mesh_lib.make_mesh(settings.mesh)
  s_tok, vocab_size = student_lib.run_tokenizer(config)
  cache = data_lib.TeacherResponseCache(cache_path(config.workdir))
  seed = seed_of(settings.seed)
  t_engine = None
  bar = tqdm.tqdm(unit="prompt", file=sys.stderr, dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  seen = cached = done = tokens = 0
  t0 = time.perf_counter()

  def flush(batch):
    nonlocal t_engine, done, tokens
    if t_engine is None:
      teacher = models.from_pretrained(config.teacher.path, dtype=config.teacher.dtype, mesh=mesh)
      t_engine = engine(teacher, settings, s_tok, vocab_size, mesh)

    def progress(rows, drawn, base=done):
      bar.set_postfix({"generated": base + rows,
                       "tok/s": f"{(tokens + drawn) / (time.perf_counter() - t0):.0f}"},
                      refresh=True)

    done += generate(t_engine, batch, cache, seed=seed, progress=progress)
    tokens += t_engine.stats.tokens

  try:
    batch = []
    for prompt in all_prompts(config, s_tok):
      if limit and seen >= limit:
        break
      seen += 1
      bar.update(1)
      if cache.get(prompt.index) is not None:
        cached += 1
        continue
      batch.append(prompt)
      if len(batch) == batch_prompts:
        flush(batch)
        batch = []
    if batch:
      flush(batch)
  finally:
    bar.close()
  log.info("%d prompts: %d had a cached response, %d generated", seen, cached, done)
  return {"prompts": seen, "generated": done, "tokens": tokens,
          "seconds": time.perf_counter() - t0}


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  counts = run(_CONFIG.value, batch_prompts=_BATCH_PROMPTS.value, limit=_LIMIT.value)
  print(f"{counts['generated']} teacher responses generated for {counts['prompts']} prompts"
        + (f" ({counts['tokens']} tokens, {counts['tokens'] / counts['seconds']:.0f} tokens/s)"
           if counts["generated"] else "") + f"; cache: {cache_path(_CONFIG.value.workdir)}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (path.py[:variant]).")
  _BATCH_PROMPTS = flags.DEFINE_integer("batch_prompts", 1024,
                                        "Prompts per engine call (saved when it finishes).")
  _LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N prompts of the set (0: all).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
