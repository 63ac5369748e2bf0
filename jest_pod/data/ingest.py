"""Ingest: image-text pairs on disk -> a data set folder (ArrayRecord shards + manifest.json).

Inputs (`--input PATH`):
  (a) a folder (nested) of images, each with a same-stem `.txt` caption (its first non-blank
      line); id = path relative to the folder without extension;
  (b) a `.tsv`/`.csv`/`.txt` list of `image_path<TAB or comma>caption[<sep>class_name]`
      (an optional header row is detected); id = the image path without extension; a
      third column makes the set labelled (class_names). Image paths: a relative path
      (`..` included) resolves against the list file's own folder, never the current
      directory; an absolute path is used as given (lists may point at existing trees, so
      a list can name any file the user can read: ingest only lists you trust);
  (c) WebDataset `.tar` shards as img2dataset writes them (`KEY.jpg|jpeg|png|webp` +
      `KEY.txt`, optional `KEY.json` whose "caption" is used when there is no .txt):
      a `.tar`/`.tar.gz` file, or a folder holding `*.tar` files; id = KEY.
Images are decoded, flattened onto white (alpha), converted to RGB, shrunk to `max_side`
keeping aspect, and re-encoded: JPEG q90 for JPEG/WebP sources (photos), PNG otherwise.

Staying inside the inputs: symlinks (files and folders) inside a folder input, a tar
folder, or on a list's image path below the list's folder are not followed, each skipped
as `symlink`, unless `--follow-symlinks` (folder links are then walked once per real path,
so loops end). Nothing over MAX_CAPTION_BYTES (caption) or `max_image_bytes` (image,
default MAX_IMAGE_BYTES) is read: sizes are checked first (os.stat, tar header) and reads
are bounded, so memory is bounded by the limits, not by the inputs (tar members stream).

Bad inputs never stop an ingest: each is skipped, counted by reason in the manifest
(`skipped`), named in a log line (the first 20 per reason) and listed in `DIR/skipped.tsv`
(list rows as `file:line`). Reasons: missing_image, missing_caption, empty_caption,
undecodable_image, duplicate_id, malformed_line (list rows), symlink, name_not_utf8 (a file
or member name that is not UTF-8, shown with \\x escapes), image_too_large,
caption_too_large, caption_not_utf8 (captions, and list lines, must be UTF-8; a bad list
line is skipped, the rest read), caption_control_chars (a caption holding a control
character other than tab: skipped, not stripped), truncated_tar (a tar cut short, in a
member or a header: the members read before the cut are kept; the detail names the last
one) and undecodable_tar (any other tar damage, same rule).

Crash safety: shards are written under temporary names, fsynced, renamed to their final
names (`<name>-NNNNN-of-NNNNN.array_record`) once all are written, and the manifest is
written last (atomically). A folder without manifest.json is never a complete data set.
One writer per folder: DIR/.lock (jest_pod/lockfile.py) keeps a second ingest or build
out while one runs. A failed write (disk full, ...) removes what it wrote; one killed
outright leaves DIR/.incomplete, and the next write clears its files without
--overwrite. Records are encoded deterministically, so the same input and arguments give
byte-identical shards (reference caches fingerprinted on their sha256 stay valid).
"""

from __future__ import annotations

import collections
import io
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from typing import Iterator

from array_record.python import array_record_module
from PIL import Image

from jest_pod import lockfile
from jest_pod.data import ingest_read
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records
from jest_pod.data.ingest_read import MAX_CAPTION_BYTES, MAX_IMAGE_BYTES, scan

log = logging.getLogger(__name__)

LOG_SKIPS_PER_REASON = 20
DEFAULT_SHARD_SIZE = 10_000
CHUNK = 128  # inputs per worker task: small enough for smooth progress, big enough to amortise IPC


class OutputNotEmptyError(RuntimeError):
  """The output folder already holds files and --overwrite was not given."""


class OutputBusyError(lockfile.FolderBusy):
  """Another ingest or build is writing into the output folder."""


# Written into an output folder before its first shard, removed with the manifest's
# final write: a folder holding it was left by a write that was killed, and its files
# (ours, by the names below) may be cleared without --overwrite.
INCOMPLETE = ".incomplete"


def lock_output(out_dir: str) -> lockfile.FolderLock:
  """The lock of a data set writer on `out_dir` (created): `with lock_output(DIR): ...`."""
  os.makedirs(out_dir, exist_ok=True)
  return lockfile.FolderLock(out_dir, busy=OutputBusyError, kind="output folder",
                             what="data set writer (jest-pod data ingest/build)",
                             fix="Wait for it to finish (a complete build is then a no-op), "
                                 "or use another --output")


def entries(out_dir: str) -> list[str]:
  """The folder's entries, without a writer's lock."""
  return [e for e in os.listdir(out_dir) if not lockfile.is_lock_file(e)]


def is_ours(name: str) -> bool:
  """A file a data set writer writes (shards, temporaries, skip list, manifest, marker)."""
  return (name.endswith((".array_record", ".tmp")) or name in (
      "skipped.tsv", manifest_lib.MANIFEST, INCOMPLETE))


def _temporary(name: str) -> bool:  # our hidden in-progress files: shards, skip list, manifest
  return name.startswith(".") and name.endswith(".tmp") and (
      name.endswith(".array_record.tmp") or name.startswith((".skipped.", ".manifest.")))


def interrupted(out_dir: str) -> bool:
  """True if a write into `out_dir` was killed before it finished: its marker is there
  (or, from before the marker, nothing but our temporary files) and the folder holds no
  complete data set."""
  found = entries(out_dir)
  marked = INCOMPLETE in found or (found and all(_temporary(e) for e in found))
  return bool(marked) and not manifest_lib.is_complete(out_dir)


def clear_ours(out_dir: str) -> None:
  """Removes a writer's files (manifest first: the folder stops claiming to be complete);
  anything else in the folder is left alone."""
  mpath = os.path.join(out_dir, manifest_lib.MANIFEST)
  if os.path.exists(mpath):
    os.unlink(mpath)
  for e in os.listdir(out_dir):
    p = os.path.join(out_dir, e)
    if is_ours(e) and os.path.isfile(p):
      os.unlink(p)
  manifest_lib.fsync_dir(out_dir)


# ---------------------------------------------------------------------------------------
# Images.


def flatten_on_white(im: Image.Image) -> Image.Image:
  """RGBA -> RGB, transparent pixels white (clip art and emoji have alpha)."""
  bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
  return Image.alpha_composite(bg, im).convert("RGB")


def fit(im: Image.Image, max_side: int) -> Image.Image:
  """Any PIL mode -> RGB with max(H, W) <= max_side, aspect kept, never enlarged.

  Order matters for speed (some inputs are 100+ Mpx): shrink first, flatten after, so
  only one full-resolution pass (a mode conversion) happens. RGBA is shrunk premultiplied
  ("RGBa") so that colours hidden under transparent pixels do not bleed into edges.
  """
  if im.mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  if im.mode in ("LA", "PA", "La", "RGBX"):
    im = im.convert("RGBA")
  elif im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    im = im.convert("I").point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit
  elif im.mode not in ("RGB", "L", "RGBA"):
    im = im.convert("RGB")  # CMYK, YCbCr, 1, ...
  if im.mode == "RGBA":
    im = im.convert("RGBa")
  w, h = im.size
  if max(w, h) > max_side:
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
  if im.mode == "RGBa":
    return flatten_on_white(im.convert("RGBA"))
  return im.convert("RGB")


def shrink(im: Image.Image, max_side: int) -> Image.Image:
  """RGB image -> RGB with max(H, W) <= max_side, keeping aspect; never enlarges."""
  return fit(im, max_side)


def encode_image(im: Image.Image, fmt: str = "PNG") -> bytes:
  """RGB PIL image -> PNG or JPEG (q90) bytes."""
  buf = io.BytesIO()
  if fmt.upper() in ("JPEG", "JPG"):
    im.save(buf, "JPEG", quality=90)
  else:
    im.save(buf, "PNG", optimize=False)
  return buf.getvalue()


def reencode(data: bytes, max_side: int, image_format: str = "auto") -> bytes:
  """Encoded image bytes -> re-encoded RGB image with max side `max_side`.

  image_format: 'auto' (JPEG q90 for JPEG/WebP sources, PNG otherwise), 'png' or 'jpeg'.
  Raises ValueError (with PIL's message) if the bytes do not decode.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data))
      src = im.format
      if src == "JPEG":
        im.draft("RGB", (max_side, max_side))  # decode at reduced scale: much faster
      im.load()
      if im.size[0] < 1 or im.size[1] < 1:
        raise ValueError("empty image")
      im = fit(im, max_side)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    raise ValueError(f"{type(e).__name__}: {e}") from e
  fmt = image_format.lower()
  if fmt == "auto":
    fmt = "jpeg" if src in ("JPEG", "WEBP", "MPO") else "png"
  return encode_image(im, fmt)


# ---------------------------------------------------------------------------------------
# Writing shards.


def prepare_output(out_dir: str, overwrite: bool) -> None:
  """Creates `out_dir`; refuses a non-empty one unless `overwrite` or it holds the
  leftovers of a killed write (then clears our files), and marks it incomplete."""
  os.makedirs(out_dir, exist_ok=True)
  found = entries(out_dir)
  if found and not overwrite and not interrupted(out_dir):
    raise OutputNotEmptyError(
        f"output folder {out_dir!r} is not empty ({len(found)} entries, e.g. "
        f"{sorted(found)[0]!r}); pass --overwrite to replace the data set there, "
        f"or choose another --output")
  if found and not overwrite:
    log.warning("%s: clearing the files of an earlier write that was killed before it "
                "finished (%s)", out_dir, ", ".join(sorted(found)[:3]))
  if found:
    clear_ours(out_dir)
  with open(os.path.join(out_dir, INCOMPLETE), "w") as f:
    f.write(f"pid {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
  manifest_lib.fsync_dir(out_dir)


class ShardWriter:
  """Writes encoded records into shards of `shard_size`, crash-safely.

  Shards go to hidden temporary files, each fsynced when full; `finish()` renames them
  to `<name>-NNNNN-of-NNNNN.array_record` (the total is only known then) and writes the
  manifest last.
  """

  def __init__(self, out_dir: str, name: str, shard_size: int = DEFAULT_SHARD_SIZE):
    if shard_size < 1:
      raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    self.out_dir, self.name, self.shard_size = out_dir, name, shard_size
    self.source_counts: collections.Counter = collections.Counter()
    self.num_written = 0
    self._tmp_paths: list[str] = []
    self._final_paths: list[str] = []
    self._counts: list[int] = []
    self._writer = None

  def add(self, data: bytes, source: str) -> None:
    """Appends one serialized record (records.encode output) from `source`."""
    if self._writer is None:
      path = os.path.join(self.out_dir, f".{self.name}-{len(self._tmp_paths):05d}.array_record.tmp")
      # group_size:1 keeps random access (Grain's global shuffle) one read per record.
      self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      self._tmp_paths.append(path)
      self._counts.append(0)
    self._writer.write(data)
    self._counts[-1] += 1
    self.num_written += 1
    self.source_counts[source] += 1
    if self._counts[-1] >= self.shard_size:
      self._close_current()

  def _close_current(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    with open(self._tmp_paths[-1], "rb+") as f:
      os.fsync(f.fileno())

  def abort(self) -> None:
    """After an error: removes every file this write made (shards, temporaries, skip
    list, marker), so the folder is as empty as before and a rerun needs no --overwrite."""
    if self._writer is not None:
      try:  # on a full disk, closing fails too: the file goes anyway
        self._writer.close()
      except Exception as e:  # pylint: disable=broad-except
        log.debug("closing %s after an error: %s", self._tmp_paths[-1], e)
      self._writer = None
    for p in self._tmp_paths + self._final_paths:
      if os.path.exists(p):
        os.unlink(p)
    try:
      clear_ours(self.out_dir)
    except OSError as e:
      log.warning("could not remove the partial data set in %s (%s): rerun with "
                  "--overwrite", self.out_dir, e)

  def finish(self, *, skipped: dict[str, int], image_max_side: int, created_by: str,
             class_names: list[str] | None = None, build: dict | None = None) -> dict:
    """Renames the shards to their final names, writes and returns the manifest."""
    self._close_current()
    n = len(self._tmp_paths)
    shards = []
    for i, (tmp, count) in enumerate(zip(self._tmp_paths, self._counts)):
      fname = manifest_lib.shard_name(self.name, i, n)
      shards.append({"file": fname, "num_records": count,
                     "sha256": manifest_lib.sha256_file(tmp), "bytes": os.path.getsize(tmp)})
      os.replace(tmp, os.path.join(self.out_dir, fname))
      self._final_paths.append(os.path.join(self.out_dir, fname))
    manifest_lib.fsync_dir(self.out_dir)
    m = manifest_lib.make(name=self.name, shards=shards, skipped=skipped,
                          source_counts=dict(self.source_counts), image_max_side=image_max_side,
                          created_by=created_by, class_names=class_names, build=build)
    manifest_lib.write(self.out_dir, m)
    try:  # complete now: the manifest is in place (a marker left beside it is ignored)
      os.unlink(os.path.join(self.out_dir, INCOMPLETE))
    except FileNotFoundError:
      pass
    return m


# ---------------------------------------------------------------------------------------
# Workers: Items (from ingest_read's scanners) -> records.


def _ignore_ctrl_c():
  """In each worker: Ctrl-C (sent to the whole process group) is the parent's to handle;
  it cleans up and stops the pool, without a traceback per worker."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_chunk(args) -> tuple[list, list]:
  """Worker: Items -> ([(record bytes, source)], [(reason, where, detail)])."""
  items, source, max_side, image_format, max_image_bytes = args
  out, skipped = [], []
  for it in items:
    cap_where = it.cap_where or it.where
    if it.caption is None:
      skipped.append(("missing_caption", it.where, "no caption (.txt) for this image"))
      continue
    try:
      reason, caption = ingest_read.decode_caption(
          ingest_read.read_ref(it.caption, MAX_CAPTION_BYTES))
    except ingest_read.TooLarge as e:
      reason, caption = "caption_too_large", f"caption: {e}"
    except OSError as e:
      reason, caption = "missing_caption", str(e)
    if reason:
      skipped.append((reason, cap_where, caption))
      continue
    try:
      data = ingest_read.read_ref(it.image, max_image_bytes)
    except ingest_read.TooLarge as e:  # checked from the size first: never read whole
      skipped.append(("image_too_large", it.where, f"image: {e}"))
      continue
    except OSError as e:
      skipped.append(("missing_image", it.where, f"{type(e).__name__}: {e}"))
      continue
    try:
      img = reencode(data, max_side, image_format)
    except ValueError as e:
      skipped.append(("undecodable_image", it.where, str(e)))
      continue
    rec = records.Record(image=img, text=caption, id=it.id, source=source, label=it.label)
    out.append((records.encode(rec), source))
  return out, skipped


# ---------------------------------------------------------------------------------------
# Progress and skip logging, shared with the builders.


class Progress:
  """Rate-limited progress lines: done/total, rate, ETA."""

  def __init__(self, what: str, total: int, every_s: float = 2.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.t0 = self.last = time.time()

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    now = time.time()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    dt = max(now - self.t0, 1e-9)
    rate = done / dt
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
    log.info("%s: %d/%d inputs (%.0f/s), %s ETA %s", self.what, done, self.total, rate,
             extra + "," if extra else "", eta_s)


class SkipLog:
  """Counts skips by reason; logs the first few of each reason; all go to skipped.tsv."""

  def __init__(self, name: str):
    self.name = name
    self.counts: collections.Counter = collections.Counter()
    self.rows: list[tuple[str, str, str]] = []

  def add(self, reason: str, where: str, detail: str = "") -> None:
    self.counts[reason] += 1
    self.rows.append((reason, where, detail))
    if self.counts[reason] <= LOG_SKIPS_PER_REASON:
      log.warning("%s: skipped %s: %s (%s)", self.name, where, reason, detail)
    elif self.counts[reason] == LOG_SKIPS_PER_REASON + 1:
      log.warning("%s: more %s skips not logged; all are listed in skipped.tsv", self.name, reason)

  def write(self, out_dir: str) -> None:
    """Writes skipped.tsv (reason, input, detail) atomically; nothing if no skips."""
    if not self.rows:
      return
    tmp = os.path.join(out_dir, ".skipped.tsv.tmp")
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:  # odd file names
      f.write("reason\tinput\tdetail\n")
      for row in self.rows:
        f.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in row) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, "skipped.tsv"))


# ---------------------------------------------------------------------------------------
# Entry point.


def ingest(input_path: str, output: str, *, name: str | None = None, source: str | None = None,
           max_side: int = 64, shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
           overwrite: bool = False, image_format: str = "auto", follow_symlinks: bool = False,
           max_image_bytes: int | None = None) -> dict:
  """Ingests `input_path` into the data set folder `output`; returns the manifest.

  Args:
    input_path: folder, .tsv/.csv list, or .tar (or folder of .tar) — see module docstring.
    output: data set folder; must be empty or absent unless `overwrite`.
    name: data set name (shard file prefix); default: the output folder's name.
    source: the `source` string of every record; default: `name`.
    max_side: images are shrunk to this max side, aspect kept.
    shard_size: records per shard.
    workers: decode/encode processes; default os.cpu_count(); 0 or 1 = in this process.
    follow_symlinks: follow symlinks inside the input (default: skip each as `symlink`).
    max_image_bytes: larger image files/members are skipped as image_too_large, unread
      (None: MAX_IMAGE_BYTES).
  """
  name = name or os.path.basename(os.path.normpath(output))
  source = source or name
  max_image_bytes = MAX_IMAGE_BYTES if max_image_bytes is None else max_image_bytes
  if not os.path.exists(input_path):  # before touching the output folder
    raise FileNotFoundError(f"ingest input {input_path!r} does not exist")
  with lock_output(output):  # a second writer into the same folder stops here
    return _ingest(input_path, output, name=name, source=source, max_side=max_side,
                   shard_size=shard_size, workers=workers, overwrite=overwrite,
                   image_format=image_format, follow_symlinks=follow_symlinks,
                   max_image_bytes=max_image_bytes)


def _ingest(input_path, output, *, name, source, max_side, shard_size, workers, overwrite,
            image_format, follow_symlinks, max_image_bytes) -> dict:
  prepare_output(output, overwrite)
  writer = ShardWriter(output, name, shard_size)
  pool = None
  try:  # any failure (a full disk, Ctrl-C, a bug) removes what this write made
    t0 = time.time()
    inputs = scan(input_path, follow_symlinks=follow_symlinks, max_image_bytes=max_image_bytes)
    skips = SkipLog(f"ingest {name}")
    for row in inputs.skipped:
      skips.add(*row)
    n_in = len(inputs.items) + len(inputs.skipped)
    log.info("ingest %s: %s input %s: %d candidate pairs (%d skipped while scanning) -> %s",
             name, inputs.kind, input_path, len(inputs.items), len(inputs.skipped), output)
    chunks = [(inputs.items[i:i + CHUNK], source, max_side, image_format, max_image_bytes)
              for i in range(0, len(inputs.items), CHUNK)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    progress = Progress(f"ingest {name}", len(inputs.items))
    done = 0
    if workers > 1 and len(chunks) > 1:  # spawn: safe even if the caller has threads (JAX)
      pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_ctrl_c)
    results = pool.imap(_process_chunk, chunks) if pool else map(_process_chunk, chunks)
    for (out, skipped), chunk in zip(results, chunks):  # imap keeps input order: deterministic
      for data, src in out:
        writer.add(data, src)
      for row in skipped:
        skips.add(*row)
      done += len(chunk[0])
      progress.update(done, f"{writer.num_written} written, {sum(skips.counts.values())} skipped")
    skips.write(output)
    m = writer.finish(skipped=dict(skips.counts), image_max_side=max_side, created_by="ingest",
                      class_names=inputs.class_names,
                      build={"input": os.path.abspath(input_path), "format": inputs.kind,
                             "max_side": max_side, "shard_size": shard_size,
                             "image_format": image_format, "num_inputs": n_in,
                             "follow_symlinks": follow_symlinks,
                             "max_image_bytes": max_image_bytes})
  except BaseException:
    writer.abort()
    raise
  finally:
    if pool is not None:
      pool.terminate()
  log.info("ingest %s: wrote %d examples in %d shards to %s in %.1f s; skipped %s",
           name, m["num_examples"], len(m["shards"]), output, time.time() - t0,
           dict(skips.counts) or "none")
  return m


def iter_records(data_dir: str) -> Iterator[records.Record]:
  """Reads back every record of a data set folder in order (tests, tools; not the pipeline)."""
  for path in manifest_lib.shard_paths(data_dir):
    r = array_record_module.ArrayRecordReader(path)
    try:
      for data in r.read_all():
        yield records.decode(data)
    finally:
      r.close()


if __name__ == "__main__":  # pragma: no cover
  print("use: jest-pod data ingest --help", file=sys.stderr)
