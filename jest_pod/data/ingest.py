"""Ingest: image-text pairs on disk -> a data set folder (ArrayRecord shards + manifest.json).

Inputs (`--input PATH`):
  (a) a folder (nested) of images, each with a same-stem `.txt` caption (its first non-blank
      line); id = path relative to the folder without extension;
  (b) a `.tsv`/`.csv`/`.txt` list of `image_path<TAB or comma>caption[<sep>class_name]`
      (paths relative to the list file; an optional header row is detected); id = the
      image path without extension; a third column makes the set labelled (class_names);
  (c) WebDataset `.tar` shards as img2dataset writes them (`KEY.jpg|jpeg|png|webp` +
      `KEY.txt`, optional `KEY.json` whose "caption" is used when there is no .txt):
      a `.tar` file, or a folder holding `*.tar` files; id = KEY.
Images are decoded, flattened onto white (alpha), converted to RGB, shrunk to `max_side`
keeping aspect, and re-encoded: JPEG q90 for JPEG/WebP sources (photos), PNG otherwise.

Bad inputs never stop an ingest: each is skipped, counted by reason in the manifest
(`skipped`), named in a log line (the first 20 per reason) and listed in `DIR/skipped.tsv`.
Reasons: missing_image, missing_caption, empty_caption, undecodable_image, duplicate_id,
malformed_line (list rows), undecodable_tar (a truncated/corrupt tar: the members read
before the damage are kept).

Crash safety: shards are written under temporary names, fsynced, renamed to their final
names (`<name>-NNNNN-of-NNNNN.array_record`) once all are written, and the manifest is
written last (atomically). A folder without manifest.json is never a complete data set.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import time
import warnings
from typing import Iterable, Iterator

from PIL import Image

from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
TAR_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
LOG_SKIPS_PER_REASON = 20
DEFAULT_SHARD_SIZE = 10_000
HEADER_NAMES = ("image", "image_path", "path", "file", "filepath", "url")
CHUNK = 128  # inputs per worker task: small enough for smooth progress, big enough to amortise IPC


class OutputNotEmptyError(RuntimeError):
  """The output folder already holds files and --overwrite was not given."""


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
  """Creates `out_dir`; refuses a non-empty one unless `overwrite` (then clears our files)."""
  os.makedirs(out_dir, exist_ok=True)
  entries = [e for e in os.listdir(out_dir)]
  if not entries:
    return
  if not overwrite:
    raise OutputNotEmptyError(
        f"output folder {out_dir!r} is not empty ({len(entries)} entries, e.g. "
        f"{sorted(entries)[0]!r}); pass --overwrite to replace the data set there, "
        f"or choose another --output")
  # Manifest first: from here on the folder no longer claims to be complete.
  mpath = os.path.join(out_dir, manifest_lib.MANIFEST)
  if os.path.exists(mpath):
    os.unlink(mpath)
  for e in entries:
    p = os.path.join(out_dir, e)
    if os.path.isfile(p) and (e.endswith(".array_record") or e.endswith(".tmp")
                              or e == "skipped.tsv"):
      os.unlink(p)
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
    self._counts: list[int] = []
    self._writer = None

  def add(self, data: bytes, source: str) -> None:
    """Appends one serialized record (records.encode output) from `source`."""
    from array_record.python.array_record_module import ArrayRecordWriter
    if self._writer is None:
      path = os.path.join(self.out_dir, f".{self.name}-{len(self._tmp_paths):05d}.array_record.tmp")
      # group_size:1 keeps random access (Grain's global shuffle) one read per record.
      self._writer = ArrayRecordWriter(path, "group_size:1")
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
    """Removes the temporary shards (after an error)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    for p in self._tmp_paths:
      if os.path.exists(p):
        os.unlink(p)

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
    manifest_lib.fsync_dir(self.out_dir)
    m = manifest_lib.make(name=self.name, shards=shards, skipped=skipped,
                          source_counts=dict(self.source_counts), image_max_side=image_max_side,
                          created_by=created_by, class_names=class_names, build=build)
    manifest_lib.write(self.out_dir, m)
    return m


# ---------------------------------------------------------------------------------------
# Inputs: every format becomes a list of Items; workers turn Items into records.


@dataclasses.dataclass(frozen=True)
class Item:
  """One input pair, loaded lazily by a worker.

  image/caption refs: ('path', file) | ('range', file, offset, size) | ('bytes', b) | None;
  a caption ref may also be ('text', str).
  """
  id: str
  image: tuple | None
  caption: tuple | None
  label: int | None = None
  where: str = ""  # for log lines: the file or tar member


@dataclasses.dataclass
class Inputs:
  items: list[Item]
  skipped: list[tuple[str, str, str]]  # (reason, where, detail)
  class_names: list[str] | None = None
  kind: str = ""


def _strip_ext(p: str) -> str:
  return os.path.splitext(p)[0]


def _first_line(text: str) -> str:
  for line in text.splitlines():
    if line.strip():
      return line.strip()
  return ""


def _dedupe(candidates: Iterable[Item], skipped: list) -> list[Item]:
  """Keeps the first Item of each id; later ones are skipped as duplicate_id."""
  seen: dict[str, str] = {}
  out = []
  for it in candidates:
    if it.id in seen:
      skipped.append(("duplicate_id", it.where, f"id {it.id!r} already taken by {seen[it.id]}"))
      continue
    seen[it.id] = it.where
    out.append(it)
  return out


def scan_folder(root: str) -> Inputs:
  """(a) nested folder of images + same-stem .txt captions."""
  images: dict[str, list[str]] = collections.defaultdict(list)
  captions: dict[str, str] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fn in sorted(filenames):
      rel = os.path.relpath(os.path.join(dirpath, fn), root)
      stem, ext = os.path.splitext(rel)
      if ext.lower() in IMAGE_EXTS:
        images[stem].append(rel)
      elif ext.lower() == ".txt":
        captions[stem] = rel
  skipped: list = []
  cands = []
  for stem in sorted(images):
    for rel in images[stem]:
      cap = captions.get(stem)
      cands.append(Item(id=stem.replace(os.sep, "/"),
                        image=("path", os.path.join(root, rel)),
                        caption=("path", os.path.join(root, cap)) if cap else None, where=rel))
  for stem in sorted(set(captions) - set(images)):
    skipped.append(("missing_image", captions[stem], "caption file without a same-stem image"))
  return Inputs(_dedupe(cands, skipped), skipped, kind="folder")


def scan_list(path: str) -> Inputs:
  """(b) TSV/CSV list: image_path<sep>caption[<sep>class_name], paths relative to the list."""
  base = os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8", newline="") as f:
    text = f.read()
  first = text.split("\n", 1)[0]
  delim = "\t" if "\t" in first or path.endswith(".tsv") else ","
  rows = list(csv.reader(io.StringIO(text), delimiter=delim))
  skipped: list = []
  cands = []
  labels: list[tuple[int, str]] = []
  for lineno, row in enumerate(rows, 1):
    if not row or all(not c.strip() for c in row):
      continue
    if lineno == 1 and row[0].strip().lower() in HEADER_NAMES:
      continue  # header row
    where = f"{os.path.basename(path)}:{lineno}"
    if len(row) < 2:
      skipped.append(("malformed_line", where, f"expected image_path{delim!r}caption, got {row!r}"))
      continue
    rel = row[0].strip()
    cands.append(Item(id=_strip_ext(os.path.normpath(rel)).replace(os.sep, "/"),
                      image=("path", os.path.join(base, rel)), caption=("text", row[1]),
                      where=where))
    labels.append((len(cands) - 1, row[2].strip() if len(row) > 2 else ""))
  class_names = None
  if any(name for _, name in labels):
    class_names = sorted({name for _, name in labels if name})
    index = {c: i for i, c in enumerate(class_names)}
    for i, name in labels:
      cands[i] = dataclasses.replace(cands[i], label=index[name] if name else -1)
  return Inputs(_dedupe(cands, skipped), skipped, class_names, kind="list")


def _tar_files(path: str) -> list[str]:
  if os.path.isdir(path):
    return sorted(glob.glob(os.path.join(path, "*.tar"))
                  + glob.glob(os.path.join(path, "*.tar.gz")))
  return [path]


def scan_tars(path: str) -> Inputs:
  """(c) WebDataset tar shards (img2dataset layout): KEY.{jpg,png,webp} + KEY.txt [+ KEY.json]."""
  skipped: list = []
  cands = []
  for tpath in _tar_files(path):
    compressed = not tpath.endswith(".tar")
    groups: dict[str, dict] = collections.OrderedDict()
    try:
      with tarfile.open(tpath, "r:*") as tf:
        for m in tf:
          if not m.isfile():
            continue
          key, ext = os.path.splitext(m.name)
          ext = ext.lower()
          if ext not in TAR_IMAGE_EXTS + (".txt", ".json"):
            continue
          g = groups.setdefault(key, {})
          slot = "image" if ext in TAR_IMAGE_EXTS else ext[1:]
          if slot in g:
            skipped.append(("duplicate_id", f"{os.path.basename(tpath)}:{m.name}",
                            f"second {slot} for key {key!r} in the same tar"))
            continue
          if compressed or ext == ".json":
            ref = ("bytes", tf.extractfile(m).read())
          else:  # uncompressed: workers read the member by offset, no tar parsing
            ref = ("range", tpath, m.offset_data, m.size)
          g[slot] = ref
    except (tarfile.TarError, OSError) as e:
      skipped.append(("undecodable_tar", tpath, str(e)))  # a truncated shard: keep the rest
    for key, g in groups.items():
      where = f"{os.path.basename(tpath)}:{key}"
      caption = g.get("txt")
      if caption is None and "json" in g:
        try:
          meta = json.loads(g["json"][1])
          if isinstance(meta.get("caption"), str):
            caption = ("text", meta["caption"])
        except (ValueError, AttributeError):
          pass
      if "image" not in g:
        skipped.append(("missing_image", where, "tar key without an image member"))
        continue
      cands.append(Item(id=os.path.basename(key), image=g["image"], caption=caption, where=where))
  return Inputs(_dedupe(cands, skipped), skipped, kind="webdataset")


def scan(path: str) -> Inputs:
  """Chooses the input format of `path` (see the module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"ingest input {path!r} does not exist")
  if os.path.isdir(path):
    if glob.glob(os.path.join(path, "*.tar")):
      return scan_tars(path)
    return scan_folder(path)
  low = path.lower()
  if low.endswith((".tar", ".tar.gz", ".tgz")):
    return scan_tars(path)
  if low.endswith((".tsv", ".csv", ".txt")):
    return scan_list(path)
  raise ValueError(f"ingest input {path!r}: expected a folder, a .tsv/.csv list or a .tar shard")


def _read_ref(ref: tuple) -> bytes:
  kind = ref[0]
  if kind == "path":
    with open(ref[1], "rb") as f:
      return f.read()
  if kind == "range":
    with open(ref[1], "rb") as f:
      f.seek(ref[2])
      data = f.read(ref[3])
    if len(data) != ref[3]:
      raise OSError(f"truncated tar member in {ref[1]}")
    return data
  if kind == "bytes":
    return ref[1]
  if kind == "text":
    return ref[1].encode("utf-8")
  raise ValueError(f"unknown ref {kind!r}")


def _process_chunk(args) -> tuple[list, list]:
  """Worker: Items -> ([(record bytes, source)], [(reason, where, detail)])."""
  items, source, max_side, image_format = args
  out, skipped = [], []
  for it in items:
    if it.caption is None:
      skipped.append(("missing_caption", it.where, "no caption (.txt) for this image"))
      continue
    try:
      caption = _first_line(_read_ref(it.caption).decode("utf-8", errors="replace"))
    except OSError as e:
      skipped.append(("missing_caption", it.where, str(e)))
      continue
    if not caption:
      skipped.append(("empty_caption", it.where, "caption is empty"))
      continue
    try:
      data = _read_ref(it.image)
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
    with open(tmp, "w", encoding="utf-8") as f:
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
           overwrite: bool = False, image_format: str = "auto") -> dict:
  """Ingests `input_path` into the data set folder `output`; returns the manifest.

  Args:
    input_path: folder, .tsv/.csv list, or .tar (or folder of .tar) — see module docstring.
    output: data set folder; must be empty or absent unless `overwrite`.
    name: data set name (shard file prefix); default: the output folder's name.
    source: the `source` string of every record; default: `name`.
    max_side: images are shrunk to this max side, aspect kept.
    shard_size: records per shard.
    workers: decode/encode processes; default os.cpu_count(); 0 or 1 = in this process.
  """
  name = name or os.path.basename(os.path.normpath(output))
  source = source or name
  if not os.path.exists(input_path):  # before touching the output folder
    raise FileNotFoundError(f"ingest input {input_path!r} does not exist")
  prepare_output(output, overwrite)
  t0 = time.time()
  inputs = scan(input_path)
  skips = SkipLog(f"ingest {name}")
  for row in inputs.skipped:
    skips.add(*row)
  n_in = len(inputs.items) + len(inputs.skipped)
  log.info("ingest %s: %s input %s: %d candidate pairs (%d skipped while scanning) -> %s",
           name, inputs.kind, input_path, len(inputs.items), len(inputs.skipped), output)
  chunks = [(inputs.items[i:i + CHUNK], source, max_side, image_format)
            for i in range(0, len(inputs.items), CHUNK)]
  workers = (os.cpu_count() or 1) if workers is None else workers
  writer = ShardWriter(output, name, shard_size)
  progress = Progress(f"ingest {name}", len(inputs.items))
  done = 0
  pool = None
  if workers > 1 and len(chunks) > 1:  # spawn: safe even if the caller has threads (JAX)
    pool = multiprocessing.get_context("spawn").Pool(workers)
  try:
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
                             "image_format": image_format, "num_inputs": n_in})
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
  from array_record.python.array_record_module import ArrayRecordReader
  for path in manifest_lib.shard_paths(data_dir):
    r = ArrayRecordReader(path)
    try:
      for data in r.read_all():
        yield records.decode(data)
    finally:
      r.close()


if __name__ == "__main__":  # pragma: no cover
  print("use: jest-pod data ingest --help", file=sys.stderr)
