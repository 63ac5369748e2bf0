"""What the loop does beside the step: console logging, preemption, the NaN guard."""

from __future__ import annotations

import logging
import math
import signal
import sys

import jax
import numpy as np

from jest_pod.parallel import distributed

log = logging.getLogger("jest_pod")


def setup_logging():
  """Our progress at INFO on the console; Orbax/absl chatter only at WARNING and above."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s",
                                           "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def fmt_time(seconds):
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preemption:
  """SIGTERM (a TPU VM's maintenance or spot reclaim notice) → stop at an agreed step.

  With several processes the hosts agree with one tiny all-gather every `every` steps
  (not every step: it is a host sync); every host then stops at the same step.
  """

  def __init__(self, every: int = 1):
    self.every = max(1, int(every))
    self.requested = False
    self._previous = {}

  def install(self):
    self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    log.warning("received signal %d: saving a checkpoint at the next agreed step, then "
                "exiting", signum)
    self.requested = True

  def agreed(self, step: int) -> bool:
    """True on every host at the first agreement step after any host was signalled."""
    if jax.process_count() == 1:
      return self.requested
    return step % self.every == 0 and distributed.process_any(self.requested)


def first_nonfinite(pending) -> tuple[int, float, float] | None:
  """(step, loss, param_norm) of the first non-finite step among [(step, metrics)] whose
  metrics are still on the device, or None. One device→host transfer for all of them."""
  if not pending:
    return None
  values = jax.device_get([(m["train/loss"], m["train/param_norm"]) for _, m in pending])
  for (step, _), (loss, norm) in zip(pending, values):
    if not (np.isfinite(loss) and np.isfinite(norm)):
      return step, float(loss), float(norm)
  return None
