"""FlexiViT patch-embedding resize and the two-tower model's contract."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jest_pod.models import build_model
from jest_pod.models import vit


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
