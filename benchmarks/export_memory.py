"""Peak host memory of ``tropd_jax.export`` against the bytes it writes.

  JAX_PLATFORMS=cpu python benchmarks/export_memory.py --root=/tmp/export_memory --layers=16

Makes (in a child process) what a run leaves behind for a Qwen3-1.7B-shaped student cut to
``--layers`` layers, its 151936 x 2048 embedding kept: the student's config.json and tokenizer,
and a work directory with run_config.json and an orbax checkpoint of the parameters in the run's
``--master_dtype``, saved on one device by the trainer's ``Checkpointer`` as train.py saves its
state (the optimizer state is left out: export never reads it, and making it would take twice the
parameters' memory here). Then it runs

  python -m tropd_jax.export --workdir=<root>/run --out=<root>/out_<n> --dtype=bfloat16

under ``/usr/bin/time -v`` on one CPU device and prints its maximum resident set size against
the bytes of the safetensors files written, next to the same command on the demo student
(0.18M parameters: the interpreter's own baseline).

Measured (2 CPU cores, 16 layers, 1.117B parameters, bfloat16 master weights, default
--max_shard_size=1GB): 2.224 GB peak for 2.233 GB written (1.00x); the demo student's 0.531 GB.
The largest term after one file's tensors is reading the embedding: tensorstore holds the
compressed chunk, the decoded chunk and the output (about 3.5x the tensor) while it reads a
tensor saved as one chunk (a run on one device); a sharded run saves one chunk per shard.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from tropd_jax import checkpoint as ckpt_lib
from tropd_jax import config as config_lib
from tropd_jax import models, run_guard
from tropd_jax import train_step as ts
from tropd_jax.demo import ASSETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(root: str, layers: int, master_dtype: str) -> str:
  """A work directory holding a checkpoint of a ``layers``-layer Qwen3-1.7B-shaped student."""
  cfg = models.ModelConfig.preset("qwen3_1p7b", dtype=master_dtype).replace(num_layers=layers)
  student_dir, workdir = f"{root}/student", f"{root}/run"
  os.makedirs(student_dir, exist_ok=True)
  with open(f"{student_dir}/config.json", "w") as f:
    json.dump(cfg.replace(dtype="bfloat16").to_hf_config(), f)  # As a hub checkpoint says.
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(os.path.join(ASSETS, "student", name), student_dir)
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  config.workdir, config.student.path, config.student.dtype = workdir, student_dir, master_dtype
  run_guard.record_run_config(config)

  model = models.abstract_model(cfg)
  rng = np.random.default_rng(0)
  for _, var in models.hf_io.model_params(model):
    host = np.empty(var.shape, cfg.param_dtype)
    for start in range(0, var.shape[0], 4096):  # In blocks: no float32 copy of the embedding.
      host[start:start + 4096] = rng.standard_normal(host[start:start + 4096].shape, np.float32)
    var.set_value(jax.device_put(host))
    del host
  params = nnx.state(model, nnx.Param)
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", every=1, keep=1,
                                       async_save=False)
  state = ts.TrainState(params, {}, np.int32(1)).as_dict()  # As train.py saves it.
  checkpointer.save(1, state, {"step": 1}, force=True)
  checkpointer.close()
  print(f"made {workdir}: {cfg.num_params() / 1e9:.3f}B parameters in {master_dtype} "
        f"({cfg.num_params() * np.dtype(cfg.param_dtype).itemsize / 1e9:.2f} GB)", flush=True)
  return workdir


def measure(args: list[str]) -> tuple[int, str]:
  """``(max RSS in bytes, output)`` of ``python -m tropd_jax.export ARGS`` on one CPU device."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "tropd_jax.export", *args],
                        capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode:
    raise RuntimeError(proc.stdout + proc.stderr)
  kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
  return kb * 1024, proc.stdout.strip()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="scratch directory (about 2.5x the float32 "
                      "parameters of disk)")
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--master_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="the run's student.dtype (the checkpoint's parameters)")
  parser.add_argument("--max_shard_size", default=None, help="passed to export (default its own)")
  parser.add_argument("--make_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  demo_run = f"{args.root}/demo_run"
  if args.make_only:
    if not os.path.exists(f"{args.root}/run/checkpoints"):
      make_run(args.root, args.layers, args.master_dtype)
    if not os.path.exists(f"{demo_run}/checkpoints"):
      make_demo_run(demo_run)
    return
  # Made in a child process, whose memory is gone before anything is measured.
  subprocess.run([sys.executable, os.path.abspath(__file__), "--make_only", *sys.argv[1:]],
                 check=True)
  shard = [f"--max_shard_size={args.max_shard_size}"] if args.max_shard_size else []
  runs = (("demo student (baseline)", demo_run), ("bench student", f"{args.root}/run"))
  for name, workdir in runs:
    out = f"{args.root}/out_{len(os.listdir(args.root))}"
    rss, printed = measure([f"--workdir={workdir}", f"--out={out}", "--dtype=bfloat16", *shard])
    exported = sum(os.path.getsize(f"{out}/{f}") for f in os.listdir(out)
                   if f.endswith(".safetensors"))
    print(f"{name}: {printed}\n  peak RSS {rss / 1e9:.3f} GB, safetensors {exported / 1e9:.3f} GB, "
          f"ratio {rss / exported:.2f}", flush=True)


def make_demo_run(workdir: str) -> None:
  """A float32 checkpoint of the demo student, as a run of configs/demo.py saves it."""
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  config.workdir = workdir
  run_guard.record_run_config(config)
  student = models.from_pretrained(config.student.path, dtype="float32")
  params = nnx.state(student, nnx.Param)
  tx = config_lib.settings(config).optimizer.make()
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", every=1, keep=1,
                                       async_save=False)
  state = ts.TrainState(params, tx.init(params), np.int32(1)).as_dict()
  checkpointer.save(1, state, {"step": 1}, force=True)
  checkpointer.close()


if __name__ == "__main__":
  main()
