"""Host batches → device-resident global batches, prepared ahead of the step.

`DevicePrefetcher` runs the input side of a step in a background thread: the next host
batch from the Grain iterator, any host-side extras (the reference cache's rows), and
the host → device transfer. With `depth` batches queued, the devices never wait for the
host while the input keeps up, and a step costs about max(input, compute), not their sum.

Exact resume: the thread reads the iterator ahead of training, so the iterator's own
state is *ahead* of the step. Each queued batch carries the iterator state right after
it was read; the checkpoint saves the state of the last batch the step consumed.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import jax
import numpy as np

from jest_pod.data.input_config import DEVICE_KEYS
from jest_pod.parallel import ids


def to_global(host_batch, sharding, keys=DEVICE_KEYS) -> dict[str, jax.Array]:
  """This host's rows → global arrays sharded over the data axes (not a collective)."""
  out = {}
  for k in keys:
    if k in host_batch:
      v = np.asarray(host_batch[k])
      if v.dtype == np.int64:  # x64 is off: ids travel as int32 [b, 2] words (parallel/ids.py)
        v = ids.split(v)
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


class IteratorState:
  """A saved data-iterator state, saveable by `grain.checkpoint.CheckpointSave` (which
  writes `get_state()` of a non-Grain iterator as bytes of JSON)."""

  def __init__(self, state):
    self.state = state

  def with_values(self, **values) -> IteratorState:
    """This state with run counters beside it (SkipCounter restores them)."""
    return IteratorState({**self.state, **values})

  def get_state(self) -> bytes:
    return json.dumps(self.state, indent=4).encode()


class SkipCounter:
  """Host-batch iterator that counts the damaged records skipped before its batches
  (each batch's `skipped` column) and keeps the count in its state, so that
  `data/skipped_records` continues after a resume instead of restarting at 0. The
  trainer's `train_seconds` (hooks.TrainTimer) travels in the same saved state.

  State: {"iterator": <the inner iterator's state>, "skipped_records": n[,
  "train_seconds": s]}.
  """

  def __init__(self, data_iter):
    self._iter, self.skipped, self.train_seconds = data_iter, 0, 0.0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iter)
    self.skipped += int(np.sum(batch.get("skipped", 0)))
    return batch

  def get_state(self) -> dict:
    return {"iterator": self._iter.get_state(), "skipped_records": self.skipped}

  def set_state(self, state):
    if isinstance(state, (bytes, str)):  # Grain's checkpoint handler passes our JSON
      state = json.loads(state)
    if "iterator" not in state or "skipped_records" not in state:
      # A bare Grain state: only versions before the skip count was saved wrote it.
      raise ValueError("the checkpoint's data-iterator state has no skip count (written by "
                       "an older jest_pod); resume with that version or start a new --workdir")
    self._iter.set_state(state["iterator"])
    self.skipped = int(state["skipped_records"])
    self.train_seconds = float(state.get("train_seconds", 0.0))

  def start_prefetch(self):  # called by Grain's checkpoint handler after a restore
    if hasattr(self._iter, "start_prefetch"):
      self._iter.start_prefetch()


class _Stop:
  """Queued by the thread when it ends: the exception to re-raise, or None."""

  def __init__(self, error=None):
    self.error = error


class DevicePrefetcher:
  """Iterator of (host_batch, device_batch) computed `depth` batches ahead in a thread.

  Args:
    data_iter: a Grain DatasetIterator of host batches (restored before this starts).
    to_device: host batch → dict of global device arrays (also where host-side extras
      such as reference-cache rows are looked up).
    depth: batches ready ahead of the step (2 = double-buffered).
  """

  def __init__(self, data_iter, to_device, *, depth: int = 2):
    self._iter, self._to_device = data_iter, to_device
    self._queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self.state = IteratorState(data_iter.get_state())  # of the last consumed batch
    self.produce_seconds = 0.0  # thread time reading + transferring, summed
    self.wait_seconds = 0.0     # step time spent waiting for a batch, summed
    self.batches = 0
    self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
    self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        t = time.perf_counter()
        host_batch = next(self._iter)
        state = self._iter.get_state()
        device_batch = self._to_device(host_batch)
        self.produce_seconds += time.perf_counter() - t
        self._put((host_batch, device_batch, state))
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Stop(e))

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    t = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - t
    if isinstance(item, _Stop):
      self._stop.set()
      raise item.error
    host_batch, device_batch, state = item
    self.state = IteratorState(state)
    self.batches += 1
    return host_batch, device_batch

  def close(self):
    """Stops the thread; batches read ahead are dropped (the saved state is exact)."""
    self._stop.set()
    self._thread.join(timeout=30)
