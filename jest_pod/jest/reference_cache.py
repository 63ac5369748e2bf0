"""Reference embeddings computed once per example, so JEST steps skip the reference pass.

The reference model θ* is frozen (JEST never trains it), so its embeddings of an example
never change: `jest-pod data cache-reference --data DIR --reference REF_WORKDIR` embeds
every record of a data set once and writes DIR/reference_cache/ (local or gs://) with

  image/, text/   zarr v3 arrays (tensorstore), bfloat16 [rows, d]; shards of
                  SHARD_ROWS rows written whole, read one row at a time (sharding codec,
                  uncompressed), so a look-up of b rows reads ~b × d × 2 bytes: O(batch)
  meta.json       written last: its presence marks a complete cache. Temperature, bias,
                  the row layout, the build's cost (`seconds`, `flops`) and the
                  fingerprint a cache is checked against (`open_cache`): the data set's
                  shard checksums, the tokenizer's sha256, image_size, max_text_len and the
                  reference's path, step and `params_digest`.

Pod scale: run the same command on every host (jax.distributed from the JEST_POD_*
environment, as for training). Host p embeds records p::P on its local devices (the
eval iterator's split) and writes them as one contiguous, shard-aligned block of rows,
so no two hosts ever write the same shard: record i lives at row
(i % P) · rows_per_process + i // P (meta["layout"]; P = 1 → row i). Process 0 creates
the arrays, waits for everyone (a barrier), then writes meta.json; locally the cache is
built under OUTPUT.tmp and renamed into place, on gs:// meta.json written last is the
completion marker (a cache without it is refused as incomplete).

The trainer opens it with `open_cache(...)` and looks rows up by `batch["index"]` on the
host (`ReferenceCache.lookup`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np

log = logging.getLogger("jest_pod")

CACHE_DIR = "reference_cache"
META = "meta.json"
SHARD_ROWS = 4096      # rows per stored shard (one object / file per shard and array)
READ_ROWS = 1          # rows per read unit inside a shard (the look-up granularity)
FORMAT = "jest_pod reference cache v2 (zarr3 bf16, sharded by rows)"
LOG_EVERY_S = 10.0


class ReferenceCacheError(ValueError):
  """A cache that is missing, incomplete, stale or for other data; the message says what
  to run."""


# ------------------------------------------------------------------- storage helpers


def _kvstore(path: str) -> dict:
  """A tensorstore kvstore spec of the folder `path` (local or gs://bucket/...)."""
  if path.startswith("gs://"):
    bucket, _, rest = path[len("gs://"):].partition("/")
    rest = rest.strip("/")
    return {"driver": "gcs", "bucket": bucket, "path": rest + "/" if rest else ""}
  if "://" in path:
    raise ReferenceCacheError(f"{path}: only local paths and gs:// are supported")
  return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _is_local(path: str) -> bool:
  return "://" not in path


def _join(path: str, name: str) -> str:
  return path.rstrip("/") + "/" + name if not _is_local(path) else os.path.join(path, name)


def read_meta(path: str) -> dict | None:
  """meta.json of the cache at `path`, or None when there is none (missing/incomplete)."""
  import tensorstore as ts
  if _is_local(path) and not os.path.isdir(path):
    return None
  kv = ts.KvStore.open(_kvstore(path)).result()
  r = kv.read(META).result()
  if r.state != "value":
    return None
  return json.loads(bytes(r.value).decode())


def _write_meta(path: str, meta: dict) -> None:
  import tensorstore as ts
  kv = ts.KvStore.open(_kvstore(path)).result()
  kv.write(META, json.dumps(meta, indent=1).encode()).result()


def _delete_meta(path: str) -> None:
  import tensorstore as ts
  kv = ts.KvStore.open(_kvstore(path)).result()
  kv.delete(META).result()


def _array_spec(path: str, name: str) -> dict:
  return {"driver": "zarr3", "kvstore": _kvstore(_join(path, name))}


def _create_arrays(path: str, rows: int, dim: int) -> None:
  import tensorstore as ts
  for name in ("image", "text"):
    spec = _array_spec(path, name)
    spec["metadata"] = {
        "shape": [rows, dim], "data_type": "bfloat16",
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [SHARD_ROWS, dim]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [READ_ROWS, dim],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                             {"name": "crc32c"}]}}]}
    ts.open(spec, create=True, delete_existing=True).result()


def _open_arrays(path: str, cache_bytes: int = 64 << 20):
  import tensorstore as ts
  # One context: the pool caches shard indices (16 bytes per row) and recent rows.
  ctx = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
  return tuple(ts.open(_array_spec(path, name), open=True, context=ctx).result()
               for name in ("image", "text"))


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------- fingerprint


def _data_fingerprint(data_dir):
  from jest_pod.data import manifest as manifest_lib
  m = manifest_lib.read(data_dir)
  return {"num_examples": m["num_examples"],
          "shards": [[s["file"], s.get("sha256", ""), s["num_records"]] for s in m["shards"]]}


def params_digest(params) -> str:
  """sha256 over every parameter leaf in tree order: its key path, dtype, shape and bytes.

  Independent of devices and sharding (a replicated jax.Array is read from one local
  copy). ~1 s per GB of parameters.
  """
  import jax
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


def _reference_identity(path: str, sharding=None) -> tuple[dict, object, object]:
  """(identity {path, step, params_digest}, config, params) of a reference checkpoint."""
  from jest_pod import checkpoint
  config, params, step = checkpoint.load_params(path, sharding=sharding)
  ident = {"path": path if not _is_local(path) else os.path.abspath(path),
           "step": int(step), "params_digest": params_digest(params)}
  return ident, config, params


def _rebuild_command(data_dir: str, reference: str, output: str | None) -> str:
  cmd = f"jest-pod data cache-reference --data {data_dir} --reference {reference}"
  if output and os.path.normpath(output) != os.path.normpath(os.path.join(data_dir, CACHE_DIR)):
    cmd += f" --output {output}"
  return cmd


# ----------------------------------------------------------------------------- build


def build_cache(data_dir: str, reference: str, *, batch_size: int = 256,
                output: str | None = None, image_size: int | None = None,
                max_text_len: int | None = None, tokenizer: str | None = None) -> str:
  """Embeds every record of `data_dir` with the reference checkpoint; returns the cache dir.

  Call it on every process of a multi-host job (after `jest_pod.parallel.distributed.initialize()`);
  each embeds and writes its share. `image_size`, `max_text_len`, `tokenizer` default to
  the reference's own config (pass the trainer's when they differ: the fingerprint must
  match the run that uses the cache).
  """
  import jax
  import ml_dtypes

  from jest_pod import embed
  from jest_pod.parallel import sharding as shd
  from jest_pod.data import pipeline
  from jest_pod.data import tokenizer as tokenizer_lib
  from jest_pod.models import build_model
  from jest_pod.models import flops as flops_lib

  t_start = time.perf_counter()
  pi, pc = jax.process_index(), jax.process_count()
  output = output or os.path.join(data_dir, CACHE_DIR)
  # Every host embeds its own records on its own devices: no cross-host communication.
  local_mesh = shd.make_mesh((("data", -1),), jax.local_devices())
  ident, config, params = _reference_identity(reference, shd.replicated(local_mesh))
  model = build_model(config.model)
  image_size = int(image_size or config.model.image_size)
  max_text_len = int(max_text_len or config.input.max_text_len)
  tok = tokenizer_lib.resolve(config.input, tokenizer)
  data = _data_fingerprint(data_dir)
  n = int(data["num_examples"])
  dim = int(config.model.embed_dim)
  per_host = math.ceil(n / pc)
  mine = len(range(pi, n, pc))
  rows_per_process = per_host if pc == 1 else -(-per_host // SHARD_ROWS) * SHARD_ROWS
  work = output + ".tmp" if _is_local(output) else output

  if pi == 0:
    if _is_local(output):
      shutil.rmtree(work, ignore_errors=True)
      os.makedirs(work)
    elif read_meta(output) is not None:
      _delete_meta(output)  # no meta.json while rewriting: readers see "incomplete"
    _create_arrays(work, pc * rows_per_process, dim)
  _barrier("reference_cache:created")
  image_arr, text_arr = _open_arrays(work)

  batches = pipeline.make_eval_iterator(
      data_dir, batch_size=batch_size, image_size=image_size, max_text_len=max_text_len,
      tokenizer=tok, process_index=pi, process_count=pc)
  embedded = embed.embed_stream(embed.encode_fn_for(model, image=True, text=True), params,
                                batches, local_mesh, device_keys=("image", "text"))
  base = pi * rows_per_process
  buf_img, buf_txt, buffered, written, real, done = [], [], 0, 0, 0, 0
  futures = []
  t0 = last_log = time.perf_counter()

  def flush(upto_all: bool):
    nonlocal buf_img, buf_txt, buffered, written
    m = buffered if upto_all else (buffered // SHARD_ROWS) * SHARD_ROWS
    if m == 0:
      return
    img = np.concatenate(buf_img)
    txt = np.concatenate(buf_txt)
    lo, hi = base + written, base + written + m
    futures.append(image_arr[lo:hi].write(img[:m]))
    futures.append(text_arr[lo:hi].write(txt[:m]))
    buf_img, buf_txt = [img[m:]], [txt[m:]]
    buffered -= m
    written += m

  for out in embedded:  # rows [:batch_size] are the batch's, in order
    take = min(batch_size, mine - done)
    if take <= 0:
      break
    real += int(out["mask"][:take].sum())
    buf_img.append(out["image"][:take].astype(ml_dtypes.bfloat16))
    buf_txt.append(out["text"][:take].astype(ml_dtypes.bfloat16))
    buffered += take
    done += take
    if buffered >= SHARD_ROWS:
      flush(False)
    now = time.perf_counter()
    if now - last_log >= LOG_EVERY_S and pi == 0:
      rate = done / (now - t0)
      log.info("reference cache: %d/%d examples (this host; %d hosts), %.0f examples/s "
               "(all hosts ≈ %.0f), ETA %.0fs", done, mine, pc, rate, rate * pc,
               (mine - done) / max(rate, 1e-9))
      last_log = now
  flush(True)
  for f in futures:
    f.result()
  embed_seconds = time.perf_counter() - t0

  stats = np.array([real, mine], np.int64)
  if pc > 1:
    from jax.experimental import multihost_utils
    _barrier("reference_cache:written")
    stats = np.asarray(multihost_utils.process_allgather(stats)).reshape(pc, 2)
  else:
    stats = stats.reshape(1, 2)
  embedded, expected = int(stats[:, 0].sum()), int(stats[:, 1].sum())
  if embedded != n or expected != n:
    if pi == 0 and _is_local(output):
      shutil.rmtree(work, ignore_errors=True)
    raise ReferenceCacheError(
        f"{data_dir}: embedded {embedded} of {n} records (some failed to decode); a cache "
        "needs every row — re-ingest the data set or train without a cache")

  if pi == 0:
    _, _, extras = model.apply({"params": params}, None, None)
    patch = int(config.model.image["patch_size"])
    per_example = flops_lib.example_forward_flops(config.model, image_size, patch,
                                                  max_text_len)
    meta = {"format": FORMAT, "num_examples": n, "dim": dim,
            "temperature": float(extras["t"]), "bias": float(extras["b"]),
            "layout": {"process_count": pc, "rows_per_process": rows_per_process,
                       "shard_rows": SHARD_ROWS},
            "fingerprint": {"data": data, "tokenizer_sha256": tok.sha256,
                            "image_size": image_size, "max_text_len": max_text_len,
                            "reference": ident},
            "tokenizer": tok.path, "batch_size": batch_size,
            "flops": float(n * per_example), "flops_per_example": float(per_example),
            "embed_seconds": round(embed_seconds, 2),
            "seconds": round(time.perf_counter() - t_start, 2)}
    _write_meta(work, meta)  # last: a cache with meta.json is complete
    if _is_local(output):    # swap atomically: a crash leaves the old cache or the new
      old = output + ".old"
      shutil.rmtree(old, ignore_errors=True)
      if os.path.exists(output):
        os.rename(output, old)
      os.rename(work, output)
      shutil.rmtree(old, ignore_errors=True)
    log.info("reference cache: %d examples (%d host(s)) in %.1fs (%.0f examples/s), "
             "%.3g FLOPs → %s", n, pc, meta["seconds"], n / max(embed_seconds, 1e-9),
             meta["flops"], output)
  _barrier("reference_cache:done")
  return output


# ------------------------------------------------------------------------------ read


def default_cache_path(data_dir: str) -> str | None:
  """DATA/reference_cache when it holds a complete cache (meta.json), else None."""
  path = _join(data_dir, CACHE_DIR)
  try:
    return path if read_meta(path) is not None else None
  except Exception:  # pylint: disable=broad-except
    return None


class ReferenceCache:
  """Cached reference embeddings of one data set; rows read on demand (tensorstore).

  Open it with `open_cache` (checks the whole fingerprint). `ReferenceCache(path,
  data_dir)` checks only the data set (kept for old callers).
  """

  def __init__(self, path: str, data_dir: str | None = None, *, meta: dict | None = None):
    self.path = path
    if meta is None:
      meta = read_meta(path)
      if meta is None:
        raise ReferenceCacheError(_missing_message(path, data_dir or "DATA", None))
      if data_dir is not None and _fingerprint(meta)["data"] != _data_fingerprint(data_dir):
        raise ReferenceCacheError(
            f"reference cache {path} was built for other data than {data_dir} (shard "
            f"checksums differ); rebuild it with `jest-pod data cache-reference --data "
            f"{data_dir} --reference {_fingerprint(meta)['reference']['path']}`")
    if meta.get("format") != FORMAT:
      raise ReferenceCacheError(
          f"reference cache {path} has an old format ({meta.get('format', 'npy v1')}); "
          "rebuild it with `jest-pod data cache-reference`")
    self.meta = meta
    self.temperature = np.float32(meta["temperature"])
    self.bias = np.float32(meta["bias"])
    self.num_examples = int(meta["num_examples"])
    self.dim = int(meta["dim"])
    self._pc = int(meta["layout"]["process_count"])
    self._rows = int(meta["layout"]["rows_per_process"])
    self._image, self._text = _open_arrays(path)

  def rows_of(self, index: np.ndarray) -> np.ndarray:
    """Source indices → storage rows (meta["layout"])."""
    index = np.asarray(index, np.int64)
    if index.size and (index.min() < 0 or index.max() >= self.num_examples):
      raise IndexError(f"reference cache {self.path}: index out of [0, {self.num_examples})")
    return (index % self._pc) * self._rows + index // self._pc

  def lookup(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [b] (int64) → (image [b, d], text [b, d]) float32; reads b rows."""
    rows = self.rows_of(np.asarray(index).reshape(-1))
    fi, ft = self._image[rows].read(), self._text[rows].read()
    return np.asarray(fi.result(), np.float32), np.asarray(ft.result(), np.float32)


def _fingerprint(meta: dict) -> dict:
  if "fingerprint" not in meta:  # v1 cache (npy)
    return {"data": meta.get("data"), "reference": {"path": meta.get("reference", "?")}}
  return meta["fingerprint"]


def _missing_message(path, data_dir, reference):
  what = ("is incomplete (no meta.json: its build did not finish)"
          if (_is_local(path) and os.path.isdir(path)) or not _is_local(path)
          else "does not exist")
  return (f"reference cache {path} {what}; build it with `jest-pod data cache-reference "
          f"--data {data_dir} --reference {reference or 'REF'}`"
          + ("" if os.path.normpath(path) == os.path.normpath(os.path.join(data_dir, CACHE_DIR))
             else f" --output {path}"))


def open_cache(path: str, *, data_dir: str, reference: str | None, image_size: int,
               max_text_len: int, tokenizer_sha256: str) -> ReferenceCache:
  """Opens the cache at `path` for a run on `data_dir`; ReferenceCacheError unless it was
  built from the same data set, tokenizer, image_size, max_text_len and reference.

  `reference` = the run's reference checkpoint (its params are loaded and digested);
  None or '' skips the reference check with a warning naming the cache's reference.
  """
  meta = read_meta(path)
  if meta is None:
    raise ReferenceCacheError(_missing_message(path, data_dir, reference))
  fp = _fingerprint(meta)
  recorded = fp.get("reference", {})
  cmd = _rebuild_command(data_dir, reference or recorded.get("path", "REF"), path)
  if meta.get("format") != FORMAT:
    raise ReferenceCacheError(f"reference cache {path} has an old format "
                              f"({meta.get('format', 'npy v1')}); rebuild it with `{cmd}`")
  diffs = []
  if fp["data"] != _data_fingerprint(data_dir):
    diffs.append(f"it was built for other data than {data_dir} (shard checksums differ)")
  if fp["tokenizer_sha256"] != tokenizer_sha256:
    diffs.append(f"tokenizer: sha256 {fp['tokenizer_sha256'][:12]}… ({meta.get('tokenizer')})"
                 f" in the cache, {str(tokenizer_sha256)[:12]}… in this run")
  if int(fp["image_size"]) != int(image_size):
    diffs.append(f"image_size: {fp['image_size']} in the cache, {image_size} in this run")
  if int(fp["max_text_len"]) != int(max_text_len):
    diffs.append(f"max_text_len: {fp['max_text_len']} in the cache, {max_text_len} in this run")
  if reference:
    ident, _, _ = _reference_identity(reference)
    if ident["params_digest"] != recorded.get("params_digest"):
      diffs.append(f"reference: built from {recorded.get('path')} step {recorded.get('step')}"
                   f" (params {str(recorded.get('params_digest'))[:12]}…), this run uses "
                   f"{ident['path']} step {ident['step']} (params "
                   f"{ident['params_digest'][:12]}…)")
    elif (ident["path"], ident["step"]) != (recorded.get("path"), recorded.get("step")):
      log.info("reference cache %s: built from %s step %s, same parameters as %s step %s",
               path, recorded.get("path"), recorded.get("step"), ident["path"], ident["step"])
  else:
    log.warning("reference cache %s: the reference is not checked (none given); it was "
                "built from %s step %s", path, recorded.get("path"), recorded.get("step"))
  if diffs:
    raise ReferenceCacheError(f"reference cache {path} does not match this run: "
                              + "; ".join(diffs) + f". Rebuild it with `{cmd}`")
  return ReferenceCache(path, meta=meta)


# ------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="jest-pod data cache-reference",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="data set folder to embed (e.g. the web pool)")
  p.add_argument("--reference", required=True, help="the reference run's workdir or checkpoint")
  p.add_argument("--batch-size", type=int, default=256, help="per host")
  p.add_argument("--output", default=None, help=f"default: DATA/{CACHE_DIR} (or gs://...)")
  p.add_argument("--image-size", type=int, default=None,
                 help="default: the reference's config (must equal the trainer's)")
  p.add_argument("--max-text-len", type=int, default=None,
                 help="default: the reference's config (must equal the trainer's)")
  p.add_argument("--tokenizer", default=None,
                 help="default: the reference's (its config.input.tokenizer, else its "
                      "training data's tokenizer.model)")
  args = p.parse_args(argv)
  if not log.handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  from jest_pod import checkpoint
  from jest_pod.parallel import distributed
  distributed.initialize()
  try:
    build_cache(args.data, args.reference, batch_size=args.batch_size, output=args.output,
                image_size=args.image_size, max_text_len=args.max_text_len,
                tokenizer=args.tokenizer)
  except (ReferenceCacheError, checkpoint.CheckpointError, FileNotFoundError) as e:
    print(f"jest-pod data cache-reference: error: {e}", file=sys.stderr)
    return 1
  finally:
    distributed.shutdown()
  return 0
