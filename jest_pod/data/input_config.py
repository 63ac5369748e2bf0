"""The `config.input` fields (the input pipeline's contract) and their defaults.

A leaf module (ml_collections only): `jest_pod.config` builds every config from it
without importing the data stack (Grain, decoders, tokenizer) that `pipeline.py` pulls
in.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Host-batch keys that become global device arrays; the rest ("skipped") stay on the host.
DEVICE_KEYS = ("image", "text", "label", "source", "index")

# Images above this many pixels are skipped (reason "too_many_pixels") before decoding:
# decode.py reads the size from the header without decoding, and a tiny PNG can declare
# 40,000² pixels (a decompression bomb: gigabytes of RAM in every decode thread).
MAX_PIXELS = 40_000_000


def default_input_config() -> ml_collections.ConfigDict:
  """The `config.input` fields of the contract (WORKSPACE_NOTES.md), with defaults."""
  c = ml_collections.ConfigDict()
  c.data = ""               # a data set folder, or "virtual:N"
  c.mixture = []            # [(dir, weight), ...]; non-empty overrides `data`
  # Train on a fixed random subset of this many records of `data` (of each mixture
  # component; 0: all). The subset
  # is drawn with its own seed, so every run seed sees the same pool; records keep their
  # index in `data` (a reference cache of the whole set still applies).
  c.pool_size = 0
  c.image_size = 32
  c.max_text_len = 16
  c.tokenizer = ""          # '' -> <first data dir>/tokenizer.model
  # Caption → ids: "plain" (pad 0) | "siglip" (canonicalised, sticky EOS, pad = EOS; the
  # SigLIP family's) | "siglip_cased" — data/tokenizer.py.
  c.text_style = "plain"
  # Grain worker processes. 0 = decode in this process (pipeline.READ_THREADS threads);
  # -1 = auto: pipeline.resolve_worker_count() = 0 on hosts with <= 2 usable cores (on 2
  # cores, cores - 1 = 1 worker was no faster than threads in-process and costs ~2 s
  # start-up; 2 workers leave no core to the trainer: `jest-pod bench data`), else
  # min(cores - 1, 16). The order of examples depends on the count, and exact resume
  # needs the same count: set it explicitly to resume on a host with another core count,
  # and wherever the order must match a worker_count 0 run (multi-host equivalence tests).
  c.worker_count = -1
  c.worker_buffer_size = 2  # batches buffered per worker process
  c.max_pixels = MAX_PIXELS  # larger images are skipped and counted, never decoded
  return c


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg.key` for a ConfigDict, dict, plain object or None, with a default for absent or
  None values (the evaluators' and tokenizer's configs come in all these forms)."""
  if cfg is None:
    return default
  try:
    v = cfg.get(key, default)
  except AttributeError:
    v = getattr(cfg, key, default)
  return default if v is None else v
