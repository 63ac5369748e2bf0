"""The analytic FLOP model (train/flops.py) against counts made by hand for 1-layer towers.

Convention (flops.py's docstring): 2 FLOPs per multiply-add of every matmul; layer norms,
softmaxes and the token embedding look-up are not counted; backward = 2 × forward, so a
trained example costs 3 × forward. Every number below is written out, not computed by
flops.py's helpers.
"""

import types

import pytest

from jest_pod import config as config_lib
from jest_pod.models import flops as model_flops
from jest_pod.train import flops as flops_lib

# The tiny model: 16×16 images, patch 4, width 32, depth 1, MLP 64; text 12 tokens,
# width 32, depth 1, MLP 64; embeddings d = 16. One matmul [m, k] @ [k, n] = 2·m·k·n.
#
# Image tower at patch 4: T = (16/4)² = 16 tokens.
#   patch embedding  2·16·(4·4·3)·32  = 49,152
#   q, k, v          2·16·32·(3·32)   = 98,304
#   attention out    2·16·32·32       = 32,768
#   q·kᵀ             2·16·16·32       = 16,384
#   attn·v           2·16·16·32       = 16,384
#   MLP fc1, fc2     2·(2·16·32·64)   = 131,072
#   head (pooled)    2·32·16          = 1,024
IMAGE_P4 = 345_088
# Image tower at patch 8: T = 4 tokens (the patch embedding still sees every pixel).
#   49,152 + 2·4·32·96 (24,576) + 2·4·32·32 (8,192) + 2·(2·4·4·32) (2,048)
#   + 2·(2·4·32·64) (32,768) + 1,024
IMAGE_P8 = 117_760
# Text tower, L = 12 tokens: 2·12·32·96 (73,728) + 2·12·32·32 (24,576)
#   + 2·(2·12·12·32) (18,432) + 2·(2·12·32·64) (98,304) + 1,024
TEXT = 216_064
B, D = 32, 16
PAIRS = 2 * B * B * D  # the loss's B×B logits x·yᵀ: 32,768


def _config(**selection):
  c = config_lib.base_config()
  c.batch_size = B
  c.input.max_text_len = 12
  c.model.image_size = 16
  c.model.embed_dim = D
  c.model.image = dict(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.text = dict(vocab_size=64, max_len=12, width=32, depth=1, num_heads=2, mlp_dim=64)
  c.selection.update(selection)
  return c


def _flexi(c):
  """Flexi-JEST: score at patch 8, train half the batch at 4 and half at 8."""
  c.flexi.update(score_patch_size=8, train_patch_sizes=(4, 8), train_fractions=(0.5, 0.5))
  return c


def test_forward_counts_match_the_hand_count():
  c = _config()
  assert model_flops.image_forward_flops(c.model, 16, 4) == IMAGE_P4
  assert model_flops.image_forward_flops(c.model, 16, 8) == IMAGE_P8
  assert model_flops.text_forward_flops(c.model, 12) == TEXT


def test_uniform_step_is_three_forwards_of_b_examples_and_the_loss():
  parts = flops_lib.step_flops(_config(method="uniform"))
  # 3 · (32 · (345,088 + 216,064) + 32,768) = 3 · 17,989,632
  assert parts["train"] == 53_968_896 == 3 * (B * (IMAGE_P4 + TEXT) + PAIRS)
  assert parts["scoring"] == parts["reference"] == parts["selection"] == 0
  assert parts["total"] == parts["train"]


def test_jest_step_charges_learner_scoring_reference_and_selection():
  # f = 0.5 → N = 64 scored rows; 4 chunks of c = 8.
  c = _flexi(_config(method="joint", score="learnability", filter_ratio=0.5, n_chunks=4))
  parts = flops_lib.step_flops(c)
  # Train: half of B at patch 4, half at patch 8, all texts, the loss; × 3.
  #   3 · (16·345,088 + 16·117,760 + 32·216,064 + 32,768) = 3 · 14,352,384
  assert parts["train"] == 43_057_152
  # Learner scoring of N = 64 at the score patch 8: 64 · (117,760 + 216,064)
  assert parts["scoring"] == 21_364_736
  # Reference (same towers, its own base patch 4) on the same 64: 64 · (345,088 + 216,064)
  assert parts["reference"] == 35_913_728 == 64 * (IMAGE_P4 + TEXT)
  # Selection, two models: the diagonal L_kk, N·2d each (64·32·2 = 4,096), plus for each
  # of the 64 rows × the B − c = 24 examples of chunks 0..2 the dots x_k·y_j and x_j·y_k
  # (2 · 2d = 64 FLOPs) per model: 64·24·64·2 = 196,608.
  assert parts["selection"] == 4_096 + 196_608
  assert parts["total"] == 43_057_152 + 21_364_736 + 35_913_728 + 200_704


def test_one_model_scores_charge_one_model():
  base = dict(filter_ratio=0.5, n_chunks=4)
  learner_only = flops_lib.step_flops(_flexi(_config(method="joint", score="hard_learner",
                                                     **base)))
  assert learner_only["reference"] == 0 and learner_only["scoring"] == 21_364_736
  assert learner_only["selection"] == 64 * D * 2 + 64 * 24 * 4 * D  # 2,048 + 98,304
  reference_only = flops_lib.step_flops(_flexi(_config(method="joint", score="easy_reference",
                                                       **base)))
  assert reference_only["scoring"] == 0 and reference_only["reference"] == 35_913_728
  # Independent selection needs only the diagonal.
  independent = flops_lib.step_flops(_flexi(_config(method="independent", **base)))
  assert independent["selection"] == 2 * 64 * D * 2


def test_a_reference_of_other_size_is_charged_at_its_own_size():
  learner = _config(method="joint", score="learnability", filter_ratio=0.5, n_chunks=4)
  reference = _config()
  reference.model.image = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  per_example = model_flops.example_forward_flops(reference.model, 16, 8, 12)
  parts = flops_lib.step_flops(learner, reference_example_flops=per_example)
  assert parts["reference"] == 64 * (IMAGE_P8 + TEXT)  # the reference's base patch is 8
  parts = flops_lib.step_flops(learner, reference_example_flops=1000.0)  # a cache's figure
  assert parts["reference"] == 64_000
  # A wider reference (d = 48 vs the learner's 16) scores its pairs in its own space.
  same = flops_lib.step_flops(learner)["selection"]
  wide = flops_lib.step_flops(learner, reference_dim=3 * D)["selection"]
  assert wide == same * (D + 3 * D) / (2 * D)


@pytest.mark.parametrize("cached", [False, True])
def test_amortised_view_drops_the_reference_only_when_cached(cached):
  c = _flexi(_config(method="joint", score="learnability", filter_ratio=0.5, n_chunks=4))
  # What run_flops reads of a `jest.reference.Reference` (a cache's figures, or the forward
  # pass of the learner's own towers).
  reference = types.SimpleNamespace(
      cached=cached, dim=D, example_flops=1000.0 if cached else model_flops.example_forward_flops(
          c.model, 16, 4, 12), one_time_flops=5e9 if cached else 0.0)
  out = flops_lib.run_flops(c, reference)
  reference = 64_000 if cached else 35_913_728
  charged = 43_057_152 + 21_364_736 + reference + 200_704
  assert out["charged"] == charged  # the paper's accounting: charged even when cached
  assert out["amortised"] == (charged - reference if cached else charged)
  assert out["reference_cache_one_time"] == (5e9 if cached else 0.0)
