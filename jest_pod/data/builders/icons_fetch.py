"""Downloads for the icons builder: pinned npm tarballs, checked and cached (icons.py).

`fetch(name, version, integrity, cache)` downloads `<registry>/<name>/-/<base>-<version>.tgz`
over HTTPS, checks it against the registry's `dist.integrity` (sha512, pinned in
icons_sources.NPM) and keeps it as `<cache>/<name with / as __>-<version>.tgz`. A cached
file is re-checked before use; a bad one is downloaded again. `extract(tgz, members, dest)`
unpacks the wanted members once (a `.complete` stamp marks a finished extraction).

Cache folder: $JEST_POD_NPM_CACHE, else ~/.cache/jest_pod/npm. Registry:
$JEST_POD_NPM_REGISTRY, else https://registry.npmjs.org (tests point it at a local server).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import logging
import os
import shutil
import tarfile
import time
import urllib.request

log = logging.getLogger(__name__)

REGISTRY = "https://registry.npmjs.org"


class IntegrityError(RuntimeError):
  """A downloaded tarball does not match its pinned sha512."""


def default_cache() -> str:
  return os.environ.get("JEST_POD_NPM_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "jest_pod", "npm")


def registry() -> str:
  return (os.environ.get("JEST_POD_NPM_REGISTRY") or REGISTRY).rstrip("/")


def tarball_url(name: str, version: str, base: str | None = None) -> str:
  """npm's tarball address: scoped packages keep the scope in the path, not the file name."""
  return f"{base or registry()}/{name}/-/{name.split('/')[-1]}-{version}.tgz"


def check_integrity(path: str, integrity: str) -> bool:
  """True if the file's digest matches an SRI string such as 'sha512-<base64>'."""
  algo, _, want = integrity.partition("-")
  if algo not in ("sha512", "sha384", "sha256", "sha1"):
    raise ValueError(f"unsupported integrity {integrity[:20]!r}")
  h = hashlib.new(algo)
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return base64.b64encode(h.digest()).decode() == want


def _download(url: str, dest: str) -> None:
  tmp = dest + ".part"
  t0 = time.time()
  req = urllib.request.Request(url, headers={"User-Agent": "jest_pod-icons-builder"})
  with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as f:
    total = int(r.headers.get("Content-Length") or 0)
    done, last = 0, t0
    while block := r.read(1 << 20):
      f.write(block)
      done += len(block)
      if time.time() - last > 5:
        last = time.time()
        log.info("download %s: %.0f/%.0f MB", os.path.basename(dest), done / 1e6, total / 1e6)
  os.replace(tmp, dest)
  log.info("downloaded %s (%.1f MB) in %.1f s", url, os.path.getsize(dest) / 1e6, time.time() - t0)


def fetch(name: str, version: str, integrity: str, cache: str | None = None) -> str:
  """Path of the verified tarball of `name@version` in the cache; downloads it if needed.

  Raises IntegrityError when a fresh download does not match `integrity`.
  """
  cache = cache or default_cache()
  os.makedirs(cache, exist_ok=True)
  path = os.path.join(cache, f"{name.replace('/', '__')}-{version}.tgz")
  if os.path.exists(path):
    if check_integrity(path, integrity):
      return path
    log.warning("%s fails its integrity check; downloading it again", path)
    os.unlink(path)
  url = tarball_url(name, version)
  _download(url, path)
  if not check_integrity(path, integrity):
    os.replace(path, path + ".bad")  # keep it for inspection, out of the way of reuse
    raise IntegrityError(f"{url} does not match the pinned integrity {integrity[:24]}...; "
                         f"kept as {path}.bad")
  return path


def extract(tgz: str, members: list[str], dest: str) -> str:
  """Unpacks members of `tgz` matching the glob patterns `members` (paths inside the
  tarball, e.g. 'package/json/*.json') into `dest` once; returns `dest`."""
  stamp = os.path.join(dest, ".complete")
  if os.path.exists(stamp):
    return dest
  if os.path.isdir(dest):
    shutil.rmtree(dest)  # an interrupted extraction: start over
  tmp = dest + ".tmp"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  t0 = time.time()
  with tarfile.open(tgz, "r:gz") as tar:
    chosen = [m for m in tar if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p in members)]
    # The 'data' filter refuses absolute paths, '..' and links leaving the folder.
    tar.extractall(tmp, members=chosen, filter="data")
  with open(os.path.join(tmp, ".complete"), "w") as f:
    f.write(f"{len(chosen)}\n")
  os.replace(tmp, dest)
  log.info("extracted %d files of %s in %.1f s", len(chosen), os.path.basename(tgz),
           time.time() - t0)
  return dest


def debian_licence(package: str, doc_root: str = "/usr/share/doc") -> str:
  """The distinct `License:` values of a Debian package's copyright file, '; '-joined."""
  path = os.path.join(doc_root, package, "copyright")
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      found = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("License:")]
  except OSError:
    return "unknown"
  found = list(dict.fromkeys(x for x in found if x))
  return "; ".join(found) if found else f"see {path}"
