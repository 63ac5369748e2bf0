"""big_vision's SigLIP .npz checkpoints ⇄ models.siglip.SiglipTwoTower parameters.

The tree is big_vision's, so a checkpoint is the tree flattened with "/": keys
`params/img/...`, `params/txt/...`, `params/t`, `params/b` as big_vision saves them (the
published SigLIP files have the same keys without "params/"; both are read). The whole
architecture is read off the shapes (`infer_config`). Loop (`encoderblock_{i}`) and scan
(one stacked `encoderblock`, e.g. the So400m files) layouts are both read; the caller picks
the layout it gets. bfloat16 arrays, which big_vision stores as 2-byte void ('V2'), are
recovered; parameters come back float32.

Before any array is read, every member that will be is checked (`_check_members`): its
zip entry's uncompressed size against its stored size (a member inflating more than
_BOMB_RATIO× past _BOMB_MIN is refused), its .npy header's shape × itemsize against the
bytes the member holds, and the total parameter count (guard.check_param_count). A
folder holding one .npz (what `jest-pod export --format big_vision` writes: model.npz +
spiece.model + its marker) is read as that .npz.
"""

from __future__ import annotations

import os
import re
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from jest_pod.interop import InteropError, guard
from jest_pod.models import build_model, siglip

__all__ = ["InteropError", "infer_config", "read_npz", "resolve", "write_npz"]

NPZ = "model.npz"  # the npz's name inside an export folder
# Float weights barely deflate (~1.1×); a large member that inflates 50× is not weights.
_BOMB_MIN, _BOMB_RATIO = 64 * 2**20, 50

_PREFIXES = ("params/", "opt/target/", "")  # big_vision training checkpoints, then shared ones


def _unflatten(items) -> dict:
  tree: dict = {}
  for key, value in items:
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": x}} → {"a/b": x} (big_vision's names)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _as_float32(a: np.ndarray) -> np.ndarray:
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # big_vision's bfloat16 on disk
    a = a.view(ml_dtypes.bfloat16)
  return np.asarray(a, np.float32)


def _encoder(tree: dict, tower: str, enc: str, path: str) -> dict:
  try:
    return tree[tower][enc]
  except KeyError:
    raise InteropError(f"{path}: no {tower}/{enc}/ arrays: not a SigLIP two-tower checkpoint "
                       "of big_vision (vit image tower + text_transformer)") from None


def _block_shapes(enc: dict, path: str, where: str):
  """(depth, heads, mlp_dim) of one encoder, loop or scan layout."""
  if "encoderblock" in enc:
    block, depth = enc["encoderblock"], None
    lead = 1
  else:
    blocks = [k for k in enc if re.fullmatch(r"encoderblock_\d+", k)]
    if not blocks:
      raise InteropError(f"{path}: {where} has no encoderblock arrays")
    block, depth, lead = enc["encoderblock_0"], len(blocks), 0
  try:
    q = block["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    mlp = block["MlpBlock_0"]["Dense_0"]["kernel"]
  except KeyError as e:
    raise InteropError(f"{path}: {where}/encoderblock has no {e.args[0]}: not big_vision's "
                       "ViT block layout") from None
  if depth is None:
    depth = q.shape[0]
  return depth, int(q.shape[lead + 1]), int(mlp.shape[-1])


def infer_config(params: dict, path: str = "checkpoint") -> dict:
  """config.model (family "siglip") from the shapes of a big_vision SigLIP tree."""
  img, txt = params.get("img"), params.get("txt")
  if img is None or txt is None:
    raise InteropError(f"{path}: no img/ and txt/ arrays: not a big_vision SigLIP two-tower "
                       "checkpoint (an image-only npz cannot be loaded as a two-tower model)")
  if "MAPHead_0" not in img:
    raise InteropError(f"{path}: the image tower has no MAPHead_0 (pool_type other than "
                       "'map'): only SigLIP's MAP-pooled towers are supported")
  if "b" not in params or "t" not in params:
    raise InteropError(f"{path}: no t/b (temperature and bias): not a SigLIP (sigmoid) "
                       "checkpoint; LiT/CLIP-style softmax checkpoints are not supported")
  kernel = img["embedding"]["kernel"]
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
    raise InteropError(f"{path}: img/embedding/kernel has shape {kernel.shape}, expected "
                       "[p, p, 3, width]")
  patch, width = int(kernel.shape[0]), int(kernel.shape[3])
  tokens = int(img["pos_embedding"].shape[1])
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise InteropError(f"{path}: img/pos_embedding has {tokens} positions, not a square grid "
                       "(a class token, or a non-square image: not supported)")
  depth, heads, mlp = _block_shapes(_encoder(params, "img", "Transformer", path), path,
                                    "img/Transformer")
  vocab, twidth = (int(n) for n in txt["Embed_0"]["embedding"].shape)
  tdepth, theads, tmlp = _block_shapes(_encoder(params, "txt", "Encoder_0", path), path,
                                       "txt/Encoder_0")
  embed = int(txt["head"]["kernel"].shape[1]) if "head" in txt else twidth
  return {
      "family": "siglip",
      "image_size": grid * patch,
      "embed_dim": embed,
      "image": dict(patch_size=patch, width=width, depth=depth, num_heads=heads, mlp_dim=mlp),
      "text": dict(vocab_size=vocab, max_len=int(txt["pos_embedding"].shape[1]), width=twidth,
                   depth=tdepth, num_heads=theads, mlp_dim=tmlp),
  }


def _check_shapes(params: dict, model_config: dict, path: str) -> None:
  """Every array where SiglipTwoTower (built from the inferred config) has one, same shape."""
  mc = ml_collections.ConfigDict({**model_config, "scan_layers": False})
  s = mc.image_size
  want = jax.eval_shape(build_model(mc).init, jax.random.key(0), jnp.zeros((1, s, s, 3)),
                        jnp.zeros((1, mc.text["max_len"]), jnp.int32))["params"]
  want = {k: tuple(v.shape) for k, v in flatten(want).items()}
  have = {k: tuple(v.shape) for k, v in flatten(siglip.to_loop(params)).items()}
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  if missing or extra:
    what = (f"missing {', '.join(missing[:4])}" if missing else
            f"unexpected {', '.join(extra[:4])}")
    raise InteropError(f"{path}: {what}{' ...' if len(missing or extra) > 4 else ''}: not the "
                       "parameter set of big_vision's SigLIP two towers")
  for k, shape in want.items():
    if have[k] != shape:
      raise InteropError(f"{path}: {k} has shape {list(have[k])}, the architecture read from "
                         f"the other arrays needs {list(shape)}: a damaged or mixed checkpoint")


def resolve(path: str) -> str:
  """The .npz `path` names: the file itself, or the one .npz of a folder (an export's).
  Either is refused when it belongs to an export that did not finish."""
  path = str(path)
  if not os.path.isdir(path):
    guard.check_containing_export(path)
    return path
  guard.check_export_complete(path)
  npzs = sorted(f for f in os.listdir(path)
                if f.endswith(".npz") and os.path.isfile(os.path.join(path, f)))
  if len(npzs) != 1:
    raise InteropError(f"{path}: a folder with {len(npzs)} .npz files; a big_vision export "
                       f"holds one ({NPZ}, beside spiece.model): name the .npz itself")
  return os.path.join(path, npzs[0])


def _npy_header(f, version):
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f".npy format version {version} (1.0 and 2.0 hold weights)")


def _check_members(path: str, z: zipfile.ZipFile, members: dict) -> None:
  """Every member about to be read, from its zip entry and .npy header only: what it
  inflates to, what its header claims, and the parameter count they add up to."""
  size = os.path.getsize(path)
  count = 0
  for key, info in members.items():
    where = f"{path}: member {key}"
    if info.compress_size > size:
      raise InteropError(f"{where} claims {info.compress_size} stored bytes in a file of "
                         f"{size}: truncated or damaged; re-download or re-export it")
    if info.file_size > _BOMB_MIN and info.file_size > _BOMB_RATIO * max(info.compress_size, 1):
      raise InteropError(f"{where} inflates {info.compress_size} stored bytes to "
                         f"{info.file_size} ({info.file_size // max(info.compress_size, 1)}×): "
                         "not float weights (a zip bomb or a damaged file); re-download or "
                         "re-export it")
    try:
      with z.open(info) as f:
        shape, _, dtype = _npy_header(f, np.lib.format.read_magic(f))
        header = f.tell()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise InteropError(f"{where}: not a readable .npy header ({type(e).__name__}: "
                         f"{str(e)[:120]}); re-download or re-export it") from e
    if dtype.hasobject:
      raise InteropError(f"{where}: dtype {dtype} holds Python objects, not weights")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need != info.file_size - header:
      raise InteropError(f"{where}: its .npy header claims shape {list(shape)} {dtype} "
                         f"({need} bytes), the member holds {info.file_size - header}: "
                         "damaged; re-download or re-export it")
    count += int(np.prod(shape, dtype=object))
  guard.check_param_count(count, path, "its arrays")


def read_npz(path: str, *, scan: bool = False) -> tuple[dict, dict]:
  """A big_vision SigLIP .npz (or a folder holding one) → (config.model dict, params) in
  SiglipTwoTower's tree, loop layout (or scan with `scan=True`; config["scan_layers"]
  says which).

  A text tower without `head` (so400m-256-i18n) gets an identity head (kernel I, bias 0),
  as transformers' converter does; t/b of shape [] become [1]. A text `pos_embedding`
  left inside Encoder_0 by old checkpoints is added to the outer one (big_vision's fix).
  Sizes are checked before anything is read (`_check_members`).
  """
  path = str(path)
  if not os.path.exists(path):
    raise InteropError(f"{path}: no such file")
  path = resolve(path)
  try:
    with zipfile.ZipFile(path) as z:
      members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i
                 for i in z.infolist()}
      prefix = next((p for p in _PREFIXES if any(n.startswith(p + "img/") for n in members)),
                    None)
      if prefix is None:
        raise InteropError(f"{path}: no img/... arrays (nor params/img/...): not a big_vision "
                           "SigLIP checkpoint")
      _check_members(path, z, {k: i for k, i in members.items() if k.startswith(prefix)})
    npz = np.load(path, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise InteropError(f"{path}: a single array, not an .npz of named parameters")
    with npz:
      items = [(n[len(prefix):], _as_float32(npz[n])) for n in npz.keys() if n.startswith(prefix)]
  except InteropError:
    raise
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise InteropError(f"{path}: cannot read it as an .npz ({type(e).__name__}: {e}); "
                       "re-download or re-export it") from e
  params = _unflatten(items)
  for k in ("t", "b"):
    if k in params and np.ndim(params[k]) == 0:
      params[k] = np.reshape(params[k], (1,))
  txt = params.get("txt", {})
  if isinstance(txt.get("Encoder_0"), dict) and "pos_embedding" in txt["Encoder_0"]:
    txt["pos_embedding"] = txt["pos_embedding"] + txt["Encoder_0"].pop("pos_embedding")
  model_config = infer_config(params, path)
  if "head" not in txt:
    w = model_config["text"]["width"]
    txt["head"] = {"kernel": np.eye(w, dtype=np.float32), "bias": np.zeros((w,), np.float32)}
  _check_shapes(params, model_config, path)
  model_config["scan_layers"] = bool(scan)
  return model_config, (siglip.to_scan(params) if scan else siglip.to_loop(params))


def write_npz(path: str, params, *, scan: bool = False) -> None:
  """SiglipTwoTower params (either layout, host or device arrays) → `path` with big_vision's
  `params/...` keys, loop layout (or scan), float32 as stored. Written to a temporary name
  and renamed, so a crash leaves no half file."""
  tree = jax.tree.map(np.asarray, params)
  tree = siglip.to_scan(tree) if scan else siglip.to_loop(tree)
  arrays = {f"params/{k}": np.asarray(v) for k, v in flatten(tree).items()}
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
