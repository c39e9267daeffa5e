"""MetricsWriter (JSONL, TensorBoard, W&B), the run log, read-back, the progress bar and plots."""

import glob
import json
import logging
import math
import struct
import time

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import tiny_run
from tropd_jax import metrics


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the TFRecord event files in `logdir`."""
  out = {}
  for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_write_and_read_back(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enabled=True) as writer:
    writer.write(1, {"loss": jnp.float32(0.5), "trust_frac": np.float64(0.75), "n": 3})
    writer.write(2, {"loss": float("nan"), "grad_norm": jnp.inf, "trust_frac": 0.5})
    writer.write_text("config", "lr: 5e-6")
  records = metrics.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  assert records[0]["loss"] == 0.5 and records[0]["trust_frac"] == 0.75 and records[0]["n"] == 3.0
  assert records[1]["loss"] is None and records[1]["grad_norm"] is None
  assert all(isinstance(r["time"], float) for r in records)
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=pytest.fail)  # Strict JSON: no NaN/Infinity literals.
  scalars = tensorboard_scalars(tmp_path / "tensorboard")
  assert scalars["loss"] == [(1, 0.5)]  # The non-finite value of step 2 is skipped.
  assert scalars["trust_frac"] == [(1, 0.75), (2, 0.5)]
  assert "grad_norm" not in scalars


def test_a_cut_line_is_skipped_with_a_warning(tmp_path, caplog):
  with metrics.MetricsWriter(str(tmp_path), enabled=True) as writer:
    writer.write(1, {"loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "lo')  # A run killed mid-write.
  with metrics.MetricsWriter(str(tmp_path), enabled=True) as writer:
    writer.write(2, {"loss": 0.9})
  records = metrics.read_metrics(str(tmp_path))
  assert "metrics.jsonl:2 is not valid JSON" in caplog.text
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.9)]


def test_resumed_run_moves_the_steps_it_logs_again_aside(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enabled=True) as writer:
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.9})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')  # A run killed mid-write.
  with metrics.MetricsWriter(str(tmp_path), enabled=True, purge_step=2) as writer:
    writer.write(2, {"loss": 0.8})
    writer.write(3, {"loss": 0.7})
  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.8), (3, 0.7)]
  dropped = (tmp_path / metrics.DROPPED_FILE).read_text().splitlines()
  assert json.loads(dropped[0])["loss"] == 0.9 and dropped[1] == '{"step": 3, "lo'
  assert metrics.latest_per_step(records) == records


def test_remote_workdir_through_fsspec(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.tempfile, "gettempdir", lambda: str(tmp_path))
  workdir = "memory://tropd_metrics_test/run"
  try:
    for step in (1, 2):  # Two runs: the second appends to what the first wrote.
      with metrics.MetricsWriter(workdir, enabled=True) as writer:
        writer.write(step, {"loss": 1.0 / step})
    assert [r["loss"] for r in metrics.read_metrics(workdir)] == [1.0, 0.5]
    mirror = tmp_path / "tropd_jax_tensorboard" / "memory" / "tropd_metrics_test" / "run"
    assert tensorboard_scalars(mirror)["loss"][-1] == (2, 0.5)
  finally:
    fsspec.filesystem("memory").rm("tropd_metrics_test", recursive=True)


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricsWriter(str(tmp_path / "run"), enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.write_text("note", "text")
  assert not (tmp_path / "run").exists()
  with pytest.raises(FileNotFoundError, match="no metrics file .*run/metrics.jsonl"):
    metrics.read_metrics(str(tmp_path / "run"))


def test_progress_bar(capsys):
  bar = metrics.ProgressBar(total_steps=10, initial_step=2, enabled=True)
  bar.update(3, {"loss": 0.25, "trust_frac": 0.875, "tokens_per_s/sample": 1234.4, "other": 1.0})
  bar.close()
  err = capsys.readouterr().err
  assert "3/10" in err
  assert "loss=0.25" in err and "trust=0.875" in err and "tok/s sample=1234" in err and "e+" not in err
  assert "other" not in err


def test_plot_metrics(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enabled=True) as writer:
    for step in range(1, 4):
      writer.write(step, {"loss": 1.0 / step, "trust_frac": math.nan if step == 2 else 0.5})
  out = tmp_path / "plots" / "metrics.png"
  assert metrics.plot_metrics(str(tmp_path), ["loss", "missing", "trust_frac"], str(out)) == [
      "loss", "trust_frac"]
  assert out.read_bytes().startswith(b"\x89PNG")
  with pytest.raises(ValueError, match="none of"):
    metrics.plot_metrics(str(tmp_path), ["missing"], str(out))


def test_console_shows_our_lines_and_warnings_the_log_file_everything(tmp_path, capsys):
  root, absl = logging.getLogger(), logging.getLogger("absl")
  before = list(root.handlers), root.level, absl.level
  absl.setLevel(logging.NOTSET)  # As a fresh process has it (a command may have raised it).
  try:
    metrics.configure_console_logging()
    metrics.configure_console_logging()  # Idempotent: one console handler.
    run_log = metrics.RunLog(str(tmp_path))
    logging.getLogger("absl").info("orbax: checkpoint details")
    logging.getLogger("tropd_jax.train").info("step 1 eval")
    logging.getLogger("jax._src.xla_bridge").warning("a library warning")
    run_log.close()
    logging.getLogger("tropd_jax.train").info("after the run")
  finally:
    root.handlers[:] = before[0]
    root.setLevel(before[1])
    absl.setLevel(before[2])
  err = capsys.readouterr().err
  assert err.count("step 1 eval") == 1 and "a library warning" in err
  assert "orbax: checkpoint details" not in err
  text = (tmp_path / "log.txt").read_text()
  for line in ("orbax: checkpoint details", "step 1 eval", "a library warning"):
    assert line in text
  assert "after the run" not in text


def _wandb_records(run_dir) -> list:
  """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
  from wandb.proto import wandb_internal_pb2

  (path,) = glob.glob(f"{run_dir}/run-*.wandb")
  data = open(path, "rb").read()
  pos, buf, records = 7, b"", []  # After the ":W&B" header, its magic and version.
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:
      break
    buf += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # A whole record, or the last chunk of one.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(buf)
      records.append(record)
      buf = b""
  return records


def test_wandb_offline_run_resumes(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tiny_run.config({"workdir": str(tmp_path / "myrun"), "metrics.wandb_project": "tropd",
                            "train.lr": 3e-4})
  for steps in ((1, 2), (3,)):  # A run, then its resumption.
    # W&B names a launch's directory by its start second: the resumption starts in a later one.
    start = int(time.time())
    with metrics.MetricsWriter.from_config(config, enabled=True) as writer:
      for step in steps:
        writer.write(step, {"loss": 1.0 / step, "lr": 3e-4, "bad": float("nan")})
    time.sleep(max(0.0, start + 1.05 - time.time()))
  run_id = (tmp_path / "myrun" / "wandb_run_id").read_text()
  runs = sorted(glob.glob(f"{tmp_path}/myrun/wandb/offline-run-*-{run_id}"))
  assert len(runs) == 2  # Both launches logged into the one W&B run.
  records = _wandb_records(runs[0])
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert (run.run_id, run.project, run.display_name) == (run_id, "tropd", "myrun")
  config_items = {i.key: json.loads(i.value_json) for i in run.config.update}
  assert config_items["train"]["lr"] == 3e-4
  history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
  assert [(h["_step"], h["loss"], h["lr"]) for h in history] == [(1, 1.0, 3e-4), (2, 0.5, 3e-4)]
  assert all("bad" not in h for h in history)  # Non-finite values are left out.


def tensorboard_texts(logdir) -> dict[str, str]:
  out = {}
  for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.tensor.string_val:
          out[value.tag] = value.tensor.string_val[0].decode()
  return out


def test_training_logs_learning_rate_throughput_config_and_every_set():
  root, overrides = tiny_run.tiny_run()
  workdir = overrides["workdir"]
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records] == [0, 1, 2]
  for r in records[1:]:
    assert r["lr"] == pytest.approx(1e-2)  # tests/tiny_config.py: constant 1e-2.
    assert r["tokens_per_step"] > 0 and r["samples_per_s"] > 0
  for r in (records[0], records[-1]):
    sets = [r[f"eval/{name}/avg@k"] for name in ("set_a", "set_b")]
    assert r["eval/avg@k"] == pytest.approx(sum(sets) / 2)
  text = tensorboard_texts(f"{workdir}/tensorboard")["config/text_summary"]
  assert '"system_prompt": "Box the answer."' in text
  log_text = open(f"{workdir}/log.txt").read()
  assert "CheckpointManager" in log_text and "step 2 eval" in log_text


def test_learning_rate_schedules():
  from tropd_jax.config import OptimizerSettings

  def schedule(**kw):
    fields = dict(weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=0.0, steps=10, **kw)
    return OptimizerSettings(**fields).learning_rate()

  cosine = schedule(lr=1.0, schedule="cosine", warmup_steps=2)
  assert [float(cosine(s)) for s in (0, 1, 2)] == [0.0, 0.5, 1.0] and float(cosine(10)) < 1e-6
  warm = schedule(lr=2.0, schedule="constant", warmup_steps=4)
  assert [float(warm(s)) for s in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0]
