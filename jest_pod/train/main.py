"""The training loop, uniform or JEST, on any mesh (its command line: train/cli.py).

  jest-pod train --config configs/siglip.py:runlocal --workdir /tmp/run [--config.key=value ...]

Sections: setup · data · model and state · JEST step · loop. The loop only orchestrates:
the input runs ahead in a thread (train/feed.py), the JEST step turns a super-batch into
the trained batch (jest/step.py), and nothing on the hot path waits for the device — the
host reads metrics back at log steps and before every checkpoint save.
Every host runs this same program (multi-controller JAX); only process 0 writes logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import jax
import ml_collections
from etils import epath

from jest_pod import checkpoint as ckpt_lib
from jest_pod import config as config_lib
from jest_pod import errors
from jest_pod import evaluators as evaluators_lib
from jest_pod import runinfo
from jest_pod.data import pipeline
from jest_pod.data import two_phase as two_phase_lib
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.input_config import DEVICE_KEYS, MAX_PIXELS
from jest_pod.interop import formats
from jest_pod.jest import reference as reference_lib
from jest_pod.models import build_model
from jest_pod.parallel import distributed
from jest_pod.parallel import sharding as shd
from jest_pod.train import feed
from jest_pod.train import flops as flops_lib
from jest_pod.train import hooks
from jest_pod.train import lock as lock_lib
from jest_pod.train import loop
from jest_pod.train import state as state_lib
from jest_pod.train import step as step_lib

log = logging.getLogger("jest_pod")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a training run. Returns the last logged metrics."""
  formats.apply_init_from(config)  # the checkpoint's architecture and preprocessing
  config_lib.validate(config)
  config_lib.check_input(config)
  config_lib.resolve_evals(config)  # the eval sets found under discover_evals.root, now
  spec = config_lib.resolve(config)
  distributed.initialize()
  # Before any data is read: a super-batch that cannot fit in host memory (f → 1).
  _agree(lambda: config_lib.check_host_memory(
      config, process_count=jax.process_count(),
      cpu_devices=jax.devices()[0].platform == "cpu",
      worker_count=pipeline.resolve_worker_count(config.input.get("worker_count", 0))))
  workdir = _agree(lambda: hooks.prepare_workdir(workdir))
  # One trainer per workdir: two would interleave checkpoints and logs.
  lock = lock_lib.WorkdirLock(workdir)
  try:
    lock.acquire()  # process 0 only; every process raises if it could not
    return _train(config, spec, workdir)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless a storage error)
    # Disk full, permissions, ...: raised by Orbax (also from its save threads, at the next
    # save), Riegeli, tensorstore or TensorFlow's event writer, each in its own words.
    # (Errors of our own already name their path and fix.)
    ours = (lock_lib.WorkdirBusy, hooks.TrainingDiverged, ckpt_lib.CheckpointError,
            tokenizer_lib.TokenizerError, errors.StorageError)
    message = None if isinstance(e, ours) else errors.storage_message(e, str(workdir))
    if message is None:
      raise
    raise errors.StorageError(
        f"writing the run to {workdir} failed: {message}. "
        f"{hooks.last_checkpoint_line(workdir, errors.fix_for(e, str(workdir)))}") from e
  finally:
    lock.release()


def _agree(check):
  """check() on every process; if it raises on any, every process raises (the others
  would wait in the next collective for ever). Returns check()'s result."""
  error = result = None
  try:
    result = check()
  except (ValueError, errors.StorageError) as e:
    error = e
  if distributed.process_any(error is not None):
    raise error or ValueError("another process refused the run's set-up: see its log")
  return result


def _train(config: ml_collections.ConfigDict, spec: config_lib.RunSpec,
           workdir: epath.Path) -> dict:
  primary = jax.process_index() == 0
  mesh = _setup(config, spec, workdir, primary)

  # ---------------------------------------------------------------- data
  hooks.warn_if_smaller_than_a_batch(config, spec.super_batch)
  tokenizer = tokenizer_lib.resolve(config.input)
  tokenizer_lib.check_vocab(tokenizer, config.model.text["vocab_size"])
  reference = (reference_lib.open_reference(
      config, mesh, formats.Preprocessing(spec.image_size, spec.text_len, tokenizer),
      missing=config_lib.missing_reference_message(config)) if spec.needs_reference else None)
  phase1 = _two_phase(config, spec, reference, tokenizer)
  data_iter = _train_iterator(config, spec, phase1=phase1.bad if phase1 else None)

  # ---------------------------------------------------------------- model and state
  model = build_model(config.model)
  tx, schedule = state_lib.make_optimizer(config.optax, config.total_steps)
  init_rng, select_rng = jax.random.split(jax.random.key(config.seed))
  state, state_sh = state_lib.create_state(config, model, tx, mesh, init_rng)
  checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=config.ckpt_every,
                                       keep=config.keep_ckpts)
  start, state = _restore_or_init(config, workdir, checkpointer, data_iter, state, state_sh, tx)

  # ---------------------------------------------------------------- JEST step
  phase2 = (two_phase_lib.SelectedReader(config.input.data, spec.image_size,
                                         config.input.get("max_pixels", MAX_PIXELS))
            if phase1 else None)
  select = loop.Selector(config, spec, model, mesh, reference, select_rng, phase2=phase2)
  train_step = step_lib.jit_train_step(config, model, tx, schedule, mesh, state_sh)
  flops = flops_lib.run_flops(config, reference)
  if primary:
    (workdir / "flops.json").write_text(json.dumps(flops, indent=1))
  evaluators = evaluators_lib.build_evaluators(config, model, mesh) if config.evals else []

  # ---------------------------------------------------------------- loop
  preemption = hooks.Preemption(every=config.preemption_check_every)
  preemption.install()
  prefetcher = feed.DevicePrefetcher(data_iter, _to_device(mesh, reference, phase1),
                                     depth=config.device_prefetch)
  timer = loop.StepTimer(prefetcher, start=start, split_every=config.time_split_every,
                         train_seconds=data_iter.train_seconds if start else 0.0,
                         phase2=phase2)
  reporter = loop.Reporter(workdir, primary, start=start, flops=flops, config=config,
                           clock=timer.clock)
  guard = loop.NanGuard(config, checkpointer, ckpt_lib.checkpoint_dir(workdir), start=start,
                        reference=reference)
  _log_start(config, spec, flops, start, workdir)

  with _closing(prefetcher, preemption, checkpointer, reporter.writer, phase2):
    for step in range(start, config.total_steps):
      done = step + 1
      host_batch, super_batch = next(prefetcher)
      sample = timer.samples(done)
      if sample:
        timer.begin_sample(state)
      batch, sel_metrics, teacher, times = select(step, state["params"], super_batch, sample)
      if select.selecting(step):
        reporter.selected_ids(done, batch)
      t = time.perf_counter()
      state, metrics = train_step(state, batch, teacher)
      if sample:
        timer.end_sample(state, times, t)
      guard.add(done, metrics, sel_metrics)
      timer.after_step(state)

      is_log = done % config.log_every == 0 or done == config.total_steps
      preempted = preemption.agreed(done)
      saving = preempted or checkpointer.due(done) or done == config.total_steps
      if is_log or saving:
        guard.check()  # raises TrainingDiverged: a non-finite state is never saved
      if is_log:
        reporter.train(done, {**metrics, **sel_metrics}, timer, prefetcher,
                       (batch, super_batch) if select.selecting(step) else None)
      preempted = loop.maybe_eval(evaluators, done, config.total_steps, state["params"],
                                  preemption=preemption, reporter=reporter,
                                  clock=timer.clock, preempted=preempted, guard=guard)
      if preempted or saving:  # the consumed batch's iterator state, with the train seconds
        checkpointer.save(done, state,
                          prefetcher.state.with_values(train_seconds=timer.clock.seconds),
                          config, force=preempted or done == config.total_steps)
      if preempted:
        return _stopped(checkpointer, preemption, done, reporter.last,
                        ckpt_lib.checkpoint_dir(workdir))
  return reporter.last


def _setup(config, spec, workdir, primary):
  """The run's config and host info in the workdir, and the device mesh."""
  if primary:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh = shd.make_mesh(config.mesh)
  if primary:
    runinfo.write(workdir, runinfo.collect(config, mesh))
  log.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape),
           jax.device_count(), jax.devices()[0].device_kind, jax.process_count())
  b, n = spec.batch_size, spec.super_batch
  if n % jax.device_count() or b % jax.device_count():
    raise ValueError(f"batch_size={b} and super-batch N={n} must be divisible by the "
                     f"{jax.device_count()} devices")
  return mesh


def _to_device(mesh, reference, phase1=None):
  """Host batch → global device arrays (in the prefetch thread), with phase 1's rows
  (two-phase input: the token rows and score images of the super-batch) and θ*'s
  host-side rows (the cache's look-up) for selection or distillation."""
  rows = shd.batch_sharding(mesh)
  extras = [x for x in (phase1, reference) if x is not None]
  keys = DEVICE_KEYS + sum((x.device_keys for x in extras), ())

  def to_device(host_batch):
    for x in extras:
      host_batch = {**host_batch, **x.host_inputs(host_batch)}
    return feed.to_global(host_batch, rows, keys)

  return to_device


def _two_phase(config, spec, reference, tokenizer):
  """Phase 1's stores when the run reads two-phase input (data/two_phase.py), else None;
  logged either way."""
  phase1, why = two_phase_lib.plan(config, spec, reference, tokenizer)
  if phase1:
    log.info("two-phase input: the super-batch of %d comes from %s; only the %d selected "
             "records are read and decoded", spec.super_batch, phase1.describe(),
             spec.batch_size)
  elif why != "not selecting":
    log.info("two-phase input off (%s): every scored example is read and decoded", why)
  return phase1


def _stopped(checkpointer, preemption, done, last, where):
  """After the preemption / Ctrl-C checkpoint of step `done`: wait for it, say so."""
  checkpointer.wait()
  log.warning("%s: checkpoint at step %d saved in %s; rerun the same command to resume",
              "stopped by Ctrl-C" if preemption.interrupted else "preempted", done, where)
  return {**last, "preempted": True, "interrupted": preemption.interrupted}


def _train_iterator(config, spec, phase1=None):
  """The training input: super-batches of N, or with early-only selection
  (config.selection.until) N while JEST selects and B after; skips counted. With two-phase
  input (`phase1`: the records it skips) the super-batches are record indices only."""
  def make_iterator(global_batch, offset=0):
    # Only the selecting phase (offset 0, N rows) reads two-phase; uniform batches decode.
    selecting = offset == 0 and global_batch == spec.super_batch
    return pipeline.make_train_iterator(
        config.input, global_batch_size=global_batch, seed=config.seed, offset=offset,
        process_index=jax.process_index(), process_count=jax.process_count(),
        phase1=phase1 if selecting else None)

  switching = 0 < spec.selection_steps < config.total_steps
  return feed.SkipCounter(
      pipeline.SwitchingIterator(make_iterator, steps=spec.selection_steps,
                                 first=spec.super_batch, then=spec.batch_size)
      if switching else make_iterator(spec.super_batch))


def _restore_or_init(config, workdir, checkpointer, data_iter, state, state_sh, tx):
  """(start step, state): the latest good checkpoint (its config checked first: a changed
  model would fail to restore, not be damage), else a fresh state — from
  config.model.init_from's weights when set."""
  saved_step = checkpointer.readable_config_step()
  if saved_step:
    config_lib.check_resume(ckpt_lib.load_config(checkpointer.step_dir(saved_step)), config,
                            step=saved_step)
  abstract = state_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
  start, restored = checkpointer.restore_latest(abstract, data_iter)
  if start:
    log.info("resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start)
    return start, restored
  if config.model.init_from:  # a fresh run from a checkpoint's weights
    init = formats.load(config.model.init_from, tokenizer=config.model.init_tokenizer or None)
    state = state_lib.with_params(state, formats.params_for(init, config.model), tx, state_sh)
    log.info("learner initialised from %s", init.describe())
  return 0, state


def _log_start(config, spec, flops, start, workdir):
  # Named by its workdir, not its method: a reference run is not "training uniform".
  s = config.selection
  log.info("training %s: %s%s%s: steps %d→%d, B=%d, N=%d, %.3g FLOPs/step (%.3g amortised)",
           workdir, f"{s.method} selection ({s.score}, f={s.filter_ratio:g})"
           if spec.selecting else "no selection (every example of each batch)",
           f", uniform from step {spec.selection_steps}" if "after_selection" in flops else "",
           f", distilling from θ* ({config.distill.kind}, weight {config.distill.weight:g})"
           if spec.distill else "", start, config.total_steps, spec.batch_size,
           spec.super_batch, flops["charged"], flops["amortised"])


@contextlib.contextmanager
def _closing(prefetcher, preemption, checkpointer, writer, phase2=None):
  """Stops the input thread (and phase 2's decode threads), the signal handlers, Orbax
  and the writer when the loop ends. Already failing (a NaN, a full disk, a second
  Ctrl-C): finish what Orbax writes without letting its own error hide the first one."""
  threads = [prefetcher.close] + ([phase2.close] if phase2 else [])
  try:
    yield
  except BaseException:
    preemption.uninstall()
    for close in (*threads, checkpointer.close, writer.flush):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        log.debug("while stopping: %s", e)
    raise
  for close in threads:
    close()
  preemption.uninstall()
  checkpointer.close()
  writer.flush()
