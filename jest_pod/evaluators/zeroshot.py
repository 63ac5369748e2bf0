"""Zero-shot classification: class names × prompt templates → text classifier → top-k accuracy.

Metrics: `z/0shot/<set>_top1`, `z/0shot/<set>_top5`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jest_pod.evaluators import common


class ZeroShotEvaluator(common.Evaluator):
  """Zero-shot top-k accuracy on a labelled set (see `common.Evaluator` for shared args).

  Extra args:
    class_names: list, or a .txt (one per line) / .json file; default: manifest `class_names`.
    templates: prompt templates with one `{}` (default `common.DEFAULT_TEMPLATES`).
    tokenize_fn: optional texts → int32 [n, L] replacing the sentencepiece tokenizer.
    ks: which top-k to report.
  """

  def __init__(self, name: str, data_dir: str, model: Any, mesh, *,
               class_names: Any = None, templates: Sequence[str] | None = None,
               tokenize_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
               ks: Sequence[int] = common.ZEROSHOT_KS, **kwargs):
    super().__init__(name, data_dir, model, mesh, **kwargs)
    self.class_names = common.load_class_names(class_names, data_dir, self.set_name)
    self.templates = tuple(templates or common.DEFAULT_TEMPLATES)
    bad = [t for t in self.templates if "{}" not in t]
    if bad:
      raise ValueError(f"zero-shot {name!r}: templates without a '{{}}' slot: {bad}")
    self.ks = tuple(ks)
    if tokenize_fn is None:
      if not self.tokenizer or not self.max_text_len:
        raise ValueError(f"zero-shot {name!r}: needs tokenizer and max_text_len (or tokenize_fn)")
      tokenize_fn = common.sentencepiece_tokenizer(self.tokenizer, self.max_text_len)
    self._tokenize = tokenize_fn
    # Prompts are fixed: tokenise once, embed on every run (the text tower changes).
    prompts = [t.format(c) for c in self.class_names for t in self.templates]
    self._prompt_tokens = np.asarray(self._tokenize(prompts), np.int32)     # [C*T, L]
    self._encode_image = common.encode_fn_for(model, image=True, text=False,
                                              patch_size=self.patch_size)
    self._encode_text = common.encode_fn_for(model, image=False, text=True)

  def classifier(self, params: Any, should_stop=None) -> np.ndarray:
    """Class embeddings [C, d]: prompt embeddings averaged over templates, re-normalised."""
    emb = common.embed_batches(
        self._encode_text, params,
        common.array_batches({"text": self._prompt_tokens}, self.batch_size),
        self.mesh, device_keys=("text",), should_stop=should_stop)["text"]
    return common.class_embeddings(emb.reshape(len(self.class_names), len(self.templates), -1))

  def evaluate(self, params, should_stop=None):
    class_emb = self.classifier(params, should_stop)
    got = common.embed_batches(self._encode_image, params, self.batches(), self.mesh,
                               device_keys=("image",), host_keys=("label",),
                               should_stop=should_stop)
    labels = got["label"].astype(np.int64)
    known = labels >= 0
    if not known.any():
      raise common.EvalDataError(
          f"zero-shot on {self.set_name!r} ({self.data_dir}): no record has a label "
          "(all label = -1); zero-shot needs a labelled set")
    n_classes = len(self.class_names)
    if labels.max() >= n_classes:
      raise common.EvalDataError(
          f"zero-shot on {self.set_name!r}: label {labels.max()} but only {n_classes} "
          "class names; the class_names list does not match this set")
    acc = common.zeroshot_accuracy(got["image"][known], class_emb, labels[known], self.ks)
    metrics = {f"z/0shot/{self.set_name}_{k}": v for k, v in acc.items()}
    arrays = {"image": got["image"], "label": labels, "class_text": class_emb}
    return metrics, arrays
