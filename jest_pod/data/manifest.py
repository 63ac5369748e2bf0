"""`manifest.json`: what a data set folder holds (WORKSPACE_NOTES.md, "Data set folder").

A data set folder is `DIR/manifest.json` + `DIR/<name>-NNNNN-of-NNNNN.array_record`.
The manifest is written last and atomically, so a folder with a valid manifest is a
complete data set, and a folder without one is not (a crash mid-ingest leaves no manifest).

Fields (contract): `name, num_examples, shards [{file, num_records, sha256}], skipped
{reason: n}, sources [str], source_counts {source: n}, class_names [str] (labelled sets),
image_max_side, created_by`. Extra fields written here: `format`, `created_at`, `build`
(the arguments that produced the set, so a rebuild can tell whether it is a no-op), and
per shard `bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"  # a folder's own tokenizer (`jest-pod data tokenizer`)
FORMAT = "array_record/tf.train.Example (jest_pod.data.records)"
REQUIRED = ("name", "num_examples", "shards", "skipped", "sources", "source_counts",
            "image_max_side", "created_by")
BUILD_HINT = ("build it with `jest-pod data ingest --input PATH --output {dir}` or "
              "`jest-pod data build {{emoji,openclipart,fashion_mnist,demo,icons}} --output {dir}`")


class ManifestError(ValueError):
  """A data set folder whose manifest is missing, unreadable or inconsistent."""


def shard_name(name: str, index: int, count: int) -> str:
  """The file name of shard `index` (0-based) of `count`."""
  return f"{name}-{index:05d}-of-{count:05d}.array_record"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def make(*, name: str, shards: list[dict], skipped: dict[str, int],
         source_counts: dict[str, int], image_max_side: int, created_by: str,
         class_names: list[str] | None = None, build: dict | None = None) -> dict:
  """Assembles a manifest dict; `sources` is the sorted list of `source_counts` keys.

  The order of `sources` is what `batch["source"]` integers index (pipeline contract),
  so it must be deterministic: sorted.
  """
  m = {
      "name": name,
      "format": FORMAT,
      "num_examples": int(sum(s["num_records"] for s in shards)),
      "shards": shards,
      "skipped": {k: int(v) for k, v in sorted(skipped.items()) if v},
      "sources": sorted(source_counts),
      "source_counts": {k: int(source_counts[k]) for k in sorted(source_counts)},
      "image_max_side": int(image_max_side),
      "created_by": created_by,
      "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  if class_names is not None:
    m["class_names"] = list(class_names)
  if build is not None:
    m["build"] = build
  return m


def write(data_dir: str, manifest: dict) -> str:
  """Validates `manifest` against the files in `data_dir`, then writes it atomically.

  Returns the manifest path. Temp file + fsync + os.replace: readers see the old
  manifest, no manifest, or the new one, never a partial one.
  """
  validate(manifest, data_dir)
  path = os.path.join(data_dir, MANIFEST)
  fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=data_dir)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, ensure_ascii=False)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; readers may be other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  fsync_dir(data_dir)
  return path


def fsync_dir(path: str) -> None:
  """Makes renames in `path` durable (a no-op where directories cannot be fsynced)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def read(data_dir: str, *, check_files: bool = True) -> dict:
  """Reads and validates `data_dir/manifest.json`; raises ManifestError saying what to do."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.isdir(data_dir):
    raise ManifestError(f"data set folder {data_dir!r} does not exist; "
                        + BUILD_HINT.format(dir=data_dir))
  if not os.path.exists(path):
    raise ManifestError(f"no {MANIFEST} in {data_dir!r}: it is not a (complete) data set; "
                        + BUILD_HINT.format(dir=data_dir))
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ManifestError(f"cannot read {path}: {e}; rebuild the data set with --overwrite") from e
  # Fields, counts and shard names, then confinement, before any shard file is touched.
  validate(manifest, data_dir, check_files=False)
  check_confined(manifest, data_dir)
  if check_files:
    validate(manifest, data_dir)
  return manifest


def _escape(name) -> str | None:
  """Why a shard name leaves its folder on its own (None when it does not)."""
  if not isinstance(name, str) or not name or "\0" in name:
    return "not a file name"
  if os.path.isabs(name) or name.startswith(("/", "\\")):
    return "an absolute path"
  if ".." in name.replace("\\", "/").split("/"):
    return "'..' in the path"
  return None


def check_confined(manifest: dict, data_dir: str) -> None:
  """ManifestError unless every shard is a file inside `data_dir`: no absolute path, no
  '..', no symlink (of the shard or a folder on its way) that leads out. Readers open and
  hash what a manifest names, so a copied or hostile manifest must not point them at
  /etc/passwd or another data set."""
  root = os.path.realpath(data_dir)
  for s in manifest["shards"]:
    why = _escape(s["file"])
    if why is None:
      real = os.path.realpath(os.path.join(root, s["file"]))
      if os.path.commonpath([root, real]) != root:
        why = f"a symlink leading to {real}"
    if why:
      raise ManifestError(
          f"{os.path.join(data_dir, MANIFEST)}: shard {str(s['file'])[:200]!r} is outside the "
          f"data folder ({why}); shards must be files inside {data_dir}: rebuild the data set "
          "with --overwrite")


def validate(manifest: dict, data_dir: str | None = None, *, check_sha256: bool = False,
             check_files: bool = True) -> None:
  """Raises ManifestError if fields are missing, counts disagree or a shard name leaves
  the folder ('..', an absolute path; `check_confined` also follows symlinks).

  With `data_dir` (named in the errors) and `check_files`, also checks each shard file
  exists with the recorded size; with `check_sha256`, re-hashes every shard (slow on big
  sets: reads all bytes).
  """
  where = f" ({os.path.join(data_dir, MANIFEST)})" if data_dir else ""
  if not isinstance(manifest, dict):
    raise ManifestError(f"manifest{where} is not a JSON object")
  missing = [k for k in REQUIRED if k not in manifest]
  if missing:
    raise ManifestError(f"manifest{where} lacks fields {missing}; rebuild with --overwrite")
  shards = manifest["shards"]
  if not shards and manifest["num_examples"]:
    raise ManifestError(f"manifest{where} lists no shards but {manifest['num_examples']} examples")
  for s in shards:
    if not {"file", "num_records", "sha256"} <= set(s):
      raise ManifestError(f"manifest{where}: shard entry {s} lacks file/num_records/sha256")
    if _escape(s["file"]):  # before any path is joined (check_confined: symlinks too)
      raise ManifestError(f"manifest{where}: shard {str(s['file'])[:200]!r} is outside the data "
                          f"folder ({_escape(s['file'])}); rebuild the data set with --overwrite")
  n = sum(s["num_records"] for s in shards)
  if n != manifest["num_examples"]:
    raise ManifestError(f"manifest{where}: shards hold {n} records but num_examples is "
                        f"{manifest['num_examples']}")
  if sum(manifest["source_counts"].values()) != n:
    raise ManifestError(f"manifest{where}: source_counts sum to "
                        f"{sum(manifest['source_counts'].values())}, not num_examples {n}")
  if sorted(manifest["source_counts"]) != list(manifest["sources"]):
    raise ManifestError(f"manifest{where}: sources {manifest['sources']} do not match "
                        f"source_counts keys (must be their sorted list)")
  if data_dir is None or not check_files:
    return
  for s in shards:
    path = os.path.join(data_dir, s["file"])
    if not os.path.exists(path):
      raise ManifestError(f"shard {path} listed in the manifest is missing; the data set is "
                          f"damaged: rebuild it with --overwrite")
    if "bytes" in s and os.path.getsize(path) != s["bytes"]:
      raise ManifestError(f"shard {path} has {os.path.getsize(path)} bytes, the manifest says "
                          f"{s['bytes']}; rebuild it with --overwrite")
    if check_sha256 and sha256_file(path) != s["sha256"]:
      raise ManifestError(f"shard {path} fails its sha256 check; rebuild it with --overwrite")


def size_mismatches(manifest: dict, data_dir: str) -> list[str]:
  """Shards whose file size differs from the manifest's `bytes` (cheap: a stat each, no
  hashing; shards without a recorded size are not checked). One line per bad shard."""
  out = []
  for s in manifest["shards"]:
    path = os.path.join(data_dir, s["file"])
    if "bytes" in s and os.path.exists(path) and os.path.getsize(path) != s["bytes"]:
      out.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {s['bytes']}")
  return out


def is_complete(data_dir: str) -> bool:
  """True if `data_dir` holds a valid manifest whose shard files all exist."""
  try:
    read(data_dir)
  except ManifestError:
    return False
  return True


def shard_paths(data_dir: str, manifest: dict | None = None) -> list[str]:
  """Absolute paths of the data set's shards, in manifest order."""
  manifest = read(data_dir) if manifest is None else manifest
  return [os.path.join(data_dir, s["file"]) for s in manifest["shards"]]
