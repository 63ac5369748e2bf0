"""`jest-pod sweep`: the paper's claims in miniature, on real offline data, over seeds.

  jest-pod sweep [--pool demo|icons] [--data data/POOL] [--workdir workdirs/sweep]
                 [--seeds 0,1,2] [--only f,joint,score,flexi,damage,pool,batch,distill,
                 reference,schedule] [--jobs 2]
                 [--report-only]

Pools (`--pool`; each a plan of B, steps and evaluations, saved in WORKDIR/sweep_plan.json):
  demo   the demo's 19,435-pair web pool (`jest-pod data build demo`): B = 64, 300 steps
  icons  the 501,221-pair icon pool (`jest-pod data build icons`): B = 64, 780 steps, so
         that f = 90% scores each pool example at most once (780 × 640 = 499,200)

Experiments (issue 7; arXiv 2406.17711 §3-4), every variant trained from the same
initialisation and data order per seed, for the same number of training examples as
uniform:
  f       uniform vs JEST (joint, learnability, Flexi) at f = 50, 80, 90%: examples and FLOPs
          to reach uniform's final held-out zero-shot top-1 and retrieval recall
  joint   joint vs independent selection (top-k, and sampled ∝ exp(L_kk)) at f = 50%, 90%
  score   learnability vs easy_reference vs hard_learner at f = 80%
  flexi   Flexi-JEST (score at patch 2p, train half at p, half at 2p) vs full-resolution
          scoring and training, f = 50, 80, 90%
  damage  share of each damage kind of the web pool among selected examples vs the pool
  pool    (icons only) uniform and JEST f = 90% on a fixed random 19,435-pair sub-pool (the
          demo pool's size) beside the same runs on the whole pool: does a small pool,
          which f = 90% revisits ~10 times, explain a small gain?
  batch   uniform and JEST f = 50/80/90% at 4× B for ¼ of the steps (the same examples;
          16 chunks of 4B/16 instead of B/16), each against uniform at its own batch: does
          a bigger batch, with more in-batch structure, steepen the f trend?
Beyond the paper (issue 24; each against plain uniform):
  distill    uniform and JEST f = 80%, each with and without distillation from θ*
             (config.distill: softmax KL of the batch's logits, weight 1, τ = 1; ACED)
  reference  JEST f = 80% with a reference bigger than the learner (REFERENCES
             "reference_big": width 128, depth 4 vs 64, 2; same tokenizer), ± KD (ACID)
  schedule   JEST f = 80% for the first half of the steps, then uniform (AJEST)
Every table also reads in wall-clock: each run's training seconds (evaluations left
out) to reach the target, with the machine and its load beside them, and the spread of
each variant's seconds over seeds (the machine's noise).

Stages, each resumable (Ctrl-C and rerun continues; finished runs are skipped): data and
tokenizer (as `jest-pod demo`), each reference the chosen variants use (configs/reference.py
on the curated set) and its embedding cache over the web pool, the runs (`--jobs` processes at a time, 1 XLA CPU
device each; logs in WORKDIR/runs/VARIANT/seedS/train.log; seed by seed, so an early
stop leaves whole seeds), then the report (sweep_report.py): WORKDIR/sweep_report.md
(tables), WORKDIR/sweep_results.json, WORKDIR/sweep_*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time

from jest_pod import config as config_lib
from jest_pod.data import builders, reference_cache
from jest_pod.data import tokenizer as tok_lib
from jest_pod.experiments import demo, plot, sweep_report
from jest_pod.jest import reference as reference_lib
from jest_pod.train import hooks as train_hooks


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  config: str   # file in configs/
  args: str     # its arguments beyond the plan's runlocal,data,batch,steps
  small_pool: bool = False  # trains on the plan's sub-pool (the "pool" experiment)
  batch_scale: int = 1  # B × this for steps ÷ this: the same examples in bigger batches
  overrides: tuple = ()  # (dotted config key, value) pairs set after the file's arguments
  reference: str = "reference"  # REFERENCES entry: θ* for selection and distillation

  @property
  def baseline(self) -> str:
    """The run whose final scores are this variant's targets: plain uniform on the same
    pool with the same batch."""
    return next(n for n, v in VARIANTS.items() if v.config == "siglip.py" and not v.overrides
                and (v.small_pool, v.batch_scale) == (self.small_pool, self.batch_scale))


# Distillation as ACED/open_clip distil: the softmax KL of the batch's logits, τ = 1.
KD = (("distill.weight", 1.0), ("distill.temperature", 1.0), ("distill.kind", "softmax"))

# θ*s a sweep trains on the curated set, each in WORKDIR/NAME with its cache in
# WORKDIR/NAME_cache: tower overrides of configs/reference.py (the learner's towers are
# the demo's "mu": width 64, depth 2). The big one has 4× the width² and 2× the depth.
REFERENCES = {
    "reference": {},
    "reference_big": dict(width=128, depth=4, num_heads=4, mlp_dim=256),
}


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
    **{f"fullres_f{f}": Variant(f"JEST f={f}%, full-res scoring", "jest.py",
                                f"method=joint,score=learnability,f={f / 100},flexi=0")
       for f in (50, 80, 90)},
    # The sub-pool pair: `pool=` is filled in from the plan's small_pool.
    "uniform_small": Variant("uniform, small pool", "siglip.py", "", small_pool=True),
    "jest_f90_small": Variant("JEST f=90%, small pool", "jest.py",
                              "method=joint,score=learnability,f=0.9", small_pool=True),
    # The "batch" experiment: 4× B (16 chunks of 16 instead of 4), ¼ of the steps.
    "uniform_4xb": Variant("uniform, 4× batch", "siglip.py", "", batch_scale=4),
    **{f"jest_f{f}_4xb": Variant(f"JEST f={f}%, 4× batch", "jest.py",
                                 f"method=joint,score=learnability,f={f / 100}",
                                 batch_scale=4) for f in (50, 80, 90)},
    # Beyond the paper (issue 24): distillation, a bigger reference, early-only selection.
    "uniform_kd": Variant("uniform + KD", "siglip.py", "", overrides=KD),
    "jest_f80_kd": Variant("JEST f=80% + KD", "jest.py",
                           "method=joint,score=learnability,f=0.8", overrides=KD),
    "jest_f80_bigref": Variant("JEST f=80%, big reference", "jest.py",
                               "method=joint,score=learnability,f=0.8",
                               reference="reference_big"),
    "jest_f80_bigref_kd": Variant("JEST f=80% + KD, big reference", "jest.py",
                                  "method=joint,score=learnability,f=0.8", overrides=KD,
                                  reference="reference_big"),
    "jest_f80_until50": Variant("JEST f=80% until 50% of steps, then uniform", "jest.py",
                                "method=joint,score=learnability,f=0.8",
                                overrides=(("selection.until", 0.5),)),
}

# name → (title, variants shown; the baselines are the reference lines of every comparison)
EXPERIMENTS = {
    "f": ("Uniform vs JEST (learnability, joint, Flexi) at f = 50/80/90%",
          ("uniform", "jest_f50", "jest_f80", "jest_f90")),
    "joint": ("Joint vs independent (top-k and sampled) selection at f = 50% and 90%",
              ("uniform", "jest_f50", "indep_f50", "indep_sample_f50", "jest_f90", "indep_f90",
               "indep_sample_f90")),
    "score": ("Learnability vs easy-reference vs hard-learner scores at f = 80%",
              ("uniform", "jest_f80", "easy_ref_f80", "hard_learner_f80")),
    "flexi": ("Flexi-JEST (score at 2p, half/half training) vs full-resolution scoring "
              "at f = 50/80/90%",
              ("uniform", "jest_f50", "fullres_f50", "jest_f80", "fullres_f80", "jest_f90",
               "fullres_f90")),
    "damage": ("What selection keeps: share of each damage kind, selected vs pool",
               ("jest_f50", "jest_f80", "jest_f90", "indep_f50", "indep_f90", "indep_sample_f50",
                "indep_sample_f90", "easy_ref_f80", "hard_learner_f80", "fullres_f80")),
    "pool": ("Pool size: JEST f = 90% on a small sub-pool vs on the whole pool",
             ("uniform", "jest_f90", "uniform_small", "jest_f90_small")),
    "batch": ("Batch size: uniform and JEST f = 50/80/90% at 4× the batch and ¼ of the steps",
              ("uniform", "jest_f80", "uniform_4xb", "jest_f50_4xb", "jest_f80_4xb",
               "jest_f90_4xb")),
    "distill": ("Distillation from the reference JEST already holds (ACED): uniform and "
                "JEST f = 80%, each with and without KD",
                ("uniform", "uniform_kd", "jest_f80", "jest_f80_kd")),
    "reference": ("A bigger reference (width 128, depth 4 vs the learner's 64, 2), JEST "
                  "f = 80% with and without KD",
                  ("uniform", "jest_f80", "jest_f80_bigref", "jest_f80_bigref_kd")),
    "schedule": ("Early-only selection (AJEST): JEST f = 80% for the first half, then uniform",
                 ("uniform", "jest_f80", "jest_f80_until50")),
}


@dataclasses.dataclass(frozen=True)
class SweepPlan:
  """What every run of a sweep trains on (saved in WORKDIR/sweep_plan.json)."""
  builder: str           # `jest-pod data build BUILDER` makes the pool
  limit: int | None      # its --limit (None: the whole pool)
  batch: int             # B of every run
  reference_steps: int
  steps: int             # per run: every variant trains on steps × B examples
  evals: int             # evaluations per run (finer than the demo's: crossing points)
  small_pool: int = 0    # the "pool" experiment's sub-pool size (0: no such experiment)
  vocab: int = 1024

  def demo_plan(self, name: str) -> demo.Plan:
    """The same plan in the demo's terms (its config loader and reference stage)."""
    return demo.Plan("smoke" if name == "smoke" else "full", self.limit, self.batch,
                     self.reference_steps, self.steps, self.evals, self.vocab)


PLANS = {
    "demo": SweepPlan("demo", None, 64, 400, 300, 12),
    # Sized on this 2-core CPU (WORKSPACE_NOTES "Sweep on the icon pool"): f = 90% scores
    # 780 × 640 = 499,200 of the 501,221 pairs, one look at each; uniform sees 49,920.
    "icons": SweepPlan("icons", None, 64, 2000, 780, 8, small_pool=19_435),
    "smoke": SweepPlan("demo", 60, 16, 3, 4, 2, small_pool=30),  # tests only (hidden)
}


# ------------------------------------------------------------------ runs

def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, "runs", variant, f"seed{seed}")


def make_config(plan_name: str, variant: str, seed: int, data: str, workdir: str):
  plan = PLANS[plan_name]
  v = VARIANTS[variant]
  args = (f"runlocal,data={data},batch={plan.batch * v.batch_scale},"
          f"steps={max(plan.steps // v.batch_scale, 1)}")
  if v.small_pool:
    args += f",pool={plan.small_pool}"
  if v.config == "jest.py":
    args += f",{v.args},reference={os.path.join(workdir, v.reference)}"
  c = demo.load_config(v.config, args, plan.demo_plan(plan_name))
  c.seed = seed
  for key, value in v.overrides:
    config_lib.override(c, key, value)
  if config_lib.resolve(c).needs_reference:
    c.selection.reference = os.path.join(workdir, v.reference)
    c.selection.reference_cache = os.path.join(workdir, f"{v.reference}_cache")
  return c


def reference_config(plan_name: str, name: str, data: str, workdir: str):
  """configs/reference.py at the plan's size with REFERENCES[name]'s towers."""
  c = demo.run_configs(PLANS[plan_name].demo_plan(plan_name), data, workdir)["reference"]
  towers = REFERENCES[name]
  if towers:
    c.model.image.update(towers)
    c.model.text.update(towers)
    c.model.embed_dim = towers["width"]
  return c


def _run_one(config, out_dir: str, devices: int) -> None:
  """A child process: one training run, its output in OUT_DIR/train.log."""
  log_file = open(os.path.join(out_dir, "train.log"), "a", buffering=1)
  os.dup2(log_file.fileno(), 1)
  os.dup2(log_file.fileno(), 2)
  demo.set_cpu_devices(devices)
  train_hooks.setup_logging()
  if not demo.train_stage(config, out_dir):
    sys.exit(3)  # preempted: rerun continues


def _cost(config) -> float:
  """Relative cost of a run for ordering and the ETA: steps × (B + super-batch decode)."""
  return config.total_steps * (config.batch_size + config_lib.resolve(config).super_batch)


def _fraction_done(config, out_dir: str) -> float:
  """How far a running run is: its last logged step / total steps (0 before the first log)."""
  try:
    steps = [e["step"] for e in plot.read_metrics(out_dir) if "step" in e]
  except plot.PlotError:  # no metrics.jsonl yet
    return 0.0
  return min(max(steps, default=0) / max(config.total_steps, 1), 1.0)


def run_all(todo: list[tuple[str, object, str]], jobs: int, devices: int) -> bool:
  """Trains every (label, config, run dir), `jobs` processes at a time (0: one after
  another in this process). Prints progress with an ETA learnt from the work done so far
  (finished runs plus the logged progress of running ones). True if all finished."""
  # Seed by seed (an early stop leaves whole seeds to report), longest first within one.
  todo = sorted(todo, key=lambda t: (t[1].seed, -_cost(t[1])))
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
        train_hooks.setup_logging()
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


# ------------------------------------------------------------------ report

def report(workdir: str, plan_name: str, configs: dict, only: list[str], command: str) -> dict:
  """Reads the finished runs, writes WORKDIR/sweep_report.md, sweep_results.json and one
  figure per experiment; returns the results."""
  refs = {}  # each reference's training FLOPs and cache metadata
  for name in REFERENCES:
    ref_dir = os.path.join(workdir, name)
    if os.path.exists(demo.done_marker(ref_dir)):
      refs[name] = (plot.read_metrics(ref_dir)[-1].get("flops", 0.0),
                    reference_cache.read_meta(os.path.join(workdir, f"{name}_cache")) or {})
  runs: dict = {}
  for (name, seed), config in configs.items():
    out = run_dir(workdir, name, seed)
    if os.path.exists(demo.done_marker(out)):
      ref_flops = refs.get(VARIANTS[name].reference, (0.0, {}))[0]
      runs.setdefault(name, {})[seed] = sweep_report.summarise_run(config, out, ref_flops)
  analysis = sweep_report.analyse(runs, {n: v.baseline for n, v in VARIANTS.items()})
  analysis["references"] = {
      n: {"training_flops": f, **{k: meta.get(k) for k in ("num_examples", "flops", "seconds")}}
      for n, (f, meta) in refs.items()}
  t, uni = analysis["targets"], analysis["uniform_totals"]
  targets = ", ".join(f"{m} {v:.3f}" for m, v in t.items())
  machine = sweep_report.machine_line(runs)
  md = [f"# jest-pod sweep ({plan_name} plan)", "",
        f"Regenerate: `{command}`", "",
        f"Targets (uniform's final, mean over seeds): {targets}. Cells: mean ± sd over "
        "seeds; examples as a fraction of the baseline's (uniform on the same pool), FLOPs "
        "and wall-clock as a multiple of its; crossing points linearly interpolated between "
        "evaluations. FLOPs charged: the reference forward over every scored example counts; "
        "amortised: it does not (each cache below is computed once for all runs). "
        "Wall-clock: the run's training seconds (evaluations left out) on this machine, "
        f"{sweep_report.RUNS_AT_ONCE_NOTE} {machine}", ""]
  for name, r in analysis["references"].items():
    line = (f"Reference `{name}`: trained with {r['training_flops']:.3g} FLOPs "
            f"({r['training_flops'] / uni['flops']:.2f}× a uniform run)")
    if r.get("flops"):
      line += (f"; its cache, computed once: {r['num_examples']} examples, "
               f"{r['flops']:.3g} FLOPs ({r['flops'] / uni['flops']:.2f}× a uniform run), "
               f"{r['seconds']:.0f} s")
    md += [line + ".", ""]
  figures = {}
  for exp in only:
    title, names = EXPERIMENTS[exp]
    labels = {n: VARIANTS[n].label for n in names}
    png = os.path.join(workdir, f"sweep_{exp}.png")
    md += [f"## {exp}: {title}", ""]
    if exp == "damage":
      table, ratios = sweep_report.damage_table(analysis, labels)
      md += ["Selected share / pool share per damage kind (mean over each run's logged steps).",
             "", table, ""]
      figures[exp] = sweep_report.plot_damage(ratios, labels, png)
    else:
      md += [sweep_report.quality_table(analysis, labels), ""]
      for metric in analysis["metrics"]:
        md += [f"Reaching the baseline's final {metric}:", "",
               sweep_report.reach_table(analysis, labels, metric), ""]
      md += [sweep_report.learnability_table(analysis, labels), "",
             "Training wall-clock over seeds (the same work per seed: the spread is the "
             "machine's noise):", "", sweep_report.noise_table(analysis, labels), ""]
      figures[exp] = sweep_report.plot_curves(analysis, runs, labels, png, title)
    md += [f"![{exp}]({os.path.basename(figures[exp])})", ""]
  text = "\n".join(md)
  with open(os.path.join(workdir, "sweep_report.md"), "w") as f:
    f.write(text)
  results = {"plan": {"name": plan_name, **dataclasses.asdict(PLANS[plan_name])},
             "command": command, "analysis": analysis, "runs": runs, "figures": figures}
  with open(os.path.join(workdir, "sweep_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(text)
  print(f"\nreport: {os.path.join(workdir, 'sweep_report.md')}", flush=True)
  return results


# ------------------------------------------------------------------ main

def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod sweep", description=__doc__.split("\n\n")[0],
                              epilog="Interrupt and rerun the same command to continue.")
  p.add_argument("--pool", choices=("demo", "icons"), default="demo",
                 help="which pool and plan (see the module docstring; default demo)")
  p.add_argument("--data", default=None, help="the pool's root (default data/POOL; built "
                 "if missing)")
  p.add_argument("--workdir", default="workdirs/sweep")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (≥ 3 for spreads)")
  p.add_argument("--only", default=None,
                 help=f"experiments to run and report, of {','.join(EXPERIMENTS)} (default: "
                 "all that the pool has)")
  p.add_argument("--jobs", type=int, default=-1,
                 help="runs at once, each in its own process with cores/jobs XLA CPU devices "
                 "(-1: 2 on a 2-core machine, else one per 2 cores; 0: one after another in "
                 "this process)")
  p.add_argument("--report-only", action="store_true",
                 help="write the report from the finished runs; train nothing")
  p.add_argument("--scale", choices=sorted(PLANS), default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _error(message: str) -> int:
  print(f"jest-pod sweep: {message}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  plan_name = args.scale or args.pool
  plan = PLANS[plan_name]
  available = [e for e in EXPERIMENTS if e != "pool" or plan.small_pool]
  only = [e for e in (args.only or ",".join(available)).split(",") if e]
  bad = [e for e in only if e not in available]
  if bad:
    return _error(f"unknown experiment(s) {bad} in --only; the {plan_name} plan has "
                  f"{', '.join(available)}")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s]
  except ValueError:
    return _error(f"--seeds {args.seeds!r} must be integers like 0,1,2")
  data = args.data or f"data/{plan.builder}"
  if plan.limit is not None:
    data = f"{data.rstrip('/')}_{plan_name}"
  workdir = args.workdir
  os.makedirs(workdir, exist_ok=True)
  cores = os.cpu_count() or 1
  jobs = args.jobs if args.jobs >= 0 else max(1, cores // 2 if cores > 2 else cores)
  devices = max(1, cores // max(jobs, 1)) if jobs else (2 if cores >= 2 else 1)
  if jobs == 0:
    demo.set_cpu_devices(devices)
  command = " ".join(["jest-pod sweep", *(a for a in argv if a != "--report-only")])

  plan_path = os.path.join(workdir, "sweep_plan.json")
  want = {"plan": plan_name, **dataclasses.asdict(plan), "data": os.path.abspath(data)}
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      have = json.load(f)
    if have != want:  # runs of two plans would be compared as one
      return _error(f"{workdir} holds a sweep with another plan ({have}); use another "
                    "--workdir or delete it")
  else:
    with open(plan_path, "w") as f:
      json.dump(want, f, indent=2)
  variants = list(dict.fromkeys(v for e in only for v in EXPERIMENTS[e][1]))
  if not args.report_only:
    train_hooks.setup_logging()
    builders.build(plan.builder, data, limit=plan.limit)  # before the configs: they read
    tok_path = os.path.join(data, "web", "tokenizer.model")  # its evaluation sets
    if not os.path.exists(tok_path):
      tok_lib.main(["--data", os.path.join(data, "web"), "--vocab-size", str(plan.vocab)])
  configs = {(v, s): make_config(plan_name, v, s, data, workdir)
             for v in variants for s in seeds}

  if not args.report_only:
    for name in dict.fromkeys(VARIANTS[v].reference for v in variants):
      ref_dir = os.path.join(workdir, name)
      if not os.path.exists(demo.done_marker(ref_dir)):
        print(f"[sweep] training {name} → {ref_dir}/train.log", flush=True)
        ref_config = reference_config(plan_name, name, data, workdir)
        if not run_all([(name, ref_config, ref_dir)], jobs, devices * max(jobs, 1)):
          return 1
      cache = os.path.join(workdir, f"{name}_cache")
      if reference_cache.read_meta(cache) is None:
        print(f"[sweep] caching {name}'s embeddings of {data}/web → {cache}", flush=True)
        reference_lib.build_cache(os.path.join(data, "web"), ref_dir, output=cache)
    todo = [(f"{v} seed {s}", c, run_dir(workdir, v, s)) for (v, s), c in configs.items()
            if not os.path.exists(demo.done_marker(run_dir(workdir, v, s)))]
    print(f"[sweep] {len(configs)} runs ({len(variants)} variants × {len(seeds)} seeds), "
          f"{len(configs) - len(todo)} already done; {jobs or 1} at a time, {devices} CPU "
          f"device(s) each", flush=True)
    if not run_all(todo, jobs, devices):
      print("[sweep] some runs did not finish; rerun the same command to continue",
            file=sys.stderr)
      return 1
  report(workdir, plan_name, configs, only, command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
