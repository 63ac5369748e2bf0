"""`jest-pod export CHECKPOINT --format hf|big_vision --output PATH`: a learner of the
SigLIP family out of the project.

  hf          a folder that `transformers.SiglipModel.from_pretrained(PATH)` and
              `SiglipProcessor.from_pretrained(PATH)` load (config.json, model.safetensors,
              spiece.model, tokenizer and image-processor configs), giving the same
              embeddings from raw captions and images
  big_vision  a folder holding model.npz in big_vision's `params/...` layout (loop layout;
              `--scan` for the stacked `encoderblock`) and the sentencepiece model as
              spiece.model; `--reference FOLDER` (or FOLDER/model.npz) reads it back

CHECKPOINT is any kind interop/formats.py knows (usually a training workdir; its digest is
verified). A learner of the project's own FlexiViT family is refused: its masked-mean text
pooling and image projection have no counterpart in either format.

An export never destroys: an output equal to, inside or containing the checkpoint is
refused; `--overwrite` replaces only a folder an earlier export wrote (it holds
jest_pod_export.json); everything is written into a temporary folder beside the output,
the marker last ({"complete": true, "files": {...}}), then renamed into place, so a
killed export leaves no OUTPUT, and readers refuse a folder whose marker is incomplete.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import time

import jax
import numpy as np

from jest_pod import checkpoint
from jest_pod.data.tokenizer import TokenizerError
from jest_pod.interop import InteropError, big_vision, formats, guard, hf

FORMATS = ("hf", "big_vision")


class ExportError(ValueError):
  """A checkpoint that cannot be exported; the message says what would make it exportable."""


def check_exportable(loaded) -> None:
  family = loaded.config.model.get("family", "flexivit")
  if family != "siglip":
    # The example fits the run: a JEST run is retrained with configs/jest.py, not uniform's.
    selection = loaded.config.get("selection") or {}
    jest = selection.get("method", "uniform") not in ("", "uniform")
    example = "configs/jest.py:family=siglip" if jest else "configs/siglip.py:family=siglip"
    raise ExportError(
        f"{loaded.path} is a learner of the {family!r} family (this project's FlexiViT towers "
        "with masked-mean text pooling), which neither Hugging Face's SiglipModel nor "
        "big_vision's two_towers represents. Only the siglip family exports: train with "
        f"config.model.family=siglip (e.g. {example}) or start one from "
        "a public checkpoint with config.model.init_from")
  style = loaded.preprocessing.tokenizer.text_style
  if style not in ("siglip", "siglip_cased"):
    raise ExportError(f"{loaded.path}: its captions were tokenised with text_style {style!r}; "
                      "SigLIP's tokenizer appends </s> and pads with it (text_style siglip)")


def _source_root(path: str) -> str:
  """What an export must not touch: the checkpoint's file or folder (a training workdir's
  root when `path` is its checkpoints/ or a step folder)."""
  p = os.path.realpath(path)
  if os.path.isdir(p):
    if os.path.basename(p) == "checkpoints":
      return os.path.dirname(p)
    if os.path.basename(p).isdigit() and os.path.basename(os.path.dirname(p)) == "checkpoints":
      return os.path.dirname(os.path.dirname(p))
  return p


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def check_output(output: str, source: str, *, overwrite: bool, fmt: str) -> None:
  """ExportError unless writing `output` can destroy nothing: it is not the checkpoint
  `source`, inside it or around it, and it is new, an empty folder, or (with `overwrite`)
  a folder an earlier export wrote."""
  out = os.path.realpath(output)
  if "://" not in str(source):
    root = _source_root(source)
    where = ("is" if out == root else "is inside" if _inside(out, root) else
             "contains" if _inside(root, out) else None)
    if where:
      name = os.path.splitext(os.path.basename(root))[0]
      suggest = os.path.join(os.path.dirname(root), f"{name}_{fmt}")
      raise ExportError(f"--output {output} {where} the checkpoint {root}: an export there "
                        f"could overwrite it; choose a folder outside it, e.g. --output {suggest}")
  if not os.path.lexists(output):
    return
  if os.path.islink(output):
    raise ExportError(f"--output {output} is a symbolic link; name a real folder")
  if os.path.isdir(output) and not os.listdir(output):
    return  # an empty folder: nothing to destroy
  if not overwrite:
    raise ExportError(f"{output} exists; pass --overwrite to replace an earlier export "
                      "there, or choose another --output")
  if not os.path.isfile(guard.marker_path(output)):
    raise ExportError(f"{output} exists and is not a jest-pod export (no {guard.MARKER} in "
                      "it): --overwrite replaces only a folder export wrote; choose another "
                      f"--output or move {output} aside yourself")


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _sweep_stale(parent: str, base: str) -> None:
  """Temporary folders of exports to `base` whose process is gone (a kill -9). An
  `export-old-` folder is kept: it may be the only copy of the earlier export."""
  prefix = f".{base}.export-"
  for name in os.listdir(parent):
    if not name.startswith(prefix) or name.startswith(prefix + "old-"):
      continue
    try:
      pid = int(name[len(prefix):].split("-")[-2])
      os.kill(pid, 0)
    except (ValueError, IndexError):
      continue
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    except OSError:
      continue


def _move_into_place(tmp: str, output: str) -> None:
  """The finished `tmp` becomes `output`; an earlier export there is moved aside first and
  removed only once the new one is in place."""
  parent, base = os.path.split(os.path.abspath(output))
  if os.path.isdir(output) and not os.path.islink(output) and not os.listdir(output):
    os.rmdir(output)
  if os.path.lexists(output):
    old = os.path.join(parent, f".{base}.export-old-{os.getpid()}-{secrets.token_hex(3)}")
    os.rename(output, old)
    try:
      os.rename(tmp, output)
    except OSError:
      os.rename(old, output)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, output)
  _fsync(parent)


def export(loaded, fmt: str, output: str, *, scan: bool = False,
           overwrite: bool = False) -> str:
  """Writes `loaded` (a formats.Loaded of the siglip family) as `fmt` into the folder
  `output` (see the module's docstring: atomic, marked, never over the checkpoint or a
  folder export did not write); returns `output`."""
  check_exportable(loaded)
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
  check_output(output, loaded.path, overwrite=overwrite, fmt=fmt)
  model_config = loaded.config.model.to_dict()
  loop = dict(model_config, scan_layers=False)
  params = jax.tree.map(np.asarray, formats.params_for(loaded, loop))
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):  # never write a NaN model
    if not np.isfinite(leaf).all():
      raise ExportError(f"{loaded.path}: parameter {jax.tree_util.keystr(path)} holds "
                        f"{int((~np.isfinite(leaf)).sum())} non-finite values (the run "
                        "diverged or the file is damaged); nothing was written: export an "
                        "earlier, sound step (--step)")
  prep = loaded.preprocessing
  parent, base = os.path.split(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  _sweep_stale(parent, base)
  # pid, then a random tail: _sweep_stale reads the pid back.
  tmp = os.path.join(parent, f".{base}.export-{os.getpid()}-{secrets.token_hex(3)}")
  os.mkdir(tmp)
  info = {"written_by": "jest-pod export", "format": fmt, "complete": False,
          "source": {"kind": loaded.kind, "path": os.path.abspath(loaded.path)
                     if "://" not in loaded.path else loaded.path, "step": loaded.step}}
  try:
    guard.write_marker(tmp, info)  # first: a folder left half-written says so
    if fmt == "hf":
      hf.write_folder(tmp, loop, params, tokenizer_proto=prep.tokenizer.model_proto,
                      image_size=prep.image_size, max_text_len=prep.max_text_len,
                      do_lower_case=prep.tokenizer.text_style == "siglip")
    else:
      big_vision.write_npz(os.path.join(tmp, big_vision.NPZ), params, scan=scan)
      with open(os.path.join(tmp, hf.SPIECE), "wb") as f:
        f.write(prep.tokenizer.model_proto)
    files = {}
    for name in sorted(os.listdir(tmp)):
      if name != guard.MARKER:
        _fsync(os.path.join(tmp, name))
        files[name] = os.path.getsize(os.path.join(tmp, name))
    guard.write_marker(tmp, {**info, "complete": True, "files": files})  # last
    _move_into_place(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="jest-pod export", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="a training WORKDIR (or a step folder), or any other "
                                    "checkpoint kind (converts between formats)")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--output", required=True,
                 help="the folder to create (hf: the SiglipModel files; big_vision: "
                      "model.npz + spiece.model)")
  p.add_argument("--step", type=int, default=None, help="workdir step (default: latest)")
  p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: its own)")
  p.add_argument("--scan", action="store_true", help="big_vision: scan layout")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an earlier export's folder (one holding jest_pod_export.json)")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    if args.format == "big_vision" and args.output.endswith(".npz"):
      raise ExportError(f"--output {args.output}: a big_vision export is a folder (model.npz "
                        "+ spiece.model, nothing written beside it); name the folder, e.g. "
                        f"--output {args.output[:-len('.npz')]}")
    # Before the (long) load: a refused output costs nothing.
    check_output(args.output, args.checkpoint, overwrite=args.overwrite, fmt=args.format)
    loaded = formats.load(args.checkpoint, tokenizer=args.tokenizer, step=args.step)
    check_exportable(loaded)
    export(loaded, args.format, args.output, scan=args.scan, overwrite=args.overwrite)
  except (ExportError, InteropError, checkpoint.CheckpointError, TokenizerError,
          OSError) as e:
    print(f"jest-pod export: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output} ({args.format}) from {loaded.describe()} in "
        f"{time.perf_counter() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
