"""Fault injection: a run never loses finished work, and a user's mistake is one line.

Each test reproduces one way a run used to lose or corrupt work, or to compute a silently wrong
result (a changed config on resume, a damaged checkpoint, Ctrl-C, a failed relaunch, too few
prompts, repeated metrics, a mislabelled checkpoint, a preempted host of a multi-host run, a
user error buried in a traceback) and checks the behaviour that replaces it.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hf_fixtures import make_hf_model, xla_flags
from test_train import (_free_port, _main_command, _params, _wait_for_step,  # noqa: F401
                        checkpoints, tiny_config)
from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import cli, data as data_lib, metrics as metrics_lib, models, run_guard, stopping
from tropd_jax import config as config_lib
from tropd_jax import export, objectives, train
from tropd_jax import student as student_lib


def tree_digest(root) -> dict[str, str]:
  """{relative path: sha256} of every file under ``root``."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def saved_params(workdir, step):
  """The student parameters of the checkpoint at ``step``, as NumPy arrays."""
  import jax

  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", every=1, keep=100,
                                       async_save=False)
  saved = checkpointer.manager.item_metadata(step)["state"].tree["params"]
  like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
  tree, _ = checkpointer.restore(step, {"params": like})
  checkpointer.close()
  return [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


def assert_same_params(a, b):
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def logged_steps(workdir):
  return [r["step"] for r in metrics_lib.read_metrics(str(workdir))]


@pytest.fixture(scope="module")
def base(checkpoints, tmp_path_factory):
  """An uninterrupted 3-step TrOPD run (checkpoints at steps 1, 2, 3) to compare against."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  train.run_training(tiny_config(checkpoints, workdir, steps=3))
  return workdir


def copy_run(base, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(base, workdir)
  return workdir


# --- 1. A changed config on resume ---------------------------------------------------------------

def test_resume_with_a_changed_config_is_refused_and_changes_nothing(checkpoints, base, tmp_path):
  workdir = copy_run(base, tmp_path)
  before = tree_digest(workdir)
  config = tiny_config(checkpoints, workdir, steps=3, train__grad_clip=0.0, seed=1)
  with pytest.raises(run_guard.ResumeRefused) as refused:
    train.setup(config)
  message = str(refused.value)
  assert "train.grad_clip 1.0 -> 0.0" in message and "seed 0 -> 1" in message
  assert "new --config.workdir" in message
  assert "--config.resume_changes=seed,train.grad_clip" in message
  assert tree_digest(workdir) == before

  # Allowed explicitly, the change reaches the checkpoint: another optimizer state is a
  # structure mismatch, reported as such; the run stops and still changes nothing.
  config = tiny_config(checkpoints, workdir, steps=3, train__grad_clip=0.0,
                       resume_changes="train.grad_clip")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="step 3 .* holds another state"):
    train.setup(config)
  assert tree_digest(workdir) == before


def test_fields_safe_on_resume_are_allowed(checkpoints, base, tmp_path):
  recorded = run_guard.read_recorded(str(base))
  config = tiny_config(checkpoints, tmp_path, steps=7, eval__k=9, checkpoint__keep=1,
                       mesh__fsdp=4, mesh__data=2)
  assert run_guard.config_changes(recorded, config).keys() == {
      "steps", "eval.k", "checkpoint.keep", "mesh.fsdp", "mesh.data", "workdir"}
  config = tiny_config(checkpoints, base, steps=7, eval__k=9, mesh__fsdp=4, mesh__data=2)
  assert run_guard.prepare(config).schedule_steps == 3


# --- 2. A damaged newest checkpoint ---------------------------------------------------------------

def _remove_a_data_file(step_dir):
  """Damages a checkpoint as a lost upload would: the state's array data files go missing."""
  data = [os.path.join(d, f) for d, _, files in os.walk(step_dir / "state") for f in files
          if os.path.basename(d) == "d"]
  assert data
  for path in data:
    os.remove(path)


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_finishes(checkpoints, base, tmp_path,
                                                                    caplog):
  workdir = copy_run(base, tmp_path)
  _remove_a_data_file(workdir / "checkpoints" / "3")
  damaged = tree_digest(workdir / "checkpoints" / "3")

  # export (and evaluate) read only: they fall back without moving anything, and say which step.
  run = student_lib.run_config(None, str(workdir))
  assert export.export(run, str(tmp_path / "exported")).step == 2
  assert (workdir / "checkpoints" / "3").is_dir()

  with caplog.at_level("WARNING"):
    train.run_training(tiny_config(checkpoints, workdir, steps=3))
  assert "checkpoints/3 is damaged" in caplog.text and "3.damaged" in caplog.text
  assert tree_digest(workdir / "checkpoints" / "3.damaged") == damaged  # Moved, not lost.
  assert logged_steps(workdir) == [1, 2, 3]  # 6. Each step once after a resume.
  assert_same_params(saved_params(workdir, 3), saved_params(base, 3))


def test_no_restorable_checkpoint_stops_instead_of_starting_fresh(checkpoints, base, tmp_path):
  workdir = copy_run(base, tmp_path)
  for step in (1, 2):  # keep=1: the newest checkpoint is the only one.
    shutil.rmtree(workdir / "checkpoints" / str(step))
  _remove_a_data_file(workdir / "checkpoints" / "3")
  before = tree_digest(workdir)
  with pytest.raises(ckpt_lib.NoGoodCheckpointError, match="no checkpoint .* can be restored"):
    train.setup(tiny_config(checkpoints, workdir, steps=3, checkpoint__keep=1))
  with pytest.raises(student_lib.UnreadableCheckpointError):
    export.export(student_lib.run_config(None, str(workdir)), str(tmp_path / "exported"))
  assert tree_digest(workdir) == before


# --- 3. Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_saves_the_step_and_resumes_to_the_same_parameters(checkpoints, base, tmp_path,
                                                                  monkeypatch):
  original = ckpt_lib.Checkpointer.save

  def save_then_interrupt(self, step, state, meta, *, force=False):
    saved = original(self, step, state, meta, force=force)
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 2 is about to start.
    return saved

  workdir = tmp_path / "run"
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_then_interrupt)
  with pytest.raises(stopping.RunInterrupted) as stopped:
    train.run_training(tiny_config(checkpoints, workdir, steps=3, checkpoint__every=100))
  assert stopped.value.exit_code == 130 and stopped.value.step == 2
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", original)
  train.run_training(tiny_config(checkpoints, workdir, steps=3, checkpoint__every=100))
  assert logged_steps(workdir) == [1, 2, 3]
  assert_same_params(saved_params(workdir, 3), saved_params(base, 3))


@pytest.mark.slow
def test_sigint_exits_130_and_a_second_one_at_once(checkpoints, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  work = tmp_path / "run"
  cmd = _main_command(checkpoints, work, "--config.steps=1000", "--config.checkpoint.every=1000")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  _wait_for_step(work, 2, proc)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130, out[-3000:]
  kept = ckpt_lib.Checkpointer(str(work / "checkpoints"), every=1, keep=9).steps()
  saved = kept[-1]
  assert saved == logged_steps(work)[-1] >= 2
  assert f"stopped: SIGINT received: saved step {saved}" in out

  # Resumed, and interrupted twice while it compiles its first step: the second Ctrl-C ends
  # the process at once, and the checkpoint it resumed from is left as it was.
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  while not any("resumed from step" in line for line in lines[-1:]):
    lines.append(proc.stdout.readline())
    assert lines[-1] or proc.poll() is None, "".join(lines)[-3000:]
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out = "".join(lines) + proc.communicate(timeout=60)[0]
  assert proc.returncode == 130, out[-3000:]
  assert "a second SIGINT: exiting at once" in out and "saved step" not in out, out[-3000:]
  assert ckpt_lib.Checkpointer(str(work / "checkpoints"), every=1, keep=9).steps() == kept


# --- 4. A failed relaunch -------------------------------------------------------------------------

def test_failed_relaunch_keeps_run_config(checkpoints, base, tmp_path):
  workdir = copy_run(base, tmp_path)
  before = tree_digest(workdir)
  config = tiny_config(checkpoints, workdir, steps=3, student__path=str(tmp_path / "missing"),
                       resume_changes="student.path")
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    train.setup(config)
  assert tree_digest(workdir) == before


def test_run_config_history(checkpoints, tmp_path):
  config = tiny_config(checkpoints, tmp_path, steps=3)
  run_guard.record_run_config(run_guard.prepare(config))
  first = (tmp_path / "run_config.json").read_text()
  run_guard.record_run_config(run_guard.prepare(config))  # Unchanged: nothing new.
  assert sorted(os.listdir(tmp_path)) == ["run_config.json"]
  config.steps = 5
  run_guard.record_run_config(run_guard.prepare(config))
  archived = [f for f in os.listdir(tmp_path) if f.startswith("run_config.2")]
  assert len(archived) == 1 and (tmp_path / archived[0]).read_text() == first
  recorded = json.loads((tmp_path / "run_config.json").read_text())
  assert recorded["steps"] == 5 and recorded["schedule_steps"] == 3


# --- 5. Too few prompts ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_prompts,per_step,epochs,processes", [
    (6, 2, 1, 1), (7, 2, 2, 1), (6, 4, 1, 1), (10, 4, 3, 2), (9, 6, 2, 3), (5, 2, 0, 1)])
def test_steps_of_prompts_is_what_the_stream_yields(num_prompts, per_step, epochs, processes):
  prompts = [data_lib.Prompt(i, (1, 2)) for i in range(num_prompts)]
  expected = run_guard.steps_of_prompts(num_prompts, per_step, epochs, processes)
  if not epochs:
    assert expected is None
    return
  counts = []
  for index in range(processes):  # What process `index` of `processes` draws.
    import grain

    ds = grain.MapDataset.range(len(prompts)).shuffle(seed=0).repeat(epochs)
    it = iter(ds[index::processes].to_iter_dataset().batch(per_step // processes,
                                                           drop_remainder=True))
    counts.append(sum(1 for _ in it))
  assert expected == min(counts)


def test_too_few_prompts_stop_before_training(checkpoints, tmp_path):
  config = tiny_config(checkpoints, tmp_path / "run", steps=4, data__num_epochs=1)
  with pytest.raises(ValueError,
                     match=r"data.num_epochs=1 over the 6 records of .* gives at most 3 steps"):
    train.run_training(config)
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


# --- 7. Silent wrong results ----------------------------------------------------------------------

def test_checkpoint_with_a_mislabelled_architecture_is_refused(tmp_path):
  make_hf_model(tmp_path, "qwen2", layers=1)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf["model_type"] = "llama"
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match=r"holds 3 tensors that a llama model .* does not use: "
                                       r"model.layers.0.self_attn.k_proj.bias"):
    models.from_pretrained(str(tmp_path))


def test_extending_steps_keeps_the_guidance_schedule(checkpoints, base, tmp_path):
  workdir = copy_run(base, tmp_path)
  train.run_training(tiny_config(checkpoints, workdir, steps=4))
  alphas = {r["step"]: r["guidance/alpha"] for r in metrics_lib.read_metrics(str(workdir))}
  assert alphas[1] == 1.0 and alphas[2] == pytest.approx(0.75)
  assert alphas[4] == 0.0  # Past the first launch's 3 steps: no prefix, not a restarted cosine.
  assert logged_steps(workdir) == [1, 2, 3, 4]
  assert objectives.guidance_fraction(5, 3) == 0.0


@pytest.mark.parametrize("field,value", [("temperature", 0.7), ("top_p", 0.9), ("top_k", 5)])
def test_tempered_rollouts_are_refused_for_on_policy_objectives(checkpoints, tmp_path, field,
                                                                value):
  for objective in ("tropd", "opd", "clip_outlier"):
    config = tiny_config(checkpoints, tmp_path, objective, **{f"rollout__{field}": value})
    with pytest.raises(ValueError, match=f"rollout.{field}={value!r} with objective.name"):
      config_lib.validate(config)
  # The top-k forward KL reads sampled tokens as contexts only: tempered rollouts are fine.
  config_lib.validate(tiny_config(checkpoints, tmp_path, "topk_fkl",
                                  **{f"rollout__{field}": value}))


def test_cosine_learning_rate_past_its_schedule_is_refused(checkpoints, tmp_path):
  config = tiny_config(checkpoints, tmp_path, steps=5, schedule_steps=3, train__schedule="cosine")
  with pytest.raises(ValueError, match="steps=5 goes past schedule_steps=3"):
    config_lib.validate(config)


# --- 8. Preemption of one host of a multi-host run ------------------------------------------------

@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(checkpoints, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(4)}
  port, work = _free_port(), tmp_path / "multi"
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = [
      subprocess.Popen(
          _main_command(checkpoints, work, "--config.steps=1000",
                        "--config.checkpoint.every=1000", f"--coordinator=localhost:{port}",
                        "--num_processes=2", f"--process_id={i}"),
          env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
      for i, log in enumerate(logs)
  ]
  try:
    deadline = time.time() + 600
    while not (work / "metrics.jsonl").exists() or len(logged_steps(work)) < 2:
      assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
      assert time.time() < deadline, "no step 2 logged"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # Only one host is preempted.
    for p in procs:
      p.wait(timeout=300)  # On a hang (a host waiting in a collective) this raises.
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text() for log in logs]
  saved = ckpt_lib.Checkpointer(str(work / "checkpoints"), every=1, keep=9).steps()[-1]
  for p, out in zip(procs, outputs):
    assert p.returncode == 143, out[-3000:]
    assert f"saved step {saved}" in out, out[-3000:]
  assert saved == logged_steps(work)[-1]


# --- 10. One line for a user error ----------------------------------------------------------------

def _command(*args, **env):
  return subprocess.run([sys.executable, *args], env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                      "XLA_FLAGS": xla_flags(), **env},
                        capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments):
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@contextlib.contextmanager
def small_file_system(path, size_kib: int, *, read_only: bool = False):
  """A tmpfs of ``size_kib`` at ``path`` (needs root); the test is skipped where it cannot mount."""
  os.makedirs(path)
  if os.geteuid() != 0 or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
      capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    if read_only:
      subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_config_mistakes_are_one_line(checkpoints, tmp_path):
  here = os.path.dirname(__file__)
  result = _command("-m", "tropd_jax.main", f"--config={here}/no_such_config.py")
  assert_one_line_error(result, "no_such_config.py", "does not exist")
  result = _command(*_main_command(checkpoints, tmp_path / "run", "--config.train.lrr=1")[1:])
  assert_one_line_error(result, "'lrr'", 'Did you mean "lr"')
  result = _command(*_main_command(checkpoints, tmp_path / "run",
                                   f"--config.student.path={tmp_path / 'nowhere'}")[1:])
  assert_one_line_error(result, "no checkpoint at", "nowhere")
  result = _command("-m", "tropd_jax.export", f"--workdir={tmp_path / 'none'}", "--out=x")
  assert_one_line_error(result, "run_config.json does not exist")
  result = _command("-m", "tropd_jax.evaluate", f"--config={here}/../configs/demo.py",
                    f"--config.workdir={tmp_path / 'run'}", f"--checkpoint={checkpoints / 'student'}",
                    f"--config.eval.paths=('{tmp_path / 'none.jsonl'}',)",
                    f"--out={tmp_path / 'eval'}")
  assert_one_line_error(result, "none.jsonl does not exist")
  result = _command("-m", "tropd_jax.aot", f"--config={here}/no_such_config.py",
                    "--topology=v5p:2x2x1")
  assert_one_line_error(result, "no_such_config.py", "does not exist")
  assert not os.path.exists(tmp_path / "run" / "run_config.json")


def test_read_only_work_directory_is_one_line(checkpoints, tmp_path):
  with small_file_system(tmp_path / "ro", 64, read_only=True) as ro:
    result = _command(*_main_command(checkpoints, ro / "run")[1:])
  assert_one_line_error(result, "Read-only file system", "choose a writable --config.workdir")


def test_full_disk_is_one_line(checkpoints, tmp_path):
  with small_file_system(tmp_path / "full", 16) as full:
    with open(full / "filler", "wb") as f:
      with contextlib.suppress(OSError):
        f.write(b"x" * 64 * 1024)
    result = _command(*_main_command(checkpoints, full / "run")[1:])
  assert_one_line_error(result, "No space left on device", "free space")


def test_a_bug_keeps_its_traceback(capsys):
  def bug():
    return np.zeros(6620).reshape(192, 64)

  with pytest.raises(ValueError, match="cannot reshape"):
    cli.run(bug)

  def user_mistake():
    cli.reads_user_input(bug)()

  with pytest.raises(SystemExit) as exited:
    cli.run(user_mistake)
  assert exited.value.code == 2
  assert capsys.readouterr().err == "error: cannot reshape array of size 6620 into shape (192,64)\n"
  with pytest.raises(SystemExit):
    cli.run(lambda: open("/dev/full", "w").write("x" * 10**6))
  assert "No space left on device" in capsys.readouterr().err
  assert cli.is_user_error(OSError(errno.EROFS, "Read-only file system", "/x"))


def test_truncated_safetensors_names_the_file(tmp_path):
  make_hf_model(tmp_path, "qwen2", layers=1)
  path = tmp_path / "model.safetensors"
  os.truncate(path, os.path.getsize(path) - 100)
  with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt: tensor .* "
                                       r"ends at byte \d+ of the data, but the file holds"):
    models.from_pretrained(str(tmp_path))
