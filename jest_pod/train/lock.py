"""One trainer per workdir: WORKDIR/.lock, taken by process 0 for the run's lifetime.

Two trainers on one workdir would interleave checkpoints, metrics and the data order
without any error. The lock file holds {host, pid, started}; it is created atomically
(hard link of a complete temporary file, which fails if the lock exists), so a reader
never sees a half-written lock. A lock left by a dead process on this host is taken over;
one from another host cannot be checked and is refused (delete it by hand if that run is
gone). gs:// and other remote workdirs have no atomic create: no lock there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
from etils import epath

from jest_pod.parallel import distributed

log = logging.getLogger("jest_pod")
LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live trainer holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """acquire() / release() on every process; only process 0 touches the file."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.remote = "://" in str(workdir)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    self.held = False

  def acquire(self) -> None:
    error = None
    if jax.process_index() == 0:
      try:
        self._take()
      except WorkdirBusy as e:
        error = e
    # Every process must stop if process 0 could not lock (else the others hang later).
    if distributed.process_any(error is not None):
      raise error or WorkdirBusy(f"process 0 could not lock {self.path}: see its log")

  def _take(self) -> None:
    if self.remote:
      log.debug("workdir %s is remote: no lock (no atomic create there)", self.path.parent)
      return
    tmp = f"{self.path}.{self.me['host']}.{self.me['pid']}"
    with open(tmp, "w") as f:
      json.dump(self.me, f)
    try:
      try:
        os.link(tmp, self.path)
      except FileExistsError:
        holder = self._holder()
        if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1))):
          log.warning("taking over the stale lock %s of a process that is gone (%s)",
                      self.path, holder)
          # Two starters taking over at once: both may unlink, but only one link wins.
          self.path.unlink(missing_ok=True)
          try:
            os.link(tmp, self.path)
          except FileExistsError:
            raise self._busy(self._holder()) from None
        else:
          raise self._busy(holder) from None
      self.held = True
    finally:
      os.unlink(tmp)

  def _holder(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}

  def _busy(self, holder) -> WorkdirBusy:
    return WorkdirBusy(
        f"workdir {self.path.parent} is in use by another trainer: host "
        f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('started', '?')} ({self.path}). Use another --workdir, or stop that "
        f"run; if it is gone (e.g. on another host), delete {self.path}.")

  def release(self) -> None:
    """Delete the lock if it is still ours (never another trainer's)."""
    if self.held and self._holder() == self.me:
      self.path.unlink(missing_ok=True)
    self.held = False
