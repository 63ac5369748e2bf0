"""The demo's data sets: a noisy web pool, a curated set, and two held-out evaluation sets.

`jest-pod data build demo --output DIR [--limit N] [--seed S] [--overwrite]` writes

  DIR/web            19435  the large noisy pool JEST selects from
  DIR/curated         3000  small clean set the reference model is trained on
  DIR/eval_fashion     1000 zero-shot classification: Fashion-MNIST test, labelled, class_names
  DIR/eval_retrieval    500 image-text retrieval: held-out emoji (300) + clip art (200)

from three real collections installed as Debian packages (see emoji.py, openclipart.py,
fashion_mnist.py): 3789 rendered emoji with their English names (174 the font cannot draw
are skipped), 6832 clip-art PNGs of at most 0.6 Mpx (the 1168 larger ones are skipped as
`oversized_image`: their PNG decode would dominate the build time; 121 blank ones too) with
noisy captions from their SVG metadata, and Fashion-MNIST (60k train / 10k test). All
images are RGB with max side 64 (the demo trains at 32x32). Everything is deterministic
given --seed (default 0).

How each set is built, in order:

1. Split by underlying image, before any damage. Emoji and clip-art images are grouped by
   a 64-bit difference hash (dHash of the 9x8 grey thumbnail): identical and near-identical
   pictures share a group. eval_retrieval takes, in a seeded random order, emoji (up to 300
   = 8% of the emoji) and clip art whose title looks like a description (up to 200 = 5%
   of the clip art; caption = the lowercased title, see openclipart.clean_title), one per
   group and with captions unique within the set; every other member of a chosen group is
   dropped from all sets. Fashion-MNIST test images whose pixels equal a training image
   are dropped; eval_fashion takes up to 100 per class (seeded) with caption "a photo of a
   <class>." and its label. Everything else is training material.
2. web base: all remaining emoji (caption: the name) and clip art (caption: the noisy SVG
   caption) and 6000 seeded Fashion-MNIST train images (template captions). Source of a
   clean web example: its origin ("emoji", "openclipart", "fashion_mnist").
3. web damage (source "<origin>:<damage>"), in a seeded random order of the base:
   - swapped_caption (15% of base): the caption of another base example (a different one);
   - filename_caption (8% of base): the caption becomes a camera/file name such as
     "IMG_2041.JPG", "DSC01234.jpg", "Screenshot 2019-03-02 at 10.11.12.png";
   - near_duplicate (extra examples, from 10% of the clean base): 1-3 copies of the image,
     each randomly cropped (80-95% of each side), resized back, brightness x0.85-1.15 and
     flipped half the time, with the source example's caption;
   - junk_image (extra examples, 5% of base size): a uniform colour, uniform noise, a
     gradient or blocky noise image with the caption of a random base example.
   The web set is then shuffled (seeded). Damaged examples keep their base id, extras get
   "<base id>#dup<k>" and "junk/<n>".
4. curated: clean captions only, drawn (seeded) from the training images of step 1:
   up to 1200 emoji (40%), up to 600 clip art with a descriptive title (50% of them;
   caption = the title), up to 1200 of the web's Fashion-MNIST images (20%; no labels:
   only eval_fashion carries labels and class_names), shuffled (seeded). It is a clean
   subset of the web pool's images, as the paper's curated set is a filtered subset of web
   data; it shares no image with the eval sets.

Counts with the default seed (0) on Debian bookworm's packages: web 19435 (11988 clean;
swapped_caption 2336, filename_caption 1246, near_duplicate 3087, junk_image 778); 551
emoji/clip-art images dropped as other members of held-out dHash groups. Build time
(packages installed): 42 s of CPU; 82-112 s wall on a 2-core machine shared with other jobs
(load average 7-12); peak memory 280 MB. A rebuild with the same arguments is a 1 s no-op.

No image of eval_fashion or eval_retrieval, nor a near-duplicate of one, is in web or
curated: tests/test_builders.py checks this by id and by exact pixel hash. `--limit N`
caps each collection at N images (emoji, clip art, Fashion-MNIST web and eval) for tests.
A rebuild with the same arguments is a no-op; --overwrite rebuilds.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import numpy as np
from PIL import Image

from jest_pod.data import manifest as manifest_lib
from jest_pod.data.builders import Example, check_reuse, image_hash, write_examples
from jest_pod.data.builders import emoji as emoji_builder
from jest_pod.data.builders import fashion_mnist
from jest_pod.data.builders import openclipart

log = logging.getLogger(__name__)

SETS = ("web", "curated", "eval_fashion", "eval_retrieval")
DAMAGES = ("swapped_caption", "near_duplicate", "junk_image", "filename_caption")
VERSION = 2  # bump when the recipe changes: old builds are then not reused
CLIPART_MAX_PIXELS = 600_000
FASHION_WEB = 6000
FRACTIONS = {"swapped_caption": 0.15, "filename_caption": 0.08, "near_duplicate": 0.10,
             "junk_image": 0.05}
RETRIEVAL = {"emoji": (300, 0.08), "openclipart": (200, 0.05)}  # (max, fraction)
CURATED = {"emoji": (1200, 0.40), "openclipart": (600, 0.50), "fashion_mnist": (1200, 0.20)}


def dhash(image: np.ndarray) -> int:
  """64-bit difference hash of a uint8 [H, W, 3] image (grey 9x8 thumbnail, row gradients)."""
  g = np.asarray(Image.fromarray(image).convert("L").resize((9, 8), Image.Resampling.BILINEAR),
                 dtype=np.int16)
  bits = (g[:, 1:] > g[:, :-1]).ravel()
  return int(np.packbits(bits).view(">u8")[0])


def _take(n_max: int, frac: float, total: int) -> int:
  return min(n_max, max(1, round(frac * total))) if total else 0


def filename_caption(rng: np.random.Generator) -> str:
  """A caption that is just a file name, as scraped alt-texts often are."""
  k = rng.integers(6)
  if k == 0:
    return f"IMG_{rng.integers(10000):04d}.JPG"
  if k == 1:
    return f"DSC{rng.integers(100000):05d}.jpg"
  if k == 2:
    return f"image ({rng.integers(1, 40)}).png"
  if k == 3:
    return (f"Screenshot {rng.integers(2012, 2025)}-{rng.integers(1, 13):02d}-"
            f"{rng.integers(1, 29):02d} at {rng.integers(24)}.{rng.integers(60):02d}."
            f"{rng.integers(60):02d}.png")
  if k == 4:
    return f"{rng.integers(16**8):08x}.webp"
  return f"photo_{rng.integers(1, 5000)}.jpeg"


def near_duplicate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random crop (80-95% per side) resized back, brightness jitter, flip: uint8 [H, W, 3]."""
  h, w = image.shape[:2]
  ch, cw = max(1, int(h * rng.uniform(0.8, 0.95))), max(1, int(w * rng.uniform(0.8, 0.95)))
  y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
  im = Image.fromarray(image[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BILINEAR)
  out = np.asarray(im, dtype=np.float32) * rng.uniform(0.85, 1.15)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  out = np.clip(out, 0, 255).astype(np.uint8)
  if np.array_equal(out, image):  # tiny images can come back unchanged: nudge one pixel
    out = out.copy()
    out[0, 0] = 255 - out[0, 0]
  return np.ascontiguousarray(out)


def junk_image(rng: np.random.Generator, side: int = 64) -> np.ndarray:
  """A blank or noise picture: uint8 [side, side, 3]."""
  k = rng.integers(4)
  if k == 0:
    return np.broadcast_to(rng.integers(256, size=3, dtype=np.uint8), (side, side, 3)).copy()
  if k == 1:
    return rng.integers(256, size=(side, side, 3), dtype=np.uint8)
  if k == 2:
    t = np.linspace(0, 1, side, dtype=np.float32)
    a, b = rng.integers(256, size=(2, 3))
    g = t[:, None, None] * a + (1 - t[:, None, None]) * b
    if rng.random() < 0.5:
      g = g.transpose(1, 0, 2)
    return np.broadcast_to(g, (side, side, 3)).astype(np.uint8).copy()
  blocks = rng.integers(256, size=(8, 8, 3), dtype=np.uint8)
  return np.repeat(np.repeat(blocks, side // 8, 0), side // 8, 1)


def split_retrieval(emoji: list[Example], clip: list[Example], titles: dict[str, str],
                    rng: np.random.Generator):
  """Step 1: -> (eval_retrieval examples, emoji_train, clip_train, n dropped)."""
  pool = emoji + clip
  groups = collections.defaultdict(list)
  for i, ex in enumerate(pool):
    groups[dhash(ex.image)].append(i)
  group_of = {i: g for g, members in groups.items() for i in members}
  want = {"emoji": _take(*RETRIEVAL["emoji"], len(emoji)),
          "openclipart": _take(*RETRIEVAL["openclipart"], len(clip))}
  got = collections.Counter()
  held_groups, eval_set, captions = set(), [], set()
  for i in rng.permutation(len(pool)):
    ex = pool[i]
    caption = ex.caption if ex.origin == "emoji" else titles.get(ex.id, "")
    if got[ex.origin] >= want[ex.origin] or not caption or caption in captions:
      continue
    if group_of[i] in held_groups:
      continue
    held_groups.add(group_of[i])
    captions.add(caption)
    got[ex.origin] += 1
    eval_set.append(Example(id=ex.id, image=ex.image, caption=caption, origin=ex.origin))
  train = [ex for i, ex in enumerate(pool) if group_of[i] not in held_groups]
  dropped = len(pool) - len(train) - len(eval_set)
  return (eval_set, [e for e in train if e.origin == "emoji"],
          [e for e in train if e.origin == "openclipart"], dropped)


def split_fashion(limit: int | None, rng: np.random.Generator):
  """Step 1 for Fashion-MNIST: -> (eval_fashion examples, web fashion examples, n dropped)."""
  tr_img, tr_lab = fashion_mnist.load_arrays("train")
  te_img, te_lab = fashion_mnist.load_arrays("test")
  train_hashes = {image_hash(im) for im in tr_img}
  n_eval = min(1000, limit) if limit else 1000
  per_class = max(1, n_eval // len(fashion_mnist.CLASS_NAMES))
  eval_set, dropped = [], 0
  for c in range(len(fashion_mnist.CLASS_NAMES)):
    taken = 0
    for i in rng.permutation(np.flatnonzero(te_lab == c)):
      if taken >= per_class:
        break
      if image_hash(te_img[i]) in train_hashes:  # same pixels as a training image
        dropped += 1
        continue
      eval_set.append(fashion_mnist.example(
          "test", int(i), te_img[i], c, f"a photo of a {fashion_mnist.CLASS_NAMES[c]}."))
      taken += 1
  n_web = min(FASHION_WEB, limit) if limit else FASHION_WEB
  web = [fashion_mnist.example("train", int(i), tr_img[i], tr_lab[i])
         for i in np.sort(rng.permutation(len(tr_img))[:n_web])]
  return eval_set, web, dropped


def make_web(base: list[Example], rng: np.random.Generator) -> tuple[list[Example], list[str]]:
  """Step 3: -> (web examples, their source strings), shuffled."""
  n = len(base)
  order = rng.permutation(n)
  n_swap = round(FRACTIONS["swapped_caption"] * n)
  n_file = round(FRACTIONS["filename_caption"] * n)
  damage = {int(i): "swapped_caption" for i in order[:n_swap]}
  damage.update({int(i): "filename_caption" for i in order[n_swap:n_swap + n_file]})
  examples, sources = [], []
  for i, ex in enumerate(base):
    kind = damage.get(i)
    caption = ex.caption
    if kind == "swapped_caption":
      for _ in range(10):  # another example with a different caption
        j = int(rng.integers(n))
        if j != i and base[j].caption != ex.caption:
          caption = base[j].caption
          break
    elif kind == "filename_caption":
      caption = filename_caption(rng)
    examples.append(Example(id=ex.id, image=ex.image, caption=caption, origin=ex.origin))
    sources.append(f"{ex.origin}:{kind}" if kind else ex.origin)
  clean = [int(i) for i in order[n_swap + n_file:]]
  for i in rng.choice(clean, size=min(len(clean), round(FRACTIONS["near_duplicate"] * n)),
                      replace=False):
    ex = base[i]
    for k in range(1, int(rng.integers(1, 4)) + 1):
      examples.append(Example(id=f"{ex.id}#dup{k}", image=near_duplicate(ex.image, rng),
                              caption=ex.caption, origin=ex.origin))
      sources.append(f"{ex.origin}:near_duplicate")
  for k in range(max(1, round(FRACTIONS["junk_image"] * n))):
    donor = base[int(rng.integers(n))]
    examples.append(Example(id=f"junk/{k}", image=junk_image(rng), caption=donor.caption,
                            origin=donor.origin))
    sources.append(f"{donor.origin}:junk_image")
  perm = rng.permutation(len(examples))
  return [examples[i] for i in perm], [sources[i] for i in perm]


def make_curated(emoji_train, clip_train, titles, fashion_web, rng) -> list[Example]:
  """Step 4: clean-captioned subset of the training images."""
  def pick(items, key):
    n = _take(*CURATED[key], len(items))
    return [items[i] for i in np.sort(rng.choice(len(items), size=n, replace=False))] if n else []
  titled = [Example(id=e.id, image=e.image, caption=titles[e.id], origin=e.origin)
            for e in clip_train if titles.get(e.id)]
  return (pick(emoji_train, "emoji") + pick(titled, "openclipart")
          + pick(fashion_web, "fashion_mnist"))


def build(output: str, limit: int | None = None, overwrite: bool = False,
          workers: int | None = None, seed: int = 0) -> list[dict]:
  """Builds the four demo sets under `output`; returns their manifests (SETS order)."""
  args = {"builder": "demo", "version": VERSION, "limit": limit, "seed": seed}
  outs = [os.path.join(output, s) for s in SETS]
  if check_reuse(outs, args, overwrite):
    return [manifest_lib.read(o) for o in outs]
  t0 = time.time()
  rng = np.random.default_rng(seed)
  emoji, emoji_skip = emoji_builder.load(limit, workers)
  clip, clip_skip, titles = openclipart.load_with_titles(limit, workers, CLIPART_MAX_PIXELS)
  eval_retrieval, emoji_train, clip_train, dropped_r = split_retrieval(emoji, clip, titles, rng)
  eval_fashion, fashion_web, dropped_f = split_fashion(limit, rng)
  base = emoji_train + clip_train + fashion_web
  web, web_sources = make_web(base, rng)
  # Labels only where class_names say what they mean: the eval set.
  curated = [dataclasses.replace(e, label=None)
             for e in make_curated(emoji_train, clip_train, titles, fashion_web, rng)]
  curated = [curated[i] for i in rng.permutation(len(curated))]
  log.info("demo: sets assembled in %.1f s; writing", time.time() - t0)
  load_skips = collections.Counter(emoji_skip) + collections.Counter(clip_skip)
  manifests = [
      write_examples(outs[0], "web", web, sources=web_sources, build=args, overwrite=overwrite,
                     skipped=dict(load_skips, held_out_group_member=dropped_r)),
      write_examples(outs[1], "curated", curated, build=args, overwrite=overwrite,
                     skipped=dict(load_skips, held_out_group_member=dropped_r)),
      write_examples(outs[2], "eval_fashion", eval_fashion, build=args, overwrite=overwrite,
                     skipped={"same_pixels_as_train": dropped_f},
                     class_names=fashion_mnist.CLASS_NAMES),
      write_examples(outs[3], "eval_retrieval", eval_retrieval, build=args, overwrite=overwrite,
                     skipped=dict(load_skips)),
  ]
  log.info("demo: built %s in %.1f s", {s: m["num_examples"] for s, m in zip(SETS, manifests)},
           time.time() - t0)
  return manifests
