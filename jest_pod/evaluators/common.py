"""Shared evaluator machinery: embed a data set over the mesh, metric math, config helpers.

The math (`zeroshot_accuracy`, `retrieval_recall`, `class_embeddings`) is pure numpy on
host arrays, so tests call it with planted embeddings. `embed_batches` is the only part
that touches devices: it shards each eval batch over the mesh's data axes, runs a jitted
encode function, and brings the embeddings back to the host with the padding dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

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

RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)


class EvalDataError(ValueError):
  """An eval data set lacks what an evaluator needs (labels, class names, captions)."""


class EvalInterrupted(Exception):
  """`should_stop()` returned True between eval batches (e.g. the trainer was preempted)."""


# ---------------------------------------------------------------------------- metric math


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


def _ranks_of(sims: np.ndarray, target_scores: np.ndarray) -> np.ndarray:
  """How many candidates score strictly higher than the target: sims [n, m], target [n] → [n].

  Ties count in the target's favour, so planted ties do not depend on argsort order.
  """
  return np.sum(sims > target_scores[:, None], axis=1)


def zeroshot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                      ks: Sequence[int] = ZEROSHOT_KS) -> dict[str, float]:
  """Top-k accuracy of argmax_c image·class similarity.

  Args:
    image_emb: [n, d] image embeddings (normalised or not: cosine is used).
    class_emb: [C, d] class embeddings.
    labels: [n] int class index of each image, in [0, C).
    ks: which top-k to report (k > C counts every image correct).
  Returns:
    {"top1": acc, "top5": acc, ...}, fractions in [0, 1].
  """
  labels = np.asarray(labels, np.int64)
  if len(labels) == 0:
    raise EvalDataError("zero-shot: no labelled images to score")
  sims = l2_normalize(image_emb) @ l2_normalize(class_emb).T                    # [n, C]
  ranks = _ranks_of(sims, sims[np.arange(len(labels)), labels])
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
    identical caption, is in its top k.
  """
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
    own = np.where(holds[inv.reshape(-1)], sims, -np.inf).max(axis=1)
    t2i_rank[s:s + block] = _ranks_of(sims, own)

  # img2txt: rank of each image's best-scoring own caption (or an identical text) among all.
  has_caption = np.zeros(n_img, bool)
  has_caption[c2i] = True
  i2t_rank = np.empty(n_img, np.int64)
  for s in range(0, n_img, block):
    sims = img[s:s + block] @ txt.T                                             # [b, n_txt]
    sel = (pair_image >= s) & (pair_image < s + len(sims))
    holds = np.zeros((len(sims), n_groups), bool)
    holds[pair_image[sel] - s, pair_group[sel]] = True
    own = np.where(holds[:, groups], sims, -np.inf)
    i2t_rank[s:s + block] = _ranks_of(sims, own.max(axis=1))
  i2t_rank = i2t_rank[has_caption]

  out = {}
  for k in ks:
    out[f"img2txt_recall@{k}"] = float(np.mean(i2t_rank < k)) if len(i2t_rank) else 0.0
    out[f"txt2img_recall@{k}"] = float(np.mean(t2i_rank < k)) if n_txt else 0.0
  return out


def group_identical(rows: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Group equal byte strings: returns (first index of each group [g], group of each row [n]).

  Used to turn "one record = one (image, caption)" into "one image, several captions"
  when a set repeats an image under several captions.
  """
  first, group, seen = [], np.empty(len(rows), np.int64), {}
  for i, r in enumerate(rows):
    g = seen.setdefault(r, len(first))
    if g == len(first):
      first.append(i)
    group[i] = g
  return np.asarray(first, np.int64), group


def image_digests(images: np.ndarray) -> list[bytes]:
  """[b, H, W, 3] pixels → a digest per image (identical pixels ↔ identical digest)."""
  return [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
          for im in images]


# ---------------------------------------------------------------------- embedding on mesh


def data_axes_of(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """Mesh axes the eval batch is sharded over: those of training (`sharding.DATA_AXES`),
  or every axis of a mesh that has none of them (e.g. an ad-hoc eval mesh)."""
  from jest_pod import sharding  # pylint: disable=import-outside-toplevel
  return sharding.data_axes(mesh) or tuple(mesh.axis_names)


def params_on_mesh(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """Leaves already laid out on `mesh`'s devices stay; others are replicated onto it.

  A checkpoint restored on another mesh, or host numpy params, would otherwise make the
  jitted encode fail with "incompatible devices".
  """
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, replicated)
  return jax.tree.map(place, params)


def _check_single_process():
  # Host-side gathering (labels, pixel digests) is per process; a multi-host run would
  # score only its own rows. Fail at set-up, not hours into a run.
  if jax.process_count() > 1:
    raise NotImplementedError(
        f"evaluators run on one process only (this job has {jax.process_count()}): set "
        "config.evals = {} for multi-host training and evaluate its checkpoints with "
        "tools/eval on one host")


@functools.lru_cache(maxsize=64)
def _jitted(encode_fn, out_sharding):
  # One jit wrapper per (encode fn, mesh): an evaluator run every N steps compiles once.
  return jax.jit(encode_fn, out_shardings=out_sharding)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  pad = np.zeros((n - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def embed_batches(encode_fn: Callable[[Any, dict], Any], params: Any,
                  batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh, *,
                  device_keys: Sequence[str], host_keys: Sequence[str] = (),
                  on_host_batch: Callable[[Mapping[str, np.ndarray], np.ndarray], None]
                  | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict[str, np.ndarray]:
  """Run `encode_fn` over a one-pass eval iterator on `mesh`; gather real rows to the host.

  Args:
    encode_fn: (params, {key: [b, ...]}) → pytree (usually a dict) of arrays [b, ...].
      Jitted here; the batch is sharded over `data_axes_of(mesh)`, outputs are replicated.
    params: the model parameters (replicated onto the mesh when not already on it).
    batches: host batches (contract of `make_eval_iterator`): `mask` float [b] (1 real,
      0 padding) plus `device_keys` and `host_keys`. Without `mask` every row is real.
    device_keys: batch keys passed to `encode_fn` (e.g. ("image",) or ("image", "text")).
    host_keys: batch keys kept on the host and returned alongside (e.g. ("label",)).
    on_host_batch: optional callback (batch, real_row_mask) for host-side bookkeeping.
    should_stop: optional `() → bool`, asked before each batch is read; True raises
      EvalInterrupted (a preempted trainer should not finish a long eval).
  Returns:
    {output leaf name: [n, ...], host key: [n, ...]}: n = number of real rows over the whole
    pass, in iterator order, padding dropped (the last partial batch counts exactly once).
    Output names are the dict keys of `encode_fn`'s result ("out" if it returns one array).
  """
  axes = data_axes_of(mesh)
  n_shards = int(np.prod([mesh.shape[a] for a in axes]))
  batch_sharding = NamedSharding(mesh, P(axes))
  replicated = NamedSharding(mesh, P())
  params = params_on_mesh(params, mesh)
  encode = _jitted(encode_fn, replicated)
  _check_single_process()

  outs: dict[str, list[np.ndarray]] = {}
  for batch in _stoppable(batches, should_stop):
    b = len(batch[device_keys[0]])
    mask = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(b, bool)
    if on_host_batch is not None:
      on_host_batch(batch, mask)
    # Round the batch up to a multiple of the data shards: any batch size works on any mesh.
    b_pad = -(-b // n_shards) * n_shards
    dev = {k: jax.device_put(_pad_rows(np.asarray(batch[k]), b_pad), batch_sharding)
           for k in device_keys}
    res = encode(params, dev)
    if not isinstance(res, Mapping):
      res = {"out": res}
    for k, v in res.items():
      outs.setdefault(k, []).append(np.asarray(v)[:b][mask])
    for k in host_keys:
      outs.setdefault(k, []).append(np.asarray(batch[k])[mask])
  if not outs:
    raise EvalDataError("eval iterator yielded no batches (empty data set?)")
  return {k: np.concatenate(v) for k, v in outs.items()}


def _stoppable(batches: Iterable, should_stop: Callable[[], bool] | None):
  """`batches`, asking `should_stop()` before pulling each batch."""
  it = iter(batches)
  n = 0
  while True:
    if should_stop is not None and should_stop():
      raise EvalInterrupted(f"evaluation stopped after {n} batch(es): should_stop() is True")
    try:
      batch = next(it)
    except StopIteration:
      return
    n += 1
    yield batch


def array_batches(arrays: Mapping[str, np.ndarray], batch_size: int):
  """Host arrays {key: [n, ...]} → eval-iterator-style batches, last one padded + `mask`."""
  n = len(next(iter(arrays.values())))
  for s in range(0, n, batch_size):
    m = min(batch_size, n - s)
    batch = {k: _pad_rows(np.asarray(v[s:s + m]), batch_size) for k, v in arrays.items()}
    batch["mask"] = (np.arange(batch_size) < m).astype(np.float32)
    yield batch


# ------------------------------------------------------------------------ config helpers


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg.key` for ConfigDict, dict or None, with a default for absent or None values."""
  if cfg is None:
    return default
  try:
    v = cfg.get(key, default)
  except AttributeError:
    v = getattr(cfg, key, default)
  return default if v is None else v


def read_manifest(data_dir: str) -> dict:
  """DIR/manifest.json as a dict; a clear error when the folder is not a data set."""
  path = os.path.join(data_dir, "manifest.json")
  if not os.path.isfile(path):
    raise EvalDataError(f"{data_dir!r} is not a data set folder: no manifest.json there "
                        "(build one with `jest-pod data ...`)")
  with open(path) as f:
    return json.load(f)


def check_data_set(data_dir: str) -> dict:
  """The validated manifest of an eval set (fields, shard files); EvalDataError naming what
  is missing otherwise, with fixes that apply to a set made elsewhere (the data module's
  own hint, "rebuild with --overwrite", only applies to sets it built)."""
  from jest_pod.data import manifest as manifest_lib  # pylint: disable=import-outside-toplevel
  try:
    return manifest_lib.read(data_dir)
  except manifest_lib.ManifestError as e:
    what = re.split(r";\s*(?:the data set is damaged|rebuild|build it with)", str(e))[0]
    raise EvalDataError(
        f"eval data set {data_dir!r} is not a complete jest_pod data set: {what}. "
        f"`jest-pod data verify {data_dir}` checks its shards; a set made elsewhere needs "
        "converting first: `jest-pod data ingest --input SRC --output DIR` (SRC: its "
        "images and captions), then evaluate DIR") from e


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


def set_name_of(data_dir: str, manifest: Mapping | None = None) -> str:
  """Name used in metric keys: the manifest's `name`, else the folder's name."""
  if manifest and manifest.get("name"):
    return str(manifest["name"])
  return os.path.basename(os.path.normpath(data_dir))


def load_class_names(spec: Any, data_dir: str, set_name: str) -> list[str]:
  """Class names from `spec` (a list, or a .json/.txt file path) or the set's manifest."""
  if spec:
    if isinstance(spec, str):
      if not os.path.isfile(spec):
        raise EvalDataError(f"zero-shot on {set_name!r}: class_names file {spec!r} not found")
      with open(spec) as f:
        text = f.read()
      names = json.loads(text) if spec.endswith(".json") else text.splitlines()
      if isinstance(names, Mapping):
        names = names.get("class_names", [])
      names = [str(n).strip() for n in names if str(n).strip()]
    else:
      names = [str(n) for n in spec]
  else:
    names = list(read_manifest(data_dir).get("class_names") or [])
  if not names:
    raise EvalDataError(
        f"zero-shot on {set_name!r} ({data_dir}): no class names; the manifest.json has no "
        "'class_names' and none were given (evals.<name>.class_names = list or file). "
        "Zero-shot needs a labelled set; use a retrieval evaluator for a captions-only set.")
  return names


def resolve_tokenizer(explicit: str | None, config: Any, data_dir: str) -> str:
  """The sentencepiece model the trained text tower expects.

  Order: explicit path; `config.input.tokenizer`; `<first training data dir>/tokenizer.model`;
  `<eval set>/tokenizer.model`. A different vocabulary from training would give garbage
  scores silently, hence the explicit search order and error.
  """
  inp = cfg_get(config, "input")
  candidates = [explicit, cfg_get(inp, "tokenizer")]
  mixture = list(cfg_get(inp, "mixture", []) or [])
  first_dir = mixture[0][0] if mixture else cfg_get(inp, "data")
  if first_dir:
    candidates.append(os.path.join(first_dir, "tokenizer.model"))
  candidates.append(os.path.join(data_dir, "tokenizer.model"))
  for c in candidates:
    if c and os.path.isfile(c):
      return c
  tried = ", ".join(repr(c) for c in candidates if c)
  raise EvalDataError(f"no sentencepiece tokenizer found for {data_dir!r}; tried {tried}. "
                      "Pass --tokenizer (or evals.<name>.tokenizer) to the training run's "
                      "tokenizer.model")


# --------------------------------------------------------------------- evaluator base


def encode_fn_for(model: Any, *, image: bool, text: bool, patch_size: int | None = None):
  """(params, batch) → {"image": zimg, "text": ztxt} through the TwoTower apply contract."""
  def encode(params, batch):
    zimg, ztxt, _ = model.apply({"params": params}, batch["image"] if image else None,
                                batch["text"] if text else None, patch_size=patch_size)
    out = {}
    if image:
      out["image"] = zimg
    if text:
      out["text"] = ztxt
    return out
  return encode


def sentencepiece_tokenizer(path: str, max_len: int) -> Callable[[Sequence[str]], np.ndarray]:
  """texts → int32 [n, max_len] ids, 0 = pad, truncated: the data pipeline's own tokenizer,
  so prompts are tokenised exactly like training captions."""
  from jest_pod.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.Tokenizer(path)
  return lambda texts: tok.encode_batch(list(texts), max_len)


class Evaluator:
  """Shared set-up of the evaluators: data set, model, mesh, batching.

  Args:
    name: the evaluator's key in `config.evals` (for messages).
    data_dir: a data set folder (manifest.json + shards).
    model: the TwoTower (apply contract of WORKSPACE_NOTES.md).
    mesh: the device mesh; batches are sharded over its data axes.
    every_steps: how often the training loop runs it (0 = never in training).
    batch_size: eval batch size (rounded up per batch to a multiple of the data shards).
    image_size, max_text_len, tokenizer: what `make_eval_iterator` needs.
    patch_size: image tower patch size (None = base).
    set_name: name in metric keys (default: manifest name, else folder name).
    iterator_fn: optional `() → iterable of host batches` replacing `make_eval_iterator`.
  """

  def __init__(self, name: str, data_dir: str, model: Any, mesh: jax.sharding.Mesh, *,
               every_steps: int = 0, batch_size: int = 256, image_size: int | None = None,
               max_text_len: int | None = None, tokenizer: str | None = None,
               patch_size: int | None = None, set_name: str | None = None,
               iterator_fn: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None):
    _check_single_process()
    self.name = name
    self.data_dir = data_dir
    self.model = model
    self.mesh = mesh
    self.every_steps = int(every_steps or 0)
    self.batch_size = int(batch_size)
    self.image_size = image_size
    self.max_text_len = max_text_len
    self.tokenizer = tokenizer
    self.patch_size = patch_size
    manifest = None
    if iterator_fn is None:
      read_manifest(data_dir)  # raises the clear "not a data set" error
      manifest = check_data_set(data_dir)  # a partial set fails here, not at the first eval
    elif os.path.isfile(os.path.join(data_dir, "manifest.json")):
      manifest = read_manifest(data_dir)
    self.manifest = manifest or {}
    self.set_name = set_name or set_name_of(data_dir, manifest)
    self._iterator_fn = iterator_fn

  def batches(self) -> Iterable[Mapping[str, np.ndarray]]:
    """One ordered pass over the set, last batch padded with `mask` (eval iterator contract)."""
    if self._iterator_fn is not None:
      return self._iterator_fn()
    from jest_pod.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.make_eval_iterator(
        self.data_dir, batch_size=self.batch_size, image_size=self.image_size,
        max_text_len=self.max_text_len, tokenizer=self.tokenizer or "")

  def evaluate(self, params: Any, should_stop: Callable[[], bool] | None = None
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """→ (metrics {full metric name: value}, host arrays worth saving {name: array}).

    `should_stop`: asked between batches; True raises EvalInterrupted."""
    raise NotImplementedError

  def run(self, params: Any, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Metrics of `params` on this set, keyed by their full `z/...` names."""
    return self.evaluate(params, should_stop=should_stop)[0]

  def __repr__(self):
    return (f"{type(self).__name__}({self.name!r}, set={self.set_name!r}, "
            f"every_steps={self.every_steps})")
