"""In-process read-ahead and bad-record skipping between the decoded MapDataset and batching.

`ChunkedPrefetch` (worker_count 0): decodes ahead on a thread pool, one task per chunk
of consecutive positions, in order, with Grain's own `{"next_index": n}` state.
`SkipBad`: drops the `{"bad": ...}` markers `pipeline._Decode` emits and counts them
into each kept example's `skipped`.
"""

from __future__ import annotations

import collections
from concurrent import futures

import grain
import numpy as np


class SkipBad(grain.IterDataset):
  """Drops `{"bad": ...}` markers; each kept example's `skipped` counts the bad records
  dropped just before it, so `batch["skipped"].sum()` = bad records of that batch."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):
  # Stateless beyond the parent: one __next__ consumes the whole run of bad records.

  def __next__(self):
    skipped = 0
    while True:
      ex = next(self._parent)
      if "bad" in ex:
        skipped += 1
        continue
      ex["skipped"] = np.int32(skipped)
      return ex

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class ChunkedPrefetch(grain.IterDataset):
  """MapDataset -> iterator that reads ahead in chunks of `chunk` consecutive positions,
  one thread-pool task per chunk (worker_count 0 only).

  Grain's `to_iter_dataset(ReadOptions)` submits one future per element; on a small host
  that bookkeeping (futures, locks, per-element stats) cost about as much CPU as decoding
  a 32² PNG. Elements are a pure function of their position, so the order, and the state
  `{"next_index": n}` (the same as Grain's: old checkpoints restore), are unchanged.
  """

  def __init__(self, parent: grain.MapDataset, num_threads: int, chunk: int,
               ahead: int):
    super().__init__(parent)
    self.num_threads, self.chunk, self.ahead = num_threads, chunk, ahead

  def __iter__(self):
    return _ChunkedPrefetchIterator(self._parent, self.num_threads, self.chunk, self.ahead)


def _read_chunk(ds, start: int, stop: int) -> list:
  # Grain's batched read: one call down the chain (one ArrayRecord read of the chunk's
  # records, stats once per chunk); the same elements as [ds[i] for i in range(...)].
  return list(ds._getitems(list(range(start, stop))))  # pylint: disable=protected-access


class _ChunkedPrefetchIterator(grain.DatasetIterator):

  def __init__(self, ds, num_threads: int, chunk: int, ahead: int):
    super().__init__()
    self._ds, self._len = ds, len(ds)
    self._chunk, self._ahead = chunk, ahead
    self._executor = futures.ThreadPoolExecutor(num_threads,
                                                thread_name_prefix="jest-pod-decode")
    self._next = 0           # position of the next element returned (the state)
    self._submitted = 0      # first position not yet submitted
    self._pending = collections.deque()  # futures of consecutive chunks
    self._current, self._offset = [], 0  # the chunk being returned from

  def _fill(self):
    while len(self._pending) < self._ahead and self._submitted < self._len:
      stop = min(self._submitted + self._chunk, self._len)
      self._pending.append(
          self._executor.submit(_read_chunk, self._ds, self._submitted, stop))
      self._submitted = stop

  def __next__(self):
    self._assert_not_closed()
    if self._offset == len(self._current):
      self._fill()
      if not self._pending:
        raise StopIteration
      self._current, self._offset = self._pending.popleft().result(), 0
      self._fill()
    element = self._current[self._offset]
    self._current[self._offset] = None  # do not hold returned elements
    self._offset += 1
    self._next += 1
    return element

  def get_state(self):
    return {"next_index": self._next}

  def set_state(self, state):
    n = int(state["next_index"])
    if not 0 <= n <= self._len:
      raise IndexError(f"checkpoint next_index {n} out of range [0, {self._len}]")
    for f in self._pending:
      f.cancel()
    self._pending.clear()
    self._current, self._offset = [], 0
    self._next = self._submitted = n

  def close(self):
    if not self._closed:
      for f in self._pending:
        f.cancel()
      self._pending.clear()
      try:
        self._executor.shutdown(wait=False, cancel_futures=True)
      except Exception:  # pylint: disable=broad-except
        pass  # called from __del__ at interpreter exit, modules half torn down
    super().close()
