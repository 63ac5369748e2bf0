"""Stored image bytes -> float32 [S, S, 3] in [-1, 1] at the training size.

The input pipeline's per-example cost on a host is mostly here, so it uses OpenCV: its
decoders and resize run in C with the GIL released (the decode threads use every core)
and with almost no Python per image. Measured on the demo's 64² PNGs at 32² (WORKSPACE_NOTES,
"Input"): ~100 µs per image against ~230 µs through PIL, whose `Image.open` alone costs
~60 µs of Python.

- The size is read from the header before decoding, so a small file declaring 40,000²
  pixels (a decompression bomb) is refused before any memory is spent (`TooManyPixels`).
- A JPEG larger than the target is decoded at a reduced DCT scale (1/2, 1/4, 1/8: the
  smallest that keeps both sides >= S), then resized: a 256² JPEG at 32² decodes 8x less.
- Transparency is flattened over white (emoji and clip art are RGBA: dropping alpha would
  show the colours hidden under transparent pixels, often black).
- Shrinking by 2x or more uses area averaging, anything else bilinear; the aspect ratio
  is not kept (the image is stretched to S x S), as the towers expect.
- What OpenCV cannot read (GIF, odd modes) goes through PIL, with the same rules.
"""

from __future__ import annotations

import ctypes
import functools
import io
import struct

import cv2
import numpy as np
from PIL import Image

# One OpenCV thread per call: the pipeline already decodes on several threads, and
# OpenCV's own pool on top would oversubscribe the host's cores.
cv2.setNumThreads(1)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}


@functools.cache  # process-wide: once is enough
def retain_freed_memory() -> None:
  """Ask glibc's malloc to keep freed blocks for reuse instead of returning them to the OS.

  Every decoded 224² image and every host batch is a fresh block above malloc's default
  mmap threshold (128 KiB), so each one is mapped, page-faulted in and unmapped again.
  On the VMs measured that costs more than the arithmetic: converting one 224² image to
  float took 430 µs this way and 90 µs with blocks reused (WORKSPACE_NOTES, "Input").
  Process-wide, so called by the input pipeline's entry points (and in each Grain worker)
  rather than on import; a no-op where libc is not glibc.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
  libc.mallopt(m_mmap_threshold, 64 << 20)   # blocks up to 64 MiB come from the heap
  libc.mallopt(m_trim_threshold, 512 << 20)  # keep up to 512 MiB of free heap mapped


class TooManyPixels(ValueError):
  """The header declares more pixels than the configured limit."""


def header_size(data: bytes) -> tuple[int, int, str]:
  """(width, height, format) from the header only. PNG is parsed directly (its IHDR
  chunk sits at a fixed offset); everything else through PIL's lazy open."""
  if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
    w, h = struct.unpack(">II", data[16:24])
    return w, h, "PNG"
  with Image.open(io.BytesIO(data)) as im:
    return im.size[0], im.size[1], im.format or ""


def _rgb8(a: np.ndarray) -> np.ndarray:
  """OpenCV's decoded array (grey, grey+alpha, BGR or BGRA; 8 or 16 bit) -> RGB uint8,
  transparent pixels over white."""
  if a.dtype == np.uint16:
    a = (a >> 8).astype(np.uint8)
  elif a.dtype != np.uint8:
    raise ValueError(f"unsupported pixel type {a.dtype}")
  if a.ndim == 2:
    return cv2.cvtColor(a, cv2.COLOR_GRAY2RGB)
  if a.shape[2] == 2:  # grey + alpha
    a = np.dstack([cv2.cvtColor(a[..., 0], cv2.COLOR_GRAY2BGR), a[..., 1]])
  if a.shape[2] == 4:
    alpha = a[..., 3:].astype(np.float32) * np.float32(1 / 255)
    bgr = a[..., :3].astype(np.float32) * alpha + np.float32(255) * (1 - alpha)
    a = np.rint(bgr).astype(np.uint8)
  return cv2.cvtColor(a, cv2.COLOR_BGR2RGB)


def _pil_rgb8(data: bytes) -> np.ndarray:
  """The PIL route, for what OpenCV cannot decode."""
  with Image.open(io.BytesIO(data)) as im:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
      rgba = im.convert("RGBA")
      im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
    return np.asarray(im.convert("RGB"))


def to_array(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
  """Image bytes -> float32 [size, size, 3] in [-1, 1]. Raises TooManyPixels above
  `max_pixels`, ValueError on bytes that no decoder reads."""
  return to_float(to_pixels(data, size, max_pixels))


def to_pixels(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
  """Image bytes -> uint8 RGB [size, size, 3] (what `to_array` scales to [-1, 1])."""
  w, h, fmt = header_size(data)
  if max_pixels is not None and w * h > max_pixels:
    raise TooManyPixels(f"{w}x{h} image exceeds max_pixels={max_pixels}")
  flags = cv2.IMREAD_UNCHANGED
  if fmt == "JPEG":  # JPEG has no alpha: the colour decoder, at a reduced scale if it fits
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    for r in (8, 4, 2):
      if min(w, h) // r >= size:
        flags = _JPEG_REDUCED[r] | cv2.IMREAD_IGNORE_ORIENTATION
        break
  a = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  a = _pil_rgb8(data) if a is None else _rgb8(a)
  if a.shape[:2] != (size, size):
    # Area averaging where aliasing would show (>= 2x smaller); bilinear otherwise: at
    # 256² -> 224² it is 3x cheaper than area and looks the same.
    shrink = min(a.shape[:2]) >= 2 * size
    a = cv2.resize(a, (size, size),
                   interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
  return a


def to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 RGB → float32 in [-1, 1], the towers' input (the one conversion, so stored
  uint8 score images become the same bits as a decode)."""
  out = np.divide(pixels, np.float32(127.5), dtype=np.float32)
  out -= np.float32(1.0)
  return out
