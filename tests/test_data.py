"""Prompt data: formats, message lists, shards and units, the stream's state, the caches."""

import json
import logging

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from hf_fixtures import CHAT_TEMPLATE, make_tokenizer, xla_flags
from tropd_jax import config as config_lib
from tropd_jax import data, models, shards

# The chat template of a Qwen3-style tokenizer reads ``enable_thinking``; this one writes
# "the mat" before the answer when thinking is switched off (words the tiny vocabulary knows).
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "the mat\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  make_tokenizer(path)
  return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
  return models.load_tokenizer(str(tok_dir))


RECORDS = [{"q": "the cat", "a": "1", "r": "the mat"},
           {"q": "the cat sat on the mat " * 5, "a": "2", "r": "12"},
           {"q": "12 + 34", "a": 46, "r": "46"}]
STR_RECORDS = [{**r, "a": str(r["a"])} for r in RECORDS]  # One type per Parquet column.

# OpenThoughts3's shape: the prompt is the human turn of a ``conversations`` list.
OPENTHOUGHTS = [
    {"difficulty": 3, "source": "s", "domain": "math", "answer": str(i),
     "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "the 46"}]}
    for i, text in enumerate(["the cat sat", "12 + 34", "on the mat", "cat 46", "the 12 mat",
                              "sat on 34", "the cat", "mat 12"])
]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def write_parquet(path, records, row_group_size=None):
  pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
  return str(path)


def fmt(**kw):
  return data.PromptFormat(**{"prompt_key": "q", "answer_key": "a", "max_prompt_tokens": 20,
                              **kw})


def one_epoch(path, tokenizer, f, *, per_step=1, seed=0, shuffle=False, **kw):
  stream = data.PromptStream(shards.Source(path), tokenizer, f, prompts_per_step=per_step,
                             seed=seed, shuffle=shuffle, num_epochs=1, **kw)
  return [p for batch in stream for p in batch], stream


def test_jsonl_and_parquet_agree_and_long_prompts_are_dropped(tokenizer, tmp_path):
  jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
  parquet = write_parquet(tmp_path / "d.parquet", STR_RECORDS)
  f = fmt(teacher_response_key="r")
  a, stream = one_epoch(jsonl, tokenizer, f)
  b, _ = one_epoch(parquet, tokenizer, f)
  assert a == b
  assert stream.counts == {"kept": 2, "over_budget": 1}
  assert [p.index for p in a] == [0, 2]  # A single file's keys are its row numbers.
  assert a[1].ids == tuple(tokenizer.encode_prompt("12 + 34"))
  assert a[1].teacher_ids == tuple(tokenizer.encode("46")) and a[1].answer == "46"


@pytest.mark.parametrize("spelling", ["from_value", "role_content"])
@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_message_lists_give_the_users_text(tokenizer, tmp_path, spelling, suffix):
  records = OPENTHOUGHTS
  if spelling == "role_content":
    roles = {"human": "user", "gpt": "assistant"}
    records = [{**r, "conversations": [{"role": roles[m["from"]], "content": m["value"]}
                                       for m in r["conversations"]]} for r in records]
  path = tmp_path / f"ot3.{suffix}"
  (write_jsonl if suffix == "jsonl" else write_parquet)(path, records)
  f = fmt(prompt_key="conversations", answer_key="answer",
          teacher_response_key="conversations", max_prompt_tokens=24)
  prompts, _ = one_epoch(str(path), tokenizer, f)
  assert len(prompts) == len(OPENTHOUGHTS)
  for p, r in zip(prompts, OPENTHOUGHTS):
    user = r["conversations"][0]["value"]
    assert p.ids == tuple(tokenizer.encode_prompt(user))
    text = tokenizer.decode(p.ids, skip_special_tokens=False)
    assert text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(p.teacher_ids) == "the 46" and p.answer == r["answer"]


def test_prompt_messages_and_bad_fields():
  assert data.prompt_messages([{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"},
                               {"role": "user", "content": "later"}]) == [
      {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
  with pytest.raises(ValueError, match=r"row 3, field 'q' is a dict, not text or a list"):
    data.prompt_messages({"text": "x"}, "row 3, field 'q'")
  with pytest.raises(ValueError, match="is a int, not text"):
    data.prompt_messages(7)
  with pytest.raises(ValueError, match=r"message role 'tool' is not one of"):
    data.prompt_messages([{"role": "tool", "content": "x"}])
  with pytest.raises(ValueError, match="no user turn before the first assistant turn"):
    data.prompt_messages([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}])
  with pytest.raises(ValueError, match="content is a list, not text"):
    data.prompt_messages([{"role": "user", "content": ["x"]}])
  with pytest.raises(ValueError, match="field 'a' is a list, not text or a number"):
    data.answer_text(["1", "2"], "field 'a'")


def test_bad_records(tokenizer, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"q": "x"}\n{not json\n')
  with pytest.raises(ValueError, match=r"d.jsonl:2 is not valid JSON"):
    one_epoch(str(path), tokenizer, fmt())
  path.write_text('{"question": "x"}\n')
  with pytest.raises(KeyError, match=r"first record of .*d.jsonl' has no field 'q'"):
    one_epoch(str(path), tokenizer, fmt())
  write_parquet(tmp_path / "p.parquet", [{"question": "x"}])
  with pytest.raises(KeyError, match=r"p.parquet has no field 'q' \(fields: \['question'\]\)"):
    one_epoch(str(tmp_path / "p.parquet"), tokenizer, fmt())
  path.write_text('{"q": {"text": "the cat"}}\n')
  with pytest.raises(ValueError, match=r"d.jsonl row 0, field 'q' is a dict, not text"):
    one_epoch(str(path), tokenizer, fmt())
  write_jsonl(path, [RECORDS[1]] * 3)
  with pytest.raises(ValueError, match=r"every one of the 3 prompts of .*d.jsonl' is longer "
                     "than data.max_prompt_tokens=20"):  # Raised on construction: at start-up.
    data.PromptStream(shards.Source(str(path)), tokenizer, fmt(), prompts_per_step=1, seed=0)
  path.write_text("\n")
  with pytest.raises(ValueError, match=r"d.jsonl' holds no records"):
    data.PromptStream(shards.Source(str(path)), tokenizer, fmt(), prompts_per_step=1, seed=0)
  write_jsonl(path, RECORDS)
  with pytest.raises(ValueError, match=r"gives this process fewer than 3 prompts within "
                     "data.num_epochs"):
    data.PromptStream(shards.Source(str(path)), tokenizer, fmt(), prompts_per_step=3, seed=0,
                      num_epochs=1)


def test_paths_files_directories_globs_and_the_hub_scheme(tmp_path):
  (tmp_path / "dir" / "sub").mkdir(parents=True)
  write_parquet(tmp_path / "dir" / "b.parquet", STR_RECORDS, row_group_size=2)
  write_jsonl(tmp_path / "dir" / "sub" / "a.jsonl", RECORDS)
  (tmp_path / "dir" / "README.md").write_text("not data")
  src = shards.Source(str(tmp_path / "dir"))
  assert [s.rsplit("/", 1)[1] for s in src.shards] == ["b.parquet", "a.jsonl"]
  assert [(u.shard, u.group, u.first_row, u.rows) for u in src.units] == [
      (0, 0, 0, 2), (0, 1, 2, 1), (1, 0, 0, None)]
  assert src.key(src.units[1], 1) == 3 and src.key(src.units[2], 1) == (1 << 32) + 1
  assert len(shards.Source(str(tmp_path / "dir" / "*.parquet")).units) == 2
  with pytest.raises(FileNotFoundError, match=r"does not exist; check data.train_path"):
    shards.Source(str(tmp_path / "nope.jsonl"))
  with pytest.raises(FileNotFoundError, match="holds no .parquet or .jsonl files"):
    shards.Source(str(tmp_path / "dir" / "*.md"))
  with pytest.raises(ValueError, match="neither .parquet nor .jsonl"):
    shards.Source(str(tmp_path / "dir" / "README.md"))
  for old in ("hf://open-thoughts/OpenThoughts3-1.2M", "hf://gsm8k:train"):
    with pytest.raises(ValueError, match=r"read as hf://datasets/<org>/<name>/<file-or-glob>"):
      shards.Source(old)


def test_a_remote_file_system_reads_the_same(tokenizer, tmp_path):
  fs = fsspec.filesystem("memory")
  with fs.open("/prompts/part-0.parquet", "wb") as f:
    pq.write_table(pa.Table.from_pylist(STR_RECORDS[:2]), f)
  with fs.open("/prompts/part-1.jsonl", "w") as f:
    f.write(json.dumps(RECORDS[2]) + "\n")
  try:
    prompts, _ = one_epoch("memory://prompts/part-*", tokenizer, fmt(max_prompt_tokens=99))
    src = shards.Source("memory://prompts")
    assert src.shards == ["memory:///prompts/part-0.parquet", "memory:///prompts/part-1.jsonl"]
  finally:
    fs.rm("/prompts", recursive=True)
  local, _ = one_epoch(write_jsonl(tmp_path / "d.jsonl", RECORDS), tokenizer,
                       fmt(max_prompt_tokens=99))
  assert [p.ids for p in prompts] == [p.ids for p in local]
  assert [p.index for p in prompts] == [0, 1, 1 << 32]


def shards_dir(tmp_path, n_files=3, rows=4):
  """A parquet directory of ``n_files`` files of two row groups each: 2 * n_files units."""
  out = tmp_path / "shards"
  out.mkdir()
  for i in range(n_files):
    write_parquet(out / f"part-{i}.parquet",
                  [{"q": f"{i * rows + j} cat", "a": str(i * rows + j)} for j in range(rows)],
                  row_group_size=rows // 2)
  return str(out)


def test_stream_state_round_trip_is_deterministic_and_covers_every_prompt(tokenizer, tmp_path):
  path = shards_dir(tmp_path)
  f = fmt()

  def stream():
    return data.PromptStream(shards.Source(path), tokenizer, f, prompts_per_step=5, seed=3)

  first = stream()
  head = [[p.answer for p in next(first)] for _ in range(2)]
  state = first.state()
  ahead = [[p.answer for p in next(first)] for _ in range(4)]
  other = stream()
  assert [[p.answer for p in next(other)] for _ in range(2)] == head  # Same seed, same order.
  resumed = stream()
  resumed.restore(json.loads(json.dumps(state)))  # The state goes through a JSON checkpoint.
  assert [[p.answer for p in next(resumed)] for _ in range(4)] == ahead
  seen = [int(a) for batch in head + ahead for a in batch]
  assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:24]) == list(range(12))
  assert seen[:12] != seen[12:24]  # Reshuffled every epoch.
  assert seen[:12] != sorted(seen[:12])
  reseeded = data.PromptStream(shards.Source(path), tokenizer, f, prompts_per_step=5, seed=4)
  assert [p.answer for p in next(reseeded)] != head[0]


def test_a_state_of_other_data_restarts_the_stream(tokenizer, tmp_path, caplog):
  path = shards_dir(tmp_path)
  a = data.PromptStream(shards.Source(path), tokenizer, fmt(), prompts_per_step=2, seed=0)
  start = next(a)
  next(a)
  fewer = write_parquet(tmp_path / "one.parquet", STR_RECORDS)
  state = data.PromptStream(shards.Source(fewer), tokenizer, fmt(), prompts_per_step=2,
                            seed=0).state()
  b = data.PromptStream(shards.Source(path), tokenizer, fmt(), prompts_per_step=2, seed=0)
  with caplog.at_level(logging.WARNING):
    b.restore(state)
  assert "for other data" in caplog.text and next(b) == start
  with caplog.at_level(logging.WARNING):
    b.restore({"next_index": 4})  # A checkpoint of the earlier, in-memory pipeline.
  assert "starts from its beginning" in caplog.text


@pytest.mark.parametrize("n_files", [3, 1])  # 6 units for 3 processes; 2 units for 3.
def test_each_process_reads_its_own_share(tokenizer, tmp_path, n_files, monkeypatch):
  path = shards_dir(tmp_path, n_files=n_files, rows=6)
  reads = []
  read = shards.Source.read
  monkeypatch.setattr(shards.Source, "read",
                      lambda self, unit, columns=None: reads.append(unit) or read(self, unit,
                                                                                  columns))
  shares, units_read = [], []
  for index in range(3):
    reads.clear()
    prompts, _ = one_epoch(path, tokenizer, fmt(), per_step=3, seed=1, shuffle=True,
                           process_index=index, process_count=3)
    shares.append({int(p.answer) for p in prompts})
    units_read.append(set(reads))
  assert set().union(*shares) == set(range(6 * n_files))
  assert sum(len(s) for s in shares) == 6 * n_files  # Disjoint.
  if n_files == 3:
    assert all(len(u) == 2 for u in units_read)  # Each reads only its 2 of the 6 units.
    assert not units_read[0] & units_read[1] and not units_read[1] & units_read[2]
  else:
    assert all(len(s) == 2 for s in shares)  # Every process reads both; keeps a third.


def test_prompts_per_step_must_divide_over_processes(tokenizer, tmp_path):
  with pytest.raises(ValueError, match=r"prompts_per_step=4 does not divide over 3 processes"):
    data.PromptStream(shards.Source(write_jsonl(tmp_path / "d.jsonl", RECORDS)), tokenizer,
                      fmt(), prompts_per_step=4, seed=0, process_index=0, process_count=3)


def test_chat_template_options_reach_the_template(tmp_path):
  tok_dir = tmp_path / "tok"
  make_tokenizer(tok_dir)
  (tok_dir / "chat_template.jinja").write_text(THINKING_TEMPLATE)
  plain = models.load_tokenizer(str(tok_dir))
  off = models.load_tokenizer(str(tok_dir), chat_template_kwargs={"enable_thinking": False})
  on = models.load_tokenizer(str(tok_dir), chat_template_kwargs={"enable_thinking": True})
  text = off.decode(data.format_prompt("the cat", off), skip_special_tokens=False)
  assert text.endswith("<|im_start|>assistant\nthe mat\n")
  assert on.encode_prompt("the cat") == plain.encode_prompt("the cat")
  assert not plain.decode(plain.encode_prompt("the cat")).endswith("the mat\n")
  config = config_lib.defaults()
  config.data.chat_template_kwargs = {"enable_thinking": False}
  from_config = models.load_tokenizer(str(tok_dir),
                                      chat_template_kwargs=config.data.chat_template_kwargs)
  assert from_config.encode_prompt("the cat") == off.encode_prompt("the cat")
  prompts, _ = one_epoch(write_jsonl(tmp_path / "d.jsonl", RECORDS), off, fmt())
  assert prompts[0].ids == tuple(off.encode_prompt("the cat"))
  with pytest.raises(ValueError, match=r"\['tokenize'\] are set by tropd_jax itself"):
    models.load_tokenizer(str(tok_dir), chat_template_kwargs={"tokenize": False})


def test_system_prompts(tokenizer):
  ids = data.format_prompt("the cat", tokenizer, system_prompt="the mat")
  assert tokenizer.decode(ids, skip_special_tokens=False).startswith(
      "<|im_start|>system\nthe mat<|im_end|>\n<|im_start|>user\nthe cat")
  own = [{"from": "system", "value": "12"}, {"from": "human", "value": "the cat"}]
  assert data.format_prompt(own, tokenizer) == tokenizer.encode_prompt(
      [{"role": "system", "content": "12"}, {"role": "user", "content": "the cat"}])
  with pytest.raises(ValueError, match="has a system turn of its own and data.system_prompt"):
    data.format_prompt(own, tokenizer, system_prompt="the mat")


def test_config_validates_chat_template_kwargs():
  config = config_lib.defaults()
  config.workdir, config.student.path, config.teacher.path = "w", "s", "t"
  config.data.train_path = "d.jsonl"
  config.data.chat_template_kwargs = {"enable_thinking": False, "any_name": 1}
  config_lib.validate(config)  # The template's variables are the user's to name.
  config.data.chat_template_kwargs.unlock()
  config.data.chat_template_kwargs.enable_thinkng = True
  config_lib.validate(config)  # A misspelt variable is the template's to ignore, not a field.
  with pytest.raises(TypeError):
    config.data.chat_template_kwargs = "enable_thinking=False"


class NoAppendFileSystem(MemoryFileSystem):
  """An object store's behaviour: a file is written whole or not at all, never appended to."""

  protocol = "noappend"
  store, pseudo_dirs = {}, [""]  # Its own files, not memory://'s.

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(path.removeprefix("noappend://"))

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("append mode is not supported")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def no_append_fs():
  fsspec.register_implementation("noappend", NoAppendFileSystem, clobber=True)
  fs = NoAppendFileSystem()
  yield fs
  fs.rm("/run", recursive=True)


def test_teacher_response_cache_needs_no_append(no_append_fs):
  cache = data.TeacherResponseCache("noappend://run/teacher_responses")
  cache.add({3: [1, 2, 3]})
  cache.add({4: [5], 2**33: [6, 7]})
  cache.add({})
  shards = no_append_fs.ls("/run/teacher_responses", detail=False)
  assert len(shards) == 2 and all(s.endswith(".jsonl") for s in shards)  # No temporary left.
  reread = data.TeacherResponseCache("noappend://run/teacher_responses")
  assert reread.responses == {3: (1, 2, 3), 4: (5,), 2**33: (6, 7)}


def test_teacher_response_cache_reads_the_old_single_file(tmp_path):
  legacy = tmp_path / "teacher_responses.jsonl"
  legacy.write_text('{"index": 0, "ids": [9, 8]}\n{"index": 1, "ids": [7]}\n{"index": 4, "ids": [1')
  cache = data.TeacherResponseCache(str(tmp_path / "teacher_responses"))
  assert cache.get(0) == (9, 8) and cache.get(1) == (7,) and cache.get(4) is None
  cache.add({2: [6]})
  assert legacy.read_text().count("\n") == 2  # The old file is left as it was.
  reread = data.TeacherResponseCache(str(tmp_path / "teacher_responses"))
  assert reread.responses == {0: (9, 8), 1: (7,), 2: (6,)}


_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, path, tok, out = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", 2, int(index))
from tropd_jax import data, models, shards
stream = data.PromptStream(shards.Source(path), models.load_tokenizer(tok),
                           data.PromptFormat("q", "a", max_prompt_tokens=24),
                           prompts_per_step=4, seed=0)
batches = [[p.answer for p in data.global_batch(stream)] for _ in range(3)]
with open(out, "w") as f:
  json.dump({"batches": batches, "kept": stream.counts["kept"]}, f)
"""


@pytest.mark.slow
def test_two_processes_gather_the_same_global_batches(tok_dir, tmp_path):
  """2 processes (gloo) stream their own units and gather identical global batches."""
  import os
  import socket
  import subprocess
  import sys

  path = shards_dir(tmp_path)  # 6 units: 3 for each process.
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  outs = [tmp_path / f"out{i}.json" for i in range(2)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i), path,
                             str(tok_dir), str(outs[i])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
  a, b = (json.loads(o.read_text()) for o in outs)
  assert a["batches"] == b["batches"]
  assert sorted(int(x) for batch in a["batches"] for x in batch) == list(range(12))
  assert a["kept"] == b["kept"] == 6  # Each tokenized only its own half.
