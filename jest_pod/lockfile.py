"""An exclusive lock on a local folder: FOLDER/.lock holding {host, pid, started, command}.

One trainer per workdir (train/lock.py) and one writer per data set folder (`jest-pod data
ingest|build`): two writers in one folder interleave their files without any error (a
build raced by another exited 0 with a damaged shard). The lock file is created
atomically (hard link of a complete temporary file, which fails if the lock exists), so
a reader never sees a half-written lock. A lock left by a dead process on this host is
taken over; one from another host cannot be checked and is refused (delete it by hand if
that process is gone). gs:// and other remote folders have no atomic create: no lock there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

log = logging.getLogger("jest_pod")
LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
  """Another live process holds the folder's lock."""


def is_lock_file(name: str) -> bool:
  """The lock itself or a starter's temporary copy (`.lock.HOST.PID`): not data."""
  return name == LOCK_NAME or name.startswith(LOCK_NAME + ".")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class FolderLock:
  """acquire() / release() of FOLDER/.lock by this process (also a context manager).

  Args:
    folder: the folder to lock (it must exist).
    busy: the error class raised when another live process holds it.
    kind: what the folder is, for the message ("workdir", "output folder").
    what: what the holder is ("trainer", "data set writer").
    fix: what to do instead, e.g. "Use another --workdir, or stop that run".
  """

  def __init__(self, folder, *, busy=FolderBusy, kind: str = "folder",
               what: str = "process", fix: str = "Wait for it to finish, or stop it"):
    folder = str(folder)
    self.path = os.path.join(folder, LOCK_NAME)
    self.remote = "://" in folder
    self.busy, self.kind, self.what, self.fix = busy, kind, what, fix
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join(os.path.basename(a) if i == 0 else a
                                   for i, a in enumerate(sys.argv))[:200]}
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    if self.remote:
      log.debug("%s is remote: no lock (no atomic create there)", self.path)
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
          try:
            os.unlink(self.path)
          except FileNotFoundError:
            pass
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
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def _busy(self, holder) -> FolderBusy:
    folder = os.path.dirname(self.path)
    return self.busy(
        f"{self.kind} {folder} is in use by another {self.what}: host {holder.get('host', '?')}, pid "
        f"{holder.get('pid', '?')}, started {holder.get('started', '?')} ({self.path}). "
        f"{self.fix}; if it is gone (e.g. on another host), delete {self.path}.")

  def release(self) -> None:
    """Delete the lock if it is still ours (never another process's)."""
    if self.held and self._holder() == self.me:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
    self.held = False
