"""Two-tower image-text model with SigLIP's learnable temperature and bias; `build_model`
picks the family (this project's FlexiViT towers, or SigLIP's as published)."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jest_pod.models import layers
from jest_pod.models import siglip as siglip_lib
from jest_pod.models.siglip import SiglipTwoTower
from jest_pod.models.text import TextTransformer
from jest_pod.models.vit import FlexiViT


def _l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)  # losses and selection work in float32 whatever the compute dtype
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """(image [b,H,W,3] | None, text [b,L] | None) → (zimg, ztxt, {"t", "b"}).

  Embeddings are L2-normalised; t = exp(t') with t' initialised to log 10, b to −10
  (SigLIP). `patch_size` selects the FlexiViT patch size (None = base).
  """
  image: ml_collections.ConfigDict
  text: ml_collections.ConfigDict
  embed_dim: int
  image_size: int
  temperature_init: float = 10.0
  bias_init: float = -10.0
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False
  scan_layers: bool = False

  def setup(self):
    kw = dict(out_dim=self.embed_dim, dtype=self.dtype, attention=self.attention,
              remat=self.remat, scan_layers=self.scan_layers)
    self.img = FlexiViT(image_size=self.image_size, **kw, **self.image)
    self.txt = TextTransformer(**kw, **self.text)
    self.t_prime = self.param("t_prime", nn.initializers.constant(jnp.log(self.temperature_init)),
                              ())
    self.b = self.param("b", nn.initializers.constant(self.bias_init), ())

  def __call__(self, image, text, patch_size=None):
    zimg = None if image is None else _l2_normalize(self.img(image, patch_size))
    ztxt = None if text is None else _l2_normalize(self.txt(text))
    return zimg, ztxt, {"t": jnp.exp(self.t_prime), "b": self.b}


FAMILIES = ("flexivit", "siglip")


def build_model(model_config, image_size=None) -> nn.Module:
  """The two-tower model of `config.model` (image: {patch_size, width, depth, num_heads,
  mlp_dim}, text: {vocab_size, max_len, width, depth, num_heads, mlp_dim}, embed_dim,
  image_size).

  family: "flexivit" (default: TwoTower, mean-pooled towers with projections) or "siglip"
  (models.siglip.SiglipTwoTower: the public SigLIP checkpoints' network and parameter
  names; embed_dim must equal the image width). Optional fields: dtype (compute dtype;
  params stay float32), attention ("auto" | "xla" | "cudnn"), remat, scan_layers (see
  layers.Encoder).
  """
  mc = model_config
  family = mc.get("family", "flexivit")
  kw = dict(image=dict(mc.image), text=dict(mc.text), embed_dim=mc.embed_dim,
            image_size=image_size or mc.image_size, dtype=mc.get("dtype", "float32"),
            attention=mc.get("attention", "auto"), remat=mc.get("remat", False),
            scan_layers=mc.get("scan_layers", False))
  if family == "flexivit":
    return TwoTower(**kw)
  if family == "siglip":
    if mc.embed_dim != mc.image["width"]:
      raise ValueError(f"model.family='siglip' has no image projection: model.embed_dim "
                       f"({mc.embed_dim}) must equal model.image.width ({mc.image['width']})")
    return SiglipTwoTower(**kw)
  raise ValueError(f"model.family={family!r}: choose one of {', '.join(FAMILIES)}")


def convert_layout(params, model_config, *, scan: bool):
  """A model's parameters in the loop (block0.., encoderblock_0..) or scanned (stacked on
  [depth]) layout of its family, whichever they are in now."""
  if model_config.get("family", "flexivit") == "siglip":
    return siglip_lib.to_scan(params) if scan else siglip_lib.to_loop(params)
  convert = layers.stack_blocks if scan else layers.unstack_blocks
  return {**params, **{tower: {**params[tower], "encoder": convert(
      params[tower]["encoder"], model_config[name]["depth"])}
                       for tower, name in (("img", "image"), ("txt", "text"))}}
