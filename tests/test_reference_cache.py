"""`jest-pod data cache-reference`: cached reference embeddings replace the reference pass."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from jest_pod import checkpoint
from jest_pod.data import reference_cache
from jest_pod.data import sources
from jest_pod.data.toy import build_toy
from jest_pod.interop import formats
from jest_pod.jest import reference as reference_lib
from jest_pod import embed
from jest_pod import lockfile
from jest_pod.models import build_model
from jest_pod.data import pipeline
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.models import flops as flops_lib
from jest_pod.parallel import sharding
from jest_pod.train import main as train_main
from tests import helpers_data
from train_helpers import read_metrics, tiny_config

N = 256  # conftest.toy_reference's examples


@pytest.fixture(scope="module")
def other_ref(toy_reference, tmp_path_factory):
  """A second reference: same architecture, one more training step → other params."""
  toy, _, _ = toy_reference
  ref2 = str(tmp_path_factory.mktemp("ref2"))
  train_main.train(tiny_config(toy, steps=5), ref2)
  return ref2


def _open(path, toy, ref, **kw):
  return reference_lib.open_cache(path, data_dir=toy, reference=ref, **kw)


def test_lookup_equals_the_reference_forward_pass(toy_reference):
  toy, ref, path = toy_reference
  assert path == os.path.join(toy, "reference_cache")
  assert not os.path.exists(path + ".tmp")
  cache = _open(path, toy, ref)
  config, params, step = checkpoint.load_params(ref)
  model = build_model(config.model)
  direct = embed.embed_batches(
      embed.encode_fn_for(model, image=True, text=True), params,
      pipeline.make_eval_iterator(toy, batch_size=64, image_size=16, max_text_len=12,
                                  tokenizer=os.path.join(toy, "tokenizer.model")),
      sharding.make_mesh((("data", -1),)), device_keys=("image", "text"),
      host_keys=("index",))
  np.testing.assert_array_equal(direct["index"], np.arange(N))
  order = np.random.default_rng(0).permutation(N)[:100].astype(np.int64)
  image, text = cache.store.lookup(order)
  assert image.dtype == text.dtype == np.float32 and image.shape == (100, 16)
  np.testing.assert_allclose(image, direct["image"][order], atol=1e-2, rtol=1e-2)
  np.testing.assert_allclose(text, direct["text"][order], atol=1e-2, rtol=1e-2)
  _, _, extras = model.apply({"params": params}, None, None)
  emb = cache.embeddings(cache.host_inputs({"index": order}))
  assert emb.temperature == np.float32(extras["t"]) and emb.bias == np.float32(extras["b"])
  np.testing.assert_array_equal(emb.image, image)
  m = cache.store.meta
  assert m["seconds"] > 0 and m["num_examples"] == N
  assert m["flops"] == pytest.approx(N * flops_lib.example_forward_flops(
      config.model, 16, config.model.image["patch_size"], 12))
  ident = m["fingerprint"]["reference"]
  assert ident["step"] == step and ident["path"] == os.path.abspath(ref)
  assert ident["params_digest"] == formats.params_digest(params)
  assert ident["kind"] == "workdir"
  assert m["fingerprint"]["preprocessing"] == {
      "image_size": 16, "max_text_len": 12, "text_style": "plain",
      "tokenizer_sha256": tokenizer_lib.Tokenizer(os.path.join(toy, "tokenizer.model")).sha256}
  with pytest.raises(IndexError):
    cache.store.lookup(np.array([N]))


def test_params_digest_sees_any_change(toy_reference):
  _, ref, _ = toy_reference
  _, params, _ = checkpoint.load_params(ref)
  d = formats.params_digest(params)
  host = jax.tree.map(np.asarray, params)
  assert formats.params_digest(host) == d  # placement does not matter
  leaves, treedef = jax.tree.flatten(host)
  leaves[-1] = leaves[-1].copy()
  leaves[-1].flat[0] += 1e-6
  assert formats.params_digest(jax.tree.unflatten(treedef, leaves)) != d


def test_mismatches_are_refused(toy_reference, other_ref, tmp_path, caplog):
  toy, ref, path = toy_reference
  with pytest.raises(reference_cache.ReferenceCacheError,
                     match=r"reference: built from .* step 4 .* step 5.*cache-reference"):
    _open(path, toy, other_ref)
  # The same weights read with another tokenizer embed other ids: another preprocessing.
  other_tok = str(tmp_path / "tok")
  tokenizer_lib.train_tokenizer([f"word{i} thing{i % 7}" for i in range(300)], other_tok, 40)
  with pytest.raises(reference_cache.ReferenceCacheError,
                     match=r"preprocessing: tokenizer_sha256 .*Rebuild it with "
                           r"`jest-pod data cache-reference --data"):
    _open(path, toy, ref, tokenizer=other_tok + ".model")
  other = build_toy(str(tmp_path / "other"), 64, image_size=16, seed=1)
  with pytest.raises(reference_cache.ReferenceCacheError, match="other data"):
    _open(path, other, ref)
  # No reference given: opens, warning names the reference the cache was built from.
  with caplog.at_level(logging.WARNING, logger="jest_pod"):
    cache = _open(path, toy, None)
  assert os.path.abspath(ref) in caplog.text and "not checked" in caplog.text
  assert cache.store.lookup(np.arange(3))[0].shape == (3, 16)


def test_damaged_rows_are_refused_with_the_rebuild_command(toy_reference, tmp_path):
  """Bytes changed inside a stored shard (the shard index and its crc32c still intact)
  are caught by the per-row checksums on the first look-up that reads them."""
  toy, ref, path = toy_reference
  damaged = str(tmp_path / "damaged")
  shutil.copytree(path, damaged)
  shard = os.path.join(damaged, "image", "c", "0", "0")
  with open(shard, "r+b") as f:
    f.seek(2 * 16 * 10)  # row 10's image bytes (bf16, d = 16)
    f.write(np.random.default_rng(0).bytes(8))
  cache = _open(damaged, toy, ref)
  assert cache.store.lookup(np.arange(10))[0].shape == (10, 16)  # rows before it are fine
  with pytest.raises(reference_cache.ReferenceCacheError,
                     match=r"damaged: 1 of 20 rows .*record 10.*cache-reference --data"):
    cache.store.lookup(np.arange(20))


def test_other_format_or_damaged_meta_is_refused(toy_reference, tmp_path):
  toy, ref, path = toy_reference
  old = str(tmp_path / "old")
  shutil.copytree(path, old)
  meta_file = os.path.join(old, "meta.json")
  with open(meta_file) as f:
    meta = json.load(f)
  meta["format"] = "jest_pod reference cache v2 (zarr3 bf16, sharded by rows)"
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  with pytest.raises(reference_cache.ReferenceCacheError, match="another format.*cache-reference"):
    _open(old, toy, ref)
  with open(meta_file, "w") as f:
    f.write('{"format": "jest_pod ref')
  with pytest.raises(reference_cache.ReferenceCacheError, match=r"meta.json is damaged"):
    _open(old, toy, ref)


def test_incomplete_or_missing_cache_is_refused(toy_reference, tmp_path):
  toy, ref, path = toy_reference
  partial = str(tmp_path / "partial")
  shutil.copytree(path, partial)
  os.remove(os.path.join(partial, "meta.json"))
  with pytest.raises(reference_cache.ReferenceCacheError,
                     match=r"incomplete.*cache-reference --data .* --output"):
    _open(partial, toy, ref)
  with pytest.raises(reference_cache.ReferenceCacheError, match="does not exist.*cache-reference"):
    _open(str(tmp_path / "nothing"), toy, ref)


def test_default_cache_path(toy_reference, tmp_path):
  toy, _, path = toy_reference
  assert reference_cache.default_path(toy) == path
  assert reference_cache.default_path(str(tmp_path)) is None
  os.makedirs(tmp_path / "reference_cache")  # a folder without meta.json is no cache
  assert reference_cache.default_path(str(tmp_path)) is None


def test_a_cache_of_any_source_kind(toy_reference, tmp_path, monkeypatch):
  """The cache is keyed by the source kind's fingerprint (`sources.fingerprint`): a "mem"
  source (tests/helpers_data.mem_kind) builds, opens and is refused for other records as
  a folder is."""
  toy, ref, path = toy_reference
  monkeypatch.setitem(sources.KINDS, "mem", helpers_data.mem_kind(toy))
  out = str(tmp_path / "mem_cache")
  assert reference_lib.build_cache("mem:100", ref, output=out, batch_size=64) == out
  cache = _open(out, "mem:100", ref)
  assert cache.store.meta["fingerprint"]["data"] == sources.fingerprint("mem:100")
  assert cache.store.num_examples == 100
  idx = np.arange(100)  # the first 100 records of the folder: the folder's cache rows
  for got, want in zip(cache.store.lookup(idx), _open(path, toy, ref).store.lookup(idx)):
    np.testing.assert_allclose(got, want, atol=1e-2)
  with pytest.raises(reference_cache.ReferenceCacheError, match="other data than mem:90"):
    _open(out, "mem:90", ref)
  assert reference_cache.default_path("mem:100") is None  # no folder to hold one
  # ... so building one without --output is refused, before anything is read or written
  # (it used to write into a folder named like the spec, under the current directory).
  monkeypatch.chdir(tmp_path)
  with pytest.raises(reference_cache.ReferenceCacheError,
                     match=r"--data mem:100: a 'mem' source has no folder.*pass --output DIR"):
    reference_lib.build_cache("mem:100", ref)
  assert sorted(os.listdir(tmp_path)) == ["mem_cache"]
  assert reference_lib.rebuild_command("mem:100", ref, out).endswith(f"--output {out}")


def test_rebuild_replaces_the_cache(toy_reference, tmp_path):
  toy, ref, _ = toy_reference
  out = str(tmp_path / "c")
  reference_lib.build_cache(toy, ref, output=out, batch_size=100)
  first = _open(out, toy, None).store.lookup(np.arange(N))
  reference_lib.build_cache(toy, ref, output=out, batch_size=256)
  assert sorted(os.listdir(tmp_path)) == ["c"]  # no .tmp / .old left behind
  again = _open(out, toy, ref).store.lookup(np.arange(N))
  np.testing.assert_allclose(again[0], first[0], atol=1e-2)


def test_jest_with_the_cache_trains_as_with_the_reference(toy_reference, tmp_path):
  """The trainer reads θ* from the cache by default (it sits beside the data), and that
  trains as the forward pass does (reference_cache=off)."""
  toy, ref, path = toy_reference
  assert path == reference_cache.default_path(toy)
  runs, flops = {}, {}
  for name, cache in (("forward", "off"), ("cached", "")):
    config = tiny_config(toy, steps=3, method="joint", reference=ref,
                         **{"selection.filter_ratio": 0.5, "selection.reference_cache": cache})
    train_main.train(config, str(tmp_path / name))
    runs[name] = read_metrics(str(tmp_path / name))
    with open(tmp_path / name / "flops.json") as f:
      flops[name] = json.load(f)
  assert flops["forward"]["reference_cache_one_time"] == 0
  assert flops["forward"]["amortised"] == flops["forward"]["charged"]
  assert flops["cached"]["reference_cache_one_time"] > 0
  assert flops["cached"]["charged"] == flops["forward"]["charged"]
  assert flops["cached"]["amortised"] < flops["cached"]["charged"]
  # bf16 storage: the cached embeddings differ from the forward pass by ~1e-3.
  for step in (1, 2, 3):
    for key in ("train/loss", "select/learnability_selected"):
      np.testing.assert_allclose(runs["cached"][step][key], runs["forward"][step][key],
                                 rtol=2e-2, atol=2e-2)


def test_a_record_that_failed_to_decode_is_refused(toy_reference, tmp_path, monkeypatch):
  toy, ref, _ = toy_reference
  real = pipeline.make_eval_iterator

  def one_bad(*args, **kwargs):
    for k, batch in enumerate(real(*args, **kwargs)):
      if k == 0:
        batch = dict(batch, mask=np.where(np.arange(len(batch["mask"])) == 3, 0.0,
                                          batch["mask"]).astype(np.float32))
      yield batch
  monkeypatch.setattr(pipeline, "make_eval_iterator", one_bad)
  out = str(tmp_path / "c")
  with pytest.raises(reference_cache.ReferenceCacheError, match="embedded 255 of 256"):
    reference_lib.build_cache(toy, ref, output=out)
  assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_forward_reference_with_other_preprocessing_names_the_cache_command(toy_reference, tmp_path):
  """A reference fed at another caption length cannot share the learner's super-batch:
  the forward path refuses and names `jest-pod data cache-reference`."""
  toy, ref, _ = toy_reference
  config = tiny_config(toy, steps=1, method="joint", reference=ref,
                       **{"selection.reference_cache": "off", "input.max_text_len": 8})
  with pytest.raises(ValueError, match=r"max_text_len: 12 \(reference\) vs 8 \(learner\).*"
                                       r"jest-pod data cache-reference --data"):
    train_main.train(config, str(tmp_path / "w"))


def test_a_second_builder_beside_the_same_data_is_refused(toy_reference, tmp_path):
  """Builders (and data-set writers) of one folder take its lock: two would interleave
  OUTPUT.tmp."""
  toy, ref, _ = toy_reference
  with lockfile.FolderLock(toy, what="data set writer"):
    with pytest.raises(lockfile.FolderBusy, match=r"is in use by another store builder or data set writer.*\.lock"):
      reference_lib.build_cache(toy, ref, output=os.path.join(toy, "another_cache"))
  assert not os.path.exists(os.path.join(toy, "another_cache.tmp"))
