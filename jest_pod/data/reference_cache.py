"""Storage of the reference cache: θ*'s embeddings of every record of one data set.

What the rows mean (which reference, which preprocessing) is jest/reference.py's
business; this module only stores and verifies them. A cache folder (local or gs://):

  image/, text/   zarr v3 arrays (tensorstore), bfloat16 [rows, d]; shards of SHARD_ROWS
                  rows written whole, read one row at a time (sharding codec, uncompressed),
                  so a look-up of b rows reads ~b × d × 2 bytes: O(batch)
  check/          uint32 [rows]: crc32 of each row's image and text bytes, written by the
                  builder and compared on every look-up, so flipped bytes on disk are
                  refused, never trained on
  meta.json       written last: its presence marks a complete cache (`fingerprint`,
                  temperature, bias, row layout, the build's cost)

Row layout (multi-host builds): host p writes records p::P as one contiguous,
shard-aligned block, so no two hosts write the same shard: record i lives at row
(i % P) · rows_per_process + i // P (P = 1 → row i).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils

from jest_pod.data import sources

CACHE_DIR = "reference_cache"
META = "meta.json"
SHARD_ROWS = 4096      # rows per stored shard (one object / file per shard and array)
READ_ROWS = 1          # rows per read unit inside a shard (the look-up granularity)
FORMAT = "jest_pod reference cache v3 (zarr3 bf16 rows + crc32 per row)"
ARRAYS = ("image", "text")


class ReferenceCacheError(ValueError):
  """A cache that is missing, incomplete, damaged, stale or for other data; the message
  says what to run."""


def _kvstore(path: str) -> dict:
  """A tensorstore kvstore spec of the folder `path` (local or gs://bucket/...)."""
  if path.startswith("gs://"):
    bucket, _, rest = path[len("gs://"):].partition("/")
    rest = rest.strip("/")
    return {"driver": "gcs", "bucket": bucket, "path": rest + "/" if rest else ""}
  if "://" in path:
    raise ReferenceCacheError(f"{path}: only local paths and gs:// are supported")
  return {"driver": "file", "path": os.path.abspath(path) + "/"}


def is_local(path: str) -> bool:
  return "://" not in path


def join(path: str, name: str) -> str:
  return os.path.join(path, name) if is_local(path) else path.rstrip("/") + "/" + name


def read_meta(path: str) -> dict | None:
  """meta.json of the cache at `path`, or None when there is none (missing/incomplete);
  ReferenceCacheError naming the file when it does not parse."""
  if is_local(path) and not os.path.isdir(path):
    return None
  r = ts.KvStore.open(_kvstore(path)).result().read(META).result()
  if r.state != "value":
    return None
  try:
    return json.loads(bytes(r.value).decode())
  except ValueError as e:
    raise ReferenceCacheError(f"{join(path, META)} is damaged ({e}); delete {path} and "
                              "rebuild it with `jest-pod data cache-reference`") from e


def build_path(data_dir: str, output: str | None) -> str:
  """Where a cache of `data_dir` is written: `output`, else DATA/reference_cache, which
  only a folder data set has (another source kind names no folder to write into)."""
  if output:
    return output
  if not sources.is_folder(data_dir):
    raise ReferenceCacheError(
        f"--data {data_dir}: a {sources.scheme(data_dir)!r} source has no folder to hold "
        f"DATA/{CACHE_DIR}; pass --output DIR, and point config.selection.reference_cache "
        "at DIR")
  return join(data_dir, CACHE_DIR)


def default_path(data_dir: str) -> str | None:
  """DATA/reference_cache when it holds a complete cache (meta.json), else None (also for
  a source kind other than a folder: it has no folder to hold one)."""
  if not sources.is_folder(data_dir):
    return None
  path = join(data_dir, CACHE_DIR)
  try:
    return path if read_meta(path) is not None else None
  except Exception:  # pylint: disable=broad-except  (no cache here: the forward pass)
    return None


def row_checksums(image: np.ndarray, text: np.ndarray) -> np.ndarray:
  """crc32 of each row's image and text bytes (bf16 as stored): uint32 [rows]."""
  image, text = np.ascontiguousarray(image), np.ascontiguousarray(text)
  return np.array([zlib.crc32(t.tobytes(), zlib.crc32(i.tobytes()))
                   for i, t in zip(image, text)], np.uint32)


def _spec(path: str, name: str) -> dict:
  return {"driver": "zarr3", "kvstore": _kvstore(join(path, name))}


def _create(path: str, rows: int, dim: int) -> None:
  shapes = {"image": ([rows, dim], "bfloat16"), "text": ([rows, dim], "bfloat16"),
            "check": ([rows], "uint32")}
  for name, (shape, dtype) in shapes.items():
    spec = _spec(path, name)
    chunk = [SHARD_ROWS] + shape[1:]
    spec["metadata"] = {
        "shape": shape, "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [READ_ROWS] + shape[1:],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                             {"name": "crc32c"}]}}]}
    ts.open(spec, create=True, delete_existing=True).result()


def _open(path: str, cache_bytes: int = 64 << 20):
  # One context: the pool caches shard indices (16 bytes per row) and recent rows.
  ctx = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
  try:
    return tuple(ts.open(_spec(path, name), open=True, context=ctx).result()
                 for name in ARRAYS + ("check",))
  except ValueError as e:
    raise ReferenceCacheError(f"reference cache {path} cannot be opened ({e}); rebuild it "
                              "with `jest-pod data cache-reference`") from e


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Writer:
  """Writes one cache; call it on every process, each with its own rows.

  Locally the cache is built in OUTPUT.tmp and renamed into place by `commit`, so a crash
  leaves the old cache or none; on gs:// meta.json, written last, is the marker (an old
  one is deleted first, so readers see "incomplete" while rewriting).
  """

  def __init__(self, output: str, num_examples: int, dim: int, *, process_index: int,
               process_count: int):
    self.output = output
    self.process_index, self.process_count = process_index, process_count
    per_host = -(-num_examples // process_count)
    self.rows_per_process = (per_host if process_count == 1
                             else -(-per_host // SHARD_ROWS) * SHARD_ROWS)
    self.work = output + ".tmp" if is_local(output) else output
    if process_index == 0:
      if is_local(output):
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
      elif read_meta(output) is not None:
        ts.KvStore.open(_kvstore(output)).result().delete(META).result()
      _create(self.work, process_count * self.rows_per_process, dim)
    _barrier("reference_cache:created")
    self._image, self._text, self._check = _open(self.work)
    self._base = process_index * self.rows_per_process
    self._futures = []

  @property
  def layout(self) -> dict:
    return {"process_count": self.process_count, "rows_per_process": self.rows_per_process,
            "shard_rows": SHARD_ROWS}

  def write(self, offset: int, image: np.ndarray, text: np.ndarray) -> None:
    """This host's rows [offset, offset + n) (bf16 [n, d] each), with their checksums."""
    lo, hi = self._base + offset, self._base + offset + len(image)
    self._futures += [self._image[lo:hi].write(image), self._text[lo:hi].write(text),
                      self._check[lo:hi].write(row_checksums(image, text))]

  def flush(self) -> None:
    for f in self._futures:
      f.result()
    self._futures = []

  def commit(self, meta: dict) -> None:
    """After every process has flushed (a barrier): process 0 writes meta.json last and
    swaps the folder into place."""
    self.flush()
    _barrier("reference_cache:written")
    if self.process_index == 0:
      meta = {"format": FORMAT, "layout": self.layout, **meta}
      ts.KvStore.open(_kvstore(self.work)).result().write(
          META, json.dumps(meta, indent=1).encode()).result()
      if is_local(self.output):  # swap: a crash leaves the old cache or the new
        old = self.output + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.output):
          os.rename(self.output, old)
        os.rename(self.work, self.output)
        shutil.rmtree(old, ignore_errors=True)
    _barrier("reference_cache:done")

  def abort(self) -> None:
    if self.process_index == 0 and is_local(self.output):
      shutil.rmtree(self.work, ignore_errors=True)


class Store:
  """A complete cache, rows read on demand and verified against their checksums."""

  def __init__(self, path: str, meta: dict, rebuild: str):
    if meta.get("format") != FORMAT:
      raise ReferenceCacheError(f"reference cache {path} has another format "
                                f"({meta.get('format', '?')}); rebuild it with `{rebuild}`")
    self.path, self.meta, self._rebuild = path, meta, rebuild
    self.num_examples = int(meta["num_examples"])
    self.dim = int(meta["dim"])
    self._pc = int(meta["layout"]["process_count"])
    self._rows = int(meta["layout"]["rows_per_process"])
    self._image, self._text, self._check = _open(path)

  def rows_of(self, index: np.ndarray) -> np.ndarray:
    """Source indices → storage rows (meta["layout"])."""
    index = np.asarray(index, np.int64)
    if index.size and (index.min() < 0 or index.max() >= self.num_examples):
      raise IndexError(f"reference cache {self.path}: index out of [0, {self.num_examples})")
    return (index % self._pc) * self._rows + index // self._pc

  def lookup(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [b] (int64) → (image [b, d], text [b, d]) float32; reads b rows and
    refuses the cache if any row's bytes differ from its checksum."""
    rows = self.rows_of(np.asarray(index).reshape(-1))
    fi, ft, fc = (a[rows].read() for a in (self._image, self._text, self._check))
    image, text, check = fi.result(), ft.result(), fc.result()
    bad = np.flatnonzero(row_checksums(image, text) != check)
    if bad.size:
      raise ReferenceCacheError(
          f"reference cache {self.path} is damaged: {bad.size} of {len(rows)} rows read "
          f"(first: record {int(np.asarray(index).reshape(-1)[bad[0]])}) differ from their "
          f"checksums. Rebuild it with `{self._rebuild}`")
    return np.asarray(image, np.float32), np.asarray(text, np.float32)
