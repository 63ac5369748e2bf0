"""`jest-pod bench score-images`: which stored form of the score images keeps JEST's
choice, and what each costs the host (the table of docs/two_phase_input.md).

  jest-pod bench score-images --data data/demo/web [--learner WORKDIR]
      [--reference-cache DIR] [--image-size 32 --patch 4 --score-patch 8] [--batches 8]

For super-batches of N = B / (1 − f) records of the data set (decoded at the training
size), the learner's Flexi scoring pass on the full images (patch s) is the exact
embedding; each form below is scored at the base patch p0 instead:

  float32      B⁺y per s×s block (models.vit.score_image): exact up to rounding
  float16      the same, stored in 16 bits (what `jest-pod data score-images` writes)
  uint8+scale  the same, 8 bits with a per-row offset and scale
  jpeg95       that uint8 image through JPEG at quality 95 (a lossy codec)
  thumbnail    an ordinary area-averaged thumbnail (cv2.INTER_AREA), no B⁺

Per form: bytes per row, host CPU µs per row to make it (from the decoded image) and to
read it back (to float32), the min and mean cosine of its embeddings to the exact ones,
and the overlap of JEST's selected set (joint, learnability with the reference cache's
rows, or hard-learner without) with the exact embeddings' selection, same key.
`--learner WORKDIR` scores with a trained learner (default: a random one of
configs/jest.py:runlocal's towers: a trained learner may be less sensitive).
"""

from __future__ import annotations

import argparse
import time

import cv2
import jax
import numpy as np

from jest_pod import config as config_lib
from jest_pod.data import pipeline
from jest_pod.data.score_images import Key
from jest_pod.interop import formats
from jest_pod.jest import reference as reference_lib
from jest_pod.jest import selection
from jest_pod.models import build_model
from jest_pod.flexi import score_image
from jest_pod.parallel import sharding as shd


def _u8_scaled(z):
  lo = z.min(axis=(1, 2, 3), keepdims=True)
  scale = np.maximum(z.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-6) / 255.0
  return np.rint((z - lo) / scale).astype(np.uint8), lo.astype(np.float32), scale.astype(np.float32)


def _jpeg(u8):
  return [cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1] for im in u8]


def forms(key: Key):
  """name → (make: decoded images → (stored, bytes per row), read: stored → float32)."""
  p0, s = key.base_patch, key.score_patch

  def b_plus(images):
    return score_image(images, p0, s)

  def u8_make(images):
    q, lo, scale = _u8_scaled(b_plus(images))
    return (q, lo, scale), q[0].nbytes + 8

  def jpeg_make(images):
    q, lo, scale = _u8_scaled(b_plus(images))
    blobs = _jpeg(q)
    return (blobs, lo, scale), float(np.mean([len(b) for b in blobs])) + 8

  def jpeg_read(stored):
    blobs, lo, scale = stored
    q = np.stack([cv2.imdecode(b, cv2.IMREAD_COLOR)[..., ::-1] for b in blobs])
    return q.astype(np.float32) * scale + lo

  def thumb(images):
    side = key.size
    out = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA)
                    for im in images])
    return out.astype(np.float16), out[0].astype(np.float16).nbytes

  return {
      "float32": (lambda x: (b_plus(x), b_plus(x[:1]).nbytes), lambda z: z),
      "float16": (lambda x: (b_plus(x).astype(np.float16), b_plus(x[:1]).nbytes // 2),
                  lambda z: z.astype(np.float32)),
      "uint8+scale": (u8_make, lambda t: t[0].astype(np.float32) * t[2] + t[1]),
      "jpeg95": (jpeg_make, jpeg_read),
      "thumbnail": (thumb, lambda z: z.astype(np.float32)),
  }


def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod bench score-images", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="data set folder (the pool)")
  p.add_argument("--learner", default=None, help="a trained learner's workdir (default: random)")
  p.add_argument("--reference-cache", default=None,
                 help="θ*'s cache of --data: the learnability score (default: hard-learner)")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--patch", type=int, default=4)
  p.add_argument("--score-patch", type=int, default=8)
  p.add_argument("--batch", type=int, default=64, help="B")
  p.add_argument("--f", type=float, default=0.8, help="filter ratio: N = B / (1 − f)")
  p.add_argument("--batches", type=int, default=8, help="super-batches to measure")
  return p.parse_args(argv)


def main(argv):
  args = _parse(argv)
  key = Key(args.image_size, args.patch, args.score_patch)
  key.check()
  n = int(round(args.batch / (1 - args.f)))
  if args.learner:
    loaded = formats.load(args.learner)
    model, params, what = loaded.model(), loaded.params, f"trained ({args.learner})"
  else:
    c = config_lib.load(config_lib.CONFIGS_DIR + "/jest.py", "runlocal")
    c.model.image_size = c.input.image_size = args.image_size
    c.model.image["patch_size"] = args.patch
    model = build_model(c.model)
    params = model.init(jax.random.key(0),
                        np.zeros((1, args.image_size, args.image_size, 3), np.float32),
                        np.zeros((1, c.input.max_text_len), np.int32))["params"]
    what = "random init (configs/jest.py:runlocal towers)"
  cache = (reference_lib.open_cache(args.reference_cache, data_dir=args.data)
           if args.reference_cache else None)
  embed = jax.jit(lambda p, x, patch: model.apply({"params": p}, x, None, patch_size=patch)[0],
                  static_argnums=2)
  mesh = shd.make_mesh((("data", -1),), jax.local_devices()[:1])
  score = "learnability" if cache else "hard_learner"

  _, _, out = model.apply({"params": params}, None, None)
  temperature, bias = np.float32(out["t"]), np.float32(out["b"])

  def pick(zimg, ztxt, ref, k):
    learner = selection.Embeddings(zimg, ztxt, temperature, bias)
    return np.asarray(selection.joint_select(
        jax.random.key(k), learner, ref, num_select=args.batch, n_chunks=16, score=score,
        loss="sigmoid", mesh=mesh, data_axes=("data",)))

  c_in = config_lib.load(config_lib.CONFIGS_DIR + "/jest.py", f"runlocal,data={args.data}")
  c_in.input.data, c_in.input.image_size, c_in.input.worker_count = args.data, args.image_size, 0
  it = pipeline.make_train_iterator(c_in.input, global_batch_size=n, seed=0)
  rows = {name: {"bytes": 0.0, "make": 0.0, "read": 0.0, "cos": [], "overlap": []}
          for name in forms(key)}
  for k in range(args.batches):
    batch = next(it)
    images = batch["image"]
    exact = np.asarray(embed(params, images, args.score_patch))
    ztxt = np.asarray(model.apply({"params": params}, None, batch["text"])[1])
    ref = cache.embeddings(cache.host_inputs(batch)) if cache else None
    want = set(pick(exact, ztxt, ref, k).tolist())
    for name, (make, read) in forms(key).items():
      t = time.process_time()
      stored, nbytes = make(images)
      t_make = time.process_time() - t
      t = time.process_time()
      x = read(stored)
      t_read = time.process_time() - t
      z = np.asarray(embed(params, x, None))
      cos = np.sum(z * exact, -1) / np.linalg.norm(z, axis=-1) / np.linalg.norm(exact, axis=-1)
      r = rows[name]
      r["bytes"], r["make"], r["read"] = nbytes, r["make"] + t_make, r["read"] + t_read
      r["cos"] += cos.tolist()
      r["overlap"].append(len(want & set(pick(z, ztxt, ref, k).tolist())) / args.batch)
  total = args.batches * n
  print(f"learner: {what}; score {score}; {args.batches} super-batches of N={n} "
        f"(B={args.batch}, f={args.f}) from {args.data}; {key.name}: score images "
        f"{key.size}² from {args.image_size}²")
  print(f"{'form':<12} {'bytes/row':>9} {'make µs/row':>11} {'read µs/row':>11} "
        f"{'min cos':>9} {'mean cos':>9} {'overlap':>8}")
  for name, r in rows.items():
    print(f"{name:<12} {r['bytes']:>9.0f} {r['make'] / total * 1e6:>11.1f} "
          f"{r['read'] / total * 1e6:>11.1f} {min(r['cos']):>9.7f} {np.mean(r['cos']):>9.7f} "
          f"{np.mean(r['overlap']):>8.3f}")
  return 0
