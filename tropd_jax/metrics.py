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

  <workdir>/log.txt         every log line of the run at INFO and above, libraries' included
                            (orbax, absl, jax); the console shows tropd_jax's own lines and
                            every warning, printed above the progress bar. Processes other than
                            0 write log.process_<i>.txt; a remote work directory gets
                            logs/log.<start time>.txt, uploaded when the run ends.

With `metrics.wandb_project` set, the same scalars and the config also go to Weights & Biases
(`MetricsWriter.from_config`); a resumed run continues its W&B run (id in <workdir>/wandb_run_id).

Only process 0 writes metrics by default, so a multi-host run logs once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import sys
import tempfile
import time
import uuid
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
LOG_FILE = "log.txt"
WANDB_ID_FILE = "wandb_run_id"

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


class _ConsoleHandler(logging.StreamHandler):
  """Prints log lines through ``tqdm.write``, so they land above an active progress bar."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=self.stream)
    except Exception:  # noqa: BLE001 - logging must never raise.
      self.handleError(record)


def _console_filter(record: logging.LogRecord) -> bool:
  """tropd_jax's own lines at every level; other libraries' (orbax, absl, jax) from WARNING."""
  return record.levelno >= logging.WARNING or record.name.split(".")[0] in ("tropd_jax",
                                                                            "__main__")


def configure_console_logging() -> None:
  """Logging for a command: INFO to handlers, the console showing only ``_console_filter``'s.

  Replaces absl's stderr handler (``app.run`` installs it), so library INFO lines stay out of the
  console; ``log_to_file`` keeps them in the work directory. Calling it again changes nothing.
  """
  from absl import logging as absl_logging

  root = logging.getLogger()
  root.setLevel(logging.INFO)
  root.removeHandler(absl_logging.get_absl_handler())
  for handler in root.handlers:
    if isinstance(handler, _ConsoleHandler):
      return
  handler = _ConsoleHandler(sys.stderr)
  handler.addFilter(_console_filter)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s",
                                         "%H:%M:%S"))
  root.addHandler(handler)


class RunLog:
  """Every log record at INFO and above, libraries' included, in the work directory's log file.

  Local work directories append to ``<workdir>/log.txt`` (``log.process_<i>.txt`` on processes
  other than 0); a remote one (gs://) gets ``logs/log.<start time>.txt``, written locally and
  uploaded by ``close``. Opening a new ``RunLog`` closes the previous one of the process.

  Args:
    workdir: the run's work directory.
  """

  _current: RunLog | None = None

  def __init__(self, workdir: str):
    if RunLog._current is not None:
      RunLog._current.close()
    workdir = str(workdir).rstrip("/")
    index = jax.process_index()
    name = LOG_FILE if index == 0 else f"log.process_{index}.txt"
    self._upload_to = None
    if _is_local(workdir):
      self.path = os.path.join(workdir.removeprefix("file://"), name)
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    else:
      stamp = time.strftime("%Y%m%d_%H%M%S")
      self._upload_to = f"{workdir}/logs/{name.replace('.txt', f'.{stamp}.txt')}"
      fd, self.path = tempfile.mkstemp(prefix="tropd_jax_log_", suffix=".txt")
      os.close(fd)
    self._handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
    self._handler.setLevel(logging.INFO)
    self._handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname).1s %(name)s:%(lineno)d] %(message)s"))
    root = logging.getLogger()
    self._root_level = root.level
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    root.addHandler(self._handler)
    RunLog._current = self

  def close(self) -> None:
    if self._handler is None:
      return
    root = logging.getLogger()
    root.removeHandler(self._handler)
    root.setLevel(self._root_level)
    self._handler.close()
    self._handler = None
    if RunLog._current is self:
      RunLog._current = None
    if self._upload_to is not None:
      fs, remote = fsspec.core.url_to_fs(self._upload_to)
      fs.makedirs(posixpath.dirname(remote), exist_ok=True)
      fs.put_file(self.path, remote)
      os.remove(self.path)


def config_text(config) -> str:
  """A run's config as TensorBoard text (markdown: indented JSON renders as a code block)."""
  body = config.to_json_best_effort(indent=2, sort_keys=True)
  return "\n".join("    " + line for line in body.splitlines())


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


@dataclasses.dataclass(frozen=True)
class WandbSettings:
  """Where a run's metrics go in Weights & Biases.

  Attributes:
    project: the W&B project.
    entity: the team or user (None: the default entity of the login).
    name: the run's display name.
    config: the run's config, as a JSON-able dict.
  """

  project: str
  entity: str | None
  name: str
  config: dict


def _start_wandb(workdir: str, settings: WandbSettings):
  """A W&B run for ``workdir``: the one whose id the work directory keeps, or a new one.

  The id is kept in ``<workdir>/wandb_run_id`` so that a resumed run logs into the same W&B run;
  W&B's own files go to ``<workdir>/wandb`` (a temporary directory for remote work directories).
  """
  try:
    import wandb
  except ImportError:
    raise ImportError("config field metrics.wandb_project is set but wandb is not installed: "
                      "pip install wandb (or leave metrics.wandb_project empty).") from None
  id_path = f"{workdir}/{WANDB_ID_FILE}"
  fs, fpath = fsspec.core.url_to_fs(id_path)
  if fs.exists(fpath):
    run_id = fs.cat_file(fpath).decode().strip()
  else:
    run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits.
    fs.makedirs(posixpath.dirname(fpath), exist_ok=True)
    fs.pipe_file(fpath, run_id.encode())
  local = _is_local(workdir)
  wandb_dir = workdir.removeprefix("file://") if local else tempfile.mkdtemp(prefix="wandb_")
  return wandb.init(project=settings.project, entity=settings.entity, name=settings.name,
                    id=run_id, resume="allow", dir=wandb_dir, config=settings.config)


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

  def __init__(self, workdir: str, *, enabled: bool | None = None, purge_step: int | None = None,
               wandb: WandbSettings | None = None):
    self.workdir = str(workdir).rstrip("/")
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = self._wandb = self._run_log = None
    if self.enabled:
      self._jsonl = _JsonlAppender(f"{self.workdir}/{METRICS_FILE}", purge_step=purge_step)
      self._tb = SummaryWriter(logdir=_tensorboard_dir(self.workdir), purge_step=purge_step)
      if wandb is not None:
        self._wandb = _start_wandb(self.workdir, wandb)

  @classmethod
  def from_config(cls, config, **kwargs) -> MetricsWriter:
    """The writer of a run, with its ``RunLog`` (closed with the writer).

    Writes to the work directory, and to W&B when ``metrics.wandb_project`` is set; the config
    goes to TensorBoard (text ``config``) and to W&B.
    """
    run_log = RunLog(config.workdir)
    m = config.metrics
    wandb = None
    if m.wandb_project:
      wandb = WandbSettings(project=m.wandb_project, entity=m.wandb_entity or None,
                            name=m.wandb_run_name or posixpath.basename(
                                str(config.workdir).rstrip("/")),
                            config=json.loads(config.to_json_best_effort()))
    writer = cls(config.workdir, wandb=wandb, **kwargs)
    writer._run_log = run_log
    writer.write_text("config", config_text(config))
    return writer

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
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in values.items() if v is not None}, step=int(step))

  def write_text(self, name: str, text: str, step: int = 0) -> None:
    """Logs a text (a config dump, an evaluation table) to TensorBoard."""
    if self.enabled:
      self._tb.add_text(name, text, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()
        self._wandb = None
    if self._run_log is not None:
      self._run_log.close()
      self._run_log = None

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

  def write(self, text: str) -> None:
    """Prints ``text`` to stdout above the bar (which is redrawn below it)."""
    self._bar.write(text, file=sys.stdout)

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
