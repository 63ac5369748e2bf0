"""Public SigLIP checkpoints through the whole workflow: the learner's start
(config.model.init_from), JEST's reference (forward pass and cache), `jest-pod eval`,
`jest-pod embed` and `jest-pod export`, on the transformers-made fixture
(tests/fixtures/siglip_tiny: 32², patch 8, captions of 16, SigLIP's tokenizer)."""

import os
import shutil

import jax
import numpy as np
import pytest

from jest_pod import checkpoint
from jest_pod.data.toy import build_toy
from jest_pod.evaluators import cli as eval_cli
from jest_pod.interop import embed_cli, export, formats
from jest_pod.jest import reference as reference_lib
from jest_pod.train import main as train_main
from train_helpers import losses, read_metrics, tiny_config

HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "siglip_tiny")
N = 128


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return build_toy(str(tmp_path_factory.mktemp("toy32")), N, noise=0.2, image_size=32)


@pytest.fixture(scope="module")
def hf_cache(toy, tmp_path_factory):
  """The fixture's embeddings of the toy set, at its own preprocessing (32², siglip text)."""
  return reference_lib.build_cache(toy, HF, output=str(tmp_path_factory.mktemp("c")) + "/c",
                                   batch_size=48)


def _from_hf(toy, **kw):
  """A tiny run whose learner starts from the fixture (towers, tokenizer, sizes)."""
  return tiny_config(toy, **{"model.init_from": HF, **kw})


def test_init_from_takes_the_weights_architecture_and_preprocessing(toy, tmp_path):
  config = _from_hf(toy, steps=2, **{"optax.lr": 0.0})
  train_main.train(config, str(tmp_path / "lr0"))
  saved, params, _ = checkpoint.load_params(str(tmp_path / "lr0"))
  assert saved.model.family == "siglip" and saved.input.text_style == "siglip"
  assert saved.input.image_size == saved.model.image_size == 32
  assert saved.input.max_text_len == 16 and saved.input.tokenizer.endswith("spiece.model")
  assert tuple(saved.flexi.train_patch_sizes) == (8,)  # (p,) of the old base patch → (8,)
  want = formats.load(HF).params
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


def test_init_from_trains_with_falling_loss_and_resumes(toy, tmp_path):
  wd = str(tmp_path / "ft")
  train_main.train(_from_hf(toy, steps=6, ckpt_every=6), wd)
  first = losses(wd)
  assert np.mean(first[-2:]) < first[0]  # learns from the public start
  # A resume reads the checkpoint, not the public weights again, and continues.
  train_main.train(_from_hf(toy, steps=9, ckpt_every=6), wd)
  m = read_metrics(wd)
  assert sorted(m) == list(range(1, 10))
  assert [m[s]["train/loss"] for s in range(1, 7)] == first


def test_jest_with_an_hf_reference_forward_and_cached_agree(toy, hf_cache, tmp_path):
  """The fixture as θ*: its forward pass (learner shares its preprocessing) and its cache
  select alike; the cache records the HF kind and its preprocessing."""
  cache = hf_cache
  meta = reference_lib.open_cache(cache, data_dir=toy, reference=HF).store.meta
  assert meta["fingerprint"]["reference"]["kind"] == "hf"
  assert meta["fingerprint"]["preprocessing"]["text_style"] == "siglip"
  runs = {}
  for name, where in (("forward", "off"), ("cached", cache)):
    config = _from_hf(toy, steps=3, method="joint", reference=HF,
                      **{"selection.filter_ratio": 0.5, "selection.reference_cache": where})
    train_main.train(config, str(tmp_path / name))
    runs[name] = read_metrics(str(tmp_path / name))
  for step in (1, 2, 3):
    for key in ("train/loss", "select/learnability_selected"):
      np.testing.assert_allclose(runs["cached"][step][key], runs["forward"][step][key],
                                 rtol=2e-2, atol=2e-2)


def test_a_reference_with_its_own_tokenizer_and_size_works_through_the_cache(toy, hf_cache,
                                                                           tmp_path, capsys):
  """The demo-style learner (FlexiViT, 16², its own tokenizer, plain text) with the HF
  fixture (32², SigLIP's tokenizer) as θ*: the forward path is refused naming the cache
  command; through the cache JEST trains and scores with finite learnability. The FlexiViT
  learner it trains is then refused by export, in one line naming the family."""
  config = tiny_config(toy, steps=2, method="joint", reference=HF,
                       **{"selection.reference_cache": "off"})
  with pytest.raises(ValueError, match=r"image_size: 32 \(reference\) vs 16 \(learner\).*"
                                       r"jest-pod data cache-reference --data"):
    train_main.train(config, str(tmp_path / "refused"))
  config.selection.reference_cache = hf_cache
  wd = str(tmp_path / "jest")
  train_main.train(config, wd)
  m = read_metrics(wd)
  assert np.isfinite(m[2]["select/learnability_selected"])
  assert m[2]["select/learnability_selected"] > m[2]["select/learnability_super_batch"]
  assert export.main([wd, "--format", "hf", "--output", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "'flexivit' family" in err
  assert "config.model.family=siglip" in err and not os.path.exists(tmp_path / "out")


def test_eval_embed_and_export_take_any_checkpoint_kind(toy, hf_cache, tmp_path, capsys):
  assert eval_cli.main([HF, "--data", toy, "--output", str(tmp_path / "r.json")]) == 0
  out = capsys.readouterr().out
  assert "hf checkpoint" in out and "z/0shot/" in out
  # embed: every record, L2-normalised, in record order, with the records' ids.
  emb = str(tmp_path / "e.npz")
  assert embed_cli.main([HF, "--data", toy, "--output", emb, "--batch-size", "48"]) == 0
  got = np.load(emb)
  assert got["image"].shape == got["text"].shape == (N, 32)
  np.testing.assert_allclose(np.linalg.norm(got["image"], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(got["index"], np.arange(N))
  assert list(got["id"]) == embed_cli.record_ids(toy) and len(set(got["id"])) == N
  # The same rows as the model on the pipeline's batches (through the reference cache's
  # independent path, bf16-stored).
  cache = reference_lib.open_cache(hf_cache, data_dir=toy)
  image, text = cache.store.lookup(np.arange(N))
  np.testing.assert_allclose(got["image"], image, atol=1e-2)
  np.testing.assert_allclose(got["text"], text, atol=1e-2)
  # export: HF → big_vision → HF, parameters bit-exact. (Issue 32: a big_vision export is
  # a folder holding model.npz and its tokenizer, no longer spiece.model beside an npz.)
  npz, back = str(tmp_path / "m"), str(tmp_path / "hf_again")
  assert export.main([HF, "--format", "big_vision", "--output", npz]) == 0
  assert os.path.exists(os.path.join(npz, "spiece.model"))  # its tokenizer inside it
  assert not os.path.exists(str(tmp_path / "spiece.model"))  # nothing beside it
  assert export.main([npz, "--format", "hf", "--output", back]) == 0
  a, b = formats.load(HF), formats.load(back)
  assert formats.params_digest(a.params) == formats.params_digest(b.params)
  assert a.preprocessing.fingerprint() == b.preprocessing.fingerprint()
  assert export.main([npz, "--format", "hf", "--output", back]) == 1  # exists: refused
  assert "--overwrite" in capsys.readouterr().err


def test_bad_public_checkpoints_are_one_line_errors(tmp_path, capsys, toy):
  bad = str(tmp_path / "bad")
  shutil.copytree(HF, bad)
  with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
    f.truncate(1000)
  for main in (lambda: eval_cli.main([bad, "--data", toy]),
               lambda: embed_cli.main([bad, "--data", toy, "--output", str(tmp_path / "e")]),
               lambda: export.main([bad, "--format", "big_vision",
                                    "--output", str(tmp_path / "x")])):
    assert main() == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors" in err, err
  assert reference_lib.main(["--data", toy, "--reference", bad]) == 1
  assert "model.safetensors" in capsys.readouterr().err
