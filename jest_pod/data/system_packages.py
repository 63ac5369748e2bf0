"""Installs the Debian packages that carry the offline data sets (README, "The demo's data").

`ensure(["fonts-noto-color-emoji"])` is a no-op when the packages are installed; else it runs
`apt-get install -y --no-install-recommends ...` (and `apt-get update` then a retry if that
fails: fresh machines have empty package lists). Where that cannot work (not root, no apt),
it raises MissingPackageError with the exact command to run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

log = logging.getLogger(__name__)


class MissingPackageError(RuntimeError):
  """A Debian package a builder needs is absent and could not be installed."""


def is_installed(package: str) -> bool:
  """True if dpkg reports `package` as installed."""
  if shutil.which("dpkg-query") is None:
    return False
  r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                     capture_output=True, text=True, check=False)
  return r.returncode == 0 and "install ok installed" in r.stdout


def files_of(package: str) -> list[str]:
  """The files `package` installed (`dpkg -L`), directories excluded."""
  r = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
  if r.returncode != 0:
    raise MissingPackageError(f"dpkg -L {package} failed: {r.stderr.strip()}")
  return [p for p in r.stdout.splitlines() if p and os.path.isfile(p)]


def _command(packages: list[str]) -> str:
  return "apt-get update && apt-get install -y --no-install-recommends " + " ".join(packages)


def ensure(packages: list[str]) -> None:
  """Installs the missing ones of `packages` with apt-get; MissingPackageError if it cannot."""
  missing = [p for p in packages if not is_installed(p)]
  if not missing:
    return
  cmd = _command(missing)
  if shutil.which("apt-get") is None:
    raise MissingPackageError(f"Debian packages {missing} are needed but apt-get is not available "
                              f"here; on a Debian/Ubuntu machine run: sudo {cmd}")
  if os.geteuid() != 0:
    raise MissingPackageError(f"Debian packages {missing} are needed; installing them needs root. "
                              f"Run: sudo {cmd}")
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
  log.info("installing Debian packages %s (apt-get install)...", missing)
  t0 = time.time()
  r = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
  if r.returncode != 0:
    # Most often stale or empty package lists on a fresh machine.
    log.info("apt-get install failed; running apt-get update and retrying")
    u = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, check=False)
    r = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
      tail = "\n".join((u.stderr + r.stderr).strip().splitlines()[-8:])
      raise MissingPackageError(f"could not install {missing} with apt-get:\n{tail}\n"
                                f"Fix the error above, then run: {cmd}")
  log.info("installed %s in %.0f s", missing, time.time() - t0)
