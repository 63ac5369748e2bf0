"""`jest-pod bench data [--data DIR] [--steps N]`: the Grain pipeline's figures.

1. examples/s per host at worker_count 0, 1, 2 (median of repeats after a warm-up) on
   DIR, or on the virtual source if no DIR is given;
2. the 2^33-record virtual pipeline: start-up (fresh process: imports + build + first
   batch) and its peak RSS;
3. the time to restore an iterator at position 1e9 vs at 0 and read one batch.
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

_STARTUP_SCRIPT = """
import json, resource, sys, time
t0 = time.perf_counter()
from jest_pod.data import pipeline
t1 = time.perf_counter()
c = pipeline.default_input_config()
c.data, c.tokenizer, c.image_size = "virtual", sys.argv[1], int(sys.argv[3])
it = pipeline.make_train_iterator(c, global_batch_size=int(sys.argv[2]), seed=0,
                                  process_index=0, process_count=1)
next(it)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_batch_s": t2 - t1,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _virtual_tokenizer(workdir: str) -> str:
  """A small sentencepiece model for the virtual source's captions."""
  from jest_pod.data import tokenizer, virtual  # pylint: disable=g-import-not-at-top
  texts = [virtual.record(i).text for i in range(0, 64_000, 16)]
  return tokenizer.train_tokenizer(texts, os.path.join(workdir, "virtual_tok"), 128)


def _throughput(config, batch: int, steps: int, repeats: int, warmup: int) -> dict:
  from jest_pod.data import pipeline  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  it = pipeline.make_train_iterator(config, global_batch_size=batch, seed=0,
                                    process_index=0, process_count=1)
  for _ in range(warmup):  # worker start-up and first fills are not throughput
    next(it)
  warm_s = time.perf_counter() - t
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      next(it)
    rates.append(steps * batch / (time.perf_counter() - t))
  if hasattr(it, "close"):
    it.close()
  return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
          "warmup_s": warm_s}


def _restore_time(config, batch: int, position: int, repeats: int = 5) -> float:
  from jest_pod.data import pipeline  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(repeats):
    it = pipeline.make_train_iterator(config, global_batch_size=batch, seed=0,
                                      process_index=0, process_count=1)
    t = time.perf_counter()
    it.set_state({"next_index": position})  # worker_count 0: the state is the position
    next(it)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


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
  p.add_argument("--workers", default="0,1,2", help="worker counts to measure")
  args = p.parse_args(argv)

  from jest_pod.data import pipeline  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="jest_pod_bench_data_")
  vtok = _virtual_tokenizer(workdir)
  config = pipeline.default_input_config()
  config.data = args.data or "virtual"
  config.tokenizer = args.tokenizer or ("" if args.data else vtok)
  config.image_size = args.image_size

  print(f"jest-pod bench data: {config.data}, host batch {args.batch}, image "
        f"{args.image_size}², {args.repeats}×{args.steps} batches after {args.warmup} "
        f"warm-up, {os.cpu_count()} CPUs")
  rows = []
  for w in [int(x) for x in args.workers.split(",")]:
    config.worker_count = w
    r = _throughput(config, args.batch, args.steps, args.repeats, args.warmup)
    rows.append((w, r))
  print(f"\n{'workers':>8} {'examples/s (median)':>20} {'min':>8} {'max':>8} {'warm-up s':>10}")
  for w, r in rows:
    print(f"{w:>8} {r['median']:>20.0f} {r['min']:>8.0f} {r['max']:>8.0f} "
          f"{r['warmup_s']:>10.2f}")

  # 2^33 records: a fresh process, so that RSS is the pipeline's alone.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
      + [x for x in [os.environ.get("PYTHONPATH")] if x]))
  out = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, vtok, str(args.batch),
                        str(args.image_size)], capture_output=True, text=True, env=env,
                       check=True)
  s = json.loads(out.stdout.strip().splitlines()[-1])
  vconfig = pipeline.default_input_config()
  vconfig.data, vconfig.tokenizer, vconfig.image_size = "virtual", vtok, args.image_size
  r0 = _restore_time(vconfig, args.batch, 0)
  r9 = _restore_time(vconfig, args.batch, 10**9)
  print(f"\n2^33-record virtual pipeline (fresh process, worker_count 0):")
  print(f"  {'imports':<36} {s['import_s']:8.2f} s")
  print(f"  {'build + first batch':<36} {s['first_batch_s']:8.2f} s")
  print(f"  {'peak RSS':<36} {s['peak_rss'] / 2**20:8.0f} MiB")
  print(f"  {'restore at position 0 + 1 batch':<36} {r0 * 1e3:8.1f} ms")
  print(f"  {'restore at position 1e9 + 1 batch':<36} {r9 * 1e3:8.1f} ms")
  return 0
