"""The train update: (state, batch[, teacher]) → (state, metrics), one contrastive loss over B
(plus distillation from θ* when config.distill.weight > 0).

Scoring and selection (what comes before it in a JEST step) live in `jest_pod.jest.step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jest_pod import config as config_lib
from jest_pod.jest import losses
from jest_pod.jest.selection import Embeddings
from jest_pod.parallel import sharding as shd


def split_bounds(n: int, fractions) -> list[tuple[int, int]]:
  """Row ranges of a batch of n split by `fractions` (Flexi-JEST half at p, half at 2p)."""
  bounds, lo = [], 0
  for i, f in enumerate(fractions):
    hi = n if i == len(fractions) - 1 else lo + int(round(n * f))
    bounds.append((lo, hi))
    lo = hi
  return bounds


def make_train_step(config, model, tx, schedule):
  """(state, batch, teacher) → (state, metrics). The batch's images are split across the
  Flexi training patch sizes; one contrastive loss is taken over the whole batch, plus
  config.distill.weight × the distillation term when `teacher` (θ*'s
  `selection.Embeddings` of the same B rows) is given."""
  spec = config_lib.resolve(config)
  patch_sizes, fractions = spec.train_patches, spec.train_fractions
  d = config.distill

  def loss_fn(params, batch, teacher):
    image, text = batch["image"], batch["text"]
    zimgs = []
    for p, (lo, hi) in zip(patch_sizes, split_bounds(image.shape[0], fractions)):
      if hi > lo:
        zimgs.append(model.apply({"params": params}, image[lo:hi], None, patch_size=p)[0])
    _, ztxt, out = model.apply({"params": params}, None, text)
    zimg = jnp.concatenate(zimgs, axis=0)
    contrastive = losses.contrastive_loss(config.loss, zimg, ztxt, out["t"], out["b"])
    aux = {"out": out}
    if teacher is None:
      return contrastive, aux
    aux["contrastive"] = contrastive
    aux["distill"] = losses.distill_loss(
        d.kind, (zimg, ztxt, out["t"], out["b"]),
        (teacher.image, teacher.text, teacher.temperature, teacher.bias), d.temperature)
    return contrastive + d.weight * aux["distill"], aux

  def train_step(state, batch, teacher=None):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch,
                                                                   teacher)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # param_norm guards the checkpoint: a finite loss can precede a non-finite update.
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/param_norm": optax.tree.norm(params),
               "train/temperature": aux["out"]["t"], "train/bias": aux["out"]["b"],
               "train/lr": schedule(state["step"])}
    if teacher is not None:
      metrics["train/contrastive_loss"] = aux["contrastive"]
      metrics["train/distill_loss"] = aux["distill"]
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def jit_train_step(config, model, tx, schedule, mesh, state_sharding):
  """The compiled train step as training runs it (the trainer and `bench step --xla-check`
  both call this): rows sharded over the data axes, the state donated. The teacher
  (distillation only) is θ*'s embeddings of the batch's rows; its scalars replicated."""
  rows, replicated = shd.batch_sharding(mesh), shd.replicated(mesh)
  teacher = (Embeddings(rows, rows, replicated, replicated)
             if losses.distilling(config) else None)
  return jax.jit(make_train_step(config, model, tx, schedule),
                 in_shardings=(state_sharding, rows, teacher),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
