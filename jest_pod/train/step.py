"""The jitted pieces of a step: learner/reference scoring, selection, the train update.

They stay separate jits (not one fused step) so the trainer can time each part and
log the selection's share of the step; the cost is a few host round-trips per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jest_pod import losses
from jest_pod import sharding as shd


def split_bounds(n: int, fractions) -> list[tuple[int, int]]:
  """Row ranges of a batch of n split by `fractions` (Flexi-JEST half at p, half at 2p)."""
  bounds, lo = [], 0
  for i, f in enumerate(fractions):
    hi = n if i == len(fractions) - 1 else lo + int(round(n * f))
    bounds.append((lo, hi))
    lo = hi
  return bounds


def make_train_step(config, model, tx, schedule):
  """(state, batch) → (state, metrics). The batch's images are split across the Flexi
  training patch sizes; one contrastive loss is taken over the whole batch."""
  patch_sizes = tuple(config.flexi.train_patch_sizes)
  fractions = tuple(config.flexi.train_fractions)

  def loss_fn(params, batch):
    image, text = batch["image"], batch["text"]
    zimgs = []
    for p, (lo, hi) in zip(patch_sizes, split_bounds(image.shape[0], fractions)):
      if hi > lo:
        zimgs.append(model.apply({"params": params}, image[lo:hi], None, patch_size=p)[0])
    _, ztxt, out = model.apply({"params": params}, None, text)
    zimg = jnp.concatenate(zimgs, axis=0)
    return losses.contrastive_loss(config.loss, zimg, ztxt, out["t"], out["b"]), out

  def train_step(state, batch):
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # param_norm guards the checkpoint: a finite loss can precede a non-finite update.
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/param_norm": optax.tree.norm(params),
               "train/temperature": out["t"], "train/bias": out["b"],
               "train/lr": schedule(state["step"])}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def make_embed_fn(model, patch_size):
  """(params, batch) → Embeddings of the whole (super-)batch, no gradient."""
  from jest_pod.selection import Embeddings

  def embed(params, batch):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"],
                                  patch_size=patch_size)
    return Embeddings(image=zimg, text=ztxt, temperature=out["t"], bias=out["b"])

  return embed


def make_select_fn(config, mesh, num_select):
  """(key, learner_emb, reference_emb, super_batch) → (batch, idx, metrics): JEST's choice
  of B rows out of N, gathered from the sharded super-batch."""
  from jest_pod import selection

  s = config.selection
  batch_sharding = shd.batch_sharding(mesh)

  def select(key, learner, reference, super_batch):
    if s.method == "joint":
      idx = selection.joint_select(key, learner, reference, num_select=num_select,
                                   n_chunks=s.n_chunks, score=s.score, loss=config.loss,
                                   mesh=mesh, data_axes=shd.data_axes(mesh))
    else:
      idx = selection.independent_select(key, learner, reference, num_select=num_select,
                                         score=s.score, method=s.independent_method,
                                         loss=config.loss, mesh=mesh,
                                         data_axes=shd.data_axes(mesh))
    batch = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(jnp.take(x, idx, axis=0), batch_sharding),
        super_batch)
    metrics = {}
    if learner is not None and reference is not None:
      metrics["select/learnability_super_batch"] = selection.mean_learnability(learner, reference)
      metrics["select/learnability_selected"] = selection.mean_learnability(learner, reference,
                                                                            idx)
    return batch, idx, metrics

  return select
