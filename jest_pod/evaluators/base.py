"""The evaluator base class, the registry of evaluator types, and building them from config.

Adding an evaluator type: its module (a subclass of `Evaluator` with `CONFIG_KEYS`,
`KEY_PREFIX`, `METRICS`, `HEADLINE`, and `claims` if sets can be recognised as its) and one
entry in `TYPES`. What reads the registry: config validation, `build_evaluator`,
`jest-pod eval --data [TYPE:]DIR` and eval-set discovery (`infer_type`, `discover`), and
the reports that find metrics in a run's log (`headlines`, `logged_keys`: the sweep and
the demo).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jest_pod import embed
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import pipeline
from jest_pod.data import sources
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.input_config import cfg_get
from jest_pod.evaluators.metrics import EvalDataError

# Evaluator type (`config.evals.<name>.type`) → "module:class". Strings, not classes: the
# type modules import this one.
TYPES = {
    "zeroshot": "jest_pod.evaluators.zeroshot:ZeroShotEvaluator",
    "retrieval": "jest_pod.evaluators.retrieval:RetrievalEvaluator",
}
# What a set no type `claims` is evaluated with (any set of captioned images qualifies).
DEFAULT_TYPE = "retrieval"

# Keys of one `config.evals.<name>` entry passed to every evaluator.
_COMMON_KEYS = ("every_steps", "batch_size", "patch_size", "set_name")


def evaluator_class(kind: str) -> type[Evaluator]:
  """The class registered for `kind`; ValueError naming the choices otherwise."""
  if kind not in TYPES:
    raise ValueError(f"evaluator type {kind!r}; choose one of {sorted(TYPES)}")
  module, name = TYPES[kind].split(":")
  return getattr(importlib.import_module(module), name)


def infer_type(manifest: Mapping, given: Mapping | None = None) -> str:
  """The evaluator type of a set when none is named: the first type in `TYPES` whose class
  `claims` it (zero-shot: the set's manifest or `given` names classes), else
  `DEFAULT_TYPE`. `given`: options set for it (e.g. `jest-pod eval --class-names`)."""
  for kind in TYPES:
    if kind != DEFAULT_TYPE and evaluator_class(kind).claims(manifest, given or {}):
      return kind
  return DEFAULT_TYPE


def discover(root: str, prefix: str = "eval_") -> dict[str, dict[str, str]]:
  """The evaluation sets under a pool's root, through its source kind (`sources.sets`):
  {set name: {"type": inferred type, "data": spec}} for each set named PREFIX*. A set
  whose manifest is damaged fails here with the manifest's error."""
  return {name: {"type": infer_type(sources.manifest_of(spec)), "data": spec}
          for name, spec in sources.sets(root).items() if name.startswith(prefix)}


def headlines(keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
  """The headline score of every (type, set) whose headline keys were all logged:
  {label (e.g. "eval_flags top-1"): its keys (averaged)}, in key order. The registry's
  answer to "which logged metrics are the scores", so reports match no prefixes."""
  keys = set(keys)
  found = []
  for kind in TYPES:
    cls = evaluator_class(kind)
    for set_name in cls.sets_logged(keys):
      label, wanted = cls.headline(set_name)
      if all(k in keys for k in wanted):
        found.append((wanted, label))
  return {label: wanted for wanted, label in sorted(found)}


def logged_keys(keys: Iterable[str], kind: str, metric: str) -> list[str]:
  """The logged keys of `kind`'s `metric` (a name of its `METRICS`), one per set, sorted."""
  cls = evaluator_class(kind)
  if metric not in cls.METRICS:
    raise ValueError(f"{kind} evaluators log {list(cls.METRICS)}, not {metric!r}")
  return sorted(cls.metric_key(s, metric) for s in cls.sets_logged(keys, metric))


def check_data_set(data_dir: str, *, check_files: bool = True) -> dict:
  """The validated manifest of an eval set (`manifest.read`); EvalDataError naming what
  is missing otherwise, with fixes that apply to a set made elsewhere (the data module's
  own hint, "rebuild with --overwrite", only applies to sets it built). A spec of another
  source kind (`data.sources.KINDS`) gives what that kind knows instead."""
  if not sources.is_folder(data_dir):
    return dict(sources.manifest_of(data_dir))
  try:
    return manifest_lib.read(data_dir, check_files=check_files)
  except manifest_lib.ManifestError as e:
    what = re.split(r";\s*(?:the data set is damaged|rebuild|build it with)", str(e))[0]
    raise EvalDataError(
        f"eval data set {data_dir!r} is not a complete jest_pod data set: {what}. "
        f"`jest-pod data verify {data_dir}` checks its shards; a set made elsewhere needs "
        "converting first: `jest-pod data ingest --input SRC --output DIR` (SRC: its "
        "images and captions), then evaluate DIR") from e


def set_name_of(data_dir: str, manifest: Mapping | None = None) -> str:
  """Name used in metric keys: the manifest's `name`, else the folder's name."""
  if manifest and manifest.get("name"):
    return str(manifest["name"])
  return os.path.basename(os.path.normpath(data_dir))


def input_sizes(config: Any) -> tuple[int | None, int | None]:
  """(image_size, max_text_len) the trained model expects, from config.input or config.model."""
  inp, model = cfg_get(config, "input"), cfg_get(config, "model")
  image_size = cfg_get(inp, "image_size") or cfg_get(model, "image_size")
  max_text_len = cfg_get(inp, "max_text_len") or cfg_get(cfg_get(model, "text"), "max_len")
  return image_size, max_text_len


class Evaluator:
  """Shared set-up of the evaluators: data set, model, mesh, batching.

  Runs on any number of processes: every host reads its share of the set, embeddings are
  computed on the (global) mesh and every host gets all rows (`jest_pod.embed`), so
  every host computes the metrics one process would on the whole set.

  Args:
    name: the evaluator's key in `config.evals` (for messages).
    data_dir: a data set folder (manifest.json + shards).
    model: the TwoTower (apply contract of WORKSPACE_NOTES.md).
    mesh: the device mesh; batches are sharded over its data axes.
    every_steps: how often the training loop runs it (0 = never in training).
    batch_size: global eval batch size (each of P hosts reads ceil(batch_size / P) rows a
      batch, rounded up to a multiple of its data shards).
    image_size, max_text_len: what `make_eval_iterator` needs.
    tokenizer: the run's sentencepiece model (path or Tokenizer; `tokenizer.resolve`).
    patch_size: image tower patch size (None = base).
    set_name: name in metric keys (default: manifest name, else folder name).
    iterator_fn: optional `() → this host's batches` replacing `make_eval_iterator`
      (the same number of batches on every host; `embed.array_batches` makes them).
  """

  # `config.evals.<name>` keys of this type, passed to its constructor.
  CONFIG_KEYS: tuple[str, ...] = ()
  # Whether it tokenises text of its own (prompts): it then needs the tokenizer even
  # with an injected iterator.
  TOKENIZES_TEXT = False
  # Its metric names: the logged key of metric M on set S is `KEY_PREFIX + S + "_" + M`
  # (`metric_key`); `evaluate` logs `METRICS`. `HEADLINE`: the metrics averaged into the
  # one score reports follow (`headline`), `HEADLINE_LABEL` its name ("{set}" = S).
  KEY_PREFIX = ""
  METRICS: tuple[str, ...] = ()
  HEADLINE: tuple[str, ...] = ()
  HEADLINE_LABEL = "{set}"

  @classmethod
  def claims(cls, manifest: Mapping, given: Mapping) -> bool:
    """Whether a set with this manifest (and these options) is this type's when no type
    is named (`infer_type`)."""
    del manifest, given
    return False

  @classmethod
  def metric_key(cls, set_name: str, metric: str) -> str:
    return f"{cls.KEY_PREFIX}{set_name}_{metric}"

  @classmethod
  def metric_keys(cls, set_name: str) -> list[str]:
    """Every key `evaluate` logs on `set_name`."""
    return [cls.metric_key(set_name, m) for m in cls.METRICS]

  @classmethod
  def headline(cls, set_name: str) -> tuple[str, tuple[str, ...]]:
    """(label, keys averaged into it) of the score reports follow on `set_name`."""
    return (cls.HEADLINE_LABEL.format(set=set_name),
            tuple(cls.metric_key(set_name, m) for m in cls.HEADLINE))

  @classmethod
  def sets_logged(cls, keys: Iterable[str], metric: str | None = None) -> list[str]:
    """Set names whose `metric` (default: the first of `HEADLINE`) is among `keys`."""
    metric = metric or cls.HEADLINE[0]
    head, tail = cls.KEY_PREFIX, f"_{metric}"
    return sorted({k[len(head):-len(tail)] for k in keys
                   if k.startswith(head) and k.endswith(tail) and len(k) > len(head + tail)})

  def __init__(self, name: str, data_dir: str, model: Any, mesh: jax.sharding.Mesh, *,
               every_steps: int = 0, batch_size: int = 256, image_size: int | None = None,
               max_text_len: int | None = None, tokenizer: Any = None,
               patch_size: int | None = None, set_name: str | None = None,
               iterator_fn: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None):
    self.name = name
    self.data_dir = data_dir
    self.model = model
    self.mesh = mesh
    self.every_steps = int(every_steps or 0)
    self.batch_size = int(batch_size)
    self.host_batch_size = -(-self.batch_size // jax.process_count())
    self.image_size = image_size
    self.max_text_len = max_text_len
    self.tokenizer = tokenizer
    self.patch_size = patch_size
    # A partial set fails here, not at the first evaluation; an injected iterator needs
    # only the manifest's fields.
    self.manifest = check_data_set(data_dir, check_files=iterator_fn is None)
    self.set_name = set_name or set_name_of(data_dir, self.manifest)
    self._iterator_fn = iterator_fn

  def batches(self) -> Iterable[Mapping[str, np.ndarray]]:
    """This host's share of one ordered pass, last batch padded with `mask`."""
    if self._iterator_fn is not None:
      return self._iterator_fn()
    return pipeline.make_eval_iterator(
        self.data_dir, batch_size=self.host_batch_size, image_size=self.image_size,
        max_text_len=self.max_text_len, tokenizer=self.tokenizer or "")

  def embed(self, encode_fn, params: Any, batches, *, device_keys: Sequence[str],
            host_keys: Sequence[str] = (), should_stop=None) -> dict[str, np.ndarray]:
    """`embed.embed_batches` on this evaluator's mesh: all hosts' real rows, in order."""
    try:
      return embed.embed_batches(encode_fn, params, batches, self.mesh,
                                 device_keys=device_keys, host_keys=host_keys,
                                 should_stop=should_stop)
    except embed.EmptyPass as e:
      raise EvalDataError(f"{self.name} ({self.data_dir}): {e}") from e

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


def build_evaluator(name: str, eval_config: Any, config: Any, model: Any, mesh,
                    **overrides) -> Evaluator:
  """One evaluator from one `config.evals.<name>` entry (overrides: e.g. iterator_fn)."""
  kind = cfg_get(eval_config, "type")
  if kind not in TYPES:
    raise ValueError(f"evals.{name}.type = {kind!r}; choose one of {sorted(TYPES)}")
  cls = evaluator_class(kind)
  data_dir = cfg_get(eval_config, "data")
  if not data_dir:
    raise ValueError(f"evals.{name}.data is not set (a data set folder)")
  image_size, max_text_len = input_sizes(config)
  kwargs = {k: cfg_get(eval_config, k) for k in _COMMON_KEYS + cls.CONFIG_KEYS
            if cfg_get(eval_config, k) is not None}
  kwargs.setdefault("image_size", image_size)
  kwargs.setdefault("max_text_len", max_text_len)
  if not cls.TOKENIZES_TEXT:
    overrides.pop("tokenize_fn", None)
  if "iterator_fn" not in overrides or (cls.TOKENIZES_TEXT and "tokenize_fn" not in overrides):
    # Only resolved when something will tokenise: injected iterators (tests) need none.
    kwargs["tokenizer"] = tokenizer_lib.resolve(cfg_get(config, "input"),
                                                cfg_get(eval_config, "tokenizer"))
  kwargs.update(overrides)
  return cls(name, data_dir, model, mesh, **kwargs)


def build_evaluators(config: Any, model: Any, mesh) -> list[Evaluator]:
  """All evaluators of `config.evals` (empty or absent → []), in config order."""
  evals = cfg_get(config, "evals") or {}
  return [build_evaluator(name, ecfg, config, model, mesh) for name, ecfg in evals.items()]
