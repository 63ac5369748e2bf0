"""The device mesh and how arrays are laid out on it — configuration, not code.

Parameters are sharded by (regex, rule) pairs applied to the paths of the abstract
train state (big_vision style): `replicate`, or `fsdp` (the largest dimension that the
fsdp axis divides is split over it). Batches are split by rows over all data axes.
"""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXES = ("data", "fsdp")  # batch rows are split over both (fsdp is data-parallel too)


def make_mesh(mesh_spec, devices=None) -> Mesh:
  """The one mesh factory: ((name, size), ...), one size may be -1 (= the rest).

  devices=None: all devices (every process's), laid out by `jax.make_mesh`, which follows
  the physical topology where JAX knows it (TPU slices: neighbours along the inner axes).
  An explicit list (e.g. `jax.local_devices()` for a process-local mesh) is reshaped in
  its own order. Axes are `Auto` (the sharding of jit inputs/outputs, as `Mesh` defaults).
  """
  given = devices is not None
  devices = list(devices if given else jax.devices())
  names = tuple(n for n, _ in mesh_spec)
  sizes = [int(s) for _, s in mesh_spec]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ValueError(f"config.mesh={tuple(mesh_spec)} does not fit {len(devices)} devices: "
                     "sizes must multiply to the device count, with at most one -1")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh={tuple(mesh_spec)} has {int(np.prod(sizes))} slots for "
                     f"{len(devices)} devices; use -1 for one axis to absorb the rest")
  axis_types = (AxisType.Auto,) * len(names)
  if not given:
    try:
      mesh = jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
    except ValueError as e:  # multi-slice, or a shape the physical axes cannot take
      log.info("jax.make_mesh(%s): %s; using the devices in JAX's order", sizes, e)
    else:
      procs = [d.process_index for d in mesh.devices.flat]
      if procs != sorted(procs):  # host p's batch rows are then not the p-th block
        log.warning("the topology's device order interleaves processes: the global "
                    "batch's row order depends on the process count")
      return mesh
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, names, axis_types=axis_types)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the data axes, everything else replicated."""
  return NamedSharding(mesh, P(data_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _spec_for(rule: str, shape, mesh: Mesh) -> P:
  if rule == "replicate" or "fsdp" not in mesh.axis_names:
    return P()
  n = mesh.shape["fsdp"]
  # Shard the largest dimension the axis divides; small or indivisible arrays replicate.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0 and shape[dim] >= n:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, rules, mesh: Mesh):
  """NamedSharding for each leaf of `abstract_tree` (e.g. jax.eval_shape of the state).

  The first rule whose regex matches the leaf's path ("params/img/encoder/...") wins;
  a leaf that no rule matches is an error naming it.
  """
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

  def one(path, leaf):
    name = _path_str(path)
    for regex, rule in compiled:
      if regex.search(name):
        return NamedSharding(mesh, _spec_for(rule, getattr(leaf, "shape", ()), mesh))
    raise ValueError(f"no config.sharding_rules entry matches the state leaf {name!r}; "
                     "add a catch-all ('.*', 'replicate')")

  return jax.tree_util.tree_map_with_path(one, abstract_tree)
