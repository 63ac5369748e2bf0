"""Failures as one line for the person at the console: what, which path, what to do.

Every `jest-pod` command ends a failure with one line on stderr naming the path or key
and the fix, without a traceback; `--debug` (any position on the command line, or
JEST_POD_DEBUG=1) shows the traceback too. Storage errors (disk full, permissions, a
read-only filesystem, a file where a folder should be) get their fix from the errno
here, once, for the trainer and the data commands alike.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings

DEBUG_ENV = "JEST_POD_DEBUG"


class StorageError(RuntimeError):
  """A folder the command writes cannot be written (full, read-only, not a folder, ...);
  the message names the path and the fix."""


def take_debug_flag(argv: list[str]) -> list[str]:
  """argv without `--debug`; its presence sets JEST_POD_DEBUG=1 (child processes inherit it)."""
  if "--debug" in argv:
    os.environ[DEBUG_ENV] = "1"
  return [a for a in argv if a != "--debug"]


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def chain(e: BaseException):
  """e, then its causes (`raise ... from None` ends the chain)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ if e.__cause__ is not None else (
        None if e.__suppress_context__ else e.__context__)


# Riegeli (RuntimeError), tensorstore (ValueError) and TensorFlow's event writer
# (ResourceExhaustedError: a flush to a full disk) carry the OS error only as text.
_WORDS = [(("No space left on device",), errno.ENOSPC),
          (("Disk quota exceeded",), errno.EDQUOT),
          (("Read-only file system",), errno.EROFS),
          (("Permission denied",), errno.EACCES),
          (("RESOURCE_EXHAUSTED", "Failed to flush"), errno.ENOSPC)]  # not XLA's out-of-memory
_PATH = re.compile(r'(?:local file|Failed writing:?|writing|opening|RESOURCE_EXHAUSTED:) '
                   r'"?(/[^"\s;:]+)')


def os_error(e: BaseException) -> OSError | None:
  """The OSError behind `e` (itself, a cause of an Orbax wrapper, or rebuilt from a
  Riegeli/tensorstore message), or None."""
  for x in chain(e):
    if isinstance(x, OSError) and x.errno is not None:
      return x
  for x in chain(e):
    text = str(x)
    for words, code in _WORDS:
      if all(w in text for w in words):
        m = _PATH.search(text)
        return OSError(code, os.strerror(code), m.group(1) if m else None)
  return None


# errno → what to do, for the paths a command writes.
_FIXES = {
    errno.ENOSPC: "free space on that disk (`df -h {where}`)",
    errno.EDQUOT: "free space or raise your quota on that disk",
    errno.EFBIG: "a file size limit was hit (`ulimit -f`): raise it or free space",
    errno.EACCES: "give this user access to {where} (or choose another folder)",
    errno.EPERM: "give this user access to {where} (or choose another folder)",
    errno.EROFS: "{where} is on a read-only filesystem: remount it read-write or choose "
                 "another folder",
    errno.ENOTDIR: "a part of {where} is a file, not a folder: move it or choose another "
                   "folder",
    errno.EEXIST: "{where} is a file, not a folder: move it or choose another folder",
    errno.EIO: "the disk reports an I/O error: check it (dmesg) or choose another folder",
}


def storage_message(e: BaseException, where: str | None = None) -> str | None:
  """'[Errno 28] No space left on device: PATH; free space on that disk (...)' for a
  storage error behind `e`, or None when `e` is not one. `where`: the folder the command
  writes (named in the fix, and when the error carries no file name)."""
  err = os_error(e)
  if err is None or err.errno not in _FIXES:
    return None
  path = err.filename or where or "the folder"
  # The fix names the folder the command writes (not one file deep inside it), except
  # when that file is the problem (a file where a folder should be).
  at = path if err.errno in (errno.EEXIST, errno.ENOTDIR) else where or path
  return f"[Errno {err.errno}] {err.strerror}: {path}; {_FIXES[err.errno].format(where=at)}"


def fix_for(e: BaseException, where: str) -> str:
  """Only the fix for a storage error at `where` (when the caller names the path itself)."""
  err = os_error(e)
  if err is None or err.errno not in _FIXES:
    return f"check that {where} is a writable folder"
  return _FIXES[err.errno].format(where=where)


class _SaveThreadNoise(logging.Filter):
  """A failed async save (disk full, ...) is logged with its traceback by every Orbax
  thread it passes through, and by asyncio for each tensorstore write left behind
  ("Future exception was never retrieved"), before the caller gets it once (at the next
  save or wait) and reports it in one line. Without --debug those records are dropped;
  everything else passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    if debug() or record.levelno < logging.ERROR or not record.exc_info:
      return True
    if record.name == "asyncio":
      return os_error(record.exc_info[1]) is None
    return "orbax" not in (record.pathname or "")


def _unraisable_hook(previous):
  def hook(unraisable):
    # tensorstore's callbacks for writes still in flight when Orbax closed its event loop
    # after the first failure: one traceback each, all saying the same.
    if (not debug() and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)
  hook.jest_pod = True
  return hook


def quiet_save_thread_noise() -> None:
  """Report a failed checkpoint save once (the caller does): drop the copies Orbax,
  asyncio and tensorstore print from their threads. Idempotent; --debug keeps them."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _SaveThreadNoise) for f in logger.filters):
      logger.addFilter(_SaveThreadNoise())
  if not getattr(sys.unraisablehook, "jest_pod", False):
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


def failure_line(e: BaseException, where: str | None = None) -> str:
  """The one line a command's failure ends with: this project's errors and ValueErrors
  carry their own fix; storage errors get theirs from the errno; anything else is named as
  unexpected, with the way to see its traceback."""
  if type(e).__module__.startswith("jest_pod") or isinstance(e, ValueError):
    return " ".join(str(e).split())
  storage = storage_message(e, where)
  if storage:
    return storage
  if isinstance(e, OSError):
    return str(e)
  return (f"{type(e).__name__}: {' '.join(str(e).split())} (unexpected: rerun with --debug "
          "for the traceback and report it)")


def run_command(name: str, fn) -> int:
  """fn() → its exit code, with every failure as one line on stderr (`--debug` re-raises)
  and Ctrl-C as exit 130: the guard around every `jest-pod` command."""
  try:
    code = int(fn() or 0)
  except KeyboardInterrupt:
    if debug():
      raise
    print(f"{name}: stopped by Ctrl-C; rerun the same command to start again", file=sys.stderr)
    code = 130
  except Exception as e:  # pylint: disable=broad-except  (one line; --debug: the traceback)
    if debug():
      raise
    print(f"{name}: error: {failure_line(e)}", file=sys.stderr)
    code = 1
  if code and not debug():
    # The one line stays the last: a save that failed mid-way leaves Orbax coroutines that
    # were never awaited, and Python would warn about them at exit, after it.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
  return code
