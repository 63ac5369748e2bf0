"""Reference embeddings computed once per example, so JEST steps skip the reference pass.

The reference model θ* is frozen (shared/DESIGN.md §2), so its embeddings of an example
never change: `jest-pod data cache-reference --data DIR --reference REF_WORKDIR` embeds
every record of a data set once and writes DIR/reference_cache/ with

  image.npy, text.npy   float32 [num_examples, d], row i = the record at source index i
  meta.json             temperature, bias, the reference checkpoint and step, the data
                        set's shard checksums (a cache of other data is refused)

The trainer (config.selection.reference_cache = DIR/reference_cache) memory-maps the
arrays and looks rows up by `batch["index"]` on the host: O(batch) memory and time, not
O(data set), so it scales to large pools (at d = 768 fp32, ~6 KB per example).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("jest_pod")

CACHE_DIR = "reference_cache"


class ReferenceCacheError(ValueError):
  """A cache that is missing, stale or for other data; the message says what to run."""


def _data_fingerprint(data_dir):
  from jest_pod.data import manifest as manifest_lib
  m = manifest_lib.read(data_dir)
  return {"num_examples": m["num_examples"],
          "shards": [[s["file"], s.get("sha256", ""), s["num_records"]] for s in m["shards"]]}


def build_cache(data_dir: str, reference: str, *, batch_size: int = 256,
                output: str | None = None) -> str:
  """Embeds every record of `data_dir` with the reference checkpoint; returns the cache dir."""
  import jax

  from jest_pod import checkpoint
  from jest_pod.data import pipeline
  from jest_pod.evaluators import common
  from jest_pod.models import build_model

  config, params, step = checkpoint.load_params(reference)
  model = build_model(config.model)
  tokenizer = common.resolve_tokenizer(None, config, data_dir)
  fingerprint = _data_fingerprint(data_dir)
  batches = pipeline.make_eval_iterator(
      data_dir, batch_size=batch_size, image_size=config.model.image_size,
      max_text_len=config.input.max_text_len, tokenizer=tokenizer)
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  t0 = time.perf_counter()
  out = common.embed_batches(common.encode_fn_for(model, image=True, text=True), params,
                             batches, mesh, device_keys=("image", "text"),
                             host_keys=("index",))
  n = fingerprint["num_examples"]
  index = np.asarray(out["index"])
  if len(index) != n or not np.array_equal(index, np.arange(n)):
    raise ReferenceCacheError(
        f"{data_dir}: embedded {len(index)} of {n} records (some failed to decode); a cache "
        "needs every row — re-ingest the data set or train without a cache")
  _, _, extras = model.apply({"params": params}, None, None)
  output = output or os.path.join(data_dir, CACHE_DIR)
  tmp = output + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  np.save(os.path.join(tmp, "image.npy"), np.asarray(out["image"], np.float32))
  np.save(os.path.join(tmp, "text.npy"), np.asarray(out["text"], np.float32))
  meta = {"temperature": float(extras["t"]), "bias": float(extras["b"]),
          "reference": os.path.abspath(reference), "step": int(step),
          "image_size": int(config.model.image_size),
          "max_text_len": int(config.input.max_text_len), "tokenizer": tokenizer,
          "data": fingerprint, "seconds": round(time.perf_counter() - t0, 1)}
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  if os.path.exists(output):  # replace atomically: a crash leaves the old cache or the new
    os.rename(output, output + ".old")
  os.rename(tmp, output)
  if os.path.exists(output + ".old"):
    import shutil
    shutil.rmtree(output + ".old")
  log.info("reference cache: %d examples in %.1fs → %s", n, meta["seconds"], output)
  return output


class ReferenceCache:
  """Memory-mapped cached reference embeddings of one data set."""

  def __init__(self, path: str, data_dir: str):
    meta_file = os.path.join(path, "meta.json")
    if not os.path.exists(meta_file):
      raise ReferenceCacheError(
          f"config.selection.reference_cache={path!r} is not a reference cache (no meta.json); "
          f"build it with `jest-pod data cache-reference --data {data_dir} --reference REF`")
    with open(meta_file) as f:
      self.meta = json.load(f)
    if self.meta["data"] != _data_fingerprint(data_dir):
      raise ReferenceCacheError(
          f"reference cache {path} was built for other data than {data_dir} (shard checksums "
          "differ); rebuild it with `jest-pod data cache-reference`")
    self.image = np.load(os.path.join(path, "image.npy"), mmap_mode="r")
    self.text = np.load(os.path.join(path, "text.npy"), mmap_mode="r")
    self.temperature = np.float32(self.meta["temperature"])
    self.bias = np.float32(self.meta["bias"])

  def lookup(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [b] (int64) → (image [b, d], text [b, d]) float32."""
    index = np.asarray(index, np.int64)
    return np.asarray(self.image[index]), np.asarray(self.text[index])


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="jest-pod data cache-reference",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="data set folder to embed (e.g. the web pool)")
  p.add_argument("--reference", required=True, help="the reference run's workdir or checkpoint")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--output", default=None, help=f"default: DATA/{CACHE_DIR}")
  args = p.parse_args(argv)
  if not log.handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  from jest_pod import checkpoint
  try:
    build_cache(args.data, args.reference, batch_size=args.batch_size, output=args.output)
  except (ReferenceCacheError, checkpoint.CheckpointError, FileNotFoundError) as e:
    print(f"jest-pod data cache-reference: error: {e}", file=sys.stderr)
    return 1
  return 0
