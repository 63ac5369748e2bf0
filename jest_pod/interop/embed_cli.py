"""`jest-pod embed CHECKPOINT --data DIR --output emb.npz`: every record's embeddings.

CHECKPOINT is any kind interop/formats.py knows (a training workdir, a Hugging Face
SigLIP folder, a big_vision .npz); its own tokenizer and preprocessing are used. The
output holds `image` [n, d] and `text` [n, d] (L2-normalised float32, in record order),
`id` [n] (the records' `id` strings; '' where a record has none) and `index` [n] (the
record's position in the data set). Data is read as `train` reads it: a record that
cannot be read (a damaged chunk or shard, named in the log) or decoded is left out and
counted (its index is missing from `index`). Non-finite embeddings are refused and nothing
is written; the npz is written to a temporary file and renamed (no partial file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from jest_pod import checkpoint, embed, errors
from jest_pod.data import manifest, pipeline, records, sources
from jest_pod.data.tokenizer import TokenizerError
from jest_pod.evaluators.metrics import EvalDataError
from jest_pod.interop import InteropError, formats
from jest_pod.parallel import sharding as shd

log = logging.getLogger("jest_pod")
LOG_EVERY_S = 10.0


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jest-pod embed", description=__doc__.split("\n\n")[0])
  p.add_argument("checkpoint", help="a training WORKDIR (or a step folder), a Hugging Face "
                                    "SigLIP folder or a big_vision .npz")
  p.add_argument("--data", required=True, help="data set folder (manifest.json + shards)")
  p.add_argument("--output", required=True, help="the .npz to write")
  p.add_argument("--step", type=int, default=None, help="workdir step (default: latest)")
  p.add_argument("--tokenizer", default=None,
                 help="sentencepiece model (default: the checkpoint's own)")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--patch-size", type=int, default=None,
                 help="image patch size (default: the model's base patch)")
  return p


def record_ids(data_dir: str, indices=None) -> list[str]:
  """The `id` of every record of a data set (or of those at `indices`), in that order; ''
  when unreadable. Read through the training source (`sources.open_source`): a damaged
  chunk or shard gives '' and a logged skip naming the shard, as in `train`."""
  source, _ = sources.open_source(data_dir)
  out = []
  for i in (range(len(source)) if indices is None else indices):
    raw = source[int(i)]
    try:
      out.append("" if isinstance(raw, sources.Unreadable) else records.decode(raw).id)
    except records.RecordError:
      out.append("")
  return out


def embed_data(loaded, data_dir: str, *, batch_size: int = 256,
               patch_size: int | None = None) -> dict[str, np.ndarray]:
  """{image, text, index} of every decodable record of `data_dir`, in record order, with
  progress and ETA in the log."""
  if batch_size < 1:  # before any read: 0 would divide by zero deep in the iterator
    raise ValueError(f"--batch-size={batch_size} must be an integer >= 1 (default 256)")
  prep = loaded.preprocessing
  n = int(sources.manifest_of(data_dir)["num_examples"])
  batches = pipeline.make_eval_iterator(data_dir, batch_size=batch_size,
                                        image_size=prep.image_size,
                                        max_text_len=prep.max_text_len, tokenizer=prep.tokenizer)

  def with_progress(it):
    t0 = last = time.perf_counter()
    for k, batch in enumerate(it, 1):
      yield batch
      now = time.perf_counter()
      if now - last >= LOG_EVERY_S:
        done = min(k * batch_size, n)
        rate = done / (now - t0)
        log.info("embed: %d/%d records, %.0f records/s, ETA %.0fs", done, n, rate,
                 (n - done) / max(rate, 1e-9))
        last = now

  encode = embed.encode_fn_for(loaded.model(), image=True, text=True, patch_size=patch_size)
  return embed.embed_batches(encode, loaded.params, with_progress(batches),
                             shd.make_mesh((("data", -1),)), device_keys=("image", "text"),
                             host_keys=("index",))


def nonfinite_message(got: dict[str, np.ndarray], checkpoint_path: str) -> str | None:
  """One line when any embedding row is NaN/inf (a damaged or diverged model), else None."""
  bad = ~(np.isfinite(got["image"]).all(axis=1) & np.isfinite(got["text"]).all(axis=1))
  if not bad.any():
    return None
  first = int(got["index"][np.flatnonzero(bad)[0]])
  return (f"{checkpoint_path} gives non-finite embeddings for {int(bad.sum())} of {len(bad)} "
          f"records (first: record {first}): its parameters are damaged or diverged; "
          "nothing was written — use an earlier step (--step) or a sound checkpoint")


def write_npz(path: str, **arrays) -> None:
  """np.savez to a temporary file beside `path`, then a rename: a failure (disk full) leaves
  no partial npz, and the file is exactly `path` (np.savez alone would add .npz)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if not log.handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  t0 = time.perf_counter()
  try:
    # The training source's rules: a shard's size or records that disagree with the
    # manifest are warnings and counted skips (sources._SafeSource), not a refusal.
    n = int(sources.manifest_of(args.data)["num_examples"])
    if args.batch_size < 1:
      raise ValueError(f"--batch-size={args.batch_size} must be an integer >= 1 (default 256)")
    loaded = formats.load(args.checkpoint, tokenizer=args.tokenizer, step=args.step)
    got = embed_data(loaded, args.data, batch_size=args.batch_size, patch_size=args.patch_size)
    if not len(got["index"]):  # every shard damaged: an empty npz would look like success
      raise ValueError(f"no record of {args.data} could be read or decoded (see the log); "
                       f"run `jest-pod data verify {args.data}`; nothing was written")
    bad = nonfinite_message(got, args.checkpoint)
    if bad:
      raise ValueError(bad)
    ids = np.asarray(record_ids(args.data, got["index"]), dtype=str)
  except (InteropError, checkpoint.CheckpointError, TokenizerError, EvalDataError,
          manifest.ManifestError, ValueError) as e:
    print(f"jest-pod embed: error: {e}", file=sys.stderr)
    return 1
  try:
    write_npz(args.output, image=got["image"].astype(np.float32),
              text=got["text"].astype(np.float32), id=ids, index=got["index"])
  except OSError as e:
    where = os.path.dirname(os.path.abspath(args.output))
    print(f"jest-pod embed: error: cannot write {args.output}: "
          f"{errors.storage_message(e, where) or e}; nothing was written", file=sys.stderr)
    return 1
  skipped = n - len(ids)
  print(f"wrote {args.output}: {len(ids)} records × d={got['image'].shape[1]} from "
        f"{loaded.describe()} in {time.perf_counter() - t0:.1f}s"
        + (f"; {skipped} record(s) could not be read or decoded and are left out (their "
           f"indices are missing from `index`; `jest-pod data verify {args.data}` names "
           "damaged shards)" if skipped else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
