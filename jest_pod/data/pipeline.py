"""Grain input pipelines: data set specs -> host batches.

Modules: `sources.py` (what a spec opens to: folders, the virtual source, the registry
`sources.KINDS`; the mixture's components and sub-pool) · `prefetch.py` (in-process
read-ahead, skipping bad records) · this file (tagging, decoding, the hosts' shares,
the train and eval iterators).

Training (`make_train_iterator`), per component of the mixture:

    MapDataset.source(sources.open_source(spec))   random access, O(1) start-up; for a
                                   folder a `_SafeSource`: a record on damaged storage
                                   becomes a counted skip, not a crash
                                   (sources.PoolSource: only input.pool_size fixed records)
      .map_with_index(_Tag)        keep the example's index in its source (batch["index"])
      .shuffle(seed_c)             lazy global shuffle (index_shuffle, O(1) memory) ...
      .repeat()                    ... reseeded per epoch: shuffle before repeat, so index
                                   e·len + i is permuted with seed_c + e (tested)
    MapDataset.mix(components, weights)                 only with a mixture
      _HostBlocks                  this host's block of every global batch (its share)
      .map(_Decode)                decode record + image + tokenize (a bad record -> marker)
      .to_iter_dataset(ReadOptions)  threads decode ahead, order kept; with worker_count 0
                                   prefetch.ChunkedPrefetch instead (a task per 32 positions)
    prefetch.SkipBad               drop bad records, count them into `skipped`
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
their index, to measure the pipeline at 2^33 records; other kinds: `sources.KINDS`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from jest_pod.data import decode, prefetch, records, sources
from jest_pod.data import tokenizer as tokenizer_lib
# MAX_PIXELS (the decompression-bomb limit) lives in the leaf module input_config.py
# (config builds configs without the data stack).
from jest_pod.data.input_config import MAX_PIXELS

# Decode threads per process (PIL and sentencepiece release the GIL in their C parts).
# On a 2-core host 2, 3 and 4 threads were within the noise of each other at 32² and 224²
# (`jest-pod bench data`); 1 was slower.
READ_THREADS = 4
# Consecutive positions decoded per thread-pool task with worker_count 0 (prefetch.ChunkedPrefetch).
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
# Transforms: module-level classes so that they pickle into Grain worker processes.


class _Tag(grain.transforms.MapWithIndex):
  """bytes -> {raw, index (in the source), component}."""

  def __init__(self, component: int, length: int, pool: np.ndarray | None = None):
    self.component, self.length, self.pool = component, length, pool

  def map_with_index(self, index, element):
    # Epoch e reads source index i as e·len + i (the source wraps it): keep i.
    i = index % self.length
    if self.pool is not None:  # a sub-pool: its position i is record pool[i] of the set
      i = int(self.pool[i])
    return {"raw": element, "index": i, "component": self.component}


class _Decode(grain.transforms.Map):
  """{raw, index, component} -> example dict (host-batch keys), or {"bad": reason}.

  image float32 [S, S, 3] in [-1, 1]; text int32 [L]; label, source int32; index int64.
  """

  def __init__(self, image_size: int, max_text_len: int,
               tokenizer: tokenizer_lib.Tokenizer, source_ids: Sequence[dict],
               max_pixels: int = MAX_PIXELS, phase1: frozenset | None = None):
    self.image_size, self.max_text_len = image_size, max_text_len
    self.max_pixels = int(max_pixels)
    self.tokenizer = tokenizer
    self.source_ids = [dict(d) for d in source_ids]  # per component: name -> global id
    # Two-phase input's phase 1 (`phase1`: the records its stores could not make rows
    # of): no record is read here (data/two_phase.py); those records are skipped as a
    # failed read or decode would be, so the super-batches are the ones of a full read.
    self.phase1 = phase1

  def map(self, element):
    if self.phase1 is not None:
      if element["index"] in self.phase1:
        return {"bad": "unreadable_or_undecodable", "index": element["index"]}
      return {"index": np.int64(element["index"])}
    if isinstance(element["raw"], sources.Unreadable):  # already logged by _SafeSource
      return {"bad": element["raw"].reason, "index": element["index"]}
    try:
      rec = records.decode(element["raw"])
      image = decode.to_array(rec.image, self.image_size, self.max_pixels)
    except decode.TooManyPixels as e:
      sources.bad_record_log(
          f"source component {element['component']} index {element['index']}: {e}")
      return {"bad": "too_many_pixels", "index": element["index"]}
    except Exception as e:  # bad proto, bad image bytes: skip, never crash a long run
      sources.bad_record_log(f"source component {element['component']} index "
                             f"{element['index']}: {type(e).__name__}: {e}")
      return {"bad": f"{type(e).__name__}", "index": element["index"]}
    return {
        "image": image,
        "text": self.tokenizer.encode(rec.text, self.max_text_len),
        "label": np.int32(-1 if rec.label is None else rec.label),
        "source": np.int32(self.source_ids[element["component"]].get(rec.source, -1)),
        "index": np.int64(element["index"]),
    }


def _ensure_absl_flags_parsed():
  """Grain reads its absl flags when it starts workers (parent) and inside them; a
  program that never ran absl's app.run (pytest, notebooks, our CLI) would raise
  UnparsedFlagAccessError. Mark them parsed: the defaults are what we want."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int):
  """Runs first in each Grain worker process (spawned: nothing parsed there either)."""
  del worker_index, worker_count
  # Ctrl-C reaches the whole process group: the trainer decides what it means (save,
  # then stop its workers); a worker stopped by it would print a traceback.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _ensure_absl_flags_parsed()
  decode.retain_freed_memory()
  logging.basicConfig(level=logging.WARNING)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
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
  """Local position m -> global position offset + (m // b)·b·P + p·b + m % b: host p reads
  the p-th block of b rows of every global batch of b·P, from global position `offset`."""

  def __init__(self, parent, p, pc, b, offset=0):
    super().__init__(parent)
    self.p, self.pc, self.b, self.offset = p, pc, b, offset

  def __len__(self):
    return (len(self._parent) - self.offset) // self.pc

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]

  def _global(self, index: int) -> int:
    q, r = divmod(index, self.b)
    return self.offset + (q * self.pc + self.p) * self.b + r

  def _getitems(self, indices):
    return self._parent._getitems([self._global(i) for i in indices])  # pylint: disable=protected-access


def train_map_dataset(input_config, *, seed: int, process_index: int,
                      process_count: int, block: int = 1, offset: int = 0,
                      phase1: frozenset | None = None) -> grain.MapDataset:
  """This host's infinite, shuffled, decoded examples (before `prefetch.SkipBad` and batching).

  With block = 1, position k is global position offset + process_index + k·process_count;
  with block = b (what training uses), host p reads the p-th block of b rows of every
  global batch of b·process_count, from global position `offset`. Exposed for tests and
  for computing what any position holds without iterating to it. `phase1` (two-phase
  input, phase 1: data/two_phase.py): read no record, skip those records.
  """
  comps = sources.components(input_config)
  tok = tokenizer_lib.resolve(input_config)
  datasets, source_ids, first_id = [], [], 0
  for c, (spec, _) in enumerate(comps):
    source, names = sources.open_source(spec)
    sources.warn_if_upscaled(spec, input_config.image_size)
    source_ids.append({n: first_id + i for i, n in enumerate(names)})
    first_id += len(names)
    pool = sources.pool_indices(len(source), input_config.get("pool_size", 0), spec)
    if pool is not None:
      source = sources.PoolSource(source, pool)
    # Phase 1 reads no record: positions only, shuffled exactly as the records would be.
    ds = (grain.MapDataset.range(len(source)) if phase1 is not None
          else grain.MapDataset.source(source))
    ds = ds.map_with_index(_Tag(c, len(source), pool))
    datasets.append(ds.shuffle(seed=_component_seed(seed, c)).repeat())
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    ds = grain.MapDataset.mix(datasets, [w for _, w in comps])
  if block == 1:
    ds = ds[offset + process_index::process_count]
  else:
    ds = _HostBlocks(ds, process_index, process_count, block, offset)
  return ds.map(_Decode(input_config.image_size, input_config.max_text_len, tok, source_ids,
                        input_config.get("max_pixels", MAX_PIXELS), phase1))


def make_train_iterator(input_config, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        offset: int = 0,
                        phase1: frozenset | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host batches of global_batch_size / process_count examples,
  from global position `offset` of the shuffled stream on.

  Batches: image f32 [b, S, S, 3] in [-1, 1], text i32 [b, L], label i32 [b],
  source i32 [b], index i64 [b], skipped i32 [b]. `get_state()`/`set_state()` restore
  exactly (same worker_count required). process_index/count default to JAX's. With
  `phase1` (phase 1 of two-phase input: the records to skip) batches hold only `index`
  and `skipped`, of the same records as without it.
  """
  decode.retain_freed_memory()  # per-image and per-batch blocks: reuse, do not remap
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                     f"{pc} processes: each host must read the same number of examples")
  b = global_batch_size // pc
  ds = train_map_dataset(input_config, seed=seed, process_index=pi, process_count=pc,
                         block=b, offset=offset, phase1=phase1)
  workers = resolve_worker_count(input_config.get("worker_count", 0))
  # Threads decode ahead; a buffer of ~2 batches keeps memory bounded at large images.
  ahead = min(2 * b, 1024)
  if workers > 0:  # Grain's prefetch: mp_prefetch slices it across the worker processes
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                              prefetch_buffer_size=ahead))
  else:
    chunk = max(1, min(READ_CHUNK, b))
    ds = prefetch.ChunkedPrefetch(ds, READ_THREADS, chunk, max(2, math.ceil(ahead / chunk)))
  ds = prefetch.SkipBad(ds).batch(b, drop_remainder=True)
  if workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=workers,
            per_worker_buffer_size=int(input_config.get("worker_buffer_size", 2))),
        worker_init_fn=_init_worker)
  return iter(ds)


class SwitchingIterator:
  """Batches of `first` global examples for `steps` batches, then batches of `then` from
  global position steps · first on: JEST's super-batches of N, then uniform batches of B
  (config.selection.until). `make(global_batch, offset)` builds each phase's iterator,
  lazily, so a restore builds only the one it needs.

  State {"phase", "read", "offset", "iterator"}: exact resume in either phase. A skipped
  damaged record moves the first phase on by one position, so its batches end a few
  positions past steps · first and the second phase rereads those few (deterministic).
  """

  def __init__(self, make, *, steps: int, first: int, then: int):
    self._make, self.steps, self.first, self.then = make, steps, first, then
    self.phase, self.read, self.offset, self._iter = 0, 0, 0, None

  def _current(self):
    if self.phase == 0 and self.read >= self.steps:  # the switch
      self.phase, self.offset, self._iter = 1, self.steps * self.first, None
    if self._iter is None:
      self._iter = (self._make(self.first, 0) if self.phase == 0
                    else self._make(self.then, self.offset))
    return self._iter

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._current())
    self.read += self.phase == 0
    return batch

  def get_state(self) -> dict:
    return {"phase": self.phase, "read": self.read, "offset": self.offset,
            "iterator": self._current().get_state()}

  def set_state(self, state):
    # In the first phase the switch step follows the config (total_steps may change on
    # resume); once switched, the saved offset keeps the order already begun.
    self.phase, self.read, self.offset = state["phase"], state["read"], state["offset"]
    self._iter = (self._make(self.first, 0) if self.phase == 0
                  else self._make(self.then, self.offset))
    self._iter.set_state(state["iterator"])

  def start_prefetch(self):
    if hasattr(self._iter, "start_prefetch"):
      self._iter.start_prefetch()


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
  source, names = sources.open_source(data_dir)
  tok = tokenizer_lib.resolve({"data": data_dir}, tokenizer)
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
