"""The embedded demo: task and grading, the shipped models and data, the config, the notebook."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import config as config_lib
from tropd_jax import evaluate, models
from tropd_jax import metrics as metrics_lib
from tropd_jax.demo import ASSETS, task
from tropd_jax.experiments import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(name):
  with open(os.path.join(ASSETS, name)) as f:
    return [json.loads(line) for line in f]


def test_problem_solution_and_grading():
  p = task.Problem(23, (("+", 7), ("-", 5), ("+", 9)))
  assert p.prompt == "What is 23+7-5+9?"
  assert p.totals() == [30, 25, 34] and p.answer == 34
  assert p.solution("lines") == "23+7=30\n30-5=25\n25+9=34\nThe answer is \\boxed{34}."
  assert p.solution("inline") == "23+7=30, 30-5=25, 25+9=34, so \\boxed{34}."
  for style in task.STYLES:
    assert task.is_correct(p.solution(style), p.answer)
  assert task.is_correct("so \\boxed{ 34 }", "34")
  assert not task.is_correct(p.solution().replace("{34}", "{35}"), 34)
  assert not task.is_correct("23+7=30, 30-5=25, 25+9=34", 34)  # Nothing boxed.
  with pytest.raises(ValueError, match="style='prose'"):
    p.solution("prose")


def test_generator_is_seeded_distinct_and_in_range():
  a = task.make_problems(500, seed=3)
  assert a == task.make_problems(500, seed=3) and a != task.make_problems(500, seed=4)
  assert len({p.prompt for p in a}) == 500
  for p in a:
    assert 2 <= len(p.steps) <= 4 and task.MIN_START <= p.start <= task.MAX_START
    assert all(0 <= t <= 99 for t in p.totals())
    assert all(op in "+-" and 1 <= x <= task.MAX_OPERAND for op, x in p.steps)
  held = {p.prompt for p in a[:100]}
  assert not held & {p.prompt for p in task.make_problems(300, seed=5, exclude=held)}


def test_shipped_data():
  heldout, train = _jsonl("heldout.jsonl"), _jsonl("train.jsonl")
  assert len(heldout) == 256 and len(train) >= 1000
  assert not {r["problem"] for r in heldout} & {r["problem"] for r in train}
  for r in heldout[:20] + train[:20]:
    assert set(r) == {"problem", "answer"}
  assert evaluate.load_problems(os.path.join(ASSETS, "heldout.jsonl"))[0] == heldout[0]


def test_shipped_models_load_and_share_a_tokenizer():
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
  assert total < 20 * 2**20
  toks = {n: models.load_tokenizer(os.path.join(ASSETS, n)) for n in ("teacher", "student")}
  teacher = models.from_pretrained(os.path.join(ASSETS, "teacher"))
  student = models.from_pretrained(os.path.join(ASSETS, "student"))
  assert student.cfg.num_params() < teacher.cfg.num_params()
  vocab = models.check_same_tokenizer(toks["teacher"], toks["student"], teacher.cfg.vocab_size,
                                      student.cfg.vocab_size)
  tok = toks["student"]
  assert vocab == tok.vocab_size
  assert tok.hf.chat_template and tok.stop_ids == (tok.hf.convert_tokens_to_ids("<|im_end|>"),)
  prompt = tok.encode_prompt("What is 23+7-5+9?")
  assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
  solution = task.Problem(23, (("+", 7), ("-", 5), ("+", 9))).solution()
  assert tok.decode(tok.encode(solution)) == solution
  assert len(prompt) + len(tok.encode(solution)) < 64


def test_teacher_solves_what_the_student_gets_wrong():
  problems = evaluate.load_problems(os.path.join(ASSETS, "heldout.jsonl"), limit=32)
  acc = {}
  for name in ("teacher", "student"):
    model = models.from_pretrained(os.path.join(ASSETS, name))
    tok = models.load_tokenizer(os.path.join(ASSETS, name))
    generate_fn = evaluate.sampler_generate_fn(model, tok, None, max_new_tokens=48,
                                               temperature=0.0)
    acc[name] = evaluate.evaluate(generate_fn, tok, problems, k=1)["avg@k"]
  assert acc["teacher"] >= 0.9, acc
  assert acc["student"] <= acc["teacher"] - 0.2, acc


def test_demo_config_and_variants():
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  config_lib.validate(config)
  assert config.objective.name == "tropd" and config.eval.paths[0].endswith("heldout.jsonl")
  assert config.rollout.prompt_buckets[-1] >= config.data.max_prompt_tokens
  for objective in ablation.OBJECTIVES:
    variant = ablation.run_config(objective, os.path.join(ROOT, "configs", "demo.py"))
    name = ablation.VARIANTS.get(objective, (objective,))[0]
    assert config_lib.validate(variant).objective.name == name
  with pytest.raises(ValueError, match="config variant 'nope'"):
    config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py:nope"))


def _fake_run(workdir, seed, accuracies, steps=6):
  with metrics_lib.MetricsWriter(str(workdir)) as writer:
    writer.write(0, {"eval/avg@k": accuracies[0]})
    for step in range(1, steps + 1):
      scalars = {"grad_norm": 1.0 + seed, "student_entropy": 0.5, "trust_frac": 0.9}
      if step == steps:
        scalars["eval/avg@k"] = accuracies[1]
      writer.write(step, scalars)


def test_ablation_table_and_plots(tmp_path):
  results = {}
  for objective, after in (("opd", (0.6, 0.7)), ("tropd", (0.7, 0.8))):
    for seed, acc in enumerate(after):
      _fake_run(tmp_path / objective / str(seed), seed, (0.5, acc))
      results.setdefault(objective, []).append(ablation.summarize_run(str(tmp_path / objective /
                                                                             str(seed))))
  assert ablation._finished(str(tmp_path / "opd" / "0"), 6)
  assert not ablation._finished(str(tmp_path / "opd" / "0"), 7)
  run = results["tropd"][1]
  assert run["accuracy_before"] == 0.5 and run["accuracy"] == 0.8 and run["grad_norm"] == 2.0
  text = ablation.table(results)
  assert "| student before | 50.0 |" in text and "| 41.27 |" in text
  assert "| TrOPD | 75.0 ± 7.1 | +25.0 | 1.5 ± 0.71 | 2 | 0.5 ± 0 | 0.9 ± 0 | 49.85 |" in text
  for png in ablation.plot(results, str(tmp_path)):
    assert os.path.getsize(png) > 1000


@pytest.mark.slow
def test_notebook_runs_the_demo(tmp_path, monkeypatch):
  """The Colab notebook, top to bottom on the CPU, with a 1-step demo of 8 prompts."""
  import nbclient
  import nbformat

  workdir = tmp_path / "demo"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TROPD_DEMO_STEPS", "1")
  monkeypatch.setenv("TROPD_DEMO_WORKDIR", str(workdir))
  monkeypatch.setenv("TROPD_DEMO_FLAGS", " ".join([
      "--config.rollout.prompts_per_step=8", "--config.rollout.slots=32",
      "--config.train.micro_batch=8", "--config.eval.limit=8", "--config.eval.every=0"]))
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "colab_demo.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "running on: cpu" in outputs and "held-out accuracy:" in outputs
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  records = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [0, 1]
  assert np.isfinite(records[-1]["loss"]) and os.path.exists(workdir / "metrics.png")


def test_checkpointer_takes_a_relative_directory(tmp_path, monkeypatch):
  """The demo's work directory is relative to where it is launched (``runs/demo_...``)."""
  from tropd_jax import checkpoint as ckpt_lib

  monkeypatch.chdir(tmp_path)
  ckpt = ckpt_lib.Checkpointer("runs/x/checkpoints", every=1, keep=1, async_save=False)
  state = {"w": jnp.arange(3.0)}
  assert ckpt.save(1, state, {"step": 1}, force=True)
  ckpt.close()
  assert (tmp_path / "runs" / "x" / "checkpoints" / "1").is_dir()
  restored, meta = ckpt_lib.Checkpointer("runs/x/checkpoints", every=1, keep=1).restore(
      1, ckpt_lib.abstract_like(state))
  assert meta == {"step": 1} and np.array_equal(restored["w"], state["w"])
