"""Two-phase input: score cheap, decode only what trains.

JEST scores N = B / (1 − f) examples to train on B. Decoding all N images costs the host
1/(1 − f) times a uniform run's input (5× at f = 0.8). Instead:

  phase 1  the super-batch of N: each record is read and its caption tokenised as
           before, but its image is not decoded — the learner scores from the stored
           score images (data/score_images.py: exact for Flexi scoring) and θ* from its
           embedding cache, both looked up by record index in the input thread.
  phase 2  after selection, the B selected records are read again by index (Grain's
           random access) and fully decoded: host p decodes rows [p·b, (p + 1)·b) of the
           selected batch, whichever host scored them, so the train batch is bit for bit
           the one a full decode of the super-batch gives, on any number of hosts.

Records that a decode would skip are skipped in phase 1 all the same (the score images
record which did not decode when built), so the super-batches — and a resume, which
restores phase 1's iterator — are unchanged. A record that fails to decode in phase 2
(damaged since the score images were built) is counted (`data/phase2_replaced`) and
replaced by the next selected row of the same host that decoded: deterministic, never a
crash or a short batch.

`plan(config, spec, reference)` decides whether a run uses it: a selecting run on one data
set (not a mixture) whose learner can score from score images (or does not score) and
whose reference, when the score or distillation needs one, is a cache. Otherwise the
run decodes every scored example, and says why in one line.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

import numpy as np

from jest_pod.data import decode, records, score_images, sources, token_rows
from jest_pod.data.input_config import MAX_PIXELS

log = logging.getLogger("jest_pod")

THREADS = 4  # phase-2 decode threads (OpenCV releases the GIL)


class SelectedReader:
  """Phase 2: records by index → float32 [b, S, S, 3] images, decoded as the pipeline
  decodes them (decode.to_array)."""

  def __init__(self, data: str, image_size: int, max_pixels: int = MAX_PIXELS):
    self.data, self.image_size, self.max_pixels = data, int(image_size), int(max_pixels)
    self.source, _ = sources.open_source(data)
    self._pool = concurrent.futures.ThreadPoolExecutor(THREADS, "phase2")
    self.replaced = 0    # records that failed to decode here, replaced (this process)
    self.seconds = 0.0   # summed over calls
    self.calls = 0

  def _decode(self, index: int) -> np.ndarray | None:
    raw = self.source[int(index)]
    if isinstance(raw, sources.Unreadable):
      return None
    try:
      return decode.to_array(records.decode(raw).image, self.image_size, self.max_pixels)
    except Exception as e:  # pylint: disable=broad-except  (counted and replaced)
      sources.bad_record_log(f"{self.data} record {int(index)} (phase 2): "
                             f"{type(e).__name__}: {e}")
      return None

  def read(self, index: np.ndarray) -> np.ndarray:
    """This host's share of the selected records (int64 [b]) → images [b, S, S, 3]."""
    t = time.perf_counter()
    index = np.asarray(index).reshape(-1)
    # One task per thread, not per record: a future per 32² image costs as much as its decode.
    chunks = np.array_split(index, min(THREADS, max(1, len(index))))
    images = [im for chunk in self._pool.map(lambda c: [self._decode(i) for i in c], chunks)
              for im in chunk]
    good = [k for k, im in enumerate(images) if im is not None]
    if not good:
      raise ValueError(f"{self.data}: none of the {len(images)} selected records "
                       f"{list(map(int, index))[:8]}… decodes; run `jest-pod data verify "
                       f"{self.data}`")
    for k, im in enumerate(images):
      if im is None:  # the next selected row of this host that decoded (cyclic)
        images[k] = images[min((g for g in good if g > k), default=good[0])]
        self.replaced += 1
    self.seconds += time.perf_counter() - t
    self.calls += 1
    return np.stack(images)

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)


class Phase1:
  """What phase 1 reads of a super-batch, by record index, in the input thread: the token
  rows (text, label, source) and, when the learner scores, the score images. `bad`: the
  records the stores could not make rows of (phase 1 skips them)."""

  def __init__(self, tokens: token_rows.TokenRows,
               images: score_images.ScoreImages | None = None):
    self.tokens, self.images = tokens, images
    self.bad = tokens.bad | (images.bad if images else frozenset())
    self.device_keys = ("score_image",) if images else ()

  def host_inputs(self, host_batch) -> dict[str, np.ndarray]:
    out = self.tokens.host_inputs(host_batch)
    if self.images:
      out["score_image"] = self.images.lookup(host_batch["index"])
    return out

  def describe(self) -> str:
    return (f"the token rows {self.tokens.path}"
            + (f" and the score images {self.images.path}" if self.images else ""))


def plan(config, spec, reference, tokenizer) -> tuple[Phase1 | None, str]:
  """(phase 1's stores, or None and why the run decodes every scored example)."""
  setting = config.selection.get("score_images", "")
  if not spec.selecting or setting == "off":
    return None, ("config.selection.score_images=off" if setting == "off"
                  else "not selecting")
  if config.input.get("mixture"):
    return None, "a mixture is read by component, and the stores are per data set"
  if reference is not None and not reference.cached:
    return None, ("the reference runs a forward pass over the decoded super-batch (build "
                  f"its cache: `jest-pod data cache-reference --data {config.input.data} "
                  f"--reference {config.selection.reference}`)")
  data = config.input.data
  key = score_images.Key(spec.image_size, int(config.model.image["patch_size"]),
                         spec.score_patch)
  command = score_images.build_command(
      data, key, spec.text_len, config.input.tokenizer or None,
      setting if setting and setting != score_images.path_for(data, key) else None)
  if setting and not score_images.find_at(setting):  # named, so it must be there
    raise score_images.ScoreImagesError(f"config.selection.score_images={setting}: not "
                                        f"built; `{command}` builds it")
  tokens_path = token_rows.find(data, tokenizer, spec.text_len)
  images_path = (setting or score_images.find(data, key)) if spec.uses_models[0] else None
  if not tokens_path or (spec.uses_models[0] and not images_path):
    return None, f"phase 1's stores are not built for this run: `{command}` builds them"
  tokens = token_rows.open_store(tokens_path, data_dir=data, tokenizer=tokenizer,
                                 text_len=spec.text_len, rebuild=command)
  images = (score_images.open_store(
      images_path, data_dir=data, key=key,
      max_pixels=config.input.get("max_pixels", MAX_PIXELS)) if images_path else None)
  return Phase1(tokens, images), ""
