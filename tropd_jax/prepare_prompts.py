"""Makes the prompt file a run reads from a dataset: filter, dedup, length filter, shuffle.

  python -m tropd_jax.prepare_prompts --config=configs/aime.py \\
      --source='hf://datasets/open-thoughts/OpenThoughts3-1.2M/data/train-*.parquet' \\
      --source_prompt_key=conversations --where=domain=math

The run's config supplies the tokenizer (``student.path``, ``data.chat_template_kwargs``),
``data.system_prompt`` and the budget ``data.max_prompt_tokens``, so the prompts kept are
those the run keeps, and the output: ``data.train_path`` (or ``--out``), a Parquet (or JSONL)
file with the fields ``data.prompt_key`` (the user's text), ``data.answer_key`` and
``source_row`` (the row's key in the source). ``--source`` is read like ``data.train_path``:
a file, a directory or a glob; local, ``gs://`` or ``hf://datasets/<org>/<name>/<file-or-glob>``.

A record is dropped when a ``--where`` field differs, its prompt is not a single user turn,
empty, a repeat of an earlier prompt (after stripping whitespace) or over the budget; every
drop is counted and printed. The kept prompts are written in a seeded random order, in row
groups of ``--row_group_size``: the units the training stream shuffles and deals out over
processes. An existing output is never overwritten.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import fsspec
import numpy as np
import tqdm

from tropd_jax import data, shards
from tropd_jax.models.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which source records become prompts, and under which fields they are written.

  Attributes:
    prompt_key: the source's prompt field (text or a message list).
    answer_key: the source's answer field ("" = none; a record without it gets "").
    where: ``{field: value}`` a record must match (compared as text).
    out_prompt_key: the output's prompt field (the run's ``data.prompt_key``).
    out_answer_key: the output's answer field (the run's ``data.answer_key``).
  """

  prompt_key: str
  answer_key: str = ""
  where: Mapping[str, str] = dataclasses.field(default_factory=dict)
  out_prompt_key: str = "problem"
  out_answer_key: str = "answer"


def parse_where(specs: Sequence[str]) -> dict[str, str]:
  """``["domain=math"]`` → ``{"domain": "math"}``."""
  where = {}
  for spec in specs:
    field, sep, value = spec.partition("=")
    if not sep or not field:
      raise ValueError(f"--where={spec!r} is not FIELD=VALUE (e.g. --where=domain=math).")
    where[field] = value
  return where


def prepare(source: str, out: str, tokenizer: Tokenizer, selection: Selection, *,
            system_prompt: str = "", max_prompt_tokens: int, seed: int = 0,
            limit: int | None = None, row_group_size: int = 1024,
            progress: bool = True) -> dict[str, int]:
  """Reads ``source``, keeps the prompts a run would use and writes them to ``out``.

  Args:
    source: a data path (file, directory or glob; local, gs:// or hf://datasets/...).
    out: the prompt file to write (``.parquet`` or ``.jsonl``); must not exist.
    tokenizer: the run's tokenizer, with its chat template options.
    selection: the source fields to read and the output fields to write.
    system_prompt: the run's system prompt (counts towards the budget).
    max_prompt_tokens: chat-templated prompts longer than this are dropped.
    seed: seeds the order of the written prompts.
    limit: read at most this many source records (None = all).
    row_group_size: rows per Parquet row group.
    progress: show progress bars.

  Returns:
    Counts: ``read``, ``kept``, ``with_answer`` and ``dropped/<reason>`` for every reason.

  Raises:
    FileExistsError: ``out`` exists.
    KeyError / ValueError: a field is missing or of the wrong type (the message names it).
  """
  if shards.format_of(out) is None:
    raise ValueError(f"output {out!r} must end in {' or '.join(shards.FORMATS)}.")
  fs, root = fsspec.core.url_to_fs(out)
  if fs.exists(root):
    raise FileExistsError(f"{out} exists; delete it or pass another --out (it is not overwritten).")
  src = shards.Source(source)
  src.check_field(selection.prompt_key, "--source_prompt_key")
  for field in selection.where:
    src.check_field(field, f"--where={field}=...")
  columns = [selection.prompt_key, *selection.where] + (
      [selection.answer_key] if selection.answer_key else [])
  counts = collections.Counter()
  seen: dict[str, tuple[str, int]] = {}  # prompt text → (answer, source key)
  known_rows = None if any(u.rows is None for u in src.units) else sum(u.rows for u in src.units)
  bar = tqdm.tqdm(total=limit or known_rows, desc="read", unit="row", disable=not progress)
  for unit in src.units:
    if limit is not None and counts["read"] >= limit:
      break
    records = src.read(unit, columns)
    for row, record in enumerate(records):
      if limit is not None and counts["read"] >= limit:
        break
      counts["read"] += 1
      bar.update()
      where = src.where(unit, row)
      if any(str(record.get(k)) != v for k, v in selection.where.items()):
        counts["dropped/where"] += 1
        continue
      if selection.prompt_key not in record:
        raise KeyError(f"{where} has no field {selection.prompt_key!r} "
                       f"(fields: {sorted(record)}); set --source_prompt_key.")
      messages = data.prompt_messages(record[selection.prompt_key],
                                      f"{where}, field {selection.prompt_key!r}")
      if len(messages) != 1 or messages[0]["role"] != "user":
        counts["dropped/not_one_user_turn"] += 1
        continue
      text = messages[0]["content"].strip()
      if not text:
        counts["dropped/empty"] += 1
        continue
      if text in seen:
        counts["dropped/duplicate"] += 1
        continue
      answer = ""
      if selection.answer_key:
        answer = data.answer_text(record.get(selection.answer_key),
                                  f"{where}, field {selection.answer_key!r}").strip()
      seen[text] = (answer, src.key(unit, row))
  bar.close()
  kept = []
  for text, (answer, key) in tqdm.tqdm(seen.items(), desc="tokenize", unit="prompt",
                                        disable=not progress):
    if len(data.format_prompt(text, tokenizer, system_prompt=system_prompt)) > max_prompt_tokens:
      counts["dropped/over_budget"] += 1
    else:
      kept.append({selection.out_prompt_key: text, selection.out_answer_key: answer,
                   "source_row": key})
  if not kept:
    raise ValueError(f"no record of {source!r} was kept ({_format_counts(counts)}); check "
                     "--where, --source_prompt_key and data.max_prompt_tokens.")
  kept = [kept[i] for i in np.random.default_rng(seed).permutation(len(kept))]
  _write(out, kept, row_group_size)
  counts["kept"] = len(kept)
  counts["with_answer"] = sum(bool(r[selection.out_answer_key]) for r in kept)
  return dict(counts)


def _write(out: str, records: list[dict], row_group_size: int) -> None:
  if shards.format_of(out) == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records)
    shards.write_new_file(out, lambda f: pq.write_table(table, f, row_group_size=row_group_size),
                        text=False)
  else:
    import json

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    shards.write_new_file(out, lambda f: f.write(lines))


def _format_counts(counts: Mapping[str, int]) -> str:
  return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def summary(counts: Mapping[str, int], source: str, out: str, max_prompt_tokens: int,
            where: Mapping[str, str]) -> str:
  """What was read, kept and dropped (and why), as printed by ``main``."""
  reasons = {
      "where": "not " + ", ".join(f"{k}={v}" for k, v in where.items()) if where else "",
      "not_one_user_turn": "not a single user turn",
      "empty": "empty prompt",
      "duplicate": "duplicate of an earlier prompt",
      "over_budget": f"over data.max_prompt_tokens={max_prompt_tokens}",
  }
  lines = [f"read     {counts.get('read', 0):>10,}  records of {source}"]
  for key, reason in reasons.items():
    if reason:
      lines.append(f"dropped  {counts.get('dropped/' + key, 0):>10,}  {reason}")
  lines.append(f"kept     {counts.get('kept', 0):>10,}  prompts ({counts.get('with_answer', 0):,} "
               f"with an answer) -> {out}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  from tropd_jax import config as config_lib
  from tropd_jax import models

  logging.getLogger().setLevel(logging.INFO)
  config = config_lib.validate(_CONFIG.value)
  d = config.data
  out = _OUT.value or d.train_path
  where = parse_where(_WHERE.value or [])
  answer_key = d.answer_key if _SOURCE_ANSWER_KEY.value is None else _SOURCE_ANSWER_KEY.value
  selection = Selection(prompt_key=_SOURCE_PROMPT_KEY.value or d.prompt_key,
                        answer_key=answer_key, where=where, out_prompt_key=d.prompt_key,
                        out_answer_key=d.answer_key)
  tokenizer = models.load_tokenizer(config.student.path,
                                    chat_template_kwargs=d.chat_template_kwargs)
  counts = prepare(_SOURCE.value, out, tokenizer, selection, system_prompt=d.system_prompt,
                   max_prompt_tokens=d.max_prompt_tokens,
                   seed=config.seed if _SEED.value is None else _SEED.value,
                   limit=_LIMIT.value, row_group_size=_ROW_GROUP_SIZE.value)
  print(summary(counts, _SOURCE.value, out, d.max_prompt_tokens, where))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config file: tokenizer, data.* fields, budget, output path.",
      lock_config=True)
  _SOURCE = flags.DEFINE_string(
      "source", None, "The dataset: a JSONL/Parquet file, directory or glob; local, gs:// or "
      "hf://datasets/<org>/<name>/<file-or-glob>.")
  _OUT = flags.DEFINE_string("out", None, "The prompt file to write (.parquet or .jsonl); "
                             "default: the config's data.train_path.")
  _SOURCE_PROMPT_KEY = flags.DEFINE_string(
      "source_prompt_key", None, "The source's prompt field (text or a message list, e.g. "
      "conversations); default: the config's data.prompt_key.")
  _SOURCE_ANSWER_KEY = flags.DEFINE_string(
      "source_answer_key", None, "The source's answer field; '' = none; default: the config's "
      "data.answer_key.")
  _WHERE = flags.DEFINE_multi_string(
      "where", None, "FIELD=VALUE a record must match, e.g. domain=math (repeatable).")
  _LIMIT = flags.DEFINE_integer("limit", None, "Read at most this many source records.")
  _SEED = flags.DEFINE_integer("seed", None, "Seeds the output order; default: the config's seed.")
  _ROW_GROUP_SIZE = flags.DEFINE_integer(
      "row_group_size", 1024, "Rows per Parquet row group (the stream's unit of reading).")
  flags.mark_flags_as_required(["config", "source"])
  app.run(main)
