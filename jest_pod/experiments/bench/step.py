"""`jest-pod bench step`: the real training loop, uniform vs JEST at the same B.

  jest-pod bench step [--config configs/jest.py:runlocal | RUN_WORKDIR] [--data DIR]
                      [--steps 20] [--reference-cache on|off] [--two-phase on|off]
                      [--xla-check]
                      [--set KEY=VALUE ...]

--config takes a config file or a JEST run's workdir (its saved config: bench that run's
exact towers, B, f and data; `selection.until` is set to 1, so every step selects).

Runs `jest_pod.train.main.train` — the loop a run uses, with its input thread, device
prefetch and JEST step — for --steps steps of a uniform config and of the JEST config
(same B, same towers), and reports from each run's own log:
  step (s)           wall time per step over all steps after the first (compilation),
                     with input and compute overlapped as in a run
  examples/s         trained examples per second (B / step)
  input (s/batch)    the host's input time per step: the input thread's (read, decode,
                     look up, transfer) and, with two-phase input (README), decoding the
                     selected records after selection (phase 2), each shown
  input wait         share of the loop's time spent waiting for the input
  split              one sampled step run part by part (scoring, reference, selection,
                     phase 2, train), each waited for
  FLOPs/step         the analytic model (jest_pod/train/flops.py), charged (reference
                     forward on every scored example) and amortised (reference cache)
  model FLOPs/s, MFU amortised FLOPs per step / step time, and / the device's peak
                     where it is known (bf16 dense peaks of common accelerators)
The reference is config.selection.reference when it exists, else a 1-step run of the
learner's towers (same cost; timings do not depend on its weights). With
--reference-cache on (the default) its embeddings are cached first, as a real JEST run
would; a cache the config names is used as it is (a run's cache of its own data) unless
--data replaces the data. --data: a data set (a folder or another source kind's spec,
e.g. virtual; default: the config's when it exists, else a 2,048-example toy set).
--xla-check (CPU only: on GPU XLA's cost_analysis skips library calls such as cuBLAS,
measured at 0.01-0.34 of the real count) compares XLA's FLOP count of the train step
with the model's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections

from jest_pod import checkpoint
from jest_pod import config as config_lib
from jest_pod.data import pipeline, reference_cache, score_images, sources, toy
from jest_pod.jest import reference as reference_lib
from jest_pod.models import build_model
from jest_pod.parallel import sharding as shd
from jest_pod.train import hooks
from jest_pod.train import main as train_main
from jest_pod.train import state as state_lib
from jest_pod.train import step as step_lib

# bf16 dense peak FLOP/s per chip by device_kind (substring match, lower case).
PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12,
              "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
              "tpu v4": 275e12}


def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod bench step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  default = os.path.join(config_lib.CONFIGS_DIR, "jest.py") + ":runlocal"
  p.add_argument("--config", default=default,
                 help="a JEST config FILE[:ARG] (default: the repo's configs/jest.py:runlocal), "
                 "or a JEST run's workdir (its saved config); the uniform run uses the same "
                 "B and towers")
  p.add_argument("--data", default=None, help="data set folder (default: the config's, else toy data)")
  p.add_argument("--steps", type=int, default=20, help="steps per run (the first is compilation)")
  p.add_argument("--reference-cache", choices=("on", "off"), default="on")
  p.add_argument("--two-phase", choices=("on", "off"), default="on",
                 help="JEST scores from score images and token rows, decoding only the "
                      "selected records (built first when missing; needs the cache); off: "
                      "every scored example is decoded")
  p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  p.add_argument("--xla-check", action="store_true")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field for both runs (repeatable), e.g. "
                 "--set input.worker_count=1")
  args = p.parse_args(argv)
  if args.steps < 4:
    p.error("--steps must be >= 4 (one compiles, one is sampled part by part)")
  return args


def _load(spec):
  """A config FILE[:ARG], or a run's workdir: its saved config, to bench exactly that run."""
  if os.path.isdir(spec):
    return checkpoint.load_config(spec)
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {spec}: no file {path} (give a config FILE[:ARG] or "
                            "a run's workdir)")
  return config_lib.load(path, arg)


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak
  return None


def _uniform_twin(config):
  u = ml_collections.ConfigDict(config.to_dict())
  u.selection.method = "uniform"
  u.selection.until = 1.0
  u.distill.weight = 0.0  # the plain uniform step: what JEST's overhead is measured against
  p = config.model.image["patch_size"]
  u.flexi.score_patch_size = 0
  u.flexi.train_patch_sizes, u.flexi.train_fractions = (p,), (1.0,)
  return u


def _xla_train_flops(config) -> float:
  """XLA's FLOP count of the compiled train step (per-device program × devices)."""
  mesh = shd.make_mesh(config.mesh)
  model = build_model(config.model)
  tx, schedule = state_lib.make_optimizer(config.optax, config.total_steps)
  state, state_sh = state_lib.create_state(config, model, tx, mesh, jax.random.key(0))
  b, s, l = config.batch_size, config.model.image_size, config.input.max_text_len
  batch = {"image": jnp.zeros((b, s, s, 3), jnp.float32), "text": jnp.ones((b, l), jnp.int32)}
  fn = step_lib.jit_train_step(config, model, tx, schedule, mesh, state_sh)
  cost = fn.lower(state, batch, None).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan"))) * jax.device_count()


def main(argv):
  args = _parse(argv)

  config = _load(args.config)
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      print(f"jest-pod bench step: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
      return 2
    try:
      config_lib.override(config, key, value)
    except (KeyError, ValueError) as e:
      print(f"jest-pod bench step: --set {item}: {e}", file=sys.stderr)
      return 2
  if config.selection.method == "uniform":
    print("jest-pod bench step: --config must select (method joint or independent); "
          "e.g. configs/jest.py:runlocal", file=sys.stderr)
    return 2
  hooks.setup_logging()
  logging.getLogger("jest_pod").setLevel(logging.WARNING)
  tmp = tempfile.TemporaryDirectory(prefix="jest_pod_bench_step_")
  root = args.workdir or tmp.name
  config.evals = ml_collections.ConfigDict()
  if "discover_evals" in config:  # absent from the saved configs of older runs
    config.discover_evals.root = ""
  if args.data:
    config.input.data = args.data
    config.input.tokenizer = ""
  elif not sources.exists(config.input.data):  # any source kind, e.g. "virtual"
    data = os.path.join(root, "toy")
    if not sources.exists(data):
      toy.build_toy(data, 2048, noise=0.2, image_size=config.model.image_size)
    config.input.data, config.input.tokenizer = data, ""
  config.input.mixture = ()
  config.selection.until = 1.0  # every step selects: the JEST step is what is timed
  config.total_steps = args.steps
  config.log_every = config.ckpt_every = args.steps
  config.time_split_every = max(2, args.steps // 2)
  config_lib.validate(config)
  uniform, spec = _uniform_twin(config), config_lib.resolve(config)

  ref_note = "no reference (the score does not use it)"
  if spec.needs_reference:
    ref = config.selection.reference
    if not (ref and os.path.exists(ref)):
      ref = os.path.join(root, "reference")
      r = _uniform_twin(config)
      r.total_steps = r.log_every = r.ckpt_every = 1
      train_main.train(r, ref)
      ref_note = "a 1-step run of the learner's towers as reference"
    else:
      ref_note = f"reference checkpoint {ref}"
    config.selection.reference = ref
    if args.reference_cache == "on":
      cache = config.selection.reference_cache
      if args.data or cache in ("", "off") or reference_cache.read_meta(cache) is None:
        cache = os.path.join(root, "reference_cache")
        if reference_cache.read_meta(cache) is None:
          reference_lib.build_cache(config.input.data, ref, output=cache)
        ref_note += ", embeddings cached"
      else:  # the config's own cache of its own data (e.g. a run's): not recomputed
        ref_note += f", embeddings from the config's cache {cache}"
      config.selection.reference_cache = cache
    else:
      config.selection.reference_cache = "off"

  if args.two_phase == "off":
    config.selection.score_images = "off"
  elif config.selection.reference_cache != "off" and sources.is_folder(config.input.data):
    key = score_images.Key(spec.image_size, int(config.model.image["patch_size"]),
                           spec.score_patch)
    score_images.ensure(config.input.data, key, spec.text_len, config.input.tokenizer or None)
    ref_note += ", two-phase input"

  dev = jax.devices()[0]
  print(f"devices: {jax.device_count()} x {dev.platform} ({dev.device_kind}); B="
        f"{spec.batch_size} N={spec.super_batch} "
        f"(f={config.selection.filter_ratio}); method={spec.method} score="
        f"{config.selection.score}; score patch {spec.score_patch}, train "
        f"patches {spec.train_patches}; data {config.input.data}; "
        f"input workers {pipeline.resolve_worker_count(config.input.worker_count)}; {ref_note}; {args.steps} steps per run",
        flush=True)

  results = {}
  for name, cfg in (("uniform", uniform), ("jest", config)):
    workdir = os.path.join(root, name)
    last = train_main.train(cfg, workdir)
    with open(os.path.join(workdir, "flops.json")) as f:
      flops = json.load(f)
    results[name] = (last, flops)
  print(format_table(results, config.batch_size, peak_flops(dev.device_kind)))
  if args.xla_check:
    if dev.platform != "cpu":
      print("--xla-check skipped: XLA's cost_analysis undercounts library calls off CPU")
    else:
      xla, model = _xla_train_flops(uniform), results["uniform"][1]["parts"]["train"]
      print(f"train step FLOPs: XLA {xla:.3g}, model {model:.3g}, XLA/model {xla / model:.2f}")
  tmp.cleanup()
  return 0


def format_table(results, batch_size, peak) -> str:
  """The comparison table from each run's last log record and flops.json."""
  def row(label, cells):
    return f"{label:<26}" + "".join(f"{c:>14}" for c in cells)

  def cell(x, fmt):
    return "-" if x is None else format(x, fmt)

  lines = ["", row("", ["uniform", "JEST"])]
  step = {k: r[0].get("time/step_s") for k, r in results.items()}
  for label, key, fmt in (("step (s, real loop)", "time/step_s", ".4f"),
                          ("input (s/batch, all phases)", "time/input_s", ".4f"),
                          ("  phase 1 (thread)", "time/input_phase1_s", ".4f"),
                          ("  phase 2 (selected)", "time/input_phase2_s", ".4f"),
                          ("input wait (share)", "time/input_wait_fraction", ".1%")):
    lines.append(row(label, [cell(results[k][0].get(key), fmt) for k in results]))
  lines.append(row("examples/s (trained)", [cell(batch_size / step[k] if step[k] else None,
                                                 ".1f") for k in results]))
  for part in ("scoring", "reference", "selection", "phase2", "train"):
    lines.append(row(f"split: {part} (s)", [cell(results[k][0].get(f"time/{part}_s"), ".4f")
                                            for k in results]))
  for view in ("charged", "amortised"):
    lines.append(row(f"FLOPs/step ({view})", [f"{results[k][1][view]:.3g}" for k in results]))
  rate = {k: results[k][1]["amortised"] / step[k] if step[k] else None for k in results}
  lines.append(row("model FLOPs/s (amortised)", [cell(rate[k], ".3g") for k in results]))
  lines.append(row("MFU", [cell(rate[k] / peak if peak and rate[k] else None, ".1%")
                           for k in results]))
  ratio = step["jest"] / step["uniform"] if step["jest"] and step["uniform"] else None
  lines += ["", f"JEST / uniform step time: {cell(ratio, '.2f')}"]
  return "\n".join(lines)
