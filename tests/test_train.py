"""The whole distillation loop on tiny HF checkpoints: every objective, resume, bad input."""

import json
import os

import jax
import numpy as np
import pytest

import tiny_config as tiny_config_file
from hf_fixtures import make_hf_model, make_tokenizer, xla_flags
from tropd_jax import config as config_lib
from tropd_jax import metrics as metrics_lib
from tropd_jax import models, train

PROBLEMS = ["the cat sat", "12 + 34", "on the mat", "cat 46", "the 12 mat", "sat on 34"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  make_hf_model(root / "teacher", "qwen2", seed=1, layers=2, d_model=32, peaked=3.0)
  make_hf_model(root / "student", "qwen2", seed=2, layers=1, d_model=32, peaked=3.0)
  for name in ("teacher", "student"):
    make_tokenizer(root / name)
  with open(root / "train.jsonl", "w") as f:
    for i, p in enumerate(PROBLEMS):
      f.write(json.dumps({"problem": p, "answer": str(i), "response": "the cat 12"}) + "\n")
  return root


def tiny_config(root, workdir, objective="tropd", **overrides):
  c = tiny_config_file.get_config(objective)
  c.workdir = str(workdir)
  c.student.path = str(root / "student")
  c.teacher.path = str(root / "teacher")
  c.data.train_path = str(root / "train.jsonl")
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _params(workdir_model):
  from flax import nnx
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(workdir_model, nnx.Param))]


@pytest.mark.parametrize("objective", sorted(
    ["opd", "tropd", "topk_fkl", "jsd", "entropy_opd", "eopd", "clip_outlier", "mask_outlier",
     "fkl_outlier"]))
def test_loop_runs_every_objective(checkpoints, tmp_path, objective):
  steps = 2 if objective == "tropd" else 1  # Guidance anneals to no prefix at the last step.
  config = tiny_config(checkpoints, tmp_path / "run", objective, steps=steps)
  before = _params(models.from_pretrained(str(checkpoints / "student")))
  last = train.run_training(config)
  assert np.isfinite(last["loss"]) and last["finite"] == 1
  records = metrics_lib.read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  for field in ("loss", "grad_norm", "rollout/response_length", "tokens_per_s/sample", "rollout/logp_mismatch"):
    assert field in records[-1], field
  if objective in ("tropd", "fkl_outlier"):
    assert 0 <= records[-1]["trust_frac"] <= 1
  if objective == "tropd":
    assert records[-1]["rollout/prefix_length"] > 0
    assert os.listdir(tmp_path / "run" / "teacher_responses")  # One shard per generating step.
  assert os.listdir(tmp_path / "run" / "tensorboard")
  run = train.setup(config)  # resumes from the final checkpoint
  after = _params(run.student)
  assert int(run.state.step) == steps
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_resume_matches_uninterrupted(checkpoints, tmp_path):
  full = tiny_config(checkpoints, tmp_path / "full", steps=3)
  train.run_training(full)
  resumed = tiny_config(checkpoints, tmp_path / "part", steps=3)
  train.run_training(resumed, stop_at_step=2)
  train.run_training(resumed)
  a = metrics_lib.read_metrics(str(tmp_path / "full"))
  b = metrics_lib.read_metrics(str(tmp_path / "part"))
  assert [r["step"] for r in b] == [1, 2, 3]
  for ra, rb in zip(a, b):
    for k in ("loss", "grad_norm", "trust_frac", "rollout/response_length"):
      np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, atol=1e-7, err_msg=k)
  pa = _params(train.setup(full).student)
  pb = _params(train.setup(resumed).student)
  for x, y in zip(pa, pb):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_corrupted_latest_checkpoint_falls_back(checkpoints, tmp_path, caplog):
  config = tiny_config(checkpoints, tmp_path / "run", "opd", steps=2)
  train.run_training(config)
  step_dir = tmp_path / "run" / "checkpoints" / "2"
  for dirpath, _, files in os.walk(step_dir / "state"):
    for f in files:
      with open(os.path.join(dirpath, f), "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level("WARNING"):
    run = train.setup(config)
  assert int(run.state.step) == 1
  assert "checkpoints/2 is damaged" in caplog.text and "trying step 1" in caplog.text
  assert (tmp_path / "run" / "checkpoints" / "2.damaged" / "state").is_dir()  # Moved, not lost.


def test_bad_inputs(checkpoints, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    train.setup(tiny_config(checkpoints, tmp_path, student__path=str(tmp_path / "missing")))
  with pytest.raises(FileNotFoundError, match="data file .* does not exist"):
    train.setup(tiny_config(checkpoints, tmp_path, data__train_path=str(tmp_path / "no.jsonl")))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="holds no records"):
    train.setup(tiny_config(checkpoints, tmp_path, data__train_path=str(empty)))
  with pytest.raises(ValueError, match="every one of the 6 prompts .*data.max_prompt_tokens=3"):
    train.setup(tiny_config(checkpoints, tmp_path, data__max_prompt_tokens=3,
                            rollout__prompt_buckets=(3,)))
  with pytest.raises(ValueError, match="config field 'train.lrr' does not exist"):
    c = tiny_config(checkpoints, tmp_path)
    c.unlock()
    c.train.lrr = 1.0
    config_lib.validate(c)
  with pytest.raises(ValueError, match="objective.name='tropdd'"):
    config_lib.validate(tiny_config(checkpoints, tmp_path, objective="tropdd"))
  other = tmp_path / "other_tok"
  make_hf_model(other, "qwen2", layers=1)
  make_tokenizer(other, corpus=["entirely different words\n"] * 10)
  with pytest.raises(ValueError, match="teacher tokenizer .* and student tokenizer .*differ"):
    train.setup(tiny_config(checkpoints, tmp_path, teacher__path=str(other)))


def test_nonfinite_loss_stops_the_run(checkpoints, tmp_path):
  config = tiny_config(checkpoints, tmp_path / "run", "opd", steps=3, train__lr=1e30,
                       train__grad_clip=0.0, train__max_bad_steps=1)
  with pytest.raises(train.NonFiniteLossError, match="consecutive steps had a non-finite"):
    train.run_training(config)


def test_eval_and_export(checkpoints, tmp_path):
  from tropd_jax import export

  problems = tmp_path / "eval.jsonl"
  problems.write_text("".join(json.dumps({"problem": p, "answer": "12"}) + "\n"
                              for p in PROBLEMS[:2]))
  config = tiny_config(checkpoints, tmp_path / "run", "opd", steps=2,
                       eval__paths=(str(problems),), eval__k=2, eval__max_new_tokens=4)
  last = train.run_training(config)
  assert "eval/avg@k" in last
  records = metrics_lib.read_metrics(str(tmp_path / "run"))
  assert records[0]["step"] == 0 and "eval/avg@k" in records[0]
  assert os.path.exists(tmp_path / "run" / "eval" / "step_2" / "eval.samples.jsonl")
  out = tmp_path / "exported"
  assert export.export(config, str(out)).step == 2
  exported = models.from_pretrained(str(out))
  run = train.setup(config)
  for a, b in zip(_params(exported), _params(run.student)):
    np.testing.assert_array_equal(a, b)
  assert models.load_tokenizer(str(out)).vocab_size == run.tokenizer.vocab_size


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _main_command(root, workdir, *extra):
  import sys

  here = os.path.dirname(__file__)
  return [sys.executable, "-m", "tropd_jax.main", f"--config={here}/tiny_config.py",
          f"--config.workdir={workdir}", f"--config.student.path={root / 'student'}",
          f"--config.teacher.path={root / 'teacher'}",
          f"--config.data.train_path={root / 'train.jsonl'}", *extra]


@pytest.mark.slow
def test_two_processes_match_one(checkpoints, tmp_path):
  """2 processes x 4 CPU devices (gloo) give the 8-device single-process result."""
  import subprocess

  single = tiny_config(checkpoints, tmp_path / "single", steps=2)
  train.run_training(single)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(4)}
  port = _free_port()
  procs = [
      subprocess.Popen(
          _main_command(checkpoints, tmp_path / "multi", "--config.steps=2",
                        f"--coordinator=localhost:{port}", "--num_processes=2",
                        f"--process_id={i}"),
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  a = metrics_lib.read_metrics(str(tmp_path / "single"))
  b = metrics_lib.read_metrics(str(tmp_path / "multi"))
  assert [r["step"] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    for k in ("loss", "grad_norm", "trust_frac", "rollout/response_length"):
      np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)
  multi = tiny_config(checkpoints, tmp_path / "multi", steps=2)
  # All-reduces over gloo sum in another order; Adam's normalized steps (lr 1e-2) carry
  # those float32 rounding differences into the parameters at the 1e-5 level.
  for x, y in zip(_params(train.setup(single).student), _params(train.setup(multi).student)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)


def _wait_for_step(workdir, step, proc, timeout=300):
  import time

  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for line in f if line.strip()) >= step:
          return
    time.sleep(0.2)
  raise TimeoutError(f"no step {step} in {path}")


def test_signal_during_an_unforced_save_saves_the_next_step(checkpoints, tmp_path, monkeypatch):
  """A SIGTERM that lands while a step's (unforced) save runs must not end the run unsaved."""
  import signal

  from tropd_jax import checkpoint as ckpt_lib

  original = ckpt_lib.Checkpointer.save

  def save_then_signal(self, step, state, meta, *, force=False):
    saved = original(self, step, state, meta, force=force)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before save() returns
    return saved

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_then_signal)
  work = tmp_path / "run"
  with pytest.raises(train.stopping.RunInterrupted, match="SIGTERM received: saved step 3"):
    train.run_training(tiny_config(checkpoints, work, steps=10, checkpoint__every=1000))
  last_logged = metrics_lib.read_metrics(str(work))[-1]["step"]
  saved = ckpt_lib.Checkpointer(str(work / "checkpoints"), every=1, keep=9).manager.latest_step()
  assert saved == last_logged == 3


@pytest.mark.slow
def test_sigterm_saves_and_sigkill_resumes(checkpoints, tmp_path):
  import signal
  import subprocess

  from tropd_jax import checkpoint as ckpt_lib

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  work = tmp_path / "run"
  cmd = _main_command(checkpoints, work, "--config.steps=1000", "--config.checkpoint.every=1000")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  _wait_for_step(work, 2, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 143, out[-3000:]
  assert "stopped: SIGTERM received: saved step" in out
  saved = ckpt_lib.Checkpointer(str(work / "checkpoints"), every=1, keep=9).manager.latest_step()
  assert saved == metrics_lib.read_metrics(str(work))[-1]["step"] >= 2

  cmd = _main_command(checkpoints, work, "--config.steps=1000", "--config.checkpoint.every=1")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  # Orbax starts a save only after the previous one has finished, so once step saved + 3 is
  # logged the save of step saved + 1 is complete on disk.
  _wait_for_step(work, saved + 3, proc)
  proc.kill()
  proc.communicate()
  last = ckpt_lib.Checkpointer(str(work / "checkpoints"), every=1, keep=9).manager.latest_step()
  assert last > saved
  run = train.setup(tiny_config(checkpoints, work, steps=1000))
  assert int(run.state.step) == last


def test_phases_compile_once_over_three_steps(checkpoints, tmp_path, monkeypatch):
  ready = []
  student = train.sampling_student

  def recording(run):
    ready.append(all(x.is_ready() for x in jax.tree.leaves(run.state.params)))
    return student(run)

  monkeypatch.setattr(train, "sampling_student", recording)
  config = tiny_config(checkpoints, tmp_path / "run", steps=3)
  train.run_training(config)
  records = metrics_lib.read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [1, 2, 3]
  # time/decode_layout_s times the copy alone: the previous step's update has finished first.
  assert ready == [True] * 3
  # score, zeros, accumulate, apply and the decode-layout copy: one program each, at every step.
  assert [r["train/compilations"] for r in records] == [5, 5, 5]
  assert records[1]["sampler/compilations"] == records[2]["sampler/compilations"]
  assert all(r["train/padding_ratio"] >= 1 for r in records)


def test_train_and_aot_compile_the_same_phases(checkpoints, tmp_path):
  """aot lowers the trainer's own jitted phases: the same programs, from abstract shapes."""
  from tropd_jax import aot
  from tropd_jax import train_step as ts
  from tropd_jax.batch import Batch

  config = tiny_config(checkpoints, tmp_path / "run", steps=1)
  run = train.setup(config)
  report = aot.compile_run(config, jax.devices(), hbm=2**34, only=("score", "train"),
                           log=lambda _: None)
  lowered = {p.name: p.lowered for p in report.phases}
  s = run.settings
  mb = ts.put_batch(Batch.zeros(s.train.micro_batch, s.train.pack_length), run.mesh)
  with jax.set_mesh(run.mesh):
    assert run.phases.score.lower(run.teacher_params, mb).as_text() == lowered["score"]
    scores = run.phases.score(run.teacher_params, mb)
    acc = run.phases.zeros(run.state.params)
    ours = run.phases.accumulate.lower(acc, run.state.params, mb, scores, run.key,
                                       run.state.step, np.float32(1.0), None).as_text()
    assert ours == lowered["train/accumulate"]
    assert run.phases.apply.lower(run.state, *acc).as_text() == lowered["train/apply"]
  run.checkpointer.close()
  run.writer.close()


def test_rollout_seed_depends_on_the_seed_and_the_step():
  seeds = {train.rollout_seed(seed, step) for seed in range(4) for step in range(50)}
  assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
  assert train.rollout_seed(3, 7) == train.rollout_seed(3, 7)


def test_two_seeds_sample_differently_and_one_seed_the_same(checkpoints, tmp_path):
  """Runs that differ only in ``seed`` draw independent rollouts (the ablation's seeds)."""

  def rollout(seed, name):
    run = train.setup(tiny_config(checkpoints, tmp_path / name, "opd", seed=seed,
                                  data__shuffle=False, rollout__max_new_tokens=12))
    rollout, _ = train.sample(run, train.upcoming_prompts(run, 1)[:2], step=5)
    run.checkpointer.close()
    run.writer.close()
    return [t.tolist() for t in rollout.tokens]

  a, again, b = rollout(0, "a"), rollout(0, "again"), rollout(1, "b")
  assert a == again
  assert a != b and [len(x) > 0 for x in a] == [len(x) > 0 for x in b]
