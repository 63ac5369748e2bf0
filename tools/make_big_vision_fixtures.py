#!/usr/bin/env python3
"""Writes the big_vision fixtures of tests/test_siglip*.py from big_vision's own model code
(run by hand, not in CI: big_vision is not a dependency).

big_vision is not a package: export its source from a clone and run this with the
project's environment (jax, flax, tensorflow, ml_collections) plus `einops`, which
big_vision/utils.py imports:

    git -C BIG_VISION_CLONE archive HEAD big_vision | tar -x -C /tmp/bv
    .venv/bin/python -m pip install --target /tmp/bvdeps einops
    PYTHONPATH=/tmp/bv:/tmp/bvdeps .venv/bin/python tools/make_big_vision_fixtures.py

It builds big_vision's SigLIP two-tower model (`proj.image_text.two_towers`, a `vit`
image tower with pool_type="map" and no image head, `proj.image_text.text_transformer`
text tower; out_dim = (None, d), temperature_init 10, bias_init -10, as in big_vision's
SigLIP demo colab) at a tiny size and writes, under tests/fixtures/:

  big_vision_siglip_keys.json  every parameter name ("img/Transformer/...") and shape that
                               `model.init` creates, with scan=False and with scan=True
  big_vision_tiny.npz          that model's parameters (scan layout, as the So400m
                               checkpoints; every leaf perturbed, so none is at its init)
                               under "params/" as big_vision's npz checkpoints name them,
                               plus inputs ("input/image", "input/text") and what big_vision's
                               own forward pass returns ("output/zimg", "output/ztxt",
                               "output/t", "output/b")
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_vision import utils as bv_utils
from big_vision.models.proj.image_text import two_towers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Text width differs from the image width (the text head maps 12 → 16), depth and heads
# differ per tower, mlp_dim is not 4 × width: every shape tells the reader one thing.
IMAGE_SIZE, TEXT_LEN, VOCAB, EMBED = 16, 8, 50, 16


def model_config(scan: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.image_model = "vit"
  c.text_model = "proj.image_text.text_transformer"
  c.image = dict(patch_size=(4, 4), width=16, depth=2, mlp_dim=24, num_heads=2,
                 pool_type="map", head_zeroinit=False, scan=scan)
  c.text = dict(width=12, depth=3, mlp_dim=20, num_heads=3, vocab_size=VOCAB, scan=scan)
  c.out_dim = (None, EMBED)
  c.temperature_init = 10.0
  c.bias_init = -10.0
  return c


def init(scan: bool):
  model = two_towers.Model(**model_config(scan))
  params = model.init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
                      jnp.zeros((1, TEXT_LEN), jnp.int32))["params"]
  return model, params


def names_and_shapes(params) -> dict:
  return {name: list(np.shape(v)) for name, v in bv_utils.tree_flatten_with_names(params)[0]}


def dumps(obj, indent="") -> str:
  """JSON with one parameter (name: shape) per line."""
  if isinstance(obj, dict) and obj and not all(isinstance(v, list) for v in obj.values()):
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in sorted(obj.items())]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"
  if isinstance(obj, dict):
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(obj.items())]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"
  return json.dumps(obj, sort_keys=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)

  _, loop = init(scan=False)
  model, scan = init(scan=True)
  keys = {
      "created_by": "tools/make_big_vision_fixtures.py",
      "model_config": json.loads(model_config(scan=False).to_json()),
      "image_size": IMAGE_SIZE, "text_len": TEXT_LEN,
      "loop": names_and_shapes(loop), "scan": names_and_shapes(scan),
  }
  with open(os.path.join(args.out, "big_vision_siglip_keys.json"), "w") as f:
    f.write(dumps(keys) + "\n")

  # Perturb every leaf (LayerNorm scales start at 1, biases at ~0): a loader that drops
  # or misplaces one then changes the outputs.
  leaves, treedef = jax.tree.flatten(scan)
  rngs = jax.random.split(jax.random.key(1), len(leaves))
  scan = treedef.unflatten([
      np.asarray(x + 0.2 * jax.random.normal(r, x.shape) * (1.0 + jnp.std(x)), np.float32)
      for x, r in zip(leaves, rngs)])
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  text = rng.integers(0, VOCAB, (4, TEXT_LEN)).astype(np.int32)
  text[:, -2:] = 1  # sticky-EOS padding: the last position is </s> (id 1 in c4_en)
  zimg, ztxt, out = model.apply({"params": scan}, image, text)
  arrays = {f"params/{k}": np.asarray(v) for k, v in bv_utils.tree_flatten_with_names(scan)[0]}
  arrays.update({"input/image": image, "input/text": text, "output/zimg": np.asarray(zimg),
                 "output/ztxt": np.asarray(ztxt), "output/t": np.asarray(out["t"]),
                 "output/b": np.asarray(out["b"])})
  np.savez_compressed(os.path.join(args.out, "big_vision_tiny.npz"), **arrays)
  print(f"{len(keys['loop'])} loop names, {len(keys['scan'])} scan names; t {out['t']}, "
        f"b {out['b']}")


if __name__ == "__main__":
  main()
