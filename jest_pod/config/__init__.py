"""Config defaults and validation shared by every file in configs/.

Config files stay thin (big_vision style `get_config(arg)`); the defaults and the
checks that turn a typo into a clear message live here, once.
"""

from __future__ import annotations

import json
import logging
import math
import os

import ml_collections

from jest_pod.jest import losses
from jest_pod.jest import selection
from jest_pod.config.variants import set_model  # pylint: disable=unused-import (re-export)
# The config.input defaults, from a leaf module: not data.pipeline (Grain, decoders).
from jest_pod.data.input_config import default_input_config

# The repo's configs/ folder (the package is installed editable beside it).
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

METHODS = ("uniform", "independent", "joint")
SCORES = tuple(selection.SCORES)
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


def base_config() -> ml_collections.ConfigDict:
  """The full set of fields with small, CPU-friendly defaults; configs override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                  # B: examples trained on per step (global)
  c.loss = "sigmoid"                  # sigmoid (SigLIP) | softmax (CLIP)

  c.input = default_input_config()  # the input pipeline's contract

  c.model = ml_collections.ConfigDict()
  # flexivit (this project's towers) | siglip (public SigLIP checkpoints' towers: models/siglip.py)
  c.model.family = "flexivit"
  c.model.image_size = 32
  c.model.embed_dim = 64
  c.model.dtype = "float32"          # compute dtype; "bfloat16": bf16 compute, f32 weights
  c.model.attention = "auto"         # auto (cuDNN flash attention on GPU in bf16, else XLA) | xla | cudnn
  c.model.remat = False              # rematerialise each encoder block (memory for compute)
  c.model.scan_layers = False        # nn.scan over depth (fast compile for deep towers)
  # Start from a checkpoint's weights, architecture and preprocessing: a training workdir,
  # a Hugging Face SigLIP folder or a big_vision .npz (interop/formats.py apply_init_from).
  c.model.init_from = ""
  c.model.init_tokenizer = ""        # its sentencepiece model, where it has none (big_vision)
  c.model.text = dict(vocab_size=1000, max_len=16)
  set_model(c, "mu/4")  # both towers' sizes: config/variants.py

  c.optax = ml_collections.ConfigDict(dict(
      lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.95, warmup_steps=50, grad_clip=1.0,
      end_lr_fraction=0.0))

  # JEST selection (scores and joint sampling: the jest_pod/jest/selection.py docstring).
  # method=uniform trains on the first B of each batch.
  c.selection = ml_collections.ConfigDict(dict(
      method="uniform", score="learnability", filter_ratio=0.8, n_chunks=16,
      independent_method="topk",
      # The frozen reference: a training workdir, a Hugging Face SigLIP folder or a
      # big_vision .npz (jest/reference.py); reference_tokenizer for an npz without one.
      reference="", reference_tokenizer="",
      # θ*'s embeddings precomputed by `jest-pod data cache-reference`: a cache folder,
      # '' = DATA/reference_cache when present (checked against `reference`), 'off' = never.
      reference_cache="",
      # Early-only selection (AJEST): JEST for this fraction of total_steps, then uniform
      # batches of B (the input switches from super-batches; selection_steps()).
      until=1.0,
  ))
  # Distillation from the reference (losses.distill_loss): loss += weight · KD between θ*'s
  # and the learner's logits on the trained batch; θ*'s rows come from what JEST already
  # computed (cache or forward pass). weight 0 = off.
  c.distill = ml_collections.ConfigDict(dict(weight=0.0, temperature=1.0, kind="softmax"))
  # Flexi-JEST: score at a large patch, train split across patch sizes. The defaults
  # follow model.image.patch_size (with a fixed (4,), a ViT-B/16 config that forgot this
  # field trained at patch 4); read them only through score_patch_size/train_patch_sizes.
  c.flexi = ml_collections.ConfigDict(dict(
      score_patch_size=0,             # 0 = the model's base patch size
      train_patch_sizes=(),           # () = (the model's base patch size,)
      train_fractions=(1.0,)))

  # Device mesh: (name, size) with one size -1 = all remaining devices.
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ((".*", "replicate"),)

  c.device_prefetch = 2       # super-batches read, decoded and on the devices ahead of the step
  c.preemption_check_every = 10  # steps between the hosts' SIGTERM agreement (multi-host)
  c.time_split_every = 100    # every K steps one step runs part by part, timed (0 = never)
  c.log_every = 10
  c.log_selected_ids = False  # WORKDIR/selected_ids.jsonl: {"step", "ids"} per JEST step
  c.ckpt_every = 100
  c.keep_ckpts = 3
  c.evals = ml_collections.ConfigDict()
  # Dotted keys (or prefixes, e.g. "model") that may differ from the checkpoint's config
  # on resume; see check_resume.
  c.allow_config_change = ()
  return c


def score_patch_size(config) -> int:
  """The patch the learner scores at (config.flexi.score_patch_size; 0 = base patch)."""
  return int(config.flexi.score_patch_size or config.model.image["patch_size"])


def train_patch_sizes(config) -> tuple[int, ...]:
  """The Flexi training patch sizes (config.flexi.train_patch_sizes; () = the base patch)."""
  return tuple(int(p) for p in config.flexi.train_patch_sizes) or (
      int(config.model.image["patch_size"]),)


def num_super_batch(config) -> int:
  """N = B / (1 − f) for JEST methods, B for uniform (rounded to a multiple of 8)."""
  b = config.batch_size
  if config.selection.method == "uniform":
    return b
  n = b / (1.0 - config.selection.filter_ratio)
  return int(round(n / 8.0)) * 8


def selection_steps(config) -> int:
  """Steps that select (JEST) before the run trains on uniform batches: round(until ·
  total_steps) for a selecting method, 0 for uniform."""
  if config.selection.method == "uniform":
    return 0
  return min(config.total_steps, int(round(config.selection.until * config.total_steps)))


def distilling(config) -> bool:
  """Whether the loss has the distillation term (config.distill.weight > 0)."""
  return config.distill.weight > 0


def needs_reference(config) -> bool:
  """Whether a run needs θ* (its forward pass or its cache): a selecting method whose
  score weighs the reference's loss (selection.SCORES), or distillation from it."""
  s = config.selection
  return (s.method != "uniform" and selection.uses_models(s.score)[1]) or distilling(config)


def missing_reference_message(config) -> str:
  """The one message for a run that needs θ* and has none."""
  why = (f"config.distill.weight={config.distill.weight:g}"
         if distilling(config) and not (config.selection.method != "uniform" and
                                        selection.uses_models(config.selection.score)[1])
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


def super_batch_host_bytes(config, *, process_count: int = 1, cpu_devices: bool = False,
                           worker_count: int = 0) -> tuple[int, int, int]:
  """(bytes, per-example bytes, batches held) of this host's super-batches in flight.

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
  rows = num_super_batch(config) // max(process_count, 1)
  return rows * per * held, per, held


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
  s, b, n = config.selection, config.batch_size, num_super_batch(config)
  what = (f"config.batch_size={b}" if s.method == "uniform" else
          f"config.selection.filter_ratio={float(s.filter_ratio)!r} with "
          f"config.batch_size={b}")
  figure = (f"{what} gives a super-batch of N={n:,} examples; {held} super-batches in "
            f"flight "
            f"(config.device_prefetch={config.device_prefetch} + 2"
            f"{' + input workers' if worker_count > 0 else ''}) at "
            f"{per:,} bytes per example (config.input.image_size={config.input.image_size}"
            f"{', CPU devices hold a copy' if cpu_devices else ''}) need "
            f"{need / 2**30:.1f} GiB of host memory")
  if need <= budget:
    if need > budget / 2:
      logging.getLogger("jest_pod").warning(
          "%s, %.0f%% of the %.1f GiB available: the model and XLA need room too",
          figure, 100 * need / available, available / 2**30)
    return
  rows_fit = int(budget // (per * held)) * max(process_count, 1)
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


def validate(config) -> None:
  """Raise ValueError naming the key, the bad value and the valid choices."""
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
  _choice("selection.score", s.score, SCORES)
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
  if (needs_reference(config) and not s.reference and s.reference_cache in ("", "off")
      and (s.reference_cache == "off" or not config.input.data or config.input.get("mixture"))):
    raise ValueError(missing_reference_message(config))
  f, train_patches = config.flexi, train_patch_sizes(config)
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
  for p in (*train_patches, score_patch_size(config)):
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
  if config.evals:
    from jest_pod.evaluators.base import TYPES  # pylint: disable=g-import-not-at-top
    for name, ev in config.evals.items():
      _choice(f"evals.{name}.type", ev.get("type"), tuple(TYPES))


def check_input(config) -> None:
  """A missing data folder is named with the fix, instead of a traceback from the reader."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from jest_pod.data import sources  # pylint: disable=g-import-not-at-top
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


# On resume, keys whose change alters what the run means (its data, model, objective,
# selection or randomness); any key under these prefixes counts.
RESUME_BREAKING = ("seed", "batch_size", "loss", "input.data", "input.mixture",
                   "input.image_size", "input.max_text_len", "input.tokenizer", "model",
                   "selection.method", "selection.score", "selection.filter_ratio",
                   "selection.n_chunks", "selection.independent_method",
                   "selection.reference", "selection.reference_tokenizer",
                   "selection.until", "distill", "flexi")
# Always fine to change on resume (schedule, logging, evaluation, throughput knobs).
RESUME_ALLOWED = ("total_steps", "log_every", "ckpt_every", "keep_ckpts", "evals",
                  "time_split_every", "preemption_check_every", "device_prefetch",
                  "input.worker_count", "model.remat", "model.attention",
                  "allow_config_change")


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _resolved_patches(flat):
  """Flexi patch defaults (0, ()) replaced by the base patch they stand for, so a
  checkpoint that saved the explicit value (older defaults) still matches."""
  base = flat.get("model.image.patch_size")
  if base is not None:
    if not flat.get("flexi.score_patch_size"):
      flat["flexi.score_patch_size"] = base
    if not flat.get("flexi.train_patch_sizes"):
      flat["flexi.train_patch_sizes"] = [base]
  return flat


def _under(key, prefixes) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume(saved, config) -> None:
  """Refuse to resume a checkpoint written with a config of another meaning.

  `saved`: the checkpoint's config. Raises ValueError listing `key: old → new` for each
  breaking difference; config.allow_config_change names keys changed on purpose.
  Other differences (e.g. optax.lr) are only logged.
  """
  # Compare as JSON, the way the checkpoint stored it (tuples become lists).
  old = _resolved_patches(_flatten(json.loads(
      ml_collections.ConfigDict(saved).to_json_best_effort())))
  new = _resolved_patches(_flatten(json.loads(config.to_json_best_effort())))
  extra = config.get("allow_config_change", ()) or ()
  allowed = RESUME_ALLOWED + ((extra,) if isinstance(extra, str) else tuple(extra))
  diffs = {k: (old.get(k, "<absent>"), new.get(k, "<absent>"))
           for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
  breaking = {k: d for k, d in diffs.items()
              if _under(k, RESUME_BREAKING) and not _under(k, allowed)}
  if breaking:
    lines = "\n".join(f"  {k}: {a!r} → {b!r}" for k, (a, b) in breaking.items())
    raise ValueError(
        "the config differs from the checkpoint's in keys that change the run's meaning:\n"
        f"{lines}\nRestore those values, use a new --workdir, or allow the change on "
        f"purpose: config.allow_config_change = {tuple(breaking)!r}")
  other = {k: d for k, d in diffs.items() if not _under(k, RESUME_ALLOWED)}
  if other:
    logging.getLogger("jest_pod").warning(
        "resuming with config changes: %s",
        ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in other.items()))


# The demo pool's evaluation sets: assumed while its data is not built yet.
DEMO_EVAL_SETS = {"eval_fashion": "zeroshot", "eval_retrieval": "retrieval"}


def eval_sets(data_root: str) -> dict[str, str]:
  """The evaluation sets beside a pool's web set: {set name: evaluator type} for each
  eval_* set under the root (`evaluators.base.discover`: listed by the root's source kind,
  typed by the evaluator registry). A root without any (not built yet) gets the demo
  pool's two sets."""
  from jest_pod.evaluators import base  # pylint: disable=g-import-not-at-top
  found = {name: s["type"] for name, s in base.discover(data_root).items()}
  return found or dict(DEMO_EVAL_SETS)


def sibling_config(this_file: str, name: str, arg: str | None, keys=None):
  """get_config(arg) of another file in configs/ (configs are files, not a package).

  `keys` keeps only those comma-separated arguments that the other config takes.
  """
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
  spec = importlib.util.spec_from_file_location(f"jest_pod_config_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  parts = [p for p in (arg or "").split(",") if p]
  if keys is not None:
    parts = [p for p in parts if p.partition("=")[0] in keys]
  return module.get_config(",".join(parts))
