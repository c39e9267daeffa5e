"""Ahead of time, for a TPU topology: does a run fit, and what does a step cost?

  python -m tropd_jax.aot --config=configs/aime.py --topology=v5p:2x2x1 [--response_tokens=N] \
      [--dump_hlo=DIR]

runs on any host with ``libtpu`` installed (``requirements-tpu.txt``), no TPU needed. It builds the
run's own phases (``train_step.build_phases`` and the sampling engine's programs, exactly what
``train`` jits) on the topology's devices and compiles them from abstract shapes (no weights, no
data):

  sample/prefill, sample/decode    admitting rows into the engine, and a chunk of decode steps;
  guided/prefill                   admitting guided rows (prompt + teacher prefix);
  teacher/prefill, teacher/decode  the teacher's guidance responses (ahead of training);
  to_sampler                       the student's weights copied into the decode layout;
  score                            the teacher's scores of one packed micro-batch;
  train/accumulate, train/apply    one micro-batch's gradient; the optimizer update.

For each phase it prints the per-chip bytes (parameters resident and passed, optimizer state, KV
pages, XLA's temporaries, the rest) against the chip's HBM, and the cost read from the compiled
HLO (``hlo_cost``: loop trip counts multiplied out): FLOPs, HBM bytes, interconnect bytes, their
roofline time on the chip, the calls a step makes, and the step's time. A step's workload follows
from the config and the assumed lengths (``--response_tokens``, ``--prompt_tokens``), printed with
the estimate. It exits with status 1 when a phase leaves less than ``--headroom`` of HBM free.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from tropd_jax import cli
from tropd_jax import config as config_lib
from tropd_jax import hlo_cost
from tropd_jax import mesh as mesh_lib
from tropd_jax import models
from tropd_jax import train_step as ts
from tropd_jax.models import paged_attention as paged
from tropd_jax.sampling import engine as engine_lib
from tropd_jax.sampling import layout as layout_lib

GiB = 2**30
KINDS = ("params", "optimizer", "kv_cache", "temp", "other")
PACKING_FILL = 0.97  # Real tokens per position of packed rows (first fit, longest first).


@cli.reads_user_input
def tpu_devices(topology: str, chip_config: str | None = "auto") -> list:
  """Compile-only TPU devices of ``topology`` (e.g. ``v5p:2x2x1``, ``v4:2x2x1``, ``v5e:4x4``).

  ``chip_config='auto'`` uses megacore (one device per chip) on v4 and v5p, as TPU VMs do.
  """
  from jax.experimental import topologies

  # Compiling needs no chip: skip libtpu's single-process lock and its metadata-server probe.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  kwargs = {}
  if chip_config == "auto":
    chip_config = "megacore" if topology.split(":")[0] in ("v4", "v5p") else None
  if chip_config:
    kwargs["chip_config_name"] = chip_config
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu raises several types
    raise ValueError(f"--topology={topology!r}: libtpu cannot build it ({e}).") from None
  return list(desc.devices)


@cli.reads_user_input
def model_config(path: str, dtype: str) -> models.ModelConfig:
  """The architecture at ``path``: a hub id with a preset (``models.HUB_PRESETS``), else its
  config.json (local, gs:// or fetched from the hub)."""
  if path in models.HUB_PRESETS:
    return models.ModelConfig.preset(models.HUB_PRESETS[path], dtype=dtype)
  return models.load_config(path, dtype=dtype)


# --- What a step does ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
  """A step's work at assumed lengths (the estimate's input, printed with it).

  Attributes:
    rows, guided_rows: sequences per step, and how many of them are guided.
    prompt_tokens, response_tokens: assumed mean lengths.
    prefix_tokens: mean teacher prefix of a guided row (the cosine schedule's mean: half the
      response).
    decode_tokens: tokens the sampler draws per step.
    sequence_tokens: tokens scored and trained per step.
    packed_rows, micro_batches: rows of ``train.pack_length`` after packing, and micro-batches.
    decode_iterations: decode steps per step (every slot busy).
    mean_live_tokens: mean tokens in a busy slot's cache.
  """

  rows: int
  guided_rows: int
  prompt_tokens: int
  response_tokens: int
  prefix_tokens: int
  decode_tokens: int
  sequence_tokens: int
  packed_rows: int
  micro_batches: int
  decode_iterations: float
  mean_live_tokens: float

  @classmethod
  def of(cls, s: config_lib.Settings, *, prompt_tokens: int, response_tokens: int,
         slots: int) -> Workload:
    r = s.rollout
    on_policy = r.prompts_per_step * r.num_samples
    guided = r.prompts_per_step * r.guided_per_prompt
    prefix = response_tokens // 2 if guided else 0
    decode = on_policy * response_tokens + guided * (response_tokens - prefix)
    tokens = (on_policy + guided) * (prompt_tokens + response_tokens)
    packed = math.ceil(tokens / (s.train.pack_length * PACKING_FILL))
    packed = -(-packed // s.train.micro_batch) * s.train.micro_batch
    return cls(on_policy + guided, guided, prompt_tokens, response_tokens, prefix, decode, tokens,
               packed, packed // s.train.micro_batch, decode / slots,
               prompt_tokens + response_tokens / 2)


# --- Phases -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
  """One compiled program: its memory, its cost per call, and its calls per step.

  Attributes:
    name: e.g. ``train/accumulate``.
    shapes: a short description of the program's main shapes.
    calls: calls per optimizer step (0: not part of a step, e.g. teacher responses ahead).
    bytes: per-chip bytes by kind (``KINDS``).
    cost: ``hlo_cost.ProgramCost`` of one call.
    seconds: the roofline time of one call on the chip.
    bound_by: what bounds it (``compute``, ``hbm``, ``collective``).
    compile_s: seconds to lower and compile.
    kernels: Pallas kernel calls in the program (splash, paged attention).
    hlo: the compiled program's HLO text.
    lowered: the program's lowered (StableHLO) text, as ``jit(...).lower(...).as_text()``.
    note: how the per-step time was scaled, if it was.
  """

  name: str
  shapes: str
  calls: float
  bytes: dict[str, int]
  cost: hlo_cost.ProgramCost
  seconds: float
  bound_by: str
  compile_s: float
  kernels: int
  hlo: str
  lowered: str = ""
  note: str = ""

  @property
  def total(self) -> int:
    return sum(self.bytes.values())

  @property
  def step_seconds(self) -> float:
    return self.calls * self.seconds


@dataclasses.dataclass
class Report:
  topology: str
  device_kind: str
  num_chips: int
  mesh_shape: dict[str, int]
  decode_layout: str
  chip: hlo_cost.ChipSpec
  hbm: int
  headroom: float
  workload: Workload
  steps: int
  phases: list[Phase]
  notes: list[str]

  @property
  def peak(self) -> int:
    return max(p.total for p in self.phases)

  @property
  def fits(self) -> bool:
    return self.peak <= (1 - self.headroom) * self.hbm

  @property
  def step_seconds(self) -> float:
    return sum(p.step_seconds for p in self.phases)


def _sds(shape, dtype, axes, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.named_sharding(axes, shape, mesh))


def _outputs(lowered, compiled):
  """The program's outputs as ShapeDtypeStructs carrying their compiled shardings."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      lowered.out_info, compiled.output_shardings)


def _estimate(cost: hlo_cost.ProgramCost, chip: hlo_cost.ChipSpec, extra_hbm: float = 0.0):
  parts = {"compute": cost.flops / chip.peak_flops,
           "hbm": (cost.hbm_bytes + extra_hbm) / chip.hbm_bytes_per_s,
           "collective": cost.collective_bytes / chip.ici_bytes_per_s}
  bound = max(parts, key=parts.get)
  return parts[bound], bound


class _Compiler:
  """Lowers and compiles phases on ``mesh``, recording each one's memory and cost."""

  def __init__(self, mesh, chip, log, resident_base: dict[str, int]):
    self.mesh, self.chip, self.log = mesh, chip, log
    self.resident_base = resident_base
    self.phases: list[Phase] = []

  def compile(self, name: str, shapes: str, calls: float, fn, *args, resident=None, inside=None,
              trip_count=1, extra_hbm: float = 0.0, scale: float = 1.0, note: str = "",
              **kwargs):
    self.log(f"compiling {name} ({shapes}) ...")
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      lowered = fn.lower(*args, **kwargs)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    self.log(f"  {seconds:.0f} s")
    hlo = compiled.as_text()
    # The paged-attention kernel reads a row's live pages only: added by the caller.
    cost = hlo_cost.analyze(hlo, unknown_trip_count=trip_count,
                            uncounted_kernels=("paged_attention",))
    mem = compiled.memory_analysis()
    program = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    by_kind = dict.fromkeys(KINDS, 0)
    for part in (resident if resident is not None else self.resident_base, inside or {}):
      for kind, n in part.items():
        by_kind[kind] += n
    by_kind["temp"] += mem.temp_size_in_bytes
    by_kind["other"] += max(program - sum((inside or {}).values())
                            + mem.generated_code_size_in_bytes, 0)
    call_s, bound = _estimate(cost, self.chip, extra_hbm)
    phase = Phase(name, shapes, calls, by_kind, cost, call_s * scale, bound, seconds,
                  hlo.count("custom_call_target=\"tpu_custom_call\""), hlo, lowered.as_text(),
                  note)
    self.phases.append(phase)
    return lowered, compiled


def _decode_iteration(phase: Phase, chip, extra_hbm: float) -> tuple[float, str]:
  """Roofline time of one decode step: the decode loop's body (+ attention read in place)."""
  loops = [lp for lp in phase.cost.loops if not lp.loop_path]
  body = max(loops, key=lambda lp: lp.hbm_bytes) if loops else None
  if body is None:
    return phase.seconds, phase.bound_by
  parts = {"compute": body.flops / chip.peak_flops,
           "hbm": (body.hbm_bytes + extra_hbm) / chip.hbm_bytes_per_s,
           "collective": body.collective_bytes / chip.ici_bytes_per_s}
  bound = max(parts, key=parts.get)
  return parts[bound], bound


def compile_run(config: ml_collections.ConfigDict, devices, *, hbm: int,
                prompt_tokens: int | None = None, response_tokens: int | None = None,
                only: tuple[str, ...] = (), log: Callable[[str], None] = print) -> Report:
  """Compiles every phase of a step of ``config`` on ``devices``; see the module doc."""
  wanted = lambda group: not only or group in only
  s = config_lib.settings(config)
  mesh = mesh_lib.make_mesh(s.mesh, devices)
  r, t = s.rollout, s.train
  kind = devices[0].device_kind
  # Compiling for local devices (a CPU: tests) gives programs but no roofline figures.
  chip = hlo_cost.CHIPS.get(kind) or hlo_cost.ChipSpec(kind, 1.0, 1.0, 1.0, hbm)
  prompt_tokens = prompt_tokens or max(s.max_prompt_tokens // 2, 1)
  response_tokens = response_tokens or max(r.max_new_tokens // 2, 1)
  s_cfg = model_config(s.student.path, s.student.dtype)
  t_cfg = model_config(s.teacher.path, s.teacher.dtype)
  vocab_size, why = _vocab_size(config, s_cfg, t_cfg)
  compute = jnp.dtype(s.student.compute_dtype)
  notes = [f"vocabulary: {vocab_size} tokens ({why})."]

  s_graph, s_params = ts.abstract_params(s_cfg, mesh, remat=s.student.remat,
                                         attention_impl=s.attention_impl)
  t_graph, t_params = ts.abstract_params(t_cfg, mesh, attention_impl=s.attention_impl)
  tx = s.optimizer.make()
  state = ts.abstract_state(tx, s_params)
  student_b = layout_lib.chip_bytes(s_params)
  teacher_b = layout_lib.chip_bytes(t_params)
  opt_b = layout_lib.chip_bytes(state.opt_state)

  # The sampler: the trainer's settings, the checkpoint's EOS ids for the tokenizer's.
  scfg = r.sampler(stop_ids=s_cfg.eos_token_id, pad_id=0, vocab_size=vocab_size)
  shards_of = lambda layout: _batch_shards(mesh, layout)
  kv_per_token = 2 * s_cfg.num_layers * s_cfg.num_kv_heads * s_cfg.head_dim * compute.itemsize
  width = -(-scfg.max_row_tokens // scfg.page_size)
  compute_params = ts.cast(s_params, compute)
  resident = {"params": student_b + teacher_b, "optimizer": opt_b}
  layout, why = layout_lib.choose(
      r.decode_layout, weight_bytes=layout_lib.tree_bytes(compute_params),
      kv_bytes_per_chip=_pool_pages(scfg, r.slots, width, shards_of("replicated"))
      * scfg.page_size * kv_per_token
      // layout_lib.pool_shards(mesh, "replicated", s_cfg.num_kv_heads),
      resident_per_chip=student_b + teacher_b + opt_b, mesh=mesh, hbm=hbm)
  notes.append(f"decode layout {layout}: {why}.")
  rules = mesh_lib.DECODE_RULES[layout]
  shards = shards_of(layout)
  slots = -(-r.slots // shards) * shards
  pages = _pool_pages(scfg, slots, width, shards)
  work = Workload.of(s, prompt_tokens=prompt_tokens, response_tokens=response_tokens,
                     slots=slots)
  sampler_shardings = layout_lib.param_shardings(s_params, mesh, layout)
  decode_params = layout_lib.abstract_copy(s_params, mesh, layout, compute)
  phases = ts.build_phases(s, mesh, student_graphdef=s_graph, teacher_graphdef=t_graph,
                           state_shardings=ts.state_shardings(state), vocab_size=vocab_size,
                           sampler_shardings=sampler_shardings)
  compiler = _Compiler(mesh, chip, log, resident)
  decode_b = layout_lib.chip_bytes(decode_params)

  def engine_phases(prefix, graph, model_cfg, params, cfg, *, context: int, rows: float,
                    decode: bool, per_step: bool, live_tokens: float, iterations: float):
    """Compiles an engine's prefill (and decode) at ``context`` tokens; ``rows`` admitted and
    ``iterations`` decode steps per step (or per run, for teacher responses)."""
    state_sds = _engine_state(model_cfg, cfg, mesh, rules, slots, pages, width)
    programs = engine_lib.programs(graph, cfg.program(), _rules_key(rules))
    pool_b = layout_lib.chip_bytes((state_sds.k_pages, state_sds.v_pages))
    inside = {"params": layout_lib.chip_bytes(params), "kv_cache": pool_b}
    t = cfg.bucket(context)
    rows_local = max(1, min(slots // shards, cfg.prefill_tokens // t))
    n_rows = rows_local * shards
    row = lambda shape, dtype, axes: _sds(shape, dtype, axes, mesh)
    with mesh_lib.use_rules(rules):
      args = (params, state_sds, row((n_rows, t), jnp.int32, ("batch", None)),
              row((n_rows,), jnp.int32, ("batch",)), row((n_rows,), jnp.int32, ("batch",)),
              row((n_rows, width), jnp.int32, ("batch", None)),
              row((n_rows,), jnp.int32, ("batch",)), row((n_rows,), jnp.int32, ("batch",)),
              jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.float32))
    calls = rows / n_rows if per_step else 0.0
    scale = min(1.0, live_tokens / t) if prefix == "guided" else 1.0
    compiler.compile(f"{prefix}/prefill", f"{n_rows} rows x {t} context, pool {pages} pages "
                     f"x {cfg.page_size}", calls, programs.prefill, *args,
                     resident=resident, inside=inside, scale=scale,
                     note="time scaled to the mean context" if scale < 1 else "")
    if not decode:
      return
    c = model_cfg
    with jax.set_mesh(mesh):
      pallas = paged.resolve_impl(cfg.attention, c.head_dim) == "pallas"
    # As the engine: the Pallas kernel one program for all lengths; the XLA path reads the
    # live pages of every slot, here rows of the mean live length.
    live = None if pallas else engine_lib.live_pages_bucket(
        slots // shards * -(-int(live_tokens + cfg.chunk_steps) // cfg.page_size),
        slots // shards, width)
    with mesh_lib.use_rules(rules):
      d_args = (params, state_sds, row((slots, width), jnp.int32, ("batch", None)),
                jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                row((slots,), jnp.bool_, ("batch",)), jax.ShapeDtypeStruct((2,), jnp.float32))
    # The Pallas kernel reads a row's live pages in place; XLA cannot see into it.
    kv_read = (slots / shards) * live_tokens * 2 * c.num_layers * c.num_kv_heads * c.head_dim \
        * compute.itemsize / layout_lib.kv_head_shards(mesh, rules, c.num_kv_heads) \
        if pallas else 0.0
    reads = "each row's live pages" if pallas else f"{live} live pages per shard"
    compiler.compile(f"{prefix}/decode", f"{slots} slots, {cfg.chunk_steps} steps a call, "
                     f"attention over {reads}", iterations if per_step else 0.0,
                     programs.decode, *d_args, live_pages=live, resident=resident, inside=inside,
                     trip_count=1, note="per decode step")
    phase = compiler.phases[-1]
    phase.seconds, phase.bound_by = _decode_iteration(phase, chip, kv_read)
    if not per_step:
      notes.append(f"{prefix}/*: {iterations:.0f} decode steps for the run's prompts, ahead of "
                   f"training: {iterations * phase.seconds / 60:.1f} min by the same roofline.")

  if wanted("sample"):
    engine_phases("sample", s_graph, s_cfg, decode_params, scfg, context=prompt_tokens,
                  rows=work.rows - work.guided_rows, decode=True, per_step=True,
                  live_tokens=work.mean_live_tokens, iterations=work.decode_iterations)
  if work.guided_rows and wanted("guided"):
    engine_phases("guided", s_graph, s_cfg, decode_params, scfg,
                  context=r.prompt_buckets[-1] + r.max_new_tokens - 1, rows=work.guided_rows,
                  decode=False, per_step=True, live_tokens=prompt_tokens + work.prefix_tokens,
                  iterations=0)
  if work.guided_rows and not config.data.teacher_response_key and wanted("teacher"):
    tcfg = r.sampler(stop_ids=t_cfg.eos_token_id, pad_id=0, vocab_size=vocab_size, teacher=True)
    t_layout, _ = layout_lib.choose(r.decode_layout, weight_bytes=layout_lib.tree_bytes(t_params),
                                    kv_bytes_per_chip=0, resident_per_chip=student_b + teacher_b
                                    + opt_b, mesh=mesh, hbm=hbm)
    t_decode = layout_lib.abstract_copy(t_params, mesh, t_layout)
    prompts = s.steps * r.prompts_per_step
    engine_phases("teacher", t_graph, t_cfg, t_decode, tcfg, context=prompt_tokens, rows=prompts,
                  decode=True, per_step=False, live_tokens=prompt_tokens + response_tokens / 2,
                  iterations=prompts * response_tokens / slots)

  if wanted("score") or wanted("train"):
    compiler.compile("to_sampler", "the student's weights into the decode layout", 1,
                     phases.to_sampler, s_params, inside={"params": student_b + decode_b},
                     resident={"params": teacher_b, "optimizer": opt_b})
  mb_shapes = f"{t.micro_batch} rows x {t.pack_length}, chunk {t.score_chunk}"
  batch = ts.abstract_batch(t.micro_batch, t.pack_length, mesh)
  scores_b = 0
  with jax.set_mesh(mesh):
    teacher = jax.tree.map(lambda x: _sds(x.shape, x.dtype, ("batch",) + (None,) * (x.ndim - 1),
                                          mesh), jax.eval_shape(phases.score, t_params, batch))
  scores_b = layout_lib.chip_bytes(teacher) * work.micro_batches
  if wanted("score"):
    compiler.compile("score", mb_shapes, work.micro_batches, phases.score, t_params, batch,
                     resident={"params": student_b, "optimizer": opt_b,
                               "other": scores_b},
                     inside={"params": teacher_b})
  if wanted("train"):
    with jax.set_mesh(mesh):
      acc = jax.eval_shape(phases.zeros, s_params)
    acc = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), acc,
                       (jax.tree.map(lambda x: x.sharding, s_params),
                        jax.tree.map(lambda _: jax.sharding.NamedSharding(
                            mesh, jax.sharding.PartitionSpec()), acc[1])))
    acc_b = layout_lib.chip_bytes(acc)
    key = _sds((2,), jnp.uint32, (None,), mesh)
    step = _sds((), jnp.int32, (), mesh)
    old = _sds(batch.targets.shape, jnp.float32, ("batch", None), mesh) if t.ppo_epochs > 1 \
        else None
    compiler.compile("train/accumulate", mb_shapes, work.micro_batches * t.ppo_epochs,
                     phases.accumulate, acc, s_params, batch, teacher, key, step,
                     jax.ShapeDtypeStruct((), jnp.float32), old,
                     resident={"params": teacher_b + student_b, "optimizer": opt_b,
                               "other": scores_b},
                     inside={"params": acc_b})
    compiler.compile("train/apply", "the optimizer update", t.ppo_epochs, phases.apply, state,
                     *acc, resident={"params": teacher_b, "other": scores_b},
                     inside={"params": student_b + acc_b, "optimizer": opt_b})
  report = Report(
      topology="", device_kind=devices[0].device_kind, num_chips=len(devices),
      mesh_shape=dict(zip(mesh_lib.MESH_AXES, s.mesh.shape(len(devices)))), decode_layout=layout,
      chip=chip, hbm=hbm, headroom=0.1, workload=work, steps=s.steps, phases=compiler.phases,
      notes=notes)
  return report


def _vocab_size(config, s_cfg, t_cfg) -> tuple[int, str]:
  """The run's vocabulary, as training finds it: the tokenizers' size where they can be read
  (a local or cached checkpoint), else the smaller embedding."""
  try:
    t_tok = models.load_tokenizer(config.teacher.path)
    s_tok = models.load_tokenizer(config.student.path)
  except Exception:  # noqa: BLE001 - no tokenizer here (a hub id without network): the rows
    return min(s_cfg.vocab_size, t_cfg.vocab_size), "the embedding rows; no tokenizer read"
  return models.check_same_tokenizer(t_tok, s_tok, t_cfg.vocab_size, s_cfg.vocab_size), (
      "the tokenizers'")


def _batch_shards(mesh, layout: str) -> int:
  with mesh_lib.use_rules(mesh_lib.DECODE_RULES[layout]):
    return mesh_lib.batch_shards(mesh)


def _pool_pages(scfg, slots: int, width: int, shards: int) -> int:
  pages = scfg.num_pages or slots * width + shards
  return -(-pages // shards) * shards


def _rules_key(rules) -> tuple:
  return tuple(sorted((k, tuple(v)) for k, v in rules.items()))


def _engine_state(model_cfg, cfg, mesh, rules, slots: int, pages: int, width: int):
  """The engine state's ShapeDtypeStructs with the shardings ``Engine.generate`` gives them."""
  dtype = jnp.dtype(cfg.cache_dtype or model_cfg.dtype).name
  with jax.set_mesh(mesh):
    lowered = engine_lib._init_state.lower(model_cfg, cfg, slots=slots, pages=pages,
                                           pages_per_row=width, dtype=dtype,
                                           rules=_rules_key(rules))
    return _outputs(lowered, lowered.compile())


# --- Report -------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, topology: str, *, headroom: float = 0.1,
        chip_config: str | None = "auto", hbm_gib: float | None = None,
        prompt_tokens: int | None = None, response_tokens: int | None = None,
        only: tuple[str, ...] = (), log: Callable[[str], None] = print) -> Report:
  """Compiles ``config`` for ``topology``; returns the per-chip memory and time ``Report``."""
  devices = tpu_devices(topology, chip_config)
  hbm = int(hbm_gib * GiB) if hbm_gib else hlo_cost.chip_spec(devices[0].device_kind).hbm_capacity
  report = compile_run(config, devices, hbm=hbm, prompt_tokens=prompt_tokens,
                       response_tokens=response_tokens, only=only, log=log)
  return dataclasses.replace(report, topology=topology, headroom=headroom)


def dump_hlo(report: Report, directory: str) -> list[str]:
  """Writes each phase's compiled HLO to ``<directory>/<phase>.hlo``; returns the paths."""
  paths = []
  for p in report.phases:
    path = os.path.join(directory, f"{p.name}.hlo")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(p.hlo)
    paths.append(path)
  return paths


def _gib(n: float) -> str:
  return f"{n / GiB:.2f}"


def format_report(report: Report) -> str:
  """The per-chip memory table, then the cost and time table and the step estimate."""
  mesh = " ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
  chip, w = report.chip, report.workload
  lines = [
      f"topology {report.topology}: {report.num_chips} x {report.device_kind}, HBM "
      f"{_gib(report.hbm)} GiB per chip; mesh {mesh}; decode layout {report.decode_layout}",
      "",
      "per chip, GiB       params  optimizer  kv_cache     temp    other    total  headroom",
  ]
  for p in report.phases:
    b = p.bytes
    lines.append(
        f"{p.name:<18} {_gib(b['params']):>7} {_gib(b['optimizer']):>10} "
        f"{_gib(b['kv_cache']):>9} {_gib(b['temp']):>8} {_gib(b['other']):>8} "
        f"{_gib(p.total):>8} {1 - p.total / report.hbm:>8.1%}")
  verdict = "FITS" if report.fits else "DOES NOT FIT"
  lines += [
      "",
      f"peak {_gib(report.peak)} GiB of {_gib(report.hbm)} GiB "
      f"(headroom {1 - report.peak / report.hbm:.1%}, required {report.headroom:.0%}): {verdict}",
      "",
      f"assumed per chip ({chip.name}): {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM "
      f"{chip.hbm_bytes_per_s / 1e9:.0f} GB/s, interconnect {chip.ici_bytes_per_s / 1e9:.0f} "
      "GB/s (achieved, assumed)",
      f"workload per step: {w.rows} sequences ({w.guided_rows} guided), prompts "
      f"{w.prompt_tokens} tokens, responses {w.response_tokens} tokens (--prompt_tokens, "
      f"--response_tokens); {w.decode_tokens} tokens drawn, {w.sequence_tokens} scored and "
      f"trained in {w.packed_rows} packed rows ({w.micro_batches} micro-batches)",
      "",
      "per chip, per call  GFLOP      HBM GB    ICI GB  bound        ms/call   calls/step  s/step",
  ]
  for p in report.phases:
    c = p.cost
    per = "per decode step" if p.name.endswith("/decode") else ""
    if per:
      lp = max((lp for lp in c.loops if not lp.loop_path), key=lambda lp: lp.hbm_bytes,
               default=None)
      flops, hbm, ici = ((lp.flops, lp.hbm_bytes, lp.collective_bytes) if lp
                         else (c.flops, c.hbm_bytes, c.collective_bytes))
    else:
      flops, hbm, ici = c.flops, c.hbm_bytes, c.collective_bytes
    lines.append(
        f"{p.name:<18} {flops / 1e9:>7.1f} {hbm / 1e9:>10.3f} {ici / 1e9:>9.3f}  "
        f"{p.bound_by:<10} {p.seconds * 1e3:>9.3f} {p.calls:>12.1f} {p.step_seconds:>7.1f}"
        + (f"   ({p.note})" if p.note else ""))
  step = report.step_seconds
  lines += [
      "",
      f"estimated step time: {step / 60:.2f} min ({step:.0f} s); {report.steps} steps: "
      f"{report.steps * step / 3600:.1f} h",
      "(roofline: each call takes the largest of FLOPs at peak, HBM bytes at bandwidth and "
      "interconnect bytes at the assumed bandwidth, from the compiled HLO with loop trip counts "
      "multiplied; decode steps assume every slot busy; decode attention read by the Pallas "
      "kernel is added analytically for the mean live length)",
  ]
  lines += [f"note: {n}" for n in report.notes]
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  report = run(cli.config_flag_value(_CONFIG), _TOPOLOGY.value, headroom=_HEADROOM.value,
               chip_config=_CHIP_CONFIG.value or None, hbm_gib=_HBM_GIB.value,
               prompt_tokens=_PROMPT_TOKENS.value, response_tokens=_RESPONSE_TOKENS.value,
               only=tuple(_ONLY.value or ()),
               log=lambda s: print(s, file=sys.stderr, flush=True))
  print(format_report(report))
  if _DUMP_HLO.value:
    for path in dump_hlo(report, _DUMP_HLO.value):
      print(f"wrote {path}", file=sys.stderr)
  sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (path.py[:variant]).")
  _TOPOLOGY = flags.DEFINE_string("topology", None,
                                  "TPU topology, e.g. v5p:2x2x1, v4:2x2x1, v5e:4x4.")
  _HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of HBM that must stay free.")
  _CHIP_CONFIG = flags.DEFINE_string("chip_config", "auto",
                                     "libtpu chip config (auto: megacore on v4/v5p; '' for none).")
  _HBM_GIB = flags.DEFINE_float("hbm_gib", None, "HBM per device in GiB (default: by chip kind).")
  _PROMPT_TOKENS = flags.DEFINE_integer(
      "prompt_tokens", None,
      "Assumed mean prompt length (default: half of data.max_prompt_tokens).")
  _RESPONSE_TOKENS = flags.DEFINE_integer(
      "response_tokens", None,
      "Assumed mean response length (default: half of rollout.max_new_tokens).")
  _DUMP_HLO = flags.DEFINE_string("dump_hlo", None,
                                  "Write each compiled phase's HLO to DIR/<phase>.hlo.")
  _ONLY = flags.DEFINE_list("only", None, "Compile only these phase groups (sample, guided, "
                            "teacher, score, train); a partial check, for iterating on a config.")
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(lambda: app.run(main, flags_parser=cli.parse_absl_flags))
