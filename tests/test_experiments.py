"""The experiment commands: the ablation's task flag and variants, the step-0 diagnosis."""

import json
import math
import os

import numpy as np
import pytest

import tiny_config as tiny_config_file
from hf_fixtures import make_hf_model, make_tokenizer
from tropd_jax import config as config_lib
from tropd_jax import metrics as metrics_lib
from tropd_jax import models
from tropd_jax.cli import UserError
from tropd_jax.experiments import ablation, diagnose, tasks
from tropd_jax.sampling import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- ablation


def test_task_names_its_config_file():
  assert tasks.config_file("demo") == os.path.join(ROOT, "configs", "demo.py")
  assert tasks.config_file("tally") == os.path.join(ROOT, "configs", "tally.py")
  with pytest.raises(UserError, match="--task='nope' is not one of"):
    tasks.config_file("nope")


def test_bernoulli_variants_change_only_the_region():
  for task in tasks.TASKS:
    for name, outlier in (("clip_outlier", "clip"), ("mask_outlier", "mask")):
      plain = ablation.run_config(name, tasks.config_file(task))
      bernoulli = ablation.run_config(f"{name}_bernoulli", tasks.config_file(task))
      assert config_lib.objective_config(plain).region == "threshold"
      obj = config_lib.objective_config(bernoulli)
      assert (obj.name, obj.region, obj.outlier, obj.guidance) == (name, "bernoulli", outlier,
                                                                     False)
      plain.objective.region = "bernoulli"
      plain.workdir = bernoulli.workdir  # a timestamp: the two configs may be built a second apart
      assert plain.to_dict() == bernoulli.to_dict()


def _fake_run(workdir, accuracies=(0.4, 0.6), steps=3):
  with metrics_lib.MetricsWriter(str(workdir)) as writer:
    writer.write(0, {"eval/avg@k": accuracies[0]})
    for step in range(1, steps + 1):
      scalars = {"grad_norm": float(step), "student_entropy": 0.5, "trust_frac": 0.9}
      if step == steps:
        scalars["eval/avg@k"] = accuracies[1]
      writer.write(step, scalars)


def test_the_task_flag_chooses_the_config(tmp_path, monkeypatch):
  runs = []

  def run_one(objective, seed, workdir, config_file, steps):
    runs.append((objective, seed, config_file))
    _fake_run(workdir)
    return True

  monkeypatch.setattr(ablation, "run_one", run_one)
  with pytest.raises(SystemExit) as exit_:
    ablation.main(["--task=tally", "--objectives=opd,mask_outlier_bernoulli", "--seeds=0,1",
                   f"--out={tmp_path}"])
  assert exit_.value.code == 0
  tally = os.path.join(ROOT, "configs", "tally.py")
  assert runs == [("opd", 0, tally), ("opd", 1, tally), ("mask_outlier_bernoulli", 0, tally),
                  ("mask_outlier_bernoulli", 1, tally)]
  text = (tmp_path / "results.md").read_text()
  assert "| Mask Outlier (Bernoulli) | 60.0 ± 0.0 | +20.0 | 2 ± 0 | 3 |" in text
  # The command that made the table, and its wall time.
  assert "python -m tropd_jax.experiments.ablation --task=tally --objectives=" in text
  assert "4 of the 4 runs trained by this command" in text
  assert json.loads((tmp_path / "results.json").read_text())["task"] == "tally"


@pytest.mark.parametrize("argv, message", [
    (["--task=nope"], "--task='nope' is not one of"),
    (["--objectives=opd,ppo"], "--objectives: 'ppo' is not one of"),
    (["--seeds=0,x"], "--seeds='0,x' must be comma-separated integers"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    ablation.main(argv + [f"--out={tmp_path}"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err


# ---------------------------------------------------------------- diagnosis


def test_summarize_hand_made_rollouts():
  rows = [  # log 0.1 = -2.303: the outliers are -3 and -2.4, and -5.
      diagnose.RowScores(np.array([0.0, -3.0, -0.5, -2.4]), np.ones(4), True),
      diagnose.RowScores(np.array([0.0, 0.0, -1.0]), np.ones(3), True),
      diagnose.RowScores(np.array([-5.0, 0.0, -0.1]), np.array([0.5, 1.0, 2.0]), False),
  ]
  s = diagnose.summarize(rows)
  assert s["rollouts"] == 3 and s["accuracy"] == pytest.approx(2 / 3)
  assert s["mean_tokens"] == pytest.approx(10 / 3)
  assert s["outlier_tokens_correct"] == pytest.approx(2 / 7)
  assert s["outlier_tokens_wrong"] == pytest.approx(1 / 3)
  assert s["outliers_in_correct"] == pytest.approx(2 / 3)
  assert s["rollouts_with_outlier_correct"] == pytest.approx(1 / 2)
  assert s["rollouts_with_outlier_wrong"] == 1.0
  assert s["grad_share_adv2"] == pytest.approx((9 + 5.76 + 25) / (15.01 + 1 + 25.01))
  assert s["grad_share_adv2_gradnorm2"] == pytest.approx((9 + 5.76 + 12.5) / (15.01 + 1 + 12.52))
  assert math.isnan(diagnose.summarize(rows[:2])["outlier_tokens_wrong"])
  table = diagnose.format_table({"toy": s})
  assert "| outlier tokens, in correct rollouts | 28.6 % |" in table
  assert "| wrong rollouts with >= 1 outlier | 100.0 % |" in table
  with pytest.raises(ValueError, match="no rollouts"):
    diagnose.summarize([])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("diagnose")
  # Peaked logits: two random models then disagree by far more than a factor of ten somewhere.
  make_hf_model(root / "teacher", "qwen2", seed=1, layers=2, d_model=32, peaked=30.0)
  make_hf_model(root / "student", "qwen2", seed=2, layers=1, d_model=32, peaked=30.0)
  for name in ("teacher", "student"):
    make_tokenizer(root / name)
  with open(root / "train.jsonl", "w") as f:
    for i, p in enumerate(["the cat sat", "12 + 34", "on the mat", "cat 46"]):
      f.write(json.dumps({"problem": p, "answer": str(i)}) + "\n")
  return root


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_score_reads_the_completion_tokens(checkpoints):
  student = models.from_pretrained(str(checkpoints / "student"))
  teacher = models.from_pretrained(str(checkpoints / "teacher"))
  rng = np.random.default_rng(0)
  tokens = (rng.integers(3, 90, 9).astype(np.int32), rng.integers(3, 90, 6).astype(np.int32))
  rollout = Rollout(tokens=tokens, prompt_lengths=np.array([4, 2], np.int32),
                    prefix_lengths=np.array([0, 2], np.int32),
                    logp=(np.zeros(5, np.float32), np.zeros(2, np.float32)),
                    stopped=np.array([True, False]))
  scored = diagnose.score(student, teacher, rollout, vocab_size=97, rows_per_call=1)
  for (adv, grad_sq), ids, first in zip(scored, tokens, (4, 4)):
    ls = _log_softmax(np.asarray(student(ids[None, :-1]))[0])
    lt = _log_softmax(np.asarray(teacher(ids[None, :-1]))[0])
    targets = ids[first:]
    rows = np.arange(first - 1, len(ids) - 1)
    np.testing.assert_allclose(adv, lt[rows, targets] - ls[rows, targets], atol=1e-4)
    p = np.exp(ls[rows])
    onehot = np.eye(p.shape[-1])[targets]
    np.testing.assert_allclose(grad_sq, ((onehot - p) ** 2).sum(-1), atol=1e-5)
  same = diagnose.score(student, student, rollout, vocab_size=97)
  assert all(np.abs(adv).max() < 1e-5 for adv, _ in same)


def _tiny_config(root, teacher):
  c = tiny_config_file.get_config("opd")
  c.workdir = str(root / "unused")
  c.student.path = str(root / "student")
  c.teacher.path = str(root / teacher)
  c.data.train_path = str(root / "train.jsonl")
  c.rollout.max_new_tokens = 12
  return c


def test_diagnose_samples_the_first_step(checkpoints):
  summary, rows = diagnose.diagnose(_tiny_config(checkpoints, "teacher"))
  assert summary["rollouts"] == len(rows) == 2 * 2
  assert all(1 <= len(r.adv) <= 12 for r in rows)
  assert summary["rollouts_with_outlier_wrong"] > 0  # Two random models disagree somewhere.
  again, _ = diagnose.diagnose(_tiny_config(checkpoints, "teacher"))
  assert again == summary  # The run's rollout seed: the same step-0 rollouts.
  alone, _ = diagnose.diagnose(_tiny_config(checkpoints, "student"))
  assert alone["outlier_tokens_wrong"] == 0 and math.isnan(alone["outliers_in_correct"])
  assert not os.path.exists(checkpoints / "unused")  # A diagnosis writes nothing.
