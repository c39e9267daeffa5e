"""Ahead-of-time compilation for a TPU topology: does a run fit, and how much does a step cost?

  python -m tropd_jax.aot --config=configs/aime.py --topology=v5p:2x2x1

runs on any host with ``libtpu`` installed (``requirements-tpu.txt``), no TPU needed. It builds
the config's mesh on the topology's devices and, from abstract shapes only (no weights, no
data), lowers and compiles every jitted phase of a training step at the config's sizes:

  sample/prefill, sample/decode    the student's on-policy rollouts (``rollout.micro_batch`` rows,
                                   the largest prompt bucket, a ``max_new_tokens`` cache);
  guided/prefill, guided/decode    the guided rollouts (context: prompt + teacher prefix);
  teacher/prefill, teacher/decode  the teacher's responses for guidance, when generated;
  score                            the teacher's chunked scoring of all rows of the step;
  train                            the accumulated student update (``train.micro_batch`` rows).

For each phase it prints, per chip, the bytes of parameters (the student's master copy, its
compute-dtype copy while sampling, the teacher), optimizer state, KV cache, XLA's temporaries and
the rest (arguments and outputs: rollouts, batch, teacher scores), their total against the chip's
HBM, and XLA's flop and byte counts. It exits with status 1 when a phase does not fit with
``--headroom`` to spare.

Rows are as long as the run makes them: the longest rollout of the step (a guided row holds its
prompt, the teacher prefix and ``max_new_tokens`` more) sets ``L`` for scoring and training.
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
from flax import nnx

from tropd_jax import cli
from tropd_jax import config as config_lib
from tropd_jax import mesh as mesh_lib
from tropd_jax import models
from tropd_jax import train
from tropd_jax import train_step as ts
from tropd_jax.sampling.config import SamplerConfig
from tropd_jax.sampling.decode import cache_len, decode, prefill

GiB = 2**30

# HBM per chip (one JAX device per chip: v4 and v5p in megacore mode), by ``device_kind``.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5": 95 * GiB,  # v5p
    "TPU v5p": 95 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5e": 16 * GiB,
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
    "TPU v6e": 32 * GiB,
}

# Checkpoints the shipped configs name, so no config.json has to be fetched.
KNOWN_CHECKPOINTS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "deepseek_r1_distill_qwen_1p5b",
    "Skywork/Skywork-OR1-Math-7B": "skywork_or1_7b",
    "Skywork/Skywork-OR1-7B": "skywork_or1_7b",
    "Qwen/Qwen3-1.7B": "qwen3_1p7b",
    "Qwen/Qwen3-4B": "qwen3_4b",
    "Qwen/Qwen3-8B": "qwen3_8b",
    "nvidia/Qwen3-Nemotron-4B": "qwen3_nemotron_4b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3_8b",
}

KINDS = ("params", "optimizer", "kv_cache", "temp", "other")


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
def hbm_bytes(device) -> int:
  kind = device.device_kind
  if kind not in HBM_BYTES:
    raise ValueError(f"HBM of {kind!r} is unknown; pass --hbm_gib.")
  return HBM_BYTES[kind]


@cli.reads_user_input
def model_config(path: str, dtype: str, preset: str | None = None) -> models.ModelConfig:
  """The architecture at ``path``: a preset, a known hub id, or a local ``config.json``."""
  if preset:
    return models.ModelConfig.preset(preset, dtype=dtype)
  if path in KNOWN_CHECKPOINTS:
    return models.ModelConfig.preset(KNOWN_CHECKPOINTS[path], dtype=dtype)
  config_json = os.path.join(path, "config.json")
  if os.path.exists(config_json):
    return models.ModelConfig.from_hf_config(config_json, dtype=dtype)
  raise ValueError(
      f"cannot tell the architecture of {path!r}: pass --student_preset/--teacher_preset "
      f"(one of {sorted(models.PRESETS)}) or a directory with a config.json.")


# --- abstract arrays -----------------------------------------------------------------------------


def _sds(shape, dtype, axes, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.named_sharding(axes, shape, mesh))


def _with_shardings(shapes, shardings):
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _outputs(lowered, compiled):
  """The program's outputs as ShapeDtypeStructs carrying their compiled shardings."""
  return _with_shardings(lowered.out_info, compiled.output_shardings)


def chip_bytes(tree) -> int:
  """Bytes of ``tree`` on the first device (its shard of every leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def abstract_params(cfg: models.ModelConfig, mesh, **kwargs):
  """``(graphdef, params)``: parameters as sharded ShapeDtypeStructs (no memory)."""
  graphdef, state = nnx.split(models.abstract_model(cfg, **kwargs))
  state = jax.tree.map(
      lambda var, sharding: var.replace(
          jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)),
      state, models.param_shardings(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, state


def _cast(tree, dtype):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                     else x.dtype, sharding=x.sharding), tree)


def abstract_batch(rows: int, length: int, mesh) -> ts.Batch:
  """A ``train_step.Batch`` of ``rows x length`` with the run's shardings (rows over batch axes)."""

  def field(name):
    if name == "row_ids":
      return _sds((rows,), jnp.int32, ("batch",), mesh)
    if name.endswith("_mask"):
      dtype = jnp.bool_
    elif name.endswith("logp"):
      dtype = jnp.float32
    elif name in ("inputs", "targets"):
      dtype = jnp.int32
    else:
      raise ValueError(f"train_step.Batch.{name}: unknown field; teach aot.abstract_batch it.")
    return _sds((rows, length), dtype, ("batch", None), mesh)

  return ts.Batch(**{f.name: field(f.name) for f in dataclasses.fields(ts.Batch)})


# --- phases --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
  """One compiled program and what else is resident on the chips while it runs.

  Attributes:
    name: e.g. ``train``.
    shapes: a short description of the program's main shapes.
    calls: calls per optimizer step.
    bytes: per-chip bytes by kind (``KINDS``).
    flops, bytes_accessed: XLA's cost analysis of one call (per chip).
    compile_s: seconds to lower and compile.
    kernels: Pallas (``tpu_custom_call``) kernels in the program: splash attention on TPU.
  """

  name: str
  shapes: str
  calls: int
  bytes: dict[str, int]
  flops: float
  bytes_accessed: float
  compile_s: float
  kernels: int = 0

  @property
  def total(self) -> int:
    return sum(self.bytes.values())


@dataclasses.dataclass
class Report:
  topology: str
  device_kind: str
  num_chips: int
  mesh_shape: dict[str, int]
  attention: str
  hbm: int
  headroom: float
  phases: list[Phase]
  notes: list[str]

  @property
  def peak(self) -> int:
    return max(p.total for p in self.phases)

  @property
  def fits(self) -> bool:
    return self.peak <= (1 - self.headroom) * self.hbm


def _compile(fn: Callable, *args, **kwargs):
  t0 = time.perf_counter()
  lowered = fn.lower(*args, **kwargs)
  compiled = lowered.compile()
  return lowered, compiled, time.perf_counter() - t0


def _phase(name, shapes, calls, lowered, compiled, seconds, *, resident: dict[str, int],
           inside: dict[str, int]) -> Phase:
  """Per-chip bytes of a phase.

  ``resident``: bytes by kind that live on the chips but are not the program's arguments or
  outputs; ``inside``: bytes by kind among its arguments and outputs (counted once). The rest of
  arguments + outputs - aliased (donated) buffers, and the program's code, is ``other``.
  """
  mem = compiled.memory_analysis()
  program = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  other = program - sum(inside.values()) + mem.generated_code_size_in_bytes
  by_kind = dict.fromkeys(KINDS, 0)
  for part in (resident, inside):
    for kind, n in part.items():
      by_kind[kind] += n
  by_kind["temp"] += mem.temp_size_in_bytes
  by_kind["other"] += max(other, 0)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return Phase(name, shapes, calls, by_kind, float(cost.get("flops", 0.0)),
               float(cost.get("bytes accessed", 0.0)), seconds,
               lowered.as_text().count("tpu_custom_call"))


def _sampler_phases(prefix, graphdef, state, scfg: SamplerConfig, *, prompts: int, n: int,
                    context_len: int, mesh, resident: dict[str, int], log) -> list[Phase]:
  """Prefill + decode of one rollout micro-batch, as ``Sampler.rollout`` splits the rows."""
  b = scfg.rows_per_micro_batch(prompts * n, n)
  contexts = b // n
  calls = -(-prompts // contexts)
  tokens = _sds((contexts, context_len), jnp.int32, ("batch", "length"), mesh)
  mask = _sds((contexts, context_len), jnp.bool_, ("batch", "length"), mesh)
  seed = jax.ShapeDtypeStruct((), jnp.int32)
  row_ids = _sds((b,), jnp.int32, ("batch",), mesh)
  state_bytes = chip_bytes(state)
  shapes = (f"{contexts} contexts x {n} = {b} rows, context {context_len}, "
            f"cache {cache_len(scfg, context_len)}")
  log(f"compiling {prefix}/prefill ({shapes}) ...")
  lowered, compiled, secs = _compile(prefill, graphdef, state, tokens, mask, seed, row_ids,
                                     config=scfg, n=n)
  cache, first, first_logp, keys = _outputs(lowered, compiled)
  kv = chip_bytes(cache)
  phases = [_phase(f"{prefix}/prefill", shapes, calls, lowered, compiled, secs,
                   resident=resident, inside={"params": state_bytes, "kv_cache": kv})]
  log(f"  {secs:.0f} s; compiling {prefix}/decode ...")
  lowered, compiled, secs = _compile(decode, graphdef, state, cache, first, first_logp, keys,
                                     tokens, mask, mask, config=scfg, n=n)
  phases.append(_phase(f"{prefix}/decode", shapes + f", {scfg.max_new_tokens} steps", calls,
                       lowered, compiled, secs, resident=resident,
                       inside={"params": state_bytes, "kv_cache": kv}))
  log(f"  {secs:.0f} s")
  return phases


def compile_run(config: ml_collections.ConfigDict, devices, *,
                student_preset: str | None = None, teacher_preset: str | None = None,
                only: tuple[str, ...] = (),
                log: Callable[[str], None] = print) -> tuple[list[Phase], list[str]]:
  """Lowers and compiles every phase of a step of ``config`` on ``devices``; see the module doc.

  ``only``: compile just these phase groups (``sample``, ``teacher``, ``guided``, ``score``,
  ``train``); the shapes are the same as in a full run.
  """
  wanted = lambda group: not only or group in only
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**config.mesh), devices)
  r, t = config.rollout, config.train
  obj = config_lib.objective_config(config)
  s_cfg = model_config(config.student.path, config.student.dtype, student_preset)
  t_cfg = model_config(config.teacher.path, config.teacher.dtype, teacher_preset)
  vocab_size = min(s_cfg.vocab_size, t_cfg.vocab_size)
  compute = jnp.dtype(config.student.compute_dtype)
  notes = []

  attention = config.attention_impl
  s_graph, s_params = abstract_params(s_cfg, mesh, remat=config.student.remat,
                                      attention_impl=attention)
  t_graph, t_params = abstract_params(t_cfg, mesh, attention_impl=attention)
  tx = train.optimizer_from_config(config)
  # As train.setup: jax.jit(tx.init, out_shardings=ts.opt_state_shardings(tx, params)).
  opt_state = _with_shardings(jax.eval_shape(tx.init, s_params),
                              ts.opt_state_shardings(tx, s_params))

  with jax.set_mesh(mesh):
    step = _sds((), jnp.int32, (), mesh)
    state = ts.TrainState(s_params, opt_state, step)
    student_b, teacher_b, opt_b = chip_bytes(s_params), chip_bytes(t_params), chip_bytes(opt_state)
    s_compute = (s_params if s_cfg.dtype == config.student.compute_dtype
                 else _cast(s_params, compute))
    sampling_copy = 0 if s_compute is s_params else chip_bytes(s_compute)

    # The trainer's sampler settings; the checkpoint's EOS ids stand in for the tokenizer's.
    scfg = train.sampler_config(config, stop_ids=s_cfg.eos_token_id, pad_id=0,
                                vocab_size=vocab_size)
    phases = []
    prompt_len = scfg.bucket(config.data.max_prompt_tokens)
    resident = {"params": student_b + teacher_b, "optimizer": opt_b}
    n = r.num_samples
    row_len = prompt_len + r.max_new_tokens
    if wanted("sample"):
      phases += _sampler_phases("sample", s_graph, s_compute, scfg, prompts=r.prompts_per_step,
                                n=n, context_len=prompt_len, mesh=mesh, resident=resident,
                                log=log)
    if obj.guidance and config.guidance.per_prompt:
      g = config.guidance.per_prompt
      if not config.data.teacher_response_key and wanted("teacher"):
        tcfg = train.sampler_config(
            config, stop_ids=t_cfg.eos_token_id, pad_id=0, vocab_size=vocab_size,
            max_new_tokens=config.guidance.max_teacher_tokens,
            temperature=config.guidance.teacher_temperature)
        t_compute = _cast(t_params, compute)
        phases += _sampler_phases(
            "teacher", t_graph, t_compute, tcfg, prompts=r.prompts_per_step, n=1,
            context_len=prompt_len, mesh=mesh,
            resident={"params": student_b + sampling_copy, "optimizer": opt_b}, log=log)
        notes.append("teacher/*: generating teacher responses for guidance, once per prompt "
                     "(cached in the workdir).")
      elif config.data.teacher_response_key:
        notes.append("guided contexts assume teacher responses of at most "
                     "guidance.max_teacher_tokens tokens (data.teacher_response_key is set).")
      guided_len = scfg.bucket(config.data.max_prompt_tokens + config.guidance.max_teacher_tokens)
      guided_row = guided_len + r.max_new_tokens
      if wanted("guided"):
        phases += _sampler_phases("guided", s_graph, s_compute, scfg, prompts=r.prompts_per_step,
                                  n=g, context_len=guided_len, mesh=mesh, resident=resident,
                                  log=log)
      row_len = max(row_len, guided_row)
      notes.append(f"guided rows: prompt + teacher prefix (up to {guided_len} tokens) + "
                   f"max_new_tokens, so every row of the step is padded to {guided_row}.")

    rows, length = config_lib.rows_per_step(config), row_len - 1
    batch = abstract_batch(rows, length, mesh)
    common = dict(chunk_size=t.score_chunk, vocab_size=vocab_size, micro_batch=t.micro_batch)
    shapes = f"{rows} rows x {length}, micro-batch {t.micro_batch}, chunk {t.score_chunk}"
    scorer = ts.make_teacher_scorer(t_graph, top_k=obj.top_k, **common,
                                    compute_dtype=jnp.dtype(config.teacher.dtype))
    # The teacher's scores as the train step gets them: rows over the batch axes (the scorer's
    # compiled output shardings when it is compiled here).
    teacher = jax.tree.map(lambda x: _sds(x.shape, x.dtype, ("batch",) + (None,) * (x.ndim - 1),
                                          mesh), jax.eval_shape(scorer, t_params, batch))
    if wanted("score"):
      log(f"compiling score ({shapes}) ...")
      lowered, compiled, secs = _compile(jax.jit(scorer), t_params, batch)  # as train._Phases
      teacher = _outputs(lowered, compiled)
      phases.append(_phase("score", shapes, 1, lowered, compiled, secs,
                           resident={"params": student_b, "optimizer": opt_b},
                           inside={"params": teacher_b}))
      log(f"  {secs:.0f} s")
    old_logp = None
    if t.ppo_epochs > 1:
      old_logp = _sds((rows, length), jnp.float32, ("batch", None), mesh)
    key = _sds((2,), jnp.uint32, (None,), mesh)
    update = jax.jit(
        ts.make_train_step(s_graph, tx, obj, **common, compute_dtype=compute),
        out_shardings=(jax.tree.map(lambda x: x.sharding, state), None), donate_argnums=(0,))
    if wanted("train"):
      log(f"compiling train ({shapes}) ...")
      lowered, compiled, secs = _compile(update, state, batch, teacher, key, old_logp)
      phases.append(_phase("train", shapes, t.ppo_epochs, lowered, compiled, secs,
                           resident={"params": teacher_b},
                           inside={"params": student_b, "optimizer": opt_b}))
      log(f"  {secs:.0f} s")
  return phases, notes


def run(config: ml_collections.ConfigDict, topology: str, *, headroom: float = 0.1,
        chip_config: str | None = "auto", hbm_gib: float | None = None,
        student_preset: str | None = None, teacher_preset: str | None = None,
        only: tuple[str, ...] = (), log: Callable[[str], None] = print) -> Report:
  """Compiles ``config`` for ``topology`` and returns the per-chip memory ``Report``."""
  devices = tpu_devices(topology, chip_config)
  hbm = int(hbm_gib * GiB) if hbm_gib else hbm_bytes(devices[0])
  mesh_shape = dict(zip(mesh_lib.MESH_AXES,
                        mesh_lib.MeshConfig(**config.mesh).shape(len(devices))))
  phases, notes = compile_run(config, devices, student_preset=student_preset,
                              teacher_preset=teacher_preset, only=only, log=log)
  return Report(topology, devices[0].device_kind, len(devices), mesh_shape,
                config.attention_impl, hbm, headroom, phases, notes)


def _gib(n: float) -> str:
  return f"{n / GiB:.2f}"


def format_report(report: Report) -> str:
  """The per-chip table: bytes by kind and total per phase, then XLA's costs."""
  mesh = " ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
  lines = [
      f"topology {report.topology}: {report.num_chips} x {report.device_kind}, "
      f"HBM {_gib(report.hbm)} GiB per chip; mesh {mesh}; attention {report.attention}",
      "",
      "per chip, GiB     params  optimizer  kv_cache     temp    other    total  headroom",
  ]
  for p in report.phases:
    b = p.bytes
    lines.append(
        f"{p.name:<16} {_gib(b['params']):>7} {_gib(b['optimizer']):>10} "
        f"{_gib(b['kv_cache']):>9} {_gib(b['temp']):>8} {_gib(b['other']):>8} "
        f"{_gib(p.total):>8} {1 - p.total / report.hbm:>8.1%}")
  verdict = "FITS" if report.fits else "DOES NOT FIT"
  lines += [
      "",
      f"peak {_gib(report.peak)} GiB of {_gib(report.hbm)} GiB "
      f"(headroom {1 - report.peak / report.hbm:.1%}, required {report.headroom:.0%}): {verdict}",
      "",
      "XLA cost per chip  calls/step  TFLOP/call   GB/call  pallas  compile s   shapes",
  ]
  for p in report.phases:
    lines.append(f"{p.name:<18} {p.calls:>10} {p.flops / 1e12:>11.2f} "
                 f"{p.bytes_accessed / 1e9:>9.1f} {p.kernels:>7} {p.compile_s:>10.0f}   {p.shapes}")
  lines.append("(XLA counts a loop body once: decode is one token step, score and train one "
               "micro-batch; pallas: Pallas kernel calls in the program, the splash attention)")
  lines += [f"note: {n}" for n in report.notes]
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  report = run(cli.config_flag_value(_CONFIG), _TOPOLOGY.value, headroom=_HEADROOM.value,
               chip_config=_CHIP_CONFIG.value or None, hbm_gib=_HBM_GIB.value,
               student_preset=_STUDENT_PRESET.value, teacher_preset=_TEACHER_PRESET.value,
               only=tuple(_ONLY.value or ()),
               log=lambda s: print(s, file=sys.stderr, flush=True))
  print(format_report(report))
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
  _STUDENT_PRESET = flags.DEFINE_string("student_preset", None,
                                        "ModelConfig preset of the student.")
  _TEACHER_PRESET = flags.DEFINE_string("teacher_preset", None,
                                        "ModelConfig preset of the teacher.")
  _ONLY = flags.DEFINE_list("only", None, "Compile only these phase groups (sample, teacher, "
                            "guided, score, train); a partial check, for iterating on a config.")
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(lambda: app.run(main, flags_parser=cli.parse_absl_flags))
