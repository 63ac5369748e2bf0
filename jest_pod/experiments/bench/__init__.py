"""`jest-pod bench [what]`: benchmarks whose figures go into WORKSPACE_NOTES.md.

  all        (the default) step, then selection, with their defaults
  data       Grain pipeline throughput per host; 2^33-record start-up and memory
  load       public-format SigLIP checkpoints (B/16, So400m/14): load time, peak memory;
             cache-reference throughput with an imported reference
  score-images  the stored forms of JEST's score images: bytes, host CPU, fidelity, and
             the overlap of the selection with exact scoring
  selection  joint selection time and memory vs super-batch size on the mesh
  step       JEST step time split vs a uniform step at the same B; measured vs modelled FLOPs

`jest-pod bench <what> --help` for each one's options.
"""

import importlib
import sys

WHAT = {"data": "jest_pod.experiments.bench.data", "load": "jest_pod.experiments.bench.load",
        "score-images": "jest_pod.experiments.bench.score_images",
        "selection": "jest_pod.experiments.bench.selection",
        "step": "jest_pod.experiments.bench.step"}
ALL = ("step", "selection")


def main(argv):
  if argv and argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  if not argv or argv[0] == "all":
    if argv[1:]:
      print("jest-pod bench all takes no options; pass them to one benchmark, e.g. "
            "`jest-pod bench step --repeats 9`", file=sys.stderr)
      return 2
    rc = 0
    for what in ALL:
      print(f"\n== jest-pod bench {what} ==", flush=True)
      rc = max(rc, int(importlib.import_module(WHAT[what]).main([]) or 0))
    return rc
  if argv[0] not in WHAT:
    print(f"jest-pod bench: unknown benchmark {argv[0]!r}; choose one of all, "
          f"{', '.join(WHAT)}", file=sys.stderr)
    return 2
  return int(importlib.import_module(WHAT[argv[0]]).main(argv[1:]) or 0)
