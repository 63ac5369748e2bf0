"""The small parts the training loop (train/main.py `_train`) is orchestrated from: the
step's batch (Selector), the step timer, the metrics reporter, the NaN guard and
`maybe_eval`.

Each owns one concern's state, so the loop keeps only the step's own variables.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from jest_pod import evaluators as evaluators_lib
from jest_pod.data import sources
from jest_pod.jest import step as jest_lib
from jest_pod.parallel import distributed
from jest_pod.parallel import ids as ids_lib
from jest_pod.parallel import sharding as shd
from jest_pod.train import feed
from jest_pod.train import flops as flops_lib
from jest_pod.train import hooks
from jest_pod.train import writers

log = logging.getLogger("jest_pod")


class Selector:
  """The step's batch: JEST's selection from the super-batch while the run selects
  (config.selection.until), else the batch as read (uniform); θ*'s embeddings of it as
  the teacher when distilling. The key of step s is fold_in(select_rng, s): exact resume."""

  def __init__(self, config, spec, model, mesh, reference, select_rng, phase2=None):
    self._spec, self._reference, self._rng = spec, reference, select_rng
    self._jest = (jest_lib.JestStep(config, model, mesh, score_patch=spec.score_patch,
                                    reference=reference) if spec.selecting else None)
    # Two-phase input: the selected records' images, decoded on the host after selection.
    self.phase2 = phase2
    self._rows = shd.batch_sharding(mesh)

  def selecting(self, step: int) -> bool:
    return self._jest is not None and step < self._spec.selection_steps

  def __call__(self, step, params, super_batch, sample: bool):
    """→ (batch, selection metrics, teacher or None, {part: seconds} when `sample`)."""
    if not self.selecting(step):
      teacher = self._reference.embeddings(super_batch) if self._spec.distill else None
      return super_batch, {}, teacher, {}
    key = jax.random.fold_in(self._rng, step)
    if sample:  # part by part, with barriers: the time split
      batch, metrics, teacher, times = self._jest.timed_call(params, super_batch, key)
    else:
      (batch, metrics, teacher), times = self._jest(params, super_batch, key), {}
    if self.phase2 is not None:
      t = time.perf_counter()
      batch = {**batch, "image": self._decode_selected(batch["index"])}
      if sample:
        times["phase2"] = time.perf_counter() - t
    return batch, metrics, teacher, times

  def _decode_selected(self, index):
    """Phase 2: the selected rows' global ids (device → host, the step's one sync), this
    host's share of them decoded, put back on the devices as the batch's images."""
    ids = ids_lib.host_ids(index)
    b = len(ids) // jax.process_count()
    share = ids[jax.process_index() * b:(jax.process_index() + 1) * b]
    images = self.phase2.read(share)
    return feed.to_global({"image": images}, self._rows)["image"]


class StepTimer:
  """The loop's clocks: the training wall-clock (hooks.TrainTimer, carried in the
  checkpoint), the rate and ETA, the input's share, and the time split of a sampled step.

  The first step (compilation) is left out of the rate, and so are sampled steps: one
  every `split_every` (and the second step of a run) runs part by part with barriers.
  """

  def __init__(self, prefetcher, *, start: int, split_every: int, train_seconds: float,
               phase2=None):
    self.clock = hooks.TrainTimer(train_seconds)
    self._prefetcher, self._start, self._every = prefetcher, start, split_every
    self._phase2 = phase2  # two-phase input's reader: its decode time is input time too
    self._phase2_at = (0.0, 0)
    self._window = None  # (t, batches, wait, produce) after the first step
    self._sampled_s, self._sampled_n = 0.0, 0
    self._t_sample = None
    self.split: dict[str, float] = {}  # {part: seconds} of the last sampled step

  def samples(self, done: int) -> bool:
    """Whether step `done` runs part by part (its parts timed)."""
    return self._every > 0 and (done == self._start + 2 or done % self._every == 0)

  def begin_sample(self, state) -> None:
    jax.block_until_ready(state)
    self._t_sample = time.perf_counter()

  def end_sample(self, state, times: dict[str, float], train_started: float) -> None:
    """After a sampled step: `times` the JEST parts' seconds, the train part from
    `train_started` (perf_counter) to now."""
    jax.block_until_ready(state)
    times["train"] = time.perf_counter() - train_started
    self.split = times
    if self._window is not None:
      self._sampled_s += time.perf_counter() - self._t_sample
      self._sampled_n += 1

  def after_step(self, state) -> None:
    """The window of the rate starts after the first step, which includes compilation."""
    if self._window is None:
      jax.block_until_ready(state)
      p = self._prefetcher
      self._window = (time.perf_counter(), p.batches, p.wait_seconds, p.produce_seconds)
      if self._phase2 is not None:
        self._phase2_at = (self._phase2.seconds, self._phase2.calls)

  def scalars(self, batch_size: int) -> dict[str, float]:
    """Rate and time fields of a log record (perf: no device sync)."""
    t0, batches0, wait0, produce0 = self._window
    p = self._prefetcher
    steps = p.batches - batches0 - self._sampled_n
    elapsed = max(time.perf_counter() - t0 - self._sampled_s, 1e-9)
    rate = steps / elapsed if steps else float("nan")
    out = {"progress/steps_per_sec": rate, "progress/examples_per_sec": rate * batch_size}
    if steps:
      out["time/step_s"] = elapsed / steps
      # The host's input per step: the input thread's (phase 1 with two-phase input) ...
      out["time/input_s"] = (p.produce_seconds - produce0) / steps
      out["time/input_wait_fraction"] = (p.wait_seconds - wait0) / elapsed
      if self._phase2 is not None and self._phase2.calls > self._phase2_at[1]:
        # ... plus decoding the selected records (phase 2, in the loop's thread)
        phase2 = ((self._phase2.seconds - self._phase2_at[0])
                  / (self._phase2.calls - self._phase2_at[1]))
        out["time/input_phase1_s"] = out["time/input_s"]
        out["time/input_phase2_s"] = phase2
        out["time/input_s"] += phase2
        out["data/phase2_replaced"] = self._phase2.replaced
    total = sum(self.split.values())
    for part, seconds in self.split.items():  # from the last sampled step
      out[f"time/{part}_s"] = seconds
      out[f"time/{part}_fraction"] = seconds / total
    return out


def source_shares(selected_source, pool_source, names) -> dict[str, float]:
  """Share of each source (origin / damage kind) among selected rows and in the pool."""
  sel = distributed.host_array(selected_source)  # every process calls this (a collective)
  pool = distributed.host_array(pool_source)
  out = {}
  for i, name in enumerate(names):
    key = name.replace(":", "/")
    out[f"select/share/{key}"] = float(np.mean(sel == i)) if sel.size else 0.0
    out[f"pool/share/{key}"] = float(np.mean(pool == i)) if pool.size else 0.0
  return out


class Reporter:
  """Every record of the run's logs, built once per event and sent to metrics.jsonl and
  the scalar writer (TensorBoard); selected ids to selected_ids.jsonl. Process 0 writes.
  `last` is the latest train record with the evaluations since."""

  def __init__(self, workdir, primary: bool, *, start: int, flops: dict, config,
               clock: hooks.TrainTimer):
    self.writer = writers.create_scalar_writer(workdir, primary)
    self.jsonl = writers.JsonlWriter(workdir, primary)
    # The global `index` of each selected row, per step (later lines win after a resume).
    self.ids = writers.JsonlWriter(workdir, primary, name="selected_ids.jsonl")
    self.jsonl.drop_after(start)
    self.ids.drop_after(start)
    self._flops, self._clock = flops, clock
    self._b, self._total = int(config.batch_size), int(config.total_steps)
    self._source_names = sources.source_names(config.input)
    # selected_ids.jsonl is a debugging aid (a host sync per step), off by default
    self._log_ids = bool(config.get("log_selected_ids", False))
    self.last: dict = {}

  def progress(self, done: int) -> dict:
    """The fields every record of step `done` carries."""
    return {"step": done, "examples": done * self._b,
            "flops": flops_lib.total_flops(self._flops, done, "charged"),
            "flops_amortised": flops_lib.total_flops(self._flops, done, "amortised"),
            "time/train_elapsed_s": self._clock.seconds, "host/load1": hooks.host_load()}

  def train(self, done: int, metrics, timer: StepTimer, prefetcher, selected=None) -> dict:
    """Step `done`'s record: the step's (and selection's) metrics read back from the
    devices, the timer's fields, the skipped records and, when the step selected
    (`selected` = (batch, super-batch)), each source's share of the batch and the pool."""
    extra = {**timer.scalars(self._b),
             # this host's count up to the consumed batch, restored with the iterator
             "data/skipped_records": distributed.process_sum(
                 prefetcher.state.state["skipped_records"])}
    if selected is not None and "source" in selected[0]:
      extra.update(source_shares(selected[0]["source"], selected[1]["source"],
                                 self._source_names))
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    common = self.progress(done)
    scalars.update({
        "progress/examples": common["examples"], "progress/flops": common["flops"],
        "progress/flops_amortised": common["flops_amortised"],
        "time/train_elapsed_s": common["time/train_elapsed_s"],
        "host/load1": common["host/load1"], **extra})
    self.writer.write_scalars(done, scalars)
    record = {**common, **scalars}
    self.jsonl.write(record)
    rate = scalars["progress/steps_per_sec"]
    eta = (self._total - done) / rate if rate == rate and rate > 0 else float("nan")
    log.info("step %d/%d | loss %.4f | %.2f steps/s | %.0f examples/s | input wait "
             "%.0f%% | ETA %s", done, self._total, scalars["train/loss"], rate, rate * self._b,
             100 * scalars.get("time/input_wait_fraction", 0.0), hooks.fmt_time(eta))
    self.last = record
    return record

  def eval(self, done: int, results: dict[str, float]) -> None:
    self.writer.write_scalars(done, results)
    self.jsonl.write({**self.progress(done), **results})
    self.last.update(results)

  def selected_ids(self, done: int, batch) -> None:
    """The selected rows' global indices, with config.log_selected_ids."""
    if self._log_ids:
      ids = ids_lib.host_ids(batch["index"])  # int32 words → int64 (parallel/ids.py)
      self.ids.write({"step": done, "ids": [int(i) for i in ids]})


class NanGuard:
  """A non-finite state is never saved: the steps' losses, parameter norms and selection
  scores stay on the device until `check` (at log and save steps), which raises
  TrainingDiverged naming the step, the last good checkpoint and the likely cause."""

  def __init__(self, config, checkpointer, checkpoints_dir, *, start: int, reference=None):
    self._config, self._ckpt, self._dir = config, checkpointer, checkpoints_dir
    self._start, self._reference = start, reference
    self._pending = []

  def add(self, done: int, metrics, selection_metrics) -> None:
    self._pending.append((done, metrics, selection_metrics))

  def check(self) -> None:
    bad = hooks.first_nonfinite(self._pending)
    self._pending = []
    if bad is None:
      return
    self._ckpt.wait()
    good = self._ckpt.latest_step()
    if bad[3]:  # finite loss, non-finite scores: θ*'s embeddings are damaged
      raise hooks.TrainingDiverged(hooks.bad_selection_message(
          self._config, bad, good, self._dir, self._reference))
    every = self._config.log_every
    hint = "Lower config.optax.lr or raise config.optax.warmup_steps, then rerun to resume."
    if self._start and bad[0] <= self._start + every:  # right after a resume
      hint = (f"This is within {every} step(s) of resuming: the restored "
              f"checkpoint {self._ckpt.step_dir(self._start)} may be damaged; move it "
              f"aside (rename it to {self._start}.bad) and rerun to resume from the "
              f"previous one. Otherwise: {hint}")
    raise hooks.TrainingDiverged(
        f"loss is {bad[1]} (parameter norm {bad[2]}) at step {bad[0]}; stopping "
        f"without saving. {hooks.last_good(good, self._dir, capital=True)}. {hint}")


def maybe_eval(evaluators, done: int, total_steps: int, params, *, preemption, reporter,
               clock: hooks.TrainTimer, preempted: bool,
               guard: NanGuard | None = None) -> bool:
  """Runs the evaluations due at step `done`; returns whether the run must stop and save
  (`preempted` already, or a notice that interrupted an evaluation). Their time is left
  out of the training wall-clock. `guard.check()` runs before the first of them: a
  non-finite state is never evaluated (it raises TrainingDiverged instead)."""
  for ev in evaluators:
    if preempted:  # a notice during an earlier evaluation: save now, skip the rest
      break
    if done % ev.every_steps and done != total_steps:
      continue
    if guard is not None:  # NaN parameters would log a score, not a divergence
      guard.check()
    t = time.perf_counter()
    try:  # a long evaluation must not outlast a preemption notice
      results = ev.run(params, should_stop=lambda: preemption.requested)
    except evaluators_lib.EvalInterrupted:
      log.warning("evaluation %s at step %d interrupted by a preemption notice; saving "
                  "the checkpoint (this evaluation is not rerun)", ev.name, done)
      preempted = True
      continue
    clock.exclude(time.perf_counter() - t)
    reporter.eval(done, results)
    log.info("eval at step %d (%.1fs): %s", done, time.perf_counter() - t,
             ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
  return preempted
