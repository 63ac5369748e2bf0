"""An analytic FLOP model of a step, so runs compare per FLOP, scoring included.

Counts multiply-adds × 2 of the matmuls (patch embedding, attention projections and
scores, MLPs, heads, the loss's pair matrix); layer norms and softmaxes are ignored
(< 1% at these widths). Backward ≈ 2 × forward. `jest-pod bench step` compares this
model with XLA's own count of the compiled step.
"""

from __future__ import annotations

from jest_pod import config as config_lib
from jest_pod.models.flops import example_forward_flops, image_forward_flops, text_forward_flops


def step_flops(config, *, reference_example_flops: float | None = None,
               reference_dim: int | None = None,
               selecting: bool | None = None) -> dict[str, float]:
  """FLOPs of one training step by part: train (fwd+bwd over B at the Flexi split),
  scoring (learner forward over N at the scoring patch), reference (forward over N:
  always charged, also when its rows come from a cache — `run_flops` subtracts it for the
  amortised view), selection (pair blocks of the models the score uses: N rows × the
  B − c examples of the first n_chunks − 1 chunks, each added to the conditional scores
  once), distill (θ*'s logits of the trained batch, config.distill; its forward pass is
  in `reference`: over N when selecting, over B otherwise). `reference_example_flops`:
  θ*'s forward FLOPs per example (`Reference.example_flops`) and embedding width; None
  counts the learner's own towers (where no reference is at hand). `selecting`: whether
  this step selects (default: config.selection.method is not uniform; False for the
  uniform steps after config.selection.until)."""
  spec = config_lib.resolve(config)
  mc, size, text_len = config.model, spec.image_size, spec.text_len
  b, d = spec.batch_size, mc.embed_dim
  out = {"train": 0.0, "scoring": 0.0, "reference": 0.0, "selection": 0.0, "distill": 0.0}
  for p, frac in zip(spec.train_patches, spec.train_fractions):
    out["train"] += 3 * frac * b * image_forward_flops(mc, size, p)
  out["train"] += 3 * (b * text_forward_flops(mc, text_len) + 2 * b * b * d)
  s = config.selection
  selecting = spec.selecting if selecting is None else selecting
  distill = spec.distill
  learner, reference = spec.uses_models if selecting else (False, False)
  if (reference or distill) and reference_example_flops is None:
    reference_example_flops = example_forward_flops(mc, size, mc.image["patch_size"],
                                                    text_len)
  if distill:
    out["distill"] = 2 * b * b * (reference_dim or d)
    out["reference"] = b * reference_example_flops  # over N below when selecting
  if selecting:
    n = spec.super_batch
    if learner:
      out["scoring"] = n * example_forward_flops(mc, size, spec.score_patch, text_len)
    if reference or distill:
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
  `reference`: the run's `jest.reference.Reference`, or None. With early-only selection
  (config.selection.until < 1) the steps after `selecting_steps` cost `after_selection`
  each; `total_flops` sums the two phases."""
  kw = {} if reference is None else dict(reference_example_flops=reference.example_flops,
                                         reference_dim=reference.dim)
  cached = reference is not None and reference.cached

  def views(parts):
    return {"charged": parts["total"],
            "amortised": parts["total"] - (parts["reference"] if cached else 0.0),
            "parts": parts}

  out = views(step_flops(config, **kw))
  out["reference_cache_one_time"] = reference.one_time_flops if cached else 0.0
  spec = config_lib.resolve(config)
  out["selecting_steps"] = spec.selection_steps
  if spec.selecting and spec.selection_steps < config.total_steps:
    out["after_selection"] = views(step_flops(config, selecting=False, **kw))
  return out


def total_flops(flops: dict, steps: int, view: str) -> float:
  """FLOPs of a run's first `steps` steps in `view` (charged | amortised), from
  `run_flops`: the selecting steps at their cost, the uniform ones after them at theirs."""
  after = flops.get("after_selection")
  if after is None:
    return steps * flops[view]
  k = min(steps, flops["selecting_steps"])
  return k * flops[view] + (steps - k) * after[view]
