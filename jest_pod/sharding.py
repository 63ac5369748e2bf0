"""The device mesh and how arrays are laid out on it — configuration, not code.

Parameters are sharded by (regex, rule) pairs applied to the paths of the abstract
train state (big_vision style): `replicate`, or `fsdp` (the largest dimension that the
fsdp axis divides is split over it). Batches are split by rows over all data axes.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # batch rows are split over both (fsdp is data-parallel too)


def make_mesh(mesh_spec, devices=None) -> Mesh:
  """Mesh from ((name, size), ...), one size may be -1 (= the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
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
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, names)


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
      if regex.fullmatch(name) or regex.search(name):
        return NamedSharding(mesh, _spec_for(rule, getattr(leaf, "shape", ()), mesh))
    raise ValueError(f"no config.sharding_rules entry matches the state leaf {name!r}; "
                     "add a catch-all ('.*', 'replicate')")

  return jax.tree_util.tree_map_with_path(one, abstract_tree)
