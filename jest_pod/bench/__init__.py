"""`jest-pod bench <what>`: benchmarks whose figures go into WORKSPACE_NOTES.md.

  data       Grain pipeline throughput per host; 2^33-record start-up and memory
  selection  joint selection time and memory vs super-batch size on the mesh
  step       JEST step time split vs a uniform step at the same B
"""

import importlib
import sys

WHAT = {"data": "jest_pod.bench.data", "selection": "jest_pod.bench.selection",
        "step": "jest_pod.bench.step"}


def main(argv):
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  if argv[0] not in WHAT:
    print(f"jest-pod bench: unknown benchmark {argv[0]!r}; choose one of {', '.join(WHAT)}",
          file=sys.stderr)
    return 2
  return int(importlib.import_module(WHAT[argv[0]]).main(argv[1:]) or 0)
