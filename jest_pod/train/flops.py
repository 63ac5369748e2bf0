"""An analytic FLOP model of a step, so runs compare per FLOP, scoring included.

Counts multiply-adds × 2 of the matmuls (patch embedding, attention projections and
scores, MLPs, heads, the loss's pair matrix); layer norms and softmaxes are ignored
(< 1% at these widths). Backward ≈ 2 × forward. `jest-pod bench step` compares this
model with XLA's own count of the compiled step.
"""

from __future__ import annotations

from jest_pod import config as config_lib
from jest_pod.jest import selection
from jest_pod.models.flops import example_forward_flops, image_forward_flops, text_forward_flops


def step_flops(config, *, reference_example_flops: float | None = None,
               reference_dim: int | None = None) -> dict[str, float]:
  """FLOPs of one training step by part: train (fwd+bwd over B at the Flexi split),
  scoring (learner forward over N at the scoring patch), reference (forward over N:
  always charged, also when its rows come from a cache — `run_flops` subtracts it for the
  amortised view), selection (pair blocks of the models the score uses: N rows × the
  B − c examples of the first n_chunks − 1 chunks, each added to the conditional scores
  once). `reference_example_flops`: θ*'s forward FLOPs per example (`Reference
  .example_flops`) and embedding width; None counts the learner's own towers (where no
  reference is at hand)."""
  mc, size, text_len = config.model, config.model.image_size, config.input.max_text_len
  b, d = config.batch_size, mc.embed_dim
  out = {"train": 0.0, "scoring": 0.0, "reference": 0.0, "selection": 0.0}
  for p, frac in zip(config_lib.train_patch_sizes(config), config.flexi.train_fractions):
    out["train"] += 3 * frac * b * image_forward_flops(mc, size, p)
  out["train"] += 3 * (b * text_forward_flops(mc, text_len) + 2 * b * b * d)
  s = config.selection
  if s.method != "uniform":
    n = config_lib.num_super_batch(config)
    learner, reference = selection.uses_models(s.score)
    if learner:
      out["scoring"] = n * example_forward_flops(mc, size, config_lib.score_patch_size(config),
                                                 text_len)
    if reference:
      if reference_example_flops is None:
        reference_example_flops = example_forward_flops(mc, size, mc.image["patch_size"],
                                                        text_len)
      out["reference"] = n * reference_example_flops
    # Each model scores pairs in its own embedding space (widths may differ).
    widths = [d] * learner + [reference_dim or d] * reference
    per_pair = sum(2 * w * 2 for w in widths)  # x_k·y_j and x_j·y_k for each model
    diagonal = sum(n * w * 2 for w in widths)  # L_kk, all that independent selection needs
    conditioned = b - b // s.n_chunks  # the last chunk conditions nothing
    out["selection"] = diagonal + (n * conditioned * per_pair if s.method == "joint" else 0)
  out["total"] = sum(out.values())
  return out


def run_flops(config, reference=None) -> dict:
  """A run's FLOPs per step in two views, and the cache's one-time cost. `charged`: the
  reference's forward pass counted on every scored example (the paper's accounting);
  `amortised`: reference rows read from a cache built once (its cost reported once).
  `reference`: the run's `jest.reference.Reference`, or None."""
  parts = step_flops(config, **({} if reference is None else dict(
      reference_example_flops=reference.example_flops, reference_dim=reference.dim)))
  cached = reference is not None and reference.cached
  return {"charged": parts["total"],
          "amortised": parts["total"] - (parts["reference"] if cached else 0.0),
          "parts": parts,
          "reference_cache_one_time": reference.one_time_flops if cached else 0.0}
