"""tropd_jax.export: a run's student as an HF checkpoint that transformers loads and decodes."""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import tiny_run
from tropd_jax import export as export_lib
from tropd_jax import models, sampling
from tropd_jax import student as student_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run():
  root, overrides = tiny_run.tiny_run()
  return root, tiny_run.config(overrides)


def _safetensors_dtypes(out) -> set[str]:
  dtypes = set()
  for name in os.listdir(out):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(out, name), "np") as f:
        dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
  return dtypes


def _params(model) -> dict:
  return {p: np.asarray(v[...], np.float32) for p, v in models.hf_io.model_params(model)}


def test_bfloat16_export_loads_in_transformers_and_decodes_as_the_student(run, tmp_path):
  root, config = run
  out = tmp_path / "student_bf16"
  result = export_lib.export(config, str(out), dtype="bfloat16")
  assert (result.step, result.dtype, result.files) == (2, "bfloat16", ("model.safetensors",))
  assert _safetensors_dtypes(out) == {"BF16"}
  with open(out / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  assert os.path.exists(out / "tokenizer.json") and os.path.exists(out / "chat_template.jinja")

  # The run's student (its float32 master weights at step 2), rounded to bfloat16 exactly.
  student, step = student_lib.restore_student(config, dtype="float32")
  assert step == 2
  master = _params(student)
  exported = _params(models.from_pretrained(str(out), dtype="float32"))
  for path, w in master.items():
    rounded = np.asarray(w.astype(ml_dtypes.bfloat16), np.float32)
    np.testing.assert_array_equal(exported[path], rounded, err_msg=str(path))
  trained = _params(models.from_pretrained(config.student.path, dtype="float32"))
  assert any(not np.array_equal(master[p], trained[p]) for p in master)  # Training moved it.

  # Greedy decoding in transformers = our sampler on the same (bfloat16-rounded) student. (The
  # tiny random student's argmaxes are too close for rounding to leave them all in place: the
  # float32 export below decodes exactly as the run's master weights.)
  _assert_transformers_decodes_as(str(out), models.from_pretrained(str(out), dtype="float32"))


def _assert_transformers_decodes_as(out: str, model) -> None:
  tok = models.load_tokenizer(out)
  prompts = [tok.encode_prompt(p) for p in tiny_run.PROMPTS]
  ours = sampling.generate(model, prompts, 8, stop_ids=tok.stop_ids).completion_ids
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  for prompt, expected in zip(prompts, ours):
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                            eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id)
    assert generated[0, len(prompt):].tolist() == expected


def test_sharded_export_in_the_checkpoints_own_dtype(run, tmp_path):
  _, config = run
  out = tmp_path / "sharded"
  result = export_lib.export(config, str(out), step=1, max_shard_bytes=20_000)
  assert result.step == 1 and result.dtype == "float32" and len(result.files) > 1
  assert _safetensors_dtypes(out) == {"F32"}
  with open(out / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == list(result.files)
  assert index["metadata"]["total_size"] == result.num_bytes
  for name in result.files:
    assert os.path.getsize(out / name) <= 20_000 + 4096  # Tensors, plus the JSON header.
  student, _ = student_lib.restore_student(config, step=1, dtype="float32")
  exported = _params(models.from_pretrained(str(out)))
  for path, w in _params(student).items():
    np.testing.assert_array_equal(exported[path], w)
  _assert_transformers_decodes_as(str(out), student)  # The run's student itself.


def test_export_refuses_to_overwrite_and_names_missing_steps(run, tmp_path):
  _, config = run
  out = tmp_path / "out"
  export_lib.export(config, str(out))
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    export_lib.export(config, str(out))
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7 .*steps there: \[1, 2\]"):
    export_lib.export(config, str(tmp_path / "other"), step=7)
  missing = tiny_run.config({**config.to_dict(), "workdir": str(tmp_path / "nowhere")})
  with pytest.raises(FileNotFoundError, match="no checkpoints under"):
    export_lib.export(missing, str(tmp_path / "other"))


def test_damaged_newest_checkpoint_falls_back_with_a_warning(run, tmp_path, caplog):
  root, config = run
  workdir = tiny_run.copy_run(root, str(tmp_path / "run"))
  damaged = tiny_run.config(config.to_dict(), workdir=workdir)
  data = os.path.join(workdir, "checkpoints", "2", "state")
  for dirpath, _, files in os.walk(data):
    for name in files:
      if dirpath != data:  # Array data (ocdbt.process_0/d/...), not the tree's metadata.
        os.truncate(os.path.join(dirpath, name), 0)
  result = export_lib.export(damaged, str(tmp_path / "out"))
  assert result.step == 1
  assert "parameters of step 2" in caplog.text and "trying step 1" in caplog.text
  with pytest.raises(student_lib.UnreadableCheckpointError, match="step 2"):
    export_lib.export(damaged, str(tmp_path / "out2"), step=2)


def test_command_line(run, tmp_path):
  root, config = run
  cmd = [sys.executable, "-m", "tropd_jax.export", f"--config={ROOT}/tests/tiny_config.py",
         *[f"--config.{k}={v}" for k, v in (("workdir", config.workdir),
                                             ("student.path", config.student.path),
                                             ("teacher.path", config.teacher.path),
                                             ("data.train_path", config.data.train_path))],
         f"--out={tmp_path / 'a'}", "--dtype=bfloat16"]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  assert f"wrote the student at step 2 of {config.workdir}" in done.stdout
  assert "bfloat16, 1 file(s)" in done.stdout
  # Without --config: the run's run_config.json.
  done = subprocess.run([sys.executable, "-m", "tropd_jax.export", f"--workdir={config.workdir}",
                         f"--out={tmp_path / 'b'}", "--max_shard_size=10KB"],
                        capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  assert "float32, " in done.stdout and _safetensors_dtypes(tmp_path / "b") == {"F32"}
  # A mistake is one line naming it.
  done = subprocess.run([sys.executable, "-m", "tropd_jax.export", f"--workdir={config.workdir}",
                         f"--out={tmp_path / 'a'}"], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 2  # A user error (tropd_jax.cli).
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'a'} already holds a checkpoint; export to a new --out directory.")
  shutil.rmtree(tmp_path / "a")


@pytest.mark.parametrize("text, expected", [("1GB", 10**9), ("500MB", 5 * 10**8),
                                            ("1GiB", 2**30), ("2.5kb", 2500), ("123", 123)])
def test_parse_size(text, expected):
  assert export_lib.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
  with pytest.raises(ValueError, match="'lots' is not a number of bytes"):
    export_lib.parse_size("lots")


def test_bfloat16_export_of_the_demo_student_decodes_as_its_float32_weights(tmp_path):
  """On a trained model (the shipped demo student), bfloat16 rounding keeps every greedy token."""
  import dataclasses

  from flax import nnx

  from tropd_jax import checkpoint as ckpt_lib
  from tropd_jax import config as config_lib
  from tropd_jax import evaluate, run_guard
  from tropd_jax import train_step as ts
  from tropd_jax.demo import ASSETS

  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  config.workdir = str(tmp_path / "run")
  run_guard.record_run_config(config)
  student = models.from_pretrained(config.student.path, dtype="float32")
  params = nnx.state(student, nnx.Param)
  tx = config_lib.OptimizerSettings(lr=1e-4, schedule="constant", warmup_steps=0, steps=2,
                                    weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0).make()
  checkpointer = ckpt_lib.Checkpointer(f"{config.workdir}/checkpoints", async_save=False)
  checkpointer.save(3, dataclasses.asdict(ts.TrainState(params, tx.init(params), np.int32(3))),
                    {"step": 3}, force=True)
  checkpointer.close()

  out = tmp_path / "demo_bf16"
  assert export_lib.export(config_lib.load_run_config(config.workdir), str(out),
                           dtype="bfloat16").step == 3
  assert _safetensors_dtypes(out) == {"BF16"}
  tok = models.load_tokenizer(str(out))
  problems = evaluate.load_problems(os.path.join(ASSETS, "heldout.jsonl"), limit=16)
  prompts = [tok.encode_prompt(p["problem"]) for p in problems]
  ours = sampling.generate(student, prompts, 48, stop_ids=tok.stop_ids).completion_ids
  # The bfloat16 weights, computed in float32 (bfloat16 activations drift over 48 tokens).
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  for prompt, expected in zip(prompts, ours):
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                            eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id)
    assert generated[0, len(prompt):].tolist() == expected


def test_a_hub_tokenizer_fetches_only_tokenizer_files(tmp_path, monkeypatch):
  """load_tokenizer on a hub id asks for the tokenizer's files, never the weights."""
  import huggingface_hub

  from hf_fixtures import make_tokenizer

  make_tokenizer(tmp_path)
  asked = []

  def snapshot_download(repo_id, allow_patterns):  # No network here: the files are local.
    asked.append((repo_id, list(allow_patterns)))
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  assert models.load_tokenizer("someone/some-model").vocab_size > 0
  ((repo_id, patterns),) = asked
  assert repo_id == "someone/some-model" and "tokenizer.json" in patterns
  assert not any(p.endswith(".safetensors") or p == "*.json" for p in patterns)
