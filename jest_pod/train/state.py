"""Train state ({params, opt_state, step}) and the optax optimizer, built sharded."""

import jax
import jax.numpy as jnp
import optax

from jest_pod.parallel import sharding as shd


def make_schedule(oc, total_steps):
  """Linear warmup to oc.lr, then cosine to oc.lr * end_lr_fraction."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=oc.lr, warmup_steps=min(oc.warmup_steps, total_steps),
      decay_steps=max(total_steps, oc.warmup_steps + 1), end_value=oc.lr * oc.end_lr_fraction)


def make_optimizer(oc, total_steps):
  """AdamW with warmup + cosine and global-norm clipping; no decay on biases/norms/scalars."""
  schedule = make_schedule(oc, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip),
      optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=decay_mask))
  return tx, schedule


def dummy_inputs(config):
  s = config.model.image_size
  return (jnp.zeros((1, s, s, 3), jnp.float32),
          jnp.zeros((1, config.input.max_text_len), jnp.int32))


def create_state(config, model, tx, mesh, rng):
  """Initialise the state directly into its shardings (never whole on one device).

  Returns (state, state_shardings).
  """
  image, text = dummy_inputs(config)

  def init(rng):
    params = model.init(rng, image, text)["params"]
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init, rng)
  shardings = shd.tree_shardings(abstract, config.sharding_rules, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def abstract_with_shardings(state_shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)


def with_params(state, params, tx, shardings):
  """A fresh state (step 0, new optimizer state) around `params` — a checkpoint's weights
  (config.model.init_from) — in the state's shardings and dtypes."""
  params = jax.tree.map(lambda p, like: jax.device_put(jnp.asarray(p, like.dtype), like.sharding),
                        params, state["params"])

  def init(p):
    return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}

  return jax.jit(init, out_shardings=shardings)(params)
