"""What the loop does beside the step: console logging, preemption and Ctrl-C, the NaN
guard, the workdir's storage checks."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import time

import jax
import numpy as np
from absl import logging as absl_logging
from etils import epath

from jest_pod import errors
from jest_pod.data import sources
from jest_pod.parallel import distributed

log = logging.getLogger("jest_pod")


def setup_logging():
  """Our progress at INFO on the console; Orbax/absl chatter only at WARNING and above."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  errors.quiet_save_thread_noise()  # a failed async save is reported once, by train()
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


class TrainTimer:
  """Wall seconds spent training, evaluations left out, summed over every resume (the
  checkpoint carries them: feed.SkipCounter): the experiments' wall-clock to reach a
  score. Compilation, the input's waits and checkpoint saves count; the set-up before
  the loop (reference load, cache open) does not."""

  def __init__(self, seconds: float = 0.0):
    self._base, self._start, self._excluded = float(seconds), time.perf_counter(), 0.0

  def exclude(self, seconds: float) -> None:
    """Leave out `seconds` already spent (an evaluation)."""
    self._excluded += seconds

  @property
  def seconds(self) -> float:
    return self._base + time.perf_counter() - self._start - self._excluded


def host_load() -> float:
  """The 1-minute load average (NaN where unknown): wall-clock figures are read beside it."""
  try:
    return os.getloadavg()[0]
  except (OSError, AttributeError):
    return float("nan")


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def last_good(step: int | None, checkpoints, capital: bool = False) -> str:
  """'the last good checkpoint is step N in DIR', or that none was saved (never 'step
  None')."""
  if step is None:
    text = f"no checkpoint was saved yet in {checkpoints} (a rerun starts from step 0)"
  else:
    text = f"the last good checkpoint is step {step} in {checkpoints}"
  return text[0].upper() + text[1:] if capital else text


class Preemption:
  """SIGTERM (a TPU VM's maintenance or spot reclaim notice) or Ctrl-C → stop at an
  agreed step with a checkpoint.

  With several processes the hosts agree with one tiny all-gather every `every` steps
  (not every step: it is a host sync); every host then stops at the same step. A second
  Ctrl-C stops at once (KeyboardInterrupt): the last complete checkpoint is kept.
  """

  def __init__(self, every: int = 1):
    self.every = max(1, int(every))
    self.requested = False
    self.interrupted = False  # by Ctrl-C (SIGINT), not SIGTERM
    self._previous = {}

  def install(self):
    self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.interrupted:  # the second Ctrl-C: stop now
        raise KeyboardInterrupt
      self.interrupted = True
      log.warning("Ctrl-C: saving a checkpoint at the next step, then exiting (press "
                  "Ctrl-C again to stop at once; the last complete checkpoint is kept)")
    else:
      log.warning("received signal %d: saving a checkpoint at the next agreed step, then "
                  "exiting", signum)
    self.requested = True

  def agreed(self, step: int) -> bool:
    """True on every host at the first agreement step after any host was signalled."""
    if jax.process_count() == 1:
      return self.requested
    return step % self.every == 0 and distributed.process_any(self.requested)


def first_nonfinite(pending) -> tuple[int, float, float, dict] | None:
  """(step, loss, param_norm, {selection metric: value}) of the first non-finite step
  among [(step, metrics[, selection metrics])] still on the device, or None. The dict
  holds the non-finite selection scores (JEST's `select/*`), {} when the loss or the
  parameter norm is what is non-finite. One device→host transfer for all of them."""
  if not pending:
    return None
  values = jax.device_get([(m["train/loss"], m["train/param_norm"],
                            dict(rest[0]) if rest else {}) for _, m, *rest in pending])
  for (step, *_), (loss, norm, sel) in zip(pending, values):
    if not (np.isfinite(loss) and np.isfinite(norm)):
      return step, float(loss), float(norm), {}
    bad = {k: float(v) for k, v in sel.items() if not np.all(np.isfinite(v))}
    if bad:
      return step, float(loss), float(norm), bad
  return None


def prepare_workdir(workdir) -> epath.Path:
  """Create the workdir and prove it writable before anything is read or written there:
  a file in its place, a read-only disk or missing permissions fail here, in one line,
  rather than as a traceback from the lock, the logs or an Orbax save thread."""
  path = epath.Path(workdir)
  if "://" in str(workdir):  # gs://: no cheap probe; Orbax reports what fails
    path.mkdir(parents=True, exist_ok=True)
    return path
  if path.exists() and not path.is_dir():
    raise errors.StorageError(f"--workdir {workdir} is a file, not a folder: choose another "
                              "--workdir (or move that file away)")
  probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise errors.StorageError(f"--workdir {workdir} is not writable ({e.strerror}): "
                              f"{errors.fix_for(e, str(workdir))}") from e
  return path


def last_checkpoint_line(workdir, fix: str | None = None) -> str:
  """What a stopped run leaves to resume from, for the last line of its error. `fix`:
  what to do before the rerun (e.g. errors.fix_for's "free space on that disk"); None
  when there is nothing to fix (Ctrl-C)."""
  root = epath.Path(os.path.abspath(workdir) if "://" not in str(workdir) else workdir)
  root = root / "checkpoints"
  try:
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  except OSError:
    steps = []
  then = f"{fix}, then rerun" if fix else "rerun"  # never a bare "fix that": say what
  if not steps:
    return (f"No checkpoint was saved yet in {root}; {then} the same command (it starts "
            "again from step 0).")
  return (f"The last complete checkpoint is step {steps[-1]} in {root} (a save cut short "
          f"is ignored); {then} the same command to resume from it.")


def bad_selection_message(config, bad, good, checkpoints, reference=None) -> str:
  """The NaN guard's message when the loss is finite but JEST's selection scores are not:
  θ*'s embeddings are damaged (a reference checkpoint or cache), and selection on them
  is noise. `bad` is first_nonfinite's tuple; `reference` the run's Reference, if any."""
  step, loss, _, scores = bad
  s = config.selection
  shown = ", ".join(f"{k} = {v}" for k, v in sorted(scores.items()))
  where = reference.describe() if hasattr(reference, "describe") else (s.reference or "θ*")
  if getattr(reference, "cached", False):
    output = s.reference_cache if s.reference_cache not in ("", "off") else ""
    fix = (f"rebuild the cache (`jest-pod data cache-reference --data {config.input.data} "
           f"--reference {s.reference or 'REF'}{' --output ' + output if output else ''}`), "
           "or set config.selection.reference_cache=off to run the reference checkpoint "
           "instead")
  else:
    fix = (f"restore the reference checkpoint config.selection.reference={s.reference!r} "
           "from a copy or retrain it")
  return (f"the selection scores are not finite at step {step} ({shown}) while the loss "
          f"is {loss:.4g}: the reference's embeddings from {where} are damaged, and JEST "
          f"would select on noise. Stopping without saving; {last_good(good, checkpoints)}. "
          f"To fix, {fix}; then rerun the same command to resume.")


def warn_if_smaller_than_a_batch(config, n: int) -> int | None:
  """Warn once, loudly, when the training data holds fewer examples than one super-batch
  (N; B for uniform): every batch then repeats examples, silently. Returns the count
  (None when a source cannot tell it, e.g. `virtual`)."""
  total, pool = 0, int(config.input.get("pool_size", 0) or 0)
  for spec, _ in sources.components(config.input):
    count = sources.manifest_of(spec).get("num_examples")
    if count is None:
      return None
    total += min(int(count), pool) if pool else int(count)  # the sub-pool, per component
  what = "batch (B)" if config.selection.method == "uniform" else "super-batch (N)"
  if total < n:
    log.warning("!!! the training data holds only %d examples, fewer than one %s of %d: "
                "every batch repeats examples (each about %.1f times), so the run trains "
                "on copies and JEST selects among duplicates. Use a bigger data set "
                "(config.input.data) or a smaller config.batch_size%s. !!!", total, what, n,
                n / max(total, 1),
                "" if config.selection.method == "uniform" else
                " / config.selection.filter_ratio")
  return total
