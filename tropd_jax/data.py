"""Prompts for distillation: records → chat-templated ids → a grain index stream.

Records come from JSONL or Parquet (local or gs://) or a hub dataset
(``hf://name[:split]``, needs the ``datasets`` package). Every prompt is
tokenized once with the chat template; prompts over the budget are counted
and dropped, never cut. The grain pipeline shuffles, repeats and shards
*indices* into that table, so its iterator state is a few integers, saved
with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import fsspec
import grain
import jax
import numpy as np

from tropd_jax.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One training prompt.

  Attributes:
    index: position in the dataset (stable across runs; keys the teacher-response cache).
    ids: chat-templated prompt token ids.
    answer: reference answer text ("" if none).
    teacher_ids: a teacher response's token ids for off-policy guidance, if the data has one.
  """

  index: int
  ids: tuple[int, ...]
  answer: str = ""
  teacher_ids: tuple[int, ...] | None = None


def read_records(path: str) -> list[dict]:
  """All records of a JSONL / Parquet file or ``hf://dataset[:split]``."""
  if path.startswith("hf://"):
    try:
      import datasets
    except ImportError:
      raise ImportError(
          f"data path {path!r} needs the `datasets` package: pip install datasets"
      ) from None
    name, _, split = path.removeprefix("hf://").partition(":")
    return list(datasets.load_dataset(name, split=split or "train"))
  fs = fsspec.open(path).fs
  if not fs.exists(path):
    raise FileNotFoundError(f"data file {path!r} does not exist; check data.train_path.")
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
      return pq.read_table(f).to_pylist()
  records = []
  with fsspec.open(path, "r") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg}).") from None
  return records


def load_prompts(
    path: str,
    tokenizer: Tokenizer,
    *,
    prompt_key: str = "problem",
    answer_key: str = "answer",
    teacher_response_key: str = "",
    system_prompt: str = "",
    max_prompt_tokens: int,
) -> tuple[list[Prompt], dict[str, int]]:
  """Tokenizes every record; returns the kept prompts and counts (total, dropped)."""
  records = read_records(path)
  if not records:
    raise ValueError(f"data file {path!r} holds no records; point data.train_path at a dataset.")
  prompts, over_budget = [], 0
  for i, rec in enumerate(records):
    if prompt_key not in rec:
      raise KeyError(
          f"record {i} of {path!r} has no field {prompt_key!r} (fields: {sorted(rec)}); "
          "set data.prompt_key."
      )
    ids = tokenizer.encode_prompt(str(rec[prompt_key]), system=system_prompt or None)
    if len(ids) > max_prompt_tokens:
      over_budget += 1
      continue
    teacher_ids = None
    if teacher_response_key:
      if teacher_response_key not in rec:
        raise KeyError(f"record {i} of {path!r} has no field {teacher_response_key!r}.")
      teacher_ids = tuple(tokenizer.encode(str(rec[teacher_response_key])))
    prompts.append(Prompt(i, tuple(ids), str(rec.get(answer_key, "")), teacher_ids))
  counts = {"records": len(records), "over_budget": over_budget, "kept": len(prompts)}
  log.info("%s: %d records, %d over max_prompt_tokens=%d dropped, %d kept", path,
           len(records), over_budget, max_prompt_tokens, len(prompts))
  if not prompts:
    raise ValueError(
        f"every one of the {len(records)} prompts in {path!r} is longer than "
        f"data.max_prompt_tokens={max_prompt_tokens}; raise the budget."
    )
  return prompts, counts


class PromptStream:
  """Batches of prompts, shuffled and repeated by grain, sharded over processes.

  Each process draws ``prompts_per_step // process_count`` prompts per step; the
  global batch is their concatenation in process order. ``state()`` /
  ``restore()`` carry the position across checkpoints.
  """

  def __init__(self, prompts: list[Prompt], *, prompts_per_step: int, seed: int,
               shuffle: bool = True, num_epochs: int = 0):
    count, index = jax.process_count(), jax.process_index()
    if prompts_per_step % count:
      raise ValueError(
          f"rollout.prompts_per_step={prompts_per_step} does not divide over {count} processes."
      )
    self.prompts = prompts
    self._positions = {p.index: i for i, p in enumerate(prompts)}
    ds = grain.MapDataset.range(len(prompts))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs or None)
    self._iter = iter(ds[index::count].to_iter_dataset().batch(prompts_per_step // count,
                                                              drop_remainder=True))

  def __iter__(self):
    return self

  def __next__(self) -> list[Prompt]:
    return [self.prompts[int(i)] for i in np.asarray(next(self._iter))]

  def position(self, prompt: Prompt) -> int:
    """Where ``prompt`` sits in ``self.prompts`` (the same on every process)."""
    return self._positions[prompt.index]

  def state(self) -> dict:
    return self._iter.get_state()

  def restore(self, state: dict) -> None:
    self._iter.set_state(state)


class TeacherResponseCache:
  """Teacher responses generated once and kept in ``<workdir>/teacher_responses.jsonl``."""

  def __init__(self, path: str):
    self.path = path
    self.responses: dict[int, tuple[int, ...]] = {}
    fs = fsspec.open(path).fs
    if fs.exists(path):
      with fsspec.open(path, "r") as f:
        for line in f:
          if line.strip():
            try:
              rec = json.loads(line)
            except json.JSONDecodeError:
              log.warning("skipping a truncated line in %s", path)
              continue
            self.responses[int(rec["index"])] = tuple(rec["ids"])

  def get(self, index: int) -> tuple[int, ...] | None:
    return self.responses.get(index)

  def add(self, new: dict[int, list[int]]) -> None:
    self.responses.update({i: tuple(ids) for i, ids in new.items()})
    if jax.process_index() == 0 and new:
      mode = "a" if fsspec.open(self.path).fs.exists(self.path) else "w"
      with fsspec.open(self.path, mode) as f:
        for i, ids in new.items():
          f.write(json.dumps({"index": int(i), "ids": [int(t) for t in ids]}) + "\n")
