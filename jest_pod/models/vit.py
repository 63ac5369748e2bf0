"""FlexiViT image tower: one set of weights, any patch size.

The patch-embedding kernel is stored at a base patch size p0 and PI-resized to the
requested patch size p (FlexiViT, Beyer et al. 2023): with B the [p², p0²] bilinear
resize matrix, the kernel w' = pinv(Bᵀ) w keeps ⟨x, w⟩ = ⟨resize(x), w'⟩ for every
patch x, so a model trained at p0 gives the same tokens on an upsampled image at p.
Position embeddings are stored on the base grid and bilinearly resized to the new grid.
Flexi-JEST scores at patch 2p (a quarter of the tokens) and trains at p and 2p.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jest_pod.flexi import pi_resize_matrix
from jest_pod.models.layers import Tower


def pi_resize_kernel(kernel, new_patch: int):
  """Resize a [p0, p0, c, width] patch-embedding kernel to [p, p, c, width]."""
  old = kernel.shape[0]
  if new_patch == old:
    return kernel
  m = jnp.asarray(pi_resize_matrix(old, new_patch))
  flat = kernel.reshape(old * old, -1)
  return (m @ flat).reshape(new_patch, new_patch, *kernel.shape[2:])


def resize_posemb(posemb, grid: int):
  """[1, g0*g0, width] position embeddings → [1, grid*grid, width], bilinear."""
  g0 = int(round(posemb.shape[1] ** 0.5))
  if g0 == grid:
    return posemb
  pe = posemb.reshape(1, g0, g0, -1)
  pe = jax.image.resize(pe, (1, grid, grid, pe.shape[-1]), "bilinear")
  return pe.reshape(1, grid * grid, -1)


class FlexiViT(Tower):
  """ViT over images [b, H, W, 3] → [b, out_dim] (global-average-pooled, projected)."""
  image_size: int
  patch_size: int          # the base patch size p0 at which the kernel is stored

  @nn.compact
  def __call__(self, image, patch_size=None):
    p = patch_size or self.patch_size
    b, h, w, c = image.shape
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    kernel = self.param("patch_kernel", nn.initializers.lecun_normal(),
                        (self.patch_size, self.patch_size, c, self.width))
    bias = self.param("patch_bias", nn.initializers.zeros, (self.width,))
    grid0 = self.image_size // self.patch_size
    posemb = self.param("posemb", nn.initializers.normal(0.02), (1, grid0 * grid0, self.width))

    k = pi_resize_kernel(kernel, p)
    patches = image.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w // p), p, p, c)
    # The PI-resize runs in float32 (a pinv product); the patch projection in self.dtype.
    x = jnp.einsum("bnijc,ijcd->bnd", patches.astype(self.dtype), k.astype(self.dtype))
    assert h == w, "square images only"
    x = x + bias.astype(self.dtype) + resize_posemb(posemb, h // p).astype(self.dtype)
    x = self.encoder()(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="head")(x).astype(jnp.float32)
