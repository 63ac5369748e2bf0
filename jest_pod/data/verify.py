"""`jest-pod data verify DIR`: checks every shard against the manifest.

  jest-pod data verify DIR [--workers N]

Per shard: the file exists, its size equals the manifest's `bytes` (where recorded: sets
written by `jest-pod data ingest`/`build` have it), its sha256 equals the manifest's, and
the ArrayRecord reader finds the manifest's `num_records` in it (a manifest whose count
is off makes training read past a shard's end or never reach its last records, even
when every byte is intact). Shards are hashed in parallel threads (hashlib
releases the GIL), with a progress line (shards done / total, MB/s, ETA) on stderr.
Exit 0 if every shard is intact, 1 listing each bad shard and what to do.

Training never needs this to run: records it cannot read from a damaged shard are
skipped and counted (`sources._SafeSource`), while a missing shard stops it before step 1;
this tells you which shards to restore.

Then the stores two-phase input reads beside the data (DIR/score_images/*, DIR/token_rows/*):
each must be complete, built from these records (the manifest's checksums), and every row
must match its crc32; a stale or damaged one is named with the command that rebuilds it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
from concurrent import futures

from array_record.python import array_record_module

import numpy as np

from jest_pod import errors
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import reference_cache as store_lib
from jest_pod.data import score_images, sources, token_rows

CHUNK = 4 << 20  # read size: large enough that hashing, not the syscall, dominates


class _Progress:
  """Thread-safe byte/shard counter printing at most one line a second."""

  def __init__(self, total_shards: int, total_bytes: int, out=None):
    # sys.stderr when called, not at import (it may have been replaced since)
    self.total_shards, self.total_bytes, self.out = total_shards, total_bytes, out or sys.stderr
    self.shards = self.bytes = 0
    self.start = self.last = time.monotonic()
    self.lock = threading.Lock()

  def add(self, nbytes: int = 0, shards: int = 0):
    with self.lock:
      self.bytes += nbytes
      self.shards += shards
      now = time.monotonic()
      if now - self.last >= 1.0 or self.shards == self.total_shards and shards:
        self.last = now
        self.out.write(self.line() + "\n")
        self.out.flush()

  def line(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-9)
    rate = self.bytes / elapsed
    left = max(self.total_bytes - self.bytes, 0)
    eta = f"{left / rate:.0f}s" if rate > 0 else "?"
    return (f"verify: {self.shards}/{self.total_shards} shards, "
            f"{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
            f"{rate / 1e6:.1f} MB/s, ETA {eta}")


def _sha256(path: str, progress: _Progress) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(CHUNK):
      h.update(block)
      progress.add(len(block))
  return h.hexdigest()


def _num_records(path: str) -> tuple[int | None, str]:
  """(records the ArrayRecord reader finds, "") or (None, why it cannot read the shard)."""
  try:  # Riegeli may raise at open, at num_records or at close: all mean "damaged"
    reader = array_record_module.ArrayRecordReader(path)
    n = reader.num_records()
    reader.close()
  except Exception as e:  # pylint: disable=broad-except
    return None, f"the reader cannot read it ({type(e).__name__}: {str(e)[:160]})"
  return n, ""


def check_shard(data_dir: str, shard: dict, progress: _Progress) -> list[str]:
  """Problems with one shard ([] if intact)."""
  path = os.path.join(data_dir, shard["file"])
  if not os.path.exists(path):
    progress.add(shards=1)
    return ["file is missing"]
  problems = []
  try:
    size = os.path.getsize(path)
    if "bytes" in shard and size != shard["bytes"]:
      problems.append(f"size {size} bytes, manifest says {shard['bytes']}")
    digest = _sha256(path, progress)
  except OSError as e:  # unreadable (permissions, an I/O error): say so, check the rest
    progress.add(shards=1)
    return [f"cannot be read ({e.strerror or e})"]
  hash_ok = digest == shard["sha256"]
  if not hash_ok:
    problems.append(f"sha256 {digest[:16]}…, manifest says {shard['sha256'][:16]}…")
  n, why = _num_records(path)
  if n is None:
    problems.append(why)
  elif n != shard["num_records"]:
    problems.append(f"the reader finds {n} records, the manifest says {shard['num_records']}"
                    + ("" if not hash_ok else " (the bytes match their sha256: the "
                       "manifest's count is wrong)"))
  progress.add(shards=1)
  return problems


def verify(data_dir: str, *, workers: int | None = None, out=None) -> dict[str, list[str]]:
  """{shard file: problems} for every damaged shard of `data_dir` ({} if all intact)."""
  m = manifest_lib.read(data_dir, check_files=False)
  shards = m["shards"]
  total = sum(os.path.getsize(p) for s in shards
              if os.path.exists(p := os.path.join(data_dir, s["file"])))
  progress = _Progress(len(shards), total, out)
  # Hashing a cached file is CPU-bound: threads beyond the cores only add contention.
  workers = workers or max(1, min(8, len(shards), os.cpu_count() or 1))
  with futures.ThreadPoolExecutor(workers) as pool:
    results = pool.map(lambda s: (s["file"], check_shard(data_dir, s, progress)), shards)
    bad = {f: p for f, p in results if p}
  return bad


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="jest-pod data verify",
                              description="check every shard's size and sha256 "
                                          "against DIR/manifest.json")
  p.add_argument("dir", help="data set folder")
  p.add_argument("--workers", type=int, default=None,
                 help="shards hashed at once (default: min(8, shards, cores))")
  args = p.parse_args(errors.take_debug_flag(list(sys.argv[1:] if argv is None else argv)))
  try:
    bad = verify(args.dir, workers=args.workers)
  except (manifest_lib.ManifestError, OSError) as e:
    if errors.debug():
      raise
    print(f"jest-pod data verify: error: {e}", file=sys.stderr)
    return 1
  n = len(manifest_lib.read(args.dir, check_files=False)["shards"])
  stores = verify_stores(args.dir) if not bad else {}
  for path, said in stores.items():
    print(f"  {path}: {said}")
  if not bad:
    print(f"{args.dir}: all {n} shards match the manifest"
          + (f"; {sum(v.startswith('ok') for v in stores.values())} of {len(stores)} "
             "two-phase stores are sound" if stores else ""))
    return 1 if any(not v.startswith("ok") for v in stores.values()) else 0
  print(f"{args.dir}: {len(bad)} of {n} shards do not match the manifest:")
  for f, problems in sorted(bad.items()):
    print(f"  {f}: " + "; ".join(problems))
  if any("count is wrong" in p for problems in bad.values() for p in problems):
    print("A count that is wrong while the bytes match is a damaged manifest.json: rebuild "
          "or re-ingest the data set with --overwrite to rewrite it.")
  print(_footer(bad, args.dir))
  return 1


def verify_stores(data_dir: str) -> dict[str, str]:
  """{store folder: "ok (N rows)" or what is wrong with it and the command that rebuilds
  it} for the two-phase stores beside `data_dir`; every row is read and checked."""
  kinds = {score_images.DIR: ("score images", score_images.FORMAT, score_images.NAMES),
           token_rows.DIR: ("token rows", token_rows.FORMAT, token_rows.NAMES)}
  fingerprint, out = sources.fingerprint(data_dir), {}
  for sub, (what, fmt, names) in kinds.items():
    root = os.path.join(data_dir, sub)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
      path = os.path.join(root, name)
      if not os.path.isdir(path) or name.endswith((".tmp", ".old")):
        continue
      try:
        meta = store_lib.complete_meta(path, what=what, rebuild=_rebuild(data_dir, sub))
        cmd = _rebuild(data_dir, sub, meta)
        if meta.get("fingerprint") != fingerprint:
          out[path] = (f"built from other records (the data set was rebuilt); rebuild it "
                       f"with `{cmd}`")
          continue
        store = store_lib.Store(path, meta, cmd, names=names, fmt=fmt, what=what)
        n = int(meta["num_examples"])
        for lo in range(0, n, store_lib.SHARD_ROWS):
          store.read(np.arange(lo, min(n, lo + store_lib.SHARD_ROWS)))
        out[path] = f"ok ({n} rows)"
      except store_lib.ReferenceCacheError as e:
        out[path] = str(e)
  return out


def _rebuild(data_dir: str, sub: str, meta: dict | None = None) -> str:
  if sub == score_images.DIR and meta and "key" in meta:
    return score_images.build_command(data_dir, score_images.Key(**meta["key"]))
  length = (meta or {}).get("text_len", token_rows.SHIPPED_TEXT_LEN)
  return f"jest-pod data score-images --data {data_dir} --max-text-len {length}"


def _footer(bad: dict[str, list[str]], data_dir: str) -> str:
  """What training does with these shards, and the fix. A missing shard stops training
  before step 1 (`sources._open_folder`); only a present but damaged one is read around."""
  missing = sum(problems == ["file is missing"] for problems in bad.values())
  damaged = len(bad) - missing
  said = []
  if missing:
    said.append(f"Training refuses to start while {'a shard is' if missing == 1 else 'shards are'}"
                " missing.")
  if damaged:
    said.append("Training skips (and counts) the records it cannot read from "
                f"{'the damaged' if missing else 'these'} shards.")
  return " ".join(said) + (
      " Restore each from its source (a backup or the original copy: same file name), or "
      f"re-ingest the data set (`jest-pod data ingest ... --output {data_dir} --overwrite`); "
      "then run this check again.")


if __name__ == "__main__":
  sys.exit(main())
