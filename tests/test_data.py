"""Prompt data: formats, the over-budget rule, teacher responses, the grain stream's state."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_fixtures import make_tokenizer
from tropd_jax import data, models


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  make_tokenizer(path)
  return models.load_tokenizer(str(path))


RECORDS = [{"q": "the cat", "a": "1", "r": "the mat"},
           {"q": "the cat sat on the mat " * 5, "a": "2", "r": "12"},
           {"q": "12 + 34", "a": "46", "r": "46"}]


def test_jsonl_and_parquet_agree_and_long_prompts_are_dropped(tokenizer, tmp_path):
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  parquet = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(RECORDS), parquet)
  kwargs = dict(prompt_key="q", answer_key="a", teacher_response_key="r", max_prompt_tokens=20)
  a, counts = data.load_prompts(str(jsonl), tokenizer, **kwargs)
  b, _ = data.load_prompts(str(parquet), tokenizer, **kwargs)
  assert a == b
  assert counts == {"records": 3, "over_budget": 1, "kept": 2}
  assert [p.index for p in a] == [0, 2]
  assert a[1].ids == tuple(tokenizer.encode_prompt("12 + 34"))
  assert a[1].teacher_ids == tuple(tokenizer.encode("46")) and a[1].answer == "46"


def test_bad_records(tokenizer, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"q": "x"}\n{not json\n')
  with pytest.raises(ValueError, match=r"d.jsonl:2 is not valid JSON"):
    data.load_prompts(str(path), tokenizer, prompt_key="q", max_prompt_tokens=9)
  path.write_text('{"question": "x"}\n')
  with pytest.raises(KeyError, match="record 0 .* has no field 'q'"):
    data.load_prompts(str(path), tokenizer, prompt_key="q", max_prompt_tokens=9)


def test_stream_state_round_trip_and_epochs():
  prompts = [data.Prompt(i, (i,)) for i in range(5)]
  stream = data.PromptStream(prompts, prompts_per_step=2, seed=3)
  first = [[p.index for p in next(stream)] for _ in range(2)]
  state = stream.state()
  ahead = [[p.index for p in next(stream)] for _ in range(4)]
  other = data.PromptStream(prompts, prompts_per_step=2, seed=3)
  other.restore(state)
  assert [[p.index for p in next(other)] for _ in range(4)] == ahead
  seen = [i for batch in first + ahead for i in batch]
  assert sorted(seen[:5]) == list(range(5))  # every prompt once per epoch


def test_teacher_response_cache_survives_a_truncated_line(tmp_path):
  path = tmp_path / "t.jsonl"
  cache = data.TeacherResponseCache(str(path))
  cache.add({3: [1, 2, 3]})
  with open(path, "a") as f:
    f.write('{"index": 4, "ids": [1')
  reread = data.TeacherResponseCache(str(path))
  assert reread.get(3) == (1, 2, 3) and reread.get(4) is None
