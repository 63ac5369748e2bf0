"""Two-phase input (data/two_phase.py, score_images.py, token_rows.py): phase 1 scores the
super-batch from stored score images and token rows, phase 2 decodes only the selected
records. The scoring pass equals Flexi scoring of the full images; phase 1 reads the same
records as a full read; the train batch is the full decode's bit for bit; a run (and its
resume) equals the full-decode run; damaged, stale and missing stores are refused or
named in one line. 2 processes = 1: tests/test_multihost.py runs JEST two-phase."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from jest_pod import config as config_lib
from jest_pod.data import pipeline, score_images, token_rows, two_phase, verify
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.score_images import Key
from jest_pod.models import build_model
from jest_pod.flexi import score_image
from jest_pod.train import main as train_main
from helpers_data import write_dataset
from train_helpers import ROOT, losses, read_metrics, tiny_config

KEY = Key(16, 4, 4)  # tiny_config: no Flexi, so the score images are uint8 pixels (exact)
TEXT_LEN = 12


def _model(family):
  c = config_lib.load(os.path.join(ROOT, "configs", "siglip.py"), f"runlocal,family={family}")
  c.model.image.update(width=32, depth=1, mlp_dim=64)
  c.model.text.update(width=32, depth=1, mlp_dim=64)
  if family == "siglip":
    c.model.embed_dim = 32
  return c.model


@pytest.mark.parametrize("family", ["flexivit", "siglip"])
def test_score_image_at_the_base_patch_is_flexi_scoring_at_2p(family):
  mc = _model(family)
  p = mc.image["patch_size"]
  model = build_model(mc)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  text = np.ones((4, 16), np.int32)
  params = model.init(jax.random.key(0), images, text)
  full, _, _ = model.apply(params, images, None, patch_size=2 * p)
  small = score_image(images, p, 2 * p)
  assert small.shape == (4, 16, 16, 3)
  exact, _, _ = model.apply(params, small, None, patch_size=None)
  np.testing.assert_allclose(exact, full, atol=2e-5)
  # As stored (float16): the tolerance the study measured (docs/two_phase_input.md).
  stored = score_images.to_float(score_images.to_stored(images, Key(32, p, 2 * p)))
  half, _, _ = model.apply(params, stored, None, patch_size=None)
  cos = np.sum(half * full, -1) / np.linalg.norm(half, axis=-1) / np.linalg.norm(full, axis=-1)
  assert cos.min() > 0.9999, cos
  # An ordinary thumbnail is another input: what the stored form avoids.
  thumb = images.reshape(4, 16, 2, 16, 2, 3).mean((2, 4))
  other, _, _ = model.apply(params, thumb, None, patch_size=None)
  assert np.abs(other - full).max() > 100 * np.abs(half - full).max()


def test_the_shipped_keys_are_what_the_shipped_jest_config_resolves_to():
  for arg in ("runlocal", ""):
    c = config_lib.load(os.path.join(ROOT, "configs", "jest.py"), arg)
    spec = config_lib.resolve(c)
    assert Key(spec.image_size, c.model.image["patch_size"], spec.score_patch) == (
        score_images.SHIPPED)
    assert spec.text_len == token_rows.SHIPPED_TEXT_LEN


@pytest.fixture(scope="module")
def pool(toy_reference, tmp_path_factory):
  """A copy of the shared toy set with its reference cache (the stores are added here,
  not to the shared fixture), its stores for KEY, and the reference."""
  toy, ref, _ = toy_reference
  data = str(tmp_path_factory.mktemp("two_phase") / "toy")
  shutil.copytree(toy, data)
  wrote = score_images.ensure(data, KEY, TEXT_LEN)
  assert [w.split(" → ")[0] for w in wrote] == ["score images", "token rows"]
  assert score_images.ensure(data, KEY, TEXT_LEN) == []  # current: kept
  return data, ref


def _input(data):
  c = tiny_config(data)
  return c.input


def test_phase1_rows_and_phase2_images_are_the_full_reads_bit_for_bit(pool):
  data, _ = pool
  c = _input(data)
  full = pipeline.make_train_iterator(c, global_batch_size=64, seed=3)
  tok = tokenizer_lib.resolve(c)
  phase1 = two_phase.Phase1(
      token_rows.open_store(token_rows.path_for(data, tok, TEXT_LEN), data_dir=data,
                            tokenizer=tok, text_len=TEXT_LEN, rebuild="x"),
      score_images.open_store(score_images.path_for(data, KEY), data_dir=data, key=KEY))
  light = pipeline.make_train_iterator(c, global_batch_size=64, seed=3, phase1=phase1.bad)
  reader = two_phase.SelectedReader(data, 16)
  for _ in range(5):  # past an epoch boundary (256 records, 64 a batch)
    a, b = next(full), next(light)
    assert sorted(b) == ["index", "skipped"]
    np.testing.assert_array_equal(a["index"], b["index"])
    rows = phase1.host_inputs(b)
    for k in ("text", "label", "source"):
      np.testing.assert_array_equal(rows[k], a[k], err_msg=k)
    np.testing.assert_array_equal(rows["score_image"], a["image"])  # uint8 form: exact
    pick = np.array([5, 0, 63, 17])
    np.testing.assert_array_equal(reader.read(a["index"][pick]), a["image"][pick])


def test_phase1_skips_exactly_the_records_a_full_read_skips(tmp_path):
  data = write_dataset(str(tmp_path / "d"), 40, bad_proto=(3,), bad_image=(7, 20))
  written = score_images.ensure(data, Key(12, 4, 4), 8)
  assert len(written) == 2
  meta = score_images.open_store(score_images.path_for(data, Key(12, 4, 4)), data_dir=data,
                                 key=Key(12, 4, 4))
  assert meta.bad == {3, 7, 20}
  c = tiny_config(data)
  c.input.image_size, c.input.max_text_len = 12, 8
  full = pipeline.make_train_iterator(c.input, global_batch_size=8, seed=0)
  light = pipeline.make_train_iterator(c.input, global_batch_size=8, seed=0, phase1=meta.bad)
  for _ in range(10):
    a, b = next(full), next(light)
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["skipped"], b["skipped"])


def _run(data, ref, workdir, **overrides):
  config = tiny_config(data, steps=4, method="joint", reference=ref, log_selected_ids=True,
                       **{"selection.filter_ratio": 0.5, "ckpt_every": 2, **overrides})
  return config, train_main.train(config, workdir)


def test_a_two_phase_run_and_its_resume_equal_the_full_decode(pool, tmp_path, caplog):
  data, ref = pool
  caplog.set_level(logging.INFO, logger="jest_pod")
  _, last = _run(data, ref, str(tmp_path / "two"))
  assert "two-phase input: the super-batch of 64 comes from the token rows" in caplog.text
  assert last["time/input_phase2_s"] > 0 and last["data/phase2_replaced"] == 0
  assert last["time/input_s"] > last["time/input_phase1_s"]
  _run(data, ref, str(tmp_path / "full"), **{"selection.score_images": "off"})
  assert "two-phase input off (config.selection.score_images=off)" in caplog.text
  full, two = read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "two"))
  for step in (1, 2, 3, 4):  # the same picks, the same batches: the same losses
    assert full[step]["train/loss"] == two[step]["train/loss"], step
  ids = lambda w: [line for line in open(os.path.join(w, "selected_ids.jsonl"))]
  assert ids(str(tmp_path / "full")) == ids(str(tmp_path / "two"))
  # A resume inside the run (from step 2, phase 1's iterator restored) equals it.
  shutil.rmtree(tmp_path / "two" / "checkpoints" / "4")
  _run(data, ref, str(tmp_path / "two"))
  assert losses(str(tmp_path / "two")) == [full[s]["train/loss"] for s in (1, 2, 3, 4)]


def test_a_record_that_fails_to_decode_in_phase2_is_counted_and_replaced(pool, tmp_path,
                                                                          monkeypatch):
  data, _ = pool
  reader = two_phase.SelectedReader(data, 16)
  real = reader._decode
  monkeypatch.setattr(reader, "_decode", lambda i: None if i in (11, 12) else real(i))
  images = reader.read(np.array([11, 30, 12, 40]))
  assert images.shape == (4, 16, 16, 3) and reader.replaced == 2
  np.testing.assert_array_equal(images[0], images[1])  # the next row that decoded
  np.testing.assert_array_equal(images[2], images[3])
  monkeypatch.setattr(reader, "_decode", lambda i: None)
  with pytest.raises(ValueError, match="none of the 2 selected records.*jest-pod data verify"):
    reader.read(np.array([1, 2]))


def test_a_damaged_score_image_row_is_refused_naming_the_rebuild(pool, tmp_path):
  data, _ = pool
  copy = str(tmp_path / "toy")
  shutil.copytree(data, copy)
  shard = os.path.join(score_images.path_for(copy, KEY), "pixels", "c", "0", "0", "0", "0")
  assert os.path.getsize(shard) > 100
  with open(shard, "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  store = score_images.open_store(score_images.path_for(copy, KEY), data_dir=copy, key=KEY)
  with pytest.raises(score_images.ScoreImagesError, match=(
      r"score images .* is damaged: 1 of \d+ rows.*jest-pod data score-images --data")):
    store.lookup(np.arange(256))
  # `jest-pod data verify` reads every row of every store and names the damaged one.
  said = verify.verify_stores(copy)
  assert "is damaged: 1 of" in said[score_images.path_for(copy, KEY)]
  assert said[token_rows.path_for(copy, tokenizer_lib.resolve({"data": copy}), TEXT_LEN)] == (
      "ok (256 rows)")


def test_stale_or_missing_stores_are_named_with_the_command_that_builds_them(pool, tmp_path):
  data, ref = pool
  copy = str(tmp_path / "toy")
  shutil.copytree(data, copy)
  with open(os.path.join(copy, "manifest.json")) as f:  # a rebuilt data set: new checksums
    m = json.load(f)
  m["shards"][0]["sha256"] = "0" * 64
  with open(os.path.join(copy, "manifest.json"), "w") as f:
    json.dump(m, f)
  with pytest.raises(score_images.ScoreImagesError, match=(
      r"do not match this run: built from other records.*jest-pod data score-images")):
    score_images.open_store(score_images.path_for(copy, KEY), data_dir=copy, key=KEY)
  assert all("built from other records" in v and "jest-pod data score-images" in v
             for v in verify.verify_stores(copy).values())
  tok = tokenizer_lib.resolve({"data": copy})
  with pytest.raises(token_rows.TokenRowsError, match="built from other records.*REBUILD"):
    token_rows.open_store(token_rows.path_for(copy, tok, TEXT_LEN), data_dir=copy,
                          tokenizer=tok, text_len=TEXT_LEN, rebuild="REBUILD")
  # Missing: the run decodes every scored example and names what builds them.
  shutil.rmtree(os.path.join(copy, score_images.DIR))
  c = tiny_config(copy, method="joint", reference=ref)
  phase1, why = two_phase.plan(c, config_lib.resolve(c), None, tok)
  assert phase1 is None and "not built" in why, why
  assert f"jest-pod data score-images --data {copy} --image-size 16 --patch 4" in why
  # Named explicitly, it must be there.
  c.selection.score_images = str(tmp_path / "nowhere")
  with pytest.raises(score_images.ScoreImagesError, match="nowhere: not built"):
    two_phase.plan(c, config_lib.resolve(c), None, tok)
