"""One checkpoint = {train state, data iterator state (per host), config}, via Orbax.

Orbax writes each step into a temporary directory and renames it only when every
item (and every host) has finished, so a step directory that exists is complete: a
preempted or crashed save is never mistaken for a good checkpoint, and the next run
resumes from the last complete one.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "data", "config")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, partial or does not fit the model."""


def _absolute(path) -> epath.Path:
  """Orbax refuses relative paths: make local ones absolute (gs:// etc. pass through)."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def checkpoint_dir(workdir) -> epath.Path:
  return _absolute(workdir) / "checkpoints"


class Checkpointer:
  """Keep-N async checkpoints of a run in WORKDIR/checkpoints/<step>/."""

  def __init__(self, workdir, *, every_steps: int, keep: int, async_save: bool = True):
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_names=ITEMS,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `step` is on the save schedule."""
    return step % self.every_steps == 0

  def save(self, step: int, state, data_iter, config, *, force: bool = False) -> bool:
    """Save if `step` is on the schedule (or `force`). `data_iter`: anything with
    `get_state()` (a Grain iterator, or the prefetcher's `IteratorState` of the last
    consumed batch). Returns whether a save started."""
    if not force and not self.due(step):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)

  def restore(self, step: int, abstract_state, data_iter):
    """Restore `step` into shardings given by `abstract_state` (ShapeDtypeStructs with
    .sharding); the data iterator is restored in place. Returns the state."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return out["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _resolve(path, step):
  """A workdir, its checkpoints/ folder, or a step folder → (checkpoints dir, step)."""
  path = _absolute(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if (path / "state").exists() and path.name.isdigit():
    return path.parent, int(path.name) if step is None else step
  root = path / "checkpoints" if (path / "checkpoints").exists() else path
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
  if not steps:
    raise CheckpointError(f"no complete checkpoint under {root} (an interrupted save leaves "
                          "only a temporary folder, which is ignored); train first with "
                          "`jest-pod train --workdir ...`")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"no checkpoint at step {step} under {root}; available: {steps}")
  return root, step


def load_config(path, step=None) -> ml_collections.ConfigDict:
  root, step = _resolve(path, step)
  cfg_file = root / str(step) / "config" / "metadata"
  if not cfg_file.exists():
    raise CheckpointError(f"checkpoint {root / str(step)} has no saved config ({cfg_file}); "
                          "it is partial or was not written by jest_pod")
  return ml_collections.ConfigDict(json.loads(cfg_file.read_text()))


def load_params(path, step=None, sharding=None):
  """Load a checkpoint's parameters for evaluation or as a frozen reference.

  Args:
    path: a workdir, WORKDIR/checkpoints, or a step folder.
    step: which step (default: the latest complete one).
    sharding: where to place every array (default: replicated on all local devices), so
      a checkpoint written on 8 devices loads on 1 and vice versa.
  Returns:
    (config, params, step)
  """
  root, step = _resolve(path, step)
  config = load_config(root, step)
  if sharding is None:
    mesh = jax.sharding.Mesh(jax.devices(), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mgr = ocp.CheckpointManager(root, item_names=ITEMS,
                              item_handlers={"state": ocp.StandardCheckpointHandler()},
                              options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    meta = mgr.item_metadata(step)["state"]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:
    raise CheckpointError(f"could not read the state of checkpoint {root / str(step)}: {e}") from e
  finally:
    mgr.close()
  logging.getLogger("jest_pod").info("loaded checkpoint %s step %d", root, step)
  return config, state["state"]["params"], step
