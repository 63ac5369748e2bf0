"""Mesh from config and rule-based parameter sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jest_pod.parallel import sharding as shd


def test_mesh_sizes_adapt_to_the_device_count():
  assert dict(shd.make_mesh((("data", -1), ("fsdp", 1))).shape) == {"data": 8, "fsdp": 1}
  assert dict(shd.make_mesh((("data", -1), ("fsdp", 2))).shape) == {"data": 4, "fsdp": 2}
  assert dict(shd.make_mesh((("data", -1),), jax.devices()[:1]).shape) == {"data": 1}
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    shd.make_mesh((("data", 3), ("fsdp", -1)))


def test_mesh_layout_and_axis_types():
  # An explicit device list is reshaped in its own order; the global set goes through
  # jax.make_mesh (on CPU: JAX's order). Axes are Auto either way, as Mesh's default.
  devs = jax.local_devices()[::-1]
  local = shd.make_mesh((("data", -1),), devs)
  assert list(local.devices.flat) == devs
  full = shd.make_mesh((("data", 2), ("fsdp", -1)))
  assert list(full.devices.flat) == jax.devices()
  for mesh in (local, full):
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_rules_replicate_or_fsdp_the_largest_divisible_dim():
  mesh = shd.make_mesh((("data", 2), ("fsdp", 4)))
  tree = {"enc": {"kernel": jax.ShapeDtypeStruct((6, 16), np.float32),
                  "bias": jax.ShapeDtypeStruct((3,), np.float32)},
          "t": jax.ShapeDtypeStruct((), np.float32)}
  out = shd.tree_shardings(tree, ((".*kernel", "fsdp"), (".*", "replicate")), mesh)
  assert out["enc"]["kernel"].spec == P(None, "fsdp")
  assert out["enc"]["bias"].spec == P()
  out = shd.tree_shardings(tree, ((".*", "fsdp"),), mesh)
  assert out["enc"]["bias"].spec == P()  # 3 is not divisible by 4: replicated
  with pytest.raises(ValueError, match="no config.sharding_rules entry matches"):
    shd.tree_shardings(tree, ((".*kernel", "fsdp"),), mesh)
