"""interop/hf.py and interop/big_vision.py: bit-exact round trips, and a one-line
InteropError naming the file for each damaged or foreign input."""

import json
import os
import shutil
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jest_pod.data.tokenizer import Tokenizer
from jest_pod.interop import InteropError, big_vision, formats, guard, hf
from jest_pod.models import siglip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _assert_trees_equal(a, b):
  """Same names, same dtypes, same bits."""
  fa, fb = big_vision.flatten(a), big_vision.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


def _write(folder, name, dtype):
  model_config, params, pre = hf.read_folder(os.path.join(FIXTURES, name))
  hf.write_folder(folder, model_config, params,
                  tokenizer_proto=Tokenizer(pre["spiece_path"]).model_proto,
                  image_size=pre["image_size"], max_text_len=pre["max_text_len"],
                  do_lower_case=pre["do_lower_case"], dtype=dtype)
  return model_config, params, pre


@pytest.mark.parametrize("name,dtype", [("siglip_tiny", "float32"),
                                        ("siglip_tiny_wide", "bfloat16")])
def test_hf_round_trip_is_bit_exact(tmp_path, name, dtype):
  """HF → jest_pod → HF: every tensor of the written file has the original's name, dtype
  and bits; reading it back gives the same parameters and preprocessing."""
  out = str(tmp_path / "out")
  model_config, params, pre = _write(out, name, dtype)
  original = safetensors.numpy.load_file(os.path.join(FIXTURES, name, hf.WEIGHTS))
  written = safetensors.numpy.load_file(os.path.join(out, hf.WEIGHTS))
  assert sorted(written) == sorted(original)
  for k, t in original.items():
    assert written[k].dtype == t.dtype and written[k].shape == t.shape, k
    assert written[k].tobytes() == t.tobytes(), k
  model_config2, params2, pre2 = hf.read_folder(out)
  assert model_config2 == model_config
  assert {k: v for k, v in pre2.items() if k != "spiece_path"} == {
      k: v for k, v in pre.items() if k != "spiece_path"}
  _assert_trees_equal(params2, params)
  with open(os.path.join(out, hf.SPIECE), "rb") as f, open(pre["spiece_path"], "rb") as g:
    assert f.read() == g.read()
  with open(os.path.join(out, hf.CONFIG)) as f:
    config = json.load(f)
  assert config["model_type"] == "siglip" and config["architectures"] == ["SiglipModel"]
  assert sorted(os.listdir(out)) == sorted([
      hf.CONFIG, hf.WEIGHTS, hf.SPIECE, hf.TOKENIZER_CONFIG, hf.SPECIAL_TOKENS, hf.PREPROCESSOR])


def test_bf16_tensors_widen_exactly():
  params = hf.read_folder(os.path.join(FIXTURES, "siglip_tiny_wide"))[1]
  raw = safetensors.numpy.load_file(os.path.join(FIXTURES, "siglip_tiny_wide", hf.WEIGHTS))
  assert raw["logit_scale"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(params["t"], raw["logit_scale"].astype(np.float32))
  assert params["t"].dtype == np.float32


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_round_trip_is_bit_exact(tmp_path, scan):
  """jest_pod → big_vision npz (loop or scan layout) → jest_pod."""
  model_config, params, _ = hf.read_folder(os.path.join(FIXTURES, "siglip_tiny"))
  path = str(tmp_path / "bv.npz")
  big_vision.write_npz(path, siglip.to_scan(params) if scan else params, scan=scan)
  with np.load(path) as npz:
    names = list(npz.keys())
  assert all(n.startswith("params/") for n in names)
  assert any("/encoderblock/" in n for n in names) == scan
  for layout in (False, True):
    model_config2, params2 = big_vision.read_npz(path, scan=layout)
    assert model_config2 == {**model_config, "scan_layers": layout}
    _assert_trees_equal(siglip.to_loop(params2), params)


def test_big_vision_published_variants(tmp_path):
  """Keys without "params/", t/b of shape [], bfloat16 stored as void, and no txt/head
  (so400m-256-i18n: an identity head, as transformers' converter makes)."""
  _, params, _ = hf.read_folder(os.path.join(FIXTURES, "siglip_tiny"))
  flat = big_vision.flatten(params)
  del flat["txt/head/kernel"], flat["txt/head/bias"]
  flat["t"], flat["b"] = flat["t"].reshape(()), flat["b"].reshape(())
  flat["img/MAPHead_0/probe"] = (flat["img/MAPHead_0/probe"].astype(ml_dtypes.bfloat16)
                                 .view(np.dtype("V2")))
  path = str(tmp_path / "published.npz")
  np.savez(path, **flat)
  model_config, loaded = big_vision.read_npz(path)
  w = model_config["text"]["width"]
  assert model_config["embed_dim"] == w
  np.testing.assert_array_equal(loaded["txt"]["head"]["kernel"], np.eye(w))
  np.testing.assert_array_equal(loaded["txt"]["head"]["bias"], np.zeros(w))
  assert loaded["t"].shape == loaded["b"].shape == (1,)
  np.testing.assert_array_equal(
      loaded["img"]["MAPHead_0"]["probe"],
      params["img"]["MAPHead_0"]["probe"].astype(ml_dtypes.bfloat16).astype(np.float32))


# ------------------------------------------------------------------------ refusals


@pytest.fixture
def folder(tmp_path):
  """A writable copy of the F32 fixture."""
  dst = str(tmp_path / "siglip")
  shutil.copytree(os.path.join(FIXTURES, "siglip_tiny"), dst)
  return dst


def _edit_config(folder, fn):
  path = os.path.join(folder, hf.CONFIG)
  with open(path) as f:
    config = json.load(f)
  fn(config)
  with open(path, "w") as f:
    json.dump(config, f)


def _refused(folder, *names) -> str:
  with pytest.raises(InteropError) as e:
    hf.read_folder(folder)
  msg = str(e.value)
  assert "\n" not in msg
  for n in names:
    assert n in msg, msg
  return msg


@pytest.mark.parametrize("keep", [0, 100, 4000])
def test_truncated_safetensors(folder, keep):
  path = os.path.join(folder, hf.WEIGHTS)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:keep] if keep < 4000 else data[:len(data) - keep])
  assert "re-download" in _refused(folder, path)


def test_garbled_safetensors(folder):
  path = os.path.join(folder, hf.WEIGHTS)
  with open(path, "r+b") as f:
    f.write(b"\xff" * 64)
  _refused(folder, path)


@pytest.mark.parametrize("model_type", ["clip", "siglip2"])
def test_another_model_type(folder, model_type):
  _edit_config(folder, lambda c: c.update(model_type=model_type))
  _refused(folder, os.path.join(folder, hf.CONFIG), repr(model_type), "supported: 'siglip'")


def test_vision_without_head(folder):
  _edit_config(folder, lambda c: c["vision_config"].update(vision_use_head=False))
  _refused(folder, os.path.join(folder, hf.CONFIG), "vision_use_head")


def test_missing_spiece(folder):
  os.remove(os.path.join(folder, hf.SPIECE))
  _refused(folder, os.path.join(folder, hf.SPIECE), "sentencepiece")


@pytest.mark.parametrize("field,value,tensor", [
    ("intermediate_size", 96, "vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("patch_size", 4, "vision_model.embeddings.patch_embedding.weight"),
])
def test_tensor_shape_does_not_match_config(folder, field, value, tensor):
  _edit_config(folder, lambda c: c["vision_config"].update({field: value}))
  _refused(folder, os.path.join(folder, hf.WEIGHTS), tensor, "config.json")


def test_missing_and_extra_tensors(folder):
  _edit_config(folder, lambda c: c["text_config"].update(num_hidden_layers=3))
  _refused(folder, os.path.join(folder, hf.WEIGHTS), "text_model.encoder.layers.2")
  _edit_config(folder, lambda c: c["text_config"].update(num_hidden_layers=1))
  _refused(folder, os.path.join(folder, hf.WEIGHTS), "text_model.encoder.layers.1")


def test_config_defaults_as_older_transformers_save_them(folder):
  """transformers 4.x leaves out fields equal to the defaults; those are filled in."""
  def strip(c):
    c["vision_config"].pop("hidden_act")
    c["vision_config"].pop("vision_use_head")
    c["text_config"].pop("projection_size")
  _edit_config(folder, strip)
  assert hf.read_config(folder)[0]["embed_dim"] == 32


def test_big_vision_refusals(tmp_path):
  not_zip = str(tmp_path / "junk.npz")
  with open(not_zip, "wb") as f:
    f.write(b"PK\x03\x04 not really a zip")
  with pytest.raises(InteropError, match="junk.npz: cannot read it"):
    big_vision.read_npz(not_zip)
  image_only = str(tmp_path / "img.npz")
  np.savez(image_only, **{"params/img/embedding/kernel": np.zeros((4, 4, 3, 8))})
  with pytest.raises(InteropError, match="img.npz: no img/ and txt/"):
    big_vision.read_npz(image_only)
  _, params, _ = hf.read_folder(os.path.join(FIXTURES, "siglip_tiny"))
  flat = big_vision.flatten(params)
  flat["txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias"] = np.zeros(7, np.float32)
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, **{f"params/{k}": v for k, v in flat.items()})
  with pytest.raises(InteropError, match=r"bad.npz: txt/Encoder_0/encoderblock_1/MlpBlock_0/"
                                         r"Dense_1/bias has shape \[7\]"):
    big_vision.read_npz(bad)


def test_write_refuses_a_flexivit_model(tmp_path):
  with pytest.raises(InteropError, match="only model.family='siglip'"):
    hf.write_folder(str(tmp_path), {"family": "flexivit"}, {}, tokenizer_proto=b"",
                    image_size=32, max_text_len=16)


def test_device_arrays_write(tmp_path):
  """Parameters straight from a jitted computation (jax arrays) write too."""
  model_config, params, pre = hf.read_folder(os.path.join(FIXTURES, "siglip_tiny"))
  on_device = jax.tree.map(jax.numpy.asarray, siglip.to_scan(params))
  big_vision.write_npz(str(tmp_path / "a.npz"), on_device)
  _assert_trees_equal(big_vision.read_npz(str(tmp_path / "a.npz"))[1], params)
  hf.write_folder(str(tmp_path / "hf"), model_config, on_device,
                  tokenizer_proto=Tokenizer(pre["spiece_path"]).model_proto,
                  image_size=pre["image_size"], max_text_len=pre["max_text_len"])
  _assert_trees_equal(hf.read_folder(str(tmp_path / "hf"))[1], params)


# ------------------------------------------------- sizes checked before allocation (issue 32)


@pytest.mark.parametrize("tower,key,value", [
    ("text_config", "num_hidden_layers", 10**9), ("vision_config", "num_hidden_layers", 10**9),
    ("vision_config", "hidden_size", 10**9), ("text_config", "hidden_size", 10**9),
    ("vision_config", "intermediate_size", 10**9), ("text_config", "intermediate_size", 10**9),
    ("text_config", "vocab_size", 10**9), ("text_config", "max_position_embeddings", 10**9),
    ("vision_config", "image_size", 8 * 10**6), ("vision_config", "patch_size", 10**6),
    ("vision_config", "num_attention_heads", 10**9), ("text_config", "hidden_size", -5),
    ("text_config", "num_hidden_layers", "12"),
])
def test_absurd_config_sizes_are_refused_before_allocation(folder, tower, key, value):
  """Before: num_hidden_layers 10**9 grew to 8 GB and hung (one name-map entry per
  claimed layer); hidden_size 10**9 passed read_config, so init_from aborted inside XLA.
  Now every size is checked against the safetensors header's shapes first."""
  _edit_config(folder, lambda c: c[tower].update({key: value}))
  cfg = os.path.join(folder, hf.CONFIG)
  for read in (hf.read_config, hf.read_folder, formats.load_config, formats.load):
    with pytest.raises(InteropError) as e:
      read(folder)
    msg = str(e.value)
    assert "\n" not in msg and cfg in msg and f"{tower}.{key}" in msg, msg


def test_init_from_an_absurd_hidden_size_is_one_line(folder):
  from train_helpers import tiny_config
  _edit_config(folder, lambda c: c["vision_config"].update(hidden_size=10**9))
  config = tiny_config("unused", **{"model.init_from": folder})
  with pytest.raises(InteropError, match=r"config.json: vision_config.hidden_size 1000000000, "
                                         r"but .*model.safetensors's tensor"):
    formats.apply_init_from(config)


def test_a_parameter_count_no_host_holds_is_refused(folder, tmp_path, monkeypatch):
  npz = str(tmp_path / "bv.npz")
  big_vision.write_npz(npz, hf.read_folder(os.path.join(FIXTURES, "siglip_tiny"))[1])
  monkeypatch.setattr(guard, "MAX_PARAMS", 1000)
  with pytest.raises(InteropError, match=r"model.safetensors: its tensors add up to .* "
                                         "parameters"):
    hf.read_config(folder)
  with pytest.raises(InteropError, match=r"bv.npz: its arrays add up to .* parameters"):
    big_vision.read_npz(npz)


def _npz_with(path, name, shape, data_bytes, compression):
  """The fixture's params as an npz, with member `name` replaced by a streamed one: an
  .npy header claiming `shape` float32, then `data_bytes` zeros (never in memory)."""
  flat = big_vision.flatten(hf.read_folder(os.path.join(FIXTURES, "siglip_tiny"))[1])
  flat.pop(name)
  np.savez(path, **{f"params/{k}": v for k, v in flat.items()})
  with zipfile.ZipFile(path, "a", compression) as z:
    with z.open(f"params/{name}.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
      chunk = bytes(2**20)
      for start in range(0, data_bytes, len(chunk)):
        f.write(chunk[:min(len(chunk), data_bytes - start)])
  return path


def test_an_npz_member_that_inflates_like_a_zip_bomb_is_refused(tmp_path):
  """Before: the member was inflated and read (an 11 MB file grew to 8 GB). 200 MB of
  zeros deflate to ~200 kB; a consistent header (vocab 1.6M) does not make it weights."""
  n = 200 * 2**20
  path = _npz_with(str(tmp_path / "bomb.npz"), "txt/Embed_0/embedding", (n // 128, 32), n,
                   zipfile.ZIP_DEFLATED)
  assert os.path.getsize(path) < 2**20
  for read in (big_vision.read_npz, formats.load):
    with pytest.raises(InteropError, match=r"bomb.npz: member params/txt/Embed_0/embedding "
                                           r"inflates \d+ stored bytes to 2097153\d\d"):
      read(path)


def test_an_npy_header_claiming_4_tib_is_refused(tmp_path):
  """Before: a MemoryError that named no file."""
  path = _npz_with(str(tmp_path / "huge.npz"), "img/embedding/kernel", (2**40,), 64,
                   zipfile.ZIP_STORED)
  with pytest.raises(InteropError, match=r"huge.npz: member params/img/embedding/kernel: its "
                                         r"\.npy header claims shape \[1099511627776\] "
                                         r"float32 \(4398046511104 bytes\), the member holds 64"):
    big_vision.read_npz(path)


def test_a_safetensors_header_claiming_more_than_the_file_is_refused(folder):
  path = os.path.join(folder, hf.WEIGHTS)
  header = json.dumps({"logit_scale": {"dtype": "F32", "shape": [2**40],
                                       "data_offsets": [0, 2**42]}}).encode()
  with open(path, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header + bytes(16))
  msg = _refused(folder, path, "'logit_scale'", "re-download")
  assert "16 data bytes" in msg


def test_an_index_cannot_point_outside_the_folder(folder):
  os.remove(os.path.join(folder, hf.WEIGHTS))
  with open(os.path.join(folder, hf.WEIGHTS_INDEX), "w") as f:
    json.dump({"weight_map": {"logit_scale": "../../etc/passwd"}}, f)
  _refused(folder, hf.WEIGHTS_INDEX, "'../../etc/passwd'", "not a file of this folder")


def test_a_garbage_caption_length_is_one_line(folder):
  """Before: int("many") raised a bare ValueError."""
  path = os.path.join(folder, hf.TOKENIZER_CONFIG)
  with open(path) as f:
    tok = json.load(f)
  tok["model_max_length"] = "many"
  with open(path, "w") as f:
    json.dump(tok, f)
  _refused(folder, path, "model_max_length", "'many'")
