"""Drawing the icons builder's pictures, in parallel, with a per-part cache (icons.py).

Every picture becomes an RGB square of `size` pixels on white (aspect kept, centred):
SVG through resvg (iconify bodies, theme and pictogram files), rasters (PNG, WebP, XPM)
through Pillow, Unicode characters with FreeType. Stored as 8-bit RGB PNG: no alpha to
flatten at training time, and OpenCV decodes a 64x64 PNG in ~0.1 ms.

A part's results go to `<work>/<part key>.part` (written atomically) as soon as its last
picture is drawn, so a rerun after a kill draws only the parts not yet on disk. File
format: 8-byte little-endian header length, a JSON header (entries with their offsets,
skipped counts, licence), then the PNGs back to back.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import os
import struct
import time

import numpy as np
import resvg_py
from PIL import Image, ImageDraw, ImageFont

from jest_pod.data.builders import image_hash
from jest_pod.data.builders.demo import dhash

log = logging.getLogger(__name__)

FORMAT = 1
CHUNK = 192  # pictures per worker task


# ---------------------------------------------------------------------------------------
# Drawing (runs in worker processes).

_fonts: dict = {}


def _square(im: Image.Image, size: int) -> np.ndarray:
  """Any PIL image -> uint8 [size, size, 3]: fitted (up or down), centred on white."""
  if im.mode != "RGBA":
    im = im.convert("RGBA")
  w, h = im.size
  scale = size / max(w, h)
  nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
  if (nw, nh) != (w, h):
    # Premultiplied resize: colours under transparent pixels must not bleed into edges.
    im = im.convert("RGBa").resize((nw, nh), Image.Resampling.LANCZOS).convert("RGBA")
  canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
  canvas.alpha_composite(im, ((size - nw) // 2, (size - nh) // 2))
  return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def _svg(data: dict, size: int) -> Image.Image:
  w, h = data.get("w"), data.get("h")
  kw = {"skip_system_fonts": False}
  if w and h:  # iconify: the box is known, draw straight at the target size
    s = size / max(w, h)
    kw.update(width=max(1, round(w * s)), height=max(1, round(h * s)))
  else:
    kw.update(width=size)  # files: resvg keeps the aspect; refit below if too tall
  png = resvg_py.svg_to_bytes(**data["src"], **kw)
  im = Image.open(io.BytesIO(bytes(png)))
  im.load()
  return im


def draw(job: tuple, size: int) -> np.ndarray:
  """One job -> uint8 [size, size, 3]. Raises on unreadable input."""
  kind = job[0]
  if kind == "svg":  # iconify: ("svg", text, view box width, height)
    return _square(_svg({"src": {"svg_string": job[1]}, "w": job[2], "h": job[3]}, size), size)
  if kind == "file":
    path = job[1]
    if path.lower().endswith((".svg", ".svgz")):
      return _square(_svg({"src": {"svg_path": path}}, size), size)
    with Image.open(path) as im:
      im.load()
      return _square(im, size)
  if kind == "glyph":
    font_path, ch = job[1], job[2]
    key = (font_path, size)
    if key not in _fonts:
      _fonts[key] = ImageFont.truetype(font_path, size * 2)
    font = _fonts[key]
    x0, y0, x1, y1 = font.getbbox(ch)
    if x1 <= x0 or y1 <= y0:
      raise ValueError("blank glyph")
    im = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4), 255)
    ImageDraw.Draw(im).text((2 - x0, 2 - y0), ch, font=font, fill=0)
    margin = max(1, size // 16)
    return np.pad(_square(im, size - 2 * margin), ((margin,) * 2, (margin,) * 2, (0, 0)),
                  constant_values=255)
  raise ValueError(f"unknown job kind {kind!r}")


def encode_png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  return buf.getvalue()


def render_chunk(args) -> list[tuple]:
  """[(png, pixel hash, dhash) or (None, reason, 0)] for a list of jobs."""
  jobs, size = args
  out = []
  for job in jobs:
    try:
      img = draw(job, size)
    except Exception as e:  # resvg and PIL raise many types; one bad file is a skip
      out.append((None, "unreadable_image", f"{type(e).__name__}: {e}"[:200]))
      continue
    if int(img.min()) == int(img.max()):
      out.append((None, "blank_image", ""))
      continue
    out.append((encode_png(img), image_hash(img), dhash(img)))
  return out


# ---------------------------------------------------------------------------------------
# Part cache.


def part_path(work: str, key: str) -> str:
  return os.path.join(work, key.replace("/", "__") + ".part")


def write_part(path: str, items: list[dict], skipped: dict, licence: str, seconds: float) -> None:
  """items: dicts with 'png' (bytes) and JSON-able metadata."""
  header = {"format": FORMAT, "skipped": skipped, "licence": licence, "seconds": seconds,
            "entries": []}
  blobs, off = [], 0
  for it in items:
    meta = {k: v for k, v in it.items() if k != "png"}
    meta["off"], meta["len"] = off, len(it["png"])
    off += len(it["png"])
    blobs.append(it["png"])
    header["entries"].append(meta)
  head = json.dumps(header, ensure_ascii=False).encode()
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for b in blobs:
      f.write(b)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_part(path: str) -> tuple[list[dict], dict, str]:
  """-> (items with 'png', skipped, licence); ValueError if the file is damaged."""
  with open(path, "rb") as f:
    data = f.read()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  if header.get("format") != FORMAT:
    raise ValueError(f"{path}: format {header.get('format')}, want {FORMAT}")
  base = 8 + n
  items = []
  for meta in header["entries"]:
    off, ln = meta.pop("off"), meta.pop("len")
    meta["png"] = data[base + off:base + off + ln]
    if len(meta["png"]) != ln:
      raise ValueError(f"{path}: truncated")
    items.append(meta)
  return items, header["skipped"], header["licence"]


# ---------------------------------------------------------------------------------------
# Runner.


def render_parts(parts, work: str, size: int, workers: int) -> dict[str, tuple]:
  """Draws every part not cached in `work`; returns {key: (items, skipped, licence)} for all
  parts, in `parts` order. Logs progress with an ETA."""
  os.makedirs(work, exist_ok=True)
  results, todo = {}, []
  for p in parts:
    path = part_path(work, p.key)
    if os.path.exists(path):
      try:
        results[p.key] = read_part(path)
        continue
      except (ValueError, OSError, struct.error, json.JSONDecodeError) as e:
        log.warning("cached part %s unreadable (%s); drawing it again", path, e)
    todo.append(p)
  if results:
    log.info("icons: %d of %d parts already drawn (%s); drawing %d", len(results), len(parts),
             work, len(todo))
  total = sum(p.estimate for p in todo)
  done, t0, last = 0, time.time(), 0.0
  pool = (multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and todo else None)
  window = collections.deque()  # (part index, chunk start, AsyncResult or list), in order
  state = {}  # part index -> [part, entries, skipped, licence, results list, t0]

  def finish(i):
    p, entries, skipped, licence, res, pt0 = state.pop(i)
    items, skips = [], collections.Counter(skipped)
    for e, r in zip(entries, res):
      if r[0] is None:
        skips[r[1]] += 1
        continue
      items.append(dict(e.meta(), family=p.family, set=p.set, png=r[0], phash=r[1], dhash=r[2]))
    write_part(part_path(work, p.key), items, dict(skips), licence, time.time() - pt0)
    # Read back: a fresh part then holds exactly what a cached one does (JSON types), so a
    # resumed build writes the same bytes as an uninterrupted one.
    results[p.key] = read_part(part_path(work, p.key))

  def collect_one():
    nonlocal done, last
    i, n, fut = window.popleft()
    res = fut.get() if hasattr(fut, "get") else fut
    state[i][4].extend(res)
    done += n
    if len(state[i][4]) == len(state[i][1]):
      finish(i)
    now = time.time()
    if now - last > 10 or not window:
      last = now
      rate = done / max(now - t0, 1e-9)
      eta = max(total - done, 0) / rate if rate > 0 else 0
      log.info("icons: drew %d/~%d pictures (%.0f/s), %d/%d parts, ETA %s", done, total, rate,
               len(results), len(parts), time.strftime("%H:%M:%S", time.gmtime(eta)))

  def salvage():
    """After a failure: keep the parts whose pictures are all drawn already."""
    try:
      while window and (pool is None or window[0][2].ready()):
        collect_one()
    except Exception:  # pylint: disable=broad-except
      pass  # the original error is the one to report

  try:
    for i, p in enumerate(todo):
      pt0 = time.time()
      try:
        entries, skipped, licence = p.load()
      except BaseException:
        salvage()
        raise
      state[i] = [p, entries, skipped, licence, [], pt0]
      if not entries:
        finish(i)
        continue
      for s in range(0, len(entries), CHUNK):
        jobs = [e.job for e in entries[s:s + CHUNK]]
        while window and (pool is None or len(window) >= 3 * workers):
          collect_one()
        fut = (pool.apply_async(render_chunk, ((jobs, size),)) if pool
               else render_chunk((jobs, size)))
        window.append((i, len(jobs), fut))
      total += len(entries) - p.estimate  # the estimate becomes the real count
    while window:
      collect_one()
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  return {p.key: results[p.key] for p in parts}
