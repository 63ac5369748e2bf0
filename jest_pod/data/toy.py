"""A tiny synthetic data set (coloured shapes with captions) for tests and smoke runs.

`build_toy(DIR, n)` writes a data set folder in the project's record format with a
tokenizer: "a red circle on a blue background", etc. It is learnable in a few dozen
steps, which makes "the loss falls" a real check, and `noise` swaps a share of captions
(source "toy:swapped_caption") so selection has something to reject; `duplicate_images`
stores a share of pictures again under another caption (a retrieval set's "one image,
several captions").
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image, ImageDraw

from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.builders import Example, write_examples


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
          "yellow": (230, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")


def _image(shape, fg, bg, size, rng) -> np.ndarray:
  img = Image.new("RGB", (size, size), COLORS[bg])
  d = ImageDraw.Draw(img)
  r = size * rng.uniform(0.25, 0.4)
  cx, cy = rng.uniform(r, size - r, 2)
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == "circle":
    d.ellipse(box, fill=COLORS[fg])
  elif shape == "square":
    d.rectangle(box, fill=COLORS[fg])
  else:
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
  return np.asarray(img)


def build_toy(out_dir: str, n: int = 512, *, noise: float = 0.0, seed: int = 0,
              image_size: int = 32, vocab_size: int = 64, shards: int = 2,
              labelled: bool = True, duplicate_images: float = 0.0) -> str:
  """Writes `n` examples into `out_dir` (manifest.json, shards, tokenizer.model)."""
  rng = np.random.default_rng(seed)
  colors = list(COLORS)
  examples, drawn = [], []
  for i in range(n):
    # Only draws a number when asked: the default sets stay as they were.
    if duplicate_images and drawn and rng.random() < duplicate_images:
      shape, fg, bg, image = drawn[rng.integers(len(drawn))]
      caption = f"{fg} {shape}, {bg} background"
    else:
      shape = SHAPES[rng.integers(len(SHAPES))]
      fg, bg = rng.choice(colors, 2, replace=False)
      image = _image(shape, fg, bg, image_size, rng)
      drawn.append((shape, fg, bg, image))
      caption = f"a {fg} {shape} on a {bg} background"
    examples.append(Example(id=f"toy-{i}", image=image, caption=caption, origin="toy",
                            label=SHAPES.index(shape) if labelled else None))
  sources = ["toy"] * n
  texts = [ex.caption for ex in examples]
  for i in np.flatnonzero(rng.random(n) < noise):
    examples[i] = dataclasses.replace(examples[i],
                                      caption=texts[(i + 1 + rng.integers(n - 1)) % n])
    sources[i] = "toy:swapped_caption"
  write_examples(out_dir, "toy", examples, skipped={}, sources=sources,
                 build={"builder": "toy", "n": n, "noise": noise, "seed": seed},
                 class_names=list(SHAPES) if labelled else None,
                 shard_size=-(-n // shards), overwrite=True)
  tokenizer_lib.train_tokenizer(texts, os.path.join(out_dir, "tokenizer"), vocab_size)
  return out_dir
