"""Hugging Face `SiglipModel` folders ⇄ models.siglip.SiglipTwoTower parameters, numpy only.

A folder as `SiglipModel.save_pretrained` + `SiglipProcessor.save_pretrained` write it:
  config.json                model_type "siglip", text_config, vision_config (fields left
                             out take transformers' defaults, as older saves omit them)
  model.safetensors          (or model.safetensors.index.json + shards) F32/BF16/F16
  spiece.model               SiglipTokenizer's sentencepiece model
  tokenizer_config.json      do_lower_case (→ text style "siglip" | "siglip_cased"),
                             model_max_length (→ the caption length)
  special_tokens_map.json    </s> (eos = pad), <unk>
  preprocessor_config.json   SiglipImageProcessor: size, bicubic, 1/255, mean = std = 0.5;
                             transformers ≥ 5 writes it inside processor_config.json
                             ("image_processor"), which is read too

Names and transforms (HF Linear weights are [out, in]; big_vision kernels [in, ...]):
  vision_model.embeddings.patch_embedding.weight [w,3,p,p]  img/embedding/kernel [p,p,3,w]
                                                            (HF = kernel.transpose(3,2,0,1))
  vision_model.embeddings.position_embedding.weight [g²,w]  img/pos_embedding [1,g²,w]
  {vision,text}_model.encoder.layers.{i}.                   .../encoderblock_{i}/
    layer_norm1, layer_norm2 (weight, bias)                   LayerNorm_0, LayerNorm_1 (scale, bias)
    self_attn.{q,k,v}_proj [w,w], bias [w]                    MultiHeadDotProductAttention_0/
                                                              {query,key,value} kernel [w,h,w/h]
                                                              (HF = kernel.reshape(w,-1).T)
    self_attn.out_proj [w,w]                                  .../out kernel [h,w/h,w]
                                                              (HF = kernel.reshape(-1,w).T)
    mlp.fc1, mlp.fc2                                          MlpBlock_0/Dense_0, Dense_1
  vision_model.post_layernorm                               img/Transformer/encoder_norm
  vision_model.head.probe [1,1,w]                           img/MAPHead_0/probe
  vision_model.head.attention.in_proj_weight [3w,w], _bias  MAPHead_0/MultiHeadDotProduct-
                                                              Attention_0/{query,key,value}
                                                              (q, k, v stacked)
  vision_model.head.attention.out_proj                      MAPHead_0/.../out
  vision_model.head.layernorm, head.mlp.fc1/fc2             MAPHead_0/LayerNorm_0, MlpBlock_0
  text_model.embeddings.token_embedding.weight [V,wt]       txt/Embed_0/embedding
  text_model.embeddings.position_embedding.weight [L,wt]    txt/pos_embedding [1,L,wt]
  text_model.final_layer_norm                               txt/Encoder_0/encoder_norm
  text_model.head [d,wt]                                    txt/head kernel [wt,d]
  logit_scale [1], logit_bias [1]                           t [1], b [1]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
import sentencepiece as spm

from jest_pod.interop import InteropError, guard
from jest_pod.models import siglip

__all__ = ["InteropError", "read_config", "read_folder", "write_folder"]

CONFIG, WEIGHTS, WEIGHTS_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
SPIECE, TOKENIZER_CONFIG = "spiece.model", "tokenizer_config.json"
SPECIAL_TOKENS = "special_tokens_map.json"
PREPROCESSOR, PROCESSOR = "preprocessor_config.json", "processor_config.json"

# transformers' SiglipTextConfig / SiglipVisionConfig defaults (configuration_siglip.py):
# config.json files saved by transformers 4.x leave out fields equal to these.
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
SUPPORTED = "'siglip' (SiglipModel: SigLIP 1, both towers)"
_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # all the tanh approximation
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ------------------------------------------------------------------------ config.json


def _read_json(path: str, required: bool = True) -> dict | None:
  if not os.path.isfile(path):
    if required:
      raise InteropError(f"{path}: missing; a Hugging Face SiglipModel folder has it "
                         "(save_pretrained writes it)")
    return None
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f"{path}: cannot read it as JSON ({e}); restore or re-download it") from e
  if not isinstance(data, dict):
    raise InteropError(f"{path}: a JSON {type(data).__name__}, not an object")
  return data


def _positive_int(value, what: str, path: str) -> int:
  """A positive int (a JSON 32 or 32.0); anything else is refused naming the key."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
      or value < 1:
    raise InteropError(f"{path}: {what} is {value!r}, not a positive integer; restore the "
                       "model's own config.json")
  return int(value)


def _int_size(value, what: str, path: str) -> int:
  """An int, or a square [n, n] / {"height": n, "width": n}."""
  if isinstance(value, dict):
    value = [value.get("height"), value.get("width")]
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1] or value[0] is None:
      raise InteropError(f"{path}: {what} {value} is not square; only square images are supported")
    value = value[0]
  return _positive_int(value, what, path)


def _model_config(cfg: dict, path: str) -> dict:
  """config.model (family "siglip") from a SiglipModel config.json."""
  model_type = cfg.get("model_type")
  if model_type != "siglip":
    hint = {"siglip2": " (SigLIP 2's NaFlex layout differs)",
            "clip": " (CLIP: softmax, class token, other names)",
            "siglip_vision_model": " (one tower only)",
            "siglip_text_model": " (one tower only)"}.get(model_type, "")
    raise InteropError(f"{path}: model_type {model_type!r}{hint} is not supported; supported: "
                       f"{SUPPORTED}")
  text = {**TEXT_DEFAULTS, **(cfg.get("text_config") or {})}
  vision = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
  if not vision["vision_use_head"]:
    raise InteropError(f"{path}: vision_config.vision_use_head is false: the image tower has "
                       "no MAP head, so it gives no image embedding; only SiglipModels with "
                       "the head are supported")
  for name, tower in (("text_config", text), ("vision_config", vision)):
    if tower["hidden_act"] not in _GELU:
      raise InteropError(f"{path}: {name}.hidden_act {tower['hidden_act']!r}: only the tanh "
                         f"GELU ({', '.join(_GELU)}) is supported")
    if abs(float(tower["layer_norm_eps"]) - 1e-6) > 1e-12:
      raise InteropError(f"{path}: {name}.layer_norm_eps {tower['layer_norm_eps']}: only 1e-6 "
                         "(SigLIP's) is supported")
  if vision["num_channels"] != 3:
    raise InteropError(f"{path}: vision_config.num_channels {vision['num_channels']}: RGB only")
  ints = {}
  for name, tower in (("text_config", text), ("vision_config", vision)):
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      ints[name, key] = _positive_int(tower[key], f"{name}.{key}", path)
    heads, width = ints[name, "num_attention_heads"], ints[name, "hidden_size"]
    if width % heads:
      raise InteropError(f"{path}: {name}.num_attention_heads {heads} does not divide "
                         f"{name}.hidden_size {width}; restore the model's own config.json")
  for key in ("vocab_size", "max_position_embeddings"):
    ints["text_config", key] = _positive_int(text[key], f"text_config.{key}", path)
  width = ints["vision_config", "hidden_size"]
  # (projection = width is checked after the weights: they say which of the two is off)
  projection = _positive_int(text["projection_size"] or text["hidden_size"],
                             "text_config.projection_size", path)
  image_size = _int_size(vision["image_size"], "vision_config.image_size", path)
  patch = _int_size(vision["patch_size"], "vision_config.patch_size", path)
  if image_size % patch:
    raise InteropError(f"{path}: vision_config.image_size {image_size} is not a multiple of "
                       f"vision_config.patch_size {patch}")
  v = lambda k: ints["vision_config", k]
  t = lambda k: ints["text_config", k]
  return {
      "family": "siglip",
      "image_size": image_size,
      "embed_dim": projection,
      "image": dict(patch_size=patch, width=width, depth=v("num_hidden_layers"),
                    num_heads=v("num_attention_heads"), mlp_dim=v("intermediate_size")),
      "text": dict(vocab_size=t("vocab_size"), max_len=t("max_position_embeddings"),
                   width=t("hidden_size"), depth=t("num_hidden_layers"),
                   num_heads=t("num_attention_heads"), mlp_dim=t("intermediate_size")),
  }


def _layer_count(shapes: dict, tower: str, depth: int, key: str, cfg: str, where: str) -> None:
  """config.json's num_hidden_layers against the layers the weights hold (no loop over a
  claimed count: a config saying 10**9 is refused at once)."""
  prefix = f"{tower}.encoder.layers."
  found = {int(m.group(1)) for m in (re.match(re.escape(prefix) + r"(\d+)\.", n)
                                     for n in shapes) if m}
  n = len(found)
  gap = next((i for i in range(n) if i not in found), None)
  if gap is not None:
    raise InteropError(f"{where}: holds {prefix}{max(found)}.* but no {prefix}{gap}.*: "
                       "damaged or mixed weights; re-download them")
  if depth > n:
    raise InteropError(f"{cfg}: {key} {depth}, but {where} holds {n} layers (no tensor "
                       f"{prefix}{n}.*): the weights and config.json do not belong together")
  if depth < n:
    raise InteropError(f"{cfg}: {key} {depth}, but {where} holds {n} layers ({prefix}{depth}.* "
                       "is extra): the weights and config.json do not belong together")


def _check_against_weights(mc: dict, shapes: dict, cfg: str, where: str) -> None:
  """Every size config.json gives, against the tensor shapes of the weights' headers, and
  the parameter count bounded: all before a single array (or name-map entry) exists."""
  guard.check_param_count(sum(int(np.prod(s, dtype=object)) for s in shapes.values()), where,
                          "its tensors")
  im, tx = mc["image"], mc["text"]
  _layer_count(shapes, "vision_model", im["depth"], "vision_config.num_hidden_layers", cfg, where)
  _layer_count(shapes, "text_model", tx["depth"], "text_config.num_hidden_layers", cfg, where)
  grid2 = (mc["image_size"] // im["patch_size"]) ** 2
  fc1 = lambda tower, depth: (f"{tower}.encoder.layers.0.mlp.fc1.weight" if depth else
                              "vision_model.head.mlp.fc1.weight")
  checks = [  # (config key, its value, tensor, axis, what the tensor's axis must be)
      ("vision_config.hidden_size", im["width"], "vision_model.embeddings.patch_embedding.weight",
       0, im["width"]),
      ("vision_config.patch_size", im["patch_size"],
       "vision_model.embeddings.patch_embedding.weight", 2, im["patch_size"]),
      ("vision_config.image_size", mc["image_size"],
       "vision_model.embeddings.position_embedding.weight", 0, grid2),
      ("vision_config.intermediate_size", im["mlp_dim"], fc1("vision_model", im["depth"]), 0,
       im["mlp_dim"]),
      ("text_config.vocab_size", tx["vocab_size"], "text_model.embeddings.token_embedding.weight",
       0, tx["vocab_size"]),
      ("text_config.hidden_size", tx["width"], "text_model.embeddings.token_embedding.weight",
       1, tx["width"]),
      ("text_config.max_position_embeddings", tx["max_len"],
       "text_model.embeddings.position_embedding.weight", 0, tx["max_len"]),
      ("text_config.projection_size", mc["embed_dim"], "text_model.head.weight", 0,
       mc["embed_dim"]),
  ]
  if tx["depth"]:
    checks.append(("text_config.intermediate_size", tx["mlp_dim"],
                   fc1("text_model", tx["depth"]), 0, tx["mlp_dim"]))
  for key, value, tensor, axis, want in checks:
    shape = shapes.get(tensor)
    if shape is None:
      raise InteropError(f"{where}: no tensor {tensor!r}, which config.json's architecture has; "
                         "the weights and config.json do not belong together")
    if len(shape) <= axis or shape[axis] != want:
      raise InteropError(f"{cfg}: {key} {value}, but {where}'s tensor {tensor!r} has shape "
                         f"{list(shape)}: the weights and config.json do not belong together; "
                         "restore the model's own config.json")


def _preprocessing(folder: str, model_config: dict) -> dict:
  """Image size, caption length, tokenizer file and text style from the processor files."""
  image_cfg = _read_json(os.path.join(folder, PREPROCESSOR), required=False)
  where = os.path.join(folder, PREPROCESSOR)
  if image_cfg is None:
    proc = _read_json(os.path.join(folder, PROCESSOR), required=False) or {}
    image_cfg = proc.get("image_processor")
    where = os.path.join(folder, PROCESSOR)
  image_size = model_config["image_size"]
  resample = "bicubic"
  if image_cfg:
    kind = image_cfg.get("image_processor_type", "SiglipImageProcessor")
    if not str(kind).startswith("SiglipImageProcessor"):
      raise InteropError(f"{where}: image_processor_type {kind!r}: only SiglipImageProcessor "
                         "(resize, 1/255, mean = std = 0.5) is supported")
    mean, std = image_cfg.get("image_mean", [0.5] * 3), image_cfg.get("image_std", [0.5] * 3)
    scale = float(image_cfg.get("rescale_factor", 1 / 255))
    if (not np.allclose(mean, 0.5) or not np.allclose(std, 0.5)
        or abs(scale - 1 / 255) > 1e-9):
      raise InteropError(f"{where}: image_mean {mean}, image_std {std}, rescale_factor "
                         f"{scale}: jest_pod feeds pixels in [-1, 1] (1/255, mean = std = "
                         "0.5, SigLIP's); other normalisations are not supported")
    if "size" in image_cfg:
      image_size = _int_size(image_cfg["size"], "size", where)
    resample = _RESAMPLE.get(image_cfg.get("resample", 3), str(image_cfg.get("resample")))
  if image_size != model_config["image_size"]:
    raise InteropError(f"{where}: resizes to {image_size}² but config.json's vision "
                       f"image_size is {model_config['image_size']}: the files do not belong "
                       "together")
  tok_path = os.path.join(folder, TOKENIZER_CONFIG)
  tok = _read_json(tok_path, required=False) or {}
  kind = tok.get("tokenizer_class", "SiglipTokenizer")
  if not str(kind).startswith("SiglipTokenizer"):
    raise InteropError(f"{tok_path}: tokenizer_class {kind!r}: only SiglipTokenizer (its "
                       "canonicalisation and sticky </s>) is supported")
  max_pos = model_config["text"]["max_len"]
  max_text_len = tok.get("model_max_length") or max_pos
  if isinstance(max_text_len, (int, float)) and not isinstance(max_text_len, bool) \
      and max_text_len > max_pos:  # "unset" is saved as a huge int (or 1e30)
    max_text_len = max_pos
  max_text_len = _positive_int(max_text_len, "model_max_length", tok_path)
  spiece = os.path.join(folder, SPIECE)
  if not os.path.isfile(spiece):
    raise InteropError(f"{spiece}: missing; put the checkpoint's sentencepiece model there "
                       "(SiglipTokenizer's vocab file, e.g. from the model's hub repo)")
  lower = bool(tok.get("do_lower_case", True))
  return {"image_size": int(image_size), "max_text_len": max_text_len, "spiece_path": spiece,
          "text_style": "siglip" if lower else "siglip_cased", "do_lower_case": lower,
          "resample": resample}


def read_config(path: str) -> tuple[dict, dict]:
  """(config.model, preprocessing) of the SiglipModel folder `path`, without the weights.

  preprocessing: image_size, max_text_len, spiece_path, text_style ("siglip" |
  "siglip_cased", from do_lower_case), do_lower_case, resample (the processor's resize
  filter; jest_pod's pipeline resizes its own way: identical only at the stored size).
  """
  path = str(path)
  if not os.path.isdir(path):
    raise InteropError(f"{path}: not a folder; a Hugging Face SiglipModel is a folder with "
                       f"{CONFIG} and {WEIGHTS}")
  guard.check_export_complete(path)
  cfg = os.path.join(path, CONFIG)
  model_config = _model_config(_read_json(cfg), cfg)
  files, where = _weight_files(path)
  shapes = {}
  for f in files:
    shapes.update(_safetensors_shapes(f))
  _check_against_weights(model_config, shapes, cfg, where)
  if model_config["embed_dim"] != model_config["image"]["width"]:
    raise InteropError(f"{cfg}: text_config.projection_size {model_config['embed_dim']} "
                       f"differs from vision_config.hidden_size {model_config['image']['width']}"
                       ": the towers' embeddings cannot be compared")
  return model_config, _preprocessing(path, model_config)


# ------------------------------------------------------------------------ the name map


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor ⇄ one or more big_vision leaves (flattened names)."""
  hf: str
  bv: tuple[str, ...]
  shape: tuple[int, ...]                                    # the HF tensor's shape
  to_hf: Callable[..., np.ndarray]                          # bv arrays → HF tensor
  to_bv: Callable[[np.ndarray], tuple[np.ndarray, ...]]     # HF tensor → bv arrays


def _copy(hf, bv, shape):
  return _Entry(hf, (bv,), shape, lambda a: a, lambda t: (t,))


def _reshape(hf, bv, shape, bv_shape):
  return _Entry(hf, (bv,), shape, lambda a: a.reshape(shape), lambda t: (t.reshape(bv_shape),))


def _linear(hf, bv, d_in, d_out):
  """Dense kernel [in, out] ⇄ Linear weight [out, in]."""
  return _Entry(hf, (bv,), (d_out, d_in), lambda a: a.T, lambda t: (t.T,))


def _layer_norm(hf, bv, w):
  return [_copy(f"{hf}.weight", f"{bv}/scale", (w,)), _copy(f"{hf}.bias", f"{bv}/bias", (w,))]


def _dense(hf, bv, d_in, d_out):
  return [_linear(f"{hf}.weight", f"{bv}/kernel", d_in, d_out),
          _copy(f"{hf}.bias", f"{bv}/bias", (d_out,))]


def _attention(hf, bv, w, heads, fused):
  """Self-attention (q/k/v/out_proj) or torch's nn.MultiheadAttention (in_proj, fused)."""
  hd = w // heads
  qkv = [f"{bv}/{n}" for n in ("query", "key", "value")]
  kernel = lambda a: a.reshape(w, w).T                       # [w, h, hd] → [out, in]
  unkernel = lambda t: t.T.reshape(w, heads, hd)
  out = [_Entry(f"{hf}.out_proj.weight", (f"{bv}/out/kernel",), (w, w),
                lambda a: a.reshape(w, w).T, lambda t: (t.T.reshape(heads, hd, w),)),
         _copy(f"{hf}.out_proj.bias", f"{bv}/out/bias", (w,))]
  if fused:
    return [_Entry(f"{hf}.in_proj_weight", tuple(f"{n}/kernel" for n in qkv), (3 * w, w),
                   lambda *a: np.concatenate([kernel(x) for x in a]),
                   lambda t: tuple(unkernel(x) for x in np.split(t, 3))),
            _Entry(f"{hf}.in_proj_bias", tuple(f"{n}/bias" for n in qkv), (3 * w,),
                   lambda *a: np.concatenate([x.reshape(w) for x in a]),
                   lambda t: tuple(x.reshape(heads, hd) for x in np.split(t, 3)))] + out
  entries = []
  for p, n in zip("qkv", qkv):
    entries.append(_Entry(f"{hf}.{p}_proj.weight", (f"{n}/kernel",), (w, w), kernel,
                          lambda t: (unkernel(t),)))
    entries.append(_reshape(f"{hf}.{p}_proj.bias", f"{n}/bias", (w,), (heads, hd)))
  return entries + out


def _mlp(hf, bv, w, mlp):
  return _dense(f"{hf}.fc1", f"{bv}/Dense_0", w, mlp) + _dense(f"{hf}.fc2", f"{bv}/Dense_1", mlp, w)


def _encoder(hf, bv, tower: dict) -> list:
  w, heads, mlp = tower["width"], tower["num_heads"], tower["mlp_dim"]
  entries = []
  for i in range(tower["depth"]):
    h, b = f"{hf}.encoder.layers.{i}", f"{bv}/encoderblock_{i}"
    entries += _layer_norm(f"{h}.layer_norm1", f"{b}/LayerNorm_0", w)
    entries += _attention(f"{h}.self_attn", f"{b}/MultiHeadDotProductAttention_0", w, heads, False)
    entries += _layer_norm(f"{h}.layer_norm2", f"{b}/LayerNorm_1", w)
    entries += _mlp(f"{h}.mlp", f"{b}/MlpBlock_0", w, mlp)
  return entries


def name_map(model_config) -> list[_Entry]:
  """Every HF tensor of a SiglipModel with this config.model, and its big_vision leaves."""
  im, tx, d = model_config["image"], model_config["text"], model_config["embed_dim"]
  w, p, tw = im["width"], im["patch_size"], tx["width"]
  g2 = (model_config["image_size"] // p) ** 2
  e = [_Entry("vision_model.embeddings.patch_embedding.weight", ("img/embedding/kernel",),
              (w, 3, p, p), lambda a: a.transpose(3, 2, 0, 1),
              lambda t: (t.transpose(2, 3, 1, 0),)),
       _copy("vision_model.embeddings.patch_embedding.bias", "img/embedding/bias", (w,)),
       _reshape("vision_model.embeddings.position_embedding.weight", "img/pos_embedding",
                (g2, w), (1, g2, w))]
  e += _encoder("vision_model", "img/Transformer", im)
  e += _layer_norm("vision_model.post_layernorm", "img/Transformer/encoder_norm", w)
  e += [_copy("vision_model.head.probe", "img/MAPHead_0/probe", (1, 1, w))]
  e += _attention("vision_model.head.attention", "img/MAPHead_0/MultiHeadDotProductAttention_0",
                  w, im["num_heads"], True)
  e += _layer_norm("vision_model.head.layernorm", "img/MAPHead_0/LayerNorm_0", w)
  e += _mlp("vision_model.head.mlp", "img/MAPHead_0/MlpBlock_0", w, im["mlp_dim"])
  e += [_copy("text_model.embeddings.token_embedding.weight", "txt/Embed_0/embedding",
              (tx["vocab_size"], tw)),
        _reshape("text_model.embeddings.position_embedding.weight", "txt/pos_embedding",
                 (tx["max_len"], tw), (1, tx["max_len"], tw))]
  e += _encoder("text_model", "txt/Encoder_0", tx)
  e += _layer_norm("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm", tw)
  e += _dense("text_model.head", "txt/head", tw, d)
  e += [_copy("logit_scale", "t", (1,)), _copy("logit_bias", "b", (1,))]
  return e


# ------------------------------------------------------------------------ safetensors


# safetensors dtypes and their bytes per element.
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _damaged(path: str, what: str) -> InteropError:
  return InteropError(f"{path}: not a readable safetensors file ({what}): truncated or "
                      "damaged; re-download it")


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{tensor: shape} from the file's header alone, each checked against the bytes the file
  holds (dtype × shape = its byte range, inside the data): nothing is loaded."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = int.from_bytes(head, "little") if len(head) == 8 else -1
      if n < 0 or n > min(size - 8, _MAX_HEADER):
        raise _damaged(path, f"a header of {n} bytes in a file of {size}")
      header = json.loads(f.read(n))
  except OSError as e:
    raise InteropError(f"{path}: cannot read it ({e.strerror or e}); check the path") from e
  except (ValueError, UnicodeDecodeError) as e:
    raise _damaged(path, f"its header is not JSON: {type(e).__name__}") from e
  if not isinstance(header, dict):
    raise _damaged(path, "its header is not a JSON object")
  data = size - 8 - n
  shapes = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
      ok = (dtype in _ST_BYTES and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and type(begin) is int and type(end) is int and 0 <= begin <= end <= data)
    except (KeyError, TypeError, ValueError):
      ok = False
    if not ok:
      raise _damaged(path, f"tensor {name!r}: header entry {str(info)[:120]} is not a dtype, "
                           f"shape and byte range inside its {data} data bytes")
    claimed = _ST_BYTES[dtype] * int(np.prod(shape, dtype=object))
    if claimed != end - begin:
      raise _damaged(path, f"tensor {name!r}: shape {shape} {dtype} is {claimed} bytes, its "
                           f"byte range {end - begin}")
    shapes[name] = tuple(shape)
  return shapes


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, TypeError, OSError)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise _damaged(path, msg) from e


def _weight_files(folder: str) -> tuple[list[str], str]:
  """The folder's safetensors files (one, or the shards of an index), and what to name."""
  single = os.path.join(folder, WEIGHTS)
  if os.path.isfile(single):
    return [single], single
  index_path = os.path.join(folder, WEIGHTS_INDEX)
  index = _read_json(index_path, required=False)
  if index is None:
    raise InteropError(f"{single}: missing (nor {WEIGHTS_INDEX}); this reader takes "
                       "safetensors weights only (save with safe_serialization=True)")
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise InteropError(f"{index_path}: no weight_map; re-download it")
  shards = sorted(set(map(str, weight_map.values())))
  for shard in shards:
    # Shard names stay inside the folder: an index cannot make the reader open other files.
    if os.path.basename(shard) != shard or shard in (".", ".."):
      raise InteropError(f"{index_path}: weight_map names {shard!r}, not a file of this "
                         "folder; re-download the index")
    if not os.path.isfile(os.path.join(folder, shard)):
      raise InteropError(f"{os.path.join(folder, shard)}: missing ({WEIGHTS_INDEX} names it); "
                         "download every shard")
  return [os.path.join(folder, s) for s in shards], index_path


def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of the folder (one file, or the shards of an index), and what to name."""
  files, where = _weight_files(folder)
  tensors = {}
  for f in files:
    tensors.update(_load_safetensors(f))
  return tensors, where


# Buffers some transformers versions save beside the parameters; not weights.
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def read_folder(path: str, *, scan: bool = False) -> tuple[dict, dict, dict]:
  """A SiglipModel folder → (config.model, params, preprocessing) (see `read_config`);
  params are float32 numpy in SiglipTwoTower's tree, loop layout (scan with `scan=True`;
  config["scan_layers"] says which). BF16/F16 tensors widen exactly."""
  model_config, pre = read_config(path)
  tensors, where = _read_tensors(str(path))
  entries = name_map(model_config)
  flat = {}
  for e in entries:
    t = tensors.get(e.hf)
    if t is None:
      raise InteropError(f"{where}: no tensor {e.hf!r}, which config.json's architecture has; "
                         "the weights and config.json do not belong together")
    if tuple(t.shape) != e.shape:
      raise InteropError(f"{where}: tensor {e.hf!r} has shape {list(t.shape)}, config.json "
                         f"implies {list(e.shape)}; the weights and config.json do not belong "
                         "together")
    for name, a in zip(e.bv, e.to_bv(np.asarray(t, np.float32))):
      flat[name] = np.ascontiguousarray(a)
  known = {e.hf for e in entries} | set(_IGNORED)
  extra = sorted(set(tensors) - known)
  if extra:
    raise InteropError(f"{where}: {len(extra)} tensors config.json's SiglipModel does not have "
                       f"(e.g. {extra[0]!r}); not a SiglipModel checkpoint, or config.json is "
                       "another model's")
  params: dict = {}
  for name, a in flat.items():
    *parents, leaf = name.split("/")
    node = params
    for q in parents:
      node = node.setdefault(q, {})
    node[leaf] = a
  model_config["scan_layers"] = bool(scan)
  return model_config, (siglip.to_scan(params) if scan else params), pre


# ------------------------------------------------------------------------ writing


def _special_ids(tokenizer_proto: bytes) -> dict[str, int]:
  sp = spm.SentencePieceProcessor(model_proto=tokenizer_proto)
  ids = {}
  for piece in ("</s>", "<unk>"):
    i = sp.piece_to_id(piece)
    if sp.id_to_piece(i) != piece:
      raise InteropError(f"the tokenizer has no {piece!r} piece, which SiglipTokenizer needs "
                         "(eos = pad = </s>, unk = <unk>)")
    ids[piece] = int(i)
  return ids


def _token(content: str) -> dict:
  return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False}


def _write_json(path: str, data: dict) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")


def write_folder(path: str, model_config, params, *, tokenizer_proto: bytes, image_size: int,
                 max_text_len: int, do_lower_case: bool = True, dtype: str = "float32") -> None:
  """SiglipTwoTower params (either layout, host or device arrays) → a folder that
  `SiglipModel.from_pretrained` and `SiglipProcessor.from_pretrained` load: config.json,
  model.safetensors (`dtype` "float32" | "bfloat16" | "float16"), spiece.model,
  tokenizer_config.json, special_tokens_map.json, preprocessor_config.json.

  `image_size` is the pipeline's (it must be the model's: transformers does not resize
  position embeddings by default); `max_text_len` the caption length (model_max_length);
  `do_lower_case` False for text style "siglip_cased".
  """
  mc = model_config
  if mc.get("family", "flexivit") != "siglip":
    raise InteropError(f"{path}: only model.family='siglip' maps to a SiglipModel (this model "
                       f"is {mc.get('family', 'flexivit')!r})")
  if int(image_size) != int(mc["image_size"]):
    raise InteropError(f"{path}: image_size {image_size} differs from the model's "
                       f"{mc['image_size']}; SiglipModel takes images at its own size")
  if int(max_text_len) > int(mc["text"]["max_len"]):
    raise InteropError(f"{path}: max_text_len {max_text_len} exceeds the text tower's "
                       f"{mc['text']['max_len']} positions")
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
              "float16": np.float16}[dtype]
  special = _special_ids(tokenizer_proto)
  tree = siglip.to_loop(jax.tree.map(np.asarray, params))

  def leaf(name):
    node = tree
    for k in name.split("/"):
      node = node[k]
    return np.asarray(node, np.float32)

  tensors = {}
  for e in name_map(mc):
    t = e.to_hf(*(leaf(n) for n in e.bv))
    if tuple(t.shape) != e.shape:
      raise InteropError(f"{path}: {e.bv[0]} has shape {list(leaf(e.bv[0]).shape)}, which "
                         f"does not fit the model config (HF {e.hf} {list(e.shape)})")
    tensors[e.hf] = np.ascontiguousarray(t.astype(np_dtype))
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, f".{WEIGHTS}.tmp-{os.getpid()}")
  safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(path, WEIGHTS))

  im, tx = mc["image"], mc["text"]
  eos = special["</s>"]
  _write_json(os.path.join(path, CONFIG), {
      "architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0,
      "dtype": dtype,
      "text_config": {
          "model_type": "siglip_text_model", "vocab_size": int(tx["vocab_size"]),
          "hidden_size": int(tx["width"]), "intermediate_size": int(tx["mlp_dim"]),
          "num_hidden_layers": int(tx["depth"]), "num_attention_heads": int(tx["num_heads"]),
          "max_position_embeddings": int(tx["max_len"]), "projection_size": int(mc["embed_dim"]),
          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
          "pad_token_id": eos, "eos_token_id": eos, "bos_token_id": None},
      "vision_config": {
          "model_type": "siglip_vision_model", "hidden_size": int(im["width"]),
          "intermediate_size": int(im["mlp_dim"]), "num_hidden_layers": int(im["depth"]),
          "num_attention_heads": int(im["num_heads"]), "num_channels": 3,
          "image_size": int(mc["image_size"]), "patch_size": int(im["patch_size"]),
          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
          "vision_use_head": True},
  })
  with open(os.path.join(path, SPIECE), "wb") as f:
    f.write(tokenizer_proto)
  _write_json(os.path.join(path, TOKENIZER_CONFIG), {
      "tokenizer_class": "SiglipTokenizer", "processor_class": "SiglipProcessor",
      "do_lower_case": bool(do_lower_case), "model_max_length": int(max_text_len),
      "model_input_names": ["input_ids"], "eos_token": "</s>", "pad_token": "</s>",
      "unk_token": "<unk>", "additional_special_tokens": [], "sp_model_kwargs": {},
      "clean_up_tokenization_spaces": True,
      "added_tokens_decoder": {str(special[p]): {**_token(p), "special": True}
                               for p in ("</s>", "<unk>")},
  })
  _write_json(os.path.join(path, SPECIAL_TOKENS), {
      "eos_token": _token("</s>"), "pad_token": _token("</s>"), "unk_token": _token("<unk>")})
  _write_json(os.path.join(path, PREPROCESSOR), {
      "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
      "do_resize": True, "size": {"height": int(image_size), "width": int(image_size)},
      "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True})
