"""Contrastive losses of a two-tower model, whole-batch and per pair.

Sigmoid (SigLIP): ℓ(i, j) = −log σ(m_ij · (t · x_i·y_j + b)), m_ij = +1 iff i = j.
The batch loss is Σ_ij ℓ(i, j) / n (SigLIP's normalisation by the batch size).
Softmax (CLIP): mean of the image→text and text→image cross-entropies of t · X Yᵀ.

Pair losses are also exposed blockwise (`sigmoid_pair_losses(..., row_offset, col_offset)`)
so that selection can compute the same math on a [rows, c] block of a super-batch
without building the N×N matrix (see the jest_pod/jest/selection.py docstring).
"""

import jax
import jax.numpy as jnp


def sigmoid_pair_losses(zimg, ztxt, t, b, *, row_offset=0, col_offset=0):
  """Per-pair sigmoid losses of a block.

  Args:
    zimg: [n, d] L2-normalised image embeddings (rows of the block).
    ztxt: [m, d] L2-normalised text embeddings (columns of the block).
    t, b: scalars, temperature (the scale, not its log) and bias.
    row_offset, col_offset: global indices of the block's first row and column; a pair
      is positive where row_offset + i == col_offset + j. May be traced.
  Returns:
    [n, m] float32 losses ℓ(i, j).
  """
  logits = t * (zimg @ ztxt.T) + b
  rows = row_offset + jnp.arange(zimg.shape[0])[:, None]
  cols = col_offset + jnp.arange(ztxt.shape[0])[None, :]
  m = jnp.where(rows == cols, 1.0, -1.0)
  return -jax.nn.log_sigmoid(m * logits).astype(jnp.float32)


def sigmoid_loss(zimg, ztxt, t, b):
  """SigLIP batch loss: Σ_ij ℓ(i, j) / n. zimg, ztxt: [n, d]. Returns a scalar."""
  return jnp.sum(sigmoid_pair_losses(zimg, ztxt, t, b)) / zimg.shape[0]


def softmax_logits(zimg, ztxt, t):
  """[n, m] CLIP logits t · X Yᵀ."""
  return t * (zimg @ ztxt.T)


def softmax_per_example_losses(zimg, ztxt, t):
  """[n] per-example CLIP losses: (CE image→text + CE text→image) / 2, positives on the diagonal.

  The softmax loss does not decompose into pairs; this is its per-example form, the
  analogue of the diagonal for independent selection.
  """
  logits = softmax_logits(zimg, ztxt, t)
  i2t = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  t2i = jax.nn.logsumexp(logits, axis=0) - jnp.diagonal(logits)
  return (0.5 * (i2t + t2i)).astype(jnp.float32)


def softmax_loss(zimg, ztxt, t):
  """CLIP batch loss: mean over examples of the symmetric cross-entropy."""
  return jnp.mean(softmax_per_example_losses(zimg, ztxt, t))


def contrastive_loss(kind, zimg, ztxt, t, b):
  """The batch loss named by config.loss: 'sigmoid' | 'softmax'."""
  if kind == "sigmoid":
    return sigmoid_loss(zimg, ztxt, t, b)
  if kind == "softmax":
    return softmax_loss(zimg, ztxt, t)
  raise ValueError(f"config.loss={kind!r}: choose 'sigmoid' or 'softmax'")


# ---------------------------------------------------------------------------------------
# Distillation from the reference (config.distill; ACED, open_clip's DistillClipLoss).
# The teacher's logits are its own: t* · X* Y*ᵀ (+ b*) in its embedding space, so a
# reference wider than the learner works. Scaled by τ² (Hinton et al.) so the gradient's
# size does not shrink as τ grows.

DISTILL_KINDS = ("softmax", "sigmoid")


def distilling(config) -> bool:
  """Whether the run's loss has the distillation term (config.distill.weight > 0)."""
  return config.distill.weight > 0


def softmax_distill_loss(student_logits, teacher_logits, temperature):
  """τ² · ½ (KL image→text + KL text→image): per row (column) of the batch's logits, the
  KL divergence KL(softmax(teacher/τ) ‖ softmax(student/τ)), averaged over rows."""
  s = student_logits.astype(jnp.float32) / temperature
  t = teacher_logits.astype(jnp.float32) / temperature

  def kl(axis):
    log_p, log_q = jax.nn.log_softmax(t, axis=axis), jax.nn.log_softmax(s, axis=axis)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis))

  return temperature ** 2 * 0.5 * (kl(1) + kl(0))


def sigmoid_distill_loss(student_logits, teacher_logits, temperature):
  """τ² · Σ_ij KL(Bernoulli(σ(teacher_ij/τ)) ‖ Bernoulli(σ(student_ij/τ))) / n: SigLIP's
  pairs, each a binary match/no-match, normalised by the batch size as the sigmoid loss."""
  s = student_logits.astype(jnp.float32) / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  p = jax.nn.sigmoid(t)
  # KL(p ‖ q) for q = σ(s): p·(log p − log q) + (1−p)·(log(1−p) − log(1−q)).
  kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
        + (1 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
  return temperature ** 2 * jnp.sum(kl) / s.shape[0]


def distill_loss(kind, student, teacher, temperature):
  """The distillation term named by config.distill.kind. `student`, `teacher`: (zimg, ztxt,
  t, b) of the same B pairs, each in its own embedding space; the softmax kind ignores b."""
  (zs_img, zs_txt, ts, bs), (zt_img, zt_txt, tt, bt) = student, teacher
  if kind == "softmax":
    return softmax_distill_loss(softmax_logits(zs_img, zs_txt, ts),
                                softmax_logits(zt_img, zt_txt, tt), temperature)
  if kind == "sigmoid":
    return sigmoid_distill_loss(softmax_logits(zs_img, zs_txt, ts) + bs,
                                softmax_logits(zt_img, zt_txt, tt) + bt, temperature)
  raise ValueError(f"config.distill.kind={kind!r}: choose one of {', '.join(DISTILL_KINDS)}")
