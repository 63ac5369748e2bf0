#!/usr/bin/env python3
"""Peak host memory of a JEST run against config.check_host_memory's estimate, across f.

  .venv/bin/python tools/measure_super_batch_memory.py --batch 512 --f 0,0.5,0.8,0.9,0.95

Each f runs a 2-step `configs/jest.py:runlocal` run (hard_learner: no reference needed;
f = 0 is a uniform run at B, the baseline) in its own process on CPU devices, on a 32²
toy pool (built once under --work), and reports that process's peak RSS
(resource.getrusage ru_maxrss) beside the estimate (config.super_batch_host_bytes). The
super-batch's share of the peak is the peak minus the baseline's; the estimate should be
within 1.5× of it (tests/test_config.py keeps the table measured for issue 32).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from jest_pod import config as config_lib
from jest_pod.train import main as train_main
f, batch, data, wd = {f!r}, {batch!r}, {data!r}, {wd!r}
c = config_lib.load({root!r} + "/configs/jest.py", f"runlocal,data={{data}},steps=2,"
                    f"batch={{batch}},method={{'uniform' if f == 0 else 'joint'}},"
                    f"score=hard_learner,f={{f or 0.5}}")
c.input.worker_count, c.log_every, c.time_split_every = 0, 1, 0
need, per, held = config_lib.super_batch_host_bytes(c, cpu_devices=True)
train_main.train(c, wd)
print(json.dumps({{"f": f, "B": batch, "N": config_lib.resolve(c).super_batch,
                  "estimate": need,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--f", default="0,0.5,0.8,0.9,0.95", help="comma-separated; 0 = uniform")
  p.add_argument("--work", default="/tmp/jest_pod_memory")
  args = p.parse_args(argv)
  sys.path.insert(0, ROOT)
  data = os.path.join(args.work, "data")
  if not os.path.exists(os.path.join(data, "web", "manifest.json")):
    from jest_pod.data.toy import build_toy
    build_toy(os.path.join(data, "web"), 1024, noise=0.2, image_size=32)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rows = []
  for f in (float(x) for x in args.f.split(",")):
    wd = os.path.join(args.work, f"run_{args.batch}_{f}")
    subprocess.run(["rm", "-rf", wd], check=True)
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, f=f, batch=args.batch,
                                                             data=data, wd=wd)],
                         env=env, capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  base = next((r["peak_rss"] for r in rows if r["f"] == 0), None)
  print(f"{'f':>6} {'N':>7} {'estimate GB':>12} {'peak RSS GB':>12} {'peak-base GB':>13} ratio")
  for r in rows:
    extra = r["peak_rss"] - base if base is not None and r["f"] else None
    ratio = f"{r['estimate'] / extra:.2f}" if extra and extra > 0 else "-"
    print(f"{r['f']:>6g} {r['N']:>7} {r['estimate'] / 1e9:>12.3f} {r['peak_rss'] / 1e9:>12.3f} "
          f"{(extra / 1e9 if extra is not None else float('nan')):>13.3f} {ratio}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
