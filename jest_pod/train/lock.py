"""One trainer per workdir: WORKDIR/.lock, taken by process 0 for the run's lifetime.

Two trainers on one workdir would interleave checkpoints, metrics and the data order
without any error. The file lock itself (atomic create, stale-lock take-over, remote
folders unlocked) is `jest_pod.lockfile`, shared with the data set writers; this adds
the multi-host part: process 0 locks, and every process stops if it could not.
"""

from __future__ import annotations

import jax

from jest_pod import lockfile
from jest_pod.parallel import distributed

LOCK_NAME = lockfile.LOCK_NAME


class WorkdirBusy(lockfile.FolderBusy):
  """Another live trainer holds the workdir."""


class WorkdirLock:
  """acquire() / release() on every process; only process 0 touches the file."""

  def __init__(self, workdir):
    self._lock = lockfile.FolderLock(
        workdir, busy=WorkdirBusy, kind="workdir", what="trainer",
        fix="Use another --workdir, or stop that run")
    self.path = self._lock.path

  @property
  def held(self) -> bool:
    return self._lock.held

  def acquire(self) -> None:
    error = None
    if jax.process_index() == 0:
      try:
        self._lock.acquire()
      except (WorkdirBusy, OSError) as e:  # OSError: an unwritable workdir
        error = e
    # Every process must stop if process 0 could not lock (else the others hang later).
    if distributed.process_any(error is not None):
      raise error or WorkdirBusy(f"process 0 could not lock {self.path}: see its log")

  def release(self) -> None:
    """Delete the lock if it is still ours (never another trainer's)."""
    self._lock.release()
