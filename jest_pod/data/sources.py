"""What a data set spec (`config.input.data`, a mixture component, an eval set) opens to.

A spec names its kind by a scheme prefix: `"virtual"` / `"virtual:N"` is the virtual
source (`virtual.py`); anything else is a data set folder (manifest.json + ArrayRecord
shards). `KINDS` maps each scheme to a `SourceKind`, and every caller that needs to know
what a spec is goes through it (`kind`, `open_source`, `manifest_of`, `tokenizer_path`,
`fingerprint`, `captions`, `exists`, `sets`, `is_folder`), never through string tests or
folder reads of its own.

Adding a source kind (say `gs://` or `hf://`) is one entry in `KINDS`, e.g.
`"hf": SourceKind(open=hf.open_source, manifest=hf.manifest, tokenizer=hf.tokenizer_path,
fingerprint=hf.fingerprint, captions=hf.captions)`, plus its own module
`jest_pod/data/hf.py` implementing those functions; the pipeline, evaluators, eval-set
discovery, tokenizer resolution and training, the reference cache, `bench step` and config
validation then accept `hf:...` specs unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from array_record.python import array_record_module

from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records
from jest_pod.data import virtual

log = logging.getLogger(__name__)


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


# One per process: records unreadable here and undecodable in the pipeline share the count.
bad_record_log = _RateLimitedLog()


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
      bad_record_log(f"cannot read record {pos} of shard {self.paths[shard]} "
                     f"({type(e).__name__}: {e}); run `jest-pod data verify {self.data_dir}`")
      return Unreadable("record_unreadable")


# ---------------------------------------------------------------------------------------
# Data set folders.


def _folder_manifest(spec: str) -> Mapping:
  return manifest_lib.read(spec, check_files=False)  # fields and counts agree


def _open_folder(spec: str):
  manifest = _folder_manifest(spec)
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


def _folder_fingerprint(spec: str) -> dict:
  # The shard checksums the writer recorded: no record is read (a pod-scale pool is TBs).
  m = manifest_lib.read(spec)
  return {"num_examples": m["num_examples"],
          "shards": [[s["file"], s.get("sha256", ""), s["num_records"]] for s in m["shards"]]}


def _folder_captions(spec: str) -> Iterable[str]:
  # Shard by shard with a sequential reader: faster than the random-access source.
  for path in manifest_lib.shard_paths(spec):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        try:
          yield records.decode(reader.read([i])[0]).text
        except records.RecordError:
          continue  # the pipeline skips these too
    finally:
      reader.close()


def _folder_exists(spec: str) -> bool:
  return os.path.exists(os.path.join(spec, manifest_lib.MANIFEST))


def _folder_sets(root: str) -> dict[str, str]:
  names = sorted(os.listdir(root)) if os.path.isdir(root) else []
  return {n: os.path.join(root, n) for n in names if _folder_exists(os.path.join(root, n))}


def read_captions(source) -> Iterable[str]:
  """Every caption of a random-access source of serialized records, in index order,
  skipping records that cannot be read or decoded (as the pipeline does): a kind's
  `captions` when it has no faster sequential path."""
  for i in range(len(source)):
    raw = source[i]
    if isinstance(raw, Unreadable):
      continue
    try:
      yield records.decode(raw).text
    except records.RecordError:
      continue


# ---------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """How specs of one kind open, and what else the workflow needs to know of them. Every
  function takes the spec string."""
  # -> (grain random-access source of serialized records, source names [str])
  open: Callable[[str], tuple[Any, list[str]]]
  # -> the manifest fields the kind can tell without reading records: `sources` (the
  # names batch["source"] indexes), `image_max_side`, `class_names`, ... ({} when it
  # knows none)
  manifest: Callable[[str], Mapping]
  # -> path of the data's own tokenizer.model (also where `jest-pod data tokenizer`
  # writes one by default), or None when the kind has none
  tokenizer: Callable[[str], str | None]
  # -> JSON-able identity of the records: equal fingerprints mean the same records at
  # the same indices (the reference cache is keyed by it); holds "num_examples"
  fingerprint: Callable[[str], Mapping]
  # -> every caption, in index order, skipping unreadable records (the tokenizer
  # trainer); `read_captions(source)` serves any kind
  captions: Callable[[str], Iterable[str]]
  # -> whether the spec names data that is there (a scheme-named source is assumed to
  # be; it fails when opened)
  exists: Callable[[str], bool] = lambda spec: True
  # -> the data sets under a root spec, {name: spec} (a pool's root: web, curated,
  # eval_*; eval-set discovery reads it), {} for a kind without roots
  sets: Callable[[str], Mapping[str, str]] = lambda root: {}


FOLDER = "folder"
KINDS: dict[str, SourceKind] = {
    FOLDER: SourceKind(open=_open_folder, manifest=_folder_manifest,
                       tokenizer=lambda spec: os.path.join(spec, manifest_lib.TOKENIZER),
                       fingerprint=_folder_fingerprint, captions=_folder_captions,
                       exists=_folder_exists, sets=_folder_sets),
    virtual.PREFIX: SourceKind(open=virtual.open_source, manifest=virtual.manifest,
                               tokenizer=lambda spec: None, fingerprint=virtual.fingerprint,
                               captions=virtual.captions),
}


def scheme(spec: str) -> str:
  """The `KINDS` key of a spec: NAME for "NAME" or "NAME:..." (NAME registered), else
  FOLDER (a plain path)."""
  head = str(spec).split(":", 1)[0]
  return head if head in KINDS else FOLDER


def kind(spec: str) -> SourceKind:
  return KINDS[scheme(spec)]


def is_folder(spec: str) -> bool:
  """A data set folder (a path that must exist), not a scheme-named source."""
  return scheme(spec) == FOLDER


def open_source(spec: str):
  """A data set spec -> (grain random-access source, source names [str])."""
  return kind(spec).open(spec)


def manifest_of(spec: str) -> Mapping:
  return kind(spec).manifest(spec)


def tokenizer_path(spec: str) -> str | None:
  """The spec's own tokenizer.model (None: the kind has none)."""
  return kind(spec).tokenizer(spec)


def fingerprint(spec: str) -> dict:
  """What identifies the spec's records (the reference cache's `fingerprint.data`)."""
  return dict(kind(spec).fingerprint(spec))


def captions(spec: str) -> Iterable[str]:
  """Every caption of the spec's records, in index order (unreadable ones skipped)."""
  return kind(spec).captions(spec)


def exists(spec: str) -> bool:
  """Whether the spec names data that is there (a folder: it holds a manifest)."""
  return kind(spec).exists(spec)


def sets(root: str) -> dict[str, str]:
  """The data sets under a root spec, {name: spec}, sorted by name."""
  return dict(sorted(kind(root).sets(root).items()))


def _names(spec: str) -> list[str]:
  return list(manifest_of(spec).get("sources", []))


def warn_if_upscaled(spec: str, image_size: int) -> None:
  """The manifest's `image_max_side` (ingest --max-side) bounds the stored images: training
  above it enlarges every image (blurry, and decode + resize cost for nothing)."""
  side = manifest_of(spec).get("image_max_side")
  if side and int(side) < image_size:
    log.warning("%s stores images with max side %d, smaller than image_size=%d: every "
                "image is enlarged; re-ingest with --max-side >= %d", spec, side,
                image_size, image_size)


# ---------------------------------------------------------------------------------------
# The training mixture and its sub-pool.


def components(input_config) -> list[tuple[str, float]]:
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
  for spec, _ in components(input_config):
    names += _names(spec)
  return names


class PoolSource:
  """The records `pool` (indices) of a source: a fixed sub-pool, read by position."""

  def __init__(self, source, pool: np.ndarray):
    self.source, self.pool = source, pool

  def __len__(self):
    return len(self.pool)

  def __getitem__(self, k):
    return self.source[int(self.pool[k])]


_POOL_SEED = 20240624  # fixed: the sub-pool must not change with the run's seed


def pool_indices(n: int, size: int, spec: str) -> np.ndarray | None:
  """`size` record indices of n drawn once with a fixed seed (None when size is 0). Not a
  Grain shuffle + slice: `repeat()` reseeds every shuffle upstream of it each epoch."""
  if not size:
    return None
  if not 0 < size <= n:
    raise ValueError(f"input.pool_size={size} must be between 1 and the {n} records of "
                     f"{spec} (0 = all)")
  return np.sort(np.random.default_rng(_POOL_SEED).choice(n, size, replace=False))
