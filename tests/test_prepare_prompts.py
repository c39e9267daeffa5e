"""prepare_prompts: an OpenThoughts3-shaped dataset in, the prompt file a run reads out."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_fixtures import make_tokenizer
from tropd_jax import data, models, prepare_prompts, shards

LONG = "the cat sat on the mat " * 6


def turns(text):
  return [{"from": "human", "value": text}, {"from": "gpt", "value": "the 46"}]


# Rows as OpenThoughts3 has them (difficulty, source, domain, conversations) plus an answer.
ROWS = [
    {"domain": "math", "conversations": turns("the cat sat"), "answer": "1"},
    {"domain": "code", "conversations": turns("12 + 34"), "answer": "2"},
    {"domain": "math", "conversations": turns("on the mat"), "answer": "3"},
    {"domain": "math", "conversations": turns(" the cat sat "), "answer": "4"},  # Duplicate.
    {"domain": "math", "conversations": turns(LONG), "answer": "5"},  # Over the budget.
    {"domain": "math", "conversations": turns("  "), "answer": "6"},  # Empty.
    {"domain": "math", "conversations": [{"from": "system", "value": "12"}, *turns("cat 46")],
     "answer": "7"},  # A system turn: not a single user turn.
    {"domain": "math", "conversations": turns("sat on 34"), "answer": "8"},
    {"domain": "math", "conversations": turns("the 12 mat"), "answer": ""},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  make_tokenizer(path)
  return path


@pytest.fixture
def source(tmp_path):
  """A directory of two Parquet shards in OpenThoughts3's shape."""
  out = tmp_path / "ot3"
  out.mkdir()
  for i, part in enumerate((ROWS[:5], ROWS[5:])):
    rows = [{"difficulty": 3, "source": "s", **r} for r in part]
    pq.write_table(pa.Table.from_pylist(rows), out / f"train-{i:05d}-of-00002.parquet")
  return str(out)


EXPECTED = {"read": 9, "kept": 4, "with_answer": 3, "dropped/where": 1, "dropped/duplicate": 1,
            "dropped/over_budget": 1, "dropped/empty": 1, "dropped/not_one_user_turn": 1}


def test_prepare_keeps_what_a_run_keeps(tok_dir, source, tmp_path):
  tokenizer = models.load_tokenizer(str(tok_dir))
  selection = prepare_prompts.Selection("conversations", "answer", {"domain": "math"})
  out = str(tmp_path / "prompts.parquet")
  counts = prepare_prompts.prepare(source, out, tokenizer, selection, max_prompt_tokens=24,
                                   seed=0, row_group_size=2, progress=False)
  assert counts == EXPECTED
  table = pq.read_table(out)
  assert table.column_names == ["problem", "answer", "source_row"]
  assert pq.ParquetFile(out).metadata.num_row_groups == 2
  rows = table.to_pylist()
  assert sorted((r["problem"], r["answer"]) for r in rows) == [
      ("on the mat", "3"), ("sat on 34", "8"), ("the 12 mat", ""), ("the cat sat", "1")]
  assert {r["problem"]: r["source_row"] for r in rows}["sat on 34"] == (1 << 32) + 2
  again = str(tmp_path / "again.jsonl")
  prepare_prompts.prepare(source, again, tokenizer, selection, max_prompt_tokens=24, seed=0,
                          progress=False)
  with open(again) as f:
    assert [json.loads(line) for line in f] == rows  # Same seed, same order; JSONL too.
  # The run reads the file with its own fields; every prompt fits its budget.
  stream = data.PromptStream(shards.Source(out), tokenizer, data.PromptFormat(max_prompt_tokens=24),
                             prompts_per_step=2, seed=0, num_epochs=1)
  prompts = [p for batch in stream for p in batch]
  assert sorted(tokenizer.decode(p.ids).split("\n")[1] for p in prompts) == sorted(
      r["problem"] for r in rows)
  with pytest.raises(FileExistsError, match="prompts.parquet exists"):
    prepare_prompts.prepare(source, out, tokenizer, selection, max_prompt_tokens=24,
                            progress=False)
  with pytest.raises(KeyError, match=r"has no field 'problem' .*set --source_prompt_key"):
    prepare_prompts.prepare(source, str(tmp_path / "x.parquet"), tokenizer,
                            prepare_prompts.Selection("problem"), max_prompt_tokens=24,
                            progress=False)
  with pytest.raises(ValueError, match="no record .* was kept"):
    prepare_prompts.prepare(source, str(tmp_path / "x.parquet"), tokenizer,
                            prepare_prompts.Selection("conversations", where={"domain": "bio"}),
                            max_prompt_tokens=24, progress=False)
  with pytest.raises(ValueError, match=r"--where='domain' is not FIELD=VALUE"):
    prepare_prompts.parse_where(["domain"])


def test_the_command_takes_the_runs_config(tok_dir, source, tmp_path):
  out = tmp_path / "data" / "prompts.parquet"
  cmd = [sys.executable, "-m", "tropd_jax.prepare_prompts", "--config=tests/tiny_config.py",
         f"--config.student.path={tok_dir}", f"--config.teacher.path={tok_dir}",
         f"--config.workdir={tmp_path / 'run'}", f"--config.data.train_path={out}",
         f"--source={source}/*.parquet", "--source_prompt_key=conversations",
         "--where=domain=math", "--config.data.chat_template_kwargs={'enable_thinking': False}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "kept              4  prompts (3 with an answer) -> " + str(out) in done.stdout
  assert "dropped           1  over data.max_prompt_tokens=24" in done.stdout
  assert "dropped           1  not domain=math" in done.stdout
  assert len(pq.read_table(out)) == 4
