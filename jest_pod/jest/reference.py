"""The reference θ*: the frozen model whose losses the learnability score subtracts.

One interface, `Reference`, serves everything JEST needs from θ*: its embeddings of a
super-batch (`embeddings`), the host-side inputs they need (`host_inputs`, run in the
input thread), what identifies it (`identity`), its forward FLOPs per example, and its
preprocessing (image size, caption length, tokenizer). Two backends:

  ForwardReference  a checkpoint of any kind (this project's workdir, a Hugging Face
                    SigLIP folder, a big_vision npz: interop/formats.py) run on the
                    super-batch. Its preprocessing must be the learner's: the pipeline
                    decodes and tokenises each example once.
  CachedReference   θ*'s embeddings of every record, computed once by `build_cache`
                    (`jest-pod data cache-reference`) with the reference's OWN
                    preprocessing, looked up by example index: no reference pass per
                    step, and any tokenizer or image size works.

`open_reference(config, mesh, learner)` is the one rule that picks between them; the
trainer and `jest-pod bench step` call it, and `build_cache` is the only writer of caches
(storage: data/reference_cache.py). A new backend (say, embeddings served by another job)
is one more subclass here plus a branch in `open_reference`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from jest_pod import checkpoint
from jest_pod import embed
from jest_pod.data import manifest
from jest_pod.data import pipeline
from jest_pod.data import reference_cache as store_lib
from jest_pod.data import sources
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data.reference_cache import ReferenceCacheError
from jest_pod.interop import InteropError, formats
from jest_pod.jest import selection
from jest_pod.models import flops as flops_lib
from jest_pod.parallel import distributed
from jest_pod.parallel import sharding as shd

log = logging.getLogger("jest_pod")

LOG_EVERY_S = 10.0
# Device keys a cached reference adds to each super-batch (put on the devices with it).
CACHE_KEYS = ("ref_image", "ref_text")


def make_embed_fn(model, patch_size):
  """(params, batch) → selection.Embeddings of the whole (super-)batch, no gradient."""

  def embed_fn(params, batch):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"],
                                  patch_size=patch_size)
    return selection.Embeddings(image=zimg, text=ztxt, temperature=out["t"], bias=out["b"])

  return embed_fn


def example_flops(loaded: formats.Loaded) -> float:
  """Forward FLOPs of one example through a checkpoint, at its own preprocessing."""
  mc, prep = loaded.config.model, loaded.preprocessing
  return flops_lib.example_forward_flops(mc, prep.image_size, mc.image["patch_size"],
                                         prep.max_text_len)


class Reference:
  """θ* as JEST sees it (module docstring). Attributes: `cached` (rows come from a cache),
  `dim` (embedding width), `example_flops` (forward FLOPs per example, charged in the
  paper's accounting), `one_time_flops` (what building a cache cost), `device_keys`
  (host_inputs' keys)."""
  cached = False
  dim = 0
  device_keys: tuple[str, ...] = ()
  example_flops = 0.0
  one_time_flops = 0.0

  def host_inputs(self, host_batch) -> dict[str, np.ndarray]:
    """Host arrays to put on the devices beside this host's rows of the super-batch."""
    return {}

  def embeddings(self, super_batch) -> selection.Embeddings:
    """θ*'s embeddings of the (device) super-batch; dispatch only."""
    raise NotImplementedError

  def identity(self) -> dict:
    """{kind, path, step, params_digest} of the weights behind the embeddings."""
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError


class ForwardReference(Reference):
  """A checkpoint's forward pass over the super-batch at its base patch."""

  def __init__(self, loaded: formats.Loaded, mesh):
    self.loaded = loaded
    self.preprocessing = loaded.preprocessing
    self.example_flops = example_flops(loaded)
    self.dim = int(loaded.config.model.embed_dim)
    self._params = embed.params_on_mesh(loaded.params, mesh)
    self._embed = jax.jit(make_embed_fn(loaded.model(), None))

  def embeddings(self, super_batch):
    return self._embed(self._params, super_batch)

  def identity(self) -> dict:
    return self.loaded.identity()

  def describe(self) -> str:
    return f"{self.loaded.describe()} (forward pass)"


class CachedReference(Reference):
  """Rows of a reference cache, looked up on the host by `batch["index"]`."""
  cached = True
  device_keys = CACHE_KEYS

  def __init__(self, store: store_lib.Store):
    self.store = store
    meta = store.meta
    self.example_flops = float(meta["flops_per_example"])
    self.one_time_flops = float(meta["flops"])
    self.dim = int(meta["dim"])
    self._t, self._b = np.float32(meta["temperature"]), np.float32(meta["bias"])

  def host_inputs(self, host_batch):
    image, text = self.store.lookup(host_batch["index"])
    return {"ref_image": image, "ref_text": text}

  def embeddings(self, super_batch):
    return selection.Embeddings(image=super_batch["ref_image"], text=super_batch["ref_text"],
                                temperature=jnp.float32(self._t), bias=jnp.float32(self._b))

  def identity(self) -> dict:
    return dict(self.store.meta["fingerprint"]["reference"])

  def describe(self) -> str:
    ref = self.identity()
    return f"the cache {self.store.path} (of {ref.get('kind')} {ref.get('path')})"


# ------------------------------------------------------------------------ opening


def rebuild_command(data_dir: str, reference: str | None, output: str | None) -> str:
  cmd = (f"jest-pod data cache-reference --data {data_dir} --reference "
         f"{reference or 'REF'}")
  if output and (not sources.is_folder(data_dir) or os.path.normpath(output) !=
                 os.path.normpath(store_lib.join(data_dir, store_lib.CACHE_DIR))):
    cmd += f" --output {output}"
  return cmd


def load(path: str, *, tokenizer: Any = None) -> formats.Loaded:
  """A reference checkpoint of any kind, with the config key in every error."""
  try:
    return formats.load(path, tokenizer=tokenizer or None)
  except (ValueError, RuntimeError) as e:  # InteropError, CheckpointError, TokenizerError
    raise type(e)(f"config.selection.reference={path!r}: {e}") from e


def open_cache(path: str, *, data_dir: str, reference: str | None = None,
               tokenizer: Any = None) -> CachedReference:
  """The cache at `path` for a run on `data_dir`; ReferenceCacheError unless it was built
  for the same data set (shard checksums) and, when `reference` is given, from the same
  weights (params digest) and preprocessing. Without `reference` the cache's own record
  of its reference is trusted (logged)."""
  meta = store_lib.read_meta(path)
  recorded = ((meta or {}).get("fingerprint") or {}).get("reference") or {}
  cmd = rebuild_command(data_dir, reference or recorded.get("path"), path)
  if meta is None:
    what = ("is incomplete (no meta.json: its build did not finish)"
            if not store_lib.is_local(path) or os.path.isdir(path) else "does not exist")
    raise ReferenceCacheError(f"reference cache {path} {what}; build it with `{cmd}`")
  store = store_lib.Store(path, meta, cmd)  # refuses another format
  fp = meta["fingerprint"]
  diffs = []
  if fp["data"] != sources.fingerprint(data_dir):
    diffs.append(f"it was built for other data than {data_dir} (shard checksums differ)")
  if reference:
    loaded = load(reference, tokenizer=tokenizer)
    ident = loaded.identity()
    if ident["params_digest"] != recorded.get("params_digest"):
      diffs.append(f"reference: built from {recorded.get('path')} step {recorded.get('step')}"
                   f" (params {str(recorded.get('params_digest'))[:12]}…), this run uses "
                   f"{ident['path']} step {ident['step']} (params "
                   f"{ident['params_digest'][:12]}…)")
    diffs += [f"preprocessing: {d}" for d in _prep_diffs(fp["preprocessing"],
                                                         loaded.preprocessing.fingerprint())]
  else:
    log.warning("reference cache %s: the reference is not checked (none given); it was "
                "built from %s %s step %s", path, recorded.get("kind"), recorded.get("path"),
                recorded.get("step"))
  if diffs:
    raise ReferenceCacheError(f"reference cache {path} does not match this run: "
                              + "; ".join(diffs) + f". Rebuild it with `{cmd}`")
  return CachedReference(store)


def _prep_diffs(cached: dict, now: dict) -> list[str]:
  return [f"{k} {cached.get(k)} in the cache, {now[k]} now" for k in now
          if cached.get(k) != now[k]]


def open_reference(config, mesh, learner: formats.Preprocessing, *,
                   missing: str) -> Reference:
  """The reference of a run that needs one (`config.needs_reference`): the cache when
  `config.selection.reference_cache` names one or DATA/reference_cache exists (unless
  'off'), else the forward pass of `config.selection.reference` — which must share the
  learner's preprocessing (else the error names the cache command, which runs the
  reference's own preprocessing once). `missing`: the ValueError's message when there is
  neither (`config.missing_reference_message`; passed in: jest does not import config)."""
  s = config.selection
  tokenizer = s.get("reference_tokenizer") or None
  if s.reference_cache != "off":
    if config.input.get("mixture"):
      if s.reference_cache:
        raise ValueError("config.selection.reference_cache works with one data set "
                         "(config.input.data), not a mixture: the cache is indexed by record")
    else:
      path = s.reference_cache or store_lib.default_path(config.input.data)
      if path:
        ref = open_cache(path, data_dir=config.input.data, reference=s.reference or None,
                         tokenizer=tokenizer)
        log.info("reference: embeddings from %s%s", ref.describe(),
                 "" if s.reference_cache else " (found beside the data; "
                 "config.selection.reference_cache=off runs the reference instead)")
        return ref
  if not s.reference:
    raise ValueError(missing)
  loaded = load(s.reference, tokenizer=tokenizer)
  diffs = loaded.preprocessing.differences(learner, "reference", "learner")
  if diffs:
    raise ValueError(
        f"config.selection.reference={s.reference!r} preprocesses its inputs differently "
        f"from the learner ({'; '.join(diffs)}), so one super-batch cannot feed both. Cache "
        f"its embeddings with its own preprocessing instead: `"
        f"{rebuild_command(config.input.data, s.reference, None)}` (JEST then reads them)")
  ref = ForwardReference(loaded, mesh)
  log.info("reference: %s", ref.describe())
  return ref


# -------------------------------------------------------------------------- build


def build_cache(data_dir: str, reference: str | formats.Loaded, *, batch_size: int = 256,
                output: str | None = None, tokenizer: Any = None) -> str:
  """Embeds every record of `data_dir` with the reference, at the reference's own
  preprocessing; returns the cache folder (default DATA/reference_cache).

  Call it on every process of a multi-host job (after jest_pod.parallel.distributed
  .initialize()): host p embeds records p::P on its local devices and writes its block.
  `tokenizer` overrides the checkpoint's own (formats.load).
  """
  t_start = time.perf_counter()
  pi, pc = jax.process_index(), jax.process_count()
  output = store_lib.build_path(data_dir, output)
  loaded = reference if isinstance(reference, formats.Loaded) else formats.load(
      reference, tokenizer=tokenizer)
  prep = loaded.preprocessing
  # Every host embeds its own records on its own devices: no cross-host communication.
  local_mesh = shd.make_mesh((("data", -1),), jax.local_devices())
  model = loaded.model()
  data = sources.fingerprint(data_dir)
  n = int(data["num_examples"])
  mine = len(range(pi, n, pc))
  dim = int(loaded.config.model.embed_dim)
  with store_lib.builder_lock(os.path.dirname(os.path.abspath(output))
                              if store_lib.is_local(output) else output):
    writer = store_lib.Writer(output, n, store_lib.reference_arrays(dim), process_index=pi,
                              process_count=pc)

    batches = pipeline.make_eval_iterator(
        data_dir, batch_size=batch_size, image_size=prep.image_size,
        max_text_len=prep.max_text_len, tokenizer=prep.tokenizer, process_index=pi,
        process_count=pc)
    embedded = embed.embed_stream(embed.encode_fn_for(model, image=True, text=True),
                                  loaded.params, batches, local_mesh,
                                  device_keys=("image", "text"))
    real, done = 0, 0
    t0 = last_log = time.perf_counter()
    try:
      for out in embedded:  # rows [:batch_size] are the batch's, in order
        take = min(batch_size, mine - done)
        if take <= 0:
          break
        real += int(out["mask"][:take].sum())
        if not (np.isfinite(out["image"][:take]).all() and np.isfinite(out["text"][:take]).all()):
          # A NaN row would pass into the cache and stop JEST only at its first step.
          raise ReferenceCacheError(
              f"{loaded.describe()} gives non-finite embeddings of {data_dir} (batch "
              f"{done // batch_size}): its parameters are damaged or diverged; no cache was "
              "written — use a sound reference checkpoint")
        writer.append(out["image"][:take].astype(ml_dtypes.bfloat16),
                      out["text"][:take].astype(ml_dtypes.bfloat16))
        done += take
        now = time.perf_counter()
        if now - last_log >= LOG_EVERY_S and pi == 0:
          rate = done / (now - t0)
          log.info("reference cache: %d/%d examples (this host; %d hosts), %.0f examples/s "
                   "(all hosts ≈ %.0f), ETA %.0fs", done, mine, pc, rate, rate * pc,
                   (mine - done) / max(rate, 1e-9))
          last_log = now
      writer.flush()
      embed_seconds = time.perf_counter() - t0

      stats = np.array([real, mine], np.int64)
      if pc > 1:
        stats = np.asarray(multihost_utils.process_allgather(stats)).reshape(pc, 2)
      embedded_n, expected = int(stats[..., 0].sum()), int(stats[..., 1].sum())
      if embedded_n != n or expected != n:
        raise ReferenceCacheError(
            f"{data_dir}: embedded {embedded_n} of {n} records (some failed to decode); a cache "
            "needs every row — re-ingest the data set or train without a cache")
    except BaseException:
      writer.abort()  # a failed build leaves no half-written folder behind
      raise

    _, _, extras = model.apply({"params": loaded.params}, None, None)
    per_example = example_flops(loaded)
    meta = {"num_examples": n, "dim": dim,
            "temperature": float(extras["t"]), "bias": float(extras["b"]),
            "fingerprint": {"data": data, "reference": loaded.identity(),
                            "preprocessing": prep.fingerprint()},
            "tokenizer": prep.tokenizer.path, "batch_size": batch_size,
            "flops": float(n * per_example), "flops_per_example": float(per_example),
            "embed_seconds": round(embed_seconds, 2),
            "seconds": round(time.perf_counter() - t_start, 2)}
    writer.commit(meta)
    if pi == 0:
      log.info("reference cache: %d examples (%d host(s)) in %.1fs (%.0f examples/s), "
               "%.3g FLOPs → %s", n, pc, meta["seconds"], n / max(embed_seconds, 1e-9),
               meta["flops"], output)
    return output


def main(argv: list[str]) -> int:
  """`jest-pod data cache-reference`."""
  p = argparse.ArgumentParser(
      prog="jest-pod data cache-reference",
      description="θ*'s embeddings of every record of a data set, once (at the reference's "
                  "own preprocessing); JEST then reads them instead of running θ*")
  p.add_argument("--data", required=True, help="data set folder to embed (e.g. the web pool)")
  p.add_argument("--reference", required=True,
                 help="the reference: a training workdir, a Hugging Face SigLIP folder or a "
                      "big_vision .npz")
  p.add_argument("--batch-size", type=int, default=256, help="per host")
  p.add_argument("--output", default=None,
                 help=f"default: DATA/{store_lib.CACHE_DIR} (local or gs://...); required "
                      "when --data is not a folder (e.g. virtual)")
  p.add_argument("--tokenizer", default=None,
                 help="the reference's sentencepiece model (default: its own — the run's for "
                      "a workdir, spiece.model for Hugging Face and beside a big_vision npz)")
  args = p.parse_args(argv)
  if not log.handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  distributed.initialize()
  try:
    out = build_cache(args.data, args.reference, batch_size=args.batch_size,
                      output=args.output, tokenizer=args.tokenizer)
    if jax.process_index() == 0:  # the summary line: what was written, and where
      meta = store_lib.read_meta(out) or {}
      print(f"wrote reference cache {out}: {args.reference}'s embeddings of "
            f"{meta.get('num_examples')} examples of {args.data}"
            + ("" if args.output is None else
               f"; point config.selection.reference_cache at {out}"))
  except (ReferenceCacheError, InteropError, checkpoint.CheckpointError,
          tokenizer_lib.TokenizerError, manifest.ManifestError, FileNotFoundError) as e:
    print(f"jest-pod data cache-reference: error: {e}", file=sys.stderr)
    return 1
  finally:
    distributed.shutdown()
  return 0
