"""`jest-pod data cache-reference`: cached reference embeddings replace the reference pass."""

import os

import numpy as np
import pytest

from jest_pod.data import reference_cache
from jest_pod.data.toy import build_toy
from jest_pod.train import main as train_main
from train_helpers import read_metrics, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  toy = build_toy(str(tmp_path_factory.mktemp("toy")), 256, noise=0.25, image_size=16)
  ref = str(tmp_path_factory.mktemp("ref"))
  train_main.train(tiny_config(toy, steps=4), ref)
  return toy, ref


def test_cache_rows_equal_the_reference_forward_pass(setup, tmp_path):
  toy, ref = setup
  path = reference_cache.build_cache(toy, ref, batch_size=48)  # 48 does not divide 256
  cache = reference_cache.ReferenceCache(path, toy)
  assert cache.image.shape == (256, 16) and cache.text.shape == (256, 16)
  np.testing.assert_allclose(np.linalg.norm(cache.image, axis=1), 1.0, rtol=1e-4)
  # A JEST run with the cache selects and trains exactly as with the reference forward pass.
  runs = {}
  for name, extra in (("forward", {}), ("cached", {"selection.reference_cache": path})):
    config = tiny_config(toy, steps=3, method="joint", reference=ref,
                         **{"selection.filter_ratio": 0.5, **extra})
    train_main.train(config, str(tmp_path / name))
    runs[name] = read_metrics(str(tmp_path / name))
  for step in (1, 2, 3):
    for key in ("train/loss", "select/learnability_selected"):
      np.testing.assert_allclose(runs["cached"][step][key], runs["forward"][step][key],
                                 rtol=1e-4, atol=1e-5)


def test_cache_of_other_data_is_refused(setup, tmp_path):
  toy, ref = setup
  path = reference_cache.build_cache(toy, ref)
  other = build_toy(str(tmp_path / "other"), 64, image_size=16, seed=1)
  with pytest.raises(reference_cache.ReferenceCacheError, match="other data"):
    reference_cache.ReferenceCache(path, other)
  with pytest.raises(reference_cache.ReferenceCacheError, match="cache-reference"):
    reference_cache.ReferenceCache(str(tmp_path / "nothing"), toy)
  assert os.path.exists(os.path.join(path, "meta.json"))
