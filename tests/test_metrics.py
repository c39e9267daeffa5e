"""MetricsWriter (JSONL + TensorBoard), read-back, the progress bar and plots."""

import glob
import json
import math
import struct

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

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
