"""Grain input pipelines: data set folders (or the virtual source) -> host batches.

Training (`make_train_iterator`), per component of the mixture:

    MapDataset.source(_SafeSource(shards))   random access, O(1) start-up; a record on
                                   damaged storage becomes a counted skip, not a crash
      .map_with_index(_Tag)        keep the example's index in its source (batch["index"])
      .shuffle(seed_c)             lazy global shuffle (index_shuffle, O(1) memory) ...
      .repeat()                    ... reseeded per epoch: shuffle before repeat, so index
                                   e·len + i is permuted with seed_c + e (tested)
    MapDataset.mix(components, weights)                 only with a mixture
      [process_index::process_count]                    this host's share of the global order
      .map(_Decode)                decode record + PIL image + tokenize (a bad record -> marker)
      .to_iter_dataset(ReadOptions)  threads decode ahead, order kept; with worker_count 0
                                   _ChunkedPrefetch instead (one task per 32 positions)
    _SkipBad                       drop bad records, count them into `skipped`
      .batch(global_batch / process_count)
      .mp_prefetch(worker_count)   when worker_count > 0 (-1 = auto: resolve_worker_count)

Decode sits before `to_iter_dataset` (not after, as in MaxText) so that Grain's read
threads run it in parallel; the shuffled order is unchanged.

Determinism: with worker_count 0, host p's batch at step s holds global positions
{s·B + p·b + k : k < b} (b = B/P): the p-th contiguous block of the single-host batch.
`make_array_from_process_local_data` places host p's rows at exactly those global rows,
so the global batch — and hence JEST's choice, whose noise is keyed by global row — is
the same on any number of hosts (tested with two real processes, and end to end in
tests/test_multihost.py). With workers, each worker batches its own slice, so the order depends
on worker_count (deterministic for a fixed count; keep it fixed across a resume).

`input_config.data` may also be `"virtual:N"` (see `virtual.py`): N records made from
their index, to measure the pipeline at 2^33 records.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grain
import numpy as np

from jest_pod.data import decode
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records, virtual
from jest_pod.data import tokenizer as tokenizer_lib
# MAX_PIXELS (the decompression-bomb limit) and default_input_config() live in the leaf
# module input_config.py (config.py builds configs without the data stack); re-exported.
from jest_pod.data.input_config import MAX_PIXELS, default_input_config  # pylint: disable=unused-import

log = logging.getLogger(__name__)

# Decode threads per process (PIL and sentencepiece release the GIL in their C parts).
# On a 2-core host 2, 3 and 4 threads were within the noise of each other at 32² and 224²
# (`jest-pod bench data`); 1 was slower.
READ_THREADS = 4
# Consecutive positions decoded per thread-pool task with worker_count 0 (_ChunkedPrefetch).
READ_CHUNK = 32


AUTO_MAX_WORKERS = 16


def usable_cpus() -> int:
  """Cores this process may run on (the affinity mask: containers, taskset), else cpu_count."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def resolve_worker_count(worker_count: Any, cpus: int | None = None) -> int:
  """config.input.worker_count -> the number of Grain worker processes (>= 0).

  -1 (auto): 0 with <= 2 usable cores, else min(cores - 1, 16) (one core is left to
  the training process, which also runs the batch transfer).
  """
  w = int(worker_count)
  if w >= 0:
    return w
  if w != -1:
    raise ValueError(f"config.input.worker_count={w}: use >= 0, or -1 for auto")
  cpus = usable_cpus() if cpus is None else int(cpus)
  return 0 if cpus <= 2 else min(cpus - 1, AUTO_MAX_WORKERS)


# ---------------------------------------------------------------------------------------
# Data sets: folders and the virtual source.


def _names(spec: str) -> list[str]:
  if virtual.is_virtual(spec):
    return list(virtual.SOURCES)
  return list(manifest_lib.read(spec, check_files=False).get("sources", []))


class Unreadable:
  """What `_SafeSource` returns for a record it cannot read; `_Decode` skips it."""

  def __init__(self, reason: str):
    self.reason = reason


class _SafeSource:
  """Random-access source over a data set's shards that never raises on damaged storage.

  Delegates to one `grain.sources.ArrayRecordDataSource` per shard, opened on first use
  (per process: it pickles without readers into Grain workers). A record that fails to
  read (Riegeli "chunk data hash mismatch", a truncated chunk, ...) becomes an
  `Unreadable` marker that `_Decode` turns into a counted skip, so a flipped bit costs
  the records of one chunk, not the run; a shard that cannot be opened at all (random
  bytes, lost footer) has all its records returned as markers.

  Only `__getitem__`, no `_getitems`: Grain then reads element by element, exactly as it
  does from `ArrayRecordDataSource` (which has no `_getitems` either).
  """

  def __init__(self, data_dir: str, shards: Sequence[tuple[str, int]]):
    self.data_dir = data_dir
    self.paths = [p for p, _ in shards]
    self.counts = [int(n) for _, n in shards]
    self.ends = list(itertools.accumulate(self.counts))
    self._reset()

  def _reset(self):
    self._sources = [None] * len(self.paths)  # None: not opened; False: cannot open
    self._lock = threading.Lock()

  def __getstate__(self):  # readers and locks do not pickle; each worker reopens lazily
    return {k: v for k, v in self.__dict__.items() if k not in ("_sources", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __len__(self) -> int:
    return self.ends[-1] if self.ends else 0

  def locate(self, index: int) -> tuple[int, int]:
    """Global record index -> (shard number, position in that shard)."""
    shard = bisect.bisect_right(self.ends, index)
    return shard, index - (self.ends[shard - 1] if shard else 0)

  def _open(self, shard: int):
    with self._lock:
      if self._sources[shard] is None:
        path = self.paths[shard]
        try:  # without a [start:end] suffix the constructor opens the file: fails here
          src = grain.sources.ArrayRecordDataSource(path)
        except Exception as e:  # pylint: disable=broad-except
          log.error("cannot open shard %s (%s: %s): its %d records are skipped; run "
                    "`jest-pod data verify %s`, then restore the shard or re-ingest",
                    path, type(e).__name__, e, self.counts[shard], self.data_dir)
          src = False
        else:
          if len(src) != self.counts[shard]:
            log.error("shard %s holds %d records, the manifest says %d: the missing ones "
                      "are skipped; run `jest-pod data verify %s`", path, len(src),
                      self.counts[shard], self.data_dir)
        self._sources[shard] = src
      return self._sources[shard]

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} not in [0, {len(self)})")  # a bug, not storage
    shard, pos = self.locate(index)
    src = self._sources[shard]
    if src is None:
      src = self._open(shard)
    if src is False:
      return Unreadable("shard_unreadable")
    try:
      return src[pos]
    except Exception as e:  # pylint: disable=broad-except
      _bad_log(f"cannot read record {pos} of shard {self.paths[shard]} "
               f"({type(e).__name__}: {e}); run `jest-pod data verify {self.data_dir}`")
      return Unreadable("record_unreadable")


def open_source(spec: str):
  """A data set spec -> (grain random-access source, source names [str])."""
  if virtual.is_virtual(spec):
    return virtual.parse(spec), _names(spec)
  manifest = manifest_lib.read(spec, check_files=False)  # fields and counts agree
  for s in manifest["shards"]:
    if not os.path.exists(os.path.join(spec, s["file"])):
      raise manifest_lib.ManifestError(
          f"shard {os.path.join(spec, s['file'])} listed in the manifest is missing; "
          f"restore it, or rebuild the data set with --overwrite")
  # A size mismatch (a stat per shard, no hashing) warns but does not refuse: the damaged
  # shard's unreadable records become counted skips (`_SafeSource`).
  for line in manifest_lib.size_mismatches(manifest, spec):
    log.warning("damaged shard %s; run `jest-pod data verify %s`", line, spec)
  shards = [(os.path.join(spec, s["file"]), s["num_records"])
            for s in manifest["shards"] if s["num_records"] > 0]
  if not shards:
    raise ValueError(f"data set {spec!r} has no records (manifest lists no non-empty shard)")
  return _SafeSource(spec, shards), list(manifest.get("sources", []))


def _warn_if_upscaled(spec: str, image_size: int) -> None:
  """The manifest's `image_max_side` (ingest --max-side) bounds the stored images: training
  above it enlarges every image (blurry, and decode + resize cost for nothing)."""
  if virtual.is_virtual(spec):
    return
  side = manifest_lib.read(spec, check_files=False).get("image_max_side")
  if side and int(side) < image_size:
    log.warning("%s stores images with max side %d, smaller than image_size=%d: every "
                "image is enlarged; re-ingest with --max-side >= %d", spec, side,
                image_size, image_size)


def _components(input_config) -> list[tuple[str, float]]:
  mixture = list(input_config.get("mixture") or [])
  if mixture:
    out = [(str(d), float(w)) for d, w in mixture]
    if any(w <= 0 for _, w in out):
      raise ValueError(f"mixture weights must be positive: {out}")
    return out
  if not input_config.get("data"):
    raise ValueError("config.input needs `data` (a data set folder) or a `mixture`")
  return [(str(input_config.data), 1.0)]


def source_names(input_config) -> list[str]:
  """Names of the integers in `batch["source"]`: the mixture's manifest sources, in
  component order (component c's ids are offset by the sizes of earlier lists)."""
  names = []
  for spec, _ in _components(input_config):
    names += _names(spec)
  return names


def resolve_tokenizer(input_config) -> tokenizer_lib.Tokenizer:
  """The tokenizer a run's input uses: config.input.tokenizer, else
  <first data dir>/tokenizer.model."""
  return _tokenizer(input_config.get("tokenizer", ""), _components(input_config)[0][0])


def _tokenizer(spec: Any, first_dir: str) -> tokenizer_lib.Tokenizer:
  if isinstance(spec, tokenizer_lib.Tokenizer):
    return spec
  if not spec:
    if virtual.is_virtual(first_dir):
      raise tokenizer_lib.TokenizerError(
          "the virtual source has no tokenizer.model: set config.input.tokenizer to a "
          "tokenizer path (any will do; see jest_pod/bench/data.py)")
    spec = os.path.join(first_dir, tokenizer_lib.MODEL_NAME)
  return tokenizer_lib.Tokenizer(spec)


# ---------------------------------------------------------------------------------------
# Transforms: module-level classes so that they pickle into Grain worker processes.


class _RateLimitedLog:
  """Logs the first few bad records, then at most one line a minute with the count."""

  def __init__(self, first: int = 5, every_s: float = 60.0):
    self.first, self.every_s = first, every_s
    self.count, self.last = 0, 0.0

  def __call__(self, msg: str):
    self.count += 1
    now = time.monotonic()
    if self.count <= self.first or now - self.last >= self.every_s:
      self.last = now
      log.warning("skipping a bad record (%d so far in pid %d): %s",
                  self.count, os.getpid(), msg)


_bad_log = _RateLimitedLog()


class _Tag(grain.transforms.MapWithIndex):
  """bytes -> {raw, index (in the source), component}."""

  def __init__(self, component: int, length: int):
    self.component, self.length = component, length

  def map_with_index(self, index, element):
    # Epoch e reads source index i as e·len + i (the source wraps it): keep i.
    return {"raw": element, "index": index % self.length, "component": self.component}


class _Decode(grain.transforms.Map):
  """{raw, index, component} -> example dict (host-batch keys), or {"bad": reason}.

  image float32 [S, S, 3] in [-1, 1]; text int32 [L]; label, source int32; index int64.
  """

  def __init__(self, image_size: int, max_text_len: int,
               tokenizer: tokenizer_lib.Tokenizer, source_ids: Sequence[dict],
               max_pixels: int = MAX_PIXELS):
    self.image_size, self.max_text_len = image_size, max_text_len
    self.max_pixels = int(max_pixels)
    self.tokenizer = tokenizer
    self.source_ids = [dict(d) for d in source_ids]  # per component: name -> global id

  def map(self, element):
    if isinstance(element["raw"], Unreadable):  # already logged by _SafeSource
      return {"bad": element["raw"].reason, "index": element["index"]}
    try:
      rec = records.decode(element["raw"])
      image = decode.to_array(rec.image, self.image_size, self.max_pixels)
    except decode.TooManyPixels as e:
      _bad_log(f"source component {element['component']} index {element['index']}: {e}")
      return {"bad": "too_many_pixels", "index": element["index"]}
    except Exception as e:  # bad proto, bad image bytes: skip, never crash a long run
      _bad_log(f"source component {element['component']} index {element['index']}: "
               f"{type(e).__name__}: {e}")
      return {"bad": f"{type(e).__name__}", "index": element["index"]}
    return {
        "image": image,
        "text": self.tokenizer.encode(rec.text, self.max_text_len),
        "label": np.int32(-1 if rec.label is None else rec.label),
        "source": np.int32(self.source_ids[element["component"]].get(rec.source, -1)),
        "index": np.int64(element["index"]),
    }


class _SkipBad(grain.IterDataset):
  """Drops `{"bad": ...}` markers; each kept example's `skipped` counts the bad records
  dropped just before it, so `batch["skipped"].sum()` = bad records of that batch."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):
  # Stateless beyond the parent: one __next__ consumes the whole run of bad records.

  def __next__(self):
    skipped = 0
    while True:
      ex = next(self._parent)
      if "bad" in ex:
        skipped += 1
        continue
      ex["skipped"] = np.int32(skipped)
      return ex

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _ChunkedPrefetch(grain.IterDataset):
  """MapDataset -> iterator that reads ahead in chunks of `chunk` consecutive positions,
  one thread-pool task per chunk (worker_count 0 only).

  Grain's `to_iter_dataset(ReadOptions)` submits one future per element; on a small host
  that bookkeeping (futures, locks, per-element stats) cost about as much CPU as decoding
  a 32² PNG. Elements are a pure function of their position, so the order, and the state
  `{"next_index": n}` (the same as Grain's: old checkpoints restore), are unchanged.
  """

  def __init__(self, parent: grain.MapDataset, num_threads: int, chunk: int,
               ahead: int):
    super().__init__(parent)
    self.num_threads, self.chunk, self.ahead = num_threads, chunk, ahead

  def __iter__(self):
    return _ChunkedPrefetchIterator(self._parent, self.num_threads, self.chunk, self.ahead)


def _read_chunk(ds, start: int, stop: int) -> list:
  # Grain's batched read: one call down the chain (one ArrayRecord read of the chunk's
  # records, stats once per chunk); the same elements as [ds[i] for i in range(...)].
  return list(ds._getitems(list(range(start, stop))))  # pylint: disable=protected-access


class _ChunkedPrefetchIterator(grain.DatasetIterator):

  def __init__(self, ds, num_threads: int, chunk: int, ahead: int):
    super().__init__()
    self._ds, self._len = ds, len(ds)
    self._chunk, self._ahead = chunk, ahead
    self._executor = futures.ThreadPoolExecutor(num_threads,
                                                thread_name_prefix="jest-pod-decode")
    self._next = 0           # position of the next element returned (the state)
    self._submitted = 0      # first position not yet submitted
    self._pending = collections.deque()  # futures of consecutive chunks
    self._current, self._offset = [], 0  # the chunk being returned from

  def _fill(self):
    while len(self._pending) < self._ahead and self._submitted < self._len:
      stop = min(self._submitted + self._chunk, self._len)
      self._pending.append(
          self._executor.submit(_read_chunk, self._ds, self._submitted, stop))
      self._submitted = stop

  def __next__(self):
    self._assert_not_closed()
    if self._offset == len(self._current):
      self._fill()
      if not self._pending:
        raise StopIteration
      self._current, self._offset = self._pending.popleft().result(), 0
      self._fill()
    element = self._current[self._offset]
    self._current[self._offset] = None  # do not hold returned elements
    self._offset += 1
    self._next += 1
    return element

  def get_state(self):
    return {"next_index": self._next}

  def set_state(self, state):
    n = int(state["next_index"])
    if not 0 <= n <= self._len:
      raise IndexError(f"checkpoint next_index {n} out of range [0, {self._len}]")
    for f in self._pending:
      f.cancel()
    self._pending.clear()
    self._current, self._offset = [], 0
    self._next = self._submitted = n

  def close(self):
    if not self._closed:
      for f in self._pending:
        f.cancel()
      self._pending.clear()
      try:
        self._executor.shutdown(wait=False, cancel_futures=True)
      except Exception:  # pylint: disable=broad-except
        pass  # called from __del__ at interpreter exit, modules half torn down
    super().close()


def _ensure_absl_flags_parsed():
  """Grain reads its absl flags when it starts workers (parent) and inside them; a
  program that never ran absl's app.run (pytest, notebooks, our CLI) would raise
  UnparsedFlagAccessError. Mark them parsed: the defaults are what we want."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int):
  """Runs first in each Grain worker process (spawned: nothing parsed there either)."""
  del worker_index, worker_count
  _ensure_absl_flags_parsed()
  decode.retain_freed_memory()
  logging.basicConfig(level=logging.WARNING)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


def _component_seed(seed: int, c: int) -> int:
  # Distinct, reproducible shuffles per component; grain wants a uint32 seed.
  return (int(seed) * 1_000_003 + c * 0x9E3779B1) % 2**32


# ---------------------------------------------------------------------------------------
# Training.


class _HostBlocks(grain.MapDataset):
  """Local position m -> global position (m // b)·b·P + p·b + m % b: host p reads the
  p-th block of b rows of every global batch of b·P."""

  def __init__(self, parent, p, pc, b):
    super().__init__(parent)
    self.p, self.pc, self.b = p, pc, b

  def __len__(self):
    return len(self._parent) // self.pc

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]

  def _global(self, index: int) -> int:
    q, r = divmod(index, self.b)
    return (q * self.pc + self.p) * self.b + r

  def _getitems(self, indices):
    return self._parent._getitems([self._global(i) for i in indices])  # pylint: disable=protected-access


def train_map_dataset(input_config, *, seed: int, process_index: int,
                      process_count: int, block: int = 1) -> grain.MapDataset:
  """This host's infinite, shuffled, decoded examples (before `_SkipBad` and batching).

  With block = 1, position k is global position process_index + k·process_count; with
  block = b (what training uses), host p reads the p-th block of b rows of every global
  batch of b·process_count. Exposed for tests and for computing what any position holds
  without iterating to it.
  """
  comps = _components(input_config)
  tok = resolve_tokenizer(input_config)
  datasets, source_ids, offset = [], [], 0
  for c, (spec, _) in enumerate(comps):
    source, names = open_source(spec)
    _warn_if_upscaled(spec, input_config.image_size)
    source_ids.append({n: offset + i for i, n in enumerate(names)})
    offset += len(names)
    ds = grain.MapDataset.source(source).map_with_index(_Tag(c, len(source)))
    datasets.append(ds.shuffle(seed=_component_seed(seed, c)).repeat())
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    ds = grain.MapDataset.mix(datasets, [w for _, w in comps])
  if block == 1:
    ds = ds[process_index::process_count]
  else:
    ds = _HostBlocks(ds, process_index, process_count, block)
  return ds.map(_Decode(input_config.image_size, input_config.max_text_len, tok, source_ids,
                        input_config.get("max_pixels", MAX_PIXELS)))


def make_train_iterator(input_config, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host batches of global_batch_size / process_count examples.

  Batches: image f32 [b, S, S, 3] in [-1, 1], text i32 [b, L], label i32 [b],
  source i32 [b], index i64 [b], skipped i32 [b]. `get_state()`/`set_state()` restore
  exactly (same worker_count required). process_index/count default to JAX's.
  """
  decode.retain_freed_memory()  # per-image and per-batch blocks: reuse, do not remap
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                     f"{pc} processes: each host must read the same number of examples")
  b = global_batch_size // pc
  ds = train_map_dataset(input_config, seed=seed, process_index=pi, process_count=pc,
                         block=b)
  workers = resolve_worker_count(input_config.get("worker_count", 0))
  # Threads decode ahead; a buffer of ~2 batches keeps memory bounded at large images.
  ahead = min(2 * b, 1024)
  if workers > 0:  # Grain's prefetch: mp_prefetch slices it across the worker processes
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                              prefetch_buffer_size=ahead))
  else:
    chunk = max(1, min(READ_CHUNK, b))
    ds = _ChunkedPrefetch(ds, READ_THREADS, chunk, max(2, math.ceil(ahead / chunk)))
  ds = _SkipBad(ds).batch(b, drop_remainder=True)
  if workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=workers,
            per_worker_buffer_size=int(input_config.get("worker_buffer_size", 2))),
        worker_init_fn=_init_worker)
  return iter(ds)


# ---------------------------------------------------------------------------------------
# Evaluation.


class _EvalRead(grain.transforms.Map):
  """Host position k -> the record at global index pi + k·pc, or padding past the end."""

  def __init__(self, source, process_index: int, process_count: int):
    self.source, self.pi, self.pc = source, process_index, process_count

  def map(self, k):
    i = self.pi + int(k) * self.pc
    if i >= len(self.source):
      return {"pad": True, "index": -1}
    return {"raw": self.source[i], "index": i, "component": 0}


class _EvalDecode(grain.transforms.Map):
  """Like `_Decode`, but padding and bad records become zero examples with mask 0, so
  every host yields the same number of full-size batches."""

  def __init__(self, decode: _Decode):
    self.decode = decode

  def map(self, element):
    d = self.decode
    ex = None if "pad" in element else d.map(element)
    if ex is None or "bad" in ex:
      return {"image": np.zeros((d.image_size, d.image_size, 3), np.float32),
              "text": np.zeros((d.max_text_len,), np.int32), "label": np.int32(-1),
              "source": np.int32(-1), "index": np.int64(element["index"]),
              "skipped": np.int32(ex is not None), "mask": np.float32(0)}
    ex["skipped"], ex["mask"] = np.int32(0), np.float32(1)
    return ex


def make_eval_iterator(data_dir: str, *, batch_size: int, image_size: int,
                       max_text_len: int, tokenizer: Any = "",
                       process_index: int | None = None,
                       process_count: int | None = None,
                       max_pixels: int = MAX_PIXELS) -> grain.DatasetIterator:
  """One ordered pass over this host's records [process_index::process_count].

  Every host yields ceil(ceil(n / P) / batch_size) batches of `batch_size`; the keys of
  the train batch plus `mask` f32 [b] (1 real, 0 padding or a record that failed to
  read or decode, or has over `max_pixels` pixels, which also counts in `skipped`). `tokenizer`: path, Tokenizer, or '' for
  data_dir/tokenizer.model.
  """
  decode.retain_freed_memory()
  pi, pc = _process(process_index, process_count)
  source, names = open_source(data_dir)
  tok = _tokenizer(tokenizer, data_dir)
  per_host = math.ceil(len(source) / pc)
  num_batches = math.ceil(per_host / batch_size)
  decoder = _Decode(image_size, max_text_len, tok, [{n: i for i, n in enumerate(names)}],
                   max_pixels)
  ds = (grain.MapDataset.range(num_batches * batch_size)
        .map(_EvalRead(source, pi, pc)).map(_EvalDecode(decoder))
        .batch(batch_size))
  # The buffer holds elements (batches here): at least one per read thread, or Grain warns.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=4,
                                                   prefetch_buffer_size=4)))
