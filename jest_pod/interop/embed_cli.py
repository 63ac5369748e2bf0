"""`jest-pod embed CHECKPOINT --data DIR --output emb.npz`: every record's embeddings.

CHECKPOINT is any kind interop/formats.py knows (a training workdir, a Hugging Face
SigLIP folder, a big_vision .npz); its own tokenizer and preprocessing are used. The
output holds `image` [n, d] and `text` [n, d] (L2-normalised float32, in record order),
`id` [n] (the records' `id` strings; '' where a record has none) and `index` [n] (the
record's position in the data set). A record that fails to decode is left out and
counted (its index is missing from `index`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from array_record.python import array_record_module
import numpy as np

from jest_pod import checkpoint, embed
from jest_pod.data import manifest, pipeline, records
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


def record_ids(data_dir: str) -> list[str]:
  """The `id` of every record of a data set, in record (index) order; '' when unreadable."""
  out = []
  for path in manifest.shard_paths(data_dir):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        try:
          out.append(records.decode(reader.read([i])[0]).id)
        except records.RecordError:
          out.append("")
    finally:
      reader.close()
  return out


def embed_data(loaded, data_dir: str, *, batch_size: int = 256,
               patch_size: int | None = None) -> dict[str, np.ndarray]:
  """{image, text, index} of every decodable record of `data_dir`, in record order, with
  progress and ETA in the log."""
  prep = loaded.preprocessing
  n = int(manifest.read(data_dir)["num_examples"])
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


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if not log.handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  t0 = time.perf_counter()
  try:
    manifest.read(args.data)
    loaded = formats.load(args.checkpoint, tokenizer=args.tokenizer, step=args.step)
    got = embed_data(loaded, args.data, batch_size=args.batch_size, patch_size=args.patch_size)
    ids = np.asarray(record_ids(args.data), dtype=str)[got["index"]]
  except (InteropError, checkpoint.CheckpointError, TokenizerError, EvalDataError,
          manifest.ManifestError, ValueError) as e:
    print(f"jest-pod embed: error: {e}", file=sys.stderr)
    return 1
  n = int(manifest.read(args.data)["num_examples"])
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  np.savez(args.output, image=got["image"].astype(np.float32),
           text=got["text"].astype(np.float32), id=ids, index=got["index"])
  skipped = n - len(ids)
  print(f"wrote {args.output}: {len(ids)} records × d={got['image'].shape[1]} from "
        f"{loaded.describe()} in {time.perf_counter() - t0:.1f}s"
        + (f"; {skipped} record(s) failed to decode and are left out" if skipped else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
