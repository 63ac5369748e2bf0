"""Transformer encoder shared by both towers (pre-LayerNorm, as in ViT/SigLIP)."""

import flax.linen as nn
import jax.numpy as jnp


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attn")(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [b, n, width]; mask: optional [b, n] bool (True = real token)."""
    attn_mask = None if mask is None else nn.make_attention_mask(mask, mask)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"block{i}")(
          x, attn_mask)
    return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)
