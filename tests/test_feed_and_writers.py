"""The device prefetcher (state of the consumed batch, errors re-raised) and the
TensorBoard writer that needs no TensorFlow."""

import json
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jest_pod.parallel import sharding as shd
from jest_pod.train import feed
from jest_pod.train import writers


class _Counter:
  """A resumable iterator of host batches; raises after `fail_at` batches if set."""

  def __init__(self, fail_at=None):
    self.position, self.fail_at = 0, fail_at

  def __next__(self):
    if self.position == self.fail_at:
      raise OSError("disk went away")
    self.position += 1
    return {"image": np.full((8, 2, 2, 3), self.position, np.float32),
            "index": np.arange(8, dtype=np.int64) + 8 * self.position}

  def get_state(self):
    return {"position": self.position}


def test_prefetcher_saves_the_state_of_the_consumed_batch_not_the_read_ahead():
  sharding = shd.batch_sharding(Mesh(np.array(jax.devices()), ("data",)))
  it = _Counter()
  prefetcher = feed.DevicePrefetcher(it, lambda hb: feed.to_global(hb, sharding), depth=2)
  try:
    for expected in (1, 2, 3):
      host, device = next(prefetcher)
      assert float(device["image"][0, 0, 0, 0]) == expected
      assert device["index"].dtype == np.int32  # ids as int32 (high, low) words (parallel/ids.py)
      assert json.loads(prefetcher.state.get_state()) == {"position": expected}
    for _ in range(100):  # the thread reads ahead: 2 queued + 1 waiting to be queued
      if it.position == 6:
        break
      time.sleep(0.02)
    assert it.position == 6 and json.loads(prefetcher.state.get_state()) == {"position": 3}
  finally:
    prefetcher.close()


def test_prefetcher_reraises_the_input_error_in_the_loop():
  prefetcher = feed.DevicePrefetcher(_Counter(fail_at=1), lambda hb: hb, depth=2)
  try:
    next(prefetcher)
    with pytest.raises(OSError, match="disk went away"):
      next(prefetcher)
  finally:
    prefetcher.close()


def test_tensorboard_events_without_tensorflow(tmp_path, monkeypatch):
  monkeypatch.setattr(writers, "tensorflow_available", lambda: False)
  writer = writers.create_scalar_writer(tmp_path, primary=True)
  writer.write_scalars(3, {"train/loss": 1.5, "z/0shot/x_top1": 0.25})
  writer.close()
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 1.5)]
  assert acc.Scalars("z/0shot/x_top1")[0].value == 0.25
  assert not writers.create_scalar_writer(tmp_path, primary=False).write_scalars(1, {"a": 1})
