"""What the public-checkpoint readers check before they trust a file, and the marker of
`jest-pod export`'s folders.

Sizes: a reader takes every size from headers (safetensors' JSON header, each npz
member's zip entry and .npy header), checks them against the bytes the file holds, and
bounds the parameter count (`check_param_count`) before it allocates anything.

Marker: `jest-pod export` writes `jest_pod_export.json` first ({"complete": false}) and
rewrites it last ({"complete": true, "files": {name: bytes}}), in a temporary folder it
then renames into place. A folder with the marker is an export: readers take it only when
the marker says complete and every file it lists has its size; `--overwrite` replaces only
such a folder.
"""

from __future__ import annotations

import json
import os

from jest_pod.interop import InteropError

MARKER = "jest_pod_export.json"

# A bound far above any public SigLIP (So400m: 0.9e9, g-opt: 1.9e9 parameters), far below
# what a corrupt header can claim.
MAX_PARAMS = 16_000_000_000


def _gib(n: int) -> str:
  return f"{n / 2**30:.1f} GiB"


def physical_memory() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def check_param_count(count: int, path: str, what: str) -> None:
  """Refuse `count` parameters (read as float32) that no host could hold, before loading."""
  if count > MAX_PARAMS:
    raise InteropError(f"{path}: {what} add up to {count:.3g} parameters, more than any "
                       f"SigLIP ({MAX_PARAMS:.0e} at most): a damaged header; re-download it")
  memory = physical_memory()
  if memory and 4 * count > memory:
    raise InteropError(f"{path}: {what} add up to {count:.3g} parameters ({_gib(4 * count)} "
                       f"as float32), more than this machine's {_gib(memory)} of memory; "
                       "load it on a larger host")


# ------------------------------------------------------------------------ the marker


def marker_path(folder: str) -> str:
  return os.path.join(folder, MARKER)


def write_marker(folder: str, info: dict) -> None:
  """`info` as the folder's marker, atomically (a temporary file, fsync, rename)."""
  path = marker_path(folder)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_marker(folder: str) -> dict | None:
  """The marker of an export folder, None where there is none; InteropError if torn."""
  path = marker_path(folder)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f"{path}: unreadable ({type(e).__name__}); the export was interrupted: "
                       "export it again (jest-pod export ... --overwrite)") from e
  if not isinstance(info, dict):
    raise InteropError(f"{path}: not a JSON object; export it again (--overwrite)")
  return info


def check_export_complete(folder: str) -> None:
  """Refuse, in one line, a folder `jest-pod export` did not finish (no-op for folders
  without its marker: those were not written by it)."""
  info = read_marker(folder)
  if info is None:
    return
  if info.get("complete") is not True:
    raise InteropError(f"{folder}: an incomplete export ({MARKER} says complete=false: "
                       "jest-pod export was interrupted); export it again "
                       "(jest-pod export ... --overwrite) and read that")
  files = info.get("files")
  if not isinstance(files, dict):
    raise InteropError(f"{marker_path(folder)}: no `files` list; export it again (--overwrite)")
  for name, size in files.items():
    path = os.path.join(folder, os.path.basename(str(name)))
    if not os.path.isfile(path):
      raise InteropError(f"{path}: missing from an export ({MARKER} lists it); export it "
                         "again (--overwrite)")
    if os.path.getsize(path) != size:
      raise InteropError(f"{path}: {os.path.getsize(path)} bytes, the export wrote {size} "
                         f"({MARKER}): truncated or changed; export it again (--overwrite)")


def check_containing_export(path: str) -> None:
  """`check_export_complete` for a folder, or for the folder holding a file."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  check_export_complete(folder)
