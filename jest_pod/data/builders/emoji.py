"""Emoji: Noto Color Emoji glyphs rendered with Pillow, caption = the emoji's English name.

Source: Debian `fonts-noto-color-emoji` (NotoColorEmoji.ttf, a CBDT bitmap font: its only
strike is size 109) and PyPI `emoji` (EMOJI_DATA: fully-qualified emoji and CLDR names).
Each fully-qualified emoji is drawn at size 109 with Pillow (raqm layout shapes ZWJ
sequences), centred on a white square, and shrunk to 64x64. Caption: the name with colons
and underscores removed, e.g. ":man_climbing_medium_skin_tone:" -> "man climbing medium skin
tone"; flags become "flag of <country>". Skipped (counted in the manifest): `blank_glyph`
(the font draws nothing: emoji newer than the font) and `unsupported_sequence` (the font
has no ligature for the sequence and draws its parts side by side).

id: "emoji/<codepoints in hex joined by '-'>", source: "emoji".
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import emoji as emoji_lib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jest_pod.data import system_packages
from jest_pod.data.builders import MAX_SIDE, Example, build_collection, counter

log = logging.getLogger(__name__)

PACKAGES = ["fonts-noto-color-emoji"]
FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the font's only bitmap strike
ORIGIN = "emoji"

_font = None


def caption_of(emoji_char: str, cldr_name: str) -> str:
  """':man_climbing_medium_skin_tone:' -> 'man climbing medium skin tone'."""
  name = cldr_name.strip(":").replace("_", " ")
  name = " ".join(name.split())
  # Flags are regional-indicator pairs or tag sequences; their CLDR name is the bare country.
  if any(0x1F1E6 <= ord(c) <= 0x1F1FF for c in emoji_char) or "\U000E007F" in emoji_char:
    if not name.lower().startswith("flag"):
      name = "flag of " + name
  return name


def emoji_id(emoji_char: str) -> str:
  return ORIGIN + "/" + "-".join(f"{ord(c):x}" for c in emoji_char)


def candidates(limit: int | None = None) -> list[tuple[str, str]]:
  """[(emoji, caption)] of fully-qualified emoji, in EMOJI_DATA order (deterministic)."""
  fq = emoji_lib.STATUS["fully_qualified"]
  out = [(e, caption_of(e, d["en"])) for e, d in emoji_lib.EMOJI_DATA.items()
         if d.get("status") == fq]
  if limit and limit < len(out):  # spread over the (alphabetical) list, not just "a..."
    step = len(out) / limit
    out = [out[int(i * step)] for i in range(limit)]
  return out


def _init_font():
  global _font
  if _font is None:
    _font = ImageFont.truetype(FONT_PATH, FONT_SIZE)
  return _font


def render(emoji_char: str, size: int = MAX_SIDE) -> tuple[np.ndarray | None, str]:
  """Draws one emoji -> (uint8 [size, size, 3] on white, '') or (None, skip reason)."""
  font = _init_font()
  x0, y0, x1, y1 = font.getbbox(emoji_char)
  w, h = x1 - x0, y1 - y0
  if w <= 0 or h <= 0:
    return None, "blank_glyph"
  if w > 1.4 * h:  # parts drawn side by side: the font lacks this ZWJ/modifier sequence
    return None, "unsupported_sequence"
  glyph = Image.new("RGBA", (w, h), (255, 255, 255, 0))
  ImageDraw.Draw(glyph).text((-x0, -y0), emoji_char, font=font, embedded_color=True)
  if glyph.getextrema()[3][1] == 0:
    return None, "blank_glyph"
  side = max(w, h)
  canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
  canvas.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
  im = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(im, dtype=np.uint8), ""


def _render_chunk(chunk):
  return [render(e) for e, _ in chunk]


def load(limit: int | None = None, workers: int | None = None) -> tuple[list[Example], dict]:
  """Renders the emoji -> (examples, skipped counts). Installs the font package if missing."""
  system_packages.ensure(PACKAGES)
  if not os.path.exists(FONT_PATH):
    raise FileNotFoundError(f"{FONT_PATH} not found although {PACKAGES} is installed; "
                            f"check `dpkg -L fonts-noto-color-emoji`")
  t0 = time.time()
  cands = candidates(limit)
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers > 1 and len(cands) > 500:
    step = (len(cands) + workers * 4 - 1) // (workers * 4)
    chunks = [cands[i:i + step] for i in range(0, len(cands), step)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      rendered = [r for part in pool.map(_render_chunk, chunks) for r in part]
  else:
    rendered = _render_chunk(cands)
  examples, skips = [], []
  for (e, caption), (img, reason) in zip(cands, rendered):
    if img is None:
      skips.append(reason)
      continue
    examples.append(Example(id=emoji_id(e), image=img, caption=caption, origin=ORIGIN))
  log.info("emoji: rendered %d of %d in %.1f s (skipped %s)", len(examples), len(cands),
           time.time() - t0, counter(skips))
  return examples, counter(skips)


def build(output: str, limit: int | None = None, overwrite: bool = False,
          workers: int | None = None, seed: int = 0) -> list[dict]:
  """Builds the emoji data set in `output`; returns [manifest]."""
  del seed  # deterministic without randomness
  return build_collection("emoji", load, output, limit, overwrite, workers, MAX_SIDE)
