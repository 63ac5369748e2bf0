"""The row store: one row per record of a data set, beside it, verified row by row — θ*'s
embedding cache (this module's paths and format), and two-phase input's score images and
token rows (score_images.py, token_rows.py) are stores of this kind (`Writer`, `Store`,
`build_rows`: any arrays of fixed row shape). Local stores are read straight from their
shard files (`_LocalRows`), others through tensorstore.

What the cache's rows mean (which reference, which preprocessing) is jest/reference.py's
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

import contextlib
import json
import logging
import os
import shutil
import time
import zlib

import grain
import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils

from jest_pod import lockfile
from jest_pod.data import sources

log = logging.getLogger("jest_pod")

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
  ReferenceCacheError naming the file when it is torn (does not parse, or is not a JSON
  object with a `format`). That error is also logged as a warning, in one line: a caller
  that falls back when no cache is found (`default_path`) then still says why the cache
  beside the data was not used."""
  if is_local(path) and not os.path.isdir(path):
    return None
  r = ts.KvStore.open(_kvstore(path)).result().read(META).result()
  if r.state != "value":
    return None
  try:
    meta = json.loads(bytes(r.value).decode())
    if not isinstance(meta, dict) or "format" not in meta:
      raise ValueError(f"a JSON {type(meta).__name__} without a 'format'")
  except ValueError as e:
    why = " ".join(str(e).split())[:160]
    message = (f"{join(path, META)} is damaged ({why}), so the cache is not used; delete "
               f"{path} and rebuild it with `jest-pod data cache-reference`")
    logging.getLogger("jest_pod").warning("%s", message)
    raise ReferenceCacheError(message) from e
  return meta


def complete_meta(path: str, *, what: str, rebuild: str,
                  error: type = ReferenceCacheError) -> dict:
  """meta.json of the complete store at `path`; `error` naming `rebuild` when it is torn,
  incomplete (its build did not finish) or missing."""
  try:
    meta = read_meta(path)
  except ReferenceCacheError as e:
    raise error(f"{what} {path}: {e}; rebuild with `{rebuild}`") from e
  if meta is None:
    state = ("is incomplete (no meta.json: its build did not finish)"
             if not is_local(path) or os.path.isdir(path) else "does not exist")
    raise error(f"{what} {path} {state}; build it with `{rebuild}`")
  return meta


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


@contextlib.contextmanager
def builder_lock(folder: str):
  """One store builder at a time in a data set folder, and none while the data set is
  rewritten (its writers hold the same FOLDER/.lock): two would interleave OUTPUT.tmp.
  Process 0 holds it; gs:// has no atomic create, so no lock there."""
  if jax.process_index() or not is_local(folder):
    yield
    return
  os.makedirs(folder, exist_ok=True)
  with lockfile.FolderLock(folder, kind="folder", what="store builder or data set writer",
                           fix="Wait for it to finish"):
    yield


def row_checksums(*arrays: np.ndarray) -> np.ndarray:
  """crc32 of each row's bytes, array after array, as stored (for the reference cache:
  image then text, bf16): uint32 [rows]."""
  arrays = [np.ascontiguousarray(a) for a in arrays]
  out = np.empty(len(arrays[0]), np.uint32)
  for r in range(len(out)):
    crc = 0
    for a in arrays:
      crc = zlib.crc32(a[r].tobytes(), crc)
    out[r] = crc
  return out


def reference_arrays(dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """The reference cache's arrays: {name: (row shape, dtype)}."""
  return {"image": ((dim,), "bfloat16"), "text": ((dim,), "bfloat16")}


def _spec(path: str, name: str) -> dict:
  return {"driver": "zarr3", "kvstore": _kvstore(join(path, name))}


def _create(path: str, rows: int, arrays: dict) -> None:
  shapes = {name: ([rows, *row], dtype) for name, (row, dtype) in arrays.items()}
  shapes["check"] = ([rows], "uint32")
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


def _open(path: str, names=ARRAYS, rebuild: str = "jest-pod data cache-reference",
          what: str = "reference cache", cache_bytes: int = 64 << 20):
  # One context: the pool caches shard indices (16 bytes per row) and recent rows.
  ctx = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
  try:
    return tuple(ts.open(_spec(path, name), open=True, context=ctx).result()
                 for name in (*names, "check"))
  except ValueError as e:
    raise ReferenceCacheError(f"{what} {path} cannot be opened ({e}); rebuild it "
                              f"with `{rebuild}`") from e


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Writer:
  """Writes one cache; call it on every process, each with its own rows.

  Locally the cache is built in OUTPUT.tmp and renamed into place by `commit`, so a crash
  leaves the old cache or none; on gs:// meta.json, written last, is the marker (an old
  one is deleted first, so readers see "incomplete" while rewriting).
  """

  def __init__(self, output: str, num_examples: int, arrays: dict, *, process_index: int,
               process_count: int, fmt: str = FORMAT):
    """`arrays`: {name: (row shape, dtype)} (`reference_arrays(dim)` for the cache);
    `fmt` the format recorded in meta.json (readers check it)."""
    self.output, self.names, self.fmt = output, tuple(arrays), fmt
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
      _create(self.work, process_count * self.rows_per_process, arrays)
    _barrier("reference_cache:created")
    *self._arrays, self._check = _open(self.work, self.names)
    self._base = process_index * self.rows_per_process
    self._futures = []
    self._pending, self._written = [], 0  # rows appended, not yet written (whole shards)

  @property
  def layout(self) -> dict:
    return {"process_count": self.process_count, "rows_per_process": self.rows_per_process,
            "shard_rows": SHARD_ROWS}

  def write(self, offset: int, *values: np.ndarray) -> None:
    """This host's rows [offset, offset + n) of each array (in `arrays` order, as stored:
    bf16 [n, d] image and text for the cache), with their checksums."""
    lo, hi = self._base + offset, self._base + offset + len(values[0])
    self._futures += [a[lo:hi].write(v) for a, v in zip(self._arrays, values)]
    self._futures.append(self._check[lo:hi].write(row_checksums(*values)))

  def append(self, *values: np.ndarray) -> None:
    """This host's next rows (in `arrays` order); written a whole shard at a time, so
    each stored shard is written once (`flush` writes the rest)."""
    self._pending.append(values)
    if sum(len(v[0]) for v in self._pending) >= SHARD_ROWS:
      self._write_pending(whole_shards=True)

  def _write_pending(self, whole_shards: bool) -> None:
    if not self._pending:
      return
    values = [np.concatenate(v) for v in zip(*self._pending)]
    n = len(values[0])
    m = (n // SHARD_ROWS) * SHARD_ROWS if whole_shards else n
    if m:
      self.write(self._written, *(v[:m] for v in values))
      self._written += m
    self._pending = [tuple(v[m:] for v in values)] if m < n else []

  def flush(self) -> None:
    """Writes the appended rows still buffered and waits for every write."""
    self._write_pending(whole_shards=False)
    for f in self._futures:
      f.result()
    self._futures = []

  def commit(self, meta: dict) -> None:
    """After every process has flushed (a barrier): process 0 writes meta.json last and
    swaps the folder into place."""
    self.flush()
    _barrier("reference_cache:written")
    if self.process_index == 0:
      meta = {"format": self.fmt, "layout": self.layout, **meta}
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


class _LocalRows:
  """Rows of one local zarr3 array read straight from its shard files (memory-mapped):
  each shard ends with the sharding codec's index, (offset, bytes) per row as uint64 and a
  crc32c, and each row is its raw little-endian bytes (the `bytes` codec, uncompressed).
  Reading b rows is b slices, ~1 µs each, where tensorstore spends ~20 µs a row: what
  phase 1 of two-phase input reads for every scored example. Rows are still checked
  against their crc32 by `Store.read`; anything unexpected falls back to tensorstore."""

  def __init__(self, folder: str, array):
    self.folder, self.dtype = folder, np.dtype(array.dtype.numpy_dtype)
    self.row_shape = tuple(array.shape[1:])
    self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
    self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _shard(self, k: int):
    if k not in self._shards:
      path = os.path.join(self.folder, "c", str(k), *["0"] * len(self.row_shape))
      data = np.memmap(path, np.uint8, mode="r")
      tail = SHARD_ROWS * 16 + 4  # the index: (offset, nbytes) uint64 per row + crc32c
      index = np.frombuffer(data[len(data) - tail:len(data) - 4], "<u8").reshape(-1, 2)
      self._shards[k] = (data, index)
    return self._shards[k]

  def read(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), self.row_bytes), np.uint8)
    span = np.arange(self.row_bytes)
    shard_of = rows // SHARD_ROWS
    for k in np.unique(shard_of):  # one gather per shard touched
      mine = np.flatnonzero(shard_of == k)
      data, index = self._shard(int(k))
      offset, size = index[rows[mine] % SHARD_ROWS].T
      if np.any(size != self.row_bytes) or np.any(offset + size > len(data) - 4):
        raise ValueError(f"shard {k}: not rows of {self.row_bytes} bytes")  # never written
      out[mine] = data[offset[:, None].astype(np.int64) + span]
    return out.view(self.dtype).reshape(len(rows), *self.row_shape)


class Store:
  """A complete cache, rows read on demand and verified against their checksums."""

  def __init__(self, path: str, meta: dict, rebuild: str, *, names=ARRAYS,
               fmt: str = FORMAT, what: str = "reference cache",
               error: type = ReferenceCacheError):
    self._error = error  # raised for a store of another format or a damaged row
    if meta.get("format") != fmt:
      raise error(f"{what} {path} has another format "
                                f"({meta.get('format', '?')}); rebuild it with `{rebuild}`")
    self.path, self.meta, self._rebuild, self._what = path, meta, rebuild, what
    self.num_examples = int(meta["num_examples"])
    self.dim = meta.get("dim")
    self._pc = int(meta["layout"]["process_count"])
    self._rows = int(meta["layout"]["rows_per_process"])
    *self._arrays, self._check = _open(path, names, rebuild, what)
    # Local stores: rows read from the shard files directly (the same bytes, verified).
    self._local = ([_LocalRows(join(path, name), a)
                    for name, a in zip((*names, "check"), (*self._arrays, self._check))]
                   if is_local(path) else None)

  def rows_of(self, index: np.ndarray) -> np.ndarray:
    """Source indices → storage rows (meta["layout"])."""
    index = np.asarray(index, np.int64)
    if index.size and (index.min() < 0 or index.max() >= self.num_examples):
      raise IndexError(f"{self._what} {self.path}: index out of [0, {self.num_examples})")
    return (index % self._pc) * self._rows + index // self._pc

  def read(self, index: np.ndarray) -> list[np.ndarray]:
    """Source indices [b] (int64) → each array's rows as stored; reads b rows and refuses
    the store if any row's bytes differ from its checksum."""
    rows = self.rows_of(np.asarray(index).reshape(-1))
    values = None
    if self._local is not None:
      try:
        values = [a.read(rows) for a in self._local]
      except (ValueError, OSError, IndexError):  # not the layout it expects
        values = None
    if values is None:  # gs://, or tensorstore reads what the shortcut could not
      futures = [a[rows].read() for a in (*self._arrays, self._check)]
      values = [f.result() for f in futures]
    *values, check = values
    bad = np.flatnonzero(row_checksums(*values) != check)
    if bad.size:
      raise self._error(
          f"{self._what} {self.path} is damaged: {bad.size} of {len(rows)} rows read "
          f"(first: record {int(np.asarray(index).reshape(-1)[bad[0]])}) differ from their "
          f"checksums. Rebuild it with `{self._rebuild}`")
    return values

  def lookup(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [b] (int64) → (image [b, d], text [b, d]) float32 (the reference
    cache's rows), verified."""
    image, text = self.read(index)
    return np.asarray(image, np.float32), np.asarray(text, np.float32)


class _RowOf(grain.transforms.Map):
  """Host position k → (record p + k·P, its row or None)."""

  def __init__(self, source, process_index: int, process_count: int, row):
    self.source, self.pi, self.pc, self.row = source, process_index, process_count, row

  def map(self, k):
    i = self.pi + int(k) * self.pc
    raw = self.source[i]
    try:
      out = None if isinstance(raw, sources.Unreadable) else self.row(raw)
    except Exception:  # pylint: disable=broad-except  (the record is listed in meta["bad"])
      out = None
    return i, out


def build_rows(data_dir: str, output: str, arrays: dict, row, *, fmt: str, what: str,
               meta: dict, batch_size: int = 256) -> list[int]:
  """A store of one row per record of `data_dir`: `row(raw record bytes)` → a tuple of
  the `arrays`' rows (as stored), or raises for a record that cannot be made into one (its
  row is zeros and its index goes to meta["bad"]). Call it on every process: host p
  builds records p::P (decoded on 4 threads), logging progress with an ETA; meta.json
  (`meta` + num_examples, bad, seconds) is written last. Returns the bad indices."""
  t_start = time.perf_counter()
  pi, pc = jax.process_index(), jax.process_count()
  n = int(sources.fingerprint(data_dir)["num_examples"])
  source, _ = sources.open_source(data_dir)
  mine = len(range(pi, n, pc))
  blank = tuple(np.zeros(shape, dtype) for shape, dtype in arrays.values())
  writer = Writer(output, n, arrays, process_index=pi, process_count=pc, fmt=fmt)
  bad, done = [], 0
  t0 = last_log = time.perf_counter()
  try:
    ds = grain.MapDataset.range(mine).map(_RowOf(source, pi, pc, row)).batch(
        batch_size, batch_fn=list)
    for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)):
      bad += [i for i, out in batch if out is None]
      rows = [blank if out is None else out for _, out in batch]
      writer.append(*(np.stack([r[a] for r in rows]) for a in range(len(arrays))))
      done += len(batch)
      now = time.perf_counter()
      if now - last_log >= 10.0 and pi == 0:
        rate = done / (now - t0)
        log.info("%s: %d/%d records (this host; %d hosts), %.0f records/s, ETA %.0fs",
                 what, done, mine, pc, rate, (mine - done) / max(rate, 1e-9))
        last_log = now
    writer.flush()
    if pc > 1:  # every host's bad records, into the one meta.json
      counts = multihost_utils.process_allgather(np.array([len(bad)], np.int64))
      padded = np.full(int(np.max(counts)), -1, np.int64)
      padded[:len(bad)] = bad
      bad = [int(i) for i in np.asarray(multihost_utils.process_allgather(padded)).ravel()
             if i >= 0]
    writer.commit({**meta, "num_examples": n, "bad": sorted(bad),
                   "seconds": round(time.perf_counter() - t_start, 2)})
  except BaseException:
    writer.abort()  # a failed build leaves no half-written folder behind
    raise
  if pi == 0:
    log.info("%s: %d records (%d could not be read or decoded) in %.1fs → %s", what, n,
             len(bad), time.perf_counter() - t_start, output)
  return sorted(bad)
