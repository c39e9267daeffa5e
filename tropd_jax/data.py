"""Prompts for distillation: data shards → records → chat-templated ids → a grain stream.

``data.train_path`` names JSONL or Parquet shards (``tropd_jax.shards``: a file, a
directory or a glob; local, ``gs://`` or ``hf://datasets/<org>/<name>/<file-or-glob>``),
read in *units*: a Parquet row group or a whole JSONL file. Every epoch the units are
shuffled (seeded) and dealt out over the processes, so each process reads only its own
units; with fewer units than processes every process reads every unit and keeps every
``process_count``-th row. Rows are shuffled within a unit and tokenized with the chat
template as their unit is read; prompts over the budget are counted and dropped, never cut.
The position in the stream is grain's iterator state (a few integers), saved with every
checkpoint; restoring it re-reads one unit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import grain
import jax
import numpy as np

from tropd_jax.models.tokenizer import Tokenizer
from tropd_jax.shards import Source, write_new_file

log = logging.getLogger(__name__)

_PIPELINE_VERSION = 2  # Changes when the meaning of the saved stream state changes.


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One training prompt.

  Attributes:
    index: the row's key, ``shard << 32 | row`` (shards in sorted path order, rows in file
      order; a single file's rows are 0, 1, …). Stable across runs; keys the teacher-response
      cache.
    ids: chat-templated prompt token ids.
    answer: reference answer text ("" if none).
    teacher_ids: a teacher response's token ids for off-policy guidance, if the data has one.
  """

  index: int
  ids: tuple[int, ...]
  answer: str = ""
  teacher_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a record becomes a ``Prompt`` (the ``data.*`` fields of a run).

  Attributes:
    prompt_key: field holding the prompt: text, or a list of messages (``{role, content}`` or
      ``{from, value}``) of which the turns before the first assistant turn are the prompt.
    answer_key: field holding the reference answer (text or a number; may be absent).
    teacher_response_key: field holding a teacher response (text, or a message list whose first
      assistant turn is the response); "" = none in the data.
    system_prompt: system message put before each prompt ("" = none).
    max_prompt_tokens: longer chat-templated prompts are dropped.
  """

  prompt_key: str = "problem"
  answer_key: str = "answer"
  teacher_response_key: str = ""
  system_prompt: str = ""
  max_prompt_tokens: int = 1024

  @classmethod
  def from_config(cls, data_config) -> PromptFormat:
    d = data_config
    return cls(d.prompt_key, d.answer_key, d.teacher_response_key, d.system_prompt,
               d.max_prompt_tokens)


# --------------------------------------------------------------------------- records → text


_ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant",
          "gpt": "assistant"}


def _turn(turn: Any, where: str) -> dict[str, str]:
  """``{role, content}`` of one message in either spelling (role/content or from/value)."""
  if not isinstance(turn, Mapping):
    raise ValueError(f"{where}: a message is a {type(turn).__name__}, not a "
                     "{role, content} or {from, value} mapping.")
  role = turn.get("role") or turn.get("from")
  content = turn.get("content") if turn.get("content") is not None else turn.get("value")
  if not isinstance(role, str) or role.lower() not in _ROLES:
    raise ValueError(f"{where}: message role {role!r} is not one of {sorted(_ROLES)}.")
  if not isinstance(content, str):
    raise ValueError(f"{where}: a {role!r} message's content is a {type(content).__name__}, "
                     "not text.")
  return {"role": _ROLES[role.lower()], "content": content}


def prompt_messages(value: Any, where: str = "prompt") -> list[dict[str, str]]:
  """The prompt of a record's prompt field as chat messages ``[{role, content}]``.

  Args:
    value: text (one user turn), or a message list in either spelling (``role``/``content``
      with user/assistant/system, or ``from``/``value`` with human/gpt/system) whose turns
      before the first assistant turn are the prompt.
    where: names the record and field in error messages.

  Raises:
    ValueError: ``value`` is neither text nor a message list, a message is malformed, or no
      user turn comes before the first assistant turn.
  """
  if isinstance(value, str):
    return [{"role": "user", "content": value}]
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"{where} is a {type(value).__name__}, not text or a list of messages; "
                     "point data.prompt_key at the prompt.")
  messages = []
  for turn in value:
    message = _turn(turn, where)
    if message["role"] == "assistant":
      break
    messages.append(message)
  if not any(m["role"] == "user" for m in messages):
    raise ValueError(f"{where}: no user turn before the first assistant turn.")
  return messages


def response_text(value: Any, where: str = "response") -> str:
  """A teacher response: text, or the first assistant turn of a message list."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    for turn in value:
      message = _turn(turn, where)
      if message["role"] == "assistant":
        return message["content"]
    raise ValueError(f"{where}: the messages hold no assistant turn.")
  raise ValueError(f"{where} is a {type(value).__name__}, not text or a list of messages.")


def answer_text(value: Any, where: str = "answer") -> str:
  """A reference answer as text: text as is, a number written out, None as ""."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  raise ValueError(f"{where} is a {type(value).__name__}, not text or a number.")


def format_prompt(value: Any, tokenizer: Tokenizer, *, system_prompt: str = "",
                  where: str = "prompt") -> list[int]:
  """Chat-templated ids of a prompt field's value (text or messages), as training sees them.

  The one formatting of prompts for training and evaluation: the system prompt, then the
  prompt's messages, the tokenizer's ``chat_template_kwargs`` applied.

  Raises:
    ValueError: the value is not a prompt (see ``prompt_messages``), or it has a system turn
      of its own while ``system_prompt`` is set.
  """
  messages = prompt_messages(value, where)
  if system_prompt and any(m["role"] == "system" for m in messages):
    raise ValueError(f"{where} has a system turn of its own and data.system_prompt is set; "
                     "leave data.system_prompt empty for this data.")
  return tokenizer.encode_prompt(messages, system=system_prompt or None)


def to_prompt(record: Mapping[str, Any], key: int, tokenizer: Tokenizer, fmt: PromptFormat,
              where: str) -> Prompt | None:
  """The ``Prompt`` of a record, or None if it is over ``fmt.max_prompt_tokens``.

  Raises:
    KeyError: the record lacks the prompt field (or the teacher-response field when set).
    ValueError: a field has the wrong type (the message names it).
  """
  if fmt.prompt_key not in record:
    raise KeyError(f"{where} has no field {fmt.prompt_key!r} (fields: {sorted(record)}); "
                   "set data.prompt_key.")
  ids = format_prompt(record[fmt.prompt_key], tokenizer, system_prompt=fmt.system_prompt,
                      where=f"{where}, field {fmt.prompt_key!r}")
  if len(ids) > fmt.max_prompt_tokens:
    return None
  teacher_ids = None
  if fmt.teacher_response_key:
    if fmt.teacher_response_key not in record:
      raise KeyError(f"{where} has no field {fmt.teacher_response_key!r} "
                     f"(fields: {sorted(record)}); set data.teacher_response_key.")
    text = response_text(record[fmt.teacher_response_key],
                         f"{where}, field {fmt.teacher_response_key!r}")
    teacher_ids = tuple(tokenizer.encode(text))
  answer = answer_text(record.get(fmt.answer_key), f"{where}, field {fmt.answer_key!r}")
  return Prompt(key, tuple(ids), answer, teacher_ids)


# --------------------------------------------------------------------------- the stream


class _UnitPrompts(grain.experimental.FlatMapTransform):
  """``(epoch, unit id)`` → the unit's prompts: rows shuffled, strided, tokenized, filtered."""

  def __init__(self, source: Source, tokenizer: Tokenizer, fmt: PromptFormat, *, seed: int,
               shuffle: bool, row_offset: int, row_step: int, units_per_epoch: int,
               process: int | None):
    self.source, self.tokenizer, self.fmt = source, tokenizer, fmt
    self.seed, self.shuffle = seed, shuffle
    self.row_offset, self.row_step = row_offset, row_step
    self.units_per_epoch = units_per_epoch
    self.process = process  # Named in messages when there are several.
    self.columns = [k for k in (fmt.prompt_key, fmt.answer_key, fmt.teacher_response_key) if k]
    self.counts = {"kept": 0, "over_budget": 0}
    self._epoch = None
    self._empty_units = self._empty_rows = 0  # Units in a row that gave no prompt; their rows.

  def flat_map(self, element) -> list[Prompt]:
    epoch, unit_id = (int(x) for x in element)
    if epoch != self._epoch:
      if self._epoch is not None:
        log.info("data epoch %d done on process %d: %d prompts kept, %d over "
                 "data.max_prompt_tokens=%d dropped so far", self._epoch, self.process or 0,
                 self.counts["kept"], self.counts["over_budget"], self.fmt.max_prompt_tokens)
      self._epoch = epoch
    unit = self.source.units[unit_id]
    records = self.source.read(unit, self.columns)
    order = np.arange(len(records))
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch, unit_id]).permutation(len(records))
    prompts = []
    rows = order[self.row_offset::self.row_step]
    for row in rows:
      row = int(row)
      prompt = to_prompt(records[row], self.source.key(unit, row), self.tokenizer, self.fmt,
                         self.source.where(unit, row))
      if prompt is None:
        self.counts["over_budget"] += 1
      else:
        prompts.append(prompt)
    self.counts["kept"] += len(prompts)
    self._empty_units = 0 if prompts else self._empty_units + 1
    self._empty_rows = 0 if prompts else self._empty_rows + len(rows)
    if self._empty_units >= self.units_per_epoch:  # A whole epoch without a prompt.
      share = f" (process {self.process}'s share)" if self.process is not None else ""
      if not self._empty_rows:
        raise ValueError(f"data path {self.source.path!r}{share} holds no records; point "
                         "data.train_path at a dataset.")
      raise ValueError(
          f"every one of the {self._empty_rows} prompts of {self.source.path!r}{share} is "
          f"longer than data.max_prompt_tokens={self.fmt.max_prompt_tokens}; raise the budget.")
    return prompts


class PromptStream:
  """This process's prompts for each step, shuffled, repeated and sharded by grain.

  Each process draws ``prompts_per_step // process_count`` prompts per step from its own
  units; ``global_batch`` gathers the step's prompts of every process. ``state()`` /
  ``restore()`` carry the position across checkpoints; the same seed gives the same stream.
  """

  def __init__(self, source: Source, tokenizer: Tokenizer, fmt: PromptFormat, *,
               prompts_per_step: int, seed: int, shuffle: bool = True, num_epochs: int = 0,
               process_index: int | None = None, process_count: int | None = None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if prompts_per_step % count:
      raise ValueError(
          f"rollout.prompts_per_step={prompts_per_step} does not divide over {count} processes."
      )
    source.check_field(fmt.prompt_key, "data.prompt_key")
    if fmt.teacher_response_key:
      source.check_field(fmt.teacher_response_key, "data.teacher_response_key")
    self.source = source
    n = len(source.units)
    if n == 0:
      raise ValueError(f"data path {source.path!r} holds no records.")
    units = grain.MapDataset.range(n)
    if shuffle:
      units = units.shuffle(seed=seed)
    units = units.repeat(num_epochs or None).map_with_index(lambda i, u: (i // n, int(u)))
    if n >= count:  # Units dealt out: a process reads only its own.
      units, row_offset, row_step = units[index::count], 0, 1
      per_epoch = len(range(index, n, count))
    else:  # Too few units: every process reads them all and keeps its rows.
      row_offset, row_step, per_epoch = index, count, n
    self._prompts = _UnitPrompts(source, tokenizer, fmt, seed=seed, shuffle=shuffle,
                                 row_offset=row_offset, row_step=row_step,
                                 units_per_epoch=per_epoch,
                                 process=index if count > 1 else None)
    # Unit ids are computed, not read: no reader threads, no prefetch of an endless sequence.
    ids = units.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    flat = grain.experimental.FlatMapIterDataset(ids, self._prompts)
    self._iter = iter(flat.batch(prompts_per_step // count, drop_remainder=True, batch_fn=list))
    # What the saved position means: the same units, order and split over processes.
    self._fingerprint = {"version": _PIPELINE_VERSION, "units": n, "shuffle": bool(shuffle),
                         "seed": int(seed), "processes": count,
                         "prompts_per_process": prompts_per_step // count}
    self._check_first_batch(prompts_per_step // count)

  def _check_first_batch(self, size: int) -> None:
    """Reads the first batch and rewinds: data errors show before any model is loaded."""
    start = self._iter.get_state()
    try:
      next(self._iter)
    except StopIteration:
      raise ValueError(
          f"data path {self.source.path!r} gives this process fewer than {size} prompts within "
          "data.num_epochs; raise data.num_epochs (0 = repeat) or add data.") from None
    self._prompts.counts = {"kept": 0, "over_budget": 0}
    self._prompts._empty_units = self._prompts._empty_rows = 0
    self._iter.set_state(start)  # Reads the first unit again, counting it once.

  @classmethod
  def from_config(cls, config, tokenizer: Tokenizer) -> PromptStream:
    """The training stream of a run: ``data.train_path`` read as ``config.data`` says."""
    return cls(Source(config.data.train_path), tokenizer, PromptFormat.from_config(config.data),
               prompts_per_step=config.rollout.prompts_per_step, seed=config.seed,
               shuffle=config.data.shuffle, num_epochs=config.data.num_epochs)

  @property
  def counts(self) -> dict[str, int]:
    """Prompts this process kept and dropped over budget so far."""
    return dict(self._prompts.counts)

  def __iter__(self):
    return self

  def __next__(self) -> list[Prompt]:
    return next(self._iter)

  def state(self) -> dict:
    return {**self._fingerprint, "grain": self._iter.get_state()}

  def restore(self, state: dict) -> None:
    """Continues from a ``state()``; a state of other data or settings restarts the stream."""
    saved = {k: state.get(k) for k in self._fingerprint}
    if saved != self._fingerprint:
      log.warning(
          "the checkpoint's data position (%s) is for other data or data settings than this "
          "run's (%s); the prompt stream starts from its beginning.", saved, self._fingerprint)
      return
    self._iter.set_state(state["grain"])


def global_batch(stream: PromptStream) -> list[Prompt]:
  """The step's prompts of every process, in process order (each reads its own share)."""
  local = next(stream)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  blob = np.frombuffer(json.dumps([dataclasses.astuple(p) for p in local]).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  prompts = []
  for size, row in zip(sizes.reshape(-1), blobs):
    for index, ids, answer, teacher_ids in json.loads(row[: int(size)].tobytes()):
      prompts.append(Prompt(index, tuple(ids), answer,
                            None if teacher_ids is None else tuple(teacher_ids)))
  return prompts


# --------------------------------------------------------------------------- teacher responses


class TeacherResponseCache:
  """Teacher responses generated once per prompt, kept in ``<directory>/*.jsonl``.

  Each ``add`` writes one new shard, whole, under a temporary name that is then renamed: no
  file is ever appended to or rewritten, so the cache works on file systems that cannot
  append (gs://, memory://), and a failed write leaves no partial shard. Reading takes every
  shard as one set, and also the single file ``<directory>.jsonl`` earlier versions appended
  to. Lines cut short by a crash are skipped with a warning.
  """

  def __init__(self, directory: str):
    self.directory = directory.rstrip("/")
    self.fs, self._root = fsspec.core.url_to_fs(self.directory)
    self.responses: dict[int, tuple[int, ...]] = {}
    legacy = self._root + ".jsonl"
    files = [legacy] if self.fs.isfile(legacy) else []
    if self.fs.isdir(self._root):
      files += sorted(self.fs.glob(f"{self._root}/*.jsonl"))
    for path in files:
      self._read(path)

  def _read(self, path: str) -> None:
    with self.fs.open(path, "rt", encoding="utf-8") as f:
      for line in f:
        if line.strip():
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            log.warning("skipping a truncated line in %s", path)
            continue
          self.responses.setdefault(int(rec["index"]), tuple(rec["ids"]))

  def get(self, index: int) -> tuple[int, ...] | None:
    return self.responses.get(index)

  def add(self, new: dict[int, Sequence[int]]) -> None:
    """Keeps ``new`` responses (by prompt index); process 0 writes them as one new shard."""
    self.responses.update({int(i): tuple(int(t) for t in ids) for i, ids in new.items()})
    if jax.process_index() != 0 or not new:
      return
    lines = "".join(json.dumps({"index": int(i), "ids": [int(t) for t in ids]}) + "\n"
                    for i, ids in new.items())
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
    write_new_file(f"{self.directory}/{name}", lambda f: f.write(lines))
