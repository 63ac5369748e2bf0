"""Evaluators: zero-shot classification and image-text retrieval, in training and on checkpoints.

`build_evaluators(config, model, mesh)` turns `config.evals` (name → {type, data,
every_steps, batch_size, ...}) into objects with `.every_steps` and `.run(params,
should_stop=None) → {metric: value}` (`should_stop()` True between batches raises
EvalInterrupted); `jest-pod eval` (cli.py) runs the same objects on saved checkpoints.
"""

from __future__ import annotations

from typing import Any

from jest_pod.evaluators.common import (DEFAULT_TEMPLATES, EvalDataError, EvalInterrupted,
                                       Evaluator, cfg_get)
from jest_pod.evaluators.retrieval import RetrievalEvaluator
from jest_pod.evaluators.zeroshot import ZeroShotEvaluator

EVALUATOR_TYPES = {"zeroshot": ZeroShotEvaluator, "retrieval": RetrievalEvaluator}

# Keys of one `config.evals.<name>` entry passed straight to the evaluator.
_COMMON_KEYS = ("every_steps", "batch_size", "patch_size", "set_name")
_TYPE_KEYS = {"zeroshot": ("class_names", "templates"),
              "retrieval": ("group_identical_images", "group_identical_captions")}


def input_sizes(config: Any) -> tuple[int | None, int | None]:
  """(image_size, max_text_len) the trained model expects, from config.input or config.model."""
  inp, model = cfg_get(config, "input"), cfg_get(config, "model")
  image_size = cfg_get(inp, "image_size") or cfg_get(model, "image_size")
  max_text_len = cfg_get(inp, "max_text_len") or cfg_get(cfg_get(model, "text"), "max_len")
  return image_size, max_text_len


def build_evaluator(name: str, eval_config: Any, config: Any, model: Any, mesh,
                    **overrides) -> Evaluator:
  """One evaluator from one `config.evals.<name>` entry (overrides: e.g. iterator_fn)."""
  kind = cfg_get(eval_config, "type")
  if kind not in EVALUATOR_TYPES:
    raise ValueError(f"evals.{name}.type = {kind!r}; choose one of {sorted(EVALUATOR_TYPES)}")
  data_dir = cfg_get(eval_config, "data")
  if not data_dir:
    raise ValueError(f"evals.{name}.data is not set (a data set folder)")
  image_size, max_text_len = input_sizes(config)
  kwargs = {k: cfg_get(eval_config, k) for k in _COMMON_KEYS + _TYPE_KEYS[kind]
            if cfg_get(eval_config, k) is not None}
  kwargs.setdefault("image_size", image_size)
  kwargs.setdefault("max_text_len", max_text_len)
  if "iterator_fn" not in overrides or (kind == "zeroshot" and "tokenize_fn" not in overrides):
    # Only resolved when something will tokenise: injected iterators (tests) need none.
    from jest_pod.evaluators.common import resolve_tokenizer  # pylint: disable=import-outside-toplevel
    kwargs["tokenizer"] = resolve_tokenizer(cfg_get(eval_config, "tokenizer"), config, data_dir)
  if "templates" in kwargs:
    kwargs["templates"] = tuple(kwargs["templates"])
  if kind != "zeroshot":
    overrides.pop("tokenize_fn", None)  # only zero-shot tokenises text of its own
  kwargs.update(overrides)
  return EVALUATOR_TYPES[kind](name, data_dir, model, mesh, **kwargs)


def build_evaluators(config: Any, model: Any, mesh) -> list[Evaluator]:
  """All evaluators of `config.evals` (empty or absent → []), in config order."""
  evals = cfg_get(config, "evals") or {}
  return [build_evaluator(name, ecfg, config, model, mesh) for name, ecfg in evals.items()]


__all__ = ["DEFAULT_TEMPLATES", "EVALUATOR_TYPES", "EvalDataError", "EvalInterrupted",
           "Evaluator", "RetrievalEvaluator", "ZeroShotEvaluator", "build_evaluator",
           "build_evaluators", "input_sizes"]
