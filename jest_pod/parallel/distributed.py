"""Joining the processes of a multi-host run: `jax.distributed` from the environment.

Every host runs the same program; `initialize()` must be called once, first thing,
before anything touches a JAX device. It picks one of three modes:

- **explicit coordinator** (local multi-process runs, `launch/run_local.sh`, CI):
  `JEST_POD_COORDINATOR=host:port`, `JEST_POD_NUM_PROCESSES`, `JEST_POD_PROCESS_ID`.
  On CPU this gives real cross-process collectives (gloo, the default CPU
  collectives implementation in jax 0.10.2).
- **Cloud TPU pod** (`launch/run_pod.sh` sets `JEST_POD_TPU_POD=1`; also detected from
  `TPU_WORKER_HOSTNAMES` / `MEGASCALE_COORDINATOR_ADDRESS`): `jax.distributed.initialize()`
  with no arguments; JAX finds the workers from the TPU metadata.
- **single process** otherwise: nothing to do.

Optional: `JEST_POD_INIT_TIMEOUT` (seconds, default 300) bounds how long a process
waits for the others to join.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JEST_POD_COORDINATOR"
ENV_NUM_PROCESSES = "JEST_POD_NUM_PROCESSES"
ENV_PROCESS_ID = "JEST_POD_PROCESS_ID"
ENV_TPU_POD = "JEST_POD_TPU_POD"
ENV_INIT_TIMEOUT = "JEST_POD_INIT_TIMEOUT"
# Set on TPU VM slices (GKE sets the first; queued resources / multislice the second).
_TPU_POD_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")

_mode: str | None = None  # None until initialize() ran: 'coordinator' | 'tpu_pod' | 'single'


def _truthy(value: str | None) -> bool:
  return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str) -> int:
  raw = os.environ.get(name)
  if raw is None or not raw.strip():
    raise ValueError(
        f"{ENV_COORDINATOR} is set, so {name} must be set too (an integer); "
        f"launch/run_local.sh sets all three of {ENV_COORDINATOR}, "
        f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}.")
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer.") from None


def on_tpu_pod() -> bool:
  """True when this process looks like one worker of a Cloud TPU VM slice."""
  if ENV_TPU_POD in os.environ:
    return _truthy(os.environ[ENV_TPU_POD])
  return any(os.environ.get(k) for k in _TPU_POD_MARKERS)


def initialize(*, tpu_pod: bool | None = None) -> str:
  """Joins this process to the others of the run; idempotent.

  Args:
    tpu_pod: force (True) or forbid (False) the Cloud TPU pod mode; None detects it
      from the environment (see the module docstring).

  Returns:
    the mode used: 'coordinator', 'tpu_pod' or 'single'.

  Raises:
    ValueError: the JEST_POD_* variables are incomplete or inconsistent.
    RuntimeError: JAX's backend was already started (call this before any device use).
  """
  global _mode
  if _mode is not None:
    return _mode
  if jax.distributed.is_initialized():  # someone called jax.distributed directly
    _mode = "coordinator"
    return _mode

  timeout = int(os.environ.get(ENV_INIT_TIMEOUT, "300"))
  coordinator = os.environ.get(ENV_COORDINATOR, "").strip()
  if coordinator:
    num_processes = _env_int(ENV_NUM_PROCESSES)
    process_id = _env_int(ENV_PROCESS_ID)
    if not 0 <= process_id < num_processes:
      raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be in [0, "
                       f"{ENV_NUM_PROCESSES}={num_processes}).")
    # gloo is the default in jax 0.10.2; older versions defaulted to 'none', where
    # cross-process computations on CPU fail at run time. Keep it explicit.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed: process %d of %d, coordinator %s",
             process_id, num_processes, coordinator)
    _call(lambda: jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes,
        process_id=process_id, initialization_timeout=timeout))
    _mode = "coordinator"
  elif (on_tpu_pod() if tpu_pod is None else tpu_pod):
    log.info("jax.distributed: Cloud TPU pod, auto-detecting the workers")
    _call(lambda: jax.distributed.initialize(initialization_timeout=timeout))
    _mode = "tpu_pod"
  else:
    _mode = "single"
  if _mode != "single":
    log.info("jax.distributed: joined as process %d of %d, %d of %d devices local",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
  return _mode


def _call(fn) -> None:
  try:
    fn()
  except RuntimeError as e:
    if "before" in str(e) or "already" in str(e):
      raise RuntimeError(
          "jest_pod.parallel.distributed.initialize() must run before any JAX computation or "
          "device query (jax.devices(), jnp arrays, ...): call it first thing in main. "
          f"JAX said: {e}") from e
    raise


def shutdown() -> None:
  """Leaves the run cleanly (a barrier with the other processes); idempotent.

  Call at the end of main, also after a SIGTERM-triggered checkpoint: without it the
  processes race through JAX's atexit shutdown and the coordinator (process 0) may log
  a fatal "another task died" on the way out.
  """
  global _mode
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
  _mode = None


def is_primary() -> bool:
  """True on the process that writes logs, metrics and run files (process 0)."""
  return jax.process_index() == 0


def host_array(x) -> np.ndarray:
  """A global jax array as one numpy array on every host (a collective when the array
  spans processes: every process must call it at the same point)."""
  if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_sum(value: int) -> int:
  """Sum of a host-side count over all processes (a collective)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.sum(multihost_utils.process_allgather(np.array([value], np.int64))))


def process_any(flag: bool) -> bool:
  """True on every process when it is true on any (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))
