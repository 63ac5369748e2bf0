"""The JEST step: a super-batch of N rows in, the B selected rows (and metrics) out.

The one home of what the trainer and `jest-pod bench step` both run, in order:
  scoring     the learner's forward pass over the N rows at the score patch (Flexi-JEST:
              2p, a quarter of the tokens)
  reference   the frozen reference θ*'s embeddings, from a `jest.reference.Reference`
              (rows of the reference cache looked up on the host and put on the devices
              with the super-batch, or a forward pass)
  selection   joint (or independent) selection of B rows from the embeddings, then the
              gather of those rows from the sharded super-batch (and, when distilling,
              of θ*'s embeddings of them: the teacher, at no second reference pass)
`__call__` only dispatches (nothing waits for the device), so the step overlaps with the
input pipeline; `timed_call` runs the same parts with a barrier after each, for the
sampled time split.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jest_pod.data.input_config import DEVICE_KEYS
from jest_pod.jest import losses
from jest_pod.jest import selection
from jest_pod.jest.reference import make_embed_fn
from jest_pod.parallel import sharding as shd


def make_select_fn(config, mesh, num_select):
  """(key, learner_emb, reference_emb, super_batch) → (batch, metrics, teacher): JEST's
  choice of B rows out of N, gathered from the sharded super-batch (device keys only);
  `teacher` is θ*'s Embeddings of those rows when distilling (config.distill), else None.
  `reference_emb` may be given for the teacher alone (a score that does not weigh θ*)."""
  s = config.selection
  batch_sharding = shd.batch_sharding(mesh)
  kw = dict(num_select=num_select, score=s.score, loss=config.loss, mesh=mesh,
            data_axes=shd.data_axes(mesh))
  scores_reference = selection.uses_models(s.score)[1]
  distill = losses.distilling(config)

  def rows(v, idx):
    return jax.lax.with_sharding_constraint(jnp.take(v, idx, axis=0), batch_sharding)

  def select(key, learner, reference_all, super_batch):
    reference = reference_all if scores_reference else None
    if s.method == "joint":
      idx = selection.joint_select(key, learner, reference, n_chunks=s.n_chunks, **kw)
    else:
      idx = selection.independent_select(key, learner, reference,
                                         method=s.independent_method, **kw)
    batch = {k: rows(v, idx) for k, v in super_batch.items() if k in DEVICE_KEYS}
    teacher = (reference_all._replace(image=rows(reference_all.image, idx),
                                      text=rows(reference_all.text, idx))
               if distill else None)
    # The score's own diagonal, for every score: the NaN guard watches select/*.
    metrics = {"select/score_super_batch": selection.mean_diagonal_score(learner, reference,
                                                                         s.score)}
    if learner is not None and reference is not None:
      metrics["select/learnability_super_batch"] = selection.mean_learnability(learner,
                                                                               reference)
      metrics["select/learnability_selected"] = selection.mean_learnability(
          learner, reference, idx)
    return batch, metrics, teacher

  return select


class JestStep:
  """Turns a device-resident super-batch into the selected batch.

  Args:
    config: the run's config (selection, flexi, loss, batch_size).
    model: the learner's model.
    mesh: the device mesh; rows are sharded over its data axes.
    score_patch: the patch the learner scores at, as config.score_patch_size resolves it
      (`config.RunSpec.score_patch`; passed in: jest does not import config).
    reference: the run's `jest.reference.Reference` (None when neither the score nor
      distillation uses θ*).
  """

  def __init__(self, config, model, mesh, *, score_patch: int, reference=None):
    self.config = config
    self.uses_learner, uses_reference = selection.uses_models(config.selection.score)
    self.reference = (reference if uses_reference or losses.distilling(config)
                      else None)
    self._learner = (jax.jit(make_embed_fn(model, score_patch))
                     if self.uses_learner else None)
    # Two-phase input: the super-batch's `score_image`s at the base patch give the pass
    # at `score_patch` on the full images (data/score_images.py).
    self._learner_base = jax.jit(make_embed_fn(model, None)) if self.uses_learner else None
    self._select = jax.jit(make_select_fn(config, mesh, config.batch_size))

  def learner_embeddings(self, params, super_batch):
    """The learner's Embeddings of the super-batch at the score patch (None if unused),
    from its score images when the super-batch carries them (two-phase input)."""
    if not self._learner:
      return None
    if "score_image" in super_batch:
      return self._learner_base(params, {"image": super_batch["score_image"],
                                         "text": super_batch["text"]})
    return self._learner(params, super_batch)

  def reference_embeddings(self, super_batch):
    """θ*'s Embeddings of the super-batch (None if neither the score nor distillation
    uses the reference)."""
    return self.reference.embeddings(super_batch) if self.reference else None

  def __call__(self, params, super_batch, key):
    """→ (batch of B rows, selection metrics, teacher or None); dispatch only, no host
    sync."""
    return self._select(key, self.learner_embeddings(params, super_batch),
                        self.reference_embeddings(super_batch), super_batch)

  def timed_call(self, params, super_batch, key):
    """`__call__` waiting for each part: → (batch, metrics, teacher, {part: seconds})."""
    times, out = {}, {}
    parts = (("scoring", lambda: self.learner_embeddings(params, super_batch)),
             ("reference", lambda: self.reference_embeddings(super_batch)))
    for part, fn in parts:
      t = time.perf_counter()
      out[part] = jax.block_until_ready(fn())
      times[part] = time.perf_counter() - t
    t = time.perf_counter()
    batch, metrics, teacher = jax.block_until_ready(
        self._select(key, out["scoring"], out["reference"], super_batch))
    times["selection"] = time.perf_counter() - t
    return batch, metrics, teacher, times
