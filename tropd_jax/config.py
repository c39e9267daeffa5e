"""The run configuration: every field, its default, and validation at start-up.

Config files (``configs/*.py``) start from ``defaults()`` — a locked
``ml_collections.ConfigDict``, so a misspelt field fails where it is written —
and ``validate`` checks every value before anything is loaded, naming the field
and the value that is wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

import fsspec
import ml_collections

from tropd_jax.cli import UserError
from tropd_jax.objectives import OBJECTIVES, ObjectiveConfig


class ConfigError(UserError, ValueError):
  """A config field with a bad name or value; the message names it and what to do."""


def defaults() -> ml_collections.ConfigDict:
  """Every field a run reads, with a comment on each (see configs/aime.py)."""
  c = ml_collections.ConfigDict()
  c.workdir = ""  # Checkpoints, metrics, caches; local path or gs:// URL. Required.
  c.seed = 0  # Seeds data order, sampling and the trust-region draws.
  c.steps = 200  # Optimizer steps; may grow when a finished run is resumed.
  # Steps over which the guidance cosine (α) and a cosine learning rate anneal. 0 = `steps` of
  # the run's first launch (recorded in run_config.json): extending `steps` on resume goes on at
  # the end of the schedules (α = 0, the final learning rate) instead of restarting them from a
  # new total. Stretching them on resume is a change of the run (see `resume_changes`).
  c.schedule_steps = 0
  # Fields this launch may change from the run in its work directory (comma-separated dotted
  # names, e.g. "train.lr,train.grad_clip"); each change is logged. Any other changed field that
  # alters what is computed stops the launch (see tropd_jax/run_guard.py).
  c.resume_changes = ""

  c.student = ml_collections.ConfigDict()
  c.student.path = ""  # HF checkpoint: local dir, gs:// URL or hub id. Required.
  c.student.dtype = "float32"  # Master parameter dtype (optimizer updates): float32 | bfloat16.
  c.student.compute_dtype = "bfloat16"  # Dtype of the forward passes (sampling and training).
  c.student.remat = True  # Recompute blocks in the backward pass.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = ""  # HF checkpoint of the teacher. Required.
  c.teacher.dtype = "bfloat16"
  # Attention of both models: einsum | splash (Pallas kernel, TPU) | auto (splash on TPU).
  c.attention_impl = "auto"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Pure data parallelism (replicated parameters).
  c.mesh.fsdp = -1  # Parameters and optimizer state sharded; -1 = remaining devices.
  c.mesh.tensor = 1  # Heads, MLP and vocabulary sharded.

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""  # JSONL or Parquet of prompts (local or gs://), or hf://<dataset>. Required.
  c.data.prompt_key = "problem"  # Field holding the prompt text.
  c.data.answer_key = "answer"  # Field holding the reference answer (evaluation only).
  c.data.teacher_response_key = ""  # Field with a teacher response; "" = generate and cache.
  c.data.system_prompt = ""  # Optional system message before each prompt.
  c.data.max_prompt_tokens = 1024  # Longer prompts are counted and dropped, never cut.
  c.data.shuffle = True
  c.data.num_epochs = 0  # 0 = repeat forever.

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 128  # Prompts per optimizer step (global).
  c.rollout.num_samples = 4  # On-policy responses per prompt (n).
  c.rollout.max_new_tokens = 8096  # Response budget.
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0  # 0 = no top-k filter.
  c.rollout.micro_batch = 64  # Rows sampled at once (bounds the KV cache).
  c.rollout.prompt_buckets = (256, 512, 1024)  # Prompt paddings; bounds prefill compiles.

  c.guidance = ml_collections.ConfigDict()
  c.guidance.per_prompt = 1  # Guided rollouts per prompt (used when objective.guidance).
  c.guidance.max_teacher_tokens = 8096  # Length of generated teacher responses.
  c.guidance.teacher_temperature = 0.6  # Sampling temperature for generated teacher responses.

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "tropd"  # One of tropd_jax.objectives.OBJECTIVES.
  c.objective.top_k = 64
  # None = the named objective's preset (METHOD.md §6).
  c.objective.region = ml_collections.FieldReference(None, field_type=str)
  c.objective.outlier = ml_collections.FieldReference(None, field_type=str)
  c.objective.guidance = ml_collections.FieldReference(None, field_type=bool)
  c.objective.log_tau = math.log(0.1)
  c.objective.fkl_support = "topk"
  c.objective.fkl_mode = "loss"
  c.objective.beta = 0.001
  c.objective.jsd_beta = 0.5
  c.objective.entropy_frac = 0.2
  c.objective.entropy_tau = 1.0
  c.objective.clip_eps = 0.2

  c.train = ml_collections.ConfigDict()
  c.train.lr = 5e-6
  c.train.schedule = "constant"  # constant | cosine
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip = 1.0  # Global-norm clip.
  c.train.micro_batch = 32  # Rows per gradient-accumulation micro-batch.
  c.train.ppo_epochs = 1  # Updates per batch; >1 uses the PPO-clipped ratio.
  c.train.score_chunk = 512  # Positions per chunk of the vocabulary projection.
  c.train.max_bad_steps = 3  # Consecutive non-finite steps that stop the run.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 20  # Steps between checkpoints.
  c.checkpoint.keep = 3  # Checkpoints kept.
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.path = ""  # JSONL with problem/answer; "" = no evaluation.
  c.eval.every = 0  # Steps between in-training evaluations; 0 = only before and after.
  c.eval.k = 4  # Samples per problem (avg@k).
  c.eval.max_new_tokens = 8096
  c.eval.temperature = 0.6
  c.eval.limit = 0  # Problems used; 0 = all.

  c.log_every = 1
  c.lock()
  return c


_CHOICES = {
    "student.dtype": ("bfloat16", "float32"),
    "student.compute_dtype": ("bfloat16", "float32"),
    "teacher.dtype": ("bfloat16", "float32"),
    "train.schedule": ("constant", "cosine"),
    "attention_impl": ("auto", "einsum", "splash"),
}
_POSITIVE = (
    "steps", "rollout.prompts_per_step", "rollout.num_samples", "rollout.max_new_tokens",
    "rollout.micro_batch", "train.micro_batch", "train.ppo_epochs", "train.score_chunk",
    "train.max_bad_steps", "checkpoint.every", "checkpoint.keep", "eval.k", "eval.max_new_tokens",
    "data.max_prompt_tokens", "log_every", "guidance.max_teacher_tokens",
)
_NON_NEGATIVE = (
    "train.lr", "train.weight_decay", "train.grad_clip", "train.warmup_steps", "rollout.top_k",
    "rollout.temperature", "guidance.per_prompt", "eval.every", "eval.limit", "data.num_epochs",
    "guidance.teacher_temperature", "eval.temperature", "schedule_steps",
)
_REQUIRED = ("workdir", "student.path", "teacher.path", "data.train_path")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file given as ``path.py[:variant]``."""
  import importlib.util
  import os

  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location("tropd_run_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


RUN_CONFIG = "run_config.json"
"""The config of the run in a work directory (written by ``run_guard.record_run_config``)."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = f"{workdir.rstrip('/')}/{RUN_CONFIG}"
  if not fsspec.open(path).fs.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a tropd_jax work directory.")
  with fsspec.open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _flatten(config, prefix="") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ``ConfigError`` (a ValueError) naming the first field whose name or value is wrong."""
  known = _flatten(defaults())
  for name, value in _flatten(config).items():
    if name not in known:
      raise ConfigError(
          f"config field {name!r} does not exist; see tropd_jax/config.py for the fields."
      )
  for name in _REQUIRED:
    if not _get(config, name):
      raise ConfigError(f"config field {name!r} is empty; set it (e.g. --config.{name}=...).")
  for name, choices in _CHOICES.items():
    if _get(config, name) not in choices:
      raise ConfigError(f"config field {name}={_get(config, name)!r} is not one of {choices}.")
  for name in _POSITIVE:
    if not _get(config, name) > 0:
      raise ConfigError(f"config field {name}={_get(config, name)!r} must be > 0.")
  for name in _NON_NEGATIVE:
    if not _get(config, name) >= 0:
      raise ConfigError(f"config field {name}={_get(config, name)!r} must be >= 0.")
  if not 0 < config.rollout.top_p <= 1:
    raise ConfigError(f"config field rollout.top_p={config.rollout.top_p!r} must be in (0, 1].")
  if config.objective.name not in OBJECTIVES:
    raise ConfigError(
        f"config field objective.name={config.objective.name!r} is not one of {sorted(OBJECTIVES)}."
    )
  buckets = tuple(config.rollout.prompt_buckets)
  if not buckets or list(buckets) != sorted(buckets) or buckets[-1] < config.data.max_prompt_tokens:
    raise ConfigError(
        f"config field rollout.prompt_buckets={buckets} must be increasing and end at or above "
        f"data.max_prompt_tokens={config.data.max_prompt_tokens}."
    )
  objective_config(config)
  rows = rows_per_step(config)
  if rows % config.train.micro_batch:
    raise ConfigError(
        f"config field train.micro_batch={config.train.micro_batch} must divide the "
        f"{rows} rollout rows of a step (prompts_per_step x (num_samples + guided))."
    )
  if config.rollout.micro_batch % config.rollout.num_samples:
    raise ConfigError(
        f"config field rollout.micro_batch={config.rollout.micro_batch} must be a multiple of "
        f"rollout.num_samples={config.rollout.num_samples}."
    )
  _check_sampling(config)
  _check_schedule(config)
  return config


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
  """The ``ObjectiveConfig`` of a run: the named preset with the config's values applied."""
  fields = {k: v for k, v in config.objective.items() if k != "name" and v is not None}
  try:
    return ObjectiveConfig.preset(config.objective.name, **fields)
  except ValueError as e:
    raise ConfigError(f"config field {e}") from None


def rows_per_step(config: ml_collections.ConfigDict) -> int:
  """Rollout rows per step: n on-policy (+ guided) responses for every prompt."""
  guided = config.guidance.per_prompt if objective_config(config).guidance else 0
  return config.rollout.prompts_per_step * (config.rollout.num_samples + guided)


def samples_from_student(obj: ObjectiveConfig) -> bool:
  """Whether the objective's estimate needs tokens drawn from the student's own distribution.

  The policy-gradient term of OPD, the trust region's ratio ``πT/πθ`` and the sampled-token
  terms of the other objectives weigh each sampled token by the student's probability of it:
  tokens drawn at another temperature, or from a top-p/top-k truncated distribution, would make
  them compare the teacher with a student that did not sample them. Only the top-k forward KL
  as a loss (``topk_fkl``) reads the sampled tokens as contexts alone.
  """
  return obj.name != "topk_fkl" or obj.fkl_mode == "advantage"


def _check_sampling(config: ml_collections.ConfigDict) -> None:
  """Rollouts must come from the student itself for every objective that assumes it."""
  r = config.rollout
  changed = [f"rollout.{name}={value!r}" for name, value, plain in (
      ("temperature", r.temperature, 1.0), ("top_p", r.top_p, 1.0), ("top_k", r.top_k, 0))
      if value != plain]
  if changed and samples_from_student(objective_config(config)):
    raise ConfigError(
        f"config field {', '.join(changed)} with objective.name={config.objective.name!r}: "
        "this objective weighs each sampled token by the student's own probability of it "
        "(policy gradient, trust-region ratio), so rollouts must be drawn from the student "
        "unchanged; set rollout.temperature=1.0, rollout.top_p=1.0 and rollout.top_k=0.")


def schedule_steps(config: ml_collections.ConfigDict) -> int:
  """Steps over which the guidance cosine and a cosine learning rate anneal."""
  return config.schedule_steps or config.steps


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  total = schedule_steps(config)
  if config.train.schedule == "cosine" and config.steps > total:
    raise ConfigError(
        f"config field steps={config.steps} goes past schedule_steps={total} with "
        "train.schedule='cosine': the learning rate is 0 after that step. Stretch the schedule "
        f"(--config.schedule_steps={config.steps}; on a resumed run also "
        "--config.resume_changes=schedule_steps) or keep steps.")
