"""The distillation loop: sample → teacher scores → update → log → checkpoint → evaluate.

Holds no math: every array computation is in the jitted phases of
``train_step`` and ``sampler``; this module moves data between them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import cli
from tropd_jax import config as config_lib
from tropd_jax import data as data_lib
from tropd_jax import evaluate as evaluate_lib
from tropd_jax import mesh as mesh_lib
from tropd_jax import metrics as metrics_lib
from tropd_jax import models
from tropd_jax import run_guard, stopping
from tropd_jax import train_step as ts
from tropd_jax.sampler import Rollout, Sampler, SamplerConfig, concat_rollouts

log = logging.getLogger(__name__)


PLOT_FILE = "metrics.png"
PLOT_KEYS = ("eval/avg@k", "trust_frac", "grad_norm")
"""What the end-of-run plot ``<workdir>/metrics.png`` shows over steps (those that were logged)."""


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass
class Run:
  """Everything a run holds between steps."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  tokenizer: models.Tokenizer
  vocab_size: int
  student: models.Transformer
  teacher: models.Transformer
  stream: data_lib.PromptStream
  teacher_cache: data_lib.TeacherResponseCache | None
  state: ts.TrainState
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  key: jax.Array


def guidance_fraction(step: int, total_steps: int) -> float:
  """α_i = (1 + cos(π i / S)) / 2: the teacher-prefix fraction at step i (METHOD.md §4).

  ``total_steps`` is the run's ``schedule_steps``; a run extended past it goes on with α = 0.
  """
  return (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2.0


def guidance_prefix(response: Sequence[int], alpha: float,
                    stop_ids: Sequence[int]) -> tuple[int, ...]:
  """``y^T[:⌊α·|y^T|⌋]`` of a teacher response, its closing stop tokens left out of ``y^T``.

  A generated response ends with the end-of-turn token; a prefix that held it would have the
  student continue past the end of the turn. Without it, a full prefix (α = 1 at step 0) leaves
  the student to close the turn itself, as with a response read from the data.
  """
  end = len(response)
  while end and response[end - 1] in stop_ids:
    end -= 1
  return tuple(response[: int(alpha * end)])


def to_host(x) -> np.ndarray:
  """A global array on every process's host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def global_batch(stream: data_lib.PromptStream) -> list[data_lib.Prompt]:
  """The step's prompts from every process, in process order (each reads its own shard)."""
  local = next(stream)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  positions = multihost_utils.process_allgather(np.asarray([stream.position(p) for p in local]))
  return [stream.prompts[int(i)] for i in np.asarray(positions).reshape(-1)]


@cli.reads_user_input
def setup(config: ml_collections.ConfigDict) -> Run:
  """Validates the config (against the run in its work directory), loads models and data,
  restores the newest good checkpoint, then records the config (``run_guard``)."""
  config = run_guard.prepare(config)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**config.mesh))
  t_tok = models.load_tokenizer(config.teacher.path)
  s_tok = models.load_tokenizer(config.student.path)
  vocab_size = models.check_same_tokenizer(
      t_tok, s_tok, models.load_config(config.teacher.path).vocab_size,
      models.load_config(config.student.path).vocab_size)
  prompts, _ = data_lib.load_prompts(
      config.data.train_path, s_tok, prompt_key=config.data.prompt_key,
      answer_key=config.data.answer_key, teacher_response_key=config.data.teacher_response_key,
      system_prompt=config.data.system_prompt, max_prompt_tokens=config.data.max_prompt_tokens)
  run_guard.check_prompt_supply(config, len(prompts))
  stream = data_lib.PromptStream(
      prompts, prompts_per_step=config.rollout.prompts_per_step, seed=config.seed,
      shuffle=config.data.shuffle, num_epochs=config.data.num_epochs)
  student = models.from_pretrained(config.student.path, dtype=config.student.dtype, mesh=mesh,
                                   remat=config.student.remat,
                                   attention_impl=config.attention_impl)
  teacher = models.from_pretrained(config.teacher.path, dtype=config.teacher.dtype, mesh=mesh,
                                   attention_impl=config.attention_impl)
  obj = config_lib.objective_config(config)
  teacher_cache = None
  if obj.guidance and not config.data.teacher_response_key:
    teacher_cache = data_lib.TeacherResponseCache(f"{config.workdir}/teacher_responses.jsonl")

  tx = optimizer_from_config(config)
  params = nnx.state(student, nnx.Param)
  opt_shardings = ts.opt_state_shardings(tx, params)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = ts.TrainState(params, opt_state, mesh_lib.put(np.zeros((), np.int32), (), mesh))
  checkpointer = ckpt_lib.Checkpointer(
      f"{config.workdir}/checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save)
  key = jax.random.key_data(jax.random.key(config.seed))
  restored = checkpointer.restore_newest_good(
      ckpt_lib.abstract_like(dataclasses.asdict(state)), set_aside=True)
  if restored is not None:
    step, tree, meta = restored
    state = ts.TrainState(**tree)
    stream.restore(meta["data"])
    log.info("resumed from step %d in %s", step, config.workdir)
  nnx.update(student, state.params)
  run_guard.record_run_config(config)
  writer = metrics_lib.MetricsWriter(config.workdir, purge_step=restored[0] + 1 if restored else 0)
  return Run(config, mesh, s_tok, vocab_size, student, teacher, stream, teacher_cache, state,
             checkpointer, writer, key)


def optimizer_from_config(config):
  """The run's optax transformation (AdamW, clipping, schedule) from ``config.train``."""
  t = config.train
  return ts.make_optimizer(lr=t.lr, schedule=t.schedule, warmup_steps=t.warmup_steps,
                           steps=config_lib.schedule_steps(config), weight_decay=t.weight_decay,
                           b1=t.b1, b2=t.b2, grad_clip=t.grad_clip)


def sampler_config(config, *, stop_ids, pad_id: int, vocab_size: int, max_new_tokens=None,
                   temperature=None) -> SamplerConfig:
  """The run's sampler settings (``config.rollout``); the teacher's guidance overrides two."""
  r = config.rollout
  return SamplerConfig(
      max_new_tokens=max_new_tokens or r.max_new_tokens,
      temperature=r.temperature if temperature is None else temperature,
      top_p=r.top_p, top_k=r.top_k, stop_ids=tuple(stop_ids),
      length_buckets=tuple(r.prompt_buckets), micro_batch_size=r.micro_batch,
      pad_id=pad_id, vocab_size=vocab_size, cache_dtype=config.student.compute_dtype)


def _run_sampler_config(run: Run, **overrides) -> SamplerConfig:
  """``sampler_config`` with the run's tokenizer and vocabulary."""
  return sampler_config(run.config, stop_ids=run.tokenizer.stop_ids, pad_id=run.tokenizer.pad_id,
                        vocab_size=run.vocab_size, **overrides)


def _compute_model(model: models.Transformer, dtype: str) -> models.Transformer:
  """``model`` itself if it is in ``dtype``, else a cast copy for sampling (same shardings)."""
  if model.cfg.dtype == dtype:
    return model
  graphdef, state = nnx.split(model)
  cast = jax.jit(lambda s: jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, s))
  return nnx.merge(graphdef, cast(state))


def teacher_responses(run: Run, prompts: list[data_lib.Prompt]) -> list[tuple[int, ...]]:
  """Each prompt's teacher response: from the data, the cache, or generated now and cached."""
  if prompts[0].teacher_ids is not None:
    return [p.teacher_ids for p in prompts]
  missing = [p for p in prompts if run.teacher_cache.get(p.index) is None]
  if missing:
    cfg = run.config
    sampler = Sampler(run.teacher, _run_sampler_config(
        run, max_new_tokens=cfg.guidance.max_teacher_tokens,
        temperature=cfg.guidance.teacher_temperature), mesh=run.mesh)
    rollout = sampler.rollout([p.ids for p in missing], n=1, seed=cfg.seed + 1)
    tokens, mask = to_host(rollout.tokens), to_host(rollout.completion_mask)
    run.teacher_cache.add({p.index: row[m].tolist() for p, row, m in zip(missing, tokens, mask)})
  return [run.teacher_cache.get(p.index) for p in prompts]


def sample(run: Run, prompts: list[data_lib.Prompt], step: int) -> tuple[Rollout, dict]:
  """On-policy rollouts (n per prompt) plus guided ones; rows prompt-major, guided last."""
  cfg = run.config
  obj = config_lib.objective_config(cfg)
  model = _compute_model(run.student, cfg.student.compute_dtype)
  sampler = Sampler(model, _run_sampler_config(run), mesh=run.mesh)
  ids = [p.ids for p in prompts]
  n = cfg.rollout.num_samples
  rollouts = [sampler.rollout(ids, n=n, seed=step)]
  info = {"sampler/kv_cache_gib": sampler.stats.kv_cache_bytes / 2**30}
  if obj.guidance and cfg.guidance.per_prompt:
    alpha = guidance_fraction(step, config_lib.schedule_steps(cfg))
    prefixes = [guidance_prefix(r, alpha, run.tokenizer.stop_ids)
                for r in teacher_responses(run, prompts)]
    rollouts.append(sampler.rollout(ids, prefixes, n=cfg.guidance.per_prompt, seed=step,
                                    row_offset=len(ids) * n))
    info["guidance/alpha"] = alpha
  info["sampler/compilations"] = sampler.stats.num_compilations
  return concat_rollouts(rollouts, run.tokenizer.pad_id), info


def to_batch(rollout: Rollout, mesh) -> ts.Batch:
  s = rollout.shifted()
  rows = s.inputs.shape[0]
  batch = ts.Batch(inputs=s.inputs, targets=s.targets, input_mask=s.input_mask,
                   completion_mask=s.completion_mask, prefix_mask=s.prefix_mask,
                   row_ids=jnp.arange(rows, dtype=jnp.int32), sampler_logp=s.sampler_logp)
  return jax.device_put(batch, ts.batch_shardings(batch, mesh))


def rollout_metrics(rollout: Rollout) -> dict:
  lengths = rollout.lengths.astype(jnp.float32)
  return {
      "rollout/response_length": jnp.mean(lengths),
      "rollout/truncation_rate": jnp.mean(rollout.truncated.astype(jnp.float32)),
      "rollout/prefix_length": jnp.mean(rollout.prefix_lengths.astype(jnp.float32)),
  }


def evaluate_student(run: Run, step: int) -> dict:
  """``evaluate``'s avg@k / pass@k result for the current student on ``eval.path``."""
  cfg = run.config
  problems = evaluate_lib.load_problems(cfg.eval.path, cfg.data.prompt_key, cfg.data.answer_key,
                                        cfg.eval.limit or None)
  model = _compute_model(run.student, cfg.student.compute_dtype)
  generate_fn = evaluate_lib.sampler_generate_fn(
      model, run.tokenizer, run.mesh, cfg.eval.max_new_tokens, cfg.eval.temperature,
      micro_batch_size=min(cfg.rollout.micro_batch, len(problems)))
  result = evaluate_lib.evaluate(generate_fn, run.tokenizer, problems, k=cfg.eval.k,
                                 out_jsonl=f"{cfg.workdir}/eval/step_{step}.samples.jsonl",
                                 seed=cfg.seed)
  log.info("step %d eval: avg@%d %.4f, pass@%d %.4f", step, cfg.eval.k, result["avg@k"],
           cfg.eval.k, result["pass@k"])
  return result


def _eval_scalars(result: dict) -> dict[str, float]:
  return {"eval/avg@k": result["avg@k"], "eval/pass@k": result["pass@k"],
          "eval/response_tokens": result["mean_response_tokens"]}


class _Phases:
  """Jitted scoring and update functions, built once per run."""

  def __init__(self, run: Run):
    cfg, mesh = run.config, run.mesh
    t = cfg.train
    obj = config_lib.objective_config(cfg)
    compute = jnp.dtype(cfg.student.compute_dtype)
    common = dict(chunk_size=t.score_chunk, vocab_size=run.vocab_size, micro_batch=t.micro_batch)
    t_graph, self.teacher_params = nnx.graphdef(run.teacher), nnx.state(run.teacher, nnx.Param)
    s_graph = nnx.graphdef(run.student)
    with jax.set_mesh(mesh):
      self.score = jax.jit(ts.make_teacher_scorer(t_graph, top_k=obj.top_k, **common,
                                                  compute_dtype=jnp.dtype(cfg.teacher.dtype)))
      self.student_logp = jax.jit(ts.make_student_logp(s_graph, **common, compute_dtype=compute))
      shardings = ts.state_shardings(run.state)
      self.update = jax.jit(
          ts.make_train_step(s_graph, optimizer_from_config(cfg), obj, **common,
                             compute_dtype=compute),
          out_shardings=(shardings, None), donate_argnums=(0,))


def run_training(config: ml_collections.ConfigDict, *, stop_at_step: int | None = None) -> dict:
  """Runs (or resumes) a distillation; returns the last step's metrics.

  With ``eval.path`` set, the student is evaluated before the first step, every
  ``eval.every`` steps and after the last; the before/after table is printed. SIGINT and
  SIGTERM finish the current step, save it and raise ``stopping.RunInterrupted`` (every
  process at the same step).

  Args:
    config: the run's config (validated here).
    stop_at_step: save and return after this step (a time-boxed job); re-running the
      same command resumes. None: run to ``config.steps``.
  """
  run = setup(config)
  cfg = run.config
  phases = _Phases(run)
  start = int(run.state.step)
  bar = metrics_lib.ProgressBar(cfg.steps, initial_step=start)
  bad_steps, last = 0, {}
  evals = {}
  if start == 0 and cfg.eval.path:
    evals[0] = evaluate_student(run, 0)
    run.writer.write(0, _eval_scalars(evals[0]))
  stop, interrupted = stopping.StopSignals().install(), None
  try:
    end = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)
    for step in range(start, end):
      prompts = global_batch(run.stream)
      t0 = time.perf_counter()
      rollout, info = sample(run, prompts, step)
      batch = to_batch(rollout, run.mesh)
      jax.block_until_ready(batch)
      t1 = time.perf_counter()
      with jax.set_mesh(run.mesh):
        teacher = phases.score(phases.teacher_params, batch)
        jax.block_until_ready(teacher)
        t2 = time.perf_counter()
        old_logp = (phases.student_logp(run.state.params, batch) if cfg.train.ppo_epochs > 1
                    else None)
        for _ in range(cfg.train.ppo_epochs):
          run.state, step_metrics = phases.update(run.state, batch, teacher, run.key, old_logp)
      nnx.update(run.student, run.state.params)
      step_metrics = jax.device_get({**step_metrics, **rollout_metrics(rollout)})
      t3 = time.perf_counter()
      tokens = float(to_host(rollout.token_mask).sum())
      generated = float(to_host(rollout.lengths).sum())
      scalars = {k: float(v) for k, v in {**step_metrics, **info}.items()}
      scalars.update({
          "time/sample_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
          "tokens_per_s/sample": generated / max(t1 - t0, 1e-9),
          "tokens_per_s/score": tokens / max(t2 - t1, 1e-9),
          "tokens_per_s/train": tokens / max(t3 - t2, 1e-9),
      })
      if scalars["finite"] < 1:
        bad_steps += 1
        scalars["nonfinite_steps"] = bad_steps
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row).",
                    step, bad_steps)
        if bad_steps >= cfg.train.max_bad_steps:
          run.writer.write(step + 1, scalars)
          raise NonFiniteLossError(
              f"{bad_steps} consecutive steps had a non-finite loss or gradient (last: step "
              f"{step}); lower train.lr or check the data. Checkpoints up to step "
              f"{run.checkpointer.manager.latest_step()} are intact.")
      else:
        bad_steps = 0
      if cfg.eval.path and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0)
                            or step + 1 == cfg.steps):
        evals[step + 1] = evaluate_student(run, step + 1)
        scalars.update(_eval_scalars(evals[step + 1]))
      run.writer.write(step + 1, scalars)
      bar.update(step + 1, scalars)
      last = scalars
      meta = {"data": run.stream.state(), "step": step + 1, "seed": cfg.seed}
      # Read the (all-process) flag once: a signal that lands during the save is handled
      # after the next step, never reported as saved when this save was not forced.
      received = stop.agreed()
      run.checkpointer.save(step + 1, dataclasses.asdict(run.state), meta,
                            force=step + 1 == end or received is not None)
      if received is not None:
        interrupted = stopping.RunInterrupted(received, step + 1, cfg.workdir)
        break
    if interrupted is not None:
      raise interrupted  # After the finally below has finished the save.
    if len(evals) > 1:
      print(evaluate_lib.format_summary_table({f"step {s}": e for s, e in evals.items()}))
    if jax.process_index() == 0:
      plot = f"{cfg.workdir}/{PLOT_FILE}"
      metrics_lib.plot_metrics(cfg.workdir, PLOT_KEYS, plot)
      log.info("wrote %s", plot)
  finally:
    bar.close()
    run.checkpointer.close()
    run.writer.close()
    stop.restore()
  return last
