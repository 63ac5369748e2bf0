"""The training loop, uniform or JEST, on any mesh (its command line: train/cli.py).

  jest-pod train --config configs/siglip.py:runlocal --workdir /tmp/run [--config.key=value ...]

Sections: setup · data · model and state · JEST step · loop. The loop only orchestrates:
the input runs ahead in a thread (train/feed.py), the JEST step turns a super-batch into
the trained batch (jest/step.py), and nothing on the hot path waits for the device — the
host reads metrics back at log steps and before every checkpoint save.
Every host runs this same program (multi-controller JAX); only process 0 writes logs.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from jest_pod import checkpoint as ckpt_lib
from jest_pod import config as config_lib
from jest_pod import errors
from jest_pod import runinfo
from jest_pod.data import pipeline
from jest_pod.data import sources
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.input_config import DEVICE_KEYS
from jest_pod.interop import formats
from jest_pod.jest import reference as reference_lib
from jest_pod.jest import step as jest_lib
from jest_pod.models import build_model
from jest_pod.parallel import distributed
from jest_pod.parallel import ids as ids_lib
from jest_pod.parallel import sharding as shd
from jest_pod.train import feed
from jest_pod.train import flops as flops_lib
from jest_pod.train import hooks
from jest_pod.train import lock as lock_lib
from jest_pod.train import state as state_lib
from jest_pod.train import step as step_lib
from jest_pod.train import writers

log = logging.getLogger("jest_pod")

# Kept importable from here: callers and tests use these names.
setup_logging = hooks.setup_logging
TrainingDiverged = hooks.TrainingDiverged


def _source_shares(selected_source, pool_source, names):
  """Share of each source (origin / damage kind) among selected rows and in the pool."""
  sel = distributed.host_array(selected_source)  # every process calls this (a collective)
  pool = distributed.host_array(pool_source)
  out = {}
  for i, name in enumerate(names):
    key = name.replace(":", "/")
    out[f"select/share/{key}"] = float(np.mean(sel == i)) if sel.size else 0.0
    out[f"pool/share/{key}"] = float(np.mean(pool == i)) if pool.size else 0.0
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a training run. Returns the last logged metrics."""
  formats.apply_init_from(config)  # the checkpoint's architecture and preprocessing
  config_lib.validate(config)
  config_lib.check_input(config)
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
    return _train(config, workdir)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless a storage error)
    # Disk full, permissions, ...: raised by Orbax (also from its save threads, at the next
    # save), Riegeli, tensorstore or TensorFlow's event writer, each in its own words.
    # (Errors of our own already name their path and fix.)
    ours = (lock_lib.WorkdirBusy, TrainingDiverged, ckpt_lib.CheckpointError,
            tokenizer_lib.TokenizerError, errors.StorageError)
    message = None if isinstance(e, ours) else errors.storage_message(e, str(workdir))
    if message is None:
      raise
    raise errors.StorageError(
        f"writing the run to {workdir} failed: {message}. "
        f"{hooks.last_checkpoint_line(workdir)}") from e
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


def _train(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  # ---------------------------------------------------------------- setup
  primary = jax.process_index() == 0
  if primary:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh = shd.make_mesh(config.mesh)
  batch_sharding = shd.batch_sharding(mesh)
  if primary:
    runinfo.write(workdir, runinfo.collect(config, mesh))
  log.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape),
           jax.device_count(), jax.devices()[0].device_kind, jax.process_count())

  s = config.selection
  b = config.batch_size
  n = config_lib.num_super_batch(config)
  if n % jax.device_count() or b % jax.device_count():
    raise ValueError(f"batch_size={b} and super-batch N={n} must be divisible by the "
                     f"{jax.device_count()} devices")

  # ---------------------------------------------------------------- data
  hooks.warn_if_smaller_than_a_batch(config, n)
  tokenizer = tokenizer_lib.resolve(config.input)
  tokenizer_lib.check_vocab(tokenizer, config.model.text["vocab_size"])
  preprocessing = formats.Preprocessing(config.input.image_size, config.input.max_text_len,
                                        tokenizer)
  def make_iterator(global_batch, offset=0):
    return pipeline.make_train_iterator(
        config.input, global_batch_size=global_batch, seed=config.seed, offset=offset,
        process_index=jax.process_index(), process_count=jax.process_count())

  # Early-only selection: super-batches of N while JEST selects, then batches of B.
  selecting_steps = config_lib.selection_steps(config)
  data_iter = feed.SkipCounter(
      pipeline.SwitchingIterator(make_iterator, steps=selecting_steps, first=n, then=b)
      if 0 < selecting_steps < config.total_steps else make_iterator(n))
  source_names = sources.source_names(config.input)

  # ---------------------------------------------------------------- model and state
  model = build_model(config.model)
  tx, schedule = state_lib.make_optimizer(config.optax, config.total_steps)
  init_rng, select_rng = jax.random.split(jax.random.key(config.seed))
  state, state_sh = state_lib.create_state(config, model, tx, mesh, init_rng)
  checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=config.ckpt_every,
                                       keep=config.keep_ckpts)
  saved_step = checkpointer.readable_config_step()
  if saved_step:  # before restoring: a changed model would fail to restore, not be damage
    config_lib.check_resume(ckpt_lib.load_config(checkpointer.step_dir(saved_step)), config)
  abstract = state_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
  start, restored = checkpointer.restore_latest(abstract, data_iter)
  if start:
    state = restored
    log.info("resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start)
  elif config.model.init_from:  # a fresh run from a checkpoint's weights
    init = formats.load(config.model.init_from, tokenizer=config.model.init_tokenizer or None)
    state = state_lib.with_params(state, formats.params_for(init, config.model), tx, state_sh)
    log.info("learner initialised from %s", init.describe())

  # ---------------------------------------------------------------- JEST step
  reference = reference_lib.open_reference(config, mesh, preprocessing)
  jest = (jest_lib.JestStep(config, model, mesh, reference=reference)
          if s.method != "uniform" else None)
  train_step = step_lib.jit_train_step(config, model, tx, schedule, mesh, state_sh)
  distill = config_lib.distilling(config)
  flops = flops_lib.run_flops(config, reference)
  if primary:
    (workdir / "flops.json").write_text(json.dumps(flops, indent=1))

  evaluators, eval_interrupted = [], ()
  if config.evals:
    from jest_pod import evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top
    evaluators = evaluators_lib.build_evaluators(config, model, mesh)
    eval_interrupted = evaluators_lib.EvalInterrupted

  # ---------------------------------------------------------------- loop
  writer = writers.create_scalar_writer(workdir, primary)
  jsonl = writers.JsonlWriter(workdir, primary)
  # The global `index` of each selected row, per step (later lines win after a resume).
  ids_log = writers.JsonlWriter(workdir, primary, name="selected_ids.jsonl")
  jsonl.drop_after(start)
  ids_log.drop_after(start)
  log_ids = bool(config.get("log_selected_ids", False)) and jest is not None
  preemption = hooks.Preemption(every=config.preemption_check_every)
  preemption.install()

  def to_device(host_batch):  # runs in the prefetch thread
    if reference is None:
      return feed.to_global(host_batch, batch_sharding)
    # θ*'s host-side rows (the cache's look-up), for selection or distillation
    return feed.to_global({**host_batch, **reference.host_inputs(host_batch)},
                          batch_sharding, DEVICE_KEYS + reference.device_keys)

  prefetcher = feed.DevicePrefetcher(data_iter, to_device, depth=config.device_prefetch)
  timer = hooks.TrainTimer(data_iter.train_seconds if start else 0.0)

  def progress(done):  # the fields every record of step `done` carries
    return {"step": done, "examples": done * b,
            "flops": flops_lib.total_flops(flops, done, "charged"),
            "flops_amortised": flops_lib.total_flops(flops, done, "amortised"),
            "time/train_elapsed_s": timer.seconds, "host/load1": hooks.host_load()}

  def save_state():  # the consumed batch's iterator state, with the run's train seconds
    return prefetcher.state.with_values(train_seconds=timer.seconds)

  t_window, wait0, produce0, batches0 = None, 0.0, 0.0, 0
  sampled_s, sampled_n = 0.0, 0  # sampled steps are left out of the loop's rate
  split, last, pending, failed = {}, {}, [], False
  log.info("training %s%s%s: steps %d→%d, B=%d, N=%d, %.3g FLOPs/step (%.3g amortised)",
           f"{s.method} ({s.score}, f={s.filter_ratio:g})" if jest else s.method,
           f", uniform from step {selecting_steps}" if "after_selection" in flops else "",
           f", distilling from θ* ({config.distill.kind}, weight {config.distill.weight:g})"
           if distill else "", start, config.total_steps, b, n, flops["charged"],
           flops["amortised"])
  try:
    for step in range(start, config.total_steps):
      done = step + 1
      host_batch, super_batch = next(prefetcher)
      # A sampled step runs its parts one by one with barriers, for the time split.
      sample = config.time_split_every > 0 and (done == start + 2 or
                                                done % config.time_split_every == 0)
      if sample:
        jax.block_until_ready(state)
        t_sample = time.perf_counter()
      sel_metrics, times = {}, {}
      selecting = jest is not None and step < selecting_steps  # config.selection.until
      if not selecting:
        batch = super_batch
        teacher = reference.embeddings(batch) if distill else None
      elif sample:
        batch, sel_metrics, teacher, times = jest.timed_call(
            state["params"], super_batch, jax.random.fold_in(select_rng, step))
      else:
        batch, sel_metrics, teacher = jest(state["params"], super_batch,
                                           jax.random.fold_in(select_rng, step))
      if log_ids and selecting:  # a host sync: a debugging aid, off by default
        ids = ids_lib.host_ids(batch["index"])  # int32 words → int64 (parallel/ids.py)
        ids_log.write({"step": done, "ids": [int(i) for i in ids]})
      t = time.perf_counter()
      state, metrics = train_step(state, batch, teacher)
      if sample:
        jax.block_until_ready(state)
        times["train"] = time.perf_counter() - t
        split = times
        if t_window is not None:
          sampled_s += time.perf_counter() - t_sample
          sampled_n += 1
      pending.append((done, metrics, sel_metrics))
      if t_window is None:  # the first step includes compilation: time from the next
        jax.block_until_ready(state)
        t_window, batches0 = time.perf_counter(), prefetcher.batches
        wait0, produce0 = prefetcher.wait_seconds, prefetcher.produce_seconds

      is_log = done % config.log_every == 0 or done == config.total_steps
      preempted = preemption.agreed(done)
      saving = preempted or checkpointer.due(done) or done == config.total_steps
      if is_log or saving:  # the NaN guard: a non-finite state is never saved
        bad = hooks.first_nonfinite(pending)
        pending = []
        if bad is not None:
          checkpointer.wait()
          good = checkpointer.latest_step()
          hint = ("Lower config.optax.lr or raise config.optax.warmup_steps, then rerun "
                  "to resume.")
          if start and bad[0] <= start + config.log_every:  # right after a resume
            hint = (f"This is within {config.log_every} step(s) of resuming: the restored "
                    f"checkpoint {checkpointer.step_dir(start)} may be damaged; move it "
                    f"aside (rename it to {start}.bad) and rerun to resume from the "
                    f"previous one. Otherwise: {hint}")
          if bad[3]:  # finite loss, non-finite scores: θ*'s embeddings are damaged
            raise TrainingDiverged(hooks.bad_selection_message(
                config, bad, good, ckpt_lib.checkpoint_dir(workdir), reference))
          raise TrainingDiverged(
              f"loss is {bad[1]} (parameter norm {bad[2]}) at step {bad[0]}; stopping "
              "without saving. The last good "
              f"checkpoint is step {good} in {ckpt_lib.checkpoint_dir(workdir)}. {hint}")

      if is_log:
        now = time.perf_counter()
        steps_timed = prefetcher.batches - batches0 - sampled_n
        elapsed = max(now - t_window - sampled_s, 1e-9)
        rate = steps_timed / elapsed if steps_timed else float("nan")
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update({k: float(v) for k, v in jax.device_get(sel_metrics).items()})
        if selecting and "source" in batch:
          scalars.update(_source_shares(batch["source"], super_batch["source"], source_names))
        common = progress(done)
        scalars.update({
            "progress/examples": common["examples"], "progress/flops": common["flops"],
            "progress/flops_amortised": common["flops_amortised"],
            "time/train_elapsed_s": common["time/train_elapsed_s"],
            "host/load1": common["host/load1"],
            "progress/steps_per_sec": rate, "progress/examples_per_sec": rate * b,
            # this host's count up to the consumed batch, restored with the iterator
            "data/skipped_records": distributed.process_sum(
                prefetcher.state.state["skipped_records"])})
        if steps_timed:
          input_s = (prefetcher.produce_seconds - produce0) / steps_timed
          scalars["time/step_s"] = elapsed / steps_timed
          scalars["time/input_s"] = input_s  # the input thread's time per batch
          scalars["time/input_wait_fraction"] = (prefetcher.wait_seconds - wait0) / elapsed
        total_split = sum(split.values())
        for part, seconds in split.items():  # from the last sampled step
          scalars[f"time/{part}_s"] = seconds
          scalars[f"time/{part}_fraction"] = seconds / total_split
        writer.write_scalars(done, scalars)
        record = {**common, **scalars}
        jsonl.write(record)
        eta = (config.total_steps - done) / rate if rate == rate and rate > 0 else float("nan")
        log.info("step %d/%d | loss %.4f | %.2f steps/s | %.0f examples/s | input wait "
                 "%.0f%% | ETA %s", done, config.total_steps, scalars["train/loss"], rate,
                 rate * b, 100 * scalars.get("time/input_wait_fraction", 0.0),
                 hooks.fmt_time(eta))
        last = record

      for ev in evaluators:
        if preempted:  # a notice during an earlier evaluation: save now, skip the rest
          break
        if done % ev.every_steps == 0 or done == config.total_steps:
          t_ev = time.perf_counter()
          try:  # a long evaluation must not outlast a preemption notice
            results = ev.run(state["params"], should_stop=lambda: preemption.requested)
          except eval_interrupted:
            log.warning("evaluation %s at step %d interrupted by a preemption notice; "
                        "saving the checkpoint (this evaluation is not rerun)", ev.name, done)
            preempted = True
            continue
          timer.exclude(time.perf_counter() - t_ev)
          writer.write_scalars(done, results)
          jsonl.write({**progress(done), **results})
          last.update(results)
          log.info("eval at step %d (%.1fs): %s", done, time.perf_counter() - t_ev,
                   ", ".join(f"{k}={v:.4f}" for k, v in results.items()))

      if preempted:
        checkpointer.save(done, state, save_state(), config, force=True)
        checkpointer.wait()
        log.warning("%s: checkpoint at step %d saved in %s; rerun the same command "
                    "to resume", "stopped by Ctrl-C" if preemption.interrupted else "preempted",
                    done, ckpt_lib.checkpoint_dir(workdir))
        last["preempted"] = True
        last["interrupted"] = preemption.interrupted
        return last
      if saving:
        checkpointer.save(done, state, save_state(), config,
                          force=done == config.total_steps)
  except BaseException:
    failed = True
    # Already failing (a NaN, a full disk, a second Ctrl-C): finish what Orbax writes
    # without letting its own error hide the first one.
    _close_quietly(prefetcher, preemption, checkpointer, writer)
    raise
  finally:
    if not failed:
      prefetcher.close()
      preemption.uninstall()
      checkpointer.close()
      writer.flush()
  return last


def _close_quietly(prefetcher, preemption, checkpointer, writer):
  preemption.uninstall()
  for close in (prefetcher.close, checkpointer.close, writer.flush):
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      log.debug("while stopping: %s", e)
