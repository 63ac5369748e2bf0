"""One checkpoint = {train state, data iterator state (per host), config, digest}, via Orbax.

Orbax writes each step into a temporary directory and renames it only when every
item (and every host) has finished, so a step directory that exists is complete: a
preempted or crashed save is never mistaken for a good checkpoint, and the next run
resumes from the last complete one.

A complete directory can still be damaged later (a deleted or truncated file, flipped
bytes on disk). `Checkpointer.restore_latest` therefore checks each step's files, restores
it, and compares the state with the content hash saved beside it (`digest`: per numeric
leaf, two 32-bit sums of every element's bits mixed with its position, so it sees a changed
bit and a changed order alike); a step that fails is moved aside as `<step>.corrupt-<time>`
(never deleted) and the next older one is tried. `load_params`, which every other reader
uses, checks the same digest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jest_pod import errors
from jest_pod.parallel import distributed
from jest_pod.parallel import sharding as shd

ITEMS = ("state", "data", "config", "digest")
# Fingerprints of a state saved and restored on different meshes differ by float32
# summation order only (~1e-7 relative); damage changes them by far more.
DIGEST_RTOL = 1e-5

log = logging.getLogger("jest_pod")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, partial or does not fit the model."""


_TS_SPEC = re.compile(r"\s*\[tensorstore_spec[^=]*=.*$", re.S)


def read_error(e: BaseException, limit: int = 300) -> str:
  """A read failure in one line: TensorStore's messages carry the whole JSON spec of the
  array (~1 kB) and a chain of "Error opening/reading ..." contexts; keep the status, and
  the end of the chain, which names the file and what is wrong with it."""
  text = " ".join(_TS_SPEC.sub("", str(e)).split())
  status, sep, rest = text.partition(": ")
  if not (sep and status.isupper()):
    status, rest = "", text
  if len(rest) > limit:
    rest = "…" + rest[-limit:]
  return f"{type(e).__name__}: {status + ': ' if status else ''}{rest}"


class _ReadNoise(logging.Filter):
  """When one array of a checkpoint fails to read, asyncio later logs "Task exception was
  never retrieved" with a traceback for every other array read in flight (60-120 lines
  after the command's one error line). The failure is reported once, by the reader: drop
  those (--debug keeps them)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if errors.debug() or not record.exc_info or record.exc_info[1] is None:
      return True
    _, exc, tb = record.exc_info
    return not ("tensorstore_spec" in str(exc)
                or any("orbax" in f.filename for f in traceback.extract_tb(tb)))


def _quiet_read_noise() -> None:
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _ReadNoise) for f in logger.filters):
    logger.addFilter(_ReadNoise())


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
                       "config": ocp.JsonCheckpointHandler(),
                       "digest": ocp.JsonCheckpointHandler()},
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
    # The digest is an item of the same save, so it is committed atomically with the state.
    digest = {"fingerprint": fingerprint(state).tolist(), "kind": FINGERPRINT_KIND}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        digest=ocp.args.JsonSave(digest)), force=True)

  def restore(self, step: int, abstract_state, data_iter):
    """Restore `step` into shardings given by `abstract_state` (ShapeDtypeStructs with
    .sharding); the data iterator is restored in place. Returns the state."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return out["state"]

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.manager.directory) / str(step)

  def readable_config_step(self) -> int | None:
    """The newest step whose saved config reads back (for the resume comparison)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        load_config(self.step_dir(step))
        return step
      except (CheckpointError, ValueError):
        continue
    return None

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) from the newest checkpoint that reads back intact; (0, None) if none.

    Each step is checked (files, restore, digest) the same way on every process, and the
    verdict is combined across processes so that all restore the same step. Steps newer
    than the one restored are moved aside (by process 0). If no step restores, nothing
    is moved: a checkpoint that does not fit the model (changed config) fails every step
    alike, and that is not damage.
    """
    problems = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self._check_files(step)
        state = self.restore(step, abstract_state, data_iter)
        problem = self._check_digest(step, state)
      except Exception as e:  # pylint: disable=broad-except  (any read error = damage)
        _quiet_read_noise()
        problem = read_error(e)
      if distributed.process_any(problem is not None):
        problems[step] = problem or "unreadable on another process"
        log.warning("checkpoint %s cannot be restored: %s", self.step_dir(step),
                    problems[step])
        continue
      if problems:
        self._move_aside(problems)
      return step, state
    if problems:
      raise CheckpointError(
          "no checkpoint under " f"{self.manager.directory} restores: " +
          "; ".join(f"step {k}: {v}" for k, v in problems.items()) +
          ". If the config changed since they were written, restore the old config; if "
          "they are damaged, move them aside (rename checkpoints/<step>) to start afresh.")
    return 0, None

  def _check_files(self, step: int) -> None:
    """Cheap checks of the files Orbax reads, naming the first that is missing or
    garbled (the data iterator's JSON is restored last, so a broken one would otherwise
    surface only after the state was read)."""
    d = self.step_dir(step)
    for name in ("state/_METADATA", "state/manifest.ocdbt", "config/metadata"):
      if not (d / name).exists():
        raise CheckpointError(f"{d / name} is missing")
    for f in [d / "state/_METADATA", d / "config/metadata", *(d / "data").glob("*.json")]:
      try:
        json.loads(f.read_text())
      except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})") from e

  def _check_digest(self, step: int, state) -> str | None:
    return digest_problem(self.step_dir(step), state)

  def _move_aside(self, problems) -> None:
    """Rename damaged steps to `<step>.corrupt-<time>` (Orbax ignores non-numeric
    names); process 0 renames, then every process re-reads the step list."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
      for step in problems:
        src = self.step_dir(step)
        dst = src.parent / f"{step}.corrupt-{stamp}"
        src.rename(dst)
        log.warning("moved the damaged checkpoint %s aside to %s (kept for inspection)",
                    src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jest_pod_checkpoint_move_aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


FINGERPRINT_KIND = ("uint32 x2 per numeric leaf of the state: sum mod 2^32 of a mix of each "
                    "element's bits with its position (two seeds)")
# Checkpoints written before the content hash: per leaf float32 sums, which miss a
# reordering (swapped blocks, a swapped max and min). Still verified, as well as they can be.
LEGACY_KIND = "float32 [sum x, sum |x|, sum x^2] per numeric leaf of the state"
_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _numeric_leaves(tree) -> list[tuple[str, jax.Array]]:
  return [(jax.tree_util.keystr(k), x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.number)]


def _fmix32(k):
  """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits."""
  k = k ^ (k >> 16)
  k = k * jnp.uint32(0x85EBCA6B)
  k = k ^ (k >> 13)
  k = k * jnp.uint32(0xC2B2AE35)
  return k ^ (k >> 16)


def _bits(x) -> jax.Array:
  """The leaf's elements as uint32 words of their exact bits (16- and 8-bit types widened)."""
  width = jnp.dtype(x.dtype).itemsize * 8
  if width == 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)


@jax.jit
def _content_hash(tree):
  """[leaves, 2] uint32: per leaf, sum over elements of fmix(bits ^ fmix(position + seed)),
  wrapping mod 2^32. The position makes it see order (swapped blocks or values change
  it), the mix makes any changed bit count; integer addition is exact in any order, so
  it is equal on every mesh and computed where the shards are (no gather, no copy)."""
  out = []
  for _, x in _numeric_leaves(tree):
    bits = _bits(x)
    # Row-major position from per-axis iotas: no reshape, so a sharded leaf stays in place.
    pos, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
      iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
      pos = pos + iota * jnp.uint32(stride % 2**32)
      stride *= x.shape[axis]
    out.append(jnp.stack([
        jnp.sum(_fmix32(bits ^ _fmix32(pos + jnp.uint32(seed))), dtype=jnp.uint32)
        for seed in _SEEDS]))
  return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


@jax.jit
def _legacy_sums(tree):
  leaves = [x.astype(jnp.float32) for _, x in _numeric_leaves(tree)]
  return jnp.stack([jnp.stack([x.sum(), jnp.abs(x).sum(), (x * x).sum()]) for x in leaves])


def fingerprint(state) -> np.ndarray:
  """[leaves, 2] uint32 content hash of the state (`_content_hash`), computed on the
  devices (cheap; works when the arrays span processes: every process must call it)."""
  return distributed.host_array(_content_hash(state)).astype(np.uint32)


def digest_problem(step_dir, state) -> str | None:
  """None if a restored state matches the digest saved with it, else what differs, in one
  line. Every process must call it (the hash is a collective)."""
  f = epath.Path(step_dir) / "digest" / "metadata"
  got = fingerprint(state)
  legacy = distributed.host_array(_legacy_sums(state)).astype(np.float64)
  if not f.exists():
    return f"{f} is missing: the checkpoint cannot be verified (a partial copy?)"
  try:
    digest = json.loads(f.read_text())
    kind = digest.get("kind", LEGACY_KIND)
    saved = np.asarray(digest["fingerprint"], np.float64)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return f"{f} is damaged ({type(e).__name__}: {e})"
  if kind == LEGACY_KIND:
    return _legacy_problem(saved, legacy)
  if kind != FINGERPRINT_KIND:
    return f"{f} holds a digest of an unknown kind ({str(kind)[:80]!r}): a newer jest_pod?"
  if saved.shape != got.shape:
    return f"digest has {saved.shape[0]} leaves, the restored state {got.shape[0]}"
  bad = np.flatnonzero((saved != got).any(axis=1))
  if bad.size:
    names = [name for name, _ in _numeric_leaves(state)]
    leaf = int(bad[0])
    count = f"{bad.size} leaves, first" if bad.size > 1 else "leaf"
    return (f"contents differ from the digest saved with it ({count} "
            f"{names[leaf]}: hash {got[leaf].astype(np.int64).tolist()} vs saved "
            f"{saved[leaf].astype(np.int64).tolist()}): bytes changed on disk")
  return None


def _legacy_problem(saved: np.ndarray, got: np.ndarray) -> str | None:
  """The old sums check (order-blind), for checkpoints written before the content hash."""
  if saved.shape != got.shape:
    return f"digest has {saved.shape[0]} leaves, the restored state {got.shape[0]}"
  scale = np.stack([saved[:, 1], saved[:, 1], saved[:, 2]], axis=1)  # |x| sums bound x sums
  bad = ~(np.abs(got - saved) <= DIGEST_RTOL * scale + 1e-12)  # NaN counts as bad
  if bad.any():
    leaf = int(np.argwhere(bad)[0][0])
    return (f"contents differ from the digest saved with it (leaf {leaf}: "
            f"{got[leaf].tolist()} vs saved {saved[leaf].tolist()}): bytes changed on disk")
  return None


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
  try:
    return ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
  except ValueError as e:
    raise CheckpointError(f"{cfg_file} is damaged ({e}); use another step (--step) or move "
                          f"{root / str(step)} aside") from e


def check_params_fit(model, params, image_size: int, max_text_len: int) -> None:
  """Raise CheckpointError when restored parameters do not fit `model` (renamed layers,
  other sizes), naming the differences: a shape error deep in jit says much less. The
  one fit check, for evaluated checkpoints and the trainer's reference alike."""
  want = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                         jnp.zeros((1, max_text_len), jnp.int32)))["params"]
  flat_want = {jax.tree_util.keystr(k): v.shape
               for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  flat_got = {jax.tree_util.keystr(k): np.shape(v)
              for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  problems = [f"missing {k} {s}" for k, s in flat_want.items() if k not in flat_got]
  problems += [f"unexpected {k} {s}" for k, s in flat_got.items() if k not in flat_want]
  problems += [f"{k}: checkpoint {flat_got[k]} vs model {s}" for k, s in flat_want.items()
               if k in flat_got and tuple(flat_got[k]) != tuple(s)]
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise CheckpointError("the checkpoint's parameters do not fit the model built from its "
                          f"saved config.model ({len(problems)} differences):\n  {shown}{more}")


def load_params(path, step=None, sharding=None):
  """Load a checkpoint's parameters for evaluation, export or as a frozen reference, after
  verifying the whole state against the digest saved with it (as training's restore does).

  Args:
    path: a workdir, WORKDIR/checkpoints, or a step folder.
    step: which step (default: the latest complete one).
    sharding: where to place every array (default: replicated on all devices), so a
      checkpoint written on 8 devices loads on 1 and vice versa.
  Returns:
    (config, params, step)
  Raises:
    CheckpointError naming the step folder when it cannot be read or fails its digest.
  """
  root, step = _resolve(path, step)
  config = load_config(root, step)
  if sharding is None:
    sharding = shd.replicated(shd.make_mesh((("data", -1),)))
  # Only the `state` item, through its handler: a (read-only) CheckpointManager logs ~9
  # absl WARNINGs per load about the items it is not asked for and about read_only.
  step_dir = root / str(step)
  handler = ocp.StandardCheckpointHandler()
  ckptr = ocp.Checkpointer(handler)
  try:
    meta = handler.metadata(step_dir / "state")
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    state = ckptr.restore(step_dir / "state", args=ocp.args.StandardRestore(target))
  except Exception as e:
    _quiet_read_noise()
    raise CheckpointError(
        f"could not read the state of checkpoint {step_dir} ({read_error(e)}): it is "
        f"damaged. Use another step (--step, or move this one aside: rename it to "
        f"{step}.bad) or restore it from a copy") from e
  finally:
    ckptr.close()
  problem = digest_problem(step_dir, state)
  if problem:
    raise CheckpointError(
        f"checkpoint {step_dir} is damaged: {problem}. Use another step (--step, or move "
        f"this one aside: rename it to {step}.bad) or restore it from a copy")
  logging.getLogger("jest_pod").info("loaded checkpoint %s step %d", root, step)
  return config, state["params"], step
