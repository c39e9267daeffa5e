"""Stopping a run on SIGINT/SIGTERM at a step boundary, at the same step on every process.

The first SIGINT (Ctrl-C) or SIGTERM (preemption, ``kill``) asks the run to stop: the current
step finishes, the last completed step is saved and the run ends with ``RunInterrupted``
(exit status 130 for SIGINT, 143 for SIGTERM). A second signal ends the process at once with the
same status, even inside a long XLA compilation or computation: a thread watches the signals as
they arrive (``signal.set_wakeup_fd``) instead of waiting for the main thread to run a Python
handler. Orbax writes each checkpoint to a temporary directory, so that never leaves a
half-written checkpoint behind.

Hosts of a multi-host run may receive the signal on opposite sides of a step boundary, or only
some of them at all; ``StopSignals.agreed`` shares the request over every process once per step,
so all of them save the same step and stop together instead of some waiting in a collective
for the others.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import numpy as np

from tropd_jax.cli import Stopped

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Stopped):
  """The run stopped on a signal after saving ``step``; exit status ``128 + signum``."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step, self.workdir = signum, step, workdir
    self.exit_code = 128 + signum
    super().__init__(
        f"{signal.Signals(signum).name} received: saved step {step} in {workdir}/checkpoints; "
        "run the same command again to resume.")


class StopSignals:
  """Catches SIGINT and SIGTERM between ``install`` and ``restore`` (or in a ``with`` block).

  Use ``agreed()`` once per step, on every process at the same point of the step: it returns
  the signal number when any process has been asked to stop, else None. Outside the main
  thread Python cannot catch signals, and ``install`` leaves them alone.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}
    self._wakeup = None

  def install(self) -> StopSignals:
    """Starts catching the signals."""
    if threading.current_thread() is not threading.main_thread():
      return self
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for sig in SIGNALS:
      self._previous[sig] = signal.signal(sig, lambda signum, frame: None)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=self._watch, args=(read_fd,), name="tropd-stop-signals",
                               daemon=True)
    watcher.start()
    self._wakeup = (read_fd, write_fd, previous_fd, watcher)
    return self

  def restore(self) -> None:
    """Gives the signals back their handlers from before ``install``."""
    if self._wakeup is None:
      return
    read_fd, write_fd, previous_fd, watcher = self._wakeup
    signal.set_wakeup_fd(previous_fd)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    os.close(write_fd)  # The watcher reads the end of the pipe and returns.
    watcher.join(timeout=5)
    os.close(read_fd)
    self._previous, self._wakeup = {}, None

  def __enter__(self) -> StopSignals:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()

  def _watch(self, read_fd: int) -> None:
    """Reads each caught signal's number as it arrives (written by Python's C-level handler)."""
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum not in SIGNALS:
          continue
        name = signal.Signals(signum).name
        if self.signum is None:
          self.signum = signum
          log.warning("received %s: finishing the current step, then saving and stopping "
                      "(a second signal stops at once).", name)
        else:
          print(f"stopped: a second {name}: exiting at once, without saving the current step.",
                file=sys.stderr, flush=True)
          os._exit(128 + signum)

  def agreed(self) -> int | None:
    """The stop request shared by every process: a signal number, or None to go on."""
    import jax

    local = self.signum or 0
    if jax.process_count() == 1:
      return local or None
    from jax.experimental import multihost_utils

    everyone = np.asarray(multihost_utils.process_allgather(np.asarray([local], np.int32)))
    requested = [int(s) for s in everyone.reshape(-1) if s]
    if requested and not local:
      log.warning("another process received %s: saving and stopping with it.",
                  signal.Signals(requested[0]).name)
    return requested[0] if requested else None
