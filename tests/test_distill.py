"""Distillation from the reference (config.distill): the loss against hand-computed values,
the teacher rows JEST gathers, and the trainer with the cache and the forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jest_pod import config as config_lib
from jest_pod.jest import losses
from jest_pod.jest import reference as reference_lib
from jest_pod.jest import selection
from jest_pod.jest import step as jest_lib
from jest_pod.parallel import sharding as shd
from jest_pod.train import feed
from jest_pod.train import flops as flops_lib
from jest_pod.train import main as train_main
from train_helpers import read_metrics, tiny_config

# Two pairs, logits written out: student S, teacher T (already t·x·y (+ b)).
S = np.array([[2.0, 0.0], [1.0, 3.0]])
T = np.array([[4.0, -1.0], [0.5, 2.0]])


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_softmax_kd_equals_the_hand_computed_kl(tau):
  expected = 0.0
  for axis in (1, 0):  # image→text over each row, text→image over each column
    p, q = _softmax(T / tau, axis), _softmax(S / tau, axis)
    expected += 0.5 * np.mean(np.sum(p * np.log(p / q), axis=axis))
  got = losses.softmax_distill_loss(jnp.asarray(S), jnp.asarray(T), tau)
  np.testing.assert_allclose(float(got), tau ** 2 * expected, rtol=1e-6)
  # By hand for τ = 1, row 0 only: p = softmax(4, −1), q = softmax(2, 0).
  if tau == 1.0:
    p0, q0 = np.exp([4, -1]) / np.exp([4, -1]).sum(), np.exp([2, 0]) / np.exp([2, 0]).sum()
    row0 = np.sum(p0 * np.log(p0 / q0))
    # 0.993307·ln(0.993307/0.880797) + 0.006693·ln(0.006693/0.119203) = 0.119407 − 0.019274
    assert abs(row0 - 0.100133) < 1e-5


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sigmoid_kd_equals_the_hand_computed_binary_kl(tau):
  sig = lambda x: 1 / (1 + np.exp(-x))
  p, q = sig(T / tau), sig(S / tau)
  kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  got = losses.sigmoid_distill_loss(jnp.asarray(S), jnp.asarray(T), tau)
  np.testing.assert_allclose(float(got), tau ** 2 * kl.sum() / 2, rtol=1e-6)


@pytest.mark.parametrize("kind", losses.DISTILL_KINDS)
def test_kd_is_zero_against_itself_and_positive_otherwise(kind):
  rng = np.random.default_rng(0)
  x, y = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2))
  x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
  me = (x, y, 10.0, -5.0)
  assert abs(float(losses.distill_loss(kind, me, me, 1.0))) < 1e-5
  # A wider teacher (d* = 6) compares by logits, not embeddings.
  xt = rng.normal(size=(8, 6)).astype(np.float32)
  xt /= np.linalg.norm(xt, axis=1, keepdims=True)
  assert float(losses.distill_loss(kind, me, (xt, xt, 10.0, -5.0), 1.0)) > 0.01


def test_joint_selection_gathers_the_teacher_rows_it_selected():
  """With config.distill on, the select fn returns θ*'s embeddings of exactly the selected
  rows (no second reference pass), also for a score that does not weigh θ*."""
  n, b, d = 64, 16, 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  config = config_lib.base_config()
  config.batch_size = b
  config.selection.update(method="joint", score="hard_learner", n_chunks=4)
  config.distill.weight = 1.0
  rows = np.arange(n)
  image = np.broadcast_to(rows[:, None, None, None], (n, 2, 2, 3)).astype(np.float32)
  super_batch = feed.to_global({"image": image}, shd.batch_sharding(mesh))
  rng = np.random.default_rng(0)

  def emb(width):
    x = rng.normal(size=(n, width)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return selection.Embeddings(jnp.asarray(x), jnp.asarray(x[:, ::-1].copy()),
                                jnp.float32(7.0), jnp.float32(-3.0))

  learner, reference = emb(d), emb(2 * d)
  batch, _, teacher = jax.jit(jest_lib.make_select_fn(config, mesh, b))(
      jax.random.key(0), learner, reference, super_batch)
  picked = np.asarray(batch["image"][:, 0, 0, 0]).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(teacher.image), np.asarray(reference.image)[picked])
  np.testing.assert_array_equal(np.asarray(teacher.text), np.asarray(reference.text)[picked])
  assert float(teacher.temperature) == 7.0 and float(teacher.bias) == -3.0
  config.distill.weight = 0.0
  assert jax.jit(jest_lib.make_select_fn(config, mesh, b))(
      jax.random.key(0), learner, reference, super_batch)[2] is None


def _kd(toy, ref, **kw):
  return tiny_config(toy, steps=3, reference=ref,
                     **{"distill.weight": 0.5, "distill.temperature": 2.0, **kw})


def test_uniform_with_distillation_looks_the_cache_up_for_its_batch(toy_reference, tmp_path):
  """Uniform + KD reads θ*'s rows of its own batch from the cache: the same distillation
  term as the reference's forward pass over that batch (bf16 storage: ~1e-2)."""
  toy, ref, _ = toy_reference
  runs, flops = {}, {}
  for name, cache in (("forward", "off"), ("cached", "")):
    train_main.train(_kd(toy, ref, **{"selection.reference_cache": cache}), str(tmp_path / name))
    runs[name] = read_metrics(str(tmp_path / name))
    flops[name] = json.loads((tmp_path / name / "flops.json").read_text())
  for step in (1, 2, 3):
    rec = runs["cached"][step]
    assert rec["train/distill_loss"] > 0
    np.testing.assert_allclose(rec["train/loss"],
                               rec["train/contrastive_loss"] + 0.5 * rec["train/distill_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(rec["train/distill_loss"], runs["forward"][step]["train/distill_loss"],
                               rtol=2e-2, atol=2e-2)
  # Charged: θ*'s forward pass over the B trained rows and its logits; amortised: the cache
  # pays the forward pass once.
  parts = flops["forward"]["parts"]
  assert parts["reference"] > 0 and parts["distill"] == 2 * 32 * 32 * 16
  assert flops["cached"]["charged"] == flops["forward"]["charged"]
  assert flops["cached"]["amortised"] == flops["cached"]["charged"] - parts["reference"]
  plain = flops_lib.step_flops(tiny_config(toy, steps=3))
  assert flops["forward"]["charged"] == pytest.approx(plain["total"] + parts["reference"]
                                                      + parts["distill"])


def test_jest_with_distillation_trains_on_the_selection_and_its_teacher(toy_reference, tmp_path):
  toy, ref, _ = toy_reference
  config = _kd(toy, ref, method="joint", **{"selection.filter_ratio": 0.5,
                                             "distill.kind": "sigmoid"})
  last = train_main.train(config, str(tmp_path))
  assert np.isfinite(last["train/distill_loss"]) and last["train/distill_loss"] > 0
  assert "select/learnability_selected" in last
  flops = json.loads((tmp_path / "flops.json").read_text())
  # The reference's pass is JEST's own over N = 2B: distillation adds only the logits.
  per_example = reference_lib.example_flops(reference_lib.load(ref))
  assert flops["parts"]["reference"] == pytest.approx(64 * per_example)
  assert flops["parts"]["distill"] == 2 * 32 * 32 * 16


def test_distillation_without_a_reference_is_refused(toy_reference):
  toy, _, _ = toy_reference
  config = _kd(toy, "", **{"selection.reference_cache": "off"})
  with pytest.raises(ValueError, match=r"config.distill.weight=0.5 needs a reference model"):
    config_lib.validate(config)
