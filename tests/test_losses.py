"""Losses against direct numpy computations of the formulas in the jest_pod/jest/losses.py docstring."""

import jax.numpy as jnp
import numpy as np

from jest_pod.jest import losses


def _emb(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_sigmoid_pair_losses_match_numpy_and_blocks_tile_the_matrix():
  rng = np.random.default_rng(0)
  x, y, t, b = _emb(rng, 6, 4), _emb(rng, 6, 4), 10.0, -10.0
  m = np.where(np.eye(6) > 0, 1.0, -1.0)
  expected = np.log1p(np.exp(-m * (t * x @ y.T + b)))  # −log σ(z) = log(1 + e^−z)
  full = np.asarray(losses.sigmoid_pair_losses(x, y, t, b))
  np.testing.assert_allclose(full, expected, rtol=1e-5)
  block = losses.sigmoid_pair_losses(x[2:5], y[1:4], t, b, row_offset=2, col_offset=1)
  np.testing.assert_allclose(block, expected[2:5, 1:4], rtol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_loss(x, y, t, b), expected.sum() / 6, rtol=1e-5)


def test_softmax_loss_matches_numpy():
  rng = np.random.default_rng(1)
  x, y, t = _emb(rng, 5, 3), _emb(rng, 5, 3), 7.0
  logits = t * x @ y.T
  lse = lambda a, ax: np.log(np.exp(a).sum(ax))
  i2t = lse(logits, 1) - np.diag(logits)
  t2i = lse(logits, 0) - np.diag(logits)
  np.testing.assert_allclose(losses.softmax_per_example_losses(x, y, t), (i2t + t2i) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.contrastive_loss("softmax", x, y, t, 0.0),
                             np.mean((i2t + t2i) / 2), rtol=1e-5)
  assert jnp.isfinite(losses.contrastive_loss("sigmoid", x, y, t, -10.0))
