"""Config defaults and validation shared by every file in configs/.

Config files stay thin (big_vision style `get_config(arg)`); the defaults and the
checks that turn a typo into a clear message live here, once.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os

import ml_collections
from etils import epath

from jest_pod.config import variants
from jest_pod.data import sources
# The config.input defaults, from a leaf module: not data.pipeline (Grain, decoders).
from jest_pod.data.input_config import default_input_config
# The registries validation checks against: config sits above them (they never import it).
from jest_pod.evaluators import base as evaluators_base
from jest_pod.jest import losses
from jest_pod.jest import selection

# The repo's configs/ folder (the package is installed editable beside it).
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

METHODS = ("uniform", "independent", "joint")
SHARDING_RULES = ("replicate", "fsdp")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'runlocal,filter_ratio=0.9' → ConfigDict(runlocal=True, filter_ratio=0.9).

  Each key must appear in `defaults` (whose type converts the value); a bare word sets
  a bool flag.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; valid: {', '.join(defaults)}")
    typ = type(defaults[key])
    if not eq:
      out[key] = True
    elif typ is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = typ(value)
  return out


# How each key behaves when a run resumes with a changed config (check_resume). Declared
# beside the key's default in base_config(), so a new key cannot be forgotten:
BREAKS = "breaks"    # changes what the run means (data, model, objective, selection, seed)
WARNS = "warns"      # allowed, logged (e.g. optax.lr: a new schedule on purpose)
ALLOWED = "allowed"  # schedule, logging, evaluation and throughput knobs: silent


class _Fields:
  """base_config()'s builder: each key with its default and its resume behaviour. A rule
  declared for a section (e.g. "model") covers its keys unless a longer key says else."""

  def __init__(self):
    self.config = ml_collections.ConfigDict()
    self.resume: dict[str, str] = {}

  def __call__(self, key: str, default, resume: str):
    *path, last = key.split(".")
    node = self.config
    for part in path:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[last] = default
    self.declare(resume, key)

  def declare(self, resume: str, *keys: str):
    for key in keys:
      self.resume[key] = resume


def _fields() -> _Fields:
  """The full set of fields with small, CPU-friendly defaults, and their resume rules."""
  f = _Fields()
  f("seed", 0, BREAKS)
  f("total_steps", 1000, ALLOWED)
  f("batch_size", 256, BREAKS)         # B: examples trained on per step (global)
  f("loss", "sigmoid", BREAKS)         # sigmoid (SigLIP) | softmax (CLIP)

  f("input", default_input_config(), WARNS)  # the input pipeline's contract
  f.declare(BREAKS, "input.data", "input.mixture", "input.image_size", "input.max_text_len",
            "input.tokenizer")
  # The order of examples depends on the worker count (data/input_config.py): exact
  # resume needs the same one, but a host with other cores may resume on purpose.
  f.declare(ALLOWED, "input.worker_count")

  # Every model key breaks a resume (the parameters would not fit or mean other things)
  # except the ways to compute the same function.
  f("model.family", "flexivit", BREAKS)  # flexivit (this project's towers) | siglip
  f("model.image_size", 32, BREAKS)      # = input.image_size (validate: one size)
  f("model.embed_dim", 64, BREAKS)
  f("model.dtype", "float32", BREAKS)    # compute dtype; "bfloat16": bf16 compute, f32 weights
  # auto (cuDNN flash attention on GPU in bf16, else XLA) | xla | cudnn
  f("model.attention", "auto", ALLOWED)
  f("model.remat", False, ALLOWED)       # rematerialise each encoder block (memory for compute)
  f("model.scan_layers", False, BREAKS)  # nn.scan over depth (fast compile for deep towers)
  # Start from a checkpoint's weights, architecture and preprocessing: a training workdir,
  # a Hugging Face SigLIP folder or a big_vision .npz (interop/formats.py apply_init_from).
  f("model.init_from", "", BREAKS)
  f("model.init_tokenizer", "", BREAKS)  # its sentencepiece model, where it has none
  f("model.text", dict(vocab_size=1000, max_len=16), BREAKS)
  variants.set_model(f.config, "mu/4")  # model.image and the towers' sizes: config/variants.py
  f.declare(BREAKS, "model.image")

  f("optax", dict(lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.95, warmup_steps=50,
                  grad_clip=1.0, end_lr_fraction=0.0), WARNS)

  # JEST selection (scores and joint sampling: the jest_pod/jest/selection.py docstring).
  # method=uniform trains on the first B of each batch.
  f("selection.method", "uniform", BREAKS)
  f("selection.score", "learnability", BREAKS)
  f("selection.filter_ratio", 0.8, BREAKS)
  f("selection.n_chunks", 16, BREAKS)
  f("selection.independent_method", "topk", BREAKS)
  # The frozen reference: a training workdir, a Hugging Face SigLIP folder or a
  # big_vision .npz (jest/reference.py); reference_tokenizer for an npz without one.
  f("selection.reference", "", BREAKS)
  f("selection.reference_tokenizer", "", BREAKS)
  # θ*'s embeddings precomputed by `jest-pod data cache-reference`: a cache folder,
  # '' = DATA/reference_cache when present (checked against `reference`), 'off' = never.
  f("selection.reference_cache", "", WARNS)
  # Two-phase input (data/two_phase.py): score the super-batch from stored score images
  # (`jest-pod data score-images`), decode only the B selected records. '' = the ones
  # beside the data when present, 'off' = decode every scored example, or a folder.
  f("selection.score_images", "", WARNS)
  # Early-only selection (AJEST): JEST for this fraction of total_steps, then uniform
  # batches of B (the input switches from super-batches; RunSpec.selection_steps).
  f("selection.until", 1.0, BREAKS)
  # Distillation from the reference (losses.distill_loss): loss += weight · KD between θ*'s
  # and the learner's logits on the trained batch; θ*'s rows come from what JEST already
  # computed (cache or forward pass). weight 0 = off.
  f("distill", dict(weight=0.0, temperature=1.0, kind="softmax"), BREAKS)
  # Flexi-JEST: score at a large patch, train split across patch sizes. The defaults
  # follow model.image.patch_size; read them only through score_patch_size /
  # train_patch_sizes (check_resume compares what they resolve to).
  f("flexi.score_patch_size", 0, BREAKS)   # 0 = the model's base patch size
  f("flexi.train_patch_sizes", (), BREAKS)  # () = (the model's base patch size,)
  f("flexi.train_fractions", (1.0,), BREAKS)

  # Device mesh: (name, size) with one size -1 = all remaining devices.
  f("mesh", (("data", -1), ("fsdp", 1)), WARNS)
  f("sharding_rules", ((".*", "replicate"),), WARNS)

  # super-batches read, decoded and on the devices ahead of the step
  f("device_prefetch", 2, ALLOWED)
  f("preemption_check_every", 10, ALLOWED)  # steps between the hosts' SIGTERM agreement
  f("time_split_every", 100, ALLOWED)  # every K steps one step runs part by part, timed (0 = never)
  f("log_every", 10, ALLOWED)
  f("log_selected_ids", False, WARNS)  # WORKDIR/selected_ids.jsonl: {"step", "ids"} per JEST step
  f("ckpt_every", 100, ALLOWED)
  f("keep_ckpts", 3, ALLOWED)
  f("evals", ml_collections.ConfigDict(), ALLOWED)  # name → {type, data, every_steps, ...}
  # Evaluation sets found at run start (resolve_evals; not while the config is built: that
  # would read the disk): every eval_* set under `root` joins config.evals, evaluated every
  # `every_steps` (0 = total_steps // 6) with `batch_size`. '' = none.
  f("discover_evals", dict(root="", every_steps=0, batch_size=256), ALLOWED)
  # Dotted keys (or prefixes, e.g. "model") that may differ from the checkpoint's config
  # on resume; see check_resume.
  f("allow_config_change", (), ALLOWED)
  return f


def base_config() -> ml_collections.ConfigDict:
  """The full set of fields with small, CPU-friendly defaults; configs override."""
  return _fields().config


def resume_rules() -> dict[str, str]:
  """{dotted key or section: BREAKS | WARNS | ALLOWED}, as base_config() declares them."""
  return dict(_fields().resume)


def _score_patch_size(config) -> int:
  """The patch the learner scores at (config.flexi.score_patch_size; 0 = base patch)."""
  return int(config.flexi.score_patch_size or config.model.image["patch_size"])


def _train_patch_sizes(config) -> tuple[int, ...]:
  """The Flexi training patch sizes (config.flexi.train_patch_sizes; () = the base patch)."""
  return tuple(int(p) for p in config.flexi.train_patch_sizes) or (
      int(config.model.image["patch_size"]),)


def _num_super_batch(config) -> int:
  """N = B / (1 − f) for JEST methods, B for uniform (rounded to a multiple of 8)."""
  b = config.batch_size
  if config.selection.method == "uniform":
    return b
  n = b / (1.0 - config.selection.filter_ratio)
  return int(round(n / 8.0)) * 8


def _selection_steps(config) -> int:
  """Steps that select (JEST) before the run trains on uniform batches: round(until ·
  total_steps) for a selecting method, 0 for uniform."""
  if config.selection.method == "uniform":
    return 0
  return min(config.total_steps, int(round(config.selection.until * config.total_steps)))


def _needs_reference(config) -> bool:
  """Whether a run needs θ* (its forward pass or its cache): a selecting method whose
  score weighs the reference's loss (selection.SCORES), or distillation from it."""
  return _scores_reference(config) or losses.distilling(config)


def _scores_reference(config) -> bool:
  s = config.selection
  return s.method != "uniform" and selection.uses_models(s.score)[1]


def missing_reference_message(config) -> str:
  """The one message for a run that needs θ* and has none."""
  why = (f"config.distill.weight={config.distill.weight:g}"
         if losses.distilling(config) and not _scores_reference(config)
         else f"config.selection.score={config.selection.score!r}")
  return (f"{why} needs a reference model: set "
          "config.selection.reference to a checkpoint (a workdir of configs/reference.py, a "
          "Hugging Face SigLIP folder or a big_vision .npz), or build its embedding cache "
          f"with `jest-pod data cache-reference --data {config.input.data or 'DATA'} "
          "--reference REF`")


def host_memory_available() -> int | None:
  """Bytes this process may still allocate: MemAvailable, capped by a cgroup limit (a
  container sees the host's MemAvailable, not its own limit); None when unknown."""
  found = []
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          found.append(int(line.split()[1]) * 1024)
  except (OSError, ValueError, IndexError):
    try:
      found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
      pass
  for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                 "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit_file) as f:
        limit = f.read().strip()
      with open(used_file) as f:
        used = int(f.read().strip())
    except (OSError, ValueError):
      continue
    if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
      found.append(max(int(limit) - used, 0))
  return min(found) if found else None


# Host memory may hold at most this share of what is available for super-batches; the
# rest is for the model, XLA and the input's decode buffers.
HOST_MEMORY_SHARE = 0.8
# Measured peak RSS over the copies counted below, per super-batch row (issue 32: the count
# alone said 6 GiB for f = 0.999 at B = 64, and the run took 14 GB). The rest is the
# batching transient (the N examples and their stacked batch), the scoring pass's working
# set and the allocator's retained blocks; the table and its command are in
# tests/test_config.py (test_the_super_batch_estimate_matches_the_measured_peak).
PEAK_FACTOR = 1.7


def super_batch_host_bytes(config, *, process_count: int = 1, cpu_devices: bool = False,
                           worker_count: int = 0) -> tuple[int, int, int]:
  """(bytes, per-example bytes, batches held) of this host's super-batches in flight:
  rows × per-example × held × PEAK_FACTOR (the measured peak over the copies counted).

  Per example: the decoded float32 image (S·S·3·4), int32 tokens, the id/label/source
  columns, the reference-cache rows (JEST), and on CPU devices the device copy too (CPU
  "device" arrays live in host memory). Batches held: the prefetch queue
  (config.device_prefetch) + the one being read + the one training, + each input
  worker's buffer.
  """
  s, length = int(config.input.image_size), int(config.input.max_text_len)
  image, text = s * s * 3 * 4, length * 4
  per = image + text + 8 + 3 * 4
  if config.selection.method != "uniform":
    per += 2 * int(config.model.embed_dim) * 4
  if cpu_devices:
    per += image + text + 8 + 2 * 4
  held = int(config.device_prefetch) + 2
  held += max(worker_count, 0) * int(config.input.get("worker_buffer_size", 2))
  rows = _num_super_batch(config) // max(process_count, 1)
  return int(rows * per * held * PEAK_FACTOR), per, held


def check_host_memory(config, *, process_count: int = 1, cpu_devices: bool = False,
                      worker_count: int = 0, available: int | None = None) -> None:
  """Refuse a super-batch whose host memory exceeds what this host has, before any data
  is read: name the figure, and the largest filter_ratio (or batch size) that fits.
  `available`: bytes (default: host_memory_available())."""
  available = host_memory_available() if available is None else available
  if not available:
    return
  need, per, held = super_batch_host_bytes(config, process_count=process_count,
                                           cpu_devices=cpu_devices, worker_count=worker_count)
  budget = HOST_MEMORY_SHARE * available
  s, b, n = config.selection, config.batch_size, _num_super_batch(config)
  what = (f"config.batch_size={b}" if s.method == "uniform" else
          f"config.selection.filter_ratio={float(s.filter_ratio)!r} with "
          f"config.batch_size={b}")
  figure = (f"{what} gives a super-batch of N={n:,} examples; {held} super-batches in "
            f"flight "
            f"(config.device_prefetch={config.device_prefetch} + 2"
            f"{' + input workers' if worker_count > 0 else ''}) at "
            f"{per:,} bytes per example (config.input.image_size={config.input.image_size}"
            f"{', CPU devices hold a copy' if cpu_devices else ''}), × {PEAK_FACTOR:g} for "
            "the working set measured beside them, need "
            f"{need / 2**30:.1f} GiB of host memory")
  if need <= budget:
    if need > budget / 2:
      logging.getLogger("jest_pod").warning(
          "%s, %.0f%% of the %.1f GiB available: the model and XLA need room too",
          figure, 100 * need / available, available / 2**30)
    return
  rows_fit = int(budget // (per * held * PEAK_FACTOR)) * max(process_count, 1)
  if s.method != "uniform" and rows_fit > b:
    f_max = math.floor((1 - b / rows_fit) * 1e4) / 1e4  # round down: it must fit
    fix = (f"the largest filter_ratio that fits is {f_max:g} (N={rows_fit:,}); lower "
           "config.selection.filter_ratio or config.batch_size")
  else:
    fix = (f"at most {rows_fit:,} examples per super-batch fit: lower config.batch_size"
           f"{' (and keep filter_ratio)' if s.method != 'uniform' else ''}, "
           "config.input.image_size or config.device_prefetch")
  raise ValueError(f"{figure}, more than {HOST_MEMORY_SHARE:.0%} of the "
                   f"{available / 2**30:.1f} GiB this host has available; {fix}.")


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"config.{name}={value!r} is not valid; choose one of {list(choices)}")


# Counts where 0 (or less) has no meaning: each would fail later, far from the cause
# (division by zero, a silent no-op run, a prefetcher that never reads).
POSITIVE = ("batch_size", "total_steps", "log_every", "ckpt_every", "keep_ckpts",
            "selection.n_chunks", "preemption_check_every", "device_prefetch")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _nonfinite_floats(tree, prefix=""):
  """Dotted keys (with [i] for sequence items) of every NaN or ±inf float in `tree`."""
  items = (tree.items() if isinstance(tree, dict) else
           ((f"[{i}]", v) for i, v in enumerate(tree)) if isinstance(tree, (list, tuple))
           else ())
  for k, v in items:
    key = f"{prefix}{k}" if str(k).startswith("[") or not prefix else f"{prefix}.{k}"
    if isinstance(v, float) and not math.isfinite(v):
      yield key, v
    elif isinstance(v, (dict, list, tuple)):
      yield from _nonfinite_floats(v, key)


def validate(config) -> None:
  """Raise ValueError naming the key, the bad value and the valid choices."""
  # Every float must be finite: 1e400 parses as inf, and NaN passes every `<`/`>` check
  # below, then gives NaN at step 1 far from the cause.
  for key, value in _nonfinite_floats(config.to_dict()):
    raise ValueError(f"config.{key}={value!r} is not a finite number (a literal such as 1e400 "
                     "overflows to inf); set a finite value")
  for key in POSITIVE:
    value = _get(config, key)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key}={value!r} must be an integer >= 1")
  if config.time_split_every < 0:
    raise ValueError(f"config.time_split_every={config.time_split_every} must be >= 0 "
                     "(0 = never time the step's parts)")
  _choice("loss", config.loss, selection.LOSSES)
  s = config.selection
  _choice("selection.method", s.method, METHODS)
  _choice("selection.score", s.score, tuple(selection.SCORES))  # read live: one registry
  _choice("selection.independent_method", s.independent_method, selection.INDEPENDENT_METHODS)
  if not 0.0 <= s.filter_ratio < 1.0:
    raise ValueError(f"config.selection.filter_ratio={s.filter_ratio} must be in [0, 1) "
                     "(the paper uses 0.5, 0.8, 0.9)")
  if not 0.0 < s.until <= 1.0:
    raise ValueError(f"config.selection.until={s.until} must be in (0, 1]: the fraction of "
                     "config.total_steps that selects before uniform batches (1 = always)")
  if s.method == "uniform" and s.until != 1.0:
    raise ValueError(f"config.selection.until={s.until} needs a selecting method; "
                     "config.selection.method is 'uniform'")
  d = config.distill
  _choice("distill.kind", d.kind, losses.DISTILL_KINDS)
  if d.weight < 0 or d.temperature <= 0:
    raise ValueError(f"config.distill: weight={d.weight} must be >= 0 (0 = off) and "
                     f"temperature={d.temperature} > 0")
  if s.method == "joint" and config.batch_size % s.n_chunks:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by "
                     f"config.selection.n_chunks={s.n_chunks}")
  # Whether DATA/reference_cache exists is known at start-up (jest.reference.open_reference);
  # here only what no file can fix.
  if (_needs_reference(config) and not s.reference and s.reference_cache in ("", "off")
      and (s.reference_cache == "off" or not config.input.data or config.input.get("mixture"))):
    raise ValueError(missing_reference_message(config))
  f, train_patches = config.flexi, _train_patch_sizes(config)
  if len(train_patches) != len(f.train_fractions) or abs(sum(f.train_fractions) - 1) > 1e-6:
    raise ValueError("config.flexi.train_patch_sizes and train_fractions must have the same "
                     f"length and the fractions must sum to 1; got {train_patches}, "
                     f"{f.train_fractions}")
  size = config.model.image_size
  if config.input.image_size != size:
    # One size for everything: the pipeline decodes at input.image_size while the FLOP
    # count, the reference check and the cache fingerprint read model.image_size.
    raise ValueError(f"config.input.image_size={config.input.image_size} and "
                     f"config.model.image_size={size} differ: set both to the size to train at")
  for p in (*train_patches, _score_patch_size(config)):
    if size % p:
      raise ValueError(f"patch size {p} (config.flexi) does not divide "
                       f"config.model.image_size={size}")
  for pattern, rule in config.sharding_rules:
    _choice(f"sharding_rules[{pattern!r}]", rule, SHARDING_RULES)
  if (config.model.get("family", "flexivit") == "siglip"
      and config.input.get("text_style", "plain") not in ("siglip", "siglip_cased")):
    # Last-token pooling reads the sticky </s>; plain ids pad with 0 and have none.
    raise ValueError(f"config.model.family='siglip' needs config.input.text_style='siglip' (or "
                     f"'siglip_cased'), not {config.input.get('text_style')!r}")
  if config.input.max_text_len > config.model.text["max_len"]:
    raise ValueError(f"config.input.max_text_len={config.input.max_text_len} exceeds "
                     f"config.model.text.max_len={config.model.text['max_len']}")
  for name, ev in (config.evals or {}).items():
    _choice(f"evals.{name}.type", ev.get("type"), tuple(evaluators_base.TYPES))


def check_input(config) -> None:
  """A missing data folder is named with the fix, instead of a traceback from the reader."""
  mixture = list(config.input.get("mixture") or [])
  key = "config.input.mixture" if mixture else "config.input.data"
  dirs = [str(d) for d, _ in mixture] or [str(config.input.data)]
  for d in dirs:
    if not d:
      raise ValueError("config.input.data is empty: set it to a data set folder (or set "
                       "config.input.mixture)")
    if sources.is_folder(d) and not epath.Path(d).exists():
      path = epath.Path(d)
      if path.name in ("web", "curated", "eval_fashion", "eval_retrieval"):
        make = f"`jest-pod data build demo --output {path.parent}` (it writes {d})"
      else:
        make = f"`jest-pod data ingest --input YOUR_DATA --output {d}`"
      raise ValueError(f"data folder {d} ({key}) does not exist; make it with {make}, "
                       f"or fix {key}")


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _under(key, prefixes) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def undeclared_keys(config=None) -> list[str]:
  """Keys of `config` (default: base_config()) that declare no resume rule: each key must
  (tests/test_config.py), so resuming never meets a key whose meaning is unknown."""
  config = base_config() if config is None else config
  rules = resume_rules()
  return [k for k in _flatten(json.loads(config.to_json_best_effort()))
          if resume_rule(k, rules) is None]


def resume_rule(key: str, rules: dict[str, str] | None = None) -> str | None:
  """The declared resume behaviour of a dotted key (its longest declared section), or None
  for a key base_config() does not declare."""
  rules = resume_rules() if rules is None else rules
  found = [p for p in rules if _under(key, (p,))]
  return rules[max(found, key=len)] if found else None


def _meaning(config_dict) -> dict:
  """The config flattened as the checkpoint stores it (JSON: tuples become lists), with
  the Flexi patches as what they resolve to: an explicit base patch and the default
  (0, ()) are the same run."""
  flat = _flatten(json.loads(ml_collections.ConfigDict(config_dict).to_json_best_effort()))
  if flat.get("model.image.patch_size") is not None:
    c = ml_collections.ConfigDict(config_dict)
    flat["flexi.score_patch_size"] = _score_patch_size(c)
    flat["flexi.train_patch_sizes"] = list(_train_patch_sizes(c))
  return flat


def _switch_step(c) -> int | None:
  """The step early-only selection switches to uniform batches of B (the input becomes
  pipeline.SwitchingIterator), or None when the run never switches."""
  k = _selection_steps(c)
  return k if 0 < k < int(c.total_steps) else None


def _check_switch(saved, config, step: int) -> None:
  """total_steps and selection.until place the switch (round(until · total_steps)). Before
  it a resume may move it (the super-batches go on to the new step); once a run reached
  it, its input reads batches of B from the switch's position on, and a later switch would
  run "JEST" steps that select a batch from a batch (and count their FLOPs): refused, as
  is a change between switching and not switching (the saved input state has the other
  form)."""
  try:
    old_config = ml_collections.ConfigDict(saved)
    old = _switch_step(old_config)
  except (KeyError, AttributeError, TypeError, ValueError):
    return  # a config too old to tell: the other checks stand
  new = _switch_step(config)
  if old == new or (old is not None and new is not None and step < min(old, new)):
    return
  keys = [(k, a, b) for k, a, b in (("total_steps", old_config.total_steps, config.total_steps),
                            ("selection.until", old_config.selection.get("until", 1.0),
                             config.selection.until)) if a != b]
  changed = " and ".join(f"config.{k}: {a!r} → {b!r}" for k, a, b in keys) or "the config"

  def at(s):
    return f"step {s}" if s is not None else "never"
  if old is None or new is None:
    why = (f"the checkpoint's input state (step {step}) is that of a run that "
           f"{'never switches' if old is None else 'switches'}")
  else:
    why = (f"the checkpoint at step {step} is already past step {min(old, new)} (its input "
           f"reads {'batches of B' if step >= old else 'super-batches'} from there)")
  raise ValueError(
      f"{changed} moves the switch from JEST super-batches to uniform batches from "
      f"{at(old)} to {at(new)}, but {why}; keep config.total_steps={old_config.total_steps} "
      f"and config.selection.until={old_config.selection.get('until', 1.0)!r}, or start a "
      "new --workdir")


def check_resume(saved, config, *, step: int | None = None) -> None:
  """Refuse to resume a checkpoint written with a config of another meaning.

  `saved`: the checkpoint's config. Each changed key is judged by the rule base_config()
  declares for it (resume_rules): BREAKS and undeclared keys raise ValueError listing
  `key: old → new` unless config.allow_config_change names them; WARNS keys are logged.
  `step`: the checkpoint's step, for the early-selection switch (_check_switch), whose
  move past that step no allow_config_change makes meaningful.
  """
  old, new = _meaning(saved), _meaning(config)
  rules = resume_rules()
  extra = config.get("allow_config_change", ()) or ()
  extra = (extra,) if isinstance(extra, str) else tuple(extra)
  diffs = {k: (old.get(k, "<absent>"), new.get(k, "<absent>"))
           for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
  judged = {k: resume_rule(k, rules) for k in diffs}
  breaking = {k: d for k, d in diffs.items() if judged[k] == BREAKS and not _under(k, extra)}
  unknown = {k: d for k, d in diffs.items() if judged[k] is None and not _under(k, extra)}
  if breaking or unknown:
    lines = "\n".join(f"  {k}: {a!r} → {b!r}" for k, (a, b) in breaking.items())
    text = ("the config differs from the checkpoint's in keys that change the run's "
            f"meaning:\n{lines}\n" if breaking else "")
    if unknown:
      text += ("the config differs from the checkpoint's in keys that "
               "jest_pod.config.base_config() does not declare, so their effect on the run "
               "is unknown:\n" + "\n".join(f"  {k}: {a!r} → {b!r}"
                                           for k, (a, b) in unknown.items()) + "\n")
    raise ValueError(
        f"{text}Restore those values, use a new --workdir, or allow the change on "
        f"purpose: config.allow_config_change = {tuple(breaking) + tuple(unknown)!r}")
  if step is not None:
    _check_switch(saved, config, step)
  logged = {k: d for k, d in diffs.items() if judged[k] != ALLOWED}
  if logged:
    logging.getLogger("jest_pod").warning(
        "resuming with config changes: %s",
        ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in logged.items()))


# ------------------------------------------------------------ loading and overriding


class UnknownKey(KeyError):
  """An override names a key the config does not have. `parent`: the dotted path of the
  section it was looked up in ('' = the top)."""

  def __init__(self, key: str, parent: str, name: str, keys: list[str]):
    self.key, self.parent, self.name, self.keys = key, parent, name, keys
    self.close = difflib.get_close_matches(name, keys, n=3)
    super().__init__(self.describe())

  def describe(self, prefix: str = "config.") -> str:
    """'config.a.bb does not exist; did you mean config.a.b? Keys of config.a: ...', with
    `prefix` (e.g. '--config.') in the suggestions."""
    section = ".".join(filter(None, ["config", self.parent]))
    msg = f"config.{self.key} does not exist"
    if self.close:
      msg += "; did you mean " + " or ".join(
          prefix + ".".join(filter(None, [self.parent, c])) for c in self.close) + "?"
    if self.keys:
      msg += f" Keys of {section}: {', '.join(sorted(self.keys))}."
    return msg

  def __str__(self):
    return self.describe()


def _parse_value(text: str, current):
  """A command-line value for a field that holds `current`: strings stay as written,
  booleans read true/false/1/0/yes/no, anything else is a Python literal."""
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"{text!r} is not a boolean (true or false)")
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # the ConfigDict's type check names the mismatch


def override(config, key: str, value) -> None:
  """config.<dotted key> = value: the one way to change a built config by name (the
  train CLI's --config.KEY=VALUE, `bench step --set`, the sweep's variants and the tests).
  The key must exist (UnknownKey, with suggestions); a str `value` for a non-str field is
  parsed (_parse_value); the ConfigDict checks the type."""
  *path, last = key.split(".")
  node = config
  for i, part in enumerate([*path, last]):
    keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    if part not in keys:
      raise UnknownKey(key, ".".join(path[:i]), part, keys)
    if i < len(path):
      node = node[part]
  if isinstance(value, str):
    value = _parse_value(value, node[last])
  node[last] = value


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of the config file at `path` (configs are files, not a package): the
  one loader of the train CLI, `bench step` and sibling_config. Whatever the file raises
  propagates (train/cli.py turns it into one line naming the file and line)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"jest_pod_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def sibling_config(this_file: str, name: str, arg: str | None, keys=None):
  """get_config(arg) of another file in configs/ (configs are files, not a package).

  `keys` keeps only those comma-separated arguments that the other config takes.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
  parts = [p for p in (arg or "").split(",") if p]
  if keys is not None:
    parts = [p for p in parts if p.partition("=")[0] in keys]
  return load(path, ",".join(parts))


# ------------------------------------------------------------ evaluation sets


# The demo pool's evaluation sets: assumed while its data is not built yet.
DEMO_EVAL_SETS = {"eval_fashion": "zeroshot", "eval_retrieval": "retrieval"}


def eval_sets(data_root: str) -> dict[str, str]:
  """The evaluation sets beside a pool's web set: {set name: evaluator type} for each
  eval_* set under the root (`evaluators.base.discover`: listed by the root's source kind,
  typed by the evaluator registry). A root without any (not built yet) gets the demo
  pool's two sets."""
  found = {name: s["type"] for name, s in evaluators_base.discover(data_root).items()}
  return found or dict(DEMO_EVAL_SETS)


def resolve_evals(config):
  """At run start (this reads the disk): each eval_* set under
  config.discover_evals.root joins config.evals as evals.<set without eval_> (a name
  already in config.evals is kept as written). Returns the config, changed in place."""
  d = config.get("discover_evals")
  if not d or not d.root:
    return config
  every = int(d.every_steps) or max(int(config.total_steps) // 6, 1)
  with config.unlocked():
    # The sets that exist (no demo fallback: at run start the pool is built).
    for name, found in evaluators_base.discover(d.root).items():  # eval_x → evals.x
      key = name.removeprefix("eval_")
      if key not in config.evals:
        config.evals[key] = dict(type=found["type"], data=f"{d.root}/{name}",
                                 every_steps=every, batch_size=int(d.batch_size))
  return config


# ------------------------------------------------------------ the resolved run


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The facts derived from a config, computed once (resolve) and read by everyone (the
  trainer, the train step, the FLOP model, bench, demo, sweep) instead of being
  recomputed from the raw keys: their one public home."""
  batch_size: int                   # B, global
  super_batch: int                  # N (= B for uniform)
  method: str
  selecting: bool                   # a JEST method (not uniform)
  selection_steps: int              # steps that select before uniform batches
  uses_models: tuple[bool, bool]    # (learner, reference) the score runs
  needs_reference: bool
  distill: bool
  score_patch: int
  train_patches: tuple[int, ...]
  train_fractions: tuple[float, ...]
  image_size: int                   # the one size (validate: input = model)
  text_len: int


def resolve(config) -> RunSpec:
  """The run's derived facts (no I/O; call validate first)."""
  s = config.selection
  return RunSpec(
      batch_size=int(config.batch_size), super_batch=_num_super_batch(config),
      method=s.method, selecting=s.method != "uniform",
      selection_steps=_selection_steps(config), uses_models=selection.uses_models(s.score),
      needs_reference=_needs_reference(config), distill=losses.distilling(config),
      score_patch=_score_patch_size(config), train_patches=_train_patch_sizes(config),
      train_fractions=tuple(float(f) for f in config.flexi.train_fractions),
      image_size=int(config.model.image_size), text_len=int(config.input.max_text_len))
