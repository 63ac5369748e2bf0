"""FlexiViT patch-embedding resize and the two-tower model's contract."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jest_pod.jest import losses
from jest_pod.models import build_model
from jest_pod.models import layers, vit


@pytest.mark.parametrize("old,new", [(4, 8), (2, 6), (8, 8)])
def test_pi_resize_preserves_tokens_when_upsampling(old, new):
  """⟨x, w⟩ = ⟨resize(x), PI-resize(w)⟩ for every patch x (exact when new ≥ old)."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(old, old, 3, 5)).astype(np.float32)
  x = rng.normal(size=(old, old, 3)).astype(np.float32)
  x_up = jax.image.resize(x, (new, new, 3), "bilinear", antialias=False)
  w_new = vit.pi_resize_kernel(jnp.asarray(kernel), new)
  assert w_new.shape == (new, new, 3, 5)
  np.testing.assert_allclose(np.einsum("ijc,ijcd->d", x_up, w_new),
                             np.einsum("ijc,ijcd->d", x, kernel), rtol=1e-4, atol=1e-4)


def tiny_model_config():
  return ml_collections.ConfigDict(dict(
      image_size=16, embed_dim=8,
      image=dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
      text=dict(vocab_size=50, max_len=8, width=16, depth=1, num_heads=2, mlp_dim=32)))


def test_two_tower_runs_at_two_patch_sizes_from_one_set_of_weights():
  model = build_model(tiny_model_config())
  image = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  text = jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]] * 3, jnp.int32)
  params = model.init(jax.random.key(0), image, text)["params"]
  z4, t4, out = model.apply({"params": params}, image, text, patch_size=4)
  z8, _, _ = model.apply({"params": params}, image, None, patch_size=8)
  assert z4.shape == z8.shape == t4.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(z4, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(t4, axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(z4, z8)  # a different tokenisation, same parameters
  np.testing.assert_allclose(out["t"], 10.0, rtol=1e-6)  # t' init log 10
  np.testing.assert_allclose(out["b"], -10.0)
  with pytest.raises(ValueError, match="not divisible by patch size 5"):
    model.apply({"params": params}, image, None, patch_size=5)


def test_padding_does_not_change_text_embedding():
  model = build_model(tiny_model_config())
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                      jnp.ones((1, 8), jnp.int32))["params"]
  short = jnp.array([[5, 6, 7, 0]], jnp.int32)
  long = jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]], jnp.int32)
  a = model.apply({"params": params}, None, short)[1]
  b = model.apply({"params": params}, None, long)[1]
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _inputs():
  image = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  text = jnp.array([[5, 6, 7, 0, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 3, 2], [0] * 8], jnp.int32)
  return image, text


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_matches_flax_attention(padded):
  """Same parameter tree as nn.MultiHeadDotProductAttention and the same outputs on every
  real token (padding rows are pooled out by the text tower)."""
  x = jax.random.normal(jax.random.key(2), (3, 8, 16))
  mask = jnp.arange(8)[None, :] < jnp.array([3, 8, 5])[:, None]
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=2)
  params = flax_mha.init(jax.random.key(0), x, x)
  ours = layers.Attention(num_heads=2)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, params))
  if padded:
    want = flax_mha.apply(params, x, x, mask=nn.make_attention_mask(mask, mask))
    got = ours.apply(params, x, jnp.sum(mask, axis=1, dtype=jnp.int32))
    keep = np.asarray(mask)
  else:
    want, got = flax_mha.apply(params, x, x), ours.apply(params, x)
    keep = np.ones(mask.shape, bool)
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], rtol=1e-5, atol=1e-5)


def _dot_dtypes(jaxpr):
  """Operand dtypes of every dot_general in a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(str(v.aval.dtype) for v in eqn.invars)
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _dot_dtypes(sub)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  cfg = tiny_model_config()
  image, text = _inputs()
  f32 = build_model(cfg)
  cfg.dtype = "bfloat16"
  bf16 = build_model(cfg)
  params = bf16.init(jax.random.key(0), image, text)["params"]
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  apply = lambda m: m.apply({"params": params}, image, text)
  zimg, ztxt, _ = apply(bf16)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  zimg32, ztxt32, _ = apply(f32)
  np.testing.assert_allclose(zimg, zimg32, atol=0.05)
  np.testing.assert_allclose(ztxt, ztxt32, atol=0.05)
  # Every matmul of the towers runs in bfloat16 (at the base patch size: no PI-resize).
  jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, image, text))(params)
  dots = list(_dot_dtypes(jaxpr.jaxpr))
  assert dots and all(d == ("bfloat16", "bfloat16") for d in dots), dots


def _stack(params, cfg):
  """Plain-layout TwoTower params → scan layout (both towers' encoders)."""
  out = dict(params)
  for tower, depth in (("img", cfg.image["depth"]), ("txt", cfg.text["depth"])):
    out[tower] = dict(params[tower], encoder=layers.stack_blocks(params[tower]["encoder"], depth))
  return out


@pytest.mark.parametrize("remat,scan", [(True, False), (False, True), (True, True)])
def test_remat_and_scan_layers_match_the_plain_model(remat, scan):
  cfg = tiny_model_config()
  cfg.image["depth"] = cfg.text["depth"] = 3
  image, text = _inputs()
  plain = build_model(cfg)
  cfg.remat, cfg.scan_layers = remat, scan
  other = build_model(cfg)
  params = plain.init(jax.random.key(0), image, text)["params"]
  other_shapes = jax.eval_shape(other.init, jax.random.key(0), image, text)["params"]
  convert = (lambda p: _stack(p, cfg)) if scan else (lambda p: p)
  assert jax.tree.map(jnp.shape, other_shapes) == jax.tree.map(jnp.shape, convert(params))
  assert sum(a.size for a in jax.tree.leaves(other_shapes)) == sum(
      a.size for a in jax.tree.leaves(params))

  def loss(model, p):
    zimg, ztxt, out = model.apply({"params": p}, image, text)
    return losses.sigmoid_loss(zimg, ztxt, out["t"], out["b"])

  l0, g0 = jax.value_and_grad(functools.partial(loss, plain))(params)
  l1, g1 = jax.value_and_grad(functools.partial(loss, other))(convert(params))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g1, convert(g0))
  if scan:
    back = layers.unstack_blocks(convert(params)["txt"]["encoder"], 3)
    jax.tree.map(np.testing.assert_array_equal, back, params["txt"]["encoder"])
