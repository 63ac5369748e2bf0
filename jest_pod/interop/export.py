"""`jest-pod export CHECKPOINT --format hf|big_vision --output PATH`: a learner of the
SigLIP family out of the project.

  hf          a folder that `transformers.SiglipModel.from_pretrained(PATH)` and
              `SiglipProcessor.from_pretrained(PATH)` load (config.json, model.safetensors,
              spiece.model, tokenizer and image-processor configs), giving the same
              embeddings from raw captions and images
  big_vision  an .npz in big_vision's `params/...` layout (loop layout; `--scan` for the
              stacked `encoderblock`), with the sentencepiece model written beside it as
              spiece.model

CHECKPOINT is any kind interop/formats.py knows (usually a training workdir; its digest is
verified). A learner of the project's own FlexiViT family is refused: its masked-mean text
pooling and image projection have no counterpart in either format.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import jax
import numpy as np

from jest_pod import checkpoint
from jest_pod.data.tokenizer import TokenizerError
from jest_pod.interop import InteropError, big_vision, formats, hf

FORMATS = ("hf", "big_vision")


class ExportError(ValueError):
  """A checkpoint that cannot be exported; the message says what would make it exportable."""


def check_exportable(loaded) -> None:
  family = loaded.config.model.get("family", "flexivit")
  if family != "siglip":
    raise ExportError(
        f"{loaded.path} is a learner of the {family!r} family (this project's FlexiViT towers "
        "with masked-mean text pooling), which neither Hugging Face's SiglipModel nor "
        "big_vision's two_towers represents. Only the siglip family exports: train with "
        "config.model.family=siglip (e.g. configs/siglip.py:family=siglip) or start one from "
        "a public checkpoint with config.model.init_from")
  style = loaded.preprocessing.tokenizer.text_style
  if style not in ("siglip", "siglip_cased"):
    raise ExportError(f"{loaded.path}: its captions were tokenised with text_style {style!r}; "
                      "SigLIP's tokenizer appends </s> and pads with it (text_style siglip)")


def export(loaded, fmt: str, output: str, *, scan: bool = False) -> str:
  """Writes `loaded` (a formats.Loaded of the siglip family) as `fmt`; returns `output`."""
  check_exportable(loaded)
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
  model_config = loaded.config.model.to_dict()
  loop = dict(model_config, scan_layers=False)
  params = jax.tree.map(np.asarray, formats.params_for(loaded, loop))
  prep = loaded.preprocessing
  if fmt == "hf":
    hf.write_folder(output, loop, params, tokenizer_proto=prep.tokenizer.model_proto,
                    image_size=prep.image_size, max_text_len=prep.max_text_len,
                    do_lower_case=prep.tokenizer.text_style == "siglip")
  else:
    big_vision.write_npz(output, params, scan=scan)
    spiece = os.path.join(os.path.dirname(os.path.abspath(output)), "spiece.model")
    with open(spiece, "wb") as f:
      f.write(prep.tokenizer.model_proto)
  return output


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="jest-pod export", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="a training WORKDIR (or a step folder), or any other "
                                    "checkpoint kind (converts between formats)")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--output", required=True,
                 help="hf: a folder to create; big_vision: the .npz file to write")
  p.add_argument("--step", type=int, default=None, help="workdir step (default: latest)")
  p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: its own)")
  p.add_argument("--scan", action="store_true", help="big_vision: scan layout")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = p.parse_args(argv)
  if os.path.exists(args.output) and not args.overwrite:
    print(f"jest-pod export: error: {args.output} exists; pass --overwrite to replace it",
          file=sys.stderr)
    return 1
  t0 = time.perf_counter()
  try:
    loaded = formats.load(args.checkpoint, tokenizer=args.tokenizer, step=args.step)
    check_exportable(loaded)
    if args.overwrite and os.path.isdir(args.output):
      shutil.rmtree(args.output)
    export(loaded, args.format, args.output, scan=args.scan)
  except (ExportError, InteropError, checkpoint.CheckpointError, TokenizerError,
          OSError) as e:
    print(f"jest-pod export: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output} ({args.format}) from {loaded.describe()} in "
        f"{time.perf_counter() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
