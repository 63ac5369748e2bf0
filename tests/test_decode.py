"""decode.to_array: OpenCV's fast route agrees with a plain PIL decode + resize."""

import io

import numpy as np
import pytest
from PIL import Image

from jest_pod.data import decode


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _pil_reference(data: bytes, size: int) -> np.ndarray:
  """The obvious PIL pipeline: flatten alpha over white, RGB, resize, scale to [-1, 1]."""
  with Image.open(io.BytesIO(data)) as im:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
      rgba = im.convert("RGBA")
      im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
    shrink = min(im.size) >= size
    im = im.convert("RGB").resize(
        (size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32) / 127.5 - 1


def _smooth(h, w, c, seed=0):
  """A smooth random picture (resizers agree on smooth content, not on noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, c), dtype=np.uint8)
  return np.asarray(Image.fromarray(small.squeeze()).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
@pytest.mark.parametrize("src,size", [(64, 32), (28, 32), (48, 48)])
def test_matches_pil_in_every_mode(mode, src, size):
  rgb = _smooth(src, src, 3)
  im = Image.fromarray(rgb, "RGB")
  if mode in ("RGBA", "LA"):
    alpha = np.full((src, src), 255, np.uint8)
    alpha[: src // 3] = 0        # a transparent band: must come out white
    alpha[src // 3: src // 2] = 128
    im = im.convert(mode[:-1]).convert(mode) if mode == "LA" else im.convert("RGBA")
    im.putalpha(Image.fromarray(alpha))
  elif mode == "P":
    im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    im.info["transparency"] = 0
  elif mode != "RGB":
    im = im.convert(mode)
  data = _encode(im)
  out = decode.to_array(data, size)
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  assert out.min() >= -1 and out.max() <= 1
  ref = _pil_reference(data, size)
  # Resizers differ by a few grey levels at edges; a wrong channel order, a lost alpha
  # or an unscaled range would be off by ~0.3 or more.
  assert np.abs(out - ref).mean() < 0.02, np.abs(out - ref).mean()


def test_transparent_pixels_become_white():
  rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
  rgba[0, 0] = [255, 0, 0, 255]          # one opaque red pixel
  out = decode.to_array(_encode(Image.fromarray(rgba, "RGBA")), 4)
  np.testing.assert_allclose(out[0, 0], [1, -1, -1])
  np.testing.assert_allclose(out[3, 3], [1, 1, 1])


def test_sixteen_bit_png():
  grey = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256)
  out = decode.to_array(_encode(Image.fromarray(grey)), 16)
  np.testing.assert_allclose(out[..., 0], (grey >> 8).astype(np.float32) / 127.5 - 1,
                             atol=1e-6)


def test_large_jpeg_decodes_at_reduced_scale_and_stays_close():
  rgb = _smooth(192, 256, 3)
  data = _encode(Image.fromarray(rgb), "JPEG", quality=90)
  out = decode.to_array(data, 24)
  assert out.shape == (24, 24, 3)
  assert np.abs(out - _pil_reference(data, 24)).mean() < 0.03
  # A JPEG at the training size is decoded as is.
  small = _encode(Image.fromarray(_smooth(24, 24, 3)), "JPEG", quality=95)
  assert np.abs(decode.to_array(small, 24) - _pil_reference(small, 24)).mean() < 0.01


def test_gif_goes_through_pil():
  data = _encode(Image.fromarray(_smooth(20, 20, 3)).convert("P"), "GIF")
  out = decode.to_array(data, 20)
  assert np.abs(out - _pil_reference(data, 20)).mean() < 0.01


def test_pixel_bomb_refused_from_header():
  # A PNG header declaring 40,000² pixels: refused before decoding anything.
  data = _encode(Image.new("L", (1, 1)))
  bomb = data[:16] + (40_000).to_bytes(4, "big") * 2 + data[24:]
  assert decode.header_size(bomb)[:2] == (40_000, 40_000)
  with pytest.raises(decode.TooManyPixels, match="max_pixels"):
    decode.to_array(bomb, 16, max_pixels=10_000_000)


def test_garbage_raises():
  with pytest.raises(Exception):
    decode.to_array(b"not an image at all", 8)
