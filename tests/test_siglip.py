"""The SigLIP family (models/siglip.py) against transformers' and big_vision's own outputs.

Fixtures (tests/fixtures/, made by hand; see each tool's docstring for the command):
  siglip_tiny/, siglip_tiny_wide/ + *_expected.npz   tools/make_siglip_fixtures.py:
      tiny random SiglipModels saved by transformers, with its ids, pixels and outputs
  big_vision_siglip_keys.json, big_vision_tiny.npz  tools/make_big_vision_fixtures.py:
      big_vision's parameter names (loop and scan) and its own forward pass
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jest_pod import config as config_lib
from jest_pod.config import variants
from jest_pod.data.tokenizer import Tokenizer
from jest_pod.interop import big_vision, hf
from jest_pod.models import build_model, flops, siglip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_FIXTURES = ("siglip_tiny", "siglip_tiny_wide")  # F32 equal widths | BF16, text 32 → 48


def _jit_apply(model, **kw):
  """model.apply as one compiled call (eager flax dispatches op by op: far slower on CPU)."""
  return jax.jit(lambda p, image, text: model.apply({"params": p}, image, text, **kw))


def _names_and_shapes(params) -> dict:
  return {k: list(np.shape(v)) for k, v in big_vision.flatten(params).items()}


@pytest.fixture(scope="module", params=HF_FIXTURES)
def hf_case(request):
  name = request.param
  model_config, params, pre = hf.read_folder(os.path.join(FIXTURES, name))
  expected = dict(np.load(os.path.join(FIXTURES, f"{name}_expected.npz")))
  model = build_model(ml_collections.ConfigDict(model_config))
  apply = _jit_apply(model)
  return name, model_config, params, pre, expected, apply


def _check_outputs(outputs, expected):
  zimg, ztxt, out = (jax.tree.map(np.asarray, o) for o in outputs)
  np.testing.assert_allclose(zimg, expected["image_embeds"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(ztxt, expected["text_embeds"], atol=1e-4, rtol=0)
  assert out["t"].shape == out["b"].shape == ()
  np.testing.assert_allclose(out["t"], np.exp(expected["logit_scale"][0]), rtol=1e-6)
  np.testing.assert_allclose(out["b"], expected["logit_bias"][0], rtol=1e-6)
  logits = zimg @ ztxt.T * out["t"] + out["b"]
  np.testing.assert_allclose(logits, expected["logits_per_image"], atol=1e-4, rtol=0)


def test_raw_captions_and_pixels_give_transformers_outputs(hf_case):
  """Raw captions through our Tokenizer, raw uint8 images scaled to [-1, 1] (the pipeline's
  mapping) → the embeddings, t, b and logits transformers computed from the same raw data."""
  _, _, params, pre, expected, apply = hf_case
  tok = Tokenizer(pre["spiece_path"], text_style=pre["text_style"])
  ids = tok.encode_batch([str(c) for c in expected["captions"]], pre["max_text_len"])
  np.testing.assert_array_equal(ids, expected["input_ids"])
  images = expected["images"].astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(images, expected["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)
  _check_outputs(apply(params, images, ids), expected)


def test_transformers_inputs_give_transformers_outputs(hf_case):
  _, _, params, _, expected, apply = hf_case
  _check_outputs(apply(params, expected["pixel_values"].transpose(0, 2, 3, 1),
                       expected["input_ids"]), expected)


def test_preprocessing_read_from_the_processor_files(hf_case):
  name, model_config, _, pre, expected, _ = hf_case
  assert pre["image_size"] == model_config["image_size"] == expected["images"].shape[1]
  assert pre["max_text_len"] == expected["input_ids"].shape[1]
  assert pre["text_style"] == {"siglip_tiny": "siglip", "siglip_tiny_wide": "siglip_cased"}[name]
  assert pre["resample"] == "bicubic"


def test_scan_layout_gives_the_same_outputs(hf_case):
  _, model_config, params, _, expected, _ = hf_case
  model = build_model(ml_collections.ConfigDict({**model_config, "scan_layers": True}))
  scanned = siglip.to_scan(params)
  assert siglip.is_scan(scanned) and not siglip.is_scan(params)
  outputs = _jit_apply(model)(scanned, expected["pixel_values"].transpose(0, 2, 3, 1),
                             expected["input_ids"])
  _check_outputs(outputs, expected)
  jax.tree.map(np.testing.assert_array_equal, siglip.to_loop(scanned), params)


def test_patch_embedding_is_a_stride_p_conv_and_resizes_to_2p(hf_case):
  """At the base patch the embedding is the stride-p conv HF and big_vision run; at 2p
  (Flexi-JEST's scoring patch) the PI-resized kernel runs on a quarter of the tokens."""
  _, model_config, params, _, expected, apply = hf_case
  p = model_config["image"]["patch_size"]
  images = expected["pixel_values"].transpose(0, 2, 3, 1)
  emb = params["img"]["embedding"]
  patches = siglip._Patches(p, model_config["image"]["width"])  # pylint: disable=protected-access
  mine = patches.apply({"params": emb}, images, p)
  conv = jax.lax.conv_general_dilated(images, emb["kernel"], (p, p), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + emb["bias"]
  np.testing.assert_allclose(mine, conv.reshape(mine.shape), atol=1e-5)

  model = build_model(ml_collections.ConfigDict(model_config))
  z2p, _, _ = jax.jit(lambda q, i: model.apply({"params": q}, i, None, patch_size=2 * p))(
      params, images)
  assert z2p.shape == expected["image_embeds"].shape and np.all(np.isfinite(z2p))
  np.testing.assert_allclose(np.linalg.norm(z2p, axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(z2p, expected["image_embeds"], atol=1e-3)


def test_normalisation_matches_division_by_the_norm():
  scale = np.repeat([0.01, 100.0], 8)[:, None]  # ‖z‖ ≈ 0.08 and 800
  z = (np.random.default_rng(0).normal(size=(16, 64)) * scale).astype(np.float32)
  np.testing.assert_allclose(siglip.l2_normalize(z), z / np.linalg.norm(z, axis=-1,
                                                                        keepdims=True), rtol=1e-6)


# ------------------------------------------------------------------------ big_vision


def _bv_keys():
  with open(os.path.join(FIXTURES, "big_vision_siglip_keys.json")) as f:
    return json.load(f)


def _config_from_big_vision(keys, scan):
  """Our config.model for the model big_vision's fixture tool built."""
  mc = keys["model_config"]
  image, text = mc["image"], mc["text"]
  return ml_collections.ConfigDict(dict(
      family="siglip", image_size=keys["image_size"], embed_dim=mc["out_dim"][1],
      scan_layers=scan,
      image=dict(patch_size=image["patch_size"][0], width=image["width"], depth=image["depth"],
                 num_heads=image["num_heads"], mlp_dim=image["mlp_dim"]),
      text=dict(vocab_size=text["vocab_size"], max_len=keys["text_len"], width=text["width"],
                depth=text["depth"], num_heads=text["num_heads"], mlp_dim=text["mlp_dim"])))


@pytest.mark.parametrize("layout", ["loop", "scan"])
def test_parameter_names_are_big_vision_s(layout):
  """The tree `model.init` makes has exactly the names and shapes big_vision's two_towers
  makes (recorded from big_vision itself), in both layouts."""
  keys = _bv_keys()
  cfg = _config_from_big_vision(keys, scan=layout == "scan")
  s = keys["image_size"]
  shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, s, s, 3)),
                          jnp.zeros((1, keys["text_len"]), jnp.int32))["params"]
  assert _names_and_shapes(shapes) == keys[layout]


def test_big_vision_checkpoint_gives_big_vision_outputs():
  """A big_vision npz (scan layout, params/ keys) read, its architecture inferred from
  shapes, run in both layouts: big_vision's own zimg, ztxt, t, b."""
  path = os.path.join(FIXTURES, "big_vision_tiny.npz")
  data = np.load(path)
  for scan in (False, True):
    model_config, params = big_vision.read_npz(path, scan=scan)
    assert model_config["scan_layers"] is scan and siglip.is_scan(params) is scan
    assert model_config == {**big_vision.infer_config(params), "scan_layers": scan}
    model = build_model(ml_collections.ConfigDict(model_config))
    zimg, ztxt, out = _jit_apply(model)(params, data["input/image"], data["input/text"])
    np.testing.assert_allclose(zimg, data["output/zimg"], atol=1e-5)
    np.testing.assert_allclose(ztxt, data["output/ztxt"], atol=1e-5)
    np.testing.assert_allclose(out["t"], data["output/t"][0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], data["output/b"][0], rtol=1e-6)
  assert model_config == _config_from_big_vision(_bv_keys(), scan=True).to_dict()


# ------------------------------------------------------------------------ config, FLOPs


def test_build_model_family_checks():
  c = config_lib.base_config()
  assert c.model.family == "flexivit"
  variants.set_model(c, "mu/4", family="siglip")
  assert c.model.family == "siglip" and c.model.embed_dim == c.model.image["width"]
  assert isinstance(build_model(c.model), siglip.SiglipTwoTower)
  c.model.embed_dim = 32
  with pytest.raises(ValueError, match="embed_dim .32. must equal model.image.width .64."):
    build_model(c.model)
  c.model.family = "clip"
  with pytest.raises(ValueError, match="model.family='clip': choose one of flexivit, siglip"):
    build_model(c.model)
  variants.set_model(c, "So400m/14")
  assert c.model.family == "clip"  # family=None leaves it
  assert dict(c.model.image) == dict(patch_size=14, width=1152, depth=27, num_heads=16,
                                    mlp_dim=4304)


def test_siglip_init_values_and_bf16_compute():
  c = config_lib.base_config()
  variants.set_model(c, "mu/4", family="siglip", depth=1, width=16, mlp_dim=24)
  c.model.dtype, c.model.image_size, c.model.text = "bfloat16", 8, dict(c.model.text, max_len=4)
  model = build_model(c.model)
  image = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  text = jnp.ones((2, 4), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), image, text)["params"]
  assert params["t"].shape == params["b"].shape == (1,)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32  # float32 weights, bf16 compute
  zimg, ztxt, out = _jit_apply(model)(params, image, text)
  assert zimg.dtype == ztxt.dtype == jnp.float32 and zimg.shape == ztxt.shape == (2, 16)
  np.testing.assert_allclose(out["t"], 10.0, rtol=1e-6)
  np.testing.assert_allclose(out["b"], -10.0)


def test_remat_and_scan_train_like_the_loop():
  """remat + scan_layers: the same loss and gradients as the plain loop (params converted)."""
  c = config_lib.base_config()
  variants.set_model(c, "mu/4", family="siglip", width=16, mlp_dim=24, num_heads=2)
  c.model.image_size, c.model.text = 8, dict(c.model.text, max_len=4)
  image = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  text = jnp.array([[5, 6, 1, 1], [7, 1, 1, 1]], jnp.int32)
  loop = build_model(c.model)
  params = jax.jit(loop.init)(jax.random.key(0), image, text)["params"]
  c.model.update(remat=True, scan_layers=True)
  scan = build_model(c.model)

  def loss(model, p):
    zimg, ztxt, out = model.apply({"params": p}, image, text)
    return jnp.sum(jax.nn.log_sigmoid(zimg @ ztxt.T * out["t"] + out["b"]))

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(loop, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(scan, p)))(siglip.to_scan(params))
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), siglip.to_loop(g2), g1)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g1))


def test_flops_of_the_siglip_family_by_hand():
  """Image 16², patch 4 (T = 16), width 32, depth 1, MLP 64, no projection; text 12 tokens,
  width 24, depth 1, MLP 48, head 24 → 32. 2 FLOPs per multiply-add."""
  mc = ml_collections.ConfigDict(dict(
      family="siglip", image_size=16, embed_dim=32,
      image=dict(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64),
      text=dict(vocab_size=64, max_len=12, width=24, depth=1, num_heads=2, mlp_dim=48)))
  encoder = (2 * 16 * 32 * 96 + 2 * 16 * 32 * 32 + 2 * 2 * 16 * 16 * 32
             + 2 * 2 * 16 * 32 * 64)                       # qkv, out, q·k + attn·v, MLP
  map_head = (2 * 32 * 32 + 2 * 2 * 16 * 32 * 32           # q (1 token) | k, v (16 tokens)
              + 2 * 16 * 32 + 2 * 16 * 32                  # q·k, attn·v (1 query)
              + 2 * 32 * 32 + 2 * 2 * 32 * 64)             # out, MLP (1 token)
  image = 2 * 16 * 4 * 4 * 3 * 32 + encoder + map_head     # + patch embedding, no head
  assert flops.image_forward_flops(mc, 16, 4) == image == 423_936
  text = (2 * 12 * 24 * 72 + 2 * 12 * 24 * 24 + 2 * 2 * 12 * 12 * 24
          + 2 * 2 * 12 * 24 * 48 + 2 * 24 * 32)
  assert flops.text_forward_flops(mc, 12) == text
  assert flops.example_forward_flops(mc, 16, 4, 12) == image + text
  flexi = ml_collections.ConfigDict({**mc.to_dict(), "family": "flexivit"})
  assert flops.image_forward_flops(flexi, 16, 4) == image - map_head + 2 * 32 * 32
