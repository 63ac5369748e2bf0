"""Text tower: a transformer encoder over sentencepiece ids, masked mean-pooled."""

import flax.linen as nn
import jax.numpy as jnp

from jest_pod.models.layers import Tower


class TextTransformer(Tower):
  """Token ids [b, L] (0 = pad) → [b, out_dim]."""
  vocab_size: int
  max_len: int

  @nn.compact
  def __call__(self, text):
    if text.shape[1] > self.max_len:
      raise ValueError(f"text length {text.shape[1]} exceeds model.text.max_len={self.max_len}")
    mask = text != 0
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="embedding")(text)
    posemb = self.param("posemb", nn.initializers.normal(0.02), (1, self.max_len, self.width))
    x = x + posemb[:, :text.shape[1]].astype(self.dtype)
    x = self.encoder()(x, mask)
    m = mask[..., None]
    # where, not x * m: padded rows may hold anything (cuDNN with 0 real keys), and an
    # all-padding caption (empty text) pools to zeros rather than NaN.
    x = jnp.sum(jnp.where(m, x, 0.0), axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="head")(x).astype(jnp.float32)
