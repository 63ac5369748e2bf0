"""`jest-pod sweep`: the paper's claims in miniature, on the demo's real data, over seeds.

  jest-pod sweep [--data data/demo] [--workdir workdirs/sweep] [--seeds 0,1,2]
                 [--only f,joint,score,flexi,damage] [--jobs 2] [--report-only]

Experiments (issue 7; arXiv 2406.17711 §3-4), every variant trained from the same
initialisation and data order per seed, for the same number of training examples as
uniform (the demo's full plan: B = 64, 300 steps):
  f       uniform vs JEST (joint, learnability, Flexi) at f = 50, 80, 90%: examples and FLOPs
          to reach uniform's final held-out zero-shot top-1 and retrieval recall
  joint   joint vs independent selection (top-k, and sampled ∝ exp(L_kk)) at f = 50%, 90%
  score   learnability vs easy_reference vs hard_learner at f = 80%
  flexi   Flexi-JEST (score at patch 2p, train half at p, half at 2p) vs full-resolution
          scoring and training, f = 80%
  damage  share of each damage kind of the web pool among selected examples vs the pool

Stages, each resumable (Ctrl-C and rerun continues; finished runs are skipped): data and
tokenizer (as `jest-pod demo`), the reference (configs/reference.py on the curated set),
its embedding cache over the web pool, the runs (`--jobs` processes at a time, 1 XLA CPU
device each; logs in WORKDIR/runs/VARIANT/seedS/train.log), then the report:
WORKDIR/sweep_report.md (tables), WORKDIR/sweep_results.json, WORKDIR/sweep_*.png.

FLOPs are counted as the paper counts them: every training pass plus, per step, the
learner's scoring forward over the super-batch and the reference's forward over it (charged
per scored example even though the sweep reads those embeddings from a cache); "+ref" adds
the reference's own training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from jest_pod import demo


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  config: str   # file in configs/
  args: str     # its arguments beyond the plan's runlocal,data,batch,steps


VARIANTS = {
    "uniform": Variant("uniform", "siglip.py", ""),
    "jest_f50": Variant("JEST f=50%", "jest.py", "method=joint,score=learnability,f=0.5"),
    "jest_f80": Variant("JEST f=80%", "jest.py", "method=joint,score=learnability,f=0.8"),
    "jest_f90": Variant("JEST f=90%", "jest.py", "method=joint,score=learnability,f=0.9"),
    "indep_f50": Variant("independent top-k f=50%", "jest.py",
                         "method=independent,score=learnability,f=0.5"),
    "indep_f90": Variant("independent top-k f=90%", "jest.py",
                         "method=independent,score=learnability,f=0.9"),
    # Sampled with p ∝ exp(L_kk): joint selection with one chunk, so joint vs this isolates
    # the chunked conditioning from top-k's determinism.
    "indep_sample_f50": Variant("independent sampled f=50%", "jest.py",
                                "method=independent,independent=sample,score=learnability,f=0.5"),
    "indep_sample_f90": Variant("independent sampled f=90%", "jest.py",
                                "method=independent,independent=sample,score=learnability,f=0.9"),
    "easy_ref_f80": Variant("easy_reference f=80%", "jest.py",
                            "method=joint,score=easy_reference,f=0.8"),
    "hard_learner_f80": Variant("hard_learner f=80%", "jest.py",
                                "method=joint,score=hard_learner,f=0.8"),
    "fullres_f80": Variant("JEST f=80%, full-res scoring", "jest.py",
                           "method=joint,score=learnability,f=0.8,flexi=0"),
}

# name → (title, variants shown; uniform is the baseline line of every comparison)
EXPERIMENTS = {
    "f": ("Uniform vs JEST (learnability, joint, Flexi) at f = 50/80/90%",
          ("uniform", "jest_f50", "jest_f80", "jest_f90")),
    "joint": ("Joint vs independent (top-k and sampled) selection at f = 50% and 90%",
              ("uniform", "jest_f50", "indep_f50", "indep_sample_f50", "jest_f90", "indep_f90",
               "indep_sample_f90")),
    "score": ("Learnability vs easy-reference vs hard-learner scores at f = 80%",
              ("uniform", "jest_f80", "easy_ref_f80", "hard_learner_f80")),
    "flexi": ("Flexi-JEST (score at 2p, half/half training) vs full-resolution, f = 80%",
              ("uniform", "jest_f80", "fullres_f80")),
    "damage": ("What selection keeps: share of each damage kind, selected vs pool",
               ("jest_f50", "jest_f80", "jest_f90", "indep_f50", "indep_f90", "indep_sample_f50",
                "indep_sample_f90", "easy_ref_f80", "hard_learner_f80", "fullres_f80")),
}

ZERO_SHOT = "z/0shot/eval_fashion_top1"
# Mean of both directions at recall@5: at this scale recall@1 on 500 images is a handful of
# hits (≈ 2-4%), too coarse to say when a run crosses a target.
RETRIEVAL = ("z/retr/eval_retrieval_img2txt_recall@5", "z/retr/eval_retrieval_txt2img_recall@5")
RECALL1 = ("z/retr/eval_retrieval_img2txt_recall@1", "z/retr/eval_retrieval_txt2img_recall@1")


@dataclasses.dataclass(frozen=True)
class SweepPlan:
  demo_plan: str   # the demo plan whose data, B, steps and reference the sweep uses
  evals: int       # evaluations per run (finer than the demo's: crossing points)


PLANS = {"full": SweepPlan("full", 12), "smoke": SweepPlan("smoke", 2)}


# ------------------------------------------------------------------ runs

def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, "runs", variant, f"seed{seed}")


def make_config(plan: SweepPlan, variant: str, seed: int, data: str, workdir: str):
  p = demo.PLANS[plan.demo_plan]
  v = VARIANTS[variant]
  args = f"runlocal,data={data},batch={p.batch},steps={p.steps}"
  if v.config == "jest.py":
    args += f",{v.args},reference={os.path.join(workdir, 'reference')}"
  c = demo.load_config(v.config, args, dataclasses.replace(p, evals=plan.evals))
  c.seed = seed
  if c.selection.method != "uniform":
    c.selection.reference_cache = os.path.join(workdir, "reference_cache")
  return c


def _run_one(config, out_dir: str, devices: int) -> None:
  """A child process: one training run, its output in OUT_DIR/train.log."""
  log_file = open(os.path.join(out_dir, "train.log"), "a", buffering=1)
  os.dup2(log_file.fileno(), 1)
  os.dup2(log_file.fileno(), 2)
  demo.set_cpu_devices(devices)
  from jest_pod.train import main as train_main
  train_main.setup_logging()
  if not demo.train_stage(config, out_dir):
    sys.exit(3)  # preempted: rerun continues


def _cost(config) -> float:
  """Relative cost of a run for ordering and the ETA: steps × (B + super-batch decode)."""
  from jest_pod import config as config_lib
  return config.total_steps * (config.batch_size + config_lib.num_super_batch(config))


def _fraction_done(config, out_dir: str) -> float:
  """How far a running run is: its last logged step / total steps (0 before the first log)."""
  from jest_pod import plot
  try:
    steps = [e["step"] for e in plot.read_metrics(out_dir) if "step" in e]
  except plot.PlotError:  # no metrics.jsonl yet
    return 0.0
  return min(max(steps, default=0) / max(config.total_steps, 1), 1.0)


def run_all(todo: list[tuple[str, object, str]], jobs: int, devices: int) -> bool:
  """Trains every (label, config, run dir), `jobs` processes at a time (0: one after
  another in this process). Prints progress with an ETA learnt from the work done so far
  (finished runs plus the logged progress of running ones). True if all finished."""
  import multiprocessing as mp
  todo = sorted(todo, key=lambda t: -_cost(t[1]))  # longest first: even lanes at the end
  total_cost = sum(_cost(c) for _, c, _ in todo) or 1.0
  t0, done_cost, n_done, failed = time.time(), 0.0, 0, []
  running: dict = {}
  ctx = mp.get_context("spawn")  # a fresh JAX per run (a forked JAX is unsafe)

  def finished(label, config, out, ok, took):
    nonlocal done_cost, n_done
    done_cost += _cost(config)
    n_done += 1
    if not ok:
      failed.append(label)
      print(f"[sweep] {label} FAILED; see {out}/train.log", file=sys.stderr, flush=True)
    elapsed = time.time() - t0
    # Parallel lanes: count the running runs' progress too, or the first finish, with its
    # neighbour nearly done, would double the estimate.
    work = done_cost + sum(_cost(c) * _fraction_done(c, o) for _, c, o, _ in running.values())
    eta = elapsed / work * (total_cost - work)
    print(f"[sweep] {label} {'done' if ok else 'failed'} in {demo.fmt_time(took)} | "
          f"{n_done}/{len(todo)} runs | elapsed {demo.fmt_time(elapsed)} | est. remaining "
          f"{demo.fmt_time(eta)}", flush=True)

  queue = list(todo)
  while queue or running:
    while queue and len(running) < max(jobs, 1):
      label, config, out = queue.pop(0)
      os.makedirs(out, exist_ok=True)
      print(f"[sweep] start {label} → {out}/train.log", flush=True)
      t = time.time()
      if jobs == 0:
        from jest_pod.train import main as train_main
        train_main.setup_logging()
        finished(label, config, out, demo.train_stage(config, out), time.time() - t)
        continue
      proc = ctx.Process(target=_run_one, args=(config, out, devices))
      proc.start()
      running[proc] = (label, config, out, t)
    time.sleep(0.5 if running else 0)
    for proc in [p for p in running if not p.is_alive()]:
      label, config, out, t = running.pop(proc)
      proc.join()
      finished(label, config, out, proc.exitcode == 0, time.time() - t)
    if failed and jobs == 0:
      return False
  return not failed


# ------------------------------------------------------------------ analysis

def _series(events: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(examples, values) of one metric (or the mean of several) at each evaluation."""
  keys = (key,) if isinstance(key, str) else key
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
  from jest_pod.train import flops as flops_lib
  events = demo.dedup_events(out_dir)
  # The paper's accounting: the reference forward over every scored example counts.
  per_step = flops_lib.step_flops(config, ref_config)["total"]
  b = config.batch_size
  zs = _series(events, ZERO_SHOT)
  rt = _series(events, RETRIEVAL)
  r1 = _series(events, RECALL1)
  learn = [(e.get("select/learnability_selected"), e.get("select/learnability_super_batch"))
           for e in events if "select/learnability_selected" in e]
  last = [e for e in events if "step" in e]
  sel = config.selection
  return {
      "run_dir": out_dir, "seed": config.seed, "batch": b,
      # Whether the run needed a trained reference (its training is charged in "+ref").
      "uses_reference": sel.method != "uniform" and sel.score != "hard_learner",
      "steps": max((e["step"] for e in last), default=0),
      "flops_per_step": per_step,
      "curves": {"zero_shot": [zs[0].tolist(), zs[1].tolist()],
                 "retrieval_r5": [rt[0].tolist(), rt[1].tolist()]},
      "final": {"zero_shot": float(zs[1][-1]) if zs[1].size else float("nan"),
                "retrieval_r5": float(rt[1][-1]) if rt[1].size else float("nan"),
                "retrieval_r1": float(r1[1][-1]) if r1[1].size else float("nan")},
      "learnability": ([float(np.mean([a for a, _ in learn])),
                        float(np.mean([c for _, c in learn]))] if learn else None),
      "damage": _damage_shares(events),
  }


def analyse(runs: dict, ref_train_flops: float) -> dict:
  """Per variant: finals and examples/FLOPs to reach uniform's mean final score."""
  uni = runs.get("uniform", {})
  targets = {m: _mean_sd([r["final"][m] for r in uni.values()])[0]
             for m in ("zero_shot", "retrieval_r5")}
  nan = float("nan")
  uni_examples = np.mean([r["steps"] * r["batch"] for r in uni.values()]) if uni else nan
  uni_flops = np.mean([r["steps"] * r["flops_per_step"] for r in uni.values()]) if uni else nan
  out = {"targets": targets, "uniform_examples": float(uni_examples),
         "uniform_flops": float(uni_flops), "reference_training_flops": ref_train_flops,
         "variants": {}}
  for name, seeds in runs.items():
    row = {"seeds": sorted(seeds), "final": {}, "reach": {}}
    for m in ("zero_shot", "retrieval_r5", "retrieval_r1"):
      row["final"][m] = [seeds[s]["final"][m] for s in sorted(seeds)]
    for m in ("zero_shot", "retrieval_r5"):
      ex, fl, flr = [], [], []
      for s in sorted(seeds):
        r = seeds[s]
        xs, ys = r["curves"][m]
        hit = examples_to_reach(np.array(xs), np.array(ys), targets[m])
        ex.append(None if hit is None else hit / uni_examples)
        f = None if hit is None else hit / r["batch"] * r["flops_per_step"]
        fl.append(None if f is None else f / uni_flops)
        ref = ref_train_flops if r["uses_reference"] else 0.0
        flr.append(None if f is None else (f + ref) / uni_flops)
      row["reach"][m] = {"examples_frac": ex, "flops_ratio": fl, "flops_ratio_incl_ref": flr,
                         "reached": sum(x is not None for x in ex), "of": len(ex)}
    row["learnability"] = [seeds[s]["learnability"] for s in sorted(seeds)
                           if seeds[s]["learnability"]]
    row["damage"] = {s: seeds[s]["damage"] for s in sorted(seeds)}
    row["flops_per_step"] = float(np.mean([r["flops_per_step"] for r in seeds.values()]))
    out["variants"][name] = row
  return out


# ------------------------------------------------------------------ report

def _reach_cell(reach: dict, key: str) -> str:
  vals = [v for v in reach[key] if v is not None]
  if not vals:
    return f"not reached (0/{reach['of']})"
  cell = _pm(vals, "{:.2f}")
  if reach["reached"] < reach["of"]:
    cell += f" ({reach['reached']}/{reach['of']} reached)"
  return cell


def quality_table(analysis: dict, variants) -> str:
  head = ("| variant | zero-shot top-1 | retrieval R@5 | retrieval R@1 | examples to uniform's "
          "zero-shot | FLOPs to it (×uniform) | same +ref training | examples to uniform's "
          "R@5 | FLOPs to it (×uniform) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name in variants:
    row = analysis["variants"].get(name)
    if not row:
      continue
    f = row["final"]
    zs, rt = row["reach"]["zero_shot"], row["reach"]["retrieval_r5"]
    if name == "uniform":  # the baseline defines the targets: 1 by construction
      lines.append(f"| {VARIANTS[name].label} | {_pm(f['zero_shot'])} | "
                   f"{_pm(f['retrieval_r5'])} | {_pm(f['retrieval_r1'])} |" + " 1 (target) |" * 5)
      continue
    lines.append(
        f"| {VARIANTS[name].label} | {_pm(f['zero_shot'])} | {_pm(f['retrieval_r5'])} | "
        f"{_pm(f['retrieval_r1'])} | {_reach_cell(zs, 'examples_frac')} | "
        f"{_reach_cell(zs, 'flops_ratio')} | {_reach_cell(zs, 'flops_ratio_incl_ref')} | "
        f"{_reach_cell(rt, 'examples_frac')} | {_reach_cell(rt, 'flops_ratio')} |")
  return "\n".join(lines)


def learnability_table(analysis: dict, variants) -> str:
  lines = ["| variant | learnability of selected batch | of super-batch | FLOPs/step (×uniform) |",
           "|---|---|---|---|"]
  uni = analysis["variants"].get("uniform", {}).get("flops_per_step", float("nan"))
  for name in variants:
    row = analysis["variants"].get(name)
    if not row or name == "uniform":
      continue
    le = row["learnability"]
    sel = _pm([a for a, _ in le], "{:+.2f}") if le else "–"
    sup = _pm([b for _, b in le], "{:+.2f}") if le else "–"
    lines.append(f"| {VARIANTS[name].label} | {sel} | {sup} | "
                 f"{row['flops_per_step'] / uni:.2f} |")
  return "\n".join(lines)


def damage_table(analysis: dict, variants) -> tuple[str, dict]:
  kinds = sorted({k for name in variants for d in
                  analysis["variants"].get(name, {}).get("damage", {}).values() for k in d})
  kinds = [k for k in kinds if k != "clean"] + (["clean"] if "clean" in kinds else [])
  ratios = {}
  lines = ["| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
  pool = {}
  for name in variants:
    row = analysis["variants"].get(name)
    if not row:
      continue
    cells = []
    for k in kinds:
      r = [d[k][0] / d[k][1] for d in row["damage"].values() if k in d and d[k][1] > 0]
      pool.setdefault(k, []).extend(d[k][1] for d in row["damage"].values() if k in d)
      ratios.setdefault(name, {})[k] = r
      cells.append(_pm(r, "{:.2f}") + "×")
    lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
  lines.append("| (pool share) | " + " | ".join(f"{np.mean(pool.get(k, [np.nan])):.3f}"
                                                 for k in kinds) + " |")
  return "\n".join(lines), ratios


def _plot_curves(analysis, runs, variants, path, title):
  from jest_pod import plot
  plt = plot.pyplot()
  panels = [("zero_shot", "examples", "zero-shot top-1 (eval_fashion)"),
            ("zero_shot", "flops", "zero-shot top-1 vs FLOPs (scoring + reference incl.)"),
            ("retrieval_r5", "examples", "retrieval R@5, mean of i→t and t→i")]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=100)
  for ax, (metric, x, sub) in zip(axes, panels):
    for name in variants:
      seeds = runs.get(name)
      if not seeds:
        continue
      curves = [seeds[s]["curves"][metric] for s in sorted(seeds)]
      n = min(len(c[0]) for c in curves)
      ys = np.array([c[1][:n] for c in curves])
      xs = np.array(curves[0][0][:n])
      if x == "flops":
        r = next(iter(seeds.values()))
        xs = xs / r["batch"] * r["flops_per_step"]
      style = dict(color="black", linestyle="--") if name == "uniform" else {}
      line, = ax.plot(xs, ys.mean(0), marker="o", markersize=2.5, linewidth=1.5,
                      label=f"{VARIANTS[name].label} (n={len(curves)})", **style)
      ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15, color=line.get_color())
    if metric in analysis["targets"]:
      ax.axhline(analysis["targets"][metric], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training examples" if x == "examples" else "FLOPs")
    ax.set_title(sub, fontsize=9)
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{title} — mean over seeds, band = min–max; dotted = uniform's final",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _plot_damage(ratios: dict, path: str) -> str:
  from jest_pod import plot
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
           label=VARIANTS[name].label)
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


def report(workdir: str, plan: SweepPlan, configs: dict, only: list[str], command: str) -> dict:
  from jest_pod import checkpoint as ckpt_lib
  ref_dir = os.path.join(workdir, "reference")
  ref_config = ckpt_lib.load_config(ref_dir)
  ref_train_flops = demo.dedup_events(ref_dir)[-1].get("flops", 0.0)
  runs: dict = {}
  for (name, seed), config in configs.items():
    out = run_dir(workdir, name, seed)
    if os.path.exists(demo.done_marker(out)):
      runs.setdefault(name, {})[seed] = summarise_run(config, out, ref_config)
  analysis = analyse(runs, ref_train_flops)
  t = analysis["targets"]
  md = [f"# jest-pod sweep ({plan.demo_plan} plan)", "",
        f"Regenerate: `{command}`", "",
        f"Targets (uniform's final, mean over seeds): zero-shot top-1 {t['zero_shot']:.3f}, "
        f"retrieval R@5 {t['retrieval_r5']:.3f}. Cells: mean ± sd over seeds; examples as a "
        "fraction of uniform's, FLOPs as a multiple of uniform's; crossing points linearly "
        "interpolated between evaluations. Reference training: "
        f"{ref_train_flops:.3g} FLOPs (uniform run: {analysis['uniform_flops']:.3g}).", ""]
  figures = {}
  for exp in only:
    title, variants = EXPERIMENTS[exp]
    md += [f"## {exp}: {title}", ""]
    if exp == "damage":
      table, ratios = damage_table(analysis, variants)
      md += ["Selected share / pool share per damage kind (mean over each run's logged steps).",
             "", table, ""]
      figures[exp] = _plot_damage(ratios, os.path.join(workdir, f"sweep_{exp}.png"))
    else:
      md += [quality_table(analysis, variants), "", learnability_table(analysis, variants), ""]
      figures[exp] = _plot_curves(analysis, runs, variants,
                                  os.path.join(workdir, f"sweep_{exp}.png"), title)
    md += [f"![{exp}]({os.path.basename(figures[exp])})", ""]
  text = "\n".join(md)
  with open(os.path.join(workdir, "sweep_report.md"), "w") as f:
    f.write(text)
  results = {"plan": dataclasses.asdict(plan), "command": command, "analysis": analysis,
             "runs": runs, "figures": figures}
  with open(os.path.join(workdir, "sweep_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(text)
  print(f"\nreport: {os.path.join(workdir, 'sweep_report.md')}", flush=True)
  return results


# ------------------------------------------------------------------ main

def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod sweep", description=__doc__.split("\n\n")[0],
                              epilog="Interrupt and rerun the same command to continue.")
  p.add_argument("--data", default="data/demo", help="demo data root (built if missing)")
  p.add_argument("--workdir", default="workdirs/sweep")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (≥ 3 for spreads)")
  p.add_argument("--only", default=",".join(EXPERIMENTS),
                 help=f"experiments to run and report, of {','.join(EXPERIMENTS)}")
  p.add_argument("--jobs", type=int, default=-1,
                 help="runs at once, each in its own process with cores/jobs XLA CPU devices "
                 "(-1: 2 on a 2-core machine, else one per 2 cores; 0: one after another in "
                 "this process)")
  p.add_argument("--report-only", action="store_true",
                 help="write the report from the finished runs; train nothing")
  p.add_argument("--scale", choices=sorted(PLANS), default="full", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  only = [e for e in args.only.split(",") if e]
  bad = [e for e in only if e not in EXPERIMENTS]
  if bad:
    print(f"jest-pod sweep: unknown experiment(s) {bad} in --only; choose from "
          f"{', '.join(EXPERIMENTS)}", file=sys.stderr)
    return 2
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s]
  except ValueError:
    print(f"jest-pod sweep: --seeds {args.seeds!r} must be integers like 0,1,2",
          file=sys.stderr)
    return 2
  plan = PLANS[args.scale]
  dplan = demo.PLANS[plan.demo_plan]
  data = args.data if dplan.limit is None else f"{args.data.rstrip('/')}_{args.scale}"
  workdir = args.workdir
  os.makedirs(workdir, exist_ok=True)
  cores = os.cpu_count() or 1
  jobs = args.jobs if args.jobs >= 0 else max(1, cores // 2 if cores > 2 else cores)
  # Each process gets an equal share of the cores as XLA CPU devices (≥ 1).
  devices = max(1, cores // max(jobs, 1)) if jobs else (2 if cores >= 2 else 1)
  if jobs == 0:
    demo.set_cpu_devices(devices)
  # What regenerates everything from scratch (a report-only rerun would train nothing).
  command = " ".join(["jest-pod sweep", *(a for a in argv if a != "--report-only")])

  plan_path = os.path.join(workdir, "sweep_plan.json")
  want = {**dataclasses.asdict(plan), "data": os.path.abspath(data)}
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      have = json.load(f)
    if have != want:  # runs of two plans would be compared as one
      print(f"jest-pod sweep: {workdir} holds a sweep with another plan ({have}); use "
            "another --workdir or delete it", file=sys.stderr)
      return 2
  else:
    with open(plan_path, "w") as f:
      json.dump(want, f, indent=2)
  variants = list(dict.fromkeys(v for e in only for v in EXPERIMENTS[e][1]))
  configs = {(v, s): make_config(plan, v, s, data, workdir) for v in variants for s in seeds}

  if not args.report_only:
    from jest_pod.train import main as train_main
    train_main.setup_logging()
    # Data, tokenizer and reference: the demo's stages (same data, same reference plan).
    from jest_pod.data import builders
    builders.build("demo", data, limit=dplan.limit)
    tok_path = os.path.join(data, "web", "tokenizer.model")
    if not os.path.exists(tok_path):
      from jest_pod.data import tokenizer as tok_lib
      tok_lib.main(["--data", os.path.join(data, "web"), "--vocab-size", str(dplan.vocab)])
    ref_dir = os.path.join(workdir, "reference")
    if not os.path.exists(demo.done_marker(ref_dir)):
      print(f"[sweep] training the reference → {ref_dir}/train.log", flush=True)
      ref_config = demo.run_configs(dplan, data, workdir)["reference"]
      if not run_all([("reference", ref_config, ref_dir)], jobs, devices * max(jobs, 1)):
        return 1
    cache = os.path.join(workdir, "reference_cache")
    if not os.path.exists(os.path.join(cache, "meta.json")):
      print(f"[sweep] caching reference embeddings of {data}/web → {cache}", flush=True)
      from jest_pod.data import reference_cache
      reference_cache.build_cache(os.path.join(data, "web"), ref_dir, output=cache)
    todo = [(f"{v} seed {s}", c, run_dir(workdir, v, s)) for (v, s), c in configs.items()
            if not os.path.exists(demo.done_marker(run_dir(workdir, v, s)))]
    print(f"[sweep] {len(configs)} runs ({len(variants)} variants × {len(seeds)} seeds), "
          f"{len(configs) - len(todo)} already done; {jobs or 1} at a time, {devices} CPU "
          f"device(s) each", flush=True)
    if not run_all(todo, jobs, devices):
      print("[sweep] some runs did not finish; rerun the same command to continue",
            file=sys.stderr)
      return 1
  report(workdir, plan, configs, only, command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
