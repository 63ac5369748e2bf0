"""Open Clip Art: ~8.1k clip-art PNGs with captions from their SVG twins (noisy on purpose).

Source: Debian `openclipart-png` (download 131 MB, installed 154 MB) and `openclipart-svg`
(25 MB / 173 MB), both under /usr/share/openclipart/{png,svg}/<category>/.../<stem>.{png,svg}.
Each PNG is flattened onto white, converted to RGB and shrunk to max side 64 (aspect kept).
Caption, from the SVG's Dublin Core metadata: "<title>. <description (first 80 chars)>.
<first 4 keywords>", parts left out when empty or repeating the title; with no title, the
file stem ("2_dead_frogs_lumen_desig_01"). Titles are often the author's name, Italian, or a
file name: a natural "web" noise. Skipped (counted): `blank_image` (nothing drawn),
`undecodable_image`, `oversized_image` (> 4 Mpx: 20 files of 5-620 Mpx that would take
most of the decode time and up to 2.5 GB of memory each).

The PNG decode dominates (~30 s of CPU for all 8.1k); `--limit N` takes N files spread
evenly over the sorted list (all categories), which keeps tests and small demos fast.

id: "openclipart/<category path>/<stem>", source: "openclipart".
"""

from __future__ import annotations

import html
import logging
import math
import multiprocessing
import os
import re
import time
import warnings

import numpy as np
from PIL import Image

from jest_pod.data import ingest as ingest_lib
from jest_pod.data import system_packages
from jest_pod.data.builders import MAX_SIDE, Example, build_collection, counter

log = logging.getLogger(__name__)

PACKAGES = ["openclipart-png", "openclipart-svg"]
ROOT = "/usr/share/openclipart"
ORIGIN = "openclipart"
# 20 of the PNGs are 5-620 Mpx (2.5 GB decoded) and hold 2/3 of all pixels: skip them.
MAX_PIXELS = 4_000_000

_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_CREATOR = re.compile(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", re.S)


def _clean(s: str) -> str:
  return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", s)).split())


def svg_metadata(svg_path: str) -> dict:
  """{'title', 'description', 'keywords' [str], 'creator'} from the SVG's metadata block."""
  try:
    with open(svg_path, "rb") as f:
      head = f.read(32768).decode("utf-8", errors="replace")  # metadata sits at the top
  except OSError:
    return {"title": "", "description": "", "keywords": [], "creator": ""}
  head = head.split("</metadata>", 1)[0]
  title = _TITLE.search(head)
  desc = _DESC.search(head)
  subject = _SUBJECT.search(head)
  creator = _CREATOR.search(head)
  return {"title": _clean(title.group(1)) if title else "",
          "description": _clean(desc.group(1)) if desc else "",
          "keywords": [_clean(k) for k in _LI.findall(subject.group(1))] if subject else [],
          "creator": _clean(creator.group(1)) if creator else ""}


def caption_of(meta: dict, stem: str) -> str:
  """The noisy web-style caption (see module docstring)."""
  title = meta["title"]
  parts = [title or stem]
  desc = meta["description"]
  if desc and desc.lower() != title.lower():
    parts.append(desc[:80].rstrip())
  kws = [k for k in meta["keywords"] if k and k.lower() != title.lower()][:4]
  if kws:
    parts.append(", ".join(kws))
  return ". ".join(p.rstrip(".") for p in parts)


def clean_title(meta: dict) -> str:
  """The title when it looks like a description of the picture, else ''.

  Used for the demo's curated and eval sets: rejects empty titles, the author's own name,
  file-name-like strings, and titles longer than 6 words.
  """
  t = meta["title"]
  if not t or meta["creator"] and t.lower() == meta["creator"].lower():
    return ""
  if re.search(r"[_\\/]|\.(png|svg|jpe?g)$|\d{3,}", t, re.I) or len(t.split()) > 6:
    return ""
  if not re.fullmatch(r"[A-Za-z][A-Za-z '\-,&]*", t):
    return ""
  return t.lower()


def list_files(limit: int | None = None) -> list[str]:
  """Relative stems "<category>/.../<stem>" of PNGs with an SVG twin, sorted; spread-sampled."""
  stems = []
  png_root = os.path.join(ROOT, "png")
  for dirpath, dirnames, filenames in os.walk(png_root):
    dirnames.sort()
    for fn in filenames:
      if fn.endswith(".png"):
        stems.append(os.path.splitext(os.path.relpath(os.path.join(dirpath, fn), png_root))[0])
  stems.sort()
  if limit and limit < len(stems):
    step = len(stems) / limit
    stems = [stems[int(i * step)] for i in range(limit)]
  return stems


def _load_one(stem: str, max_pixels: int = MAX_PIXELS):
  """-> (image uint8 [h, w, 3] or None, skip reason, caption, clean title)."""
  meta = svg_metadata(os.path.join(ROOT, "svg", stem + ".svg"))
  caption = caption_of(meta, os.path.basename(stem))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
      im = Image.open(os.path.join(ROOT, "png", stem + ".png"))
    with im:
      if im.size[0] * im.size[1] > max_pixels:
        return None, "oversized_image", caption, ""
      im.load()
      rgb = ingest_lib.fit(im, MAX_SIDE)
  except Image.DecompressionBombError:
    return None, "oversized_image", caption, ""
  except Exception:  # corrupt PNG: PIL raises several types
    return None, "undecodable_image", caption, ""
  arr = np.asarray(rgb, dtype=np.uint8)
  if arr.std() < 2.0:  # a blank canvas: nothing to see at this size
    return None, "blank_image", caption, ""
  return arr, "", caption, clean_title(meta)


def _load_chunk(args):
  stems, max_pixels = args
  return [_load_one(s, max_pixels) for s in stems]


def load_with_titles(limit: int | None = None, workers: int | None = None,
                     max_pixels: int = MAX_PIXELS) -> tuple[list[Example], dict, dict[str, str]]:
  """-> (examples, skipped counts, {id: clean title or ''}). Installs the packages if missing.

  max_pixels: PNGs larger than this are skipped as `oversized_image` (decode time).
  """
  system_packages.ensure(PACKAGES)
  t0 = time.time()
  stems = list_files(limit)
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers > 1 and len(stems) > 300:
    step = math.ceil(len(stems) / (workers * 8))
    chunks = [(stems[i:i + step], max_pixels) for i in range(0, len(stems), step)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      loaded = [r for part in pool.map(_load_chunk, chunks) for r in part]
  else:
    loaded = _load_chunk((stems, max_pixels))
  examples, skips, titles = [], [], {}
  for stem, (img, reason, caption, title) in zip(stems, loaded):
    if img is None:
      skips.append(reason)
      continue
    ex = Example(id=f"{ORIGIN}/{stem}", image=img, caption=caption, origin=ORIGIN)
    examples.append(ex)
    titles[ex.id] = title
  log.info("openclipart: loaded %d of %d in %.1f s (skipped %s)", len(examples), len(stems),
           time.time() - t0, counter(skips))
  return examples, counter(skips), titles


def load(limit: int | None = None, workers: int | None = None) -> tuple[list[Example], dict]:
  examples, skipped, _ = load_with_titles(limit, workers)
  return examples, skipped


def build(output: str, limit: int | None = None, overwrite: bool = False,
          workers: int | None = None, seed: int = 0) -> list[dict]:
  """Builds the openclipart data set in `output`; returns [manifest]."""
  del seed
  return build_collection("openclipart", load, output, limit, overwrite, workers, MAX_SIDE)
