"""Image-text retrieval: image→text and text→image recall@1/5/10 on a captioned set.

Metrics: `z/retr/<set>_img2txt_recall@K`, `z/retr/<set>_txt2img_recall@K`.

One record is one (image, caption) pair. A set that stores an image once per caption
(several records with identical pixels) is scored as one image with several captions:
records are grouped by a digest of their decoded pixels, so an image is a hit when any of
its captions is retrieved, and duplicate images do not compete with each other. Likewise
records with identical captions (identical tokens) form one caption text: a text→image
query is a hit on any image carrying that text, and an image→text query on any copy of it.
Ties rank the correct item below the wrong ones it ties with (`metrics._ranks_of`), and
NaN or infinite embeddings are an error (`metrics.NonFiniteEmbeddings`), never a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jest_pod import embed
from jest_pod.evaluators import base, metrics


class RetrievalEvaluator(base.Evaluator):
  """Recall@k both ways (see `base.Evaluator` for shared args).

  Extra args:
    ks: recall cut-offs.
    group_identical_images: score records with identical pixels as one image (default on).
    group_identical_captions: count identical captions as one text (default on).
  """

  CONFIG_KEYS = ("group_identical_images", "group_identical_captions")
  KEY_PREFIX = "z/retr/"
  METRICS = tuple(f"{d}_recall@{k}" for d in ("img2txt", "txt2img") for k in metrics.RETRIEVAL_KS)
  # Recall@5 both ways: at this project's scales recall@1 is a handful of hits, too coarse
  # to say when a run crosses a target.
  HEADLINE, HEADLINE_LABEL = ("img2txt_recall@5", "txt2img_recall@5"), "{set} R@5"

  def __init__(self, name: str, data_dir: str, model: Any, mesh, *,
               ks: Sequence[int] = metrics.RETRIEVAL_KS, group_identical_images: bool = True,
               group_identical_captions: bool = True, **kwargs):
    super().__init__(name, data_dir, model, mesh, **kwargs)
    self.ks = tuple(ks)
    self.group_identical_images = bool(group_identical_images)
    self.group_identical_captions = bool(group_identical_captions)
    self._encode = embed.encode_fn_for(model, image=True, text=True, patch_size=self.patch_size)

  def _with_digests(self, batches):
    """Each batch plus fixed-size columns for grouping, gathered from every host."""
    # An empty caption is all padding: 0, or </s> in the siglip text style.
    pad = getattr(self.tokenizer, "pad_id", 0)
    for batch in batches:
      text = np.asarray(batch["text"])
      extra = {"has_text": (text != pad).any(axis=1)}
      if self.group_identical_captions:  # identical tokens = identical model input
        extra["caption_digest"] = metrics.row_digests(text)
      if self.group_identical_images:
        extra["image_digest"] = metrics.row_digests(np.asarray(batch["image"]))
      yield {**batch, **extra}

  def evaluate(self, params, should_stop=None):
    keys = ("has_text",) + (("caption_digest",) if self.group_identical_captions else ()) + (
        ("image_digest",) if self.group_identical_images else ())
    got = self.embed(self._encode, params, self._with_digests(self.batches()),
                     device_keys=("image", "text"), host_keys=keys, should_stop=should_stop)
    # A broken model gets an error, not a score (NaN ties with everything).
    metrics.check_finite(f"retrieval on {self.set_name!r} ({self.data_dir})",
                         image=got["image"], text=got["text"])
    # An empty caption (all padding) has nothing to retrieve: leave it out, loudly if all are.
    has_text = got["has_text"].astype(bool)
    if self.group_identical_images:
      first, caption_to_image = metrics.group_identical(got["image_digest"])
      image_emb = got["image"][first]
    else:
      caption_to_image = np.arange(len(got["image"]))
      image_emb = got["image"]
    text_emb = got["text"][has_text]
    caption_to_image = caption_to_image[has_text]
    caption_group = (metrics.group_identical(got["caption_digest"])[1]
                     if self.group_identical_captions else np.arange(len(has_text)))[has_text]
    if len(text_emb) == 0:
      raise metrics.EvalDataError(
          f"retrieval on {self.set_name!r} ({self.data_dir}): no record has a caption")
    rec = metrics.retrieval_recall(image_emb, text_emb, caption_to_image, self.ks,
                                   caption_groups=caption_group)
    scores = {self.metric_key(self.set_name, k): v for k, v in rec.items()}
    arrays = {"image": image_emb, "text": text_emb, "caption_to_image": caption_to_image,
              "caption_group": caption_group}
    return scores, arrays
