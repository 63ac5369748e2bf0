"""Any checkpoint, recognised by its content: this project's workdirs, Hugging Face SigLIP
folders and big_vision npz files, each loaded as one `Loaded` (model config, parameters,
tokenizer and preprocessing).

Every command that accepts a checkpoint goes through `load` (or `load_config` when only
the architecture is needed): `jest-pod eval`, `jest-pod embed`, `jest-pod export`,
`jest-pod data cache-reference --reference`, `config.selection.reference` and
`config.model.init_from`. A new format is one entry in `KINDS`: a `detect(path)` that
looks at the content and a `load(path, tokenizer, step)` that returns a `Loaded`.

  workdir     WORKDIR, WORKDIR/checkpoints or a step folder of `jest-pod train` (Orbax);
              its digest is verified, its tokenizer is the run's (`tokenizer.resolve`)
  hf          a folder with config.json (model_type "siglip") + model.safetensors +
              spiece.model, as `SiglipModel.save_pretrained` and `SiglipProcessor` write it
  big_vision  an .npz with big_vision's `params/img/...`, `params/txt/...` keys (loop or
              scan layout), or a folder holding one (`jest-pod export --format big_vision`
              writes model.npz + spiece.model); its sentencepiece model comes from
              `tokenizer=` (`--tokenizer`, config.selection.reference_tokenizer /
              config.model.init_tokenizer) or `spiece.model` beside the .npz

A folder `jest-pod export` wrote (it holds guard.MARKER) is read only when that export
finished: an interrupted one is refused in one line, whatever its kind looks like.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from jest_pod import checkpoint as ckpt_lib
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.interop import InteropError, big_vision, guard, hf
from jest_pod.models import build_model, two_tower
from jest_pod.parallel import sharding as shd

log = logging.getLogger("jest_pod")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How raw captions and images become a model's inputs: the pipeline's image size
  (pixels in [-1, 1]), the caption length and the tokenizer (with its text style)."""
  image_size: int
  max_text_len: int
  tokenizer: tokenizer_lib.Tokenizer

  def fingerprint(self) -> dict:
    return {"image_size": int(self.image_size), "max_text_len": int(self.max_text_len),
            "tokenizer_sha256": self.tokenizer.sha256,
            "text_style": self.tokenizer.text_style}

  def differences(self, other: "Preprocessing", mine: str, theirs: str) -> list[str]:
    """'key: A (mine) vs B (theirs)' for every field that differs."""
    a, b = self.fingerprint(), other.fingerprint()
    return [f"{k}: {a[k]} ({mine}) vs {b[k]} ({theirs})" for k in a if a[k] != b[k]]

  def input_config(self) -> dict:
    """The `config.input` fields that make the pipeline feed this preprocessing."""
    return {"image_size": int(self.image_size), "max_text_len": int(self.max_text_len),
            "tokenizer": self.tokenizer.path or "", "text_style": self.tokenizer.text_style}


@dataclasses.dataclass(frozen=True)
class Loaded:
  """One checkpoint of any kind. `config` has `model` (build_model's input) and `input`
  (image_size, max_text_len, tokenizer, text_style); `params` are host or device arrays
  in the model's tree, on the host (numpy); `step` is None for public checkpoints."""
  kind: str
  path: str
  config: ml_collections.ConfigDict
  params: Any
  step: int | None
  preprocessing: Preprocessing

  def model(self):
    return build_model(self.config.model)

  def identity(self) -> dict:
    """What names these weights: kind, path, step and a digest of every parameter."""
    path = self.path if "://" in self.path else os.path.abspath(self.path)
    return {"kind": self.kind, "path": path, "step": self.step,
            "params_digest": params_digest(self.params)}

  def describe(self) -> str:
    step = f" step {self.step}" if self.step is not None else ""
    return f"{self.kind} checkpoint {self.path}{step}"


def params_digest(params) -> str:
  """sha256 over every parameter leaf in tree order: its key path, dtype, shape and bytes.

  Independent of devices and sharding (a replicated jax.Array is read from one local
  copy). ~1 s per GB of parameters.
  """
  h = hashlib.sha256()
  for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        raise ValueError(f"params_digest: leaf {jax.tree_util.keystr(key)} is sharded "
                         "across processes; load the parameters replicated")
      leaf = leaf.addressable_data(0)
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(key)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------ kinds


def _is_hf(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and (
      os.path.isfile(os.path.join(path, "model.safetensors")))


def _is_big_vision_npz(path: str) -> bool:
  if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
    return False
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.startswith(("params/img/", "img/", "opt/target/img/")) for n in z.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


def _is_big_vision(path: str) -> bool:
  """A big_vision .npz, or a folder holding exactly one (an export's)."""
  if os.path.isdir(path):
    npzs = [f for f in os.listdir(path) if f.endswith(".npz")]
    return len(npzs) == 1 and _is_big_vision_npz(os.path.join(path, npzs[0]))
  return _is_big_vision_npz(path)


def _is_workdir(path: str) -> bool:
  return "://" in path or os.path.isdir(path)


def _tokenizer_beside(path: str, explicit: Any, style: str, what: str) -> tokenizer_lib.Tokenizer:
  """`explicit` (path or Tokenizer), else spiece.model beside `path`."""
  if isinstance(explicit, tokenizer_lib.Tokenizer):
    return explicit
  spec = explicit or os.path.join(os.path.dirname(os.path.abspath(path)), "spiece.model")
  if not os.path.isfile(spec):
    raise InteropError(f"{path}: {what} has no tokenizer: pass --tokenizer SPIECE.model (or set "
                    "config.selection.reference_tokenizer / config.model.init_tokenizer), "
                    f"or put its sentencepiece model at {spec}")
  return tokenizer_lib.Tokenizer(spec, text_style=style)


def _load_workdir(path: str, tokenizer: Any, step: int | None) -> Loaded:
  # Restored on this host's devices, then held on the host like the public formats: each
  # process places its copy on whatever mesh uses it (no cross-host transfer).
  local = shd.replicated(shd.make_mesh((("data", -1),), jax.local_devices()))
  config, params, step = ckpt_lib.load_params(path, step, sharding=local)
  params = jax.device_get(params)
  if "model" not in config:
    raise InteropError(f"{path}: the checkpoint's saved config has no `model` section")
  tok = tokenizer_lib.resolve(config.input, tokenizer)
  prep = Preprocessing(int(config.input.image_size), int(config.input.max_text_len), tok)
  return Loaded("workdir", path, config, params, step, prep)


def _loaded_public(kind: str, path: str, model_config: dict, params: Any, image_size: int,
                   max_text_len: int, tok: tokenizer_lib.Tokenizer) -> Loaded:
  config = ml_collections.ConfigDict({"model": model_config})
  prep = Preprocessing(int(image_size), int(max_text_len), tok)
  config.input = prep.input_config()
  return Loaded(kind, path, config, params, None, prep)


def _load_hf(path: str, tokenizer: Any, step: int | None) -> Loaded:
  del step
  model_config, params, pre = hf.read_folder(path)
  tok = (tokenizer if isinstance(tokenizer, tokenizer_lib.Tokenizer) else
         tokenizer_lib.Tokenizer(tokenizer or pre["spiece_path"], text_style=pre["text_style"]))
  return _loaded_public("hf", path, model_config, params, pre["image_size"],
                        pre["max_text_len"], tok)


def _load_big_vision(path: str, tokenizer: Any, step: int | None) -> Loaded:
  del step
  npz = big_vision.resolve(path)
  model_config, params = big_vision.read_npz(npz)
  # big_vision's SigLIP captions: canonicalised, sticky EOS (its zero-shot prompts and
  # transformers' converted tokenizers do the same).
  tok = _tokenizer_beside(npz, tokenizer, "siglip", "a big_vision npz")
  return _loaded_public("big_vision", path, model_config, params, model_config["image_size"],
                        model_config["text"]["max_len"], tok)


@dataclasses.dataclass(frozen=True)
class Kind:
  detect: Callable[[str], bool]
  load: Callable[[str, Any, int | None], Loaded]


# Tried in order: the first whose detect() is true loads the path.
KINDS = {
    "hf": Kind(_is_hf, _load_hf),
    "big_vision": Kind(_is_big_vision, _load_big_vision),
    "workdir": Kind(_is_workdir, _load_workdir),
}


def kind_of(path: str) -> str:
  """The first kind whose content test accepts `path`; InteropError listing them otherwise."""
  if "://" not in path and not os.path.exists(path):
    raise InteropError(f"checkpoint {path} does not exist")
  if "://" not in path:
    guard.check_containing_export(path)  # an interrupted export: refused, whatever it holds
  for name, kind in KINDS.items():
    if kind.detect(path):
      return name
  raise InteropError(
      f"{path} is not a checkpoint jest_pod knows: expected a training workdir (or its "
      "checkpoints/ or a step folder), a Hugging Face SigLIP folder (config.json + "
      "model.safetensors + spiece.model) or a big_vision .npz with params/img/... keys (or a "
      "folder holding one)")


def load(path: str, *, tokenizer: Any = None, step: int | None = None) -> Loaded:
  """The checkpoint at `path`, whatever its kind, with its tokenizer and preprocessing.

  `tokenizer`: a path or Tokenizer overriding the checkpoint's own (a workdir whose data
  folder moved; required for a big_vision npz without spiece.model beside it).
  `step`: for workdirs (default: the latest complete step). Parameters are host or
  device arrays; `embed.params_on_mesh` places them. Raises InteropError,
  checkpoint.CheckpointError or tokenizer.TokenizerError with a one-line message.
  """
  path = str(path)
  kind = kind_of(path)
  loaded = KINDS[kind].load(path, tokenizer, step)
  _check_fits(loaded)
  log.info("loaded %s", loaded.describe())
  return loaded


def _check_fits(loaded: Loaded) -> None:
  """Parameters that do not fit the model their config describes: the one fit check."""
  try:
    ckpt_lib.check_params_fit(loaded.model(), loaded.params,
                              loaded.config.model.image_size,
                              loaded.preprocessing.max_text_len)
  except ckpt_lib.CheckpointError as e:
    raise InteropError(f"{loaded.path}: {e}") from e
  vocab = loaded.config.model.text["vocab_size"]
  if loaded.preprocessing.tokenizer.vocab_size > vocab:
    raise InteropError(f"{loaded.path}: its tokenizer ({loaded.preprocessing.tokenizer.path}) has "
                    f"{loaded.preprocessing.tokenizer.vocab_size} pieces, the text tower's "
                    f"vocabulary {vocab}: pass the tokenizer the model was trained with")


def load_config(path: str, *, tokenizer: Any = None) -> ml_collections.ConfigDict:
  """The `model` and `input` (image_size, max_text_len, tokenizer path, text_style) config
  of the checkpoint at `path`, without loading its weights: what `config.model.init_from`
  copies into the learner's config."""
  path = str(path)
  kind = kind_of(path)
  if kind == "workdir":
    saved = ckpt_lib.load_config(path)
    tok = tokenizer_lib.resolve(saved.input, tokenizer)
    prep = Preprocessing(int(saved.input.image_size), int(saved.input.max_text_len), tok)
    model = saved.model.to_dict()
  elif kind == "hf":
    model, pre = hf.read_config(path)
    tok = tokenizer_lib.Tokenizer(tokenizer or pre["spiece_path"], text_style=pre["text_style"])
    prep = Preprocessing(pre["image_size"], pre["max_text_len"], tok)
  else:
    npz = big_vision.resolve(path)
    model, _ = big_vision.read_npz(npz)
    tok = _tokenizer_beside(npz, tokenizer, "siglip", "a big_vision npz")
    prep = Preprocessing(model["image_size"], model["text"]["max_len"], tok)
  return ml_collections.ConfigDict({"model": model, "input": prep.input_config()})


# The learner's own knobs that `init_from` keeps: how to run the towers, not what they are.
RUNTIME_MODEL_KEYS = ("dtype", "attention", "remat", "scan_layers", "init_from",
                      "init_tokenizer")


def apply_init_from(config) -> None:
  """`config.model.init_from=PATH`: the learner takes the checkpoint's architecture
  (config.model, keeping RUNTIME_MODEL_KEYS), tokenizer and preprocessing (config.input's
  image_size, max_text_len, tokenizer, text_style); the trainer then starts from its
  weights. Flexi patch sizes given as multiples of the old base patch keep their ratio
  (score at 2p stays 2p). Runs before validation, at every start (a resume resolves the
  same config)."""
  path = config.model.get("init_from")
  if not path:
    return
  got = load_config(path, tokenizer=config.model.get("init_tokenizer") or None)
  old_patch = int(config.model.image["patch_size"])
  keep = {k: config.model[k] for k in RUNTIME_MODEL_KEYS if k in config.model}
  config.model = ml_collections.ConfigDict({**got.model.to_dict(), **keep})
  for k, v in got.input.items():
    config.input[k] = v
  new_patch = int(config.model.image["patch_size"])
  f = config.flexi
  if new_patch != old_patch:
    scale = lambda p: p * new_patch // old_patch if p % old_patch == 0 else p
    if f.score_patch_size:
      f.score_patch_size = scale(int(f.score_patch_size))
    f.train_patch_sizes = tuple(scale(int(p)) for p in f.train_patch_sizes)
  log.info("config.model.init_from=%s: %s towers (image %s, text %s), image_size %d, text "
           "length %d, tokenizer %s (%s); flexi score patch %s, train patches %s", path,
           config.model.get("family", "flexivit"), dict(config.model.image),
           dict(config.model.text), config.input.image_size, config.input.max_text_len,
           config.input.tokenizer, config.input.text_style, f.score_patch_size or "base",
           tuple(f.train_patch_sizes) or "base")


def params_for(loaded: Loaded, model_config) -> Any:
  """The checkpoint's parameters in the layout of `model_config` (loop or scanned blocks)."""
  have = bool(loaded.config.model.get("scan_layers", False))
  want = bool(model_config.get("scan_layers", False))
  if have == want:
    return loaded.params
  return two_tower.convert_layout(loaded.params, loaded.config.model, scan=want)
