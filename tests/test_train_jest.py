"""The trainer end to end with JEST: a reference checkpoint, selection logged, 1 vs 8
devices pick the same examples, a missing reference stops before training."""

import numpy as np
import pytest

from jest_pod.train import hooks
from jest_pod.train import main as train_main
from train_helpers import read_metrics, run_cli, tiny_config


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  train_main.train(tiny_config(toy, steps=8), workdir)
  return workdir


# Flexi-JEST (score at patch 8, train at 4 and 8): the joint run is the config that
# test_jest_one_device_matches_eight runs again in subprocesses, whose 8-device one then
# loads this compile from the session's persistent compilation cache (tests/conftest.py).
FLEXI = {"flexi.score_patch_size": 8, "flexi.train_patch_sizes": (4, 8),
         "flexi.train_fractions": (0.5, 0.5)}


@pytest.mark.parametrize("method,score,flexi", [("joint", "learnability", FLEXI),
                                                ("independent", "easy_reference", {})])
def test_jest_trains_with_a_reference_and_logs_selection(toy, reference, tmp_path, method, score,
                                                         flexi):
  config = tiny_config(toy, steps=3, method=method, reference=reference,
                       **{"selection.score": score, "selection.filter_ratio": 0.5}, **flexi)
  last = train_main.train(config, str(tmp_path))
  assert np.isfinite(last["train/loss"])
  if score == "learnability":
    assert "select/learnability_selected" in last
  assert "select/share/toy/swapped_caption" in last
  assert last["progress/examples"] == 3 * 32


def test_jest_one_device_matches_eight(toy, reference, tmp_path):
  config = tiny_config(toy, steps=3, method="joint", reference=reference,
                       **{"selection.filter_ratio": 0.5}, **FLEXI)
  procs = {d: run_cli(config, str(tmp_path / f"d{d}"), devices=d) for d in (1, 8)}
  assert all(p.wait(timeout=600) == 0 for p in procs.values())
  m1, m8 = read_metrics(str(tmp_path / "d1")), read_metrics(str(tmp_path / "d8"))
  for step in (1, 2, 3):
    np.testing.assert_allclose(m1[step]["train/loss"], m8[step]["train/loss"], rtol=2e-4)
    np.testing.assert_allclose(m1[step]["select/learnability_selected"],
                               m8[step]["select/learnability_selected"], rtol=2e-4)


def test_missing_reference_is_a_clear_error_before_training(toy, tmp_path):
  config = tiny_config(toy, steps=2, method="joint", reference=str(tmp_path / "nope"))
  from jest_pod.interop import InteropError
  with pytest.raises(InteropError, match="config.selection.reference=.*nope.*does not exist"):
    train_main.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("score", ["learnability", "easy_reference"])
def test_nonfinite_selection_scores_stop_the_run_naming_the_reference(toy, reference, tmp_path,
                                                                     monkeypatch, score):
  """A damaged reference (NaN embeddings in a quarter of the rows, as from a damaged
  cache) leaves the loss finite but the selection scores NaN — for every score that uses
  θ*, also easy_reference, which logs no learnability: the guard stops at the first
  check, saves nothing, and says what to rebuild (issue 23)."""
  import jax.numpy as jnp
  from jest_pod.jest import reference as reference_lib
  real = reference_lib.ForwardReference.embeddings

  def damaged(self, super_batch):
    e = real(self, super_batch)
    rows = jnp.arange(e.image.shape[0])[:, None]
    return e._replace(image=jnp.where(rows % 4 == 0, jnp.nan, e.image))

  monkeypatch.setattr(reference_lib.ForwardReference, "embeddings", damaged)
  # The first test's config: its compiles are in the session's cache.
  config = tiny_config(toy, steps=3, method="joint", reference=reference,
                       **{"selection.filter_ratio": 0.5, "selection.score": score}, **FLEXI)
  with pytest.raises(hooks.TrainingDiverged,
                     match=r"selection scores are not finite at step 1 \(select/"
                           r"(learnability|score_super_batch)"
                           r".*restore the reference checkpoint config\.selection\.reference="):
    train_main.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
