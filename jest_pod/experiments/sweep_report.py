"""The sweep's analysis: crossing points, FLOPs in two views, tables and figures.

Pure functions of the runs' metrics.jsonl (read by `plot.read_metrics`) and configs;
`jest_pod.experiments.sweep` trains the runs and calls these. One definition of "examples to reach
a target" (`examples_to_reach`), shared with `jest-pod demo`'s report.

FLOPs are counted as the paper counts them, in two views side by side:
  charged    every training pass plus, per step, the learner's scoring forward over the
             super-batch and the reference's forward over it (charged per scored example
             even though the runs read those embeddings from a cache)
  amortised  the same without the reference forward: its embeddings are computed once
             (the cache) and reused by every run, as a pretrained reference is; the
             cache's own cost is reported once, beside the tables
"+ref training" adds the reference's own training to the charged view.
"""

from __future__ import annotations

import json
import math

import numpy as np

from jest_pod import config as config_lib
from jest_pod.evaluators import base as evaluators_base
from jest_pod.experiments import plot


def metric_keys(events: list[dict]) -> dict[str, tuple[str, ...]]:
  """The scores whose targets the report reaches, named by evaluation set (the sets differ
  per pool: demo eval_fashion + eval_retrieval; icons eval_flags, eval_retrieval, eval_web)
  → their logged key(s): each evaluator type's headline (`evaluators.base.headlines`:
  zero-shot top-1 per labelled set, retrieval recall@5 both ways per retrieval set)."""
  return evaluators_base.headlines({k for e in events for k in e})


# The axes a target is reached on: each evaluation record carries them (train/main.py).
AXES = {"examples": "examples", "flops": "flops", "flops_amortised": "flops_amortised",
        "seconds": "time/train_elapsed_s"}


def _series(events: list[dict], keys: tuple[str, ...]) -> dict[str, list[float]]:
  """{"values": the metric (or the mean of several) at each evaluation, and per AXES the
  examples, FLOPs (charged, amortised) and training seconds at it}, in examples order."""
  pts = sorted((e["examples"], i) for i, e in enumerate(events) if all(k in e for k in keys))
  out = {"values": [float(np.mean([events[i][k] for k in keys])) for _, i in pts]}
  for axis, key in AXES.items():
    out[axis] = [float(events[i].get(key, float("nan"))) for _, i in pts]
  return out


def crossing(ys, target: float) -> tuple[int, float] | None:
  """(i, t): the curve first reaches `target` between evaluation i − 1 and i, at fraction
  t of the way (linear interpolation; i = 0, t = 1 when the first evaluation reaches it);
  None if it never does."""
  for i, y in enumerate(ys):
    if y >= target:
      return (0, 1.0) if i == 0 else (i, (target - ys[i - 1]) / (y - ys[i - 1]))
  return None


def at_crossing(xs, hit: tuple[int, float]) -> float:
  """The axis value `xs` at a `crossing`."""
  i, t = hit
  return float(xs[i]) if i == 0 else float(xs[i - 1] + (xs[i] - xs[i - 1]) * t)


def examples_to_reach(xs: np.ndarray, ys: np.ndarray, target: float) -> float | None:
  """Training examples at which the curve first reaches `target`, linearly interpolated
  between the two evaluations around the crossing; None if it never does."""
  hit = crossing(ys, target)
  return None if hit is None else at_crossing(xs, hit)


def _mean_sd(values) -> tuple[float, float]:
  v = [x for x in values if x is not None and math.isfinite(x)]
  if not v:
    return float("nan"), float("nan")
  return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _pm(values, fmt="{:.3f}") -> str:
  m, s = _mean_sd(values)
  if not math.isfinite(m):
    return "–"
  return f"{fmt.format(m)} ± {fmt.replace('+', '').format(s)}"


def _damage_shares(events: list[dict]) -> dict[str, tuple[float, float]]:
  """damage kind → (mean selected share, mean pool share) over the run's logged steps,
  summed over origins (source '<origin>' is clean, '<origin>:<damage>' damaged)."""
  sums: dict[str, list[float]] = {}
  steps = [e for e in events if any(k.startswith("select/share/") for k in e)]
  for e in steps:
    per = {}
    for k, v in e.items():
      for side in ("select", "pool"):
        if k.startswith(f"{side}/share/"):  # {side}/share/<origin>[/<damage>]
          parts = k.split("/")[2:]
          kind = parts[1] if len(parts) > 1 else "clean"
          per.setdefault(kind, [0.0, 0.0])[side == "pool"] += v
    for kind, (sel, pool) in per.items():
      acc = sums.setdefault(kind, [0.0, 0.0])
      acc[0] += sel / len(steps)
      acc[1] += pool / len(steps)
  return {k: (v[0], v[1]) for k, v in sums.items()}


def summarise_run(config, out_dir: str, ref_train_flops: float = 0.0) -> dict:
  """One finished run: its curves on every axis, totals, the host's load while it ran.
  `ref_train_flops`: the training FLOPs of the reference it used (0 for none)."""
  events = plot.read_metrics(out_dir)
  curves = {m: _series(events, keys) for m, keys in metric_keys(events).items()}
  learn = [(e.get("select/learnability_selected"), e.get("select/learnability_super_batch"))
           for e in events if "select/learnability_selected" in e]
  logged = [e for e in events if "train/loss" in e]
  last = logged[-1] if logged else {}
  steps = int(last.get("step", 0))
  load = [e["host/load1"] for e in logged if math.isfinite(e.get("host/load1", math.nan))]
  uses_reference = config_lib.resolve(config).needs_reference
  return {
      "run_dir": out_dir, "seed": config.seed, "batch": config.batch_size,
      # The reference's training is charged in "+ref" when the run needed one.
      "uses_reference": uses_reference,
      "reference_training_flops": ref_train_flops if uses_reference else 0.0,
      "steps": steps,
      "total": {axis: float(last.get(key, math.nan)) for axis, key in AXES.items()},
      "flops_per_step": last.get("flops", math.nan) / max(steps, 1),  # charged, mean
      "flops_per_step_amortised": last.get("flops_amortised", math.nan) / max(steps, 1),
      "load": float(np.mean(load)) if load else math.nan,
      "curves": curves,
      "final": {m: c["values"][-1] if c["values"] else math.nan for m, c in curves.items()},
      "learnability": ([float(np.mean([a for a, _ in learn])),
                        float(np.mean([c for _, c in learn]))] if learn else None),
      "damage": _damage_shares(events),
  }


def analyse(runs: dict, baselines: dict[str, str]) -> dict:
  """Per variant: finals and examples / FLOPs / wall-clock seconds to reach its baseline's
  mean final scores (`baselines`: variant → baseline variant, uniform with the same pool
  and batch), each as a fraction (multiple) of the baseline's run; seconds also absolute.
  `noise`: the spread of each variant's training seconds over seeds (the same work, so
  the spread is the machine's)."""
  metrics = sorted({m for seeds in runs.values() for r in seeds.values() for m in r["final"]})

  def base_stats(name):
    uni = runs.get(name, {}).values()
    totals = {axis: _mean_sd([r["total"][axis] for r in uni])[0] for axis in AXES}
    return {m: _mean_sd([r["final"].get(m) for r in uni])[0] for m in metrics}, totals

  targets, uni_totals = base_stats("uniform")
  out = {"metrics": metrics, "targets": targets, "uniform_totals": uni_totals,
         "uniform_flops": uni_totals["flops"], "variants": {}}
  for name, seeds in runs.items():
    base = baselines.get(name, "uniform")
    tg, base_totals = base_stats(base)
    order = sorted(seeds)
    row = {"seeds": order, "baseline": base, "targets": tg, "final": {}, "reach": {}}
    for m in metrics:
      row["final"][m] = [seeds[s]["final"].get(m) for s in order]
      cells = {"examples_frac": [], "flops_ratio": [], "flops_ratio_amortised": [],
               "flops_ratio_incl_ref": [], "seconds_ratio": [], "seconds": []}
      for s in order:
        r = seeds[s]
        c = r["curves"].get(m)
        hit = crossing(c["values"], tg[m]) if c else None
        at = {axis: None if hit is None else at_crossing(c[axis], hit) for axis in AXES}
        cells["examples_frac"].append(at["examples"] and at["examples"] / base_totals["examples"])
        cells["flops_ratio"].append(at["flops"] and at["flops"] / base_totals["flops"])
        cells["flops_ratio_amortised"].append(
            at["flops_amortised"] and at["flops_amortised"] / base_totals["flops"])
        cells["flops_ratio_incl_ref"].append(
            None if hit is None else (at["flops"] + r["reference_training_flops"])
            / base_totals["flops"])
        cells["seconds_ratio"].append(at["seconds"] and at["seconds"] / base_totals["seconds"])
        cells["seconds"].append(at["seconds"])
      row["reach"][m] = {**cells, "reached": sum(x is not None for x in cells["examples_frac"]),
                         "of": len(order)}
    row["learnability"] = [seeds[s]["learnability"] for s in order if seeds[s]["learnability"]]
    row["damage"] = {s: seeds[s]["damage"] for s in order}
    for k in ("flops_per_step", "flops_per_step_amortised"):
      row[k] = float(np.mean([r[k] for r in seeds.values()]))
    row["seconds"] = [seeds[s]["total"]["seconds"] for s in order]
    row["load"] = [seeds[s]["load"] for s in order]
    out["variants"][name] = row
  return out


RUNS_AT_ONCE_NOTE = ("which ran its runs side by side (`--jobs`), so each run's seconds "
                     "include its neighbour's share of the cores.")


def machine_line(runs: dict) -> str:
  """The CPU the runs' run_info.json names, and the load they saw (1-min, mean over logs)."""
  cpus, loads = set(), []
  for seeds in runs.values():
    for r in seeds.values():
      try:
        with open(f"{r['run_dir']}/run_info.json") as f:
          cpu = json.load(f).get("cpu") or {}
        cpus.add(f"{cpu.get('model')} ({cpu.get('usable')} of {cpu.get('count')} cores)")
      except (OSError, ValueError):
        pass
      if math.isfinite(r["load"]):
        loads.append(r["load"])
  where = ", ".join(sorted(cpus)) or "machine not recorded"
  load = (f"1-min load {min(loads):.1f}–{max(loads):.1f} (per-run means)" if loads
          else "load not recorded")
  return f"Machine: {where}; {load}."


def noise_table(analysis: dict, labels: dict[str, str]) -> str:
  """Each variant's training wall-clock over seeds: the machine's noise (same work)."""
  lines = ["| variant | training seconds, mean ± sd | sd / mean | mean 1-min load |",
           "|---|---|---|---|"]
  for name, label in labels.items():
    row = analysis["variants"].get(name)
    if not row:
      continue
    m, sd = _mean_sd(row["seconds"])
    cv = f"{sd / m:.1%}" if math.isfinite(m) and m > 0 and len(row["seconds"]) > 1 else "–"
    lines.append(f"| {label} | {_pm(row['seconds'], '{:.0f}')} | {cv} | "
                 f"{_pm(row['load'], '{:.1f}')} |")
  return "\n".join(lines)


# ------------------------------------------------------------------ tables and figures

def _reach_cell(reach: dict, key: str, fmt: str = "{:.2f}") -> str:
  vals = [v for v in reach[key] if v is not None]
  if not vals:
    return f"not reached (0/{reach['of']})"
  cell = _pm(vals, fmt)
  if reach["reached"] < reach["of"]:
    cell += f" ({reach['reached']}/{reach['of']} reached)"
  return cell


def quality_table(analysis: dict, labels: dict[str, str]) -> str:
  """Final scores per variant and metric (`labels`: the variants shown, in order)."""
  metrics = analysis["metrics"]
  lines = ["| variant | " + " | ".join(f"final {m}" for m in metrics) + " |",
           "|---|" + "---|" * len(metrics)]
  for name, label in labels.items():
    row = analysis["variants"].get(name)
    if row:
      lines.append(f"| {label} | " + " | ".join(_pm(row["final"][m]) for m in metrics) + " |")
  return "\n".join(lines)


def reach_table(analysis: dict, labels: dict[str, str], metric: str) -> str:
  """What each variant needs to reach its baseline's final `metric`: examples (fraction
  of the baseline's), FLOPs (multiple of the baseline's) in both views, and wall-clock
  training seconds on this machine (multiple of the baseline's, and absolute)."""
  lines = ["| variant | examples to reach | FLOPs, charged | FLOPs, amortised | charged + "
           "reference training | wall-clock (× baseline's) | wall-clock seconds |",
           "|---|---|---|---|---|---|---|"]
  for name, label in labels.items():
    row = analysis["variants"].get(name)
    if not row or row["baseline"] == name:  # a baseline defines the target
      continue
    r = row["reach"][metric]
    lines.append(f"| {label} | {_reach_cell(r, 'examples_frac')} | "
                 f"{_reach_cell(r, 'flops_ratio')} | {_reach_cell(r, 'flops_ratio_amortised')} "
                 f"| {_reach_cell(r, 'flops_ratio_incl_ref')} | "
                 f"{_reach_cell(r, 'seconds_ratio')} | {_reach_cell(r, 'seconds', '{:.0f}')} |")
  return "\n".join(lines)


def learnability_table(analysis: dict, labels: dict[str, str]) -> str:
  lines = ["| variant | learnability of selected batch | of super-batch | FLOPs/step "
           "(× its baseline's), charged | amortised |", "|---|---|---|---|---|"]
  for name, label in labels.items():
    row = analysis["variants"].get(name)
    if not row or row["baseline"] == name:
      continue
    uni = analysis["variants"].get(row["baseline"], {}).get("flops_per_step", float("nan"))
    le = row["learnability"]
    sel = _pm([a for a, _ in le], "{:+.2f}") if le else "–"
    sup = _pm([b for _, b in le], "{:+.2f}") if le else "–"
    lines.append(f"| {label} | {sel} | {sup} | {row['flops_per_step'] / uni:.2f} | "
                 f"{row['flops_per_step_amortised'] / uni:.2f} |")
  return "\n".join(lines)


def damage_table(analysis: dict, labels: dict[str, str]) -> tuple[str, dict]:
  kinds = sorted({k for name in labels for d in
                  analysis["variants"].get(name, {}).get("damage", {}).values() for k in d})
  kinds = [k for k in kinds if k != "clean"] + (["clean"] if "clean" in kinds else [])
  ratios = {}
  lines = ["| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
  pool = {}
  for name, label in labels.items():
    row = analysis["variants"].get(name)
    if not row:
      continue
    cells = []
    for k in kinds:
      r = [d[k][0] / d[k][1] for d in row["damage"].values() if k in d and d[k][1] > 0]
      pool.setdefault(k, []).extend(d[k][1] for d in row["damage"].values() if k in d)
      ratios.setdefault(name, {})[k] = r
      cells.append(_pm(r, "{:.2f}") + "×")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("| (pool share) | " + " | ".join(f"{np.mean(pool.get(k, [np.nan])):.3f}"
                                                 for k in kinds) + " |")
  return "\n".join(lines), ratios


# The figures' rows: the score against each axis.
ROWS = (("examples", "training examples"), ("flops_amortised", "FLOPs (amortised)"),
        ("seconds", "training wall-clock seconds (this machine)"))


def plot_curves(analysis, runs, labels: dict[str, str], path, title):
  """One column per metric: the score against training examples, amortised FLOPs and
  training wall-clock seconds (rows); mean over seeds, band = min–max."""
  plt = plot.pyplot()
  metrics = analysis["metrics"]
  fig, axes = plt.subplots(len(ROWS), len(metrics), figsize=(5.2 * len(metrics), 11.5),
                           dpi=100, squeeze=False)
  for col, metric in enumerate(metrics):
    for ax, (axis, xlabel) in zip(axes[:, col], ROWS):
      for name, label in labels.items():
        seeds = runs.get(name)
        curves = [seeds[s]["curves"][metric] for s in sorted(seeds or {})
                  if metric in seeds[s]["curves"]]
        if not curves:
          continue
        n = min(len(c["values"]) for c in curves)
        ys = np.array([c["values"][:n] for c in curves])
        xs = np.array([c[axis][:n] for c in curves]).mean(0)  # seconds differ per seed
        row = analysis["variants"].get(name, {})
        baseline = row.get("baseline") == name  # a uniform run: others' targets
        style = dict(linestyle="--") if baseline else {}
        if name == "uniform":
          style["color"] = "black"
        line, = ax.plot(xs, ys.mean(0), marker="o", markersize=2.5, linewidth=1.5,
                        label=f"{label} (n={len(curves)})", **style)
        ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15, color=line.get_color())
        if baseline:
          ax.axhline(row["targets"][metric], color=line.get_color(), linewidth=0.8,
                     linestyle=":")
      ax.set_xlabel(xlabel)
      ax.set_title(metric, fontsize=9)
      ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{title}\nmean over seeds, band = min–max; dashed = a baseline (uniform), "
               "dotted = its final", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_damage(ratios: dict, labels: dict[str, str], path: str) -> str:
  plt = plot.pyplot()
  names = list(ratios)
  kinds = sorted({k for r in ratios.values() for k in r})
  fig, ax = plt.subplots(figsize=(11, 4.2), dpi=100)
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    means = [np.mean(ratios[name].get(k) or [np.nan]) for k in kinds]
    err = [np.std(ratios[name][k], ddof=1) if len(ratios[name].get(k, [])) > 1 else 0
           for k in kinds]
    ax.bar(np.arange(len(kinds)) + i * width, means, width, yerr=err, capsize=2,
           label=labels[name])
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
  ax.set_ylabel("share among selected / share in pool")
  ax.set_title("What selection keeps (1 = as often as in the pool; mean ± sd over seeds)")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
