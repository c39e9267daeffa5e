"""Launching into a work directory: the resume guard, the history of run_config.json, and the
up-front checks that need the run's data.

A work directory holds one run. Its ``run_config.json`` is the config the run was launched with;
a launch into the same directory resumes that run, so ``prepare`` compares the two configs field
by field before anything is loaded:

  safe on resume   ``steps``, ``schedule_steps`` left at 0, ``eval.*``, ``checkpoint.*``,
                   ``log_every``, ``mesh.*``, ``attention_impl``, ``student.remat``,
                   ``resume_changes``, ``workdir``: they change where, how fast or how often,
                   not what is computed. Each change is logged.
  any other field  models, dtypes, objective, optimizer, data, seed, rollout, guidance, batch
                   and chunk sizes: the launch stops with one message that lists each changed
                   field (old -> new) and the two ways on: a new work directory, or naming the
                   fields in ``--config.resume_changes`` (each allowed change is logged).

``steps`` may grow on resume; the guidance cosine and a cosine learning rate keep the total of
the first launch (``schedule_steps``, resolved here and recorded), so the extra steps go on with
α = 0 and the final learning rate instead of restarting the schedules from a new total.

``record_run_config`` writes ``run_config.json`` once the run has opened its models, data and
checkpoint; a config it replaces is kept as ``run_config.<time>.json`` (the config in force until
then), so a failed launch never overwrites the record of the run.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import fsspec
import jax
import ml_collections

from tropd_jax import config as config_lib
from tropd_jax.cli import UserError

log = logging.getLogger(__name__)

SAFE_ON_RESUME = (
    "workdir", "steps", "eval.", "checkpoint.", "log_every", "mesh.", "attention_impl",
    "student.remat", "resume_changes",
)
"""Fields (or ``prefix.``es) whose change does not alter what a resumed run computes."""


class ResumeRefused(UserError):
  """The work directory holds a run launched with another config."""


def _is_safe(name: str) -> bool:
  return any(name == s or (s.endswith(".") and name.startswith(s)) for s in SAFE_ON_RESUME)


def _flat_json(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """Dotted field name → JSON value (tuples as lists, as run_config.json holds them)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(config, "")
  return out


def _run_config_path(workdir: str) -> str:
  return f"{workdir.rstrip('/')}/{config_lib.RUN_CONFIG}"


def read_recorded(workdir: str) -> dict | None:
  """The recorded config of the run in ``workdir`` as a JSON dict, or None if there is none."""
  path = _run_config_path(workdir)
  fs, fs_path = fsspec.core.url_to_fs(path)
  if not fs.exists(fs_path):
    return None
  with fs.open(fs_path, "r") as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); restore it from "
                    "run_config.<time>.json next to it, or use a new --config.workdir.") from None


def config_changes(recorded: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """``{field: (old, new)}`` of every field whose value differs from the recorded run's.

  A field the recorded config lacks (added to tropd_jax after that run was launched) had its
  default value then; ``schedule_steps`` of such a run was its ``steps``.
  """
  old = {**_flat_json(config_lib.defaults()), **_flat_json(recorded)}
  old["schedule_steps"] = old.get("schedule_steps") or old["steps"]
  new = _flat_json(config)
  if not new["schedule_steps"]:
    new["schedule_steps"] = old["schedule_steps"]  # 0: the first launch's total.
  return {name: (old.get(name), value) for name, value in new.items()
          if old.get(name) != value}


def _show(value) -> str:
  return json.dumps(value)


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The launch's config, validated against the run in its work directory; a resolved copy.

  Raises:
    config_lib.ConfigError: a bad field or value.
    ResumeRefused: the work directory holds a run with other values of fields that change
      what is computed, not named in ``resume_changes``. Nothing is written.
  """
  config = copy.deepcopy(config)
  config_lib.validate(config)
  allowed = {name.strip() for name in config.resume_changes.split(",") if name.strip()}
  known = _flat_json(config_lib.defaults())
  unknown = sorted(allowed - set(known))
  if unknown:
    raise config_lib.ConfigError(
        f"config field resume_changes={config.resume_changes!r} names {unknown}, which are not "
        "config fields; see tropd_jax/config.py for the fields.")
  check_writable(config.workdir)
  recorded = read_recorded(config.workdir)
  if recorded is None:
    config.schedule_steps = config_lib.schedule_steps(config)
    return config
  changes = config_changes(recorded, config)
  if not config.schedule_steps:
    config.schedule_steps = recorded.get("schedule_steps") or recorded["steps"]
  refused = {n: c for n, c in changes.items() if not _is_safe(n) and n not in allowed}
  if refused:
    listing = ", ".join(f"{n} {_show(a)} -> {_show(b)}" for n, (a, b) in sorted(refused.items()))
    raise ResumeRefused(
        f"work directory {config.workdir} holds a run launched with another config: {listing}. "
        "Nothing in it was changed. To start a new run, use a new --config.workdir; to go on "
        "with the changed values, add --config.resume_changes="
        f"{','.join(sorted(set(refused) | allowed))} (each change is logged).")
  for name, (old, new) in sorted(changes.items()):
    how = "allowed by resume_changes" if name in allowed else "safe on resume"
    log.warning("resuming %s with %s %s -> %s (%s).", config.workdir, name, _show(old),
                _show(new), how)
  if "steps" in changes:
    log.warning("the guidance cosine and a cosine learning rate keep schedule_steps=%d of the "
                "first launch%s.", config.schedule_steps,
                "" if config.steps <= config.schedule_steps else
                f": steps {config.schedule_steps + 1}..{config.steps} run at their end "
                "(guidance α = 0)")
  config_lib.validate(config)
  return config


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` and writes a probe file in it, so that a read-only or missing work
  directory stops the launch before models load (an ``OSError`` naming the path)."""
  fs, path = fsspec.core.url_to_fs(workdir)
  fs.makedirs(path, exist_ok=True)
  probe = f"{path.rstrip('/')}/.write_test.{jax.process_index()}"
  fs.pipe_file(probe, b"")
  fs.rm(probe)


def record_run_config(config: ml_collections.ConfigDict) -> None:
  """Writes ``run_config.json``; a different one there is kept as ``run_config.<time>.json``.

  Call once the launch has opened its models, data and checkpoint. Process 0 writes. The new
  file is written in full before the old one is moved, so a full disk leaves the old in place.
  """
  if jax.process_index() != 0:
    return
  path = _run_config_path(config.workdir)
  fs, fs_path = fsspec.core.url_to_fs(path)
  fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
  text = config.to_json_best_effort(indent=2)
  if fs.exists(fs_path):
    with fs.open(fs_path, "r") as f:
      previous = f.read()
    try:
      if json.loads(previous) == json.loads(text):
        return
    except json.JSONDecodeError:
      pass
  tmp = f"{fs_path}.tmp"
  try:
    with fs.open(tmp, "w") as f:
      f.write(text)
  except OSError as e:  # A write error (a full disk) names no file; the user needs it.
    raise OSError(e.errno, e.strerror or str(e), path) from e
  if fs.exists(fs_path):
    stem = fs_path.removesuffix(".json")
    archive, n = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}.json", 1
    while fs.exists(archive):
      archive, n = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}.{n}.json", n + 1
    fs.mv(fs_path, archive)
    log.info("kept the previous run config as %s", archive)
  fs.mv(tmp, fs_path)


def steps_of_prompts(num_prompts: int, prompts_per_step: int, num_epochs: int,
                     process_count: int = 1) -> int | None:
  """Steps the prompt stream lasts: ``num_epochs`` passes, sharded, whole batches (None: forever).

  As ``data.PromptStream`` draws them: each process takes every ``process_count``-th index of
  the repeated dataset and batches ``prompts_per_step // process_count`` of them, dropping a
  last partial batch; the process with the fewest indices ends the run.
  """
  if not num_epochs:
    return None
  total = num_prompts * num_epochs
  fewest = len(range(process_count - 1, total, process_count))
  return fewest // (prompts_per_step // process_count)


class PromptsExhausted(UserError):
  """The prompt set ran out (``data.num_epochs`` passes) before ``steps``; the run saved."""


def check_prompt_supply(config: ml_collections.ConfigDict, num_prompts: int | None, *,
                        upper_bound: bool = False) -> None:
  """Raises ``ConfigError`` when ``data.num_epochs`` passes over the prompts end before ``steps``.

  ``upper_bound``: ``num_prompts`` counts the records before prompts over the budget are
  dropped (what can be known without tokenizing the whole set); None: unknown, no check.
  """
  if num_prompts is None:
    return
  available = steps_of_prompts(num_prompts, config.rollout.prompts_per_step,
                               config.data.num_epochs, jax.process_count())
  if available is not None and available < config.steps:
    kept = "records of" if upper_bound else "prompts kept from"
    raise config_lib.ConfigError(
        f"config field data.num_epochs={config.data.num_epochs} over the {num_prompts} {kept} "
        f"{config.data.train_path} gives at most {available} steps of "
        f"rollout.prompts_per_step={config.rollout.prompts_per_step}, but steps={config.steps}: "
        "raise data.num_epochs (0 repeats forever), lower steps, or add prompts.")
