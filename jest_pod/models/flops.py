"""Analytic forward FLOPs of the towers: multiply-adds × 2 of the matmuls (patch
embedding, attention projections and scores, MLPs, heads); layer norms and softmaxes are
ignored (< 1% at these widths). `jest_pod.train.flops` builds a step's count from these.

Both families (`model.family`): "flexivit" pools by mean and projects the image to
embed_dim; "siglip" pools the image by a MAP head (one probe token cross-attending to
the T tokens, then an MLP on that token) and has no image projection. Both text towers
end in a width → embed_dim head.
"""

from __future__ import annotations


def _encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)  # qkv, out, mlp
  per_layer += 2 * 2 * tokens * tokens * width                         # q·k and attn·v
  return depth * per_layer


def _map_head_flops(tokens: int, width: int, mlp_dim: int) -> float:
  """SigLIP's MAP head: q and out projections and the MLP on 1 token, k and v on T."""
  proj = 2 * width * width * 2 + 2 * tokens * width * width * 2  # q, out | k, v
  attn = 2 * 2 * tokens * width                                  # q·k and attn·v, 1 query
  return proj + attn + 2 * 2 * width * mlp_dim


def image_forward_flops(model_config, image_size: int, patch_size: int) -> float:
  """Forward FLOPs of one image at `patch_size` (Flexi-ViT: tokens = (S/p)²)."""
  im = model_config.image
  tokens = (image_size // patch_size) ** 2
  patch = 2 * tokens * patch_size * patch_size * 3 * im["width"]
  encoder = _encoder_flops(tokens, im["width"], im["depth"], im["mlp_dim"])
  if model_config.get("family", "flexivit") == "siglip":
    return patch + encoder + _map_head_flops(tokens, im["width"], im["mlp_dim"])
  head = 2 * im["width"] * model_config.embed_dim
  return patch + encoder + head


def text_forward_flops(model_config, text_len: int) -> float:
  """Forward FLOPs of one caption of `text_len` tokens (either family: encoder + head)."""
  tx = model_config.text
  head = 2 * tx["width"] * model_config.embed_dim
  return _encoder_flops(text_len, tx["width"], tx["depth"], tx["mlp_dim"]) + head


def example_forward_flops(model_config, image_size, patch_size, text_len) -> float:
  return (image_forward_flops(model_config, image_size, patch_size)
          + text_forward_flops(model_config, text_len))
