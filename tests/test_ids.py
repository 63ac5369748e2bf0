"""Example ids past 2^31 survive the trip host → devices → JEST selection → host
(JAX runs without x64: an int64 id put on the devices as such would be cut to int32)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jest_pod import config as config_lib
from jest_pod.jest import selection
from jest_pod.parallel import sharding as shd
from jest_pod.jest import step as jest_lib
from jest_pod.train import feed
from jest_pod.parallel import ids as ids_lib

BIG = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40, 2**40 + 123,
                3 * 2**40 + 2**31 + 7, 2**62, 2**63 - 1, -1, -(2**63)], np.int64)


def test_split_join_round_trip_every_int64_range():
  words = ids_lib.split(BIG)
  assert words.dtype == np.int32 and words.shape == (len(BIG), 2)
  np.testing.assert_array_equal(ids_lib.join(words), BIG)
  # What the old path did (keep 31 bits) loses exactly these: the test would catch it.
  assert not np.array_equal(BIG & 0x7FFFFFFF, BIG)


def test_selected_ids_past_2_31_and_2_40_round_trip_through_selection():
  """The trainer's path for selected_ids.jsonl: feed.to_global (host → 8 devices),
  JEST's gather of the selected rows (the same select fn as JestStep), ids.host_ids."""
  n, b, d = 64, 32, 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  config = config_lib.base_config()
  config.batch_size = b
  config.selection.update(method="joint", score="hard_learner", n_chunks=4)
  # Row r carries id 2^40 + r·(2^32 + 2^31 + 3) (both int32 words vary) and marks its
  # image with r, so each selected row's original position can be read back.
  rows = np.arange(n)
  host_ids = np.int64(2**40) + rows.astype(np.int64) * (2**32 + 2**31 + 3)
  image = np.broadcast_to(rows[:, None, None, None], (n, 2, 2, 3)).astype(np.float32)
  super_batch = feed.to_global({"image": image, "index": host_ids}, shd.batch_sharding(mesh))
  assert super_batch["index"].dtype == jnp.int32  # the devices never see an int64
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x + rng.normal(size=(n, d))).astype(np.float32)
  learner = selection.Embeddings(
      jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True)),
      jnp.asarray(y / np.linalg.norm(y, axis=1, keepdims=True)), jnp.float32(10.0),
      jnp.float32(-5.0))
  select = jax.jit(jest_lib.make_select_fn(config, mesh, b))
  batch, _, _ = select(jax.random.key(0), learner, None, super_batch)
  picked = np.asarray(batch["image"][:, 0, 0, 0]).astype(np.int64)
  assert len(set(picked.tolist())) == b
  got = ids_lib.host_ids(batch["index"])
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, host_ids[picked])
  assert got.min() >= 2**40 and not np.array_equal(got & 0x7FFFFFFF, got)
