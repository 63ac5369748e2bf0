"""Icons: a web-scale real pool of ~470k picture-name pairs, offline (no scraping).

`jest-pod data build icons --output DIR [--limit N] [--seed S] [--workers N] [--image-size 64]
[--overwrite]` (also `python -m jest_pod.data.builders.icons --help`) writes

  DIR/web             training pool: every training picture with a varied caption + damage
  DIR/curated         clean subset for the reference model (clean human names only)
  DIR/eval_flags      zero-shot: country flags in many styles, labels + class_names
  DIR/eval_retrieval  retrieval: the held-out game-icons, pinhead and Carbon pictogram sets
  DIR/eval_web        retrieval: unseen pictures of the training collections themselves

Sources (icons_sources.py; all real pictures with human-written names): the iconify icon
sets (npm @iconify/json, pinned and sha512-checked; SVG bodies in JSON), 17 Debian icon
themes (caption from the file name, category from the theme folder), Unicode characters
drawn with Noto and Symbola (caption = the character's name), Fluent 3D emoji (npm, names
and other-language labels from emojibase-data), Carbon pictograms (npm), Freeciv and
KGeography flags, famfamfam silk and OpenStreetMap map symbols (Debian). Sets whose
licence forbids commercial use (cbi, ps) and the `noto` set (the demo's emoji) are left
out and counted in `skipped`; every used set's licence is in each manifest (`licences`).

Recipe, deterministic given --seed (icons_render.py draws, icons.py splits):
1. Draw every picture as an RGB PNG square of --image-size (default 64) on white, in
   parallel; each part (an iconify set, a theme, ...) is cached in DIR/.work when done,
   so a rerun after a kill draws only what is missing.
2. eval_flags: every picture of a country flag (ISO 3166-1; 249 classes named as in
   emojibase) from iconify (flag, circle-flags, flagpack, cif and the emoji sets' flags),
   Fluent 3D, KGeography and Freeciv; exact pixel duplicates kept once; caption "flag of
   <country>", label = index in class_names (sorted by ISO code). Every other picture whose
   name names a flag ("flag", "flags") leaves training too (skipped: flag_caption).
3. eval_retrieval: the whole game-icons, pinhead and Carbon pictogram sets leave training;
   in a seeded order one picture per dHash group (demo.dhash) and per caption is kept.
4. Training pictures pixel-identical to, or in the dHash group of, any eval picture are
   dropped (near_eval_image).
4b. eval_web: of the rest, a seeded sample of 1 in 20 (at most 5,000) pictures, one per
   dHash group and per clean-name caption, leaves training with its whole dHash group
   (web_eval_group): a held-out set in the pool's own distribution. The sets of steps 2-3
   come from collections training lacks; at CPU scale a small model scores near chance on
   them, while eval_web shows how well it learnt the pool itself.
5. web: each training picture once with a caption drawn (seeded) from its name; name +
   "icon"; name + category; name + tags/aliases; a label in another language (emojibase).
   Then the demo's damage (demo.py, same fractions): swapped_caption, filename_caption,
   near_duplicate, junk_image (source "<family>:<damage>"); damaged pictures whose dHash
   falls in an eval group are drawn again. Shuffled.
6. curated: up to 60,000 (half of the eligible) training pictures from iconify icons that
   carry a category, Unicode, Fluent 3D, silk and OSM, captioned with the clean name (or
   "name, category"). Shuffled.

`--limit N` caps each source family at N pictures, spread over its sets (tests, dry runs).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import re
import sys
import time

import numpy as np

from jest_pod.data import builders
from jest_pod.data import ingest as ingest_lib
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import records, system_packages
from jest_pod.data.builders import decode_rgb, image_hash
from jest_pod.data.builders import demo
from jest_pod.data.builders import icons_render as render
from jest_pod.data.builders import icons_sources as sources
from jest_pod.data.builders.icons_names import clean_name, names_flag

log = logging.getLogger(__name__)

SETS = ("web", "curated", "eval_flags", "eval_retrieval", "eval_web")
WEB_EVAL_FRACTION, WEB_EVAL_MAX = 0.05, 5000
DAMAGES = demo.DAMAGES
VERSION = 2  # bump when the split or captions change: old builds are then not reused
RENDER_VERSION = 1  # bump when drawing changes: cached parts are then redrawn
CURATED_MAX, CURATED_FRACTION = 60_000, 0.5
CURATED_FAMILIES = {"unicode", "fluent3d", "silk", "osm"}  # + iconify icons with a category
SHARD_SIZE = 8192
UNICODE_CLASSES = {"L": "letter", "N": "number", "P": "punctuation", "S": "symbol", "M": "mark"}
PACKAGES = sources.DEBIAN_PACKAGES


# ---------------------------------------------------------------------------------------
# Captions.


def clean_category(cat: str) -> str:
  """'Account / User' -> 'account user', 'Maps & Travel' -> 'maps and travel'."""
  cat = re.sub(r"([a-z])([A-Z])", r"\1 \2", cat.replace("&", " and "))
  return " ".join(re.split(r"[^\w']+", cat.lower())).strip()


def caption_variants(it: dict) -> list[str]:
  """Captions a training picture can carry in web, none naming a flag."""
  name = clean_name(it["name"])
  out = [name, name, f"{name} icon"]
  cat = it.get("category") or ""
  if it["family"] == "unicode":
    cat = UNICODE_CLASSES.get(cat[:1], "")
  cat = clean_category(cat)
  if cat and cat != name:
    out += [f"{name}, {cat}", f"{cat}: {name}"]
  tags = [clean_name(t) for t in it.get("tags") or []]
  tags = [t for t in dict.fromkeys(tags) if t and t != name][:4]
  if tags:
    out.append(f"{name} ({', '.join(tags)})")
  out += [label for _, label in it.get("labels") or []]
  return [c for c in out if c and not names_flag(c)]


def curated_caption(it: dict, rng: np.random.Generator) -> str:
  name = clean_name(it["name"])
  cat = clean_category(it.get("category") or "") if it["family"] == "iconify" else ""
  if cat and not names_flag(cat) and rng.random() < 0.5:
    return f"{name}, {cat}"
  return name


# ---------------------------------------------------------------------------------------
# Split.


def split(items: list[dict], classes: dict, rng: np.random.Generator):
  """-> (eval_flags rows, eval_retrieval rows, eval_web rows, training items, skip counts,
  the eval pictures' (pixel hashes, dHash groups)).

  Rows are (id, png, caption, source, label)."""
  skips = collections.Counter()
  codes = sorted(classes)
  label_of = {c: i for i, c in enumerate(codes)}
  held = [it for it in items if it["set"] in sources.HELD_OUT_SETS]
  flags = [it for it in items if it["set"] not in sources.HELD_OUT_SETS and it["flag"]]
  rest = [it for it in items if it["set"] not in sources.HELD_OUT_SETS and not it["flag"]]

  eval_flags, seen = [], set()
  for it in flags:
    if it["phash"] in seen:
      skips["eval_flags_duplicate"] += 1
      continue
    seen.add(it["phash"])
    eval_flags.append((it["id"], it["png"], f"flag of {classes[it['flag']]}",
                       f"{it['family']}/{it['set']}", label_of[it["flag"]]))

  eval_retrieval, groups, captions = [], set(), set()
  for i in rng.permutation(len(held)):
    it = held[int(i)]
    caption = clean_name(it["name"])
    if it["dhash"] in groups or caption in captions or not caption:
      skips["held_out_duplicate"] += 1
      continue
    groups.add(it["dhash"])
    captions.add(caption)
    eval_retrieval.append((it["id"], it["png"], caption, it["family"], None))

  # Every eval picture, kept or not, bans its pixels and its dHash group from training.
  bad_p = {it["phash"] for it in held + flags}
  bad_d = {it["dhash"] for it in held + flags}
  train = []
  for it in rest:
    if it["flaggy"] or names_flag(clean_name(it["name"])):
      skips["flag_caption"] += 1
    elif it["phash"] in bad_p or it["dhash"] in bad_d:
      skips["near_eval_image"] += 1
    else:
      train.append(it)
  skips["held_out_set"] = len(held)
  skips["flag_for_eval"] = len(flags)
  eval_web, train = hold_out_web(train, rng, skips, bad_p, bad_d)
  return eval_flags, eval_retrieval, eval_web, train, skips, (bad_p, bad_d)


def hold_out_web(train: list[dict], rng: np.random.Generator, skips: collections.Counter,
                 bad_p: set, bad_d: set) -> tuple[list[tuple], list[dict]]:
  """-> (eval_web rows, the training items left). Adds the held-out pictures' pixels and
  dHash groups to bad_p/bad_d (damage is never drawn near them either)."""
  n = min(WEB_EVAL_MAX, max(1, round(WEB_EVAL_FRACTION * len(train)))) if train else 0
  rows, groups, captions = [], set(), set()
  for i in rng.permutation(len(train)):
    if len(rows) == n:
      break
    it = train[int(i)]
    caption = clean_name(it["name"])
    if not caption or it["dhash"] in groups or caption in captions:
      continue
    groups.add(it["dhash"])
    captions.add(caption)
    bad_p.add(it["phash"])
    rows.append((it["id"], it["png"], caption, it["family"], None))
  kept = [it for it in train if it["dhash"] not in groups and it["phash"] not in bad_p]
  skips["web_eval_group"] = len(train) - len(kept) - len(rows)
  skips["web_eval"] = len(rows)
  bad_d |= groups
  return rows, kept


def make_web(base: list[dict], rng: np.random.Generator, bad: tuple[set, set], size: int):
  """Base rows + the demo's damage -> (shuffled web rows, damaged pictures redrawn)."""
  bad_p, bad_d = bad
  n = len(base)
  order = rng.permutation(n)
  n_swap = round(demo.FRACTIONS["swapped_caption"] * n)
  n_file = round(demo.FRACTIONS["filename_caption"] * n)
  damage = {int(i): "swapped_caption" for i in order[:n_swap]}
  damage.update({int(i): "filename_caption" for i in order[n_swap:n_swap + n_file]})
  rows, redrawn = [], 0
  for i, it in enumerate(base):
    kind, caption = damage.get(i), it["caption"]
    if kind == "swapped_caption":
      for _ in range(10):  # another picture's different caption
        j = int(rng.integers(n))
        if j != i and base[j]["caption"] != caption:
          caption = base[j]["caption"]
          break
    elif kind == "filename_caption":
      caption = demo.filename_caption(rng)
    rows.append((it["id"], it["png"], caption,
                 f"{it['family']}:{kind}" if kind else it["family"], None))

  def draw(make, tries: int):
    """make() until its picture is not near an eval picture (None after `tries`)."""
    nonlocal redrawn
    for _ in range(tries):
      img = make()
      if image_hash(img) not in bad_p and demo.dhash(img) not in bad_d:
        return img
      redrawn += 1
    return None

  clean = [int(i) for i in order[n_swap + n_file:]]
  picks = rng.choice(clean, size=min(len(clean), round(demo.FRACTIONS["near_duplicate"] * n)),
                     replace=False) if clean else []
  for i in picks:
    it = base[int(i)]
    img = decode_rgb(it["png"])
    for k in range(1, int(rng.integers(1, 4)) + 1):
      dup = draw(lambda: demo.near_duplicate(img, rng), 5)  # pylint: disable=cell-var-from-loop
      if dup is None:
        continue
      rows.append((f"{it['id']}#dup{k}", render.encode_png(dup), it["caption"],
                   f"{it['family']}:near_duplicate", None))
  for k in range(max(1, round(demo.FRACTIONS["junk_image"] * n)) if n else 0):
    donor = base[int(rng.integers(n))]
    junk = draw(lambda: demo.junk_image(rng, side=size), 10)
    if junk is None:
      continue
    rows.append((f"junk/{k}", render.encode_png(junk), donor["caption"],
                 f"{donor['family']}:junk_image", None))
  perm = rng.permutation(len(rows))
  return [rows[i] for i in perm], redrawn


def make_curated(train: list[dict], rng: np.random.Generator) -> list[tuple]:
  eligible, seen = [], set()
  for it in train:
    ok = it["family"] in CURATED_FAMILIES or (it["family"] == "iconify" and it.get("category"))
    if ok and it["phash"] not in seen:
      seen.add(it["phash"])
      eligible.append(it)
  n = min(CURATED_MAX, round(CURATED_FRACTION * len(eligible)))
  picked = np.sort(rng.choice(len(eligible), size=n, replace=False)) if n else []
  rows = [(eligible[i]["id"], eligible[i]["png"], curated_caption(eligible[i], rng),
           eligible[i]["family"], None) for i in picked]
  return [rows[i] for i in rng.permutation(len(rows))]


# ---------------------------------------------------------------------------------------
# Output.


def _ours(entries: list[str]) -> bool:
  return all(ingest_lib.is_ours(e) for e in entries)


def outputs_state(outs: list[str], args: dict, overwrite: bool) -> bool:
  """True if every output already holds this build (nothing to do). Raises
  OutputNotEmptyError if one holds something else, unless `overwrite`. A set left
  unfinished by an interrupted icons build is ours to replace (resume)."""
  if overwrite:
    return False
  done = 0
  for o in outs:
    if not os.path.isdir(o) or not ingest_lib.entries(o):
      continue
    try:
      m = manifest_lib.read(o)
      if m.get("build") == args:
        done += 1
        continue
      resumable = m.get("build") is None and m.get("created_by") == "build icons"
      have = m.get("build")
    except manifest_lib.ManifestError as e:
      resumable, have = _ours(ingest_lib.entries(o)), f"incomplete ({e})"
    if not resumable:
      raise ingest_lib.OutputNotEmptyError(
          f"output folder {o!r} is not empty and does not hold this build (wanted {args}, "
          f"found {have}); pass --overwrite to rebuild it")
  if done == len(outs):
    for o in outs:
      log.info("%s: complete data set with the same build arguments exists; nothing to do "
               "(--overwrite rebuilds it)", o)
  return done == len(outs)


def write_set(out: str, name: str, rows: list[tuple], *, skipped: dict, args: dict,
              size: int, extra: dict, class_names: list[str] | None = None) -> dict:
  """Writes rows (id, png, caption, source, label) as a data set; the manifest gets the build
  arguments only in its final write, so a crash in between leaves a resumable set."""
  ingest_lib.prepare_output(out, overwrite=True)
  writer = ingest_lib.ShardWriter(out, name, SHARD_SIZE)
  try:
    for rid, png, caption, source, label in rows:
      rec = records.Record(image=png, text=caption, id=rid, source=source, label=label)
      writer.add(records.encode(rec), source)
    m = writer.finish(skipped=skipped, image_max_side=size, created_by="build icons",
                      class_names=class_names)
  except BaseException:
    writer.abort()
    raise
  m.update(extra)
  m["build"] = args
  manifest_lib.write(out, m)
  log.info("%s: wrote %d examples to %s", name, m["num_examples"], out)
  return m


def _licences(rows: list[tuple], id_set: dict, licences: dict) -> dict:
  """{part key: licence} of the parts the rows come from (junk pictures have none)."""
  used = {id_set.get(r[0].split("#")[0]) for r in rows}
  return {k: licences[k] for k in sorted(used - {None})}


# ---------------------------------------------------------------------------------------


def build(output: str, limit: int | None = None, overwrite: bool = False,
          workers: int | None = None, seed: int = 0, image_size: int = 64,
          config: sources.Config | None = None) -> list[dict]:
  """Builds the four icons sets under `output`; returns their manifests (SETS order)."""
  cfg = config or sources.Config()
  args = {"builder": "icons", "version": VERSION, "limit": limit, "seed": seed,
          "image_size": image_size}
  if tuple(cfg.families) != sources.Config().families:
    args["families"] = list(cfg.families)
  outs = [os.path.join(output, s) for s in SETS]
  if outputs_state(outs, args, overwrite):
    return [manifest_lib.read(o) for o in outs]
  t0 = time.time()
  if cfg.install:
    system_packages.ensure(_packages(cfg))
  workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
  parts, eb = sources.parts(cfg, limit, image_size)
  # Cached drawings are reused only for the same size, limit, drawing code and npm pins.
  pins = hashlib.sha1(json.dumps(cfg.npm, sort_keys=True).encode()).hexdigest()[:8]
  work = os.path.join(output, ".work",
                      f"s{image_size}-l{limit or 'all'}-r{RENDER_VERSION}-{pins}")
  results = render.render_parts(parts, work, image_size, workers)
  t_draw = time.time() - t0

  items, licences, load_skips, excluded, id_set = [], {}, collections.Counter(), {}, {}
  for p in parts:
    its, skipped, licence = results[p.key]
    licences[p.key] = licence
    load_skips.update(skipped)
    for reason in ("excluded_set", "non_commercial_licence"):
      if skipped.get(reason):
        excluded[p.key] = reason
    for it in its:
      id_set[it["id"]] = p.key
    items += its
  rng = np.random.default_rng(seed)
  eval_flags, eval_retrieval, eval_web, train, split_skips, bad = split(items, eb.classes,
                                                                       rng)
  for it in train:  # in place: half a million dict copies would cost ~0.5 GB
    variants = caption_variants(it)
    it["caption"] = variants[int(rng.integers(len(variants)))]
  web, redrawn = make_web(train, rng, bad, image_size)
  curated = make_curated(train, rng)
  eval_flags = [eval_flags[i] for i in rng.permutation(len(eval_flags))]
  log.info("icons: %d pictures drawn in %.0f s; split in %.0f s; writing", len(items), t_draw,
           time.time() - t0 - t_draw)

  skips = dict(load_skips + split_skips)
  set_counts = dict(collections.Counter(id_set[it["id"]] for it in train))
  common = {"source_packages": {k: v[0] for k, v in cfg.npm.items()}}
  manifests = [
      write_set(outs[0], "web", web, skipped=dict(skips, damage_redrawn_near_eval=redrawn),
                args=args, size=image_size,
                extra=dict(common, licences={k: licences[k] for k in sorted(set_counts)},
                           set_counts=set_counts, excluded_sets=excluded,
                           excluded_licences={k: licences[k] for k in excluded})),
      write_set(outs[1], "curated", curated, skipped=skips, args=args, size=image_size,
                extra=dict(common, licences=_licences(curated, id_set, licences))),
      write_set(outs[2], "eval_flags", eval_flags, args=args, size=image_size,
                skipped={"same_pixels_as_another_flag": split_skips["eval_flags_duplicate"]},
                class_names=[eb.classes[c] for c in sorted(eb.classes)],
                extra=dict(common, licences=_licences(eval_flags, id_set, licences),
                           class_codes=sorted(eb.classes))),
      write_set(outs[3], "eval_retrieval", eval_retrieval,
                skipped={"held_out_duplicate": split_skips["held_out_duplicate"]}, args=args,
                size=image_size,
                extra=dict(common, licences=_licences(eval_retrieval, id_set, licences))),
      write_set(outs[4], "eval_web", eval_web,
                skipped={"same_group_left_training": split_skips["web_eval_group"]},
                args=args, size=image_size,
                extra=dict(common, licences=_licences(eval_web, id_set, licences))),
  ]
  log.info("icons: built %s in %.0f s", {s: m["num_examples"] for s, m in zip(SETS, manifests)},
           time.time() - t0)
  return manifests


def _packages(cfg: sources.Config) -> list[str]:
  fam, out = set(cfg.families), []
  if "theme" in fam:
    out += list(cfg.themes)
  if "unicode" in fam:
    out += list(sources.FONT_PACKAGES.values())
  for family, package in (("freeciv", "freeciv-data"), ("kgeography", "kgeography-data"),
                          ("silk", "famfamfam-silk"), ("osm", "openstreetmap-carto-common")):
    if family in fam:
      out.append(package)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m jest_pod.data.builders.icons",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--output", required=True)
  p.add_argument("--limit", type=int, default=None, help="cap each source family")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=None, help="drawing processes (default: cores)")
  p.add_argument("--image-size", type=int, default=64, help="stored square side in pixels")
  p.add_argument("--npm-cache", default=None, help="download cache (default ~/.cache/jest_pod/npm)")
  p.add_argument("--families", nargs="+", default=None, choices=sources.Config().families)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
  cfg = sources.Config()
  if args.npm_cache:
    cfg.npm_cache = args.npm_cache
  if args.families:
    cfg.families = tuple(f for f in cfg.families if f in args.families)
  try:  # through the registry: it locks the output folder
    builders.build("icons", args.output, limit=args.limit, overwrite=args.overwrite,
                   workers=args.workers, seed=args.seed, image_size=args.image_size,
                   config=cfg)
  except (ingest_lib.OutputNotEmptyError, system_packages.MissingPackageError,
          FileNotFoundError, ValueError, RuntimeError, OSError) as e:
    print(f"icons: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
