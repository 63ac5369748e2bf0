"""`jest-pod eval` / `tools/eval`: evaluate a checkpoint on any number of devices.

    tools/eval CHECKPOINT [--step N] [--data [zeroshot:|retrieval:]DIR ...]
               [--output results.json] [--embeddings out.npz]

CHECKPOINT is any kind `interop/formats.py` knows: a training workdir (the latest complete
step, or `--step`; its digest is verified), a Hugging Face SigLIP folder, or a big_vision
.npz (`--tokenizer` or spiece.model beside it). The model, tokenizer and preprocessing come
with the checkpoint; the parameters are replicated onto a mesh of this machine's devices
(whatever it was trained on). Runs the evaluators, prints a table and optionally writes
JSON and the embeddings. Without `--data`, runs a workdir's own `config.evals`. A plain `--data DIR` runs zero-shot when the set is labelled (its manifest
has `class_names`, or --class-names is given), else retrieval: retrieval over a labelled
set's captions means little, ask for it with `--data retrieval:DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from jest_pod import checkpoint
from jest_pod.data import sources
from jest_pod.data.manifest import ManifestError
from jest_pod.data.tokenizer import TokenizerError
from jest_pod.evaluators import base
from jest_pod.evaluators.metrics import EvalDataError, metric_sort_key
from jest_pod.interop import InteropError, formats
from jest_pod.parallel import sharding as shd


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jest-pod eval", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="a run's WORKDIR (or its checkpoints/ or a step folder), "
                                    "a Hugging Face SigLIP folder or a big_vision .npz")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--data", action="append", default=[], metavar="[TYPE:]DIR",
                 help="eval data set folder; repeatable. TYPE = zeroshot or retrieval "
                      "(default: inferred). Default: the checkpoint config's evals")
  p.add_argument("--output", default=None, help="write metrics as JSON here")
  p.add_argument("--embeddings", default=None, help="save image/text embeddings to this .npz")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--tokenizer", default=None,
                 help="sentencepiece model (default: the checkpoint's own — the run's for a "
                      "workdir, spiece.model for Hugging Face and beside a big_vision npz)")
  p.add_argument("--class-names", default=None,
                 help="file of class names (one per line, or JSON) for zero-shot sets")
  p.add_argument("--templates", nargs="+", default=None,
                 help="zero-shot prompt templates with '{}' (default: a photo of a {}. ...)")
  p.add_argument("--patch-size", type=int, default=None,
                 help="image patch size (default: the model's base patch size)")
  return p


def _fail(msg: str) -> int:
  print(f"jest-pod eval: error: {msg}", file=sys.stderr)
  return 1


def eval_specs(data_args: list[str], args: argparse.Namespace) -> dict[str, dict]:
  """`--data [TYPE:]DIR` arguments → `config.evals`-style {name: {type, data, ...}}."""
  specs: dict[str, dict] = {}
  for arg in data_args:
    kind, sep, path = arg.partition(":")
    if not sep or kind not in base.TYPES:
      kind, path = "", arg
    if sources.is_folder(path) and not os.path.isdir(path):
      raise EvalDataError(f"--data {arg}: {path!r} is not a folder")
    manifest = base.check_data_set(path, check_files=False)
    name = base.set_name_of(path, manifest)
    # The registry infers the type (zero-shot where the labels have names) unless named.
    for k in [kind or base.infer_type(manifest, vars(args))]:
      spec = {"type": k, "data": path, "batch_size": args.batch_size}
      if args.tokenizer:
        spec["tokenizer"] = args.tokenizer
      if args.patch_size:
        spec["patch_size"] = args.patch_size
      for option in base.evaluator_class(k).CONFIG_KEYS:  # e.g. --class-names, --templates
        value = getattr(args, option, None)
        if value:
          spec[option] = list(value) if isinstance(value, (list, tuple)) else value
      key = f"{name}_{k}"
      if key in specs:
        raise EvalDataError(f"--data {arg}: set {name!r} is given twice for {k}")
      specs[key] = spec
  return specs


def format_table(metrics: dict[str, float]) -> str:
  """Metrics as an aligned two-column table, accuracies in percent; by set, then metric
  family, then k as a number (recall@5 before recall@10)."""
  if not metrics:
    return "(no metrics)"
  w = max(len(k) for k in metrics)
  lines = [f"{'metric':<{w}}  {'value':>7}", f"{'-' * w}  {'-' * 7}"]
  lines += [f"{k:<{w}}  {100 * v:>6.2f}%"
            for k, v in sorted(metrics.items(), key=lambda kv: metric_sort_key(kv[0]))]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)

  # Whatever devices this machine has, one data axis: eval is data-parallel only.
  mesh = shd.make_mesh((("data", -1),))
  try:
    loaded = formats.load(args.checkpoint, tokenizer=args.tokenizer, step=args.step)
  except (InteropError, checkpoint.CheckpointError, TokenizerError) as e:
    return _fail(str(e))
  config, params, step, model = loaded.config, loaded.params, loaded.step, loaded.model()
  # The checkpoint's own tokenizer and text style, unless --tokenizer replaced it.
  config.input.tokenizer = loaded.preprocessing.tokenizer.path or ""
  config.input.text_style = loaded.preprocessing.tokenizer.text_style

  try:
    specs = eval_specs(args.data, args) if args.data else dict(config.get("evals") or {})
    if not specs:
      return _fail("nothing to evaluate: pass --data DIR (the checkpoint's config has no evals)")
    # Each evaluator checks its set as it is built: a partial or foreign set fails here,
    # before any compile.
    evs = [base.build_evaluator(name, spec, config, model, mesh) for name, spec in specs.items()]
  except (EvalDataError, TokenizerError, ValueError) as e:
    return _fail(str(e))

  print(f"{loaded.describe()} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  metrics: dict[str, float] = {}
  arrays: dict[str, np.ndarray] = {}
  timings: dict[str, float] = {}
  for ev in evs:
    t0 = time.time()
    try:
      m, a = ev.evaluate(params)
    except (EvalDataError, TokenizerError, ManifestError) as e:
      return _fail(f"evaluator {ev.name!r}: {e}")
    timings[ev.name] = round(time.time() - t0, 3)
    metrics.update(m)
    arrays.update({f"{ev.name}/{k}": v for k, v in a.items()})
    print(f"  {ev.name}: {len(m)} metrics in {timings[ev.name]:.1f}s")
  print(format_table(metrics))

  if args.output:
    result = {"checkpoint": os.path.abspath(args.checkpoint), "kind": loaded.kind,
              "step": None if step is None else int(step),
              "devices": jax.device_count(), "metrics": metrics, "seconds": timings,
              "evals": {name: dict(s) for name, s in specs.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.output}")
  if args.embeddings:
    os.makedirs(os.path.dirname(os.path.abspath(args.embeddings)), exist_ok=True)
    np.savez(args.embeddings, **arrays)
    print(f"wrote {args.embeddings} ({', '.join(sorted(arrays))})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
