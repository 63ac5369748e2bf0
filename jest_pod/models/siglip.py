"""SigLIP's two towers as the public checkpoints have them (big_vision `two_towers` with a
`vit` image tower, pool_type "map", and `proj.image_text.text_transformer`; Hugging Face
`SiglipModel` is the same network).

The parameter tree is big_vision's, name for name (its npz keys without "params/"):

  img/embedding/{kernel [p,p,3,w], bias [w]}    patches, PI-resized to any patch size
  img/pos_embedding [1, g*g, w]                 learned, on the base grid g = S/p
  img/Transformer/encoderblock_{i}/...          pre-LN blocks (below), then encoder_norm
  img/MAPHead_0/{probe [1,1,w], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
  txt/Embed_0/embedding [V, wt], txt/pos_embedding [1, L, wt]
  txt/Encoder_0/encoderblock_{i}/..., txt/Encoder_0/encoder_norm
  txt/head/{kernel [wt, d], bias [d]}
  t [1] (log temperature), b [1]
  block: LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value}/{kernel [w,h,w/h],
         bias [h,w/h]}, .../out/{kernel [h,w/h,w], bias [w]}, LayerNorm_1,
         MlpBlock_0/Dense_{0,1}/{kernel, bias}

With `scan_layers` the blocks are big_vision's scan layout: one `encoderblock` whose leaves
are stacked on a leading [depth] axis (`to_scan` / `to_loop` convert a tree).

How it differs from this project's FlexiViT family (models/two_tower.TwoTower):
- the image embedding is the MAP head's output at the image width: no projection, so
  embed_dim must equal the image width;
- the text tower attends to every position (no padding mask: SigLIP's captions are padded
  with </s>, and it attends to those too) and pools the LAST position (sticky EOS);
- t and b are [1]-shaped parameters as in big_vision; apply returns scalars.
GELU is the tanh approximation (flax's default, HF's gelu_pytorch_tanh); LayerNorm eps 1e-6.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jest_pod.models.layers import Attention
from jest_pod.models.vit import pi_resize_kernel, resize_posemb

_XAVIER = nn.initializers.xavier_uniform()


class MlpBlock(nn.Module):
  """big_vision's MlpBlock: Dense_0 → GELU (tanh) → Dense_1, back to the input width."""
  mlp_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, kernel_init=_XAVIER, bias_init=nn.initializers.normal(1e-6))
    y = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0", **kw)(x))
    return nn.Dense(x.shape[-1], name="Dense_1", **kw)(y)


class EncoderBlock(nn.Module):
  """Pre-LN block with big_vision's names (Encoder1DBlock)."""
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    x = x + Attention(self.num_heads, dtype=self.dtype, attention=self.attention,
                      kernel_init=_XAVIER, name="MultiHeadDotProductAttention_0")(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_1")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)


class _ScanBlock(EncoderBlock):
  """EncoderBlock in nn.scan's (carry, out) form."""

  def __call__(self, x):
    return super().__call__(x), None


class Encoder(nn.Module):
  """`depth` blocks (encoderblock_{i}, or one scanned `encoderblock`) and `encoder_norm`."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x):
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
              attention=self.attention)
    block = _ScanBlock if self.scan_layers else EncoderBlock
    if self.remat:
      block = nn.remat(block)
    if self.scan_layers:
      scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.depth)
      x, _ = scan(**kw, name="encoderblock")(x)
    else:
      for i in range(self.depth):
        x = block(**kw, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends to the tokens, then
  LayerNorm + MLP with a residual; [b, n, w] → [b, w]."""
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, _, w = x.shape
    probe = self.param("probe", _XAVIER, (1, 1, w))
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, w))
    x = Attention(self.num_heads, dtype=self.dtype, attention=self.attention,
                  kernel_init=_XAVIER, name="MultiHeadDotProductAttention_0")(probe, kv=x)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    return x[:, 0]


class _Patches(nn.Module):
  """The `embedding` conv's kernel [p0,p0,3,w] and bias, applied at any patch size p: the
  kernel is PI-resized (vit.pi_resize_kernel) and applied as a stride-p conv."""
  patch_size: int
  width: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, image, p):
    b, h, w, c = image.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.patch_size, self.patch_size, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    k = pi_resize_kernel(kernel, p)  # float32 (a pinv product), then the compute dtype
    patches = image.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w // p), p, p, c)
    x = jnp.einsum("bnijc,ijcd->bnd", patches.astype(self.dtype), k.astype(self.dtype))
    return x + bias.astype(self.dtype)


class SiglipViT(nn.Module):
  """Images [b, S, S, 3] in [-1, 1] → [b, width] (MAP-pooled, no projection)."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, image, patch_size=None):
    p = patch_size or self.patch_size
    _, h, w, _ = image.shape
    if h != w:
      raise ValueError(f"square images only, got {h}x{w}")
    if h % p:
      raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = _Patches(self.patch_size, self.width, dtype=self.dtype, name="embedding")(image, p)
    grid0 = self.image_size // self.patch_size
    posemb = self.param("pos_embedding", nn.initializers.normal(1 / np.sqrt(self.width)),
                        (1, grid0 * grid0, self.width))
    # Another grid (patch ≠ p0 or another image size): bilinear, as FlexiViT.
    x = x + resize_posemb(posemb, h // p).astype(self.dtype)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
              attention=self.attention)
    x = Encoder(self.depth, remat=self.remat, scan_layers=self.scan_layers, **kw,
                name="Transformer")(x)
    return MAPHead(**kw, name="MAPHead_0")(x).astype(jnp.float32)


class SiglipText(nn.Module):
  """Token ids [b, L] (sticky EOS, padded with </s>) → [b, out_dim]: the last position."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, text):
    if text.shape[1] > self.max_len:
      raise ValueError(f"text length {text.shape[1]} exceeds model.text.max_len={self.max_len}")
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="Embed_0")(text)
    posemb = self.param("pos_embedding", nn.initializers.normal(1 / np.sqrt(self.width)),
                        (1, self.max_len, self.width))
    x = x + posemb[:, :text.shape[1]].astype(self.dtype)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                attention=self.attention, remat=self.remat, scan_layers=self.scan_layers,
                name="Encoder_0")(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="head")(x[:, -1]).astype(jnp.float32)


def l2_normalize(z):
  """z / (‖z‖ + 1e-8) in float32, as big_vision (HF divides by ‖z‖: same to ~1e-8/‖z‖)."""
  z = z.astype(jnp.float32)
  return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


class SiglipTwoTower(nn.Module):
  """(image [b,S,S,3] | None, text int32 [b,L] | None) → (zimg [b,d], ztxt [b,d], {"t", "b"}),
  the contract of models.two_tower.TwoTower; d = image width (no image projection).

  `t` is stored as log temperature (init log 10) and `b` (init −10), both [1]; the
  returned out["t"] = exp(t) and out["b"] are scalars. `patch_size` PI-resizes the patch
  kernel (None = the base patch).
  """
  image: dict
  text: dict
  embed_dim: int
  image_size: int
  temperature_init: float = 10.0
  bias_init: float = -10.0
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  def setup(self):
    if self.embed_dim != self.image["width"]:
      raise ValueError(f"model.family='siglip': embed_dim ({self.embed_dim}) must equal the "
                       f"image width ({self.image['width']}); SigLIP has no image projection")
    kw = dict(dtype=self.dtype, attention=self.attention, remat=self.remat,
              scan_layers=self.scan_layers)
    self.img = SiglipViT(image_size=self.image_size, **kw, **self.image)
    self.txt = SiglipText(out_dim=self.embed_dim, **kw, **self.text)
    t0, b0 = float(np.log(self.temperature_init)), float(self.bias_init)
    self.t = self.param("t", lambda _, s: jnp.full(s, t0, jnp.float32), (1,))
    self.b = self.param("b", lambda _, s: jnp.full(s, b0, jnp.float32), (1,))

  def __call__(self, image, text, patch_size=None):
    zimg = None if image is None else l2_normalize(self.img(image, patch_size))
    ztxt = None if text is None else l2_normalize(self.txt(text))
    return zimg, ztxt, {"t": jnp.exp(self.t[0]), "b": self.b[0]}


# -------------------------------------------------------------------- layouts of the tree

_ENCODERS = (("img", "Transformer"), ("txt", "Encoder_0"))
_BLOCK = re.compile(r"encoderblock_(\d+)$")


def _stack(leaves):
  xp = np if all(isinstance(a, np.ndarray) for a in leaves) else jnp
  return xp.stack(leaves)


def _map_encoders(params, fn):
  """A shallow copy of `params` with fn applied to each tower's encoder dict."""
  out = dict(params)
  for tower, enc in _ENCODERS:
    if tower in params and enc in params[tower]:
      out[tower] = dict(params[tower])
      out[tower][enc] = fn(params[tower][enc])
  return out


def _encoder_to_scan(enc):
  if "encoderblock" in enc:
    return enc
  idx = sorted(int(m.group(1)) for k in enc if (m := _BLOCK.match(k)))
  if idx != list(range(len(idx))) or not idx:
    raise ValueError(f"encoder blocks {idx} are not encoderblock_0..encoderblock_N")
  out = {k: v for k, v in enc.items() if not _BLOCK.match(k)}
  out["encoderblock"] = jax.tree.map(lambda *a: _stack(a), *[enc[f"encoderblock_{i}"] for i in idx])
  return out


def _encoder_to_loop(enc):
  if "encoderblock" not in enc:
    return enc
  out = {k: v for k, v in enc.items() if k != "encoderblock"}
  depth = len(jax.tree.leaves(enc["encoderblock"])[0])
  for i in range(depth):
    out[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], enc["encoderblock"])
  return out


def to_scan(params):
  """SiglipTwoTower params (or big_vision's) in loop layout → scan layout; idempotent."""
  return _map_encoders(params, _encoder_to_scan)


def to_loop(params):
  """Scan layout → loop layout (encoderblock_{i}); idempotent."""
  return _map_encoders(params, _encoder_to_loop)


def is_scan(params) -> bool:
  return any(enc in params.get(t, {}) and "encoderblock" in params[t][enc]
             for t, enc in _ENCODERS)
