"""FlexiViT image tower: one set of weights, any patch size.

The patch-embedding kernel is stored at a base patch size p0 and PI-resized to the
requested patch size p (FlexiViT, Beyer et al. 2023): with B the [p², p0²] bilinear
resize matrix, the kernel w' = pinv(Bᵀ) w keeps ⟨x, w⟩ = ⟨resize(x), w'⟩ for every
patch x, so a model trained at p0 gives the same tokens on an upsampled image at p.
Position embeddings are stored on the base grid and bilinearly resized to the new grid.
Flexi-JEST scores at patch 2p (a quarter of the tokens) and trains at p and 2p.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jest_pod.models.layers import Tower


@functools.lru_cache(maxsize=None)
def pi_resize_matrix(old: int, new: int) -> np.ndarray:
  """[new², old²] matrix M such that w_new = M @ w_old (flattened p×p kernels).

  M = pinv(Bᵀ), B the bilinear resize of an old×old patch to new×new.
  """
  basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
  # A constant of the model: computed eagerly even when first asked for under jit.
  with jax.ensure_compile_time_eval():
    resize = jax.vmap(lambda e: jax.image.resize(e, (new, new), "bilinear", antialias=False))
    b = np.asarray(resize(basis)).reshape(old * old, new * new).T  # [new², old²]
  return np.linalg.pinv(b.T).astype(np.float32)


def pi_resize_kernel(kernel, new_patch: int):
  """Resize a [p0, p0, c, width] patch-embedding kernel to [p, p, c, width]."""
  old = kernel.shape[0]
  if new_patch == old:
    return kernel
  m = jnp.asarray(pi_resize_matrix(old, new_patch))
  flat = kernel.reshape(old * old, -1)
  return (m @ flat).reshape(new_patch, new_patch, *kernel.shape[2:])


def score_image(images: np.ndarray, base_patch: int, score_patch: int) -> np.ndarray:
  """The image whose forward pass at the base patch equals the PI-resized pass at
  `score_patch` on `images` (float32 [b, S, S, c] → [b, S·p0/s, S·p0/s, c]).

  A token at patch s is ⟨y, M ω⟩ = ⟨Mᵀ y, ω⟩ (M = pi_resize_matrix(p0, s)), so each s×s
  block y becomes the p0×p0 block Mᵀ y — B⁺y, the least-squares downsample — and the
  grid, hence the position embeddings, stay the same. Flexi-JEST's scoring pass then
  needs (p0/s)² of the pixels: what the host stores and reads for every scored example.
  """
  b, h, w, c = images.shape
  s, p0 = score_patch, base_patch
  if h % s or w % s:
    raise ValueError(f"image size {h}x{w} is not divisible by the score patch {s}")
  m = pi_resize_matrix(p0, s)  # [s², p0²]
  blocks = images.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
  z = np.einsum("bgxkc,kn->bgxnc", blocks.reshape(b, h // s, w // s, s * s, c), m)
  z = z.reshape(b, h // s, w // s, p0, p0, c).transpose(0, 1, 3, 2, 4, 5)
  return z.reshape(b, h // s * p0, w // s * p0, c).astype(np.float32)


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
