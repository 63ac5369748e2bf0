"""Transformer encoder shared by both towers (pre-LayerNorm, as in ViT/SigLIP).

Mixed precision: `dtype` is the compute dtype of every layer; parameters stay float32
(flax's default param_dtype), so the optimizer updates float32 master weights.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = ("auto", "xla", "cudnn")


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


def _implementation(attention, dtype):
  """jax.nn.dot_product_attention's `implementation` for config `attention`.

  "auto": cuDNN flash attention on GPU in 16-bit (its supported dtypes), else XLA;
  jax's own None means XLA today, so the choice is made here.
  """
  if attention not in ATTENTION:
    raise ValueError(f"model.attention={attention!r}: choose one of {', '.join(ATTENTION)}")
  if attention != "auto":
    return attention
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


class Attention(nn.Module):
  """Multi-head attention through `jax.nn.dot_product_attention` (fused kernels).

  The parameter tree is flax MultiHeadDotProductAttention's (query/key/value/out
  DenseGeneral, same shapes), so checkpoints of either load in the other. `kernel_init`
  defaults to DenseGeneral's (big_vision's SigLIP towers use xavier_uniform).
  """
  num_heads: int
  dtype: str = "float32"
  attention: str = "auto"
  kernel_init: Callable = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x, lengths=None, kv=None):
    """x: [b, n, width] queries; kv: optional [b, m, width] keys and values (cross-attention,
    e.g. a pooling probe), default x (self-attention); lengths: optional int32 [b], keys
    ≥ lengths are padding."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    kv = x if kv is None else kv
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, width // self.num_heads),
                              axis=-1, dtype=self.dtype, kernel_init=self.kernel_init)
    q = dense(name="query")(x)
    k, v = (dense(name=n)(kv) for n in ("key", "value"))
    impl = _implementation(self.attention, self.dtype)
    try:
      y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       implementation=impl)
    except (NotImplementedError, ValueError, RuntimeError):
      if self.attention != "auto":
        raise
      # cuDNN rejects some shapes (e.g. head_dim) at trace time: same math in XLA.
      y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       implementation="xla")
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=self.kernel_init,
                           name="out")(y)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, lengths=None):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = Attention(self.num_heads, dtype=self.dtype, attention=self.attention, name="attn")(
        y, lengths)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class _ScanBlock(EncoderBlock):
  """EncoderBlock in nn.scan's (carry, out) form."""

  def __call__(self, x, lengths=None):
    return super().__call__(x, lengths), None


class Tower(nn.Module):
  """The encoder fields both towers share (the text and image towers add their own).

  `dtype` and the fields after it are keyword-only (so a tower may add fields without
  defaults)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  _: dataclasses.KW_ONLY
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  def encoder(self) -> "Encoder":
    return Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                   attention=self.attention, remat=self.remat, scan_layers=self.scan_layers,
                   name="encoder")


class Encoder(nn.Module):
  """`depth` EncoderBlocks and a final LayerNorm.

  remat: recompute each block's activations in the backward pass (memory for FLOPs).
  scan_layers: one nn.scan over the depth, params stacked on a leading [depth] axis
  under "blocks" (one compiled block: faster compiles for deep towers); convert
  checkpoints with `stack_blocks` / `unstack_blocks`.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [b, n, width]; mask: optional [b, n] bool (True = real token, right-padded)."""
    # Right-padded: the padding mask is the number of real tokens, which cuDNN takes natively.
    lengths = None if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
              attention=self.attention)
    block = _ScanBlock if self.scan_layers else EncoderBlock
    if self.remat:
      block = nn.remat(block)
    if self.scan_layers:
      scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=self.depth)
      x, _ = scan(**kw, name="blocks")(x, lengths)
    else:
      for i in range(self.depth):
        x = block(**kw, name=f"block{i}")(x, lengths)
    # Pooling downstream sums over tokens: in float32.
    return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)


def stack_blocks(encoder_params, depth):
  """Encoder params with block0..block{depth−1} → scanned layout ("blocks", [depth, ...])."""
  out = {k: v for k, v in encoder_params.items() if not k.startswith("block")}
  blocks = [encoder_params[f"block{i}"] for i in range(depth)]
  out["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  return out


def unstack_blocks(encoder_params, depth):
  """Inverse of `stack_blocks`."""
  out = {k: v for k, v in encoder_params.items() if k != "blocks"}
  for i in range(depth):
    out[f"block{i}"] = jax.tree.map(lambda a, i=i: a[i], encoder_params["blocks"])
  return out
