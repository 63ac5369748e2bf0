"""`jest-pod bench data [--data DIR] [--steps N]`: the Grain pipeline's figures.

1. examples/s per host at worker_count 0 and auto (-1, resolved by
   `pipeline.resolve_worker_count`; median of repeats after a warm-up) on DIR, or on the
   virtual source if no DIR is given, with the cores the pipeline kept busy (CPU seconds
   of this process and its worker processes / wall seconds) and examples per CPU second;
2. the 2^33-record virtual pipeline: start-up (fresh process: imports + build + first
   batch) and its peak RSS;
3. the time to restore an iterator at position 1e9 vs at 0 and read one batch;
4. with --jest F[,F...] (a data set folder): the host CPU per *trained* example of a
   uniform step (B decoded), a JEST step reading every scored example (N = B / (1 − f)
   decoded), and a JEST step with two-phase input (phase 1: N positions, their token rows
   and score images, θ*'s cache rows with --reference-cache; phase 2: B records decoded),
   at worker_count 0; and the cores per accelerator that each implies at --rate trained
   examples/s (930: the best public CLIP trainer's per H100). The stores are built first
   when missing (`jest-pod data score-images`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from jest_pod.data import input_config, pipeline, reference_cache, score_images, token_rows
from jest_pod.data import tokenizer, two_phase, virtual

_STARTUP_SCRIPT = """
import json, resource, sys, time
t0 = time.perf_counter()
from jest_pod.data import input_config, pipeline
t1 = time.perf_counter()
c = input_config.default_input_config()
c.data, c.tokenizer, c.image_size = "virtual", sys.argv[1], int(sys.argv[3])
c.worker_count = 0
it = pipeline.make_train_iterator(c, global_batch_size=int(sys.argv[2]), seed=0,
                                  process_index=0, process_count=1)
next(it)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_batch_s": t2 - t1,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _virtual_tokenizer(workdir: str) -> str:
  """A small sentencepiece model for the virtual source's captions."""
  texts = [virtual.record(i).text for i in range(0, 64_000, 16)]
  return tokenizer.train_tokenizer(texts, os.path.join(workdir, "virtual_tok"), 128)


def _cpu_seconds() -> float:
  """CPU seconds (user + system) of this process and its live child processes (Grain's
  workers); without psutil, of this process only."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    t = os.times()
    return t.user + t.system
  total = 0.0
  me = psutil.Process()
  for p in [me] + me.children(recursive=True):
    try:
      c = p.cpu_times()
      total += c.user + c.system
    except psutil.Error:
      pass
  return total


def _throughput(config, batch: int, steps: int, repeats: int, warmup: int) -> dict:
  t = time.perf_counter()
  it = pipeline.make_train_iterator(config, global_batch_size=batch, seed=0,
                                    process_index=0, process_count=1)
  for _ in range(warmup):  # worker start-up and first fills are not throughput
    next(it)
  warm_s = time.perf_counter() - t
  rates, wall, cpu = [], 0.0, 0.0
  for _ in range(repeats):
    c, t = _cpu_seconds(), time.perf_counter()
    for _ in range(steps):
      next(it)
    dt = time.perf_counter() - t
    wall, cpu = wall + dt, cpu + _cpu_seconds() - c
    rates.append(steps * batch / dt)
  if hasattr(it, "close"):
    it.close()
  return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
          "warmup_s": warm_s, "cores": cpu / wall,
          "per_cpu_s": repeats * steps * batch / max(cpu, 1e-9)}


def _parse_workers(spec: str) -> list[int]:
  """'0,auto,2' -> [0, -1, 2] (auto = -1)."""
  return [-1 if x.strip() == "auto" else int(x) for x in spec.split(",") if x.strip()]


def _restore_time(config, batch: int, position: int, repeats: int = 5) -> float:
  times = []
  for _ in range(repeats):
    it = pipeline.make_train_iterator(config, global_batch_size=batch, seed=0,
                                      process_index=0, process_count=1)
    t = time.perf_counter()
    it.set_state({"next_index": position})  # worker_count 0: the state is the position
    next(it)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _cpu_per_step(next_step, steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    next_step()
  c = _cpu_seconds()
  for _ in range(steps):
    next_step()
  return (_cpu_seconds() - c) / steps


def _jest_input(args, config) -> list[tuple[str, float, float]]:
  """(row, f, CPU seconds per trained example) for uniform and JEST's two input paths."""
  key = score_images.Key(args.image_size, args.patch, args.score_patch)
  for line in score_images.ensure(args.data, key, args.max_text_len, args.tokenizer or None):
    print(f"built {line}")
  tok = tokenizer.resolve(config)
  phase1 = two_phase.Phase1(
      token_rows.open_store(token_rows.path_for(args.data, tok, args.max_text_len),
                            data_dir=args.data, tokenizer=tok, text_len=args.max_text_len,
                            rebuild=""),
      score_images.open_store(score_images.path_for(args.data, key), data_dir=args.data,
                              key=key))
  cache = (reference_cache.Store(args.reference_cache,
                                 reference_cache.read_meta(args.reference_cache), "")
           if args.reference_cache else None)
  reader = two_phase.SelectedReader(args.data, args.image_size)
  config.worker_count, config.max_text_len = 0, args.max_text_len
  b = args.batch
  it = pipeline.make_train_iterator(config, global_batch_size=b, seed=0)
  rows = [("uniform (B decoded)", 0.0, _cpu_per_step(lambda: next(it), args.steps) / b)]
  for f in args.jest:
    n = int(round(b / (1 - f)))
    full = pipeline.make_train_iterator(config, global_batch_size=n, seed=0)

    def full_step():
      batch = next(full)
      if cache:
        cache.lookup(batch["index"])

    light = pipeline.make_train_iterator(config, global_batch_size=n, seed=0,
                                         phase1=phase1.bad)
    pick = np.random.default_rng(0)

    def two_phase_step():
      batch = next(light)
      phase1.host_inputs(batch)
      if cache:
        cache.lookup(batch["index"])
      reader.read(pick.choice(batch["index"], b, replace=False))

    rows.append(("JEST, every scored example decoded", f,
                 _cpu_per_step(full_step, args.steps) / b))
    rows.append(("JEST, two-phase input", f, _cpu_per_step(two_phase_step, args.steps) / b))
  reader.close()
  return rows


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="jest-pod bench data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="", help="data set folder; default: the virtual source")
  p.add_argument("--tokenizer", default="", help="default: DIR/tokenizer.model")
  p.add_argument("--steps", type=int, default=20, help="batches per timed repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=3, help="batches read before timing")
  p.add_argument("--batch", type=int, default=64, help="host batch size")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--workers", default="0,auto",
                 help="worker counts to measure, comma-separated; auto = -1 (resolved)")
  p.add_argument("--no-virtual", action="store_true",
                 help="skip the 2^33-record start-up / restore figures")
  p.add_argument("--jest", default="", help="filter ratios, e.g. 0.8,0.9: host CPU per "
                 "trained example, uniform vs JEST's input paths (needs --data)")
  p.add_argument("--patch", type=int, default=score_images.SHIPPED.base_patch,
                 help="--jest: the learner's base patch")
  p.add_argument("--score-patch", type=int, default=score_images.SHIPPED.score_patch,
                 help="--jest: the patch it scores at")
  p.add_argument("--max-text-len", type=int, default=token_rows.SHIPPED_TEXT_LEN)
  p.add_argument("--reference-cache", default="",
                 help="--jest: θ*'s cache of --data, looked up for every scored example")
  p.add_argument("--rate", type=float, default=930.0,
                 help="--jest: trained examples/s per accelerator, for the cores it implies")
  args = p.parse_args(argv)
  args.jest = [float(f) for f in args.jest.split(",") if f.strip()]
  if args.jest and not args.data:
    p.error("--jest needs --data (a data set folder)")

  workdir = tempfile.mkdtemp(prefix="jest_pod_bench_data_")
  vtok = _virtual_tokenizer(workdir)
  config = input_config.default_input_config()
  config.data = args.data or "virtual"
  config.tokenizer = args.tokenizer or ("" if args.data else vtok)
  config.image_size = args.image_size

  print(f"jest-pod bench data: {config.data}, host batch {args.batch}, image "
        f"{args.image_size}², {args.repeats}×{args.steps} batches after {args.warmup} "
        f"warm-up, {pipeline.usable_cpus()} usable CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if args.jest:
    rows = _jest_input(args, config)
    print(f"\n{'input path':<36} {'f':>5} {'host CPU µs / trained example':>30} "
          f"{'× uniform':>10} {'cores at ' + format(args.rate, 'g') + '/s':>14}")
    for name, f, cpu in rows:
      print(f"{name:<36} {f:>5.2f} {cpu * 1e6:>30.0f} {cpu / rows[0][2]:>10.2f} "
            f"{cpu * args.rate:>14.2f}")
    return 0
  rows = []
  for w in _parse_workers(args.workers):
    config.worker_count = w
    r = _throughput(config, args.batch, args.steps, args.repeats, args.warmup)
    rows.append((w, r))
  print(f"\n{'workers':>10} {'examples/s (median)':>20} {'min':>8} {'max':>8} "
        f"{'warm-up s':>10} {'cores busy':>10} {'ex/CPU-s':>9}")
  for w, r in rows:
    name = f"auto={pipeline.resolve_worker_count(w)}" if w == -1 else str(w)
    print(f"{name:>10} {r['median']:>20.0f} {r['min']:>8.0f} {r['max']:>8.0f} "
          f"{r['warmup_s']:>10.2f} {r['cores']:>10.2f} {r['per_cpu_s']:>9.0f}")
  if args.no_virtual:
    return 0

  # 2^33 records: a fresh process, so that RSS is the pipeline's alone.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
      + [x for x in [os.environ.get("PYTHONPATH")] if x]))
  out = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, vtok, str(args.batch),
                        str(args.image_size)], capture_output=True, text=True, env=env,
                       check=True)
  s = json.loads(out.stdout.strip().splitlines()[-1])
  vconfig = input_config.default_input_config()
  vconfig.data, vconfig.tokenizer, vconfig.image_size = "virtual", vtok, args.image_size
  vconfig.worker_count = 0  # the state below is worker_count 0's: {"next_index": ...}
  r0 = _restore_time(vconfig, args.batch, 0)
  r9 = _restore_time(vconfig, args.batch, 10**9)
  print("\n2^33-record virtual pipeline (fresh process, worker_count 0):")
  print(f"  {'imports':<36} {s['import_s']:8.2f} s")
  print(f"  {'build + first batch':<36} {s['first_batch_s']:8.2f} s")
  print(f"  {'peak RSS':<36} {s['peak_rss'] / 2**20:8.0f} MiB")
  print(f"  {'restore at position 0 + 1 batch':<36} {r0 * 1e3:8.1f} ms")
  print(f"  {'restore at position 1e9 + 1 batch':<36} {r9 * 1e3:8.1f} ms")
  return 0
