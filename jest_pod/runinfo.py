"""What ran, where, with which code: `run_info.json` in the workdir.

`collect()` gathers the facts a reader of a 3-week-old run needs (git commit and dirty
flag, library versions, processes, devices, mesh, host, time, the config); `write()`
puts them in `WORKDIR/run_info.json` (the latest start) and `WORKDIR/run_info/<time>.json`
(one per start, so resumes keep their history). Works for local and gs:// workdirs.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from etils import epath
import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
            "libtpu")
# Written next to the code by `launch/run_pod.sh ship` (a tarball has no .git).
COMMIT_FILE = "GIT_COMMIT"
ENV_COMMIT = "JEST_POD_GIT_COMMIT"
_ENV_KEYS = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", str(_REPO_ROOT), *args], capture_output=True,
                         text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_info() -> dict[str, Any]:
  """{'commit': sha or None, 'dirty': bool or None, 'source': how it was found}."""
  if (_REPO_ROOT / ".git").exists():
    commit = _git("rev-parse", "HEAD")
    if commit:
      status = _git("status", "--porcelain", "--untracked-files=no")
      return {"commit": commit, "dirty": None if status is None else bool(status),
              "source": "git"}
  if os.environ.get(ENV_COMMIT):
    return {"commit": os.environ[ENV_COMMIT], "dirty": None, "source": "env"}
  commit_file = _REPO_ROOT / COMMIT_FILE
  if commit_file.is_file():
    lines = commit_file.read_text().split()
    # "SHA" or "SHA dirty" (run_pod.sh writes whether the shipped tree had local edits).
    if lines:
      return {"commit": lines[0], "dirty": "dirty" in lines[1:], "source": COMMIT_FILE}
  return {"commit": None, "dirty": None, "source": None}


def _config_dict(config: Any) -> Any:
  if config is None:
    return None
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    return config.to_dict()
  return dict(config) if isinstance(config, dict) else str(config)


def cpu_info() -> dict[str, Any]:
  """The host's CPU model, its core count, the cores this process may use, and the load
  average (1, 5, 15 min)."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    usable = os.cpu_count()
  try:
    load = [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):
    load = None
  return {"model": model, "count": os.cpu_count(), "usable": usable, "load_average": load}


def collect(config: Any = None, mesh: Any = None) -> dict[str, Any]:
  """Facts about this run; call after `jest_pod.parallel.distributed.initialize()`.

  Args:
    config: the run's config (ml_collections.ConfigDict or dict), stored as a dict.
    mesh: the `jax.sharding.Mesh` used, if any: its shape and axis names are stored.

  Returns:
    a JSON-serialisable dict (non-JSON leaves of the config are written with str()).
  """
  devices = jax.devices()
  info: dict[str, Any] = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "hostname": socket.gethostname(),
      "argv": list(sys.argv),
      "git": git_info(),
      "python": platform.python_version(),
      "versions": {name: _version(name) for name in PACKAGES},
      "platform": jax.default_backend(),
      "process_count": jax.process_count(),
      "process_index": jax.process_index(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "device_kinds": sorted({d.device_kind for d in devices}),
      # Wall-clock figures are read beside the machine and its load at the start.
      "cpu": cpu_info(),
      "mesh": None,
      "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
      "config": _config_dict(config),
  }
  if mesh is not None:
    info["mesh"] = {"shape": {str(k): int(v) for k, v in dict(mesh.shape).items()},
                    "axis_names": [str(a) for a in mesh.axis_names]}
  return info


def write(workdir: str | os.PathLike, info: dict[str, Any], *,
          only_primary: bool = True) -> epath.Path | None:
  """Writes `info` to WORKDIR/run_info.json and WORKDIR/run_info/<time>.json.

  Args:
    workdir: local path or gs:// URL (etils.epath).
    info: from `collect()`.
    only_primary: write on process 0 only (the default; every process may call this).

  Returns:
    the path of run_info.json, or None where this process did not write.
  """
  if only_primary and info.get("process_index", 0) != 0:
    return None
  text = json.dumps(info, indent=2, sort_keys=True, default=str) + "\n"
  root = epath.Path(workdir)
  history = root / "run_info"
  history.mkdir(parents=True, exist_ok=True)
  stamp = str(info.get("time", "unknown")).replace(":", "").replace("+0000", "Z")
  (history / f"{stamp}.json").write_text(text)
  path = root / "run_info.json"
  path.write_text(text)
  return path
