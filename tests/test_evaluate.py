"""Boxed-answer grading, problem loading, avg@k / pass@k per set and their mean, and the
evaluation of a run's step as training evaluates it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tiny_run
from hf_fixtures import make_tokenizer
from tropd_jax import evaluate as ev
from tropd_jax.math_grading import extract_boxed, is_correct
from tropd_jax.models import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{ 42 }", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} and", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("first \\boxed{1}, finally \\fbox{7}", "7"),
    ("\\boxed 5$", "5"),
    ("no box here: 42", None),
    ("cut off \\boxed{\\frac{1}{2}", None),
    ("\\boxed{}", None),
])
def test_extract_boxed(text, expected):
  assert extract_boxed(text) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("\\boxed{42}", "42", True),
    ("\\boxed{ 42 }", "42", True),
    ("\\boxed{042}", "42", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "$\\frac{\\sqrt 3}{2}$", True),
    ("\\boxed{\\text{Tuesday}}", "tuesday", True),  # Not maths: the normalized-string fallback.
    ("\\boxed{43}", "42", False),
    ("the answer is 42", "42", False),  # Only a boxed answer counts.
    ("\\boxed{42} then \\boxed{41}", "42", False),  # The last box is the answer.
])
def test_is_correct(response, answer, expected):
  assert is_correct(response, answer) is expected


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  corpus = ["\\boxed{0123456789} \\frac{1}{2} 0.5 What is one plus one? half three none\n",
            "user\nassistant\nsystem\n"] * 10
  make_tokenizer(str(path), vocab=160, corpus=corpus)
  return load_tokenizer(str(path))


PROBLEMS = [
    {"problem": "What is one plus one?", "answer": "2"},
    {"problem": "half", "answer": "\\frac{1}{2}"},
    {"problem": "three", "answer": "3"},
]
# RESPONSES[problem][seed]: 2/3 right, 2/3 right, none right.
RESPONSES = [
    ["\\boxed{2}", "\\boxed{3}", "one plus one is \\boxed{ 2 }"],
    ["\\boxed{0.5}", "none", "\\boxed{\\frac{1}{2}}"],
    ["\\boxed{2}", "three", "\\boxed{4}"],
]


def test_evaluate_grades_and_aggregates(tokenizer, tmp_path):
  prompt_index = {tuple(tokenizer.encode_prompt(p["problem"])): i for i, p in enumerate(PROBLEMS)}
  seeds = []

  def generate_fn(prompt_ids, seed):
    seeds.append(seed)
    stop = [tokenizer.stop_ids[0]]  # Decoding drops it; it still counts as a generated token.
    return [tokenizer.encode(RESPONSES[prompt_index[tuple(ids)]][seed - 10]) + stop
            for ids in prompt_ids]

  out = tmp_path / "eval" / "samples.jsonl"
  result = ev.evaluate(generate_fn, tokenizer, PROBLEMS, k=3, out_jsonl=str(out), seed=10)
  assert seeds == [10, 11, 12]
  assert result["avg@k"] == pytest.approx(4 / 9)
  assert result["pass@k"] == pytest.approx(2 / 3)
  assert (result["num_problems"], result["k"]) == (3, 3)
  lengths = [len(tokenizer.encode(r)) + 1 for rs in RESPONSES for r in rs]
  assert result["mean_response_tokens"] == pytest.approx(sum(lengths) / 9)

  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["problem_index"], r["sample_index"]) for r in records] == [
      (i, j) for i in range(3) for j in range(3)]
  assert records[2] == {
      "problem_index": 0, "sample_index": 2, "seed": 12, "response": RESPONSES[0][2],
      "extracted": "2", "answer": "2", "correct": True, "num_tokens": lengths[2],
  }
  assert [r["correct"] for r in records[3:6]] == [True, False, True]
  assert records[4]["extracted"] is None


def test_evaluate_rejects_bad_arguments(tokenizer):
  with pytest.raises(ValueError, match="k=0"):
    ev.evaluate(lambda ids, seed: ids, tokenizer, PROBLEMS, k=0)
  with pytest.raises(ValueError, match="returned 1 completions for 3 prompts"):
    ev.evaluate(lambda ids, seed: [[]], tokenizer, PROBLEMS, k=1)


def test_load_problems(tmp_path):
  path = tmp_path / "aime.jsonl"
  lines = [{"question": f"Problem {i}", "solution": i * 10, "year": 2024} for i in range(4)]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  problems = ev.load_problems(str(path), "question", "solution", limit=3)
  assert problems == [{"problem": f"Problem {i}", "answer": str(i * 10)} for i in range(3)]
  assert len(ev.load_problems(str(path), "question", "solution")) == 4


@pytest.mark.parametrize("content, message", [
    ('{"problem": "p", "answer": 1}\n{"problem": "q"\n', r"bad.jsonl:2: not valid JSON"),
    ('{"problem": "p", "answer": 1}\n{"problem": "q", "solution": 2}\n',
     r"bad.jsonl:2: no field 'answer' \(fields: problem, solution\); set answer_key"),
    ('[1, 2]\n', r"bad.jsonl:1: expected a JSON object, got list"),
    ('\n', r"bad.jsonl holds no problems"),
])
def test_load_problems_bad_lines(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=message):
    ev.load_problems(str(path))


def test_load_problems_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="problem file .*nowhere.jsonl does not exist"):
    ev.load_problems(str(tmp_path / "nowhere.jsonl"))


def test_format_summary_table():
  table = ev.format_summary_table({
      "aime24": {"avg@k": 4 / 9, "pass@k": 2 / 3, "num_problems": 30, "k": 16,
                 "mean_response_tokens": 5012.4},
  })
  assert table == (
      "| dataset | problems | k | avg@k (%) | pass@k (%) | mean tokens |\n"
      "| --- | ---: | ---: | ---: | ---: | ---: |\n"
      "| aime24 | 30 | 16 | 44.4 | 66.7 | 5012 |"
  )


def test_load_problems_limit_zero_is_all(tmp_path):
  path = tmp_path / "set.jsonl"
  path.write_text("".join(json.dumps({"problem": f"p{i}", "answer": i}) + "\n" for i in range(3)))
  assert len(ev.load_problems(str(path), limit=0)) == 3
  with pytest.raises(ValueError, match="limit=-1"):
    ev.load_problems(str(path), limit=-1)


def test_evaluate_formats_prompts_as_training_does(tokenizer, tmp_path):
  seen = []

  def generate_fn(prompt_ids, seed):
    seen.extend(prompt_ids)
    return [[tokenizer.stop_ids[0]] for _ in prompt_ids]

  out = tmp_path / "samples.jsonl"
  ev.evaluate(generate_fn, tokenizer, PROBLEMS, k=1, system_prompt="half", out_jsonl=str(out),
              write=False)
  assert seen == [tokenizer.encode_prompt(p["problem"], system="half") for p in PROBLEMS]
  assert seen[0] != tokenizer.encode_prompt(PROBLEMS[0]["problem"])
  assert not out.exists()  # Not this process's to write.


RESULT_A = {"avg@k": 0.5, "pass@k": 1.0, "num_problems": 2, "k": 2, "mean_response_tokens": 10.0}
RESULT_B = {"avg@k": 0.25, "pass@k": 0.5, "num_problems": 4, "k": 2, "mean_response_tokens": 20.0}


def test_mean_scalars_and_tables():
  results = {"aime24": RESULT_A, "aime25": RESULT_B}
  assert ev.mean_result(results) == {"avg@k": 0.375, "pass@k": 0.75, "num_problems": 6, "k": 2,
                                     "mean_response_tokens": 15.0}
  scalars = ev.eval_scalars(results)
  assert scalars["eval/aime24/avg@k"] == 0.5 and scalars["eval/aime25/pass@k"] == 0.5
  assert scalars["eval/avg@k"] == 0.375 and scalars["eval/response_tokens"] == 15.0
  assert list(ev.with_mean(results)) == ["aime24", "aime25", "mean"]
  assert list(ev.with_mean({"aime24": RESULT_A})) == ["aime24"]
  rows = ev.table_by_step({0: results, 10: results})
  assert list(rows) == ["step 0 aime24", "step 0 aime25", "step 0 mean", "step 10 aime24",
                        "step 10 aime25", "step 10 mean"]
  assert list(ev.table_by_step({0: {"aime24": RESULT_A}})) == ["step 0"]
  assert "| mean | 6 | 2 | 37.5 | 75.0 | 15 |" in ev.format_summary_table(ev.with_mean(results))


@pytest.mark.parametrize("field, value, message", [
    ("eval.paths", ("aime24.jsonl", ""), r"eval.paths=\('aime24.jsonl', ''\) must be a tuple of"),
    ("eval.paths", ("a/aime.jsonl", "b/aime.jsonl"), r"names the set 'aime' twice"),
    ("eval.k", 0, r"eval.k=0 must be > 0"),
    ("eval.top_p", 0.0, r"eval.top_p=0.0 must be in \(0, 1\]"),
    ("eval.limit", -1, r"eval.limit=-1 must be >= 0"),
])
def test_eval_config_is_validated(field, value, message):
  from tropd_jax import config as config_lib

  config = tiny_run.config({"workdir": "w", "student.path": "s", "teacher.path": "t",
                            "data.train_path": "d"})
  with config.unlocked():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_sampled_ids_stay_inside_the_tokenizer_vocabulary(tmp_path):
  from hf_fixtures import make_hf_model
  from tropd_jax import models

  make_hf_model(tmp_path, "qwen2", layers=1)  # 97 embedding rows.
  model = models.from_pretrained(str(tmp_path))
  prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 4
  generate_fn = ev.sampler_generate_fn(model, _NoStops(), None, 16, temperature=2.0, top_p=1.0,
                                       vocab_size=40)
  ids = [i for row in generate_fn(prompts, 0) for i in row]
  assert len(ids) == 12 * 16 and max(ids) < 40
  unmasked = ev.sampler_generate_fn(model, _NoStops(), None, 16, temperature=2.0)
  assert max(i for row in unmasked(prompts, 0) for i in row) >= 40  # The mask matters.


class _NoStops:
  stop_ids = ()


@pytest.fixture(scope="module")
def run():
  root, overrides = tiny_run.tiny_run()
  return root, tiny_run.config(overrides)


def _files(directory) -> dict[str, bytes]:
  return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_evaluating_a_step_reproduces_the_in_training_evaluation(run, tmp_path):
  root, config = run
  source, results, out = ev.run(config, out=str(tmp_path / "eval"))
  assert source == f"step 2 of {config.workdir}" and list(results) == ["set_a", "set_b"]
  training = pathlib.Path(config.workdir) / "eval" / "step_2"
  assert _files(tmp_path / "eval") == _files(training)  # Samples and results.json, to the byte.
  recorded = json.loads((training / "results.json").read_text())
  assert list(recorded) == ["set_a", "set_b", "mean"]
  assert recorded["set_a"]["num_problems"] == 2 and recorded["set_b"]["k"] == 2
  with pytest.raises(FileExistsError, match="already holds evaluation results"):
    ev.run(config, out=str(tmp_path / "eval"))
  with pytest.raises(ValueError, match="not both"):
    ev.run(config, step=1, checkpoint=config.student.path)


def test_evaluating_an_hf_checkpoint(run, tmp_path):
  from tropd_jax import export

  _, config = run
  export.export(config, str(tmp_path / "student"), step=1)  # float32: the step's own weights.
  one = tiny_run.config(config.to_dict(), **{"eval.paths": (config.eval.paths[0],)})
  _, from_step, _ = ev.run(one, step=1, out=str(tmp_path / "a"))
  source, from_checkpoint, _ = ev.run(one, checkpoint=str(tmp_path / "student"),
                                      out=str(tmp_path / "b"))
  assert source == f"checkpoint {tmp_path / 'student'}"
  assert from_checkpoint == from_step
  assert (tmp_path / "a" / "set_a.samples.jsonl").read_bytes() == (
      tmp_path / "b" / "set_a.samples.jsonl").read_bytes()


def test_command_line_reports_every_set_and_the_mean(run, tmp_path):
  _, config = run
  done = subprocess.run(
      [sys.executable, "-m", "tropd_jax.evaluate", f"--config={ROOT}/tests/tiny_config.py",
       *[f"--config.{k}={v}" for k, v in (
           ("workdir", config.workdir), ("student.path", config.student.path),
           ("teacher.path", config.teacher.path), ("data.train_path", config.data.train_path),
           ("eval.paths", repr(tuple(config.eval.paths))), ("eval.k", 3), ("eval.limit", 1))],
       "--step=1", f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  assert lines[0].startswith(f"step 1 of {config.workdir}, k=3, temperature=0.6, top_p=1.0")
  assert [line.split(" | ")[0] for line in lines[-3:]] == ["| set_a", "| set_b", "| mean"]
  assert " | 1 | 3 | " in lines[-3]  # One problem (eval.limit=1), three samples.
  done = subprocess.run(
      [sys.executable, "-m", "tropd_jax.evaluate", f"--workdir={config.workdir}",
       "--step=9"], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 2  # A user error (tropd_jax.cli).
  assert done.stderr.strip().splitlines()[-1].startswith("error: no checkpoint at step 9")
