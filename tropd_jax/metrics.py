"""Per-step metrics: a JSONL file and TensorBoard events in the work directory, a progress bar, plots.

Work-directory layout written here:

  <workdir>/metrics.jsonl   one line per `MetricsWriter.write`: {"step", "time", **scalars};
                            non-finite values are null. A resumed run appends after moving the
                            lines of the steps it will log again (`purge_step`) to
                            metrics.dropped.jsonl, so each step appears once.
  <workdir>/tensorboard/    TensorBoard event files (`tensorboard --logdir <workdir>/tensorboard`).

Local directories and gs:// work directly (tensorboardX writes gs:// events with google-cloud-storage,
a dependency of gcsfs; TensorBoard reads `--logdir gs://…` itself). For another remote filesystem
(any fsspec URL) the JSONL is written through fsspec and the events go to a local mirror directory
that is logged at start-up.

Only process 0 writes by default, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import fsspec
import jax
import tqdm
from fsspec.implementations.local import LocalFileSystem
from tensorboardX import SummaryWriter, record_writer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"
TENSORBOARD_DIR = "tensorboard"

PROGRESS_KEYS: dict[str, str] = {
    "loss": "loss",
    "trust_frac": "trust",
    "tokens_per_s/sample": "tok/s sample",
    "tokens_per_s/score": "tok/s score",
    "tokens_per_s/train": "tok/s train",
}
"""Metric name → progress-bar label, for the metrics the bar shows when they are logged."""


def _is_local(path: str) -> bool:
  return "://" not in path or path.startswith("file://")


def _finite_or_none(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def _tensorboard_dir(workdir: str) -> str:
  """`<workdir>/tensorboard`, or a local mirror where tensorboardX cannot write to `workdir`."""
  if _is_local(workdir) or workdir.split("://")[0] in record_writer.REGISTERED_FACTORIES:
    return f"{workdir.removeprefix('file://')}/{TENSORBOARD_DIR}"
  mirror = os.path.join(tempfile.gettempdir(), "tropd_jax_tensorboard", workdir.replace("://", "/"))
  log.info("TensorBoard events of %s are written to the local mirror %s", workdir, mirror)
  return mirror


class _JsonlAppender:
  """Appends lines to a file that outlives the run: local append, or a whole-object rewrite remotely.

  Object stores (GCS) cannot append, so a remote file is read once and rewritten in full on each
  write; either way a line is durable once `append` returns, which is what a preemptible run needs.
  """

  def __init__(self, path: str, *, purge_step: int | None = None):
    self._fs, self._path = fsspec.core.url_to_fs(path)
    self._file = None
    if purge_step is not None and self._fs.exists(self._path):
      self._purge(purge_step)
    if isinstance(self._fs, LocalFileSystem):
      os.makedirs(os.path.dirname(self._path), exist_ok=True)
      self._file = open(self._path, "ab")
      last = self._fs.cat_file(self._path, start=-1) if self._file.tell() else b"\n"
    else:
      self._content = self._fs.cat_file(self._path) if self._fs.exists(self._path) else b""
      last = self._content[-1:] or b"\n"
    if last != b"\n":  # A run killed mid-write left a cut line: start a fresh one.
      self._write(b"\n")

  def _purge(self, purge_step: int) -> None:
    """Moves the lines of steps >= ``purge_step`` (and cut lines) to the dropped-lines file.

    The dropped lines are appended to `metrics.dropped.jsonl` before the kept ones replace the
    file, so a crash in between leaves a line twice, never nowhere.
    """
    kept, dropped = [], []
    for line in self._fs.cat_file(self._path).splitlines(keepends=True):
      if not line.strip():
        continue
      try:
        keep = int(json.loads(line)["step"]) < purge_step
      except (ValueError, KeyError, TypeError):
        keep = False  # A line cut short by a killed run.
      (kept if keep else dropped).append(line.rstrip(b"\n") + b"\n")
    if not dropped:
      return
    dropped_path = posixpath.join(posixpath.dirname(self._path), DROPPED_FILE)
    previous = self._fs.cat_file(dropped_path) if self._fs.exists(dropped_path) else b""
    self._fs.pipe_file(dropped_path, previous + b"".join(dropped))
    if isinstance(self._fs, LocalFileSystem):
      tmp = f"{self._path}.tmp"
      with open(tmp, "wb") as f:
        f.write(b"".join(kept))
      os.replace(tmp, self._path)
    else:
      self._fs.pipe_file(self._path, b"".join(kept))
    log.info("moved %d lines of steps >= %d from %s to %s (they are logged again)",
             len(dropped), purge_step, self._path, dropped_path)

  def _write(self, data: bytes) -> None:
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
    else:
      self._content += data
      self._fs.pipe_file(self._path, self._content)

  def append(self, line: str) -> None:
    self._write(line.encode() + b"\n")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class MetricsWriter:
  """Writes scalars of each step to `<workdir>/metrics.jsonl` and TensorBoard.

  Usable as a context manager. When disabled (by default on every process but 0) every method is a
  no-op and nothing is created.

  Args:
    workdir: the run's work directory (local path or fsspec URL such as gs://bucket/run).
    enabled: whether this process writes; default `jax.process_index() == 0`.
    purge_step: the first step this run logs again (a resumed run's restored step + 1, or 0
      for a fresh start): lines of steps >= it move from metrics.jsonl to metrics.dropped.jsonl
      and TensorBoard hides the earlier events from it on, so each step is logged once.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None, purge_step: int | None = None):
    self.workdir = str(workdir).rstrip("/")
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = None
    if self.enabled:
      self._jsonl = _JsonlAppender(f"{self.workdir}/{METRICS_FILE}", purge_step=purge_step)
      self._tb = SummaryWriter(logdir=_tensorboard_dir(self.workdir), purge_step=purge_step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs `scalars` (Python, NumPy or JAX scalars) at `step`; non-finite values become null/skipped."""
    if not self.enabled:
      return
    values = {name: _finite_or_none(value) for name, value in scalars.items()}
    self._jsonl.append(json.dumps({"step": int(step), "time": time.time(), **values}))
    for name, value in values.items():
      if value is not None:
        self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def write_text(self, name: str, text: str, step: int = 0) -> None:
    """Logs a text (a config dump, an evaluation table) to TensorBoard."""
    if self.enabled:
      self._tb.add_text(name, text, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` in file order (a resumed run's repeats included).

  A line cut short by a killed run is skipped with a warning.

  Raises:
    FileNotFoundError: no metrics file in `workdir`.
  """
  path = f"{str(workdir).rstrip('/')}/{METRICS_FILE}"
  try:
    with fsspec.open(path, "rt") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise FileNotFoundError(f"no metrics file {path}; has the run logged a step?") from None
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      log.warning("%s:%d is not valid JSON (a write cut short?); skipped", path, number)
  return records


def latest_per_step(records: Sequence[dict]) -> list[dict]:
  """The last record of each step, in step order (a resumed run's lines replace the first run's)."""
  return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def _short(value: float) -> str:
  return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


class ProgressBar:
  """A tqdm bar on stderr: step/total, ETA, and the loss, trust fraction and tokens/s when logged.

  Args:
    total_steps: the run's last step.
    initial_step: the step a resumed run starts from.
    enabled: whether to show the bar; default `jax.process_index() == 0`.
    keys: metric name → label of the values shown after the bar (those present in each update).
  """

  def __init__(
      self,
      total_steps: int,
      initial_step: int = 0,
      enabled: bool | None = None,
      keys: Mapping[str, str] = PROGRESS_KEYS,
  ):
    enabled = jax.process_index() == 0 if enabled is None else enabled
    self._keys = dict(keys)
    self._bar = tqdm.tqdm(
        total=total_steps, initial=initial_step, unit="step", file=sys.stderr,
        dynamic_ncols=True, disable=not enabled,
    )

  def update(self, step: int, scalars: Mapping[str, float]) -> None:
    """Moves the bar to `step` and shows the tracked values of `scalars`."""
    postfix = {label: _short(float(scalars[name])) for name, label in self._keys.items()
               if name in scalars}
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    self._bar.close()


def plot_metrics(workdir: str, keys: Sequence[str], out_png: str) -> list[str]:
  """Plots each of `keys` against the step, one subplot per key, into `out_png`.

  Keys that were never logged are skipped; null (non-finite) values leave gaps.

  Returns:
    The keys that were plotted.
  """
  from matplotlib.figure import Figure  # Without pyplot: no global backend, no window.

  records = latest_per_step(read_metrics(workdir))
  present = [key for key in keys if any(key in r for r in records)]
  if not present:
    raise ValueError(f"none of {list(keys)} was logged in {workdir}")
  fig = Figure(figsize=(7, 2.4 * len(present)))
  axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)
  for ax, key in zip(axes[:, 0], present):
    points = [(r["step"], r.get(key)) for r in records if key in r]
    ax.plot([s for s, _ in points], [math.nan if v is None else v for _, v in points], lw=1.2)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  fs, path = fsspec.core.url_to_fs(out_png)
  fs.makedirs(posixpath.dirname(path), exist_ok=True)
  with fs.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  return present
