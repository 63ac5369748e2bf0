"""A virtual data source: 2^33 records made on the fly from their index.

It proves that the pipeline is O(1) in the data set size (start-up, memory, and
restoring an iterator deep into an epoch) without 2^33 records on disk. Each record is
a real serialized tf.train.Example (`records.encode`) holding a tiny PNG and a caption,
so training reads it through exactly the decode path of real shards.

Select it with `config.input.data = "virtual:8589934592"` (or `"virtual"` = 2^33); it is
the `"virtual"` entry of `sources.KINDS`.
Every record is a pure function of its index: `record(i)` is what position i holds.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from jest_pod.data import records

DEFAULT_NUM_RECORDS = 2**33
PREFIX = "virtual"
SOURCES = ["virtual"]
_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]
_SHAPES = ["square", "stripe", "dot", "cross"]
_SIDE = 8  # pixels; small on purpose: this source measures the pipeline, not PIL


def parse(spec: str) -> "VirtualSource":
  """"virtual" or "virtual:N" -> VirtualSource(N)."""
  _, _, n = spec.partition(":")
  return VirtualSource(int(n) if n else DEFAULT_NUM_RECORDS)


# The `sources.KINDS` entry's functions (the spec is "virtual" or "virtual:N").
def open_source(spec: str) -> tuple["VirtualSource", list[str]]:
  return parse(spec), list(SOURCES)


def manifest(spec: str) -> dict:
  del spec
  return {"sources": list(SOURCES)}


def fingerprint(spec: str) -> dict:
  # Records are a pure function of the index: the count and this module's rule say it all.
  return {"num_examples": parse(spec).num_records, "generator": "jest_pod.data.virtual"}


def captions(spec: str) -> Iterator[str]:
  return (record(i).text for i in range(parse(spec).num_records))


def _png(index: int) -> bytes:
  # A colour and a shape from the index, so the caption truly describes the image.
  colour = index % len(_COLOURS)
  shape = (index // len(_COLOURS)) % len(_SHAPES)
  rgb = np.array([(colour * 37) % 256, (colour * 91) % 256, (colour * 151) % 256], np.uint8)
  img = np.full((_SIDE, _SIDE, 3), 255 - rgb, np.uint8)
  if shape == 0:
    img[2:6, 2:6] = rgb
  elif shape == 1:
    img[:, 3:5] = rgb
  elif shape == 2:
    img[3:5, 3:5] = rgb
  else:
    img[3:5, :] = rgb
    img[:, 3:5] = rgb
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def record(index: int) -> records.Record:
  """The record at `index` (a pure function of the index)."""
  colour = _COLOURS[index % len(_COLOURS)]
  shape = _SHAPES[(index // len(_COLOURS)) % len(_SHAPES)]
  return records.Record(image=_png(index), text=f"a {colour} {shape} number {index % 1000}",
                        id=f"virtual-{index}", source=SOURCES[0],
                        label=index % (len(_COLOURS) * len(_SHAPES)))


class VirtualSource:
  """Grain RandomAccessDataSource: `len = num_records`, `[i]` -> serialized Example bytes."""

  def __init__(self, num_records: int = DEFAULT_NUM_RECORDS):
    if num_records <= 0:
      raise ValueError(f"VirtualSource needs a positive size, got {num_records}")
    self.num_records = int(num_records)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index) -> bytes:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"virtual record {index} out of range [0, {self.num_records})")
    return records.encode(record(index))

  def __repr__(self) -> str:
    return f"VirtualSource(num_records={self.num_records})"
