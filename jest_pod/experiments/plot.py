"""`jest-pod plot`: learning curves of several runs on one figure.

    jest-pod plot RUN_DIR [RUN_DIR ...] --metric z/0shot/fashion_top1 \\
        --x examples|flops|steps [--log-x] --output fig.png

Reads each run's WORKDIR/metrics.jsonl (one JSON object per log event: step, examples,
flops, metrics...) and WORKDIR/config.json (for the legend: selection method, score,
filter ratio). The point of the figure is the paper's: quality per example and per FLOP,
so `--x flops` counts every pass (training, scoring, reference) as the run logged them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib
import matplotlib.pyplot as plt

X_KEYS = {"examples": "examples", "flops": "flops", "steps": "step",
          "seconds": "time/train_elapsed_s"}
X_LABELS = {"examples": "training examples seen", "flops": "FLOPs (training + scoring + reference)",
            "steps": "step", "seconds": "training wall-clock seconds (evaluations left out)"}


class PlotError(ValueError):
  """A run directory or metric that cannot be plotted; the message says why."""


def read_metrics(run_dir: str) -> list[dict]:
  """WORKDIR/metrics.jsonl → list of events, in step order. A torn last line (run still
  writing) is skipped; an event that a resumed run logged again (same step, same metric
  names) appears once, as its last copy. The one reader of metrics files."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"{run_dir}: no metrics.jsonl (is this a run's WORKDIR?)")
  events = []
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      events.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        continue
      raise PlotError(f"{path}:{i + 1}: not JSON ({e})") from e
  latest = {(e.get("step"), tuple(sorted(k for k in e if "/" in k))): e for e in events}
  return sorted(latest.values(), key=lambda e: e.get("step", 0))


def read_config(run_dir: str) -> dict:
  """WORKDIR/config.json as a dict ({} when absent: the legend then shows the folder name)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def describe_run(config: dict) -> str:
  """'joint learnability f=0.8' / 'uniform' from config.selection (absent keys tolerated)."""
  sel = config.get("selection") or {}
  method = sel.get("method")
  if not method:
    return ""
  if method == "uniform":
    return "uniform"
  parts = [method]
  if sel.get("score"):
    parts.append(sel["score"])
  if sel.get("filter_ratio") is not None:
    parts.append(f"f={sel['filter_ratio']:g}")
  return " ".join(parts)


def curve(events: list[dict], metric: str, x: str, run_dir: str = "") -> tuple[list, list]:
  """(xs, ys) of `metric` against `x` ∈ {examples, flops, steps}, sorted by x."""
  key = X_KEYS[x]
  with_metric = [e for e in events if metric in e and e[metric] is not None]
  if not with_metric:
    available = sorted({k for e in events for k in e} - {"step", "examples", "flops"})
    raise PlotError(f"{run_dir}: metric {metric!r} was never logged; available: "
                    f"{', '.join(available) or '(none)'}")
  pts = [(e[key], e[metric]) for e in with_metric if e.get(key) is not None]
  if not pts:
    raise PlotError(f"{run_dir}: the events with {metric!r} have no {key!r} field for --x {x}")
  pts.sort(key=lambda p: p[0])
  return [p[0] for p in pts], [float(p[1]) for p in pts]


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
  matplotlib.use("Agg")
  return plt


def plot_runs(run_dirs: list[str], metric: str, x: str, output: str, *, log_x: bool = False,
              labels: list[str] | None = None, title: str | None = None) -> str:
  """Draw one line per run; returns the output path."""
  plt = pyplot()
  if labels and len(labels) != len(run_dirs):
    raise PlotError(f"--labels has {len(labels)} names for {len(run_dirs)} runs")
  curves = []
  for i, run_dir in enumerate(run_dirs):
    xs, ys = curve(read_metrics(run_dir), metric, x, run_dir)
    name = os.path.basename(os.path.normpath(run_dir))
    desc = describe_run(read_config(run_dir))
    label = labels[i] if labels else (f"{name}: {desc}" if desc and desc != name else name)
    if log_x:
      xs, ys = [a for a, _ in zip(xs, ys) if a > 0], [b for a, b in zip(xs, ys) if a > 0]
    curves.append((label + f" (final {ys[-1]:.4g})" if ys else label, xs, ys))

  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
  for label, xs, ys in curves:
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.6,
            label=label)
  if log_x:
    ax.set_xscale("log")  # points at x = 0 (the first eval) cannot be shown and are dropped
  ax.set_xlabel(X_LABELS[x])
  ax.set_ylabel(metric)
  ax.set_title(title or f"{metric} vs {x}")
  ax.grid(True, alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output)
  plt.close(fig)
  return output


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="jest-pod plot", description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run WORKDIRs (metrics.jsonl)")
  p.add_argument("--metric", required=True, help="e.g. z/0shot/<set>_top1 or train/loss")
  p.add_argument("--x", choices=sorted(X_KEYS), default="examples")
  p.add_argument("--log-x", action="store_true", help="log-scale x (useful with --x flops)")
  p.add_argument("--labels", nargs="+", default=None, help="legend names, one per run")
  p.add_argument("--title", default=None)
  p.add_argument("--output", default="curves.png")
  args = p.parse_args(argv)
  try:
    out = plot_runs(args.runs, args.metric, args.x, args.output, log_x=args.log_x,
                    labels=args.labels, title=args.title)
  except PlotError as e:
    print(f"jest-pod plot: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
