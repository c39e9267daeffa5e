"""The tally task: generation and grading, the shipped models and data, the config, a short run."""

import json
import os
import random

import numpy as np
import pytest

from tropd_jax import config as config_lib
from tropd_jax import evaluate, models
from tropd_jax import metrics as metrics_lib
from tropd_jax.tally import ASSETS, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEM = task.Problem((7, 3, 2, 9, 4, 1, 8, 5, 6))
MIXED = task.Style(1, ("plus", "add", "more", "plus", "add", "more", "plus", "add"), 1)


def _jsonl(name):
  with open(os.path.join(ASSETS, name)) as f:
    return [json.loads(line) for line in f]


def test_problem_and_its_solutions():
  assert PROBLEM.prompt == "Sum a=7 b=3 c=2 d=9 e=4 f=1 g=8 h=5 i=6."
  assert PROBLEM.totals() == [7, 10, 12, 21, 25, 26, 34, 39, 45] and PROBLEM.answer == 45
  assert PROBLEM.solution() == (
      "We add the values in order.\na=7: start at 7.\nb=3: 7 plus 3 is 10.\n"
      "c=2: 10 plus 2 is 12.\nd=9: 12 plus 9 is 21.\ne=4: 21 plus 4 is 25.\n"
      "f=1: 25 plus 1 is 26.\ng=8: 26 plus 8 is 34.\nh=5: 34 plus 5 is 39.\n"
      "i=6: 39 plus 6 is 45.\nThe answer is \\boxed{45}.")
  assert PROBLEM.solution(MIXED).splitlines()[:5] == [
      "Keep a running total.", "a=7: start at 7.", "b=3: 7 plus 3 is 10.",
      "c=2: add 2 to 10, get 12.", "d=9: 9 more than 12 is 21."]
  assert PROBLEM.solution(MIXED).endswith("i=6: add 6 to 39, get 45.\nSo the total is "
                                          "\\boxed{45}.")
  assert PROBLEM.record() == {"problem": PROBLEM.prompt, "answer": "45"}


def test_wordings_mean_the_same_and_are_graded_the_same():
  steps = [(label, a, x, a + x) for label, a, x in zip(
      "bcdefghi", PROBLEM.totals()[:-1], PROBLEM.values[1:])]
  styles = [task.Style.plain(w) for w in task.WORDINGS] + [MIXED]
  for style in styles:
    solution = PROBLEM.solution(style)
    assert task.read_steps(solution) == steps, style
    assert task.is_correct(solution, 45) and task.is_correct(solution, "45")
    assert not task.is_correct(solution, 46)
  assert len({PROBLEM.solution(s) for s in styles}) == len(styles)
  assert not task.is_correct(PROBLEM.solution().replace("\\boxed{45}", "45"), 45)  # Not boxed.


def test_a_slip_is_one_forgotten_carry_and_a_wrong_answer():
  slipped = PROBLEM.solution(slips=[3])
  assert "d=9: 12 plus 9 is 11." in slipped and slipped.endswith("\\boxed{35}.")
  read = task.read_steps(slipped)
  wrong = [(label, a, x, b) for label, a, x, b in read if a + x != b]
  assert wrong == [("d", 12, 9, 11)]  # The chain goes on correctly from the wrong total.
  assert not task.is_correct(slipped, PROBLEM.answer)
  assert PROBLEM.solution(slips=[2]) == PROBLEM.solution()  # 10 + 2 crosses no ten.
  with pytest.raises(ValueError, match=r"slips=\[9\]"):
    PROBLEM.solution(slips=[9])
  with pytest.raises(ValueError, match=r"values=\(1, 2\)"):
    task.Problem((1, 2))
  with pytest.raises(ValueError, match="style.wordings="):
    PROBLEM.solution(task.Style(0, ("plus",) * 3, 0))


def test_mixtures_draw_their_wordings_and_slips():
  rng = random.Random(0)
  problems = task.make_problems(400, seed=1)
  teacher = task.Mixture((1.0, 0.0, 0.0), 0.0, 0.0)
  for p in problems[:50]:
    assert task.draw_solution(p, teacher, rng) == p.solution()
  student = task.Mixture((0.1, 0.45, 0.45), 0.5, 0.7)
  drawn = [(p, task.draw_solution(p, student, rng)) for p in problems]
  for p, s in drawn:  # Only lines that add a 9 slip.
    assert all(a + x == b or x == 9 for _, a, x, b in task.read_steps(s))
  wrong = [not task.is_correct(s, p.answer) for p, s in drawn]
  assert 0.35 < np.mean(wrong) < 0.6
  lines = [line for _, s in drawn for line in s.splitlines()]
  plus = np.mean([" plus " in line for line in lines if line[:1] in "bcdefghi" and "=" in line])
  assert 0.05 < plus < 0.15


def test_generator_is_seeded_and_distinct():
  a = task.make_problems(300, seed=3)
  assert a == task.make_problems(300, seed=3) and a != task.make_problems(300, seed=4)
  assert len({p.prompt for p in a}) == 300
  held = {p.prompt for p in a[:100]}
  assert not held & {p.prompt for p in task.make_problems(200, seed=5, exclude=held)}


def test_shipped_data():
  heldout, train = _jsonl("heldout.jsonl"), _jsonl("train.jsonl")
  assert len(heldout) == 128 and len(train) >= 1000
  assert not {r["problem"] for r in heldout} & {r["problem"] for r in train}
  for r in heldout[:20] + train[:20]:
    assert set(r) == {"problem", "answer"}
    values = tuple(int(item[2]) for item in r["problem"][4:-1].split(" "))
    assert task.Problem(values).record() == r
  assert evaluate.load_problems(os.path.join(ASSETS, "heldout.jsonl"))[0] == heldout[0]


def test_shipped_models_are_hf_checkpoints_with_one_tokenizer():
  import torch
  import transformers

  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
  assert total < 20 * 2**20
  tok = models.load_tokenizer(os.path.join(ASSETS, "student"))
  teacher_tok = models.load_tokenizer(os.path.join(ASSETS, "teacher"))
  prompt = tok.encode_prompt(PROBLEM.prompt)
  assert tok.decode(prompt, skip_special_tokens=False) == (
      f"<|im_start|>user\n{PROBLEM.prompt}<|im_end|>\n<|im_start|>assistant\n")
  assert tok.stop_ids == (tok.hf.convert_tokens_to_ids("<|im_end|>"),)
  for style in (task.Style.plain(), MIXED):
    solution = PROBLEM.solution(style)
    ids = tok.encode(solution)
    assert tok.decode(ids) == solution and len(ids) == len(solution)  # One token a character.
    assert len(ids) >= 200
  shortest = task.Problem((1,) * task.NUM_VALUES).solution(task.Style(1, ("plus",) * 8, 0))
  assert len(tok.encode(shortest)) >= 200
  for name in ("teacher", "student"):
    path = os.path.join(ASSETS, name)
    ours = models.from_pretrained(path)
    assert models.check_same_tokenizer(teacher_tok, tok, ours.cfg.vocab_size,
                                       ours.cfg.vocab_size) == tok.vocab_size
    ids = prompt + tok.encode(PROBLEM.solution(MIXED))[:40]
    logits = np.asarray(ours(np.asarray([ids], np.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
      want = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)


def test_teacher_solves_what_the_student_gets_wrong():
  problems = evaluate.load_problems(os.path.join(ASSETS, "heldout.jsonl"), limit=16)
  acc = {}
  for name in ("teacher", "student"):
    model = models.from_pretrained(os.path.join(ASSETS, name))
    tok = models.load_tokenizer(os.path.join(ASSETS, name))
    generate_fn = evaluate.sampler_generate_fn(model, tok, None, max_new_tokens=304,
                                               temperature=0.0)
    acc[name] = evaluate.evaluate(generate_fn, tok, problems, k=1)["avg@k"]
  assert acc["teacher"] >= 0.75, acc
  assert acc["student"] <= acc["teacher"] - 0.2, acc


def test_config_and_variants():
  from tropd_jax.experiments import ablation

  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "tally.py"))
  config_lib.validate(config)
  assert config.objective.name == "tropd" and config.eval.paths[0].endswith("heldout.jsonl")
  assert config.student.path.startswith(ASSETS)
  for objective in ablation.OBJECTIVES:
    variant = ablation.run_config(objective, os.path.join(ROOT, "configs", "tally.py"))
    obj = config_lib.validate(variant) and config_lib.objective_config(variant)
    assert obj.name == ablation.VARIANTS.get(objective, (objective,))[0]
  with pytest.raises(ValueError, match="config variant 'nope'"):
    config_lib.load_config_file(os.path.join(ROOT, "configs", "tally.py:nope"))


def test_two_training_steps(tmp_path):
  """configs/tally.py for two steps, shrunk to a few short rows (the 8-device test mesh)."""
  from tropd_jax import train

  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "tally.py"))
  config.update_from_flattened_dict({
      "workdir": str(tmp_path / "run"), "steps": 2, "rollout.prompts_per_step": 2,
      "rollout.num_samples": 2, "rollout.max_new_tokens": 24, "rollout.slots": 8,
      "rollout.prompt_buckets": (64, 96), "guidance.max_teacher_tokens": 24,
      "train.pack_length": 0, "train.micro_batch": 8, "eval.limit": 2, "eval.k": 1, "eval.max_new_tokens": 24,
      "eval.every": 0})
  last = train.run_training(config)
  assert np.isfinite(last["loss"]) and np.isfinite(last["grad_norm"])
  records = metrics_lib.read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [0, 1, 2]
  assert records[1]["rollout/response_length"] > 0 and "eval/avg@k" in records[-1]


def test_make_assets_writes_what_the_task_ships(tmp_path):
  """The models script's shared body, with two-step recipes: the layout of the shipped assets."""
  import dataclasses

  from tropd_jax.demo import sft
  from tropd_jax.tally import make_models

  heldout = [p.record() for p in task.make_problems(2, seed=7)]
  recipes = [dataclasses.replace(r, d_model=16, num_layers=1, d_ff=32, steps=2, batch=2,
                                 warmup=1)
             for r in (make_models.TEACHER, make_models.STUDENT)]
  acc = sft.make_assets(str(tmp_path), heldout, heldout[:1], make_models.build_tokenizer,
                        recipes, lambda r, tok: make_models._batches(r, tok, set()),
                        sft.Evaluation(1.0, 1, 4, "a test"),
                        max_positions=make_models.MAX_POSITIONS)
  # Four new tokens cannot hold a boxed answer: nothing is graded correct.
  assert acc == {"teacher": 0.0, "student": 0.0}
  assert sorted(os.listdir(tmp_path)) == ["heldout.jsonl", "student", "teacher", "train.jsonl"]
  for name, records in (("heldout.jsonl", heldout), ("train.jsonl", heldout[:1])):
    with open(tmp_path / name) as f:
      assert [json.loads(line) for line in f] == records
  for name in ("teacher", "student"):
    model = models.from_pretrained(str(tmp_path / name))
    assert model.cfg.d_model == 16 and model.cfg.max_position_embeddings == 512
    assert models.load_tokenizer(str(tmp_path / name)).vocab_size == model.cfg.vocab_size
