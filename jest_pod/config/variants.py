"""Tower sizes by name, as the ViT papers name them: "B/16" is ViT-Base at patch 16.

Adding a size is one entry in SIZES. `set_model(config, "B/16")` sizes both towers (the
text tower takes the image tower's width, depth, heads and MLP, as SigLIP's do) and the
shared embedding. Flexi-JEST's patch defaults follow the patch on their own
(`config.score_patch_size`, `config.train_patch_sizes`).
"""

from __future__ import annotations

# name: (width, depth, num_heads, mlp_dim)
SIZES = {
    "mu": (64, 2, 2, 128),  # the CPU demo's towers
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "So400m": (1152, 27, 16, 4304),  # SigLIP's shape-optimised ViT (So400m/14)
}


def parse(variant: str) -> tuple[tuple[int, int, int, int], int]:
  """"B/16" → (SIZES["B"], 16), with an error that lists the sizes."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f"model variant {variant!r}: expected SIZE/PATCH with SIZE one of "
                     f"{', '.join(SIZES)} and PATCH a positive integer, e.g. 'B/16'")
  return SIZES[size], int(patch)


def set_model(config, variant: str, family: str | None = None, **overrides) -> None:
  """Sizes config.model's towers by name; `overrides` (e.g. depth=1) change both towers.

  `family` ("flexivit" | "siglip", models.build_model) sets config.model.family; None
  leaves it as it is. Both towers take the size and embed_dim = width, which is what the
  "siglip" family requires (no image projection).
  """
  (width, depth, heads, mlp), patch = parse(variant)
  tower = {**dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp), **overrides}
  config.model.image = dict(patch_size=patch, **tower)
  config.model.text = {**dict(config.model.get("text") or {}), **tower}
  config.model.embed_dim = tower["width"]
  if family is not None:
    config.model.family = family
