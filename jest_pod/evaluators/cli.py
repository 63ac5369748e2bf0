"""`jest-pod eval` / `tools/eval`: evaluate a saved checkpoint on any number of devices.

    tools/eval WORKDIR_OR_CHECKPOINT [--step N] [--data [zeroshot:|retrieval:]DIR ...]
               [--output results.json] [--embeddings out.npz]

Loads the checkpoint (the latest complete one in a workdir, or `--step`), rebuilds the
model from the config saved with it, replicates the parameters onto a mesh of this
machine's devices (whatever it was trained on), runs the evaluators, prints a table and
optionally writes JSON and the embeddings. Without `--data`, runs the checkpoint's own
`config.evals`. A plain `--data DIR` runs zero-shot when the set is labelled (its manifest
has `class_names`, or --class-names is given), else retrieval: retrieval over a labelled
set's captions means little, ask for it with `--data retrieval:DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jest-pod eval", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="a run's WORKDIR, WORKDIR/checkpoints, or a step folder")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--data", action="append", default=[], metavar="[TYPE:]DIR",
                 help="eval data set folder; repeatable. TYPE = zeroshot or retrieval "
                      "(default: inferred). Default: the checkpoint config's evals")
  p.add_argument("--output", default=None, help="write metrics as JSON here")
  p.add_argument("--embeddings", default=None, help="save image/text embeddings to this .npz")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--tokenizer", default=None,
                 help="sentencepiece model of the run (default: from the saved config, "
                      "else <data>/tokenizer.model)")
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
  from jest_pod.evaluators import common  # pylint: disable=import-outside-toplevel
  specs: dict[str, dict] = {}
  for arg in data_args:
    kind, sep, path = arg.partition(":")
    if not sep or kind not in ("zeroshot", "retrieval"):
      kind, path = "", arg
    if not os.path.isdir(path):
      raise common.EvalDataError(f"--data {arg}: {path!r} is not a folder")
    manifest = common.read_manifest(path)
    name = common.set_name_of(path, manifest)
    if kind:
      kinds = [kind]
    else:  # infer: zero-shot where the labels have names, else retrieval
      kinds = ["zeroshot"] if (manifest.get("class_names") or args.class_names) else ["retrieval"]
    for k in kinds:
      spec = {"type": k, "data": path, "batch_size": args.batch_size}
      if args.tokenizer:
        spec["tokenizer"] = args.tokenizer
      if args.patch_size:
        spec["patch_size"] = args.patch_size
      if k == "zeroshot":
        if args.class_names:
          spec["class_names"] = args.class_names
        if args.templates:
          spec["templates"] = list(args.templates)
      key = f"{name}_{k}"
      if key in specs:
        raise common.EvalDataError(f"--data {arg}: set {name!r} is given twice for {k}")
      specs[key] = spec
  return specs


def check_params_fit(model: Any, config: Any, params: Any) -> None:
  """Raise CheckpointError when the checkpoint's parameters do not fit the model its config
  builds (renamed layers, other sizes): a shape error deep in jit says much less."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jest_pod.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from jest_pod.evaluators import input_sizes  # pylint: disable=import-outside-toplevel
  image_size, max_text_len = input_sizes(config)
  want = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                         jnp.zeros((1, max_text_len), jnp.int32)))["params"]
  flat_want = {jax.tree_util.keystr(k): v.shape
               for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  flat_got = {jax.tree_util.keystr(k): np.shape(v)
              for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  problems = [f"missing {k} {s}" for k, s in flat_want.items() if k not in flat_got]
  problems += [f"unexpected {k} {s}" for k, s in flat_got.items() if k not in flat_want]
  problems += [f"{k}: checkpoint {flat_got[k]} vs model {s}" for k, s in flat_want.items()
               if k in flat_got and tuple(flat_got[k]) != tuple(s)]
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise CheckpointError("the checkpoint's parameters do not fit the model built from its "
                          f"saved config.model ({len(problems)} differences):\n  {shown}{more}")


def format_table(metrics: dict[str, float]) -> str:
  """Metrics as an aligned two-column table, accuracies in percent; by set, then metric
  family, then k as a number (recall@5 before recall@10)."""
  if not metrics:
    return "(no metrics)"
  w = max(len(k) for k in metrics)
  lines = [f"{'metric':<{w}}  {'value':>7}", f"{'-' * w}  {'-' * 7}"]
  from jest_pod.evaluators.common import metric_sort_key  # pylint: disable=import-outside-toplevel
  lines += [f"{k:<{w}}  {100 * v:>6.2f}%"
            for k, v in sorted(metrics.items(), key=lambda kv: metric_sort_key(kv[0]))]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  from jest_pod import checkpoint  # pylint: disable=import-outside-toplevel
  from jest_pod.evaluators import build_evaluator  # pylint: disable=import-outside-toplevel
  from jest_pod.evaluators.common import EvalDataError  # pylint: disable=import-outside-toplevel
  from jest_pod.evaluators.common import check_data_set  # pylint: disable=import-outside-toplevel
  from jest_pod.models import build_model  # pylint: disable=import-outside-toplevel
  from jest_pod.data.tokenizer import TokenizerError  # pylint: disable=import-outside-toplevel
  from jest_pod.data.manifest import ManifestError  # pylint: disable=import-outside-toplevel

  # Whatever devices this machine has, one data axis: eval is data-parallel only.
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  try:
    config, params, step = checkpoint.load_params(args.checkpoint, args.step,
                                                  sharding=replicated)
    if "model" not in config:
      raise checkpoint.CheckpointError("the checkpoint's saved config has no `model` section")
    model = build_model(config.model)
    check_params_fit(model, config, params)
  except checkpoint.CheckpointError as e:
    return _fail(str(e))

  try:
    specs = eval_specs(args.data, args) if args.data else dict(config.get("evals") or {})
    if not specs:
      return _fail("nothing to evaluate: pass --data DIR (the checkpoint's config has no evals)")
    for spec in specs.values():  # a partial or foreign set: say so before any compile
      if spec.get("data"):
        check_data_set(spec["data"])
    evs = [build_evaluator(name, spec, config, model, mesh) for name, spec in specs.items()]
  except (EvalDataError, TokenizerError, ValueError) as e:
    return _fail(str(e))

  print(f"checkpoint {args.checkpoint} step {step} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")
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
    result = {"checkpoint": os.path.abspath(args.checkpoint), "step": int(step),
              "devices": jax.device_count(), "metrics": metrics, "seconds": timings,
              "evals": {name: {k: v for k, v in dict(s).items()} for name, s in specs.items()}}
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
