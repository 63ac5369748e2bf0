"""Image-text retrieval: image→text and text→image recall@1/5/10 on a captioned set.

Metrics: `z/retr/<set>_img2txt_recall@K`, `z/retr/<set>_txt2img_recall@K`.

One record is one (image, caption) pair. A set that stores an image once per caption
(several records with identical pixels) is scored as one image with several captions:
records are grouped by a digest of their decoded pixels, so an image is a hit when any of
its captions is retrieved, and duplicate images do not compete with each other. Likewise
records with identical captions (identical tokens) form one caption text: a text→image
query is a hit on any image carrying that text, and an image→text query on any copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jest_pod.evaluators import common


class RetrievalEvaluator(common.Evaluator):
  """Recall@k both ways (see `common.Evaluator` for shared args).

  Extra args:
    ks: recall cut-offs.
    group_identical_images: score records with identical pixels as one image (default on).
    group_identical_captions: count identical captions as one text (default on).
  """

  def __init__(self, name: str, data_dir: str, model: Any, mesh, *,
               ks: Sequence[int] = common.RETRIEVAL_KS, group_identical_images: bool = True,
               group_identical_captions: bool = True, **kwargs):
    super().__init__(name, data_dir, model, mesh, **kwargs)
    self.ks = tuple(ks)
    self.group_identical_images = bool(group_identical_images)
    self.group_identical_captions = bool(group_identical_captions)
    self._encode = common.encode_fn_for(model, image=True, text=True, patch_size=self.patch_size)

  def evaluate(self, params, should_stop=None):
    digests: list[bytes] = []
    captions: list[bytes] = []
    nonempty: list[np.ndarray] = []

    def note_images(batch, real):
      text = np.asarray(batch["text"])[real]
      nonempty.append((text != 0).any(axis=1))
      if self.group_identical_captions:  # identical tokens = identical model input
        captions.extend(np.ascontiguousarray(t).tobytes() for t in text)
      if self.group_identical_images:
        digests.extend(common.image_digests(np.asarray(batch["image"])[real]))

    got = common.embed_batches(self._encode, params, self.batches(), self.mesh,
                               device_keys=("image", "text"), on_host_batch=note_images,
                               should_stop=should_stop)
    # An empty caption (all padding) has nothing to retrieve: leave it out, loudly if all are.
    has_text = np.concatenate(nonempty)
    if self.group_identical_images:
      first, caption_to_image = common.group_identical(digests)
      image_emb = got["image"][first]
    else:
      caption_to_image = np.arange(len(got["image"]))
      image_emb = got["image"]
    text_emb = got["text"][has_text]
    caption_to_image = caption_to_image[has_text]
    caption_group = (common.group_identical(captions)[1] if self.group_identical_captions
                     else np.arange(len(has_text)))[has_text]
    if len(text_emb) == 0:
      raise common.EvalDataError(
          f"retrieval on {self.set_name!r} ({self.data_dir}): no record has a caption")
    rec = common.retrieval_recall(image_emb, text_emb, caption_to_image, self.ks,
                                  caption_groups=caption_group)
    metrics = {f"z/retr/{self.set_name}_{k}": v for k, v in rec.items()}
    arrays = {"image": image_emb, "text": text_emb, "caption_to_image": caption_to_image,
              "caption_group": caption_group}
    return metrics, arrays
