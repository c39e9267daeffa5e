"""tropd_jax.aot: a tiny run compiles for a TPU topology (no TPU needed, only libtpu)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

import tiny_config as tiny_config_file
from tropd_jax import models

if importlib.util.find_spec("libtpu") is None:
  pytest.skip("libtpu is not installed (pip install -r requirements-tpu.txt): no TPU compiler.",
              allow_module_level=True)

from tropd_jax import aot  # noqa: E402

TOPOLOGY = "v5e:2x2"  # 4 single-core chips
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """config.json only: aot reads the architecture, never the weights."""
  root = tmp_path_factory.mktemp("aot_ckpts")
  for name, layers in (("student", 1), ("teacher", 2)):
    cfg = models.ModelConfig.preset("qwen3_1p7b").replace(
        vocab_size=256, d_model=128, d_ff=256, num_layers=layers, num_heads=4, num_kv_heads=2,
        eos_token_id=(2,))
    os.makedirs(root / name)
    with open(root / name / "config.json", "w") as f:
      json.dump(cfg.to_hf_config(), f)
  return root


def overrides(root) -> dict[str, object]:
  """A tiny run in bfloat16 with remat, prompts of one 128-token bucket (a splash tile)."""
  return {
      "workdir": "unused", "data.train_path": "unused", "student.path": str(root / "student"),
      "teacher.path": str(root / "teacher"), "student.compute_dtype": "bfloat16",
      "teacher.dtype": "bfloat16", "student.remat": True, "data.max_prompt_tokens": 128,
      "rollout.prompt_buckets": (128,), "rollout.max_new_tokens": 8,
      "guidance.max_teacher_tokens": 8, "train.score_chunk": 128,
  }


def tiny_config(root):
  c = tiny_config_file.get_config()
  c.update_from_flattened_dict(overrides(root))
  return c


@pytest.mark.slow
def test_every_phase_compiles_for_tpu_fits_and_is_timed(checkpoints, tmp_path):
  # conftest asks for "highest" matmul precision (float32 CPU references), which Mosaic refuses
  # for the splash kernel's bfloat16 matmuls; runs use the default, as the aot command does.
  with jax.default_matmul_precision("default"):
    report = aot.run(tiny_config(checkpoints), TOPOLOGY, response_tokens=6,
                     log=lambda _: None)
  names = [p.name for p in report.phases]
  assert names == ["sample/prefill", "sample/decode", "guided/prefill", "teacher/prefill",
                   "teacher/decode", "to_sampler", "score", "train/accumulate", "train/apply"]
  assert report.num_chips == 4 and report.device_kind.startswith("TPU v5")
  assert report.fits and report.hbm == 16 * aot.GiB
  by_name = {p.name: p for p in report.phases}
  for name in ("score", "train/accumulate"):  # attention_impl=auto: the splash kernel on TPU
    assert by_name[name].kernels > 0, name
    assert by_name[name].cost.flops > 0 and by_name[name].seconds > 0
  assert by_name["train/apply"].bytes["optimizer"] > 0
  assert by_name["sample/decode"].bytes["kv_cache"] > 0
  # A step: prefill calls for 4 on-policy rows, a decode step per 6/4... every slot busy.
  w = report.workload
  assert w.response_tokens == 6 and w.rows == 6 and w.guided_rows == 2
  assert by_name["sample/decode"].calls == pytest.approx(w.decode_tokens / 4)
  assert by_name["teacher/decode"].calls == 0  # responses are made ahead of training
  assert report.step_seconds == pytest.approx(sum(p.calls * p.seconds for p in report.phases))
  text = aot.format_report(report)
  assert "FITS" in text and "estimated step time:" in text and "response_tokens" in text
  paths = aot.dump_hlo(report, str(tmp_path))
  assert sorted(os.path.relpath(p, tmp_path) for p in paths) == sorted(
      f"{n}.hlo" for n in names)
  decode = (tmp_path / "sample" / "decode.hlo").read_text()
  assert "while" in decode


def test_exit_status_when_it_does_not_fit(checkpoints):
  flags = [f"--config.{k}={v}" for k, v in overrides(checkpoints).items()]
  proc = subprocess.run(
      [sys.executable, "-m", "tropd_jax.aot", "--config=tests/tiny_config.py", *flags,
       f"--topology={TOPOLOGY}", "--only=score", "--hbm_gib=0.001"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout
  assert proc.stdout.count("\nscore ") == 2  # the memory table and the cost table
  assert "estimated step time:" in proc.stdout
