"""Boxed-answer grading, problem loading and avg@k / pass@k aggregation."""

import json

import pytest

from hf_fixtures import make_tokenizer
from tropd_jax import evaluate as ev
from tropd_jax.math_grading import extract_boxed, is_correct
from tropd_jax.models import load_tokenizer


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
