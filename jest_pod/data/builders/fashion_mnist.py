"""Fashion-MNIST: 70k 28x28 grey garments in 10 classes, labelled, template captions.

Source: Debian `dataset-fashion-mnist` (download 31 MB): the four idx .gz files in
/usr/share/datasets/fashion-mnist (found with `dpkg -L`). Images are stored as 28x28 RGB
PNG (grey replicated: the pipeline contract is 3 channels), label = class index, caption =
TEMPLATES[i % 5] with the class name, e.g. "a photo of a sneaker.". `build` writes two data
sets, OUTPUT/train (60k) and OUTPUT/test (10k), each with class_names in its manifest.
`--limit N` keeps the first N of each split.

id: "fashion_mnist/<split>/<index>", source: "fashion_mnist".
"""

from __future__ import annotations

import gzip
import logging
import os

import numpy as np

from jest_pod.data import manifest as manifest_lib
from jest_pod.data import system_packages
from jest_pod.data.builders import Example, check_reuse, write_examples

log = logging.getLogger(__name__)

PACKAGES = ["dataset-fashion-mnist"]
ORIGIN = "fashion_mnist"
# Order = the data set's label ids 0..9.
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.",
             "a low resolution photo of a {}.", "a picture of a {}.", "a product photo of a {}."]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def data_dir() -> str:
  """The folder of the idx files, from `dpkg -L dataset-fashion-mnist`."""
  system_packages.ensure(PACKAGES)
  for path in system_packages.files_of("dataset-fashion-mnist"):
    if path.endswith(_FILES["train"][0]):
      return os.path.dirname(path)
  raise FileNotFoundError("dataset-fashion-mnist is installed but has no "
                          f"{_FILES['train'][0]} (see `dpkg -L dataset-fashion-mnist`)")


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (images uint8 [n, 28, 28], labels uint8 [n]) of 'train' (60k) or 'test' (10k)."""
  d = data_dir()
  images = _read_idx(os.path.join(d, _FILES[split][0]))
  labels = _read_idx(os.path.join(d, _FILES[split][1]))
  return images, labels


def caption_of(label: int, index: int) -> str:
  return TEMPLATES[index % len(TEMPLATES)].format(CLASS_NAMES[label])


def example(split: str, index: int, image: np.ndarray, label: int, caption: str | None = None
            ) -> Example:
  """One Example from a [28, 28] grey image (stored RGB)."""
  rgb = np.repeat(image[:, :, None], 3, axis=2)
  return Example(id=f"{ORIGIN}/{split}/{index}", image=rgb,
                 caption=caption if caption is not None else caption_of(int(label), index),
                 origin=ORIGIN, label=int(label))


def load(split: str = "train", limit: int | None = None, workers: int | None = None
         ) -> tuple[list[Example], dict]:
  del workers  # decoding idx files is one numpy read
  images, labels = load_arrays(split)
  n = len(images) if limit is None else min(limit, len(images))
  return [example(split, i, images[i], labels[i]) for i in range(n)], {}


def build(output: str, limit: int | None = None, overwrite: bool = False,
          workers: int | None = None, seed: int = 0) -> list[dict]:
  """Builds OUTPUT/train and OUTPUT/test; returns their manifests."""
  del seed
  args = {"builder": "fashion_mnist", "limit": limit}
  outs = {s: os.path.join(output, s) for s in ("train", "test")}
  if check_reuse(list(outs.values()), args, overwrite):
    return [manifest_lib.read(o) for o in outs.values()]
  manifests = []
  for split, out in outs.items():
    examples, skipped = load(split, limit, workers)
    manifests.append(write_examples(out, f"fashion_mnist_{split}", examples, skipped=skipped,
                                    build=args, class_names=CLASS_NAMES, overwrite=overwrite))
  return manifests
