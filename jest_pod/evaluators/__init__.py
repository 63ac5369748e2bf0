"""Evaluators: zero-shot classification and image-text retrieval, in training and on checkpoints.

`build_evaluators(config, model, mesh)` turns `config.evals` (name → {type, data,
every_steps, batch_size, ...}) into objects with `.every_steps` and `.run(params,
should_stop=None) → {metric: value}` (`should_stop()` True between batches raises
EvalInterrupted); `jest-pod eval` (cli.py) runs the same objects on saved checkpoints.
They run on any number of processes, each host reading its share of the set.

Modules: base.py (the base class, the registry `TYPES`, building from config) ·
metrics.py (metric maths on host arrays) · zeroshot.py · retrieval.py · cli.py; embedding
on the mesh is `jest_pod/embed.py`.
"""

from __future__ import annotations

from jest_pod.embed import EvalInterrupted
from jest_pod.evaluators.base import (TYPES, Evaluator, build_evaluator, build_evaluators,
                                      evaluator_class, input_sizes)
from jest_pod.evaluators.metrics import EvalDataError, NonFiniteEmbeddings
from jest_pod.evaluators.retrieval import RetrievalEvaluator
from jest_pod.evaluators.zeroshot import DEFAULT_TEMPLATES, ZeroShotEvaluator

__all__ = ["DEFAULT_TEMPLATES", "TYPES", "EvalDataError", "EvalInterrupted", "Evaluator",
           "NonFiniteEmbeddings", "RetrievalEvaluator", "ZeroShotEvaluator", "build_evaluator",
           "build_evaluators", "evaluator_class", "input_sizes"]
