"""`jest-pod demo`: uniform SigLIP vs JEST on real offline data, end to end on a CPU.

  jest-pod demo [--data data/demo] [--workdir workdirs/demo] [--quick]

Stages (each resumable; a finished one is skipped, so Ctrl-C and rerun continues):
  1. data       `jest-pod data build demo` into --data (a no-op when built; with the web
                pool's score images)
  2. tokenizer  sentencepiece on the web pool's captions (vocab ≤ the model's 1024; with
                the captions' token rows)
  3. reference  configs/reference.py on the curated set → WORKDIR/reference
  4. reference_cache  θ*'s embeddings of the web pool, once → WORKDIR/reference_cache
  5. uniform    configs/siglip.py on the web pool → WORKDIR/uniform
  6. jest       configs/jest.py (joint, learnability, f=0.8, Flexi-JEST: score at 2p,
                train half at p, half at 2p) → WORKDIR/jest, by the cheapest exact path:
                θ* from its cache and two-phase input (the super-batch scored from its
                score images and token rows, only the B selected records decoded)
  7. report     table + WORKDIR/demo_results.json + WORKDIR/demo_curves.png
XLA's compiled programs persist in WORKDIR/jax_cache (JAX's compilation cache), so a
rerun, and any stage that compiles what an earlier one did, pays compilation once.

`--public-reference` adds the path a user of a public SigLIP takes, with a reference of
the SigLIP family trained here (no public weights can be downloaded offline):
  siglip_reference  configs/reference.py:family=siglip on the curated set
  export            `jest-pod export --format hf` → WORKDIR/siglip_reference_hf
  cache             `jest-pod data cache-reference --reference WORKDIR/siglip_reference_hf`
                    (its own tokenizer style and preprocessing) → WORKDIR/..._hf_cache
  jest_hf_reference configs/jest.py with that folder as the reference, through the cache
and the report puts that JEST run next to the one with the usual reference, in its own
figure (WORKDIR/demo_curves_public_reference.png; the demo's demo_curves.png is kept).

Both learners start from the same initialisation (same seed and towers) and train on the
same number of examples (steps × B); the zero-shot (eval_fashion) and retrieval
(eval_retrieval) evaluators run as they train. FLOPs are the trainer's count of every
pass (training, learner scoring, reference forward); the reference's own training FLOPs
are reported beside them. `--quick` is the same pipeline on a `--limit 600` build
(DATA_quick) with fewer steps, for smoke tests (≤ 3 min on a 2-core CPU).

On a CPU the demo runs on 2 XLA CPU devices when the machine has ≥ 2 cores (measured with
`jest-pod bench step` on a 2-core machine: uniform step 0.073 s vs 0.121 s, JEST step
0.349 s vs 0.419 s on JAX's default single device); `--devices N` overrides, 0 keeps
JAX's default. Measured from scratch on an idle 2-core CPU: full 3m48s, --quick 1m33s
(8m00s and 2m40s while other jobs shared the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time

import jax

from jest_pod import config as config_lib
from jest_pod import runinfo
from jest_pod.data import builders, reference_cache, score_images, token_rows
from jest_pod.data import tokenizer as tok_lib
from jest_pod.evaluators import base as evaluators_base
from jest_pod.experiments import plot
from jest_pod.experiments.sweep_report import at_crossing, crossing
from jest_pod.interop import export, formats
from jest_pod.jest import reference as reference_lib
from jest_pod.train import hooks as train_hooks
from jest_pod.train import main as train_main


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a demo run trains; saved in WORKDIR/demo_plan.json so a rerun resumes the same."""
  scale: str
  limit: int | None       # data build --limit (None: the full demo data)
  batch: int              # B, the same for all three runs
  reference_steps: int
  steps: int              # per learner: both see steps × B training examples
  evals: int              # evaluations per run (plus the last step)
  vocab: int = 1024


PLANS = {
    # From scratch on an idle 2-core CPU: 3m48s (data build 20 s; 8m00s on a shared one).
    "full": Plan("full", None, 64, 400, 300, 6),
    "quick": Plan("quick", 600, 64, 80, 60, 3),
    # Tests only (hidden): seconds of training on a --limit 60 build.
    "smoke": Plan("smoke", 60, 16, 3, 4, 2),
}
# Rough cost model for the ETA (2-core CPU, 2 devices): seconds per step incl. evals,
# plus start-up and compilation per run; corrected by the speed of finished stages.
# Measured on an idle 2-core machine (full plan): data 20 s (+17 s apt on a fresh one),
# reference 51 s, uniform 40 s, JEST 114 s.
_SEC_PER_STEP = {"reference": 0.1, "uniform": 0.1, "jest": 0.35}
_RUN_OVERHEAD = 25.0
_DATA_SECONDS = {None: 45.0}


def fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 60}m{s % 60:02d}s"


class Progress:
  """Stage k/N, elapsed, estimated remaining (the estimate learns from finished stages)."""

  def __init__(self, stages: list[tuple[str, float]]):
    self.stages = stages  # (name, estimated seconds)
    self.t0 = time.time()
    self.done_est = self.done_real = 0.0
    self.k = 0

  def _remaining(self, from_k: int) -> float:
    speed = self.done_real / self.done_est if self.done_est > 0 else 1.0  # slower machine?
    return sum(e for _, e in self.stages[from_k:]) * speed

  def start(self, k: int, note: str = ""):
    self.k, self.t_stage = k, time.time()
    name = self.stages[k][0]
    print(f"[demo] stage {k + 1}/{len(self.stages)} {name}{': ' + note if note else ''} | "
          f"elapsed {fmt_time(time.time() - self.t0)} | est. remaining "
          f"{fmt_time(self._remaining(k))}", flush=True)

  def finish(self, skipped: bool = False):
    took = time.time() - self.t_stage
    # Only training stages calibrate the estimate: skipped ones and the data build say
    # little about this machine's training speed.
    if not skipped and self.stages[self.k][0] in _SEC_PER_STEP:
      self.done_est += self.stages[self.k][1]
      self.done_real += took
    name = self.stages[self.k][0]
    state = "skipped (already done)" if skipped else f"done in {fmt_time(took)}"
    print(f"[demo] stage {self.k + 1}/{len(self.stages)} {name} {state} | elapsed "
          f"{fmt_time(time.time() - self.t0)} | est. remaining "
          f"{fmt_time(self._remaining(self.k + 1))}", flush=True)


def set_cpu_devices(n: int) -> None:
  """Ask for n XLA CPU devices; only possible before JAX's backend starts."""
  if n <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # backend already initialised (e.g. inside tests): keep what it has


def load_config(name: str, arg: str, plan: Plan):
  c = config_lib.load(os.path.join(config_lib.CONFIGS_DIR, name), arg)
  every = max(1, c.total_steps // plan.evals)
  c.discover_evals.every_steps = every  # the sets found at run start (resolve_evals)
  for ev in c.evals.values():
    ev.every_steps = every
  if plan.scale == "smoke":  # tests: the smallest towers that compile fast
    c.log_every, c.ckpt_every = 1, 2
    c.optax.warmup_steps = 1
    c.model.image.update(width=32, depth=1, mlp_dim=64)
    c.model.text.update(width=32, depth=1, mlp_dim=64)
    if c.model.get("family") == "siglip":  # no image projection: the embedding is the width
      c.model.embed_dim = 32
  elif plan.scale == "quick":
    c.log_every, c.ckpt_every = 10, 20
    c.optax.warmup_steps = 10
  return c


# The reference's embedding cache of the web pool, under WORKDIR (beside its reference:
# another demo's reference in the same --data would otherwise refuse it).
REFERENCE_CACHE = "reference_cache"
# The public-reference walk-through's folders under WORKDIR.
HF_REFERENCE = "siglip_reference_hf"
HF_CACHE = "siglip_reference_hf_cache"


def run_configs(plan: Plan, data: str, workdir: str, public_reference: bool = False) -> dict:
  common = f"runlocal,data={data},batch={plan.batch}"
  ref_dir = os.path.join(workdir, "reference")
  jest = (f"{common},steps={plan.steps},method=joint,score=learnability,f=0.8,flexi=1,"
          "reference={}")
  out = {
      "reference": load_config("reference.py", f"{common},steps={plan.reference_steps}", plan),
      "uniform": load_config("siglip.py", f"{common},steps={plan.steps}", plan),
      "jest": load_config("jest.py", jest.format(ref_dir), plan),
  }
  # θ*'s embeddings, computed once (stage "reference_cache"): the cheapest exact path.
  out["jest"].selection.reference_cache = os.path.join(workdir, REFERENCE_CACHE)
  if public_reference:
    out["siglip_reference"] = load_config(
        "reference.py", f"{common},steps={plan.reference_steps},family=siglip", plan)
    c = load_config("jest.py", jest.format(os.path.join(workdir, HF_REFERENCE)), plan)
    c.selection.reference_cache = os.path.join(workdir, HF_CACHE)
    out["jest_hf_reference"] = c
  return out


def public_reference_stage(workdir: str, data: str) -> str:
  """Export the SigLIP-family reference to a Hugging Face folder and cache its embeddings
  of the web pool (each step skipped when done); returns the cache folder."""
  hf_dir, cache = os.path.join(workdir, HF_REFERENCE), os.path.join(workdir, HF_CACHE)
  if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
    tmp = hf_dir + ".tmp"
    export.export(formats.load(os.path.join(workdir, "siglip_reference")), "hf", tmp)
    os.replace(tmp, hf_dir)
  if reference_cache.read_meta(cache) is None:
    reference_lib.build_cache(os.path.join(data, "web"), hf_dir, output=cache)
  return cache


def reference_cache_stage(workdir: str, data: str) -> str:
  """θ*'s embeddings of the web pool, once (JEST then runs no reference pass), and the
  stores two-phase input reads (built with the data and the tokenizer; here for data
  built by an older version): the JEST stage scores without decoding its super-batch."""
  web, cache = os.path.join(data, "web"), os.path.join(workdir, REFERENCE_CACHE)
  if reference_cache.read_meta(cache) is None:
    reference_lib.build_cache(web, os.path.join(workdir, "reference"), output=cache)
  for line in score_images.ensure(web, score_images.SHIPPED, token_rows.SHIPPED_TEXT_LEN):
    print(f"[demo] {line}", flush=True)
  return cache


def done_marker(run_dir: str) -> str:
  return os.path.join(run_dir, "demo_done.json")


def train_stage(config, run_dir: str) -> bool:
  """Trains (or resumes) one run; returns False when it stopped early (preempted)."""
  last = train_main.train(config, run_dir)
  if last.get("preempted"):
    return False
  with open(done_marker(run_dir), "w") as f:
    json.dump({"steps": config.total_steps, "time": time.time()}, f)
  return True


# ------------------------------------------------------------------ report

def _final(events, key):
  vals = [e for e in events if key and key in e]
  return (vals[-1][key], vals[-1]["step"]) if vals else (float("nan"), 0)


def _summarise(name: str, run_dir: str, config) -> dict:
  events = plot.read_metrics(run_dir)
  logged = {k for e in events for k in e}
  # The registry names each type's metrics; the first set's key (None if none logged).
  keys = {short: next(iter(evaluators_base.logged_keys(logged, kind, metric)), None)
          for short, kind, metric in (("zero_shot_top1", "zeroshot", "top1"),
                                      ("img2txt_recall@1", "retrieval", "img2txt_recall@1"),
                                      ("txt2img_recall@1", "retrieval", "txt2img_recall@1"))}
  last = events[-1] if events else {}
  out = {"run_dir": run_dir, "method": config.selection.method,
         "steps": last.get("step", 0), "batch": config.batch_size,
         "super_batch": config_lib.resolve(config).super_batch,
         "examples": last.get("examples", 0), "flops": last.get("flops", 0.0),
         "seconds": last.get("time/train_elapsed_s", float("nan")), "metric_keys": keys}
  out["examples_scored"] = out["steps"] * out["super_batch"] if name.startswith("jest") else 0
  for short, key in keys.items():
    out[short] = _final(events, key)[0]
  return out


def _reach(run_dir: str, key: str, target: float) -> dict | None:
  """{examples, flops, seconds} where `key` first reaches target, by the sweep's one
  definition (sweep_report.crossing: interpolated between evaluations), else None."""
  events = [e for e in plot.read_metrics(run_dir) if key in e]
  hit = crossing([e[key] for e in events], target)
  if hit is None:
    return None
  return {axis: at_crossing([e.get(k, float("nan")) for e in events], hit)
          for axis, k in (("examples", "examples"), ("flops", "flops"),
                          ("seconds", "time/train_elapsed_s"))}


def _machine() -> str:
  cpu = runinfo.cpu_info()
  load = cpu["load_average"]
  return (f"{cpu['model']}, {cpu['usable']} of {cpu['count']} cores"
          + (f", 1-min load {load[0]:.1f} at the report" if load else ""))


def _plot(workdir: str, runs: dict, path: str) -> str:
  plt = plot.pyplot()
  panels = [("zero_shot_top1", "examples", "zero-shot top-1 (eval_fashion)"),
            ("img2txt_recall@1", "examples", "retrieval recall@1 image→text"),
            ("zero_shot_top1", "flops", "zero-shot top-1 vs FLOPs"),
            ("zero_shot_top1", "seconds", "zero-shot top-1 vs wall-clock (this machine)")]
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.4), dpi=110)
  for ax, (short, x, title) in zip(axes, panels):
    for name in [n for n in ("uniform", "jest", "jest_hf_reference") if n in runs]:
      r = runs[name]
      key = r["metric_keys"][short]
      if not key:
        continue
      events = plot.read_metrics(r["run_dir"])
      xs, ys = plot.curve(events, key, x, r["run_dir"])
      label = plot.describe_run(plot.read_config(r["run_dir"])) or name
      if name == "jest":
        label = "JEST " + label + " (Flexi)"
      elif name == "jest_hf_reference":
        label = "JEST, SigLIP reference via its HF export (cache)"
      ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, label=label)
    if x == "flops":
      # JEST's FLOPs with the reference's training added: the critics' accounting.
      ref_flops = runs["reference"]["flops"]
      key = runs["jest"]["metric_keys"][short]
      if key:
        xs, ys = plot.curve(plot.read_metrics(runs["jest"]["run_dir"]), key, x)
        ax.plot([v + ref_flops for v in xs], ys, linestyle="--", linewidth=1.2,
                label="JEST + reference training")
    ax.set_xlabel(plot.X_LABELS[x])
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"jest-pod demo: uniform vs JEST on the demo web pool ({workdir})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


# JEST run → the reference run whose training it is charged with.
_JEST_REFERENCE = {"jest": "reference", "jest_hf_reference": "siglip_reference"}


def curves_name(runs) -> str:
  """Each variant its own figure: --public-reference must not overwrite the demo's."""
  return ("demo_curves_public_reference.png" if "jest_hf_reference" in runs
          else "demo_curves.png")


def report(plan: Plan, workdir: str, configs: dict, timings: dict) -> dict:
  """Prints the table; writes WORKDIR/demo_results.json and WORKDIR/demo_curves.png."""
  runs = {name: _summarise(name, os.path.join(workdir, name), configs[name])
          for name in configs}
  u = runs["uniform"]
  reach = {}
  for jest, ref in _JEST_REFERENCE.items():
    if jest not in runs:
      continue
    j, ref_flops = runs[jest], runs[ref]["flops"]
    j["flops_incl_reference_training"] = j["flops"] + ref_flops
    for short in ("zero_shot_top1", "img2txt_recall@1", "txt2img_recall@1"):
      key = j["metric_keys"][short]
      hit = _reach(j["run_dir"], key, u[short]) if key else None
      if hit:
        hit["flops_incl_reference_training"] = hit["flops"] + ref_flops
      reach.setdefault(jest, {})[short] = hit
  lines = [
      f"{'run':<18} {'zero-shot':>9} {'R@1 i→t':>8} {'R@1 t→i':>8} {'examples':>9} "
      f"{'scored':>8} {'FLOPs':>9} {'FLOPs+ref':>9} {'seconds':>8}",
  ]
  lines.append("-" * len(lines[0]))
  for name in [n for n in ("uniform", "jest", "jest_hf_reference", "reference",
                           "siglip_reference") if n in runs]:
    r = runs[name]
    plus = r.get("flops_incl_reference_training", r["flops"] if name == "uniform" else None)
    lines.append(f"{name:<18} {r['zero_shot_top1']:>9.3f} {r['img2txt_recall@1']:>8.3f} "
                 f"{r['txt2img_recall@1']:>8.3f} {r['examples']:>9d} "
                 f"{r['examples_scored']:>8d} {r['flops']:>9.3g} "
                 f"{(f'{plus:.3g}' if plus is not None else '-'):>9} {r['seconds']:>8.0f}")
  table = "\n".join(lines)
  ref_flops = runs["reference"]["flops"]
  notes = [
      "examples = training examples (steps × B); scored = super-batch examples JEST "
      "scored (steps × N).",
      "FLOPs = every pass the run made (training, learner scoring at 2p, reference "
      "forward); FLOPs+ref adds the reference's own training "
      f"({ref_flops:.3g} FLOPs on the curated set; reference row: trained on curated, "
      "evaluated on the same held-out sets).",
      "seconds = the run's training wall-clock on this machine, evaluations left out "
      f"({_machine()}); CPU time is noisy: `jest-pod sweep` measures the spread over seeds.",
  ]
  if "jest_hf_reference" in runs:
    notes.append("jest_hf_reference: the same JEST run with a SigLIP-family reference "
                 "(siglip_reference, trained on the same curated set), exported to Hugging "
                 f"Face format ({HF_REFERENCE}/) and read through its embedding cache "
                 f"({HF_CACHE}/, built with the export's own tokenizer and preprocessing).")
  for jest, hits in reach.items():
    for short, hit in hits.items():
      if hit:
        notes.append(f"{jest} reached uniform's final {short} ({u[short]:.3f}) after "
                     f"{hit['examples']:.0f} examples ({hit['examples'] / max(u['examples'], 1):.0%} "
                     f"of uniform's), {hit['flops']:.3g} FLOPs "
                     f"({hit['flops'] / max(u['flops'], 1):.2f}× uniform's; "
                     f"{hit['flops_incl_reference_training'] / max(u['flops'], 1):.2f}× with "
                     f"reference training), {hit['seconds']:.0f} s of training "
                     f"({hit['seconds'] / u['seconds']:.2f}× uniform's wall-clock)")
      else:
        notes.append(f"{jest} did not reach uniform's final {short} ({u[short]:.3f}) "
                     "within the run")
  png = _plot(workdir, runs, os.path.join(workdir, curves_name(runs)))
  results = {"plan": dataclasses.asdict(plan), "runs": runs,
             "reaches_uniform": reach,
             "table": table, "notes": notes, "stage_seconds": timings,
             "curves_png": png}
  with open(os.path.join(workdir, "demo_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + table)
  for n in notes:
    print("  " + n)
  print(f"\ncurves: {png}\nresults: {os.path.join(workdir, 'demo_results.json')}")
  return results


# ------------------------------------------------------------------ main

def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod demo", description=__doc__.split("\n\n")[0],
                              epilog="Interrupt and rerun the same command to continue.")
  p.add_argument("--data", default="data/demo", help="demo data root (built if missing)")
  p.add_argument("--workdir", default=None,
                 help="runs, table and figure (default workdirs/demo, workdirs/demo_quick)")
  p.add_argument("--quick", action="store_true", help="small data and steps (≤ 3 min)")
  p.add_argument("--devices", type=int, default=-1,
                 help="XLA CPU devices (-1: 2 if ≥ 2 cores, 0: JAX's default)")
  p.add_argument("--public-reference", action="store_true",
                 help="also: a SigLIP-family reference exported to Hugging Face format and "
                      "used through its cache (the public-checkpoint path, offline)")
  p.add_argument("--scale", choices=sorted(PLANS), default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  scale = args.scale or ("quick" if args.quick else "full")
  plan = PLANS[scale]
  data = args.data if plan.limit is None else f"{args.data.rstrip('/')}_{scale}"
  workdir = args.workdir or ("workdirs/demo" if scale == "full" else f"workdirs/demo_{scale}")
  os.makedirs(workdir, exist_ok=True)
  plan_path = os.path.join(workdir, "demo_plan.json")
  want = {**dataclasses.asdict(plan), "data": os.path.abspath(data)}
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      have = json.load(f)
    if have != want:  # resuming someone else's runs would mix two demos
      print(f"jest-pod demo: {workdir} holds a demo with another plan ({have}); use another "
            "--workdir or delete it", file=sys.stderr)
      return 2
  else:
    with open(plan_path, "w") as f:
      json.dump(want, f, indent=2)
  devices = args.devices if args.devices >= 0 else (2 if (os.cpu_count() or 1) >= 2 else 1)
  set_cpu_devices(devices)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # compiled once across stages and reruns
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  train_hooks.setup_logging()
  logging.getLogger("jest_pod.data").setLevel(logging.INFO)

  data_built = os.path.exists(os.path.join(data, "web", "manifest.json"))
  tok_path = os.path.join(data, "web", "tokenizer.model")
  est = {"data": 1.0 if data_built else _DATA_SECONDS.get(plan.limit, 10.0),
         "tokenizer": 0.0 if os.path.exists(tok_path) else 5.0,
         "reference": _RUN_OVERHEAD + plan.reference_steps * _SEC_PER_STEP["reference"],
         REFERENCE_CACHE: 0.0 if reference_cache.read_meta(
             os.path.join(workdir, REFERENCE_CACHE)) else 20.0,
         "uniform": _RUN_OVERHEAD + plan.steps * _SEC_PER_STEP["uniform"],
         "jest": _RUN_OVERHEAD + plan.steps * _SEC_PER_STEP["jest"]}
  runs = ["reference", "uniform", "jest"]
  if args.public_reference:
    est["siglip_reference"] = est["reference"]
    est["export+cache"] = 20.0
    est["jest_hf_reference"] = est["jest"]
    runs += ["siglip_reference", "jest_hf_reference"]
  est["report"] = 3.0
  for name in runs:
    if os.path.exists(done_marker(os.path.join(workdir, name))):
      est[name] = 0.0
  progress = Progress(list(est.items()))
  timings_path = os.path.join(workdir, "demo_stage_seconds.json")
  timings = {}
  if os.path.exists(timings_path):
    with open(timings_path) as f:
      timings = json.load(f)

  def record(name, seconds):
    timings[name] = timings.get(name, 0.0) + seconds  # summed over interrupted attempts
    with open(timings_path, "w") as f:
      json.dump(timings, f, indent=2)

  print(f"[demo] plan {scale}: B={plan.batch}, reference {plan.reference_steps} steps, "
        f"uniform and JEST {plan.steps} steps each ({plan.steps * plan.batch} examples); "
        f"data {data}; workdir {workdir}; {jax.device_count()} {jax.devices()[0].platform} "
        "device(s)", flush=True)

  # 1. data
  progress.start(0, data)
  t = time.time()
  builders.build("demo", data, limit=plan.limit)
  if not data_built:
    record("data", time.time() - t)
  progress.finish(skipped=data_built)

  # 2. tokenizer
  progress.start(1, tok_path)
  if os.path.exists(tok_path):
    progress.finish(skipped=True)
  else:
    t = time.time()
    tok_lib.main(["--data", os.path.join(data, "web"), "--vocab-size", str(plan.vocab)])
    record("tokenizer", time.time() - t)
    progress.finish()

  # 3-5. reference, uniform, JEST (and the public-reference walk-through's stages)
  configs = run_configs(plan, data, workdir, args.public_reference)
  for k, (name, _) in enumerate(progress.stages[2:-1], start=2):
    run_dir = os.path.join(workdir, name)
    progress.start(k, run_dir if name in configs else "")
    if name == REFERENCE_CACHE:
      t = time.time()
      cached = reference_cache.read_meta(run_dir) is not None
      reference_cache_stage(workdir, data)
      if not cached:
        record(name, time.time() - t)
      progress.finish(skipped=cached)
      continue
    if name == "export+cache":
      t = time.time()
      cached = os.path.exists(os.path.join(workdir, HF_CACHE, "meta.json"))
      public_reference_stage(workdir, data)
      if not cached:
        record(name, time.time() - t)
      progress.finish(skipped=cached)
      continue
    if os.path.exists(done_marker(run_dir)):
      progress.finish(skipped=True)
      continue
    t = time.time()
    finished = train_stage(configs[name], run_dir)
    record(name, time.time() - t)
    if not finished:
      print("[demo] stopped early (signal): rerun the same command to continue", flush=True)
      return 1
    progress.finish()

  # the report
  progress.start(len(progress.stages) - 1)
  t = time.time()
  results = report(plan, workdir, configs, timings)
  record("report", time.time() - t)
  progress.finish()
  total = sum(timings.values())
  results["stage_seconds"] = timings
  with open(os.path.join(workdir, "demo_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"[demo] done: {fmt_time(total)} of work in all stages (this invocation "
        f"{fmt_time(time.time() - progress.t0)})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
