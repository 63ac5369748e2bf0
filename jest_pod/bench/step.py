"""`jest-pod bench step`: the JEST step's time split beside a uniform step at the same B.

  jest-pod bench step [--config configs/jest.py:runlocal] [--data DIR] [--repeats 5]

Parts, each a separately jitted piece as in the trainer (jest_pod/train/main.py), timed
with block_until_ready, median over --repeats after --warmup calls:
  data       next(host iterator) + host → global arrays (N rows for JEST, B for uniform)
  scoring    learner forward over N at the scoring patch (Flexi-JEST: 2p)
  reference  frozen reference forward over N
  selection  joint (or independent) selection + gather of the B chosen rows
  train      the optimizer step on B (JEST: half at p, half at 2p; uniform: all at p)
FLOPs: "XLA" is `jax.jit(f).lower(...).compile().cost_analysis()["flops"]` of each piece
(the per-device SPMD program, multiplied by the device count); "model" is
jest_pod.train.flops.step_flops. --data is a data-set folder (default: the config's
input.data when it holds a data set — `data/demo/web` after `jest-pod demo` — else a
2048-example toy set with 20% swapped captions, built in a temp dir). The reference is the checkpoint that
config.selection.reference names when it exists, else a randomly initialised copy of the
learner's towers (same cost; the timings do not depend on its weights).

CPU mesh: XLA_FLAGS=--xla_force_host_platform_device_count=8 jest-pod bench step
(fake devices share the host's cores: timings there measure overheads, not speed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

PARTS = ("data", "scoring", "reference", "selection", "train")


def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod bench step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  from jest_pod import config as config_lib
  default = os.path.join(config_lib.CONFIGS_DIR, "jest.py") + ":runlocal"
  p.add_argument("--config", default=default,
                 help="a JEST config FILE[:ARG] (default: the repo's configs/jest.py:runlocal); "
                 "the uniform step uses the same B and towers")
  p.add_argument("--data", default=None, help="data set folder (default: the config's, else toy data)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  return p.parse_args(argv)


def _load(spec):
  from jest_pod import config as config_lib
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {spec}: no file {path}")
  return config_lib.sibling_config(os.path.abspath(path), os.path.basename(path), arg)


def _flops(jitted, *args) -> float:
  """XLA's FLOP count of the compiled per-device program × devices (nan if unknown)."""
  import jax
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan"))) * jax.device_count()


def _timeit(fn, repeats, warmup):
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  args = _parse(argv)
  import jax
  import ml_collections

  from jest_pod import config as config_lib
  from jest_pod import sharding as shd
  from jest_pod.data import pipeline
  from jest_pod.models import build_model
  from jest_pod.train import flops as flops_lib
  from jest_pod.train import main as train_main
  from jest_pod.train import state as state_lib
  from jest_pod.train import step as step_lib

  config = _load(args.config)
  if config.selection.method == "uniform":
    print("jest-pod bench step: --config must select (method joint or independent); "
          "e.g. configs/jest.py:runlocal", file=sys.stderr)
    return 2
  config.evals = ml_collections.ConfigDict()
  tmp = None
  if args.data:
    config.input.data = args.data
    if not config.input.tokenizer or not os.path.exists(config.input.tokenizer):
      config.input.tokenizer = os.path.join(args.data, "tokenizer.model")
  elif not os.path.exists(os.path.join(config.input.data, "manifest.json")):
    from jest_pod.data import toy
    tmp = tempfile.TemporaryDirectory(prefix="jest_pod_bench_step_")
    toy.build_toy(tmp.name, 2048, noise=0.2, image_size=config.model.image_size)
    config.input.data = tmp.name
    config.input.tokenizer = os.path.join(tmp.name, "tokenizer.model")
  config.input.mixture = ()
  config_lib.validate(config)
  uniform = ml_collections.ConfigDict(config.to_dict())
  uniform.selection.method = "uniform"
  p = config.model.image["patch_size"]
  uniform.flexi.score_patch_size = 0
  uniform.flexi.train_patch_sizes, uniform.flexi.train_fractions = (p,), (1.0,)

  mesh = shd.make_mesh(config.mesh)
  rows = shd.batch_sharding(mesh)
  b, n = config.batch_size, config_lib.num_super_batch(config)
  s = config.selection
  need_learner, need_ref = train_main._needs(s.score)  # pylint: disable=protected-access
  model = build_model(config.model)
  rng = jax.random.key(config.seed)

  # Reference: the configured checkpoint when there is one, else random towers.
  ref_config, ref_params, ref_note = None, None, ""
  if need_ref:
    try:
      ref_config, ref_model, ref_params = train_main.load_reference(config, mesh)
      ref_note = f"reference checkpoint {s.reference}"
    except Exception as e:  # pylint: disable=broad-except
      ref_config, ref_model = config, model
      ref_params = state_lib.create_state(config, model, state_lib.make_optimizer(
          config.optax, config.total_steps)[0], mesh, jax.random.fold_in(rng, 7))[0]["params"]
      ref_note = f"random reference towers ({type(e).__name__}: no usable {s.reference!r})"

  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}); mesh {dict(mesh.shape)}; B={b} N={n} "
        f"(f={s.filter_ratio}); method={s.method} score={s.score}; score patch "
        f"{config.flexi.score_patch_size or p}, train patches {tuple(config.flexi.train_patch_sizes)}; "
        f"data {config.input.data}; {ref_note}; median of {args.repeats} after "
        f"{args.warmup} warm-up")

  results = {}
  for name, cfg in (("uniform", uniform), ("jest", config)):
    tx, schedule = state_lib.make_optimizer(cfg.optax, cfg.total_steps)
    state, state_sh = state_lib.create_state(cfg, model, tx, mesh, rng)
    nb = b if name == "uniform" else n
    it = pipeline.make_train_iterator(cfg.input, global_batch_size=nb, seed=cfg.seed,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    fetch = lambda it=it: train_main._to_global(next(it), rows)  # pylint: disable=protected-access
    times, xla = {}, {}
    times["data"] = _timeit(fetch, args.repeats, args.warmup)
    super_batch = fetch()
    train_step = jax.jit(step_lib.make_train_step(cfg, model, tx, schedule),
                         in_shardings=(state_sh, rows),
                         out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
    batch = super_batch
    if name == "jest":
      lemb = remb = None
      if need_learner:
        embed_l = jax.jit(step_lib.make_embed_fn(model, cfg.flexi.score_patch_size or p))
        times["scoring"] = _timeit(lambda: embed_l(state["params"], super_batch),
                                   args.repeats, args.warmup)
        xla["scoring"] = _flops(embed_l, state["params"], super_batch)
        lemb = embed_l(state["params"], super_batch)
      if need_ref:
        embed_r = jax.jit(step_lib.make_embed_fn(ref_model, None))
        times["reference"] = _timeit(lambda: embed_r(ref_params, super_batch),
                                     args.repeats, args.warmup)
        xla["reference"] = _flops(embed_r, ref_params, super_batch)
        remb = embed_r(ref_params, super_batch)
      select = jax.jit(step_lib.make_select_fn(cfg, mesh, num_select=b))
      key = jax.random.key(1)
      times["selection"] = _timeit(lambda: select(key, lemb, remb, super_batch)[0],
                                   args.repeats, args.warmup)
      xla["selection"] = _flops(select, key, lemb, remb, super_batch)
      batch = select(key, lemb, remb, super_batch)[0]
    xla["train"] = _flops(train_step, state, batch)
    holder = {"state": state}

    def one_train_step():
      holder["state"], metrics = train_step(holder["state"], batch)
      return metrics
    times["train"] = _timeit(one_train_step, args.repeats, args.warmup)
    model_flops = flops_lib.step_flops(cfg, ref_config if name == "jest" else None)
    results[name] = (times, xla, model_flops)

  # ------------------------------------------------------------ table
  def row(label, cells):
    return f"{label:<22}" + "".join(f"{c:>16}" for c in cells)

  print()
  print(row("part (median s)", ["uniform", "JEST", "JEST share"]))
  jt = sum(results["jest"][0].values())
  for part in PARTS:
    u, j = results["uniform"][0].get(part), results["jest"][0].get(part)
    print(row(part, [f"{u:.4f}" if u is not None else "-", f"{j:.4f}" if j is not None else "-",
                     f"{j / jt:.1%}" if j is not None else "-"]))
  ut = sum(results["uniform"][0].values())
  print(row("step total", [f"{ut:.4f}", f"{jt:.4f}", "100%"]))
  print(row("examples/s (trained)", [f"{b / ut:.1f}", f"{b / jt:.1f}", ""]))
  print(row("JEST / uniform time", ["1.00", f"{jt / ut:.2f}", ""]))
  print(f"selection share of the JEST step: {results['jest'][0]['selection'] / jt:.1%} "
        f"(selection + scoring + reference: "
        f"{sum(results['jest'][0].get(k, 0) for k in ('scoring', 'reference', 'selection')) / jt:.1%})")
  print()
  print(row("FLOPs per step", ["uniform XLA", "uniform model", "JEST XLA", "JEST model",
                              "JEST XLA/model"]))
  for part in ("scoring", "reference", "selection", "train"):
    cells = []
    for name in ("uniform", "jest"):
      x, m = results[name][1].get(part), results[name][2].get(part, 0.0)
      cells += [f"{x:.3g}" if x is not None else "-", f"{m:.3g}" if m else "-"]
    x, m = results["jest"][1].get(part), results["jest"][2].get(part, 0.0)
    cells.append(f"{x / m:.2f}" if x is not None and m else "-")
    print(row(part, cells))
  tot = []
  for name in ("uniform", "jest"):
    tot += [f"{sum(results[name][1].values()):.3g}", f"{results[name][2]['total']:.3g}"]
  tot.append(f"{sum(results['jest'][1].values()) / results['jest'][2]['total']:.2f}")
  print(row("total", tot))
  # Checked with chunks=4 and 16: XLA's figure equals one chunk's N × c pair blocks.
  print("XLA's cost_analysis counts a loop body once: its selection figure is one of the "
        "n_chunks - 1 chunk updates")
  if tmp is not None:
    tmp.cleanup()
  return 0
