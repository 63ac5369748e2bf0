"""Metric maths on host arrays: zero-shot accuracy, retrieval recall, grouping of identical
images and captions, and the order metrics are shown in.

Pure numpy, so tests call it with planted embeddings; the evaluators feed it the rows of
every host (`jest_pod.embed.embed_batches`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)
# Cosines closer than this tie: identical embeddings can differ by float32 rounding once
# multiplied (BLAS sums columns in different orders), and must still tie.
TIE_TOL = 1e-6


class EvalDataError(ValueError):
  """An eval data set lacks what an evaluator needs (labels, class names, captions)."""


class NonFiniteEmbeddings(EvalDataError):
  """A model gave NaN or infinite embeddings: its parameters are broken, and no score is
  given (a NaN compares as neither higher nor lower, so it would rank as a tie)."""


def check_finite(where: str, **arrays: np.ndarray) -> None:
  """NonFiniteEmbeddings naming `where` and the first array holding NaN or inf."""
  for name, x in arrays.items():
    bad = ~np.isfinite(np.asarray(x, np.float32)).all(axis=-1)
    if bad.any():
      raise NonFiniteEmbeddings(
          f"{where}: {int(bad.sum())} of {len(bad)} {name} embeddings are NaN or infinite, so "
          "the model's parameters are broken (a diverged or damaged checkpoint); no score is "
          "given. Evaluate an earlier step (--step) or a checkpoint that trained cleanly")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows of x [n, d] scaled to unit L2 norm (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def class_embeddings(prompt_embeddings: np.ndarray) -> np.ndarray:
  """Text embeddings of every (class, template) prompt [C, T, d] → class embeddings [C, d].

  Each prompt embedding is normalised, averaged over the T templates, and the mean is
  re-normalised (CLIP's prompt ensembling).
  """
  e = l2_normalize(prompt_embeddings)
  return l2_normalize(e.mean(axis=1))


def _ranks_of(sims: np.ndarray, own: np.ndarray) -> np.ndarray:
  """Pessimistic rank of each row's best own candidate: sims [n, m], own bool [n, m] → [n].

  The rank counts the other candidates scoring at least as high as the best own one, so a
  tie ranks the correct item BELOW the others it ties with: a model whose embeddings are
  all equal (zero weights) ranks every target last and scores 0, never 100%. Candidates
  that are themselves correct (another caption of the image, an identical text) do not
  count; scores within TIE_TOL tie. Inputs must be finite (`check_finite`): NaN would tie
  with nothing.
  """
  best = np.where(own, sims, -np.inf).max(axis=1)
  return np.sum((sims >= best[:, None] - TIE_TOL) & ~own, axis=1)


def zeroshot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                      ks: Sequence[int] = ZEROSHOT_KS) -> dict[str, float]:
  """Top-k accuracy of argmax_c image·class similarity.

  Args:
    image_emb: [n, d] image embeddings (normalised or not: cosine is used).
    class_emb: [C, d] class embeddings.
    labels: [n] int class index of each image, in [0, C).
    ks: which top-k to report (k > C counts every image correct).
  Returns:
    {"top1": acc, "top5": acc, ...}, fractions in [0, 1]. Ties are pessimistic: an image
    is a top-k hit only when fewer than k other classes score at least as high as its own
    (`_ranks_of`), so equal scores never count as hits.
  Raises:
    NonFiniteEmbeddings when an embedding holds NaN or inf.
  """
  labels = np.asarray(labels, np.int64)
  if len(labels) == 0:
    raise EvalDataError("zero-shot: no labelled images to score")
  check_finite("zero-shot", image=image_emb, class_text=class_emb)
  sims = l2_normalize(image_emb) @ l2_normalize(class_emb).T                    # [n, C]
  own = np.zeros(sims.shape, bool)
  own[np.arange(len(labels)), labels] = True
  ranks = _ranks_of(sims, own)
  return {f"top{k}": float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray,
                     caption_to_image: np.ndarray | None = None,
                     ks: Sequence[int] = RETRIEVAL_KS,
                     block: int = 4096,
                     caption_groups: np.ndarray | None = None) -> dict[str, float]:
  """Image→text and text→image recall@k; an image may have several captions.

  Args:
    image_emb: [n_img, d] image embeddings.
    text_emb: [n_txt, d] caption embeddings.
    caption_to_image: [n_txt] int, the image index of each caption (None: identity,
      which needs n_txt == n_img).
    ks: recall cut-offs.
    block: rows of the similarity matrix held at once (memory O(block × max(n_img, n_txt))).
    caption_groups: [n_txt] int, equal for identical caption texts (None: all distinct).
  Returns:
    {"img2txt_recall@k": r, "txt2img_recall@k": r, ...}. img2txt: an image is a hit when
    any of its captions, or a caption identical to one, is in its top k; images without
    captions are left out. txt2img: a caption is a hit when its image, or an image with an
    identical caption, is in its top k. Ties are pessimistic (`_ranks_of`): a wrong item
    scoring exactly as high as the best correct one ranks above it.
  Raises:
    NonFiniteEmbeddings when an embedding holds NaN or inf.
  """
  check_finite("retrieval", image=image_emb, text=text_emb)
  img = l2_normalize(image_emb)
  txt = l2_normalize(text_emb)
  n_img, n_txt = len(img), len(txt)
  if caption_to_image is None:
    if n_img != n_txt:
      raise ValueError(f"retrieval: {n_img} images and {n_txt} captions need caption_to_image")
    caption_to_image = np.arange(n_txt)
  c2i = np.asarray(caption_to_image, np.int64)
  if c2i.shape != (n_txt,) or (n_txt and (c2i.min() < 0 or c2i.max() >= n_img)):
    raise ValueError(f"retrieval: caption_to_image must be [{n_txt}] ints in [0, {n_img})")

  groups = np.arange(n_txt) if caption_groups is None else np.asarray(caption_groups)
  if groups.shape != (n_txt,):
    raise ValueError(f"retrieval: caption_groups must be [{n_txt}] ints")
  groups = np.unique(groups, return_inverse=True)[1].reshape(-1)                # 0..G-1
  n_groups = int(groups.max()) + 1 if n_txt else 0
  # (caption group, image) pairs: image i holds group g when one of its captions is in g.
  pairs = np.unique(np.stack([groups, c2i], axis=1), axis=0) if n_txt else np.zeros((0, 2), int)
  pair_group, pair_image = pairs[:, 0], pairs[:, 1]

  # txt2img: rank of the best-scoring image holding the caption's text, among all images.
  t2i_rank = np.empty(n_txt, np.int64)
  for s in range(0, n_txt, block):
    sims = txt[s:s + block] @ img.T                                             # [b, n_img]
    uniq, inv = np.unique(groups[s:s + block], return_inverse=True)
    sel = np.isin(pair_group, uniq)
    holds = np.zeros((len(uniq), n_img), bool)
    holds[np.searchsorted(uniq, pair_group[sel]), pair_image[sel]] = True
    t2i_rank[s:s + block] = _ranks_of(sims, holds[inv.reshape(-1)])

  # img2txt: rank of each image's best-scoring own caption (or an identical text) among all.
  has_caption = np.zeros(n_img, bool)
  has_caption[c2i] = True
  i2t_rank = np.empty(n_img, np.int64)
  for s in range(0, n_img, block):
    sims = img[s:s + block] @ txt.T                                             # [b, n_txt]
    sel = (pair_image >= s) & (pair_image < s + len(sims))
    holds = np.zeros((len(sims), n_groups), bool)
    holds[pair_image[sel] - s, pair_group[sel]] = True
    i2t_rank[s:s + block] = _ranks_of(sims, holds[:, groups])
  i2t_rank = i2t_rank[has_caption]

  out = {}
  for k in ks:
    out[f"img2txt_recall@{k}"] = float(np.mean(i2t_rank < k)) if len(i2t_rank) else 0.0
    out[f"txt2img_recall@{k}"] = float(np.mean(t2i_rank < k)) if n_txt else 0.0
  return out


def group_identical(rows: Sequence[bytes] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Group equal rows (byte strings, or the rows of an array such as `row_digests`):
  returns (first index of each group [g], group of each row [n]).

  Used to turn "one record = one (image, caption)" into "one image, several captions"
  when a set repeats an image under several captions.
  """
  if isinstance(rows, np.ndarray):
    rows = [np.ascontiguousarray(r).tobytes() for r in rows]
  first, group, seen = [], np.empty(len(rows), np.int64), {}
  for i, r in enumerate(rows):
    g = seen.setdefault(r, len(first))
    if g == len(first):
      first.append(i)
    group[i] = g
  return np.asarray(first, np.int64), group


def row_digests(x: np.ndarray) -> np.ndarray:
  """[n, ...] (pixels, tokens) → uint8 [n, 16], equal rows ↔ equal digests: a small
  fixed-size column that can be gathered from every host."""
  x = np.asarray(x)
  return np.array([np.frombuffer(hashlib.blake2b(np.ascontiguousarray(r).tobytes(),
                                                 digest_size=16).digest(), np.uint8)
                   for r in x], np.uint8).reshape(len(x), 16)


# Metric names end in <set>_<family><k>: top1, img2txt_recall@10, ...
_METRIC_RE = re.compile(r"^(?P<kind>(?:.*/)?)(?P<set>.+)_(?P<family>[a-z0-9]+_recall@|top)"
                        r"(?P<k>\d+)$")


def _natural(text: str) -> tuple:
  return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
               for t in re.split(r"(\d+)", text) if t)


def metric_sort_key(name: str) -> tuple:
  """Order metrics by set, then evaluator and family, then k as a number (@5 before @10)."""
  m = _METRIC_RE.match(name)
  if not m:
    return (_natural(name), "", "", 0)
  return (_natural(m["set"]), m["kind"], m["family"], int(m["k"]))
