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

import math

import numpy as np

from jest_pod.evaluators import base as evaluators_base
from jest_pod.experiments import plot


def metric_keys(events: list[dict]) -> dict[str, tuple[str, ...]]:
  """The scores whose targets the report reaches, named by evaluation set (the sets differ
  per pool: demo eval_fashion + eval_retrieval; icons eval_flags, eval_retrieval, eval_web)
  → their logged key(s): each evaluator type's headline (`evaluators.base.headlines`:
  zero-shot top-1 per labelled set, retrieval recall@5 both ways per retrieval set)."""
  return evaluators_base.headlines({k for e in events for k in e})


def _series(events: list[dict], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(examples, values) of one metric (or the mean of several) at each evaluation."""
  pts = [(e["examples"], float(np.mean([e[k] for k in keys])))
         for e in events if all(k in e for k in keys)]
  pts.sort()
  return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def examples_to_reach(xs: np.ndarray, ys: np.ndarray, target: float) -> float | None:
  """Training examples at which the curve first reaches `target`, linearly interpolated
  between the two evaluations around the crossing; None if it never does."""
  for i, (x, y) in enumerate(zip(xs, ys)):
    if y >= target:
      if i == 0:
        return float(x)
      x0, y0 = xs[i - 1], ys[i - 1]
      return float(x0 + (x - x0) * (target - y0) / (y - y0))
  return None


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


def summarise_run(config, out_dir: str, ref_config) -> dict:
  from jest_pod import config as config_lib
  from jest_pod.models.flops import example_forward_flops
  from jest_pod.train import flops as flops_lib
  events = plot.read_metrics(out_dir)
  rm = ref_config.model
  parts = flops_lib.step_flops(config, reference_example_flops=example_forward_flops(
      rm, rm.image_size, rm.image["patch_size"], ref_config.input.max_text_len))
  b = config.batch_size
  curves = {m: _series(events, keys) for m, keys in metric_keys(events).items()}
  learn = [(e.get("select/learnability_selected"), e.get("select/learnability_super_batch"))
           for e in events if "select/learnability_selected" in e]
  last = [e for e in events if "step" in e]
  return {
      "run_dir": out_dir, "seed": config.seed, "batch": b,
      # Whether the run needed a trained reference (its training is charged in "+ref").
      "uses_reference": config_lib.needs_reference(config),
      "steps": max((e["step"] for e in last), default=0),
      "flops_per_step": parts["total"],  # charged
      "flops_per_step_amortised": parts["total"] - parts["reference"],
      "curves": {m: [xs.tolist(), ys.tolist()] for m, (xs, ys) in curves.items()},
      "final": {m: float(ys[-1]) if ys.size else float("nan")
                for m, (_, ys) in curves.items()},
      "learnability": ([float(np.mean([a for a, _ in learn])),
                        float(np.mean([c for _, c in learn]))] if learn else None),
      "damage": _damage_shares(events),
  }


def analyse(runs: dict, ref_train_flops: float, baselines: dict[str, str]) -> dict:
  """Per variant: finals and examples/FLOPs to reach its baseline's mean final scores
  (`baselines`: variant → baseline variant, uniform with the same pool and batch).
  Examples are a fraction of the baseline's, FLOPs a multiple of the baseline's."""
  nan = float("nan")

  metrics = sorted({m for seeds in runs.values() for r in seeds.values() for m in r["final"]})

  def base_stats(name):
    uni = runs.get(name, {})
    return ({m: _mean_sd([r["final"].get(m) for r in uni.values()])[0] for m in metrics},
            float(np.mean([r["steps"] * r["batch"] for r in uni.values()])) if uni else nan,
            float(np.mean([r["steps"] * r["flops_per_step"] for r in uni.values()]))
            if uni else nan)

  targets, uni_examples, uni_flops = base_stats("uniform")
  out = {"metrics": metrics, "targets": targets, "uniform_examples": uni_examples,
         "uniform_flops": uni_flops,
         "reference_training_flops": ref_train_flops, "variants": {}}
  for name, seeds in runs.items():
    base = baselines.get(name, "uniform")
    tg, base_examples, base_flops = base_stats(base)
    row = {"seeds": sorted(seeds), "baseline": base, "targets": tg, "final": {}, "reach": {}}
    for m in metrics:
      row["final"][m] = [seeds[s]["final"].get(m) for s in sorted(seeds)]
      ex, fl, fla, flr = [], [], [], []
      for s in sorted(seeds):
        r = seeds[s]
        xs, ys = r["curves"].get(m, ([], []))
        hit = examples_to_reach(np.array(xs), np.array(ys), tg[m])
        steps = None if hit is None else hit / r["batch"]
        ex.append(None if hit is None else hit / base_examples)
        fl.append(None if hit is None else steps * r["flops_per_step"] / base_flops)
        fla.append(None if hit is None else steps * r["flops_per_step_amortised"] / base_flops)
        ref = ref_train_flops if r["uses_reference"] else 0.0
        flr.append(None if hit is None else
                   (steps * r["flops_per_step"] + ref) / base_flops)
      row["reach"][m] = {"examples_frac": ex, "flops_ratio": fl, "flops_ratio_amortised": fla,
                         "flops_ratio_incl_ref": flr,
                         "reached": sum(x is not None for x in ex), "of": len(ex)}
    row["learnability"] = [seeds[s]["learnability"] for s in sorted(seeds)
                           if seeds[s]["learnability"]]
    row["damage"] = {s: seeds[s]["damage"] for s in sorted(seeds)}
    for k in ("flops_per_step", "flops_per_step_amortised"):
      row[k] = float(np.mean([r[k] for r in seeds.values()]))
    out["variants"][name] = row
  return out


# ------------------------------------------------------------------ tables and figures

def _reach_cell(reach: dict, key: str) -> str:
  vals = [v for v in reach[key] if v is not None]
  if not vals:
    return f"not reached (0/{reach['of']})"
  cell = _pm(vals, "{:.2f}")
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
  of the baseline's) and FLOPs (multiple of the baseline's) in both views."""
  lines = ["| variant | examples to reach | FLOPs, charged | FLOPs, amortised | charged + "
           "reference training |", "|---|---|---|---|---|"]
  for name, label in labels.items():
    row = analysis["variants"].get(name)
    if not row or row["baseline"] == name:  # a baseline defines the target
      continue
    r = row["reach"][metric]
    lines.append(f"| {label} | {_reach_cell(r, 'examples_frac')} | "
                 f"{_reach_cell(r, 'flops_ratio')} | {_reach_cell(r, 'flops_ratio_amortised')} "
                 f"| {_reach_cell(r, 'flops_ratio_incl_ref')} |")
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


def plot_curves(analysis, runs, labels: dict[str, str], path, title):
  """One column per metric: the score against training examples (top) and against
  amortised FLOPs (bottom); mean over seeds, band = min–max."""
  from jest_pod.experiments import plot
  plt = plot.pyplot()
  metrics = analysis["metrics"]
  fig, axes = plt.subplots(2, len(metrics), figsize=(5.2 * len(metrics), 8), dpi=100,
                           squeeze=False)
  for col, metric in enumerate(metrics):
    for ax, x in zip(axes[:, col], ("examples", "flops")):
      for name, label in labels.items():
        seeds = runs.get(name)
        curves = [seeds[s]["curves"][metric] for s in sorted(seeds or {})
                  if metric in seeds[s]["curves"]]
        if not curves:
          continue
        n = min(len(c[0]) for c in curves)
        ys = np.array([c[1][:n] for c in curves])
        xs = np.array(curves[0][0][:n])
        if x == "flops":
          r = next(iter(seeds.values()))
          xs = xs / r["batch"] * r["flops_per_step_amortised"]
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
      ax.set_xlabel("training examples" if x == "examples" else "FLOPs (amortised)")
      ax.set_title(metric, fontsize=9)
      ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{title} — mean over seeds, band = min–max; dashed = a baseline (uniform), "
               "dotted = its final",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_damage(ratios: dict, labels: dict[str, str], path: str) -> str:
  from jest_pod.experiments import plot
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
