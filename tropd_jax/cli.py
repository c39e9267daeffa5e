"""What every command does with an error: one line for a user's mistake, a traceback for a bug.

Each entry point (``python -m tropd_jax.main``, ``.export``, ``.evaluate``, ``.aot``) runs its
main function through ``run``:

  user error            ``error: <message>`` on stderr, exit status 2, no traceback
  ``Stopped``           ``stopped: <message>`` on stderr, its exit status (a run stopped by
                        SIGINT or SIGTERM after saving: 130 or 143; Ctrl-C elsewhere: 130)
  anything else         the traceback, exit status 1

``TROPD_TRACEBACK=1`` in the environment shows the traceback of user errors too.

A user error is
  - a ``UserError`` (raised where the code knows the user can fix it: a refused resume, a
    damaged run);
  - a ``ValueError`` or ``KeyError`` raised inside a function marked ``@reads_user_input``
    (config validation, loading models, tokenizers and data): there every such error is about
    what the user supplied, while the same types raised by the loop are bugs and keep their
    traceback;
  - an ``OSError`` about the user's files or machine: a missing file, no permission, a
    read-only file system, a full disk or quota (``USER_ERRNOS``), also when a library raised
    another exception from it or reported a full disk or read-only file system in its text.

This module imports nothing heavy, so importing it never slows a command or fails.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

TRACEBACK_ENV = "TROPD_TRACEBACK"
USER_ERROR_EXIT = 2

USER_ERRNOS = {
    errno.ENOENT: "",
    errno.EACCES: "check the permissions of the path",
    errno.EPERM: "check the permissions of the path",
    errno.EROFS: "the file system is read-only; choose a writable --config.workdir",
    errno.ENOSPC: "the disk is full; free space or choose another --config.workdir",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another --config.workdir",
    errno.ENOTDIR: "",
    errno.EISDIR: "",
    errno.ENAMETOOLONG: "",
}
"""errno → what to do, for ``OSError``s that are about the user's files or machine."""

_MARK = "_tropd_user_input"


class UserError(Exception):
  """A mistake the user can fix; its message names what is wrong and what to do."""


class Stopped(Exception):
  """The command stopped on request (a signal) after keeping its work; exits ``exit_code``."""

  exit_code: int = 1


def reads_user_input(fn: Callable) -> Callable:
  """Marks ``ValueError``/``KeyError`` raised by ``fn`` as user errors (type and traceback kept).

  For functions that validate or load what the user supplied (a config, a checkpoint, a data
  file): callers that catch ``ValueError`` still can, and ``run`` prints the message alone.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except (ValueError, KeyError) as e:
      setattr(e, _MARK, True)
      raise

  return wrapper


def _os_error(e: BaseException) -> OSError | None:
  """The ``OSError`` about the user's files that is ``e`` or its explicit cause, if any.

  Only ``raise ... from`` chains count: an error raised while another was being handled is
  not caused by it.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and (
        e.errno in USER_ERRNOS
        or (e.errno is None and isinstance(e, (FileNotFoundError, PermissionError,
                                               NotADirectoryError, IsADirectoryError)))):
      return e
    e = e.__cause__
  return None


def _wrapped_errno(e: BaseException) -> int | None:
  """The errno of a full disk or read-only file system that a library reported as text."""
  text = str(e)
  for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
    if os.strerror(code) in text:
      return code
  return None


def is_user_error(e: BaseException) -> bool:
  """Whether ``e`` is a mistake the user can fix (see the module doc), not a bug."""
  if isinstance(e, UserError) or getattr(e, _MARK, False):
    return True
  return _os_error(e) is not None or _wrapped_errno(e) is not None


def one_line(text: str) -> str:
  """``text`` with its lines joined (a user error is printed on one line)."""
  return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def message(e: BaseException) -> str:
  """The one-line message of a user error."""
  if not isinstance(e, UserError) and not getattr(e, _MARK, False):
    os_error = _os_error(e)
    if os_error is not None:
      where = os_error.filename or ""
      what = os_error.strerror or (os_error.args[0] if os_error.args else type(os_error).__name__)
      hint = USER_ERRNOS.get(os_error.errno, "")
      text = f"{where}: {what}" if where and str(where) not in str(what) else str(what)
      return one_line(f"{text} ({hint})" if hint else text)
    code = _wrapped_errno(e)
    if code is not None:
      return one_line(f"{os.strerror(code)} ({USER_ERRNOS[code]}): {e}")[:2000]
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
    return one_line(e.args[0])  # str(KeyError) would quote the message.
  return one_line(str(e)) or type(e).__name__


def run(main: Callable[[], Any]) -> NoReturn:
  """Runs ``main()`` and exits: 0, or as the module docstring says for an error."""
  show = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
  try:
    result = main()
  except SystemExit:
    raise
  except KeyboardInterrupt:
    if show:
      traceback.print_exc()
    print("stopped: interrupted (Ctrl-C).", file=sys.stderr)
    sys.exit(130)
  except Stopped as e:
    if show:
      traceback.print_exc()
    print(f"stopped: {message(e)}", file=sys.stderr)
    sys.exit(e.exit_code)
  except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs here.
    if not is_user_error(e):
      raise
    if show:
      traceback.print_exc()
    print(f"error: {message(e)}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
  sys.exit(result if isinstance(result, int) else 0)


def parse_absl_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with a mistake on the command line as a ``UserError``.

  ``app.run(main, flags_parser=cli.parse_absl_flags)``: a misspelt ``--config.a.b`` field or a
  value of the wrong type becomes one line naming it, instead of ml_collections' traceback.
  """
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(f"{_without_traceback(str(e))} (--helpshort lists the flags)") from e
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests KeyErrors.
      e = e.args[0]
    name, *hint = (e.args[0] if e.args else str(e)).splitlines()
    hint = f" ({one_line(' '.join(hint))})" if hint else ""
    raise UserError(
        f"a --config.* flag names a field the config does not have: {name}{hint}; every field "
        "is listed in tropd_jax/config.py") from e
  except (ValueError, TypeError) as e:
    raise UserError(f"a command-line flag has a bad value: {one_line(str(e))}") from e


def _without_traceback(text: str) -> str:
  """A message that embeds a formatted traceback, with only the traceback's last line kept."""
  head, found, tail = text.partition("Traceback (most recent call last):")
  if found:
    last = [line for line in tail.splitlines() if line.strip()][-1:]
    text = f"{head.rstrip().rstrip(':')}: {''.join(last).strip()}"
  return one_line(text)


def config_flag_value(flag) -> Any:
  """The config of an ml_collections config-file flag; a file that fails to load is a user error.

  ml_collections defers a load failure to the first read of the flag's value and then raises an
  ``OSError`` whose message spans several lines.
  """
  value = flag.value
  if value is None:  # The flag was not given (a command that also takes --workdir).
    return None
  try:
    value.keys()  # The deferred load error surfaces on the first attribute read.
    return value
  except OSError as e:
    from absl import flags
    from ml_collections import config_flags

    try:
      path = config_flags.get_config_filename(flags.FLAGS[flag.name])
    except Exception:  # noqa: BLE001 - only the message is at stake.
      path = "?"
    path = path.partition(":")[0]
    if not os.path.exists(path):
      raise UserError(f"config file {path!r} does not exist (--{flag.name}).") from e
    last = one_line(str(e)).split("; ")[-1]
    raise UserError(f"config file {path!r} could not be loaded: {last} "
                    f"({TRACEBACK_ENV}=1 shows where)") from e
