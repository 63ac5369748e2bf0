"""FlexiViT's patch-size resize (Beyer et al. 2023), as data: the PI-resize matrix of the
patch-embedding kernel (models/vit.py applies it) and its adjoint on images, the score
images of two-phase input (data/score_images.py). A leaf module: the data stack and the
models both read it.
"""

import functools

import jax
import numpy as np


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
  # [..., s², c] → [..., c, s²] @ M → [..., c, p0²]: one BLAS matmul (einsum here is 100× slower).
  z = np.matmul(blocks.reshape(b, h // s, w // s, s * s, c).swapaxes(-1, -2), m).swapaxes(-1, -2)
  z = z.reshape(b, h // s, w // s, p0, p0, c).transpose(0, 1, 3, 2, 4, 5)
  return z.reshape(b, h // s * p0, w // s * p0, c).astype(np.float32)
