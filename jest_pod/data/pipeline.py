"""Grain input pipelines: data set folders (or the virtual source) -> host batches.

Training (`make_train_iterator`), per component of the mixture:

    MapDataset.source(ArrayRecordDataSource(shards))   random access, O(1) start-up
      .map_with_index(_Tag)        keep the example's index in its source (batch["index"])
      .shuffle(seed_c)             lazy global shuffle (index_shuffle, O(1) memory) ...
      .repeat()                    ... reseeded per epoch: shuffle before repeat, so index
                                   e·len + i is permuted with seed_c + e (tested)
    MapDataset.mix(components, weights)                 only with a mixture
      [process_index::process_count]                    this host's share of the global order
      .map(_Decode)                decode record + PIL image + tokenize (a bad record -> marker)
      .to_iter_dataset(ReadOptions)                     threads decode ahead, order kept
    _SkipBad                       drop bad records, count them into `skipped`
      .batch(global_batch / process_count)
      .mp_prefetch(worker_count)   when worker_count > 0

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

import io
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from jest_pod.data import ingest
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records, virtual
from jest_pod.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


def default_input_config() -> ml_collections.ConfigDict:
  """The `config.input` fields of the contract (WORKSPACE_NOTES.md), with defaults."""
  c = ml_collections.ConfigDict()
  c.data = ""               # a data set folder, or "virtual:N"
  c.mixture = []            # [(dir, weight), ...]; non-empty overrides `data`
  c.image_size = 32
  c.max_text_len = 16
  c.tokenizer = ""          # '' -> <first data dir>/tokenizer.model
  c.worker_count = 0        # 0 = decode in this process (threads)
  c.worker_buffer_size = 2  # batches buffered per worker process
  return c


# ---------------------------------------------------------------------------------------
# Data sets: folders and the virtual source.


def _names(spec: str) -> list[str]:
  if virtual.is_virtual(spec):
    return list(virtual.SOURCES)
  return list(manifest_lib.read(spec).get("sources", []))


def open_source(spec: str):
  """A data set spec -> (grain random-access source, source names [str])."""
  if virtual.is_virtual(spec):
    return virtual.parse(spec), _names(spec)
  manifest = manifest_lib.read(spec)  # validated: listed shards exist, counts agree
  paths = [os.path.join(spec, s["file"]) for s in manifest["shards"] if s["num_records"] > 0]
  if not paths:
    raise ValueError(f"data set {spec!r} has no records (manifest lists no non-empty shard)")
  return grain.sources.ArrayRecordDataSource(paths), list(manifest.get("sources", []))


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


def _to_array(im: Image.Image, size: int) -> np.ndarray:
  """PIL image -> float32 [size, size, 3] in [-1, 1]; transparency over white (emoji and
  clip-art are RGBA: a plain convert("RGB") would show their hidden pixels, often black)."""
  if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
    im = ingest.flatten_on_white(im.convert("RGBA"))
  im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(im, np.float32) / 127.5 - 1.0


class _Decode(grain.transforms.Map):
  """{raw, index, component} -> example dict (host-batch keys), or {"bad": reason}.

  image float32 [S, S, 3] in [-1, 1]; text int32 [L]; label, source int32; index int64.
  """

  def __init__(self, image_size: int, max_text_len: int,
               tokenizer: tokenizer_lib.Tokenizer, source_ids: Sequence[dict]):
    self.image_size, self.max_text_len = image_size, max_text_len
    self.tokenizer = tokenizer
    self.source_ids = [dict(d) for d in source_ids]  # per component: name -> global id

  def map(self, element):
    try:
      rec = records.decode(element["raw"])
      with Image.open(io.BytesIO(rec.image)) as im:
        image = _to_array(im, self.image_size)
    except Exception as e:  # bad proto, bad image bytes: skip, never crash a long run
      _bad_log(f"source component {element['component']} index {element['index']}: "
               f"{type(e).__name__}: {e}")
      return {"bad": f"{type(e).__name__}", "index": element["index"]}
    return {
        "image": image,
        "text": self.tokenizer.encode_batch([rec.text], self.max_text_len)[0],
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
    q, r = divmod(index, self.b)
    return self._parent[(q * self.pc + self.p) * self.b + r]


def train_map_dataset(input_config, *, seed: int, process_index: int,
                      process_count: int, block: int = 1) -> grain.MapDataset:
  """This host's infinite, shuffled, decoded examples (before `_SkipBad` and batching).

  With block = 1, position k is global position process_index + k·process_count; with
  block = b (what training uses), host p reads the p-th block of b rows of every global
  batch of b·process_count. Exposed for tests and for computing what any position holds
  without iterating to it.
  """
  comps = _components(input_config)
  tok = _tokenizer(input_config.get("tokenizer", ""), comps[0][0])
  datasets, source_ids, offset = [], [], 0
  for c, (spec, _) in enumerate(comps):
    source, names = open_source(spec)
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
  return ds.map(_Decode(input_config.image_size, input_config.max_text_len, tok, source_ids))


def make_train_iterator(input_config, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host batches of global_batch_size / process_count examples.

  Batches: image f32 [b, S, S, 3] in [-1, 1], text i32 [b, L], label i32 [b],
  source i32 [b], index i64 [b], skipped i32 [b]. `get_state()`/`set_state()` restore
  exactly (same worker_count required). process_index/count default to JAX's.
  """
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                     f"{pc} processes: each host must read the same number of examples")
  b = global_batch_size // pc
  ds = train_map_dataset(input_config, seed=seed, process_index=pi, process_count=pc,
                         block=b)
  # Threads decode ahead; a buffer of ~2 batches keeps memory bounded at large images.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4,
                                            prefetch_buffer_size=min(2 * b, 1024)))
  ds = _SkipBad(ds).batch(b, drop_remainder=True)
  workers = int(input_config.get("worker_count", 0))
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
                       process_count: int | None = None) -> grain.DatasetIterator:
  """One ordered pass over this host's records [process_index::process_count].

  Every host yields ceil(ceil(n / P) / batch_size) batches of `batch_size`; the keys of
  the train batch plus `mask` f32 [b] (1 real, 0 padding or a record that failed to
  decode, which also counts in `skipped`). `tokenizer`: path, Tokenizer, or '' for
  data_dir/tokenizer.model.
  """
  pi, pc = _process(process_index, process_count)
  source, names = open_source(data_dir)
  tok = _tokenizer(tokenizer, data_dir)
  per_host = math.ceil(len(source) / pc)
  num_batches = math.ceil(per_host / batch_size)
  decode = _Decode(image_size, max_text_len, tok, [{n: i for i, n in enumerate(names)}])
  ds = (grain.MapDataset.range(num_batches * batch_size)
        .map(_EvalRead(source, pi, pc)).map(_EvalDecode(decode))
        .batch(batch_size))
  # The buffer holds elements (batches here): at least one per read thread, or Grain warns.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=4,
                                                   prefetch_buffer_size=4)))
