"""JEST selection: scores (jest_pod/jest/selection.py docstring) vs numpy, chunked conditional
scores vs brute force, joint > independent > uniform on a structured super-batch, 1 vs 8 devices, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jest_pod.jest import selection as sel

STATIC = ("num_select", "n_chunks", "score", "loss", "mesh", "data_axes", "return_scores",
          "block_bytes")
# One jitted entry point shared by the tests, so equal configs compile once.
joint = jax.jit(sel.joint_select, static_argnames=STATIC)
independent = jax.jit(sel.independent_select,
                      static_argnames=("num_select", "score", "method", "loss", "mesh"))


def _unit(a):
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def _embeddings(seed, n, d=8, t=10.0, b=-5.0, noise=0.8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x + noise * rng.normal(size=(n, d))
  return sel.Embeddings(jnp.asarray(_unit(x), jnp.float32), jnp.asarray(_unit(y), jnp.float32),
                        jnp.float32(t), jnp.float32(b))


def _np_pair_losses(e):
  """The losses.py docstring literally: ℓ(i, j) = −log σ(m_ij (t x_i·y_j + b)), m = +1 on the diagonal."""
  x, y = np.asarray(e.image, np.float64), np.asarray(e.text, np.float64)
  z = float(e.temperature) * x @ y.T + float(e.bias)
  m = 2 * np.eye(len(x)) - 1
  return np.logaddexp(0.0, -m * z)


def _np_clip_losses(e, idx):
  """Per-example CLIP losses of the batch `idx`, [len(idx)]."""
  x, y = np.asarray(e.image, np.float64)[idx], np.asarray(e.text, np.float64)[idx]
  z = float(e.temperature) * x @ y.T
  lse = lambda a: np.log(np.sum(np.exp(a - a.max(1, keepdims=True)), 1)) + a.max(1)
  return 0.5 * ((lse(z) - np.diag(z)) + (lse(z.T) - np.diag(z)))


LEARNER, REFERENCE = _embeddings(0, 24), _embeddings(1, 24, t=8.0, b=-3.0, noise=0.3)


def test_pair_scores_match_design():
  l, r = _np_pair_losses(LEARNER), _np_pair_losses(REFERENCE)
  want = {"learnability": l - r, "hard_learner": l, "easy_reference": -r}
  args = {"learnability": (LEARNER, REFERENCE), "hard_learner": (LEARNER, None),
          "easy_reference": (None, REFERENCE)}
  for score, expected in want.items():
    got = sel.pair_scores(*args[score], score)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=score)
  idx = np.array([3, 0, 7])
  np.testing.assert_allclose(sel.batch_score(want["learnability"], idx),
                             (l - r)[np.ix_(idx, idx)].sum(), rtol=1e-5)
  np.testing.assert_allclose(sel.mean_learnability(LEARNER, REFERENCE, idx),
                             np.diag(l - r)[idx].mean(), rtol=1e-4)
  np.testing.assert_allclose(sel.mean_learnability(LEARNER, REFERENCE),
                             np.diag(l - r).mean(), rtol=1e-4)


def _check_history(idx, history, c, expected_fn):
  """history[r] must equal expected_fn(S) on the unselected rows, −inf on S."""
  idx, history = np.asarray(idx), np.asarray(history)
  n = history.shape[1]
  for r in range(history.shape[0]):
    s = idx[:r * c]
    free = np.setdiff1d(np.arange(n), s)
    assert np.all(np.isneginf(history[r, s]))
    np.testing.assert_allclose(history[r, free], expected_fn(s)[free], rtol=2e-4, atol=2e-4,
                               err_msg=f"chunk {r}")


@pytest.mark.parametrize("score", ["learnability", "hard_learner"])
def test_sigmoid_conditional_scores_match_brute_force(score):
  lrn, ref = LEARNER, (REFERENCE if score == "learnability" else None)
  mat = np.asarray(sel.pair_scores(lrn, ref, score), np.float64)
  idx, history = joint(jax.random.key(3), lrn, ref, num_select=12, n_chunks=3, score=score,
                       return_scores=True)
  # s(k | S) = L_kk + Σ_{j∈S} (L_kj + L_jk), from the full matrix.
  _check_history(idx, history, 4,
                 lambda s: np.diag(mat) + mat[:, s].sum(1) + mat[s, :].sum(0))


def test_softmax_conditional_scores_match_brute_force():
  lrn, ref, n = LEARNER, REFERENCE, 24

  def batch(s):  # s(S) = Σ_{i∈S} ℓ_θ(i; S) − ℓ_θ*(i; S)
    s = list(s)
    return (_np_clip_losses(lrn, s) - _np_clip_losses(ref, s)).sum() if s else 0.0

  def expected(s):
    if len(s) == 0:  # first chunk: per-example CLIP learnability in the super-batch
      return _np_clip_losses(lrn, np.arange(n)) - _np_clip_losses(ref, np.arange(n))
    base = batch(s)
    return np.array([batch(list(s) + [k]) - base if k not in s else 0.0 for k in range(n)])

  idx, history = joint(jax.random.key(4), lrn, ref, num_select=12, n_chunks=3, loss="softmax",
                       return_scores=True)
  assert len(set(np.asarray(idx).tolist())) == 12
  _check_history(idx, history, 4, expected)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_a_reference_of_another_width_scores_in_its_own_space(loss):
  """A public reference wider than the learner (d = 12 vs 8): each model's pair losses
  come from its own embeddings; the conditional scores are still the brute-force ones."""
  wide = _embeddings(1, 24, d=12, t=8.0, b=-3.0, noise=0.3)
  idx, history = joint(jax.random.key(5), LEARNER, wide, num_select=12, n_chunks=3,
                       loss=loss, return_scores=True)
  assert len(set(np.asarray(idx).tolist())) == 12
  if loss == "sigmoid":
    mat = _np_pair_losses(LEARNER) - _np_pair_losses(wide)
    _check_history(idx, history, 4, lambda s: np.diag(mat) + mat[:, s].sum(1) + mat[s, :].sum(0))
  else:
    batch = lambda s: (_np_clip_losses(LEARNER, s) - _np_clip_losses(wide, s)).sum() if s else 0.0
    _check_history(idx, history, 4, lambda s: (
        _np_clip_losses(LEARNER, np.arange(24)) - _np_clip_losses(wide, np.arange(24))
        if len(s) == 0 else np.array([batch(list(s) + [k]) - batch(list(s)) if k not in s
                                      else 0.0 for k in range(24)])))


def test_one_chunk_is_independent_sampling():
  key = jax.random.key(11)
  one = joint(key, LEARNER, REFERENCE, num_select=8, n_chunks=1)
  ind = independent(key, LEARNER, REFERENCE, num_select=8, method="sample")
  np.testing.assert_array_equal(one, ind)
  top = np.asarray(independent(key, LEARNER, REFERENCE, num_select=8, method="topk"))
  diag = np.diag(_np_pair_losses(LEARNER) - _np_pair_losses(REFERENCE))
  np.testing.assert_array_equal(top, np.argsort(-diag)[:8])


def _structured_super_batch(seed, n=128, d=32, group=4):
  """Groups of 4 that the learner confuses (shared embedding: hard negatives, only learnable
  together) and examples the reference finds noisy (low learnability on the diagonal).

  First half: 16 groups of 4 with one learner embedding each; groups 0..7 clean, 8..15
  noisy. Second half: singletons, the first 32 clean, the last 32 noisy.
  """
  rng = np.random.default_rng(seed)
  centers = _unit(rng.normal(size=(n // 2 // group, d)))
  singles = _unit(rng.normal(size=(n // 2, d)))
  lx = np.concatenate([np.repeat(centers, group, axis=0), singles])
  rx = _unit(rng.normal(size=(n, d)))
  ry = rx.copy()
  noisy = np.r_[n // 4:n // 2, 3 * n // 4:n]
  ry[noisy] = _unit(rng.normal(size=(len(noisy), d)))  # reference: caption does not match
  f = lambda a: jnp.asarray(a, jnp.float32)
  return (sel.Embeddings(f(lx), f(lx), jnp.float32(10.0), jnp.float32(-5.0)),
          sel.Embeddings(f(rx), f(ry), jnp.float32(10.0), jnp.float32(-10.0)))


def test_joint_beats_independent_beats_uniform():
  b = 32
  res = {"joint": [], "independent": [], "uniform": []}
  for seed in range(3):
    lrn, ref = _structured_super_batch(seed)
    mat = sel.pair_scores(lrn, ref)
    key = jax.random.key(100 + seed)
    picks = {
        "joint": joint(key, lrn, ref, num_select=b, n_chunks=4),
        "independent": independent(key, lrn, ref, num_select=b, method="sample"),
        "uniform": jax.random.choice(key, 128, (b,), replace=False),
    }
    for name, idx in picks.items():
      assert len(set(np.asarray(idx).tolist())) == b, name
      res[name].append(float(sel.batch_score(mat, idx)) / b**2)
  mean = {k: np.mean(v) for k, v in res.items()}
  assert mean["joint"] > mean["independent"] > mean["uniform"], mean


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("shape,loss", [((8,), "sigmoid"), ((4, 2), "sigmoid"),
                                        ((4, 2), "softmax")])
def test_same_indices_on_1_and_8_devices(shape, loss):
  names = ("data", "fsdp")[:len(shape)]
  if len(shape) == 1:
    # Explicit axes (jax.make_mesh's default) and unsharded inputs: resharded inside.
    mesh, put = jax.make_mesh(shape, names), lambda e: e
  else:
    mesh = _mesh(shape, names)
    rows = NamedSharding(mesh, P(names))
    put = lambda e: sel.Embeddings(jax.device_put(e.image, rows), jax.device_put(e.text, rows),
                                   e.temperature, e.bias)
  key = jax.random.key(7)
  kw = dict(num_select=12, n_chunks=3, loss=loss, return_scores=True)
  idx1, hist1 = joint(key, LEARNER, REFERENCE, **kw)
  idx8, hist8 = joint(key, put(LEARNER), put(REFERENCE), mesh=mesh, **kw)
  np.testing.assert_array_equal(idx1, idx8)
  np.testing.assert_allclose(hist1, hist8, rtol=1e-5, atol=1e-5)
  if loss == "sigmoid" and len(shape) == 2:
    kw = dict(num_select=12, method="sample")
    np.testing.assert_array_equal(independent(key, LEARNER, REFERENCE, mesh=mesh, **kw),
                                  independent(key, LEARNER, REFERENCE, **kw))


@pytest.mark.parametrize("loss,devices", [("sigmoid", 1), ("softmax", 1), ("sigmoid", 8),
                                          ("softmax", 8)])
def test_row_tiles_give_the_untiled_result(loss, devices):
  """A block budget of a few rows (many row tiles, uneven on 8 devices: 3 rows each)
  picks the same examples with the same conditional scores as one [N, c] block."""
  mesh = _mesh((devices,), ("data",)) if devices > 1 else None
  key = jax.random.key(5)
  kw = dict(num_select=12, n_chunks=3, loss=loss, return_scores=True, mesh=mesh)
  idx, hist = joint(key, LEARNER, REFERENCE, **kw)
  # c = 4 columns of 4 bytes: 32 bytes = 2 rows per tile.
  idx_t, hist_t = joint(key, LEARNER, REFERENCE, block_bytes=32, **kw)
  assert sel._n_tiles(24 // devices, 4, 32) > 1
  np.testing.assert_array_equal(idx_t, idx)
  np.testing.assert_allclose(hist_t, hist, rtol=1e-6, atol=1e-6)


def test_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="learnability"):
    sel.pair_scores(LEARNER, REFERENCE, "hardness")
  with pytest.raises(ValueError, match="needs the reference"):
    sel.joint_select(key, LEARNER, None, num_select=8, n_chunks=2)
  with pytest.raises(ValueError, match="divisible by n_chunks"):
    sel.joint_select(key, LEARNER, REFERENCE, num_select=10, n_chunks=4)
  with pytest.raises(ValueError, match="num_select"):
    sel.joint_select(key, LEARNER, REFERENCE, num_select=48, n_chunks=4)
  with pytest.raises(ValueError, match="softmax"):
    sel.joint_select(key, LEARNER, REFERENCE, num_select=8, loss="hinge")
  with pytest.raises(ValueError, match="topk"):
    sel.independent_select(key, LEARNER, REFERENCE, num_select=8, method="best")
  with pytest.raises(ValueError, match="not divisible"):
    sel.joint_select(key, _embeddings(0, 20), _embeddings(1, 20), num_select=8, n_chunks=2,
                     mesh=_mesh((8,), ("data",)))


def test_a_new_score_is_one_registry_entry(monkeypatch):
  """WORKSPACE_NOTES "Extending: a score": one entry in selection.SCORES, and validation,
  the models a step runs, needs_reference, the FLOP model and selection all follow."""
  from jest_pod import config as config_lib
  from jest_pod.train import flops as flops_lib
  c = config_lib.base_config()
  c.selection.update(method="joint", score="anti_learnability", reference="ref", n_chunks=4)
  c.batch_size = 64
  with pytest.raises(ValueError, match="selection.score='anti_learnability' is not valid"):
    config_lib.validate(c)
  monkeypatch.setitem(sel.SCORES, "anti_learnability", (-1.0, 1.0))
  config_lib.validate(c)
  assert sel.uses_models("anti_learnability") == (True, True)
  assert config_lib.resolve(c).needs_reference
  parts = flops_lib.step_flops(c)
  assert parts["scoring"] > 0 and parts["reference"] > 0
  learner, reference = _embeddings(0, 64), _embeddings(1, 64)
  kw = dict(num_select=16, n_chunks=4, loss="sigmoid")
  anti = np.asarray(joint(jax.random.key(0), learner, reference, score="anti_learnability", **kw))
  learn = np.asarray(joint(jax.random.key(0), learner, reference, score="learnability", **kw))
  assert len(set(anti.tolist())) == 16 and set(anti.tolist()) != set(learn.tolist())
  # The opposite score prefers what learnability avoids: lower mean learnability.
  diag = np.diag(_np_pair_losses(learner)) - np.diag(_np_pair_losses(reference))
  assert diag[anti].mean() < diag[learn].mean()
