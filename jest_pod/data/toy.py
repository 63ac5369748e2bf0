"""A tiny synthetic data set (coloured shapes with captions) for tests and smoke runs.

`build_toy(DIR, n)` writes a data set folder in the project's record format with a
tokenizer: "a red circle on a blue background", etc. It is learnable in a few dozen
steps, which makes "the loss falls" a real check, and `noise` swaps a share of captions
(source "toy:swapped_caption") so selection has something to reject.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from jest_pod.data import records

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
          "yellow": (230, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")


def _image(shape, fg, bg, size, rng) -> bytes:
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
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def build_toy(out_dir: str, n: int = 512, *, noise: float = 0.0, seed: int = 0,
              image_size: int = 32, vocab_size: int = 64, shards: int = 2,
              labelled: bool = True) -> str:
  """Writes `n` examples into `out_dir` (manifest.json, shards, tokenizer.model)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  from jest_pod.data import tokenizer as tokenizer_lib
  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  colors = list(COLORS)
  recs = []
  for i in range(n):
    shape = SHAPES[rng.integers(len(SHAPES))]
    fg, bg = rng.choice(colors, 2, replace=False)
    recs.append(records.Record(image=_image(shape, fg, bg, image_size, rng),
                               text=f"a {fg} {shape} on a {bg} background", id=f"toy-{i}",
                               source="toy", label=SHAPES.index(shape) if labelled else None))
  swapped = rng.random(n) < noise
  texts = [r.text for r in recs]
  for i in np.flatnonzero(swapped):
    recs[i] = records.Record(image=recs[i].image, text=texts[(i + 1 + rng.integers(n - 1)) % n],
                             id=recs[i].id, source="toy:swapped_caption", label=recs[i].label)
  sources = sorted({r.source for r in recs})
  shard_info = []
  for s in range(shards):
    name = f"toy-{s:05d}-of-{shards:05d}.array_record"
    w = ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
    part = recs[s::shards]
    for r in part:
      w.write(records.encode(r))
    w.close()
    shard_info.append({"file": name, "num_records": len(part)})
  manifest = {"name": "toy", "num_examples": n, "shards": shard_info, "skipped": {},
              "sources": sources,
              "source_counts": {s: sum(r.source == s for r in recs) for s in sources},
              "image_max_side": image_size, "created_by": "jest_pod.data.toy.build_toy"}
  if labelled:
    manifest["class_names"] = list(SHAPES)
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  tokenizer_lib.train_tokenizer([r.text for r in recs], os.path.join(out_dir, "tokenizer"),
                                vocab_size)
  return out_dir
