"""Ingest's input side: scanning folders, lists and tars into Items, and bounded reads.

Kept apart from ingest.py (writing, workers, CLI entry) so each stays readable. Rules
(the user-facing text is in ingest.py's docstring):
  * symlinks inside a folder input (files and folders), in a tar folder, and image paths of
    a list are not followed unless `follow_symlinks`; each is a counted skip `symlink`.
    Followed folder links are walked once per real path, so link loops end;
  * list paths: relative ones resolve against the list file's folder (never the current
    directory); absolute ones are used as given;
  * nothing larger than the limits below is read into memory: sizes come from os.stat or
    the tar header first, and every read is bounded;
  * captions must be UTF-8 without control characters (tab allowed); tar ends are checked,
    since tarfile silently stops at a short or bad header after the first member.
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import csv
import dataclasses
import glob
import gzip
import json
import lzma
import os
import re
import stat
import tarfile
import zlib
from typing import Iterable

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
TAR_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
HEADER_NAMES = ("image", "image_path", "path", "file", "filepath", "url")
MAX_CAPTION_BYTES = 64 * 1024  # a caption file / tar member / list field
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # an image file / tar member (default of max_image_bytes)
MAX_LINE_BYTES = MAX_CAPTION_BYTES + 16 * 1024  # a list row: caption + path + class
# Control characters a stored caption may not hold (tab is allowed; line breaks never
# reach here: the caption is the first line).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class TooLarge(Exception):
  """An input is over its byte limit (not an OSError: it must not read as 'missing')."""

  def __init__(self, size: int, limit: int):
    super().__init__(f"{size} bytes > limit {limit}")


@dataclasses.dataclass(frozen=True)
class Item:
  """One input pair, loaded lazily by a worker.

  image/caption refs: ('path', file) | ('range', file, offset, size) | ('bytes', b) |
  ('too_large', size) | None; a caption ref may also be ('text', str).
  """
  id: str
  image: tuple | None
  caption: tuple | None
  label: int | None = None
  where: str = ""  # for log lines: the file or tar member
  cap_where: str = ""  # the caption's file / member, when it differs from `where`


@dataclasses.dataclass
class Inputs:
  items: list[Item]
  skipped: list[tuple[str, str, str]]  # (reason, where, detail)
  class_names: list[str] | None = None
  kind: str = ""


def _strip_ext(p: str) -> str:
  return os.path.splitext(p)[0]


def first_line(text: str) -> str:
  for line in text.splitlines():
    if line.strip():
      return line.strip()
  return ""


def decode_caption(raw: bytes) -> tuple[str | None, str]:
  """Caption bytes -> (None, caption) or (skip reason, detail)."""
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    return "caption_not_utf8", f"invalid UTF-8 at byte {e.start}"
  caption = first_line(text)
  if not caption:
    return "empty_caption", "caption is empty"
  bad = _CONTROL.search(caption)
  if bad:
    return "caption_control_chars", f"control character U+{ord(bad.group()):04X} in the caption"
  return None, caption


def read_ref(ref: tuple, limit: int) -> bytes:
  """The bytes of an image/caption ref, never more than `limit` (else TooLarge)."""
  kind = ref[0]
  if kind == "path":
    st = os.stat(ref[1])  # before opening: a FIFO would block, /dev/zero never ends
    if not stat.S_ISREG(st.st_mode):
      raise OSError(f"{ref[1]} is not a regular file")
    if st.st_size > limit:
      raise TooLarge(st.st_size, limit)
    with open(ref[1], "rb") as f:
      data = f.read(limit + 1)
    if len(data) > limit:  # grew since the stat
      raise TooLarge(len(data), limit)
    return data
  if kind == "range":
    if ref[3] > limit:
      raise TooLarge(ref[3], limit)
    with open(ref[1], "rb") as f:
      f.seek(ref[2])
      data = f.read(ref[3])
    if len(data) != ref[3]:
      raise OSError(f"truncated tar member in {ref[1]}")
    return data
  if kind == "too_large":
    raise TooLarge(ref[1], limit)
  data = ref[1].encode("utf-8") if kind == "text" else ref[1] if kind == "bytes" else None
  if data is None:
    raise ValueError(f"unknown ref {kind!r}")
  if len(data) > limit:
    raise TooLarge(len(data), limit)
  return data


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


def _bad_name(name: str) -> str | None:
  """`name` with \\x escapes if it is not UTF-8 (ids and skipped.tsv are UTF-8), else None."""
  try:
    name.encode("utf-8")
    return None
  except UnicodeEncodeError:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _link_detail(path: str) -> str:
  try:
    target = os.readlink(path)
  except OSError:
    target = "?"
  return f"symlink to {target!r} not followed (pass --follow-symlinks to follow)"


# ---------------------------------------------------------------------------------------
# (a) folders.


def scan_folder(root: str, follow_symlinks: bool = False) -> Inputs:
  """(a) nested folder of images + same-stem .txt captions."""
  images: dict[str, list[str]] = collections.defaultdict(list)
  captions: dict[str, str] = {}
  links: set[str] = set()  # rel paths of symlinked inputs (not followed)
  skipped: list = []
  visited = {os.path.realpath(root)}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
    keep = []
    for d in sorted(dirnames):
      full = os.path.join(dirpath, d)
      rel = os.path.relpath(full, root)
      if os.path.islink(full):
        if not follow_symlinks:
          skipped.append(("symlink", rel + "/", _link_detail(full)))
          continue
        if os.path.realpath(full) in visited:  # a loop, or a folder already walked
          skipped.append(("symlink", rel + "/", "folder already walked (symlink loop)"))
          continue
      visited.add(os.path.realpath(full))
      keep.append(d)
    dirnames[:] = keep
    for fn in sorted(filenames):
      full = os.path.join(dirpath, fn)
      rel = os.path.relpath(full, root)
      stem, ext = os.path.splitext(rel)
      if ext.lower() not in IMAGE_EXTS + (".txt",):
        continue
      if _bad_name(rel):
        skipped.append(("name_not_utf8", _bad_name(rel), "file name is not UTF-8"))
        continue
      if not follow_symlinks and os.path.islink(full):
        links.add(rel)
      if ext.lower() == ".txt":
        captions[stem] = rel
      else:
        images[stem].append(rel)
  cands = []
  for stem in sorted(images):
    for rel in images[stem]:
      cap = captions.get(stem)
      link = rel if rel in links else cap if cap in links else None
      if link:  # the pair is skipped once, naming the link
        skipped.append(("symlink", link, _link_detail(os.path.join(root, link))))
        continue
      cands.append(Item(id=stem.replace(os.sep, "/"), image=("path", os.path.join(root, rel)),
                        caption=("path", os.path.join(root, cap)) if cap else None,
                        where=rel, cap_where=cap or ""))
  for stem in sorted(set(captions) - set(images)):
    cap = captions[stem]
    if cap in links:
      skipped.append(("symlink", cap, _link_detail(os.path.join(root, cap))))
    else:
      skipped.append(("missing_image", cap, "caption file without a same-stem image"))
  return Inputs(_dedupe(cands, skipped), skipped, kind="folder")


# ---------------------------------------------------------------------------------------
# (b) lists.


def _list_lines(f, name: str, skipped: list):
  """Decodes a list file line by line. A bad line (not UTF-8, NUL, over MAX_LINE_BYTES) is
  counted as `name:line` and yields '\\n', so csv's line_num still counts physical lines."""
  lineno = 0
  while True:
    raw = f.readline(MAX_LINE_BYTES + 1)
    if not raw:
      return
    lineno += 1
    where = f"{name}:{lineno}"
    if len(raw) > MAX_LINE_BYTES:
      while raw and not raw.endswith(b"\n"):  # drain the rest, bounded per read
        raw = f.readline(1 << 16)
      skipped.append(("caption_too_large", where, f"line longer than {MAX_LINE_BYTES} bytes"))
      yield "\n"
      continue
    try:
      line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
      skipped.append(("caption_not_utf8", where, f"invalid UTF-8 at byte {e.start} of the line"))
      yield "\n"
      continue
    if "\x00" in line:  # a NUL in a path would crash os.stat
      skipped.append(("malformed_line", where, "NUL byte in the line"))
      yield "\n"
      continue
    yield line


def _symlink_on(base: str, full: str) -> str | None:
  """The first symlink on `full`'s path below `base` (just `full` when outside `base`)."""
  rel = os.path.relpath(full, base)
  if rel == os.pardir or rel.startswith(os.pardir + os.sep):
    return full if os.path.islink(full) else None
  p = base
  for part in rel.split(os.sep):
    p = os.path.join(p, part)
    if os.path.islink(p):
      return p
  return None


def scan_list(path: str, follow_symlinks: bool = False) -> Inputs:
  """(b) TSV/CSV list: image_path<sep>caption[<sep>class_name].

  Relative image paths resolve against the list's folder, absolute ones are used as given.
  """
  base = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  skipped: list = []
  cands = []
  labels: list[tuple[int, str]] = []
  with open(path, "rb") as f:
    first = f.readline(MAX_LINE_BYTES)
    f.seek(0)
    delim = "\t" if b"\t" in first or path.endswith(".tsv") else ","
    reader = csv.reader(_list_lines(f, name, skipped), delimiter=delim)
    end = 0  # physical line where the previous row ended
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        skipped.append(("malformed_line", f"{name}:{reader.line_num}", f"csv: {e}"))
        end = reader.line_num
        continue
      lineno, end = end + 1, reader.line_num
      if not row or all(not c.strip() for c in row):
        continue
      if lineno == 1 and row[0].strip().lower() in HEADER_NAMES:
        continue  # header row
      where = f"{name}:{lineno}"
      if len(row) < 2 or not row[0].strip():
        skipped.append(("malformed_line", where,
                        f"expected image_path{delim!r}caption, got {row!r}"))
        continue
      rel = row[0].strip()
      full = os.path.normpath(os.path.join(base, rel))  # an absolute rel stays as given
      link = None if follow_symlinks else _symlink_on(base, full)
      if link:
        skipped.append(("symlink", where, f"{link}: {_link_detail(link)}"))
        continue
      if not os.path.exists(full):
        skipped.append(("missing_image", where, f"{full} does not exist"))
        continue
      cands.append(Item(id=_strip_ext(os.path.normpath(rel)).replace(os.sep, "/"),
                        image=("path", full), caption=("text", row[1]), where=where))
      labels.append((len(cands) - 1, row[2].strip() if len(row) > 2 else ""))
  class_names = None
  if any(n for _, n in labels):
    class_names = sorted({n for _, n in labels if n})
    index = {c: i for i, c in enumerate(class_names)}
    for i, n in labels:
      cands[i] = dataclasses.replace(cands[i], label=index[n] if n else -1)
  return Inputs(_dedupe(cands, skipped), skipped, class_names, kind="list")


# ---------------------------------------------------------------------------------------
# (c) WebDataset tars.


class _LastRead:
  """Read-through file wrapper keeping the last block read: tarfile stops silently at a
  short or bad header after the first member, so the scanner checks that block itself
  (seeking back instead would re-decompress a whole .tar.gz)."""

  def __init__(self, f, name: str):
    self.f, self.name, self.last = f, name, b""

  def read(self, n: int = -1) -> bytes:
    self.last = self.f.read(n)
    return self.last

  def seek(self, *a):
    return self.f.seek(*a)

  def tell(self) -> int:
    return self.f.tell()


def _decompressed(raw):
  magic = raw.read(6)
  raw.seek(0)
  if magic.startswith(b"\x1f\x8b"):
    return gzip.GzipFile(fileobj=raw, mode="rb")
  if magic.startswith(b"BZh"):
    return bz2.BZ2File(raw)
  if magic.startswith(b"\xfd7zXZ\x00"):
    return lzma.LZMAFile(raw)
  return None


def _tar_files(path: str, follow_symlinks: bool, skipped: list) -> list[str]:
  if not os.path.isdir(path):
    return [path]
  out = []
  found = glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*.tar.gz"))
  for p in sorted(found):
    if not follow_symlinks and os.path.islink(p):
      skipped.append(("symlink", p, _link_detail(p)))
    else:
      out.append(p)
  return out


def _scan_one_tar(tpath: str, max_image_bytes: int, skipped: list) -> dict[str, dict]:
  """KEY -> {slot: ref} for one tar; members over the limits are never read."""
  groups: dict[str, dict] = collections.OrderedDict()
  base = os.path.basename(tpath)
  last_ok = None  # the last member read successfully, for truncation reports
  with contextlib.ExitStack() as stack:
    raw = stack.enter_context(open(tpath, "rb"))
    size = os.fstat(raw.fileno()).st_size
    dec = _decompressed(raw)
    if dec is not None:
      stack.enter_context(dec)
    src = _LastRead(dec or raw, tpath)
    try:
      tf = stack.enter_context(tarfile.open(fileobj=src, mode="r:"))
      for m in tf:
        key, ext = os.path.splitext(m.name)
        ext = ext.lower()
        if ext not in TAR_IMAGE_EXTS + (".txt", ".json"):
          last_ok = m.name
          continue
        where = f"{base}:{m.name}"
        if _bad_name(m.name):
          skipped.append(("name_not_utf8", f"{base}:{_bad_name(m.name)}", "name is not UTF-8"))
          last_ok = m.name
          continue
        if m.issym() or m.islnk():
          skipped.append(("symlink", where, f"tar link to {m.linkname!r} not followed"))
          last_ok = m.name
          continue
        if not m.isfile():
          continue
        g = groups.setdefault(key, {})
        slot = "image" if ext in TAR_IMAGE_EXTS else ext[1:]
        if slot in g:
          skipped.append(("duplicate_id", where, f"second {slot} for key {key!r} in the same tar"))
          continue
        limit = max_image_bytes if slot == "image" else MAX_CAPTION_BYTES
        if m.size > limit:
          ref = ("too_large", m.size)  # counted by the worker; the data is never read
        elif dec is None and ext != ".json":  # workers read by offset, no tar parsing
          if m.offset_data + m.size > size:
            raise EOFError(f"member {m.name!r} is cut short")
          ref = ("range", tpath, m.offset_data, m.size)
        else:
          ref = ("bytes", tf.extractfile(m).read(m.size))
        g[slot] = ref
        last_ok = m.name
      blk = src.last
      if len(blk) < tarfile.BLOCKSIZE:  # short or missing header: the file was cut
        raise EOFError("the tar ends inside a header (no end-of-archive marker)")
      if blk.count(0) != len(blk):
        skipped.append(("undecodable_tar", tpath, f"invalid tar header after member {last_ok!r}; "
                        "the members before it are kept"))
    except (EOFError, tarfile.TarError, zlib.error, lzma.LZMAError, OSError) as e:
      cut = isinstance(e, EOFError) or "unexpected end of data" in str(e)
      skipped.append(("truncated_tar" if cut else "undecodable_tar", tpath,
                      f"{type(e).__name__}: {e}; last member read: {last_ok!r}, "
                      "the members before the damage are kept"))
  return groups


def scan_tars(path: str, follow_symlinks: bool = False,
              max_image_bytes: int = MAX_IMAGE_BYTES) -> Inputs:
  """(c) WebDataset tar shards (img2dataset layout): KEY.{jpg,png,webp} + KEY.txt [+ KEY.json]."""
  skipped: list = []
  cands = []
  for tpath in _tar_files(path, follow_symlinks, skipped):
    groups = _scan_one_tar(tpath, max_image_bytes, skipped)
    for key, g in groups.items():
      where = f"{os.path.basename(tpath)}:{key}"
      caption = g.get("txt")
      if caption is None and "json" in g:
        if g["json"][0] == "too_large":
          caption = g["json"]
        else:
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


def scan(path: str, *, follow_symlinks: bool = False,
         max_image_bytes: int = MAX_IMAGE_BYTES) -> Inputs:
  """Chooses the input format of `path` (see ingest's module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"ingest input {path!r} does not exist")
  if os.path.isdir(path):
    if glob.glob(os.path.join(path, "*.tar")) or glob.glob(os.path.join(path, "*.tar.gz")):
      return scan_tars(path, follow_symlinks, max_image_bytes)
    return scan_folder(path, follow_symlinks)
  low = path.lower()
  if low.endswith((".tar", ".tar.gz", ".tgz")):
    return scan_tars(path, follow_symlinks, max_image_bytes)
  if low.endswith((".tsv", ".csv", ".txt")):
    return scan_list(path, follow_symlinks)
  raise ValueError(f"ingest input {path!r}: expected a folder, a .tsv/.csv list or a .tar shard")
