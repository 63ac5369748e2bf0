"""Where a run's metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, the console.

TensorBoard goes through CLU's writer when TensorFlow is installed (CLU's summary writer
imports it). On a host without TensorFlow (a GPU box with JAX and CUDA only: TensorFlow
is 1.3 GB) the events are written with the `tensorboard` package's own event-file writer,
so TensorBoard still reads the run.
"""

from __future__ import annotations

import json
import logging
import time

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

log = logging.getLogger("jest_pod")


class JsonlWriter:
  """WORKDIR/<name>: one JSON object per log event (what `jest-pod plot` reads)."""

  def __init__(self, workdir, enabled, name="metrics.jsonl"):
    self.path = epath.Path(workdir) / name
    self.enabled = enabled

  def drop_after(self, step):
    """On resume: forget events logged after the checkpoint we resume from (they will be
    logged again), so every step appears once."""
    if self.enabled and self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= step:
            kept.append(line + "\n")
        except json.JSONDecodeError:  # a line torn by a kill mid-write
          pass
      self.path.write_text("".join(kept))

  def write(self, record):
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class _EventFileWriter:
  """Scalars to TensorBoard event files with the `tensorboard` package alone."""

  def __init__(self, logdir):
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._writer = EventFileWriter(str(logdir))

  def write_scalars(self, step, scalars):
    values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._writer.add_event(self._event(wall_time=time.time(), step=int(step),
                                       summary=self._summary(value=values)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def create_scalar_writer(workdir, primary: bool):
  """An object with write_scalars(step, dict), flush() and close(): CLU's default writer
  (TensorBoard + console) with TensorFlow, else event files via `tensorboard` on the
  primary process. Console lines are the trainer's own progress log either way."""
  if tensorflow_available():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.create_default_writer(str(workdir), just_logging=not primary,
                                                asynchronous=False)
  if primary:
    log.warning("TensorFlow is not installed: TensorBoard events are written with the "
                "`tensorboard` package (scalars only); metrics.jsonl is complete")
    return _EventFileWriter(workdir)
  return _NullWriter()


class _NullWriter:
  def write_scalars(self, step, scalars):
    del step, scalars

  def flush(self):
    pass

  def close(self):
    pass
