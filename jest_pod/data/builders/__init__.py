"""Builders of real offline data sets from Debian packages (README.md, "The demo's data").

`jest-pod data build NAME --output DIR [--limit N] [--overwrite]`, NAME in BUILDERS:
  emoji          Noto Color Emoji rendered, caption = the emoji's English name
  openclipart    openclipart PNGs, caption from the SVG twin's title/description/keywords
  fashion_mnist  Fashion-MNIST, DIR/train and DIR/test, labelled, template captions
  demo           the demo's web / curated / eval_fashion / eval_retrieval sets (demo.py)
  icons          ~470k icons, glyphs and emoji from npm + Debian: web / curated /
                 eval_flags / eval_retrieval (icons.py; also npm tarballs, checked by sha512)

Each builder module has `PACKAGES` (Debian), `load(limit, workers) -> (examples, skipped)`
and `build(output, limit=None, overwrite=False, workers=None, seed=0)`. A build whose output
already holds a complete manifest with the same build arguments is a no-op. `build` locks
the output folder (one writer at a time: OUTPUT/.lock); a failed build removes what it
wrote, and one killed outright is cleared by the next build (no --overwrite needed).
Shards are byte-reproducible: the same builder, arguments and seed give the same sha256.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import inspect
import io
import logging
import os

import numpy as np
from PIL import Image

from jest_pod.data import ingest as ingest_lib
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records, score_images, sources

log = logging.getLogger(__name__)

BUILDERS = {
    "emoji": "jest_pod.data.builders.emoji",
    "openclipart": "jest_pod.data.builders.openclipart",
    "fashion_mnist": "jest_pod.data.builders.fashion_mnist",
    "demo": "jest_pod.data.builders.demo",
    "icons": "jest_pod.data.builders.icons",
}
MAX_SIDE = 64  # demo images are trained at 32x32; 64 leaves room for crops and bigger runs


@dataclasses.dataclass(frozen=True)
class Example:
  """One in-memory example before encoding.

  image: uint8 [H, W, 3] RGB, max(H, W) <= MAX_SIDE.
  id: unique within its origin, e.g. "emoji/1f9d7-1f3fd"; `origin` is the clean source string.
  """
  id: str
  image: np.ndarray
  caption: str
  origin: str
  label: int | None = None


def image_hash(image: np.ndarray) -> str:
  """Exact pixel hash (shape + bytes) of a uint8 image: the identity used for disjointness."""
  h = hashlib.sha1(str(image.shape).encode())
  h.update(np.ascontiguousarray(image).tobytes())
  return h.hexdigest()


def decode_rgb(png_or_jpeg: bytes) -> np.ndarray:
  """An encoded image as stored in a record -> uint8 [H, W, 3]."""
  return np.asarray(Image.open(io.BytesIO(png_or_jpeg)).convert("RGB"))


def decoded_hash(png_or_jpeg: bytes) -> str:
  """image_hash of an encoded image as stored in a record."""
  return image_hash(decode_rgb(png_or_jpeg))


def build_args_match(output: str, build: dict) -> bool:
  """True if `output` holds a complete data set built with exactly `build` arguments."""
  try:
    m = manifest_lib.read(output)
  except manifest_lib.ManifestError:
    return False
  return m.get("build") == build


def check_reuse(outputs: list[str], build: dict, overwrite: bool) -> bool:
  """Decides whether a build can be skipped. Returns True to skip (all outputs complete).

  Raises OutputNotEmptyError if an output holds something else and not `overwrite`.
  """
  if overwrite:
    return False
  if all(build_args_match(o, build) for o in outputs):
    for o in outputs:
      log.info("%s: complete data set with the same build arguments exists; nothing to do "
               "(--overwrite rebuilds it)", o)
    return True
  for o in outputs:
    # Rewritable without --overwrite: empty, left by a killed write, or this very build
    # (a rerun after a failure in a later set; the same arguments give the same bytes).
    if (os.path.isdir(o) and ingest_lib.entries(o) and not ingest_lib.interrupted(o)
        and not build_args_match(o, build)):
      have = None
      try:
        have = manifest_lib.read(o).get("build")
      except manifest_lib.ManifestError as e:
        have = f"incomplete ({e})"
      raise ingest_lib.OutputNotEmptyError(
          f"output folder {o!r} is not empty and does not hold this build "
          f"(wanted {build}, found {have}); pass --overwrite to rebuild it")
  return False


def write_examples(output: str, name: str, examples: list[Example], *, skipped: dict[str, int],
                   build: dict, class_names: list[str] | None = None,
                   sources: list[str] | None = None, shard_size: int = 4096,
                   overwrite: bool = False) -> dict:
  """Encodes `examples` (PNG) into `output` as a data set; returns the manifest.

  sources: per-example source strings (default: each example's origin), e.g. "emoji:junk_image".
  """
  ingest_lib.prepare_output(output, overwrite or build_args_match(output, build))
  writer = ingest_lib.ShardWriter(output, name, shard_size)
  try:
    for i, ex in enumerate(examples):
      src = sources[i] if sources is not None else ex.origin
      png = ingest_lib.encode_image(Image.fromarray(ex.image), "PNG")
      rec = records.Record(image=png, text=ex.caption, id=ex.id, source=src, label=ex.label)
      writer.add(records.encode(rec), src)
    m = writer.finish(skipped=skipped, image_max_side=MAX_SIDE,
                      created_by=f"build {build['builder']}",
                      class_names=class_names, build=build)
  except BaseException:
    writer.abort()
    raise
  log.info("%s: wrote %d examples to %s (sources %s, skipped %s)", name, m["num_examples"],
           output, m["source_counts"], m["skipped"] or "none")
  return m


def counter(skips: list[str] | collections.Counter) -> dict[str, int]:
  return dict(collections.Counter(skips))


def build(name: str, output: str, **kwargs) -> list[dict]:
  """Runs builder `name`; returns the manifests it wrote (or found)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown data set {name!r}; choose one of {sorted(BUILDERS)}")
  builder = importlib.import_module(BUILDERS[name]).build
  unknown = [k for k in kwargs if k not in inspect.signature(builder).parameters]
  if unknown:
    raise ValueError(f"the {name} builder takes no "
                     + ", ".join("--" + k.replace("_", "-") for k in unknown))
  with ingest_lib.lock_output(output):  # a second build into the same folder stops here
    manifests = builder(output, **kwargs)
  # What a JEST run of the shipped configs reads to score (two-phase input), for every
  # training set of the build; after the build's lock, which the store's builder takes too.
  sets = ([output] if sources.exists(output) else
          [spec for set_name, spec in sources.sets(output).items()
           if not set_name.startswith("eval_")])
  for spec in sets:
    score_images.ensure_shipped(spec)
  return manifests


def build_collection(name: str, load, output: str, limit: int | None, overwrite: bool,
                     workers: int | None, max_side: int) -> list[dict]:
  """Builds one collection's data set from `load(limit, workers) -> (examples, skipped)`,
  or returns the existing manifest when built with the same arguments. Returns [manifest]."""
  args = {"builder": name, "limit": limit, "max_side": max_side}
  if check_reuse([output], args, overwrite):
    return [manifest_lib.read(output)]
  examples, skipped = load(limit, workers)
  return [write_examples(output, name, examples, skipped=skipped, build=args,
                         overwrite=overwrite)]
