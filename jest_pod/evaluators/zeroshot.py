"""Zero-shot classification: class names × prompt templates → text classifier → top-k accuracy.

Metrics: `z/0shot/<set>_top1`, `z/0shot/<set>_top5`. Ties rank the true class below
the classes it ties with (`metrics._ranks_of`), so a model whose embeddings are all equal
scores 0, not 100%; NaN or infinite embeddings are an error (`metrics.NonFiniteEmbeddings`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jest_pod import embed
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.evaluators import base, metrics

# big_vision / CLIP style prompt ensemble; short on purpose (each template costs one text
# forward per class name).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)


def load_class_names(spec: Any, manifest: Mapping, data_dir: str, set_name: str) -> list[str]:
  """Class names from `spec` (a list, or a .json/.txt file path) or the set's manifest."""
  if spec:
    if isinstance(spec, str):
      if not os.path.isfile(spec):
        raise metrics.EvalDataError(
            f"zero-shot on {set_name!r}: class_names file {spec!r} not found")
      with open(spec) as f:
        text = f.read()
      names = json.loads(text) if spec.endswith(".json") else text.splitlines()
      if isinstance(names, Mapping):
        names = names.get("class_names", [])
      names = [str(n).strip() for n in names if str(n).strip()]
    else:
      names = [str(n) for n in spec]
  else:
    names = list(manifest.get("class_names") or [])
  if not names:
    raise metrics.EvalDataError(
        f"zero-shot on {set_name!r} ({data_dir}): no class names; the manifest.json has no "
        "'class_names' and none were given (evals.<name>.class_names = list or file). "
        "Zero-shot needs a labelled set; use a retrieval evaluator for a captions-only set.")
  return names


class ZeroShotEvaluator(base.Evaluator):
  """Zero-shot top-k accuracy on a labelled set (see `base.Evaluator` for shared args).

  Extra args:
    class_names: list, or a .txt (one per line) / .json file; default: manifest `class_names`.
    templates: prompt templates with one `{}` (default `DEFAULT_TEMPLATES`).
    tokenize_fn: optional texts → int32 [n, L] replacing the sentencepiece tokenizer.
    ks: which top-k to report.
  """

  CONFIG_KEYS = ("class_names", "templates")
  TOKENIZES_TEXT = True
  KEY_PREFIX = "z/0shot/"
  METRICS = tuple(f"top{k}" for k in metrics.ZEROSHOT_KS)
  HEADLINE, HEADLINE_LABEL = ("top1",), "{set} top-1"

  @classmethod
  def claims(cls, manifest, given):
    # Labels whose classes have names: what zero-shot needs (a captions-only set has none).
    return bool(manifest.get("class_names") or given.get("class_names"))

  def __init__(self, name: str, data_dir: str, model: Any, mesh, *,
               class_names: Any = None, templates: Sequence[str] | None = None,
               tokenize_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
               ks: Sequence[int] = metrics.ZEROSHOT_KS, **kwargs):
    super().__init__(name, data_dir, model, mesh, **kwargs)
    self.class_names = load_class_names(class_names, self.manifest, data_dir, self.set_name)
    self.templates = tuple(templates or DEFAULT_TEMPLATES)
    bad = [t for t in self.templates if "{}" not in t]
    if bad:
      raise ValueError(f"zero-shot {name!r}: templates without a '{{}}' slot: {bad}")
    self.ks = tuple(ks)
    if tokenize_fn is None:
      if not self.tokenizer or not self.max_text_len:
        raise ValueError(f"zero-shot {name!r}: needs tokenizer and max_text_len (or tokenize_fn)")
      # The data pipeline's own tokenizer: prompts are tokenised exactly like captions.
      tok, max_len = tokenizer_lib.resolve(None, self.tokenizer), self.max_text_len
      tokenize_fn = lambda texts: tok.encode_batch(list(texts), max_len)
    self._tokenize = tokenize_fn
    # Prompts are fixed: tokenise once, embed on every run (the text tower changes).
    prompts = [t.format(c) for c in self.class_names for t in self.templates]
    self._prompt_tokens = np.asarray(self._tokenize(prompts), np.int32)     # [C*T, L]
    self._encode_image = embed.encode_fn_for(model, image=True, text=False,
                                             patch_size=self.patch_size)
    self._encode_text = embed.encode_fn_for(model, image=False, text=True)

  def classifier(self, params: Any, should_stop=None) -> np.ndarray:
    """Class embeddings [C, d]: prompt embeddings averaged over templates, re-normalised.
    Every host embeds its share of the prompts and gets all of them back."""
    emb = self.embed(
        self._encode_text, params,
        embed.array_batches({"text": self._prompt_tokens}, self.host_batch_size),
        device_keys=("text",), should_stop=should_stop)["text"]
    return metrics.class_embeddings(emb.reshape(len(self.class_names), len(self.templates), -1))

  def evaluate(self, params, should_stop=None):
    class_emb = self.classifier(params, should_stop)
    got = self.embed(self._encode_image, params, self.batches(), device_keys=("image",),
                     host_keys=("label",), should_stop=should_stop)
    # A broken model gets an error, not a score (NaN ties with everything).
    metrics.check_finite(f"zero-shot on {self.set_name!r} ({self.data_dir})",
                         image=got["image"], class_text=class_emb)
    labels = got["label"].astype(np.int64)
    known = labels >= 0
    if not known.any():
      raise metrics.EvalDataError(
          f"zero-shot on {self.set_name!r} ({self.data_dir}): no record has a label "
          "(all label = -1); zero-shot needs a labelled set")
    n_classes = len(self.class_names)
    if labels.max() >= n_classes:
      raise metrics.EvalDataError(
          f"zero-shot on {self.set_name!r}: label {labels.max()} but only {n_classes} "
          "class names; the class_names list does not match this set")
    acc = metrics.zeroshot_accuracy(got["image"][known], class_emb, labels[known], self.ks)
    scores = {self.metric_key(self.set_name, k): v for k, v in acc.items()}
    arrays = {"image": got["image"], "label": labels, "class_text": class_emb}
    return scores, arrays
