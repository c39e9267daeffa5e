"""The distillation loop: sample → teacher scores → update → log → checkpoint → evaluate.

Holds no math: every array computation is in the jitted phases of
``train_step`` and ``sampling``; this module moves data between them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from tropd_jax import batch as batch_lib
from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import config as config_lib
from tropd_jax import data as data_lib
from tropd_jax import evaluate as evaluate_lib
from tropd_jax import mesh as mesh_lib
from tropd_jax import metrics as metrics_lib
from tropd_jax import models, objectives
from tropd_jax import run_guard, stopping
from tropd_jax import student as student_lib
from tropd_jax import train_step as ts
from tropd_jax import sampling
from tropd_jax import teacher_responses as teacher_responses_lib
from tropd_jax.sampling import layout as layout_lib
from tropd_jax.sampling import Rollout, SamplerConfig

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
  settings: config_lib.Settings
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
  phases: ts.Phases
  decode_layout: str

  @property
  def teacher_params(self):
    return nnx.state(self.teacher, nnx.Param)


def rollout_seed(seed: int, step: int) -> int:
  """The sampler's seed of a step: the run's seed and the step mixed (rows are folded in later),
  so different seeds sample different rollouts and a resumed step samples the same ones."""
  return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] % 2**31)


def to_host(x) -> np.ndarray:
  """A global array on every process's host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


global_batch = data_lib.global_batch


def setup(config: ml_collections.ConfigDict) -> Run:
  """Validates the config (against the run in its work directory: ``run_guard``), loads models
  and data, restores the newest good checkpoint, builds the phases, then records the config."""
  config = run_guard.prepare(config)
  settings = config_lib.settings(config)
  mesh = mesh_lib.make_mesh(settings.mesh)
  _check_batch_axes(settings, mesh)
  s_tok, vocab_size = student_lib.run_tokenizer(config)
  stream = data_lib.PromptStream.from_config(config, s_tok)
  if config.data.num_epochs:
    run_guard.check_prompt_supply(config, stream.source.num_rows(), upper_bound=True)
  student = models.from_pretrained(config.student.path, dtype=config.student.dtype, mesh=mesh,
                                   remat=config.student.remat,
                                   attention_impl=config.attention_impl)
  teacher = models.from_pretrained(config.teacher.path, dtype=config.teacher.dtype, mesh=mesh,
                                   attention_impl=config.attention_impl)
  teacher_cache = None
  if settings.objective.guidance and not config.data.teacher_response_key:
    teacher_cache = data_lib.TeacherResponseCache(
        teacher_responses_lib.cache_path(config.workdir))

  tx = settings.optimizer.make()
  state = ts.init_state(tx, nnx.state(student, nnx.Param), mesh)
  checkpointer = ckpt_lib.Checkpointer(
      f"{config.workdir}/checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save)
  key = jax.device_put(jax.random.key_data(jax.random.key(config.seed)),  # [2] uint32
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  restored = checkpointer.restore_newest_good(ckpt_lib.abstract_like(state.as_dict()),
                                             set_aside=True)
  if restored is not None:
    step, tree, meta = restored
    state = state.replace_leaves(tree)
    stream.restore(meta["data"])
    log.info("resumed from step %d in %s", step, config.workdir)
  nnx.update(student, state.params)
  layout = choose_decode_layout(settings, mesh, state, nnx.state(teacher, nnx.Param), vocab_size)
  phases = ts.build_phases(
      settings, mesh, student_graphdef=nnx.graphdef(student),
      teacher_graphdef=nnx.graphdef(teacher), state_shardings=ts.state_shardings(state),
      vocab_size=vocab_size,
      sampler_shardings=layout_lib.param_shardings(state.params, mesh, layout))
  run_guard.record_run_config(config)
  writer = metrics_lib.MetricsWriter.from_config(
      config, purge_step=restored[0] + 1 if restored else 0)
  return Run(config, settings, mesh, s_tok, vocab_size, student, teacher, stream, teacher_cache,
             state, checkpointer, writer, key, phases, layout)


def choose_decode_layout(settings: config_lib.Settings, mesh, state, teacher_params,
                         vocab_size: int) -> str:
  """The layout of the sampler's copy of the student (``sampling.layout``), logged."""
  r = settings.rollout
  compute = ts.cast(jax.eval_shape(lambda: state.params), settings.student.compute_dtype)
  scfg = r.sampler(stop_ids=(), pad_id=0, vocab_size=vocab_size)
  pool_tokens = (scfg.num_pages * scfg.page_size if scfg.num_pages
                 else r.slots * scfg.max_row_tokens)
  k_DGH = [x for path, x in jax.tree_util.tree_leaves_with_path(state.params)
           if "k_DGH" in jax.tree_util.keystr(path)]  # one per layer
  kv_heads = k_DGH[0].shape[1]
  kv_per_token = (sum(2 * x.shape[1] * x.shape[2] for x in k_DGH)
                  * np.dtype(settings.student.compute_dtype).itemsize)
  kv_per_chip = pool_tokens * kv_per_token // layout_lib.pool_shards(mesh, "replicated",
                                                                     kv_heads)
  resident = layout_lib.chip_bytes(state) + layout_lib.chip_bytes(teacher_params)
  layout, why = layout_lib.choose(
      r.decode_layout, weight_bytes=layout_lib.tree_bytes(compute),
      kv_bytes_per_chip=kv_per_chip, resident_per_chip=resident, mesh=mesh,
      hbm=layout_lib.hbm_bytes(mesh))
  log.info("decode layout: %s (%s)", layout, why)
  return layout


def _check_batch_axes(settings: config_lib.Settings, mesh) -> None:
  """Rows of a micro-batch must split evenly over the devices that hold different rows."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if settings.train.micro_batch % shards:
    raise ValueError(
        f"config field train.micro_batch={settings.train.micro_batch} must be a multiple of the "
        f"{shards} devices of the mesh's data x fsdp axes (each holds different rows).")


def _sampler_config(run: Run, *, teacher: bool = False, **overrides) -> SamplerConfig:
  """The rollout (or teacher-response) sampler settings with the run's tokenizer and vocabulary."""
  return run.settings.rollout.sampler(stop_ids=run.tokenizer.stop_ids,
                                      pad_id=run.tokenizer.pad_id, vocab_size=run.vocab_size,
                                      teacher=teacher, **overrides)


def sampling_student(run: Run) -> tuple:
  """``(graphdef, params)`` of the student in the compute dtype and the decode layout: one
  jitted copy of the weights (timed: ``time/decode_layout_s``)."""
  return nnx.graphdef(run.student), run.phases.to_sampler(run.state.params)


def upcoming_prompts(run: Run, steps: int) -> list[data_lib.Prompt]:
  """The prompts of the next ``steps`` steps (the stream is left where it was)."""
  saved = run.stream.state()
  prompts = []
  try:
    for _ in range(steps):
      prompts += global_batch(run.stream)
  except StopIteration:
    pass
  finally:
    run.stream.restore(saved)
  return prompts


def teacher_responses(run: Run, prompts: list[data_lib.Prompt]) -> list[tuple[int, ...]]:
  """Each prompt's teacher response: from the data, the cache, or generated in bulk now (the
  missing ones of the next ``guidance.lookahead_steps`` steps at once) and cached."""
  if prompts[0].teacher_ids is not None:
    return [p.teacher_ids for p in prompts]
  if any(run.teacher_cache.get(p.index) is None for p in prompts):
    ahead = upcoming_prompts(run, run.config.guidance.lookahead_steps)
    resident = layout_lib.chip_bytes(run.state)
    engine = teacher_responses_lib.engine(run.teacher, run.settings, run.tokenizer,
                                          run.vocab_size, run.mesh, resident)
    teacher_responses_lib.generate(engine, prompts + ahead, run.teacher_cache,
                                   seed=teacher_responses_lib.seed_of(run.settings.seed))
  return [run.teacher_cache.get(p.index) for p in prompts]


def sample(run: Run, prompts: list[data_lib.Prompt], step: int) -> tuple[Rollout, dict]:
  """On-policy rollouts (n per prompt) plus guided ones, in one engine call; rows
  prompt-major, guided last."""
  s = run.settings
  r = s.rollout
  info = {}
  ids = [p.ids for p in prompts]
  rows = sampling.requests(ids, n=r.num_samples, max_new_tokens=r.max_new_tokens)
  if r.guided_per_prompt:
    alpha = objectives.guidance_fraction(step, s.schedule_steps)
    # A guided row's response (prefix + continuation) has the budget of any other row.
    prefixes = [objectives.guidance_prefix(y, alpha, run.tokenizer.stop_ids,
                                           max_tokens=r.max_new_tokens - 1)
                for y in teacher_responses(run, prompts)]
    rows += sampling.requests(ids, n=r.guided_per_prompt, prefix_ids=prefixes,
                              max_new_tokens=r.max_new_tokens, row_offset=len(rows))
    info["guidance/alpha"] = alpha
  # The copy reads the parameters the previous step's update writes (dispatched without
  # waiting): wait for them first, so that the copy's time is the copy's alone.
  jax.block_until_ready(run.state.params)
  t0 = time.perf_counter()
  model = sampling_student(run)
  jax.block_until_ready(model[1])
  info["time/decode_layout_s"] = time.perf_counter() - t0
  engine = sampling.Engine(model, _sampler_config(run), mesh=run.mesh, layout=run.decode_layout)
  rollout = engine.generate(rows, seed=rollout_seed(s.seed, step))
  st = engine.stats
  info.update({
      "sampler/kv_cache_gib": st.kv_cache_bytes / 2**30, "sampler/occupancy": st.occupancy,
      "sampler/preemptions": st.preemptions, "sampler/decode_steps": st.decode_steps,
      "sampler/drain_steps": st.drain_steps, "sampler/drain_s": st.drain_seconds,
      "sampler/compilations": st.num_compilations})
  return rollout, info


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
  return {
      "rollout/response_length": float(np.mean(rollout.lengths)),
      "rollout/truncation_rate": float(np.mean(rollout.truncated)),
      "rollout/prefix_length": float(np.mean(rollout.prefix_lengths)),
  }


@dataclasses.dataclass
class _Pending:
  """A dispatched update whose results are read after the next step has started."""

  step: int
  metrics: dict
  scalars: dict
  times: dict
  watcher: threading.Thread


def dispatch_update(run: Run, rollout: Rollout) -> tuple[dict, dict, dict, threading.Thread]:
  """Packs ``rollout``, dispatches teacher scoring and the update; does not wait for them.

  Returns the update's metrics (device arrays), host-side scalars, a dict the watcher thread
  fills with the times at which scoring and the update finished, and that thread.
  """
  s, phases = run.settings, run.phases
  batch, stats = batch_lib.pack(rollout, length=s.train.pack_length,
                                rows_multiple=s.train.micro_batch, pad_id=run.tokenizer.pad_id)
  micro = [ts.put_batch(mb, run.mesh) for mb in batch.micro_batches(s.train.micro_batch)]
  denominator = np.float32(max(int(batch.loss_mask.sum()), 1))
  with jax.set_mesh(run.mesh):
    teacher = [phases.score(run.teacher_params, mb) for mb in micro]
    old = ([phases.logp(run.state.params, mb) for mb in micro] if s.train.ppo_epochs > 1
           else [None] * len(micro))
    for _ in range(s.train.ppo_epochs):
      acc = phases.zeros(run.state.params)
      for mb, scores, old_logp in zip(micro, teacher, old):
        acc = phases.accumulate(acc, run.state.params, mb, scores, run.key, run.state.step,
                                denominator, old_logp)
      run.state, metrics = phases.apply(run.state, *acc)
  times = {}

  def watch():
    jax.block_until_ready(teacher[-1])
    times["scored"] = time.perf_counter()
    jax.block_until_ready(metrics)
    times["updated"] = time.perf_counter()

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  scalars = {"train/padding_ratio": stats.padding_ratio, "train/packed_rows": stats.rows,
             "train/micro_batches": len(micro), "tokens": float(denominator),
             "tokens_per_step": float(stats.tokens),
             "train/compilations": sum(phases.compilations().values())}
  return metrics, scalars, times, watcher


def evaluate_student(run: Run, step: int) -> dict[str, dict]:
  """``evaluate.evaluate_model`` of the current student on ``eval.paths``: ``{set: result}``."""
  cfg = run.config
  results = evaluate_lib.evaluate_model(
      sampling_student(run), run.tokenizer, cfg, mesh=run.mesh, vocab_size=run.vocab_size,
      out_dir=f"{cfg.workdir}/eval/step_{step}", layout=run.decode_layout)
  mean = evaluate_lib.mean_result(results)
  log.info("step %d eval: avg@%d %.4f, pass@%d %.4f", step, cfg.eval.k, mean["avg@k"],
           cfg.eval.k, mean["pass@k"])
  return results


def run_training(config: ml_collections.ConfigDict, *, stop_at_step: int | None = None) -> dict:
  """Runs (or resumes) a distillation; returns the last step's metrics.

  With ``eval.paths`` set, the student is evaluated before the first step, every
  ``eval.every`` steps and after the last; the before/after table is printed. SIGINT and
  SIGTERM finish the current step, save it and raise ``stopping.RunInterrupted`` (every
  process at the same step). A prompt set that runs out (``data.num_epochs``) saves the last
  step and stops with a message.

  The host stays ahead of the chips: a step's scoring and update are dispatched without
  waiting, and their metrics are read and logged once the next step's rollouts are drawn.

  Args:
    config: the run's config (validated here).
    stop_at_step: save and return after this step (a time-boxed job); re-running the
      same command resumes. None: run to ``config.steps``.
  """
  run = setup(config)
  cfg = run.config
  start = int(run.state.step)
  bar = metrics_lib.ProgressBar(cfg.steps, initial_step=start)
  state = {"bad_steps": 0, "last": {}}
  evals = {}
  pending: _Pending | None = None
  lr_schedule = run.settings.optimizer.learning_rate()
  if start == 0 and cfg.eval.paths:
    evals[0] = evaluate_student(run, 0)
    run.writer.write(0, evaluate_lib.eval_scalars(evals[0]))
  stop, interrupted, exhausted = stopping.StopSignals().install(), None, None

  def finish(p: _Pending) -> None:
    """Reads a dispatched step's metrics, logs them, stops on repeated non-finite steps."""
    p.watcher.join()
    scalars = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
    scalars.update(p.scalars)
    t = p.times
    scalars["time/score_s"] = t["scored"] - t["dispatched"]
    scalars["time/train_s"] = t["updated"] - t["scored"]
    scalars["tokens_per_s/score"] = scalars["tokens"] / max(scalars["time/score_s"], 1e-9)
    scalars["tokens_per_s/train"] = scalars["tokens"] / max(scalars["time/train_s"], 1e-9)
    if scalars["finite"] < 1:
      state["bad_steps"] += 1
      scalars["nonfinite_steps"] = state["bad_steps"]
      log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row).",
                  p.step, state["bad_steps"])
      if state["bad_steps"] >= cfg.train.max_bad_steps:
        run.writer.write(p.step + 1, scalars)
        raise NonFiniteLossError(
            f"{state['bad_steps']} consecutive steps had a non-finite loss or gradient (last: "
            f"step {p.step}); lower train.lr or check the data. Checkpoints up to step "
            f"{run.checkpointer.manager.latest_step()} are intact.")
    else:
      state["bad_steps"] = 0
    scalars["samples_per_s"] = scalars["train/sequences"] / max(t["updated"] - t["started"], 1e-9)
    if p.step + 1 in evals:
      scalars.update(evaluate_lib.eval_scalars(evals[p.step + 1]))
    run.writer.write(p.step + 1, scalars)
    bar.update(p.step + 1, scalars)
    state["last"] = scalars

  try:
    end = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)
    updated_at = time.perf_counter()
    for step in range(start, end):
      try:
        prompts = global_batch(run.stream)
      except StopIteration:  # data.num_epochs passes over the prompts are done
        exhausted = step
        break
      t0 = time.perf_counter()
      rollout, info = sample(run, prompts, step)
      t1 = time.perf_counter()
      if pending is not None:
        finish(pending)
        updated_at = pending.times["updated"]
      metrics, scalars, times, watcher = dispatch_update(run, rollout)
      times["dispatched"], times["started"] = t1, t0
      # Sampling time excludes waiting for the previous step's update to finish.
      sample_s = t1 - max(t0, updated_at)
      scalars.update(info)
      scalars.update(rollout_metrics(rollout))
      scalars.update({"time/sample_s": sample_s,
                      "tokens_per_s/sample": float(rollout.lengths.sum()) / max(sample_s, 1e-9),
                      "lr": float(lr_schedule(step * cfg.train.ppo_epochs)),
                      "train/sequences": len(rollout)})
      pending = _Pending(step, metrics, scalars, times, watcher)
      if cfg.eval.paths and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0)
                             or step + 1 == cfg.steps):
        evals[step + 1] = evaluate_student(run, step + 1)
      meta = {"data": run.stream.state(), "step": step + 1, "seed": cfg.seed}
      # Read the (all-process) flag once: a signal that lands during the save is handled
      # after the next step, never reported as saved when this save was not forced.
      received = stop.agreed()
      run.checkpointer.save(step + 1, run.state.as_dict(), meta,
                            force=step + 1 == end or received is not None)
      if received is not None:
        interrupted = stopping.RunInterrupted(received, step + 1, cfg.workdir)
        break
    if pending is not None:
      finish(pending)
    if exhausted is not None:
      if exhausted > start and exhausted not in run.checkpointer.steps():
        run.checkpointer.save(exhausted, run.state.as_dict(),
                              {"data": run.stream.state(), "step": exhausted, "seed": cfg.seed},
                              force=True)
      raise run_guard.PromptsExhausted(
          f"data.num_epochs={cfg.data.num_epochs} passes over {cfg.data.train_path} ran out of "
          f"prompts before step {exhausted + 1} of {cfg.steps} (prompts over "
          f"data.max_prompt_tokens are dropped); step {exhausted} is saved. Raise "
          "data.num_epochs (0 repeats forever) or add prompts, then rerun to resume.")
    if interrupted is not None:
      raise interrupted  # After the finally below has finished the save.
    nnx.update(run.student, run.state.params)
    if len(evals) > 1:
      bar.write(evaluate_lib.format_summary_table(evaluate_lib.table_by_step(evals)))
    if jax.process_index() == 0:
      plot = f"{cfg.workdir}/{PLOT_FILE}"
      metrics_lib.plot_metrics(cfg.workdir, PLOT_KEYS, plot)
      log.info("wrote %s", plot)
  finally:
    bar.close()
    run.checkpointer.close()
    run.writer.close()
    stop.restore()
  return state["last"]
