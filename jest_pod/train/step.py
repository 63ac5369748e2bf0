"""The train update: (state, batch) → (state, metrics), one contrastive loss over B.

Scoring and selection (what comes before it in a JEST step) live in `jest_pod.jest.step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jest_pod import config as config_lib
from jest_pod.jest import losses


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
  patch_sizes = config_lib.train_patch_sizes(config)  # () in the config = the base patch
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
