"""`jest-pod train`: the training loop, uniform or JEST, on any mesh.

  jest-pod train --config configs/siglip.py:runlocal --workdir /tmp/run [--config.key=value ...]

Sections: setup · data · model and state · reference · step functions · loop.
Every host runs this same program (multi-controller JAX); only process 0 writes logs.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from jest_pod import checkpoint as ckpt_lib
from jest_pod import config as config_lib
from jest_pod import sharding as shd
from jest_pod.models import build_model
from jest_pod.train import DEVICE_KEYS
from jest_pod.train import flops as flops_lib
from jest_pod.train import state as state_lib
from jest_pod.train import step as step_lib


log = logging.getLogger("jest_pod")


def setup_logging():
  """Our progress at INFO on the console; Orbax/absl chatter only at WARNING and above."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s",
                                           "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class _Preemption:
  """SIGTERM (a TPU VM's maintenance or spot reclaim notice) → stop at an agreed step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def install(self):
    for sig in (signal.SIGTERM,):
      self._previous[sig] = signal.signal(sig, self._handle)

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    log.warning("received signal %d: saving a checkpoint at the next step, then exiting",
                    signum)
    self.requested = True

  def agreed(self) -> bool:
    """True on every host as soon as any host was signalled (one tiny all-gather)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))


class _JsonlWriter:
  """WORKDIR/metrics.jsonl: one object per log event (what `jest-pod plot` reads)."""

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


def _fmt_time(seconds):
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _to_global(host_batch, sharding):
  """This host's rows → global arrays sharded over the data axes."""
  out = {}
  for k in DEVICE_KEYS:
    if k in host_batch:
      v = np.asarray(host_batch[k])
      if v.dtype == np.int64:  # x64 is off: ids keep their low 31 bits on device
        v = (v & 0x7FFFFFFF).astype(np.int32)
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def _host_array(x) -> np.ndarray:
  """A global jax array as one numpy array on every host (a collective when the array
  spans processes: every process must call it at the same point)."""
  if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _process_sum(value: int) -> int:
  """Sum of a host-side count over all processes (a collective)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(np.sum(multihost_utils.process_allgather(np.array([value], np.int64))))


def _needs(score):
  return score != "easy_reference", score != "hard_learner"  # (learner, reference)


def load_reference(config, mesh):
  """The frozen reference: (config, model, params), checked against the learner's data."""
  path = config.selection.reference
  try:
    ref_config, ref_params, ref_step = ckpt_lib.load_params(path,
                                                            sharding=shd.replicated(mesh))
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(
        f"config.selection.reference={path!r}: {e}. Train one with "
        "`jest-pod train --config configs/reference.py:runlocal --workdir DIR`.") from e
  rm = ref_config.model
  if rm.image_size != config.model.image_size:
    raise ValueError(f"reference at {path} was trained at image_size={rm.image_size}, the "
                     f"learner's data is {config.model.image_size}")
  if rm.text["vocab_size"] < config.model.text["vocab_size"]:
    raise ValueError(f"reference at {path} has text vocab {rm.text['vocab_size']} < the "
                     f"learner's {config.model.text['vocab_size']}: use the same tokenizer")
  ref_model = build_model(rm)
  # Shape check: one forward pass on the learner's input shapes fails early, not at step 1.
  image, text = state_lib.dummy_inputs(config)
  try:
    jax.eval_shape(lambda p: ref_model.apply({"params": p}, image, text), ref_params)
  except Exception as e:
    raise ValueError(f"reference checkpoint {path} does not fit its own saved config "
                     f"(shape mismatch): {e}") from e
  log.info("reference: %s (step %d)", path, ref_step)
  return ref_config, ref_model, ref_params


def _open_reference_cache(config):
  from jest_pod.data import reference_cache
  if config.input.get("mixture"):
    raise ValueError("config.selection.reference_cache works with one data set "
                     "(config.input.data), not a mixture: the cache is indexed by record")
  return reference_cache.ReferenceCache(config.selection.reference_cache, config.input.data)


def _cached_embeddings(cache, index, sharding):
  from jest_pod.selection import Embeddings
  image, text = cache.lookup(index)
  return Embeddings(image=jax.make_array_from_process_local_data(sharding, image),
                    text=jax.make_array_from_process_local_data(sharding, text),
                    temperature=jax.numpy.float32(cache.temperature),
                    bias=jax.numpy.float32(cache.bias))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a training run. Returns the last logged metrics."""
  # ---------------------------------------------------------------- setup
  config_lib.validate(config)
  from jest_pod import distributed
  distributed.initialize()
  primary = jax.process_index() == 0
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if primary:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh = shd.make_mesh(config.mesh)
  batch_sharding = shd.batch_sharding(mesh)
  from jest_pod import runinfo
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
  from jest_pod.data import pipeline
  data_iter = pipeline.make_train_iterator(
      config.input, global_batch_size=n, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  source_names = pipeline.source_names(config.input)

  # ---------------------------------------------------------------- model and state
  model = build_model(config.model)
  tx, schedule = state_lib.make_optimizer(config.optax, config.total_steps)
  init_rng, select_rng = jax.random.split(jax.random.key(config.seed))
  state, state_sh = state_lib.create_state(config, model, tx, mesh, init_rng)
  checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=config.ckpt_every,
                                       keep=config.keep_ckpts)
  start = checkpointer.latest_step() or 0
  if start:
    abstract = state_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
    state = checkpointer.restore(start, abstract, data_iter)
    log.info("resumed from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start)

  # ---------------------------------------------------------------- reference
  need_learner, need_ref = _needs(s.score)
  ref_config, ref_params, embed_ref, ref_cache = None, None, None, None
  if s.method != "uniform" and need_ref and s.reference_cache:
    ref_cache = _open_reference_cache(config)
  elif s.method != "uniform" and need_ref:
    ref_config, ref_model, ref_params = load_reference(config, mesh)
    embed_ref = jax.jit(step_lib.make_embed_fn(ref_model, None))

  # ---------------------------------------------------------------- step functions
  train_step = jax.jit(step_lib.make_train_step(config, model, tx, schedule),
                       in_shardings=(state_sh, batch_sharding),
                       out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
  embed_learner = select = None
  if s.method != "uniform":
    score_patch = config.flexi.score_patch_size or config.model.image["patch_size"]
    embed_learner = jax.jit(step_lib.make_embed_fn(model, score_patch)) if need_learner else None
    select = jax.jit(step_lib.make_select_fn(config, mesh, num_select=b))
  step_flops = flops_lib.step_flops(config, ref_config, reference_cached=ref_cache is not None)

  evaluators = []
  if config.evals:
    from jest_pod.evaluators import build_evaluators
    evaluators = build_evaluators(config, model, mesh)

  # ---------------------------------------------------------------- loop
  from clu import metric_writers
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not primary,
                                                asynchronous=False)
  jsonl = _JsonlWriter(workdir, primary)
  # The global `index` of each selected row, per step (later lines win after a resume).
  ids_log = _JsonlWriter(workdir, primary, name="selected_ids.jsonl")
  jsonl.drop_after(start)
  ids_log.drop_after(start)
  log_ids = bool(config.get("log_selected_ids", False)) and s.method != "uniform"
  preemption = _Preemption()
  preemption.install()
  examples = start * b
  flops_done = start * step_flops["total"]
  t_start, steps_timed, last = None, 0, {}
  timings = {"data": 0.0, "scoring": 0.0, "selection": 0.0, "train": 0.0}
  skipped = 0
  log.info("training %s (%s, f=%.2f): steps %d→%d, B=%d, N=%d, %.3g FLOPs/step",
               s.method, s.score, s.filter_ratio if s.method != "uniform" else 0.0, start,
               config.total_steps, b, n, step_flops["total"])
  try:
    for step in range(start, config.total_steps):
      t0 = time.perf_counter()
      host_batch = next(data_iter)
      skipped += int(np.sum(host_batch.get("skipped", 0)))
      super_batch = _to_global(host_batch, batch_sharding)
      t1 = time.perf_counter()
      timings["data"] += t1 - t0
      select_metrics = {}
      if s.method == "uniform":
        batch = super_batch
      else:
        lemb = embed_learner(state["params"], super_batch) if need_learner else None
        if ref_cache is not None:  # cached θ* embeddings, looked up by example index
          remb = _cached_embeddings(ref_cache, host_batch["index"], batch_sharding)
        else:
          remb = embed_ref(ref_params, super_batch) if need_ref else None
        jax.block_until_ready((lemb, remb))
        t2 = time.perf_counter()
        batch, _, select_metrics = select(jax.random.fold_in(select_rng, step), lemb, remb,
                                          super_batch)
        jax.block_until_ready(batch)
        t3 = time.perf_counter()
        timings["scoring"] += t2 - t1
        timings["selection"] += t3 - t2
        if log_ids:  # int32 on device (low 31 bits of the id), sharded over the hosts
          ids = _host_array(batch["index"])
          ids_log.write({"step": step + 1, "ids": [int(i) for i in ids]})
        t1 = time.perf_counter()
      state, metrics = train_step(state, batch)
      loss = float(metrics["train/loss"])  # one sync per step: catches NaN at once
      param_norm = float(metrics["train/param_norm"])
      timings["train"] += time.perf_counter() - t1
      if not (math.isfinite(loss) and math.isfinite(param_norm)):
        checkpointer.wait()
        good = checkpointer.latest_step()
        raise TrainingDiverged(
            f"loss is {loss} (parameter norm {param_norm}) at step {step + 1}; stopping "
            "without saving. The last good "
            f"checkpoint is step {good} in {ckpt_lib.checkpoint_dir(workdir)}. Lower "
            "config.optax.lr or raise config.optax.warmup_steps, then rerun to resume.")
      examples += b
      flops_done += step_flops["total"]
      done = step + 1
      if t_start is None:  # the first step includes compilation: time from the second
        t_start = time.perf_counter()
      else:
        steps_timed += 1

      if done % config.log_every == 0 or done == config.total_steps:
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.update({k: float(v) for k, v in select_metrics.items()})
        if s.method != "uniform" and "source" in batch:
          scalars.update(_source_shares(batch["source"], super_batch["source"], source_names))
        elapsed = time.perf_counter() - t_start
        rate = steps_timed / elapsed if steps_timed else float("nan")
        total_t = sum(timings.values()) or 1.0
        scalars.update({"progress/examples": examples, "progress/flops": flops_done,
                        "progress/steps_per_sec": rate, "progress/examples_per_sec": rate * b,
                        "data/skipped_records": _process_sum(skipped)})
        scalars.update({f"time/{k}_fraction": v / total_t for k, v in timings.items()})
        writer.write_scalars(done, scalars)
        jsonl.write({"step": done, "examples": examples, "flops": flops_done, **scalars})
        eta = (config.total_steps - done) / rate if rate == rate and rate > 0 else float("nan")
        log.info("step %d/%d | loss %.4f | %.2f steps/s | %.0f examples/s | ETA %s",
                     done, config.total_steps, loss, rate, rate * b, _fmt_time(eta))
        last = {"step": done, "examples": examples, "flops": flops_done, **scalars}

      for ev in evaluators:
        if done % ev.every_steps == 0 or done == config.total_steps:
          t_ev = time.perf_counter()
          results = ev.run(state["params"])
          writer.write_scalars(done, results)
          jsonl.write({"step": done, "examples": examples, "flops": flops_done, **results})
          last.update(results)
          log.info("eval at step %d (%.1fs): %s", done, time.perf_counter() - t_ev,
                       ", ".join(f"{k}={v:.4f}" for k, v in results.items()))

      checkpointer.save(done, state, data_iter, config)
      if preemption.agreed():
        checkpointer.save(done, state, data_iter, config, force=True)
        checkpointer.wait()
        log.warning("preempted: checkpoint at step %d saved in %s; rerun the same command "
                        "to resume", done, ckpt_lib.checkpoint_dir(workdir))
        last["preempted"] = True
        return last
    if config.total_steps > start:
      checkpointer.save(config.total_steps, state, data_iter, config, force=True)
  finally:
    preemption.uninstall()
    checkpointer.close()
    writer.flush()
  return last


def _source_shares(selected_source, pool_source, names):
  """Share of each source (origin / damage kind) among selected rows and in the pool."""
  sel = _host_array(selected_source)  # every process calls this (a collective)
  pool = _host_array(pool_source)
  out = {}
  for i, name in enumerate(names):
    key = name.replace(":", "/")
    out[f"select/share/{key}"] = float(np.mean(sel == i)) if sel.size else 0.0
    out[f"pool/share/{key}"] = float(np.mean(pool == i)) if pool.size else 0.0
  return out


def main(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FLAGS
  if "config" not in fv:
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/siglip.py:runlocal",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, logs and metrics go (may be gs://)")
  try:
    fv(["jest-pod train", *argv])
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown --config.key as an AttributeError naming the key.
    print(f"jest-pod train: {e}\nusage: jest-pod train --config configs/FILE.py[:ARG] "
          "--workdir DIR [--config.key=value ...]", file=sys.stderr)
    return 2
  if fv.config is None or fv.workdir is None:
    print("jest-pod train: --config and --workdir are required, e.g.\n  jest-pod train "
          "--config configs/siglip.py:runlocal --workdir /tmp/siglip", file=sys.stderr)
    return 2
  setup_logging()
  from jest_pod import distributed
  try:
    train(fv.config, fv.workdir)  # also returns after a SIGTERM-triggered checkpoint
  except (ValueError, ckpt_lib.CheckpointError, TrainingDiverged) as e:
    # Raised alike on every host (config checks, replicated loss): leave together.
    log.error("%s", e)
    print(f"jest-pod train: error: {e}", file=sys.stderr)
    distributed.shutdown()
    return 1
  # A barrier with the other processes, so none races through JAX's atexit teardown
  # while another still runs (the coordinator would log "another task died").
  distributed.shutdown()
  return 0
