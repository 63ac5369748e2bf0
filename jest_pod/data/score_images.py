"""Score images: every record's image at the scoring resolution, built once beside the
data set, so JEST's scoring pass over N = B / (1 − f) examples decodes no image.

Why they are exact: Flexi-JEST scores at patch s with the base kernel PI-resized; that
pass equals the base-patch pass on `models.vit.score_image` of the image (each s×s block
replaced by B⁺y, p0×p0), with (p0/s)² of the pixels. Measured (docs/two_phase_input.md):
float16 B⁺y gives the full decode's embeddings to a cosine of 0.9999999 and all of its
picks; an ordinary area thumbnail only 0.74, and 90–92% of the picks. When the learner scores at its base patch (no Flexi), the score
image is the decoded image itself, stored as its uint8 pixels: bit-exact.

A store per key (image size S, base patch p0, score patch s), beside the data set like
the reference cache (the same row store: data/reference_cache.py, zarr rows with a crc32
each, meta.json written last):

  DATA/score_images/s{S}_p{p0}_s{s}/   pixels [rows, S·p0/s, S·p0/s, 3] float16 (s > p0)
                                      or uint8 [rows, S, S, 3] (s = p0); meta.json:
                                      fingerprint (the data set's shard checksums), key,
                                      max_pixels, `bad` (records that did not decode)

Beside the data, not inside the records: one data set serves several keys (a CPU demo
at 32², a pod run at 224²), and a key is added or rebuilt without rewriting the records.

`jest-pod data build` and `jest-pod data ingest` build the key the shipped configs use
(`SHIPPED`); `jest-pod data score-images` builds any other (on every host of a pod, each
its share, with progress and ETA); a run that finds none says which command builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import jax
import numpy as np

from jest_pod import lockfile
from jest_pod.data import decode, records, sources, token_rows
from jest_pod.data import reference_cache as store_lib
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.input_config import MAX_PIXELS
from jest_pod.flexi import score_image
from jest_pod.parallel import distributed

log = logging.getLogger("jest_pod")

DIR = "score_images"
FORMAT = "jest_pod score images v1 (zarr3 rows + crc32 per row)"
NAMES = ("pixels",)


class ScoreImagesError(store_lib.ReferenceCacheError):
  """Score images that are missing, incomplete, damaged or for other data; the message
  names the command that builds them."""


@dataclasses.dataclass(frozen=True)
class Key:
  """What a store of score images is for: the training image size, the learner's base
  patch and the patch it scores at."""
  image_size: int
  base_patch: int
  score_patch: int

  @property
  def name(self) -> str:
    return f"s{self.image_size}_p{self.base_patch}_s{self.score_patch}"

  @property
  def size(self) -> int:
    """The score image's side."""
    return self.image_size * self.base_patch // self.score_patch

  @property
  def dtype(self) -> str:
    return "uint8" if self.score_patch == self.base_patch else "float16"

  def check(self) -> None:
    s, p0, n = self.score_patch, self.base_patch, self.image_size
    if s % p0 or n % s:
      raise ValueError(f"score images need a score patch ({s}) that is a multiple of the "
                       f"base patch ({p0}) and divides the image size ({n})")


# configs/jest.py (flexi=1) over configs/siglip.py's towers, every size: 32², patch 4,
# scored at 8. `data build` and `data ingest` write these (tests/test_two_phase.py keeps
# this equal to what the shipped config resolves to).
SHIPPED = Key(32, 4, 8)


def path_for(data_dir: str, key: Key) -> str:
  return store_lib.join(store_lib.join(data_dir, DIR), key.name)


def build_command(data_dir: str, key: Key, text_len: int | None = None,
                  tokenizer: str | None = None, output: str | None = None) -> str:
  """The command that builds a run's phase-1 input (score images and token rows)."""
  cmd = (f"jest-pod data score-images --data {data_dir} --image-size {key.image_size} "
         f"--patch {key.base_patch} --score-patch {key.score_patch}")
  if text_len is not None:
    cmd += f" --max-text-len {text_len}"
  if tokenizer:
    cmd += f" --tokenizer {tokenizer}"
  return cmd + (f" --output {output}" if output else "")


def to_stored(images: np.ndarray, key: Key) -> np.ndarray:
  """float32 images [b, S, S, 3] in [-1, 1] (decoded) → the stored rows."""
  if key.dtype == "uint8":  # exact: a decode's floats are uint8 / 127.5 − 1
    return np.rint((images + 1.0) * 127.5).astype(np.uint8)
  return score_image(images, key.base_patch, key.score_patch).astype(np.float16)


def to_float(rows: np.ndarray) -> np.ndarray:
  """Stored rows → float32 score images, what the learner's scoring pass takes."""
  if rows.dtype == np.uint8:
    return decode.to_float(rows)
  return np.asarray(rows, np.float32)


class ScoreImages:
  """An open, verified store: `lookup(index)` → float32 [b, s', s', 3] score images;
  `bad` the records that did not decode when it was built (phase 1 skips them, as a full
  decode would)."""

  def __init__(self, store: store_lib.Store, key: Key):
    self.store, self.key = store, key
    self.path = store.path
    self.bad = frozenset(int(i) for i in store.meta.get("bad", ()))

  def lookup(self, index: np.ndarray) -> np.ndarray:
    (rows,) = self.store.read(index)
    return to_float(rows)


def open_store(path: str, *, data_dir: str, key: Key,
               max_pixels: int = MAX_PIXELS) -> ScoreImages:
  """The score images at `path` for `data_dir` and `key`; ScoreImagesError naming the
  build command unless they are complete and were built from the same records (shard
  checksums), for the same key and image-size limit."""
  cmd = build_command(data_dir, key, output=None if path == path_for(data_dir, key) else path)
  meta = store_lib.complete_meta(path, what="score images", rebuild=cmd,
                                 error=ScoreImagesError)
  diffs = []
  if meta.get("key") != dataclasses.asdict(key):
    diffs.append(f"built for {meta.get('key')}, this run needs {dataclasses.asdict(key)}")
  if meta.get("fingerprint") != sources.fingerprint(data_dir):
    diffs.append(f"built from other records than {data_dir} (the data set was rebuilt: "
                 "its shard checksums differ)")
  if int(meta.get("max_pixels", -1)) != int(max_pixels):
    diffs.append(f"built with max_pixels={meta.get('max_pixels')}, this run uses "
                 f"{max_pixels}")
  if diffs:
    raise ScoreImagesError(f"score images {path} do not match this run: {'; '.join(diffs)}."
                           f" Rebuild them with `{cmd}`")
  store = store_lib.Store(path, meta, cmd, names=NAMES, fmt=FORMAT, what="score images",
                          error=ScoreImagesError)
  return ScoreImages(store, key)


def find(data_dir: str, key: Key) -> str | None:
  """DATA/score_images/<key> when it holds a store, else None."""
  return find_at(path_for(data_dir, key)) if sources.is_folder(data_dir) else None


def find_at(path: str) -> str | None:
  """`path` when it holds a store (complete, or with a torn meta.json that open_store
  names), else None."""
  try:
    return path if store_lib.read_meta(path) is not None else None
  except store_lib.ReferenceCacheError:
    return path


# ------------------------------------------------------------------------- build


def build(data_dir: str, key: Key, *, output: str | None = None, batch_size: int = 256,
          max_pixels: int = MAX_PIXELS) -> str:
  """Decodes every record of `data_dir` once and stores its score image; returns the
  folder (default DATA/score_images/<key>). Call it on every process of a multi-host job:
  host p builds records p::P."""
  key.check()
  if output is None and not sources.is_folder(data_dir):
    raise ScoreImagesError(f"--data {data_dir}: a {sources.scheme(data_dir)!r} source has no "
                           f"folder to hold DATA/{DIR}; pass --output DIR")
  output = output or path_for(data_dir, key)

  def row(raw):
    image = decode.to_array(records.decode(raw).image, key.image_size, max_pixels)
    return (to_stored(image[None], key)[0],)

  shape = (key.size, key.size, 3)
  with store_lib.builder_lock(_folder(data_dir, output)):
    store_lib.build_rows(
        data_dir, output, {"pixels": (shape, key.dtype)}, row, fmt=FORMAT,
        what=f"score images {key.name}", batch_size=batch_size,
        meta={"key": dataclasses.asdict(key), "fingerprint": sources.fingerprint(data_dir),
              "max_pixels": int(max_pixels),
              "bytes_per_row": int(np.prod(shape)) * np.dtype(key.dtype).itemsize})
  return output


def _folder(data_dir: str, output: str) -> str:
  """The folder a builder locks: the data set's own for a store beside it."""
  if sources.is_folder(data_dir) and os.path.abspath(output).startswith(
      os.path.abspath(data_dir) + os.sep):
    return data_dir
  return os.path.dirname(os.path.abspath(output)) if store_lib.is_local(output) else output


def ensure_shipped(data_dir: str) -> str | None:
  """The shipped configs' score images of `data_dir` (`SHIPPED`), built when missing or
  stale; None when the data set's images are smaller than its image size (they would be
  upscaled: a run at another size builds its own)."""
  side = sources.manifest_of(data_dir).get("image_max_side")
  if side is not None and int(side) < SHIPPED.image_size:
    return None
  try:
    return open_store(path_for(data_dir, SHIPPED), data_dir=data_dir, key=SHIPPED).path
  except ScoreImagesError:
    return build(data_dir, SHIPPED)


def ensure(data_dir: str, key: Key, text_len: int, tokenizer: str | None = None, *,
           output: str | None = None, batch_size: int = 256) -> list[str]:
  """Builds what phase 1 of two-phase input reads for `key` and `text_len` — the score
  images and the token rows (of `tokenizer`, default the data set's own) — unless built
  and current; returns what it wrote ("score images → PATH", "token rows → PATH")."""
  key.check()
  tok = tokenizer_lib.resolve({"data": data_dir}, tokenizer)
  wrote = []
  out = output or path_for(data_dir, key)
  try:
    open_store(out, data_dir=data_dir, key=key)
  except ScoreImagesError:
    wrote.append(f"score images → {build(data_dir, key, output=out, batch_size=batch_size)}")
  rows = token_rows.path_for(data_dir, tok, text_len)
  try:
    token_rows.open_store(rows, data_dir=data_dir, tokenizer=tok, text_len=text_len,
                          rebuild="")
  except token_rows.TokenRowsError:
    lock = store_lib.builder_lock(_folder(data_dir, rows))
    wrote.append(f"token rows → {token_rows.build(data_dir, tok, text_len, lock=lock)}")
  return wrote


def main(argv: list[str]) -> int:
  """`jest-pod data score-images`: a run's phase-1 input, score images and token rows."""
  p = argparse.ArgumentParser(
      prog="jest-pod data score-images",
      description="what phase 1 of two-phase input reads instead of the records (README, "
                  "'Two-phase input'): every record's image at JEST's scoring resolution and "
                  "its caption's tokens, once; a JEST run then decodes only the examples it "
                  "trains on. Each store already built and current is kept")
  p.add_argument("--data", required=True, help="data set folder (the pool JEST selects from)")
  p.add_argument("--image-size", type=int, default=SHIPPED.image_size,
                 help="the run's config.input.image_size")
  p.add_argument("--patch", type=int, default=SHIPPED.base_patch,
                 help="the learner's base patch (config.model.image.patch_size)")
  p.add_argument("--score-patch", type=int, default=SHIPPED.score_patch,
                 help="the patch it scores at (config.flexi.score_patch_size)")
  p.add_argument("--max-text-len", type=int, default=token_rows.SHIPPED_TEXT_LEN,
                 help="the run's config.input.max_text_len")
  p.add_argument("--tokenizer", default=None,
                 help="the run's tokenizer (default: the data set's own, DATA/tokenizer.model)")
  p.add_argument("--output", default=None, help=f"score images folder (default: DATA/{DIR}/"
                 "s<S>_p<P>_s<Q>; the token rows go to DATA/token_rows/)")
  p.add_argument("--batch-size", type=int, default=256)
  args = p.parse_args(argv)
  if not log.handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  key = Key(args.image_size, args.patch, args.score_patch)
  distributed.initialize()
  try:
    wrote = ensure(args.data, key, args.max_text_len, args.tokenizer, output=args.output,
                   batch_size=args.batch_size)
  except (ValueError, FileNotFoundError, lockfile.FolderBusy, tokenizer_lib.TokenizerError) as e:
    print(f"jest-pod data score-images: error: {e}", file=sys.stderr)
    return 1
  finally:
    distributed.shutdown()
  if jax.process_index() == 0:
    print(f"jest-pod data score-images: {'; '.join(wrote) if wrote else 'nothing to do'} "
          f"({key.name}, captions at {args.max_text_len} tokens; already current ones kept)")
  return 0
