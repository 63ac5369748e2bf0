"""The JEST step: a super-batch of N rows in, the B selected rows (and metrics) out.

The one home of what the trainer and `jest-pod bench step` both run, in order:
  scoring     the learner's forward pass over the N rows at the score patch (Flexi-JEST:
              2p, a quarter of the tokens)
  reference   the frozen reference θ*'s embeddings: rows of the reference cache (looked
              up on the host by example index, put on the devices with the super-batch)
              or, without a cache, a forward pass
  selection   joint (or independent) selection of B rows from the embeddings, then the
              gather of those rows from the sharded super-batch
`__call__` only dispatches (nothing waits for the device), so the step overlaps with the
input pipeline; `timed_call` runs the same parts with a barrier after each, for the
sampled time split.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jest_pod import config as config_lib
from jest_pod.jest import selection
from jest_pod.parallel import sharding as shd
from jest_pod.data.input_config import DEVICE_KEYS

# Device keys the step adds to a super-batch when the reference comes from the cache.
CACHE_KEYS = ("ref_image", "ref_text")


def uses_models(score: str) -> tuple[bool, bool]:
  """(uses the learner, uses the reference) of a score, from its weights in SCORES."""
  w_learner, w_reference = selection.SCORES[score]
  return w_learner != 0.0, w_reference != 0.0


def uses_reference(config) -> bool:
  """Whether a run needs the reference (its forward pass or its cache)."""
  s = config.selection
  return s.method != "uniform" and uses_models(s.score)[1]


# The patch size the learner scores at: the one resolver, in jest_pod/config (0 = base patch).
score_patch_size = config_lib.score_patch_size


def make_embed_fn(model, patch_size):
  """(params, batch) → Embeddings of the whole (super-)batch, no gradient."""

  def embed(params, batch):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"],
                                  patch_size=patch_size)
    return selection.Embeddings(image=zimg, text=ztxt, temperature=out["t"], bias=out["b"])

  return embed


def make_select_fn(config, mesh, num_select):
  """(key, learner_emb, reference_emb, super_batch) → (batch, metrics): JEST's choice of
  B rows out of N, gathered from the sharded super-batch (device keys only)."""
  s = config.selection
  batch_sharding = shd.batch_sharding(mesh)
  kw = dict(num_select=num_select, score=s.score, loss=config.loss, mesh=mesh,
            data_axes=shd.data_axes(mesh))

  def select(key, learner, reference, super_batch):
    if s.method == "joint":
      idx = selection.joint_select(key, learner, reference, n_chunks=s.n_chunks, **kw)
    else:
      idx = selection.independent_select(key, learner, reference,
                                         method=s.independent_method, **kw)
    batch = {k: jax.lax.with_sharding_constraint(jnp.take(v, idx, axis=0), batch_sharding)
             for k, v in super_batch.items() if k in DEVICE_KEYS}
    metrics = {}
    if learner is not None and reference is not None:
      metrics["select/learnability_super_batch"] = selection.mean_learnability(learner,
                                                                               reference)
      metrics["select/learnability_selected"] = selection.mean_learnability(
          learner, reference, idx)
    return batch, metrics

  return select


class JestStep:
  """Turns a device-resident super-batch into the selected batch.

  Args:
    config: the run's config (selection, flexi, loss, batch_size).
    model: the learner's TwoTower.
    mesh: the device mesh; rows are sharded over its data axes.
    reference: (ref_config, ref_model, ref_params) for a forward-pass reference, or None.
    cache: a `reference_cache.ReferenceCache` (rows by example index), or None.
  """

  def __init__(self, config, model, mesh, *, reference=None, cache=None):
    self.config = config
    self.uses_learner, self.uses_reference = uses_models(config.selection.score)
    if self.uses_reference and reference is None and cache is None:
      raise ValueError(f"score {config.selection.score!r} needs the reference: pass a "
                       "reference checkpoint or a reference cache")
    self.cache = cache if self.uses_reference else None
    self._learner = (jax.jit(make_embed_fn(model, score_patch_size(config)))
                     if self.uses_learner else None)
    self._reference = None
    # The reference's config, for its FLOPs (None with a cache: its meta has them).
    self.reference_config = None
    if self.uses_reference and self.cache is None:
      self.reference_config, ref_model, self._ref_params = reference
      self._reference = jax.jit(make_embed_fn(ref_model, None))
    self._select = jax.jit(make_select_fn(config, mesh, config.batch_size))

  def host_inputs(self, host_batch) -> dict[str, np.ndarray]:
    """Host-side rows the step needs beside the batch: the cached reference embeddings
    of this host's rows (an O(rows) memory-mapped lookup; run it in the input thread)."""
    if self.cache is None:
      return {}
    image, text = self.cache.lookup(host_batch["index"])
    return {"ref_image": image, "ref_text": text}

  def learner_embeddings(self, params, super_batch):
    """The learner's Embeddings of the super-batch at the score patch (None if unused)."""
    return self._learner(params, super_batch) if self._learner else None

  def reference_embeddings(self, super_batch):
    """θ*'s Embeddings: the cache's rows (put on the devices with the batch) or a
    forward pass (None if the score does not use the reference)."""
    if self.cache is not None:
      return selection.Embeddings(
          image=super_batch["ref_image"], text=super_batch["ref_text"],
          temperature=jnp.float32(self.cache.temperature), bias=jnp.float32(self.cache.bias))
    if self._reference is not None:
      return self._reference(self._ref_params, super_batch)
    return None

  def __call__(self, params, super_batch, key):
    """→ (batch of B rows, selection metrics); dispatch only, no host sync."""
    return self._select(key, self.learner_embeddings(params, super_batch),
                        self.reference_embeddings(super_batch), super_batch)

  def timed_call(self, params, super_batch, key):
    """`__call__` waiting for each part: → (batch, metrics, {part: seconds})."""
    times, out = {}, {}
    parts = (("scoring", lambda: self.learner_embeddings(params, super_batch)),
             ("reference", lambda: self.reference_embeddings(super_batch)))
    for part, fn in parts:
      t = time.perf_counter()
      out[part] = jax.block_until_ready(fn())
      times[part] = time.perf_counter() - t
    t = time.perf_counter()
    batch, metrics = jax.block_until_ready(
        self._select(key, out["scoring"], out["reference"], super_batch))
    times["selection"] = time.perf_counter() - t
    return batch, metrics, times
