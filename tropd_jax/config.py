"""The run configuration: every field, its default, and validation at start-up.

Config files (``configs/*.py``) start from ``defaults()`` — a locked
``ml_collections.ConfigDict``, so a misspelt field fails where it is written —
and ``validate`` checks every value before anything is loaded, naming the field
and the value that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from typing import Any

import fsspec
import ml_collections
import optax

from tropd_jax.mesh import MeshConfig
from tropd_jax.cli import UserError
from tropd_jax.objectives import OBJECTIVES, ObjectiveConfig
from tropd_jax.sampling.config import SamplerConfig


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
  # Prompts: a JSONL/Parquet file, a directory of them or a glob; local, gs:// or
  # hf://datasets/<org>/<name>/<file-or-glob>. Required. `python -m tropd_jax.prepare_prompts`
  # makes one from a dataset (README, "Data").
  c.data.train_path = ""
  # Field holding the prompt: text, or a message list ({role, content} or {from, value}) whose
  # turns before the first assistant turn are the prompt (e.g. "conversations").
  c.data.prompt_key = "problem"
  c.data.answer_key = "answer"  # Field holding the reference answer (evaluation only).
  # Field with a teacher response (text, or messages: the first assistant turn); "" = generate
  # with the teacher and cache in <workdir>/teacher_responses/.
  c.data.teacher_response_key = ""
  c.data.system_prompt = ""  # Optional system message before each prompt.
  # Variables for the chat template, e.g. {"enable_thinking": False} for Qwen3; on the command
  # line: --config.data.chat_template_kwargs='{"enable_thinking": False}'.
  c.data.chat_template_kwargs = ml_collections.ConfigDict()
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
  c.rollout.slots = 64  # Rows decoded at once (global); a finished row's slot takes the next row.
  c.rollout.prompt_buckets = (256, 512, 1024)  # Context paddings of prefill; bounds its compiles.
  c.rollout.page_size = 64  # Tokens per page of the paged KV cache.
  # Pages of the KV cache pool (global); 0 = every slot can hold a whole row (never preempts).
  # Fewer pages hold more slots in the same memory: a row that cannot grow is put back in the
  # queue and sampled again later, with the same tokens (per-row keys).
  c.rollout.kv_pages = 0
  c.rollout.chunk_steps = 64  # Decode steps per call between slot refills.
  # Sampling copy of the weights: auto | replicated (over data/fsdp) | tensor (sharded over
  # fsdp and tensor); auto replicates when the copy and the KV pages fit in HBM.
  c.rollout.decode_layout = "auto"

  c.guidance = ml_collections.ConfigDict()
  c.guidance.per_prompt = 1  # Guided rollouts per prompt (used when objective.guidance).
  c.guidance.max_teacher_tokens = 8096  # Length of generated teacher responses.
  c.guidance.teacher_temperature = 0.6  # Sampling temperature for generated teacher responses.
  # Responses missing from the cache are generated for the prompts of this many steps at once
  # (python -m tropd_jax.teacher_responses generates a whole prompt set ahead of training).
  c.guidance.lookahead_steps = 8

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
  # Positions of a packed row (several sequences per row); 0 = the longest sequence a step can
  # hold (largest prompt bucket + max_new_tokens), rounded up to a multiple of 128.
  c.train.pack_length = 0
  c.train.max_bad_steps = 3  # Consecutive non-finite steps that stop the run.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 20  # Steps between checkpoints.
  c.checkpoint.keep = 3  # Checkpoints kept.
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  # JSONL problem sets (local, gs://), each reported on its own and in the mean (avg@k, pass@k);
  # () = no evaluation. On the command line: --config.eval.paths="('a.jsonl', 'b.jsonl')".
  c.eval.paths = ()
  c.eval.problem_key = "problem"  # Field of an evaluation record holding the problem text.
  c.eval.answer_key = "answer"  # Field holding the gold answer.
  c.eval.every = 0  # Steps between in-training evaluations; 0 = only before and after.
  c.eval.k = 4  # Samples per problem (avg@k).
  c.eval.max_new_tokens = 8096
  c.eval.temperature = 0.6
  c.eval.top_p = 1.0  # Nucleus sampling of evaluation responses (1 = off).
  c.eval.top_k = 0  # 0 = no top-k filter.
  c.eval.limit = 0  # Problems used from each set; 0 = all.

  c.metrics = ml_collections.ConfigDict()
  # Weights & Biases project; "" = no W&B. Needs `pip install wandb` and `wandb login` (or
  # WANDB_MODE=offline). A resumed run continues the same W&B run.
  c.metrics.wandb_project = ""
  c.metrics.wandb_entity = ""  # W&B team or user; "" = your default entity.
  c.metrics.wandb_run_name = ""  # "" = the work directory's name.

  c.log_every = 1
  c.lock()
  return c


_CHOICES = {
    "student.dtype": ("bfloat16", "float32"),
    "student.compute_dtype": ("bfloat16", "float32"),
    "teacher.dtype": ("bfloat16", "float32"),
    "train.schedule": ("constant", "cosine"),
    "attention_impl": ("auto", "einsum", "splash"),
    "rollout.decode_layout": ("auto", "replicated", "tensor"),
}
_POSITIVE = (
    "steps", "rollout.prompts_per_step", "rollout.num_samples", "rollout.max_new_tokens",
    "rollout.slots", "rollout.page_size", "rollout.chunk_steps", "train.micro_batch", "train.ppo_epochs", "train.score_chunk",
    "train.max_bad_steps", "checkpoint.every", "checkpoint.keep", "eval.k", "eval.max_new_tokens",
    "data.max_prompt_tokens", "log_every", "guidance.max_teacher_tokens",
    "guidance.lookahead_steps",
)
_NON_NEGATIVE = (
    "train.lr", "train.weight_decay", "train.grad_clip", "train.warmup_steps", "rollout.top_k",
    "rollout.temperature", "guidance.per_prompt", "eval.every", "eval.limit", "data.num_epochs",
    "guidance.teacher_temperature", "eval.temperature", "eval.top_k", "rollout.kv_pages",
    "train.pack_length", "schedule_steps",
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
    raise ConfigError(f"{path} does not exist: {workdir!r} is not a tropd_jax work directory.")
  with fsspec.open(path) as f:
    recorded = _flatten(ml_collections.ConfigDict(json.load(f)))
  if "eval.path" in recorded:  # Recorded before eval.path became the list eval.paths.
    single = recorded.pop("eval.path")
    recorded.setdefault("eval.paths", (single,) if single else ())
  # On the defaults: fields added since the run started take their default values.
  config = defaults()
  for name, value in recorded.items():
    try:
      config.update_from_flattened_dict({name: tuple(value) if isinstance(value, list) else value})
    except (KeyError, AttributeError):
      raise ConfigError(f"{path}: field {name!r} is not a config field of this version of "
                        "tropd_jax; pass the run's config file with --config instead.") from None
  config.workdir = workdir  # Where it is now: a run directory may have been moved or copied.
  return config


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


_FREE_FORM = ("data.chat_template_kwargs",)  # Dicts whose keys are the user's, not fields.


def _flatten(config, prefix="") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and name not in _FREE_FORM:
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
  for name in ("rollout.top_p", "eval.top_p"):
    if not 0 < _get(config, name) <= 1:
      raise ConfigError(f"config field {name}={_get(config, name)!r} must be in (0, 1].")
  _validate_eval_paths(config.eval.paths)
  if config.objective.name not in OBJECTIVES:
    raise ConfigError(
        f"config field objective.name={config.objective.name!r} is not one of {sorted(OBJECTIVES)}."
    )
  kwargs = config.data.chat_template_kwargs
  if not isinstance(kwargs, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"config field data.chat_template_kwargs={kwargs!r} must be a dict of "
                     "chat template variables, e.g. {'enable_thinking': False}.")
  for name in ("data.prompt_key", "data.answer_key"):
    if not isinstance(_get(config, name), str) or not _get(config, name):
      raise ConfigError(f"config field {name}={_get(config, name)!r} must name a field.")
  buckets = tuple(config.rollout.prompt_buckets)
  if not buckets or list(buckets) != sorted(buckets) or buckets[-1] < config.data.max_prompt_tokens:
    raise ConfigError(
        f"config field rollout.prompt_buckets={buckets} must be increasing and end at or above "
        f"data.max_prompt_tokens={config.data.max_prompt_tokens}."
    )
  objective_config(config)
  pack = config.train.pack_length
  longest = buckets[-1] + config.rollout.max_new_tokens
  if pack and pack < longest:
    raise ConfigError(
        f"config field train.pack_length={pack} cannot hold the longest sequence of a step "
        f"({longest} = rollout.prompt_buckets[-1] + rollout.max_new_tokens); raise it or set 0.")
  _check_sampling(config)
  _check_schedule(config)
  return config


def _validate_eval_paths(paths) -> None:
  if isinstance(paths, str) or not all(isinstance(p, str) and p for p in paths):
    raise ConfigError(
        f"config field eval.paths={paths!r} must be a tuple of file paths, e.g. "
        "--config.eval.paths=\"('aime24.jsonl', 'aime25.jsonl')\".")
  names = [eval_set_name(p) for p in paths]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"config field eval.paths={tuple(paths)!r} names the set {repeated[0]!r} "
                     "twice (a set is named by its file name); rename one of the files.")


def eval_set_name(path: str) -> str:
  """How an evaluation set is reported: its file name without the extension (``aime24``)."""
  return posixpath.splitext(posixpath.basename(str(path).rstrip("/")))[0]


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
  """The ``ObjectiveConfig`` of a run: the named preset with the config's values applied."""
  fields = {k: v for k, v in config.objective.items() if k != "name" and v is not None}
  try:
    return ObjectiveConfig.preset(config.objective.name, **fields)
  except ValueError as e:
    raise ConfigError(f"config field {e}") from None


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


# --- Typed settings: the one place a config becomes what the run uses ---------------------------


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """One model of the run: checkpoint, master dtype, forward dtype, rematerialization."""

  path: str
  dtype: str
  compute_dtype: str
  remat: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW with global-norm clipping and a constant or cosine learning rate."""

  lr: float
  schedule: str
  warmup_steps: int
  steps: int
  weight_decay: float
  b1: float
  b2: float
  grad_clip: float

  def learning_rate(self) -> optax.Schedule:
    if self.schedule == "cosine":
      return optax.warmup_cosine_decay_schedule(0.0, self.lr, max(self.warmup_steps, 1), self.steps)
    if self.warmup_steps:
      return optax.linear_schedule(0.0, self.lr, self.warmup_steps)
    return optax.constant_schedule(self.lr)

  def make(self) -> optax.GradientTransformation:
    tx = optax.adamw(self.learning_rate(), b1=self.b1, b2=self.b2,
                     weight_decay=self.weight_decay)
    return optax.chain(optax.clip_by_global_norm(self.grad_clip), tx) if self.grad_clip > 0 else tx


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """What a step samples, and how the engine holds it."""

  prompts_per_step: int
  num_samples: int
  guided_per_prompt: int  # 0 when the objective uses no guidance.
  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  slots: int
  prompt_buckets: tuple[int, ...]
  page_size: int
  kv_pages: int
  chunk_steps: int
  decode_layout: str
  teacher_max_new_tokens: int
  teacher_temperature: float
  cache_dtype: str

  @property
  def rows_per_step(self) -> int:
    """Rows of a step: n on-policy (+ guided) responses for every prompt."""
    return self.prompts_per_step * (self.num_samples + self.guided_per_prompt)

  @property
  def max_sequence(self) -> int:
    """The longest sequence a step can hold: a full prompt bucket and a whole response."""
    return self.prompt_buckets[-1] + self.max_new_tokens

  def sampler(self, *, stop_ids, pad_id: int, vocab_size: int, teacher: bool = False,
              **overrides) -> SamplerConfig:
    """The ``SamplerConfig`` of the student's rollouts, or of the teacher's guidance responses."""
    budget = self.teacher_max_new_tokens if teacher else self.max_new_tokens
    fields = dict(
        max_new_tokens=budget,
        temperature=self.teacher_temperature if teacher else self.temperature,
        top_p=1.0 if teacher else self.top_p, top_k=0 if teacher else self.top_k,
        stop_ids=tuple(stop_ids), vocab_size=vocab_size, pad_id=pad_id, slots=self.slots,
        page_size=self.page_size, num_pages=self.kv_pages, chunk_steps=self.chunk_steps,
        length_buckets=self.prompt_buckets, max_row_tokens=self.prompt_buckets[-1] + budget,
        cache_dtype=self.cache_dtype)
    fields.update(overrides)
    return SamplerConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The update: micro-batching, packing, chunked scoring."""

  micro_batch: int
  ppo_epochs: int
  score_chunk: int
  max_bad_steps: int
  pack_length: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """A validated run config as the typed settings every stage reads (see ``settings``)."""

  workdir: str
  seed: int
  steps: int
  mesh: MeshConfig
  student: ModelSettings
  teacher: ModelSettings
  attention_impl: str
  objective: ObjectiveConfig
  optimizer: OptimizerSettings
  rollout: RolloutSettings
  train: TrainSettings
  max_prompt_tokens: int
  schedule_steps: int  # Horizon of the guidance cosine and a cosine learning rate.


def settings(config: ml_collections.ConfigDict) -> Settings:
  """Validates ``config`` and returns its ``Settings``."""
  validate(config)
  c = config
  objective = objective_config(c)
  r, t = c.rollout, c.train
  rollout = RolloutSettings(
      prompts_per_step=r.prompts_per_step, num_samples=r.num_samples,
      guided_per_prompt=c.guidance.per_prompt if objective.guidance else 0,
      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
      top_k=r.top_k, slots=r.slots, prompt_buckets=tuple(int(b) for b in r.prompt_buckets),
      page_size=r.page_size, kv_pages=r.kv_pages, chunk_steps=r.chunk_steps,
      decode_layout=r.decode_layout, teacher_max_new_tokens=c.guidance.max_teacher_tokens,
      teacher_temperature=c.guidance.teacher_temperature, cache_dtype=c.student.compute_dtype)
  pack = t.pack_length or -(-rollout.max_sequence // 128) * 128
  return Settings(
      workdir=c.workdir, seed=c.seed, steps=c.steps, mesh=MeshConfig(**c.mesh),
      student=ModelSettings(c.student.path, c.student.dtype, c.student.compute_dtype,
                            c.student.remat),
      teacher=ModelSettings(c.teacher.path, c.teacher.dtype, c.teacher.dtype),
      attention_impl=c.attention_impl, objective=objective,
      optimizer=OptimizerSettings(
          lr=t.lr, schedule=t.schedule, warmup_steps=t.warmup_steps, steps=schedule_steps(c),
          weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, grad_clip=t.grad_clip),
      rollout=rollout,
      train=TrainSettings(micro_batch=t.micro_batch, ppo_epochs=t.ppo_epochs,
                          score_chunk=t.score_chunk, max_bad_steps=t.max_bad_steps,
                          pack_length=pack),
      max_prompt_tokens=c.data.max_prompt_tokens, schedule_steps=schedule_steps(c))
