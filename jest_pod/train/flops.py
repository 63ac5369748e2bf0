"""An analytic FLOP model of a step, so runs compare per FLOP, scoring included.

Counts multiply-adds × 2 of the matmuls (patch embedding, attention projections and
scores, MLPs, heads, the loss's pair matrix); layer norms and softmaxes are ignored
(< 1% at these widths). Backward ≈ 2 × forward. `jest-pod bench step` compares this
model with XLA's own count of the compiled step.
"""

from __future__ import annotations

from jest_pod.models.flops import example_forward_flops, image_forward_flops, text_forward_flops


def step_flops(config, reference_config=None, *,
               reference_example_flops: float | None = None) -> dict[str, float]:
  """FLOPs of one training step by part: train (fwd+bwd over B at the Flexi split),
  scoring (learner forward over N at the scoring patch), reference (forward over N:
  always charged, also when its rows come from a cache — the caller subtracts it for the
  amortised view), selection (pair blocks of the models the score uses: N rows × the
  B − c examples of the first n_chunks − 1 chunks, each added to the conditional scores
  once). `reference_example_flops` overrides the reference's per-example forward cost
  (known from a cache's metadata when no reference config is at hand)."""
  from jest_pod.config import num_super_batch, score_patch_size, train_patch_sizes  # pylint: disable=g-import-not-at-top
  from jest_pod.jest.step import uses_models  # pylint: disable=g-import-not-at-top
  mc, size, text_len = config.model, config.model.image_size, config.input.max_text_len
  b, d = config.batch_size, mc.embed_dim
  out = {"train": 0.0, "scoring": 0.0, "reference": 0.0, "selection": 0.0}
  for p, frac in zip(train_patch_sizes(config), config.flexi.train_fractions):
    out["train"] += 3 * frac * b * image_forward_flops(mc, size, p)
  out["train"] += 3 * (b * text_forward_flops(mc, text_len) + 2 * b * b * d)
  s = config.selection
  if s.method != "uniform":
    n = num_super_batch(config)
    learner, reference = uses_models(s.score)
    if learner:
      out["scoring"] = n * example_forward_flops(mc, size, score_patch_size(config), text_len)
    if reference:
      if reference_example_flops is None:
        rc = reference_config or config
        reference_example_flops = example_forward_flops(
            rc.model, rc.model.image_size, rc.model.image["patch_size"], text_len)
      out["reference"] = n * reference_example_flops
    models = int(learner) + int(reference)
    per_pair = 2 * d * 2 * models  # x_k·y_j and x_j·y_k for each model
    diagonal = n * d * 2 * models  # L_kk, all that independent selection needs
    conditioned = b - b // s.n_chunks  # the last chunk conditions nothing
    out["selection"] = diagonal + (n * conditioned * per_pair if s.method == "joint" else 0)
  out["total"] = sum(out.values())
  return out
