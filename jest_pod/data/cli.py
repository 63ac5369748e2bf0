"""`jest-pod data ...`: ingest, build real offline data sets, tokenizer, reference cache.

  jest-pod data ingest --input PATH --output DIR [--max-side 64] [--shard-size N]
                       [--workers N] [--overwrite] [--name NAME] [--follow-symlinks]
                       [--max-image-bytes N]
  jest-pod data build {emoji,openclipart,fashion_mnist,demo,icons} --output DIR [--limit N]
                      [--overwrite] [--seed S] [--workers N] [--image-size 64 (icons)]
  jest-pod data tokenizer ...        (jest_pod.data.tokenizer)
  jest-pod data cache-reference ...  (jest_pod.jest.reference)
  jest-pod data score-images ...     (jest_pod.data.score_images: two-phase input's stores)
  jest-pod data verify DIR           (jest_pod.data.verify: shard sizes + sha256)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from jest_pod import errors, lockfile
from jest_pod.data import builders, ingest, manifest, score_images, sources, system_packages

DELEGATES = {
    "tokenizer": "jest_pod.data.tokenizer",
    "cache-reference": "jest_pod.jest.reference",
    "score-images": "jest_pod.data.score_images",
    "verify": "jest_pod.data.verify",
}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jest-pod data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  ing = sub.add_parser("ingest",
                       help="image-text pairs (folder, TSV/CSV, WebDataset tars) -> data set")
  ing.add_argument("--input", required=True,
                   help="folder of images + same-stem .txt, a .tsv/.csv list, or .tar shard(s); "
                        "a list's relative image paths resolve against the list's folder, "
                        "absolute ones are used as given")
  ing.add_argument("--output", required=True, help="data set folder to write")
  ing.add_argument("--max-side", type=int, default=64, help="shrink images to this max side")
  ing.add_argument("--shard-size", type=int, default=10_000, help="records per shard")
  ing.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
  ing.add_argument("--overwrite", action="store_true", help="replace a data set in --output")
  ing.add_argument("--name", default=None, help="data set name (default: output folder name)")
  ing.add_argument("--source", default=None, help="records' source string (default: --name)")
  ing.add_argument("--image-format", choices=("auto", "png", "jpeg"), default="auto",
                   help="auto: JPEG q90 for JPEG/WebP inputs, PNG otherwise")
  ing.add_argument("--follow-symlinks", action="store_true",
                   help="follow symlinks inside the input (default: skip and count each)")
  ing.add_argument("--max-image-bytes", type=int, default=None,
                   help="skip (unread) image files/tar members larger than this "
                        "(default: ingest.MAX_IMAGE_BYTES, 64 MiB)")
  b = sub.add_parser("build", help="build a real offline data set from Debian packages")
  b.add_argument("name", choices=sorted(builders.BUILDERS))
  b.add_argument("--output", required=True)
  b.add_argument("--limit", type=int, default=None, help="cap each collection (fast tests)")
  b.add_argument("--overwrite", action="store_true")
  b.add_argument("--seed", type=int, default=0)
  b.add_argument("--workers", type=int, default=None)
  b.add_argument("--image-size", type=int, default=None,
                 help="stored picture side in pixels (icons only; default 64)")
  return p


def _failure(command: str, e: BaseException, output: str | None) -> str:
  """The one line a failed ingest/build ends with: the path and what to do."""
  if isinstance(e, (lockfile.FolderBusy, ingest.OutputNotEmptyError, ValueError,
                    system_packages.MissingPackageError)):
    return str(e)
  storage = errors.storage_message(e, output)
  if storage:
    return (f"{storage}. What this {command} left incomplete in {output} was removed: rerun "
            "the same command once that is fixed (no --overwrite needed)")
  if isinstance(e, OSError):
    return f"{e}" if e.filename else f"{type(e).__name__}: {e}"
  return (f"{type(e).__name__}: {' '.join(str(e).split())} (unexpected: rerun with --debug "
          "for the traceback and report it)")


def main(argv: list[str] | None = None) -> int:
  argv = errors.take_debug_flag(list(sys.argv[1:] if argv is None else argv))
  if argv and argv[0] in DELEGATES:  # their own argparse: pass the rest through untouched
    try:
      module = importlib.import_module(DELEGATES[argv[0]])
    except ModuleNotFoundError as e:
      if e.name != DELEGATES[argv[0]]:
        raise  # a missing dependency inside the module: show the real error
      print(f"jest-pod data {argv[0]}: not available in this version ({e.name} is missing)",
            file=sys.stderr)
      return 2
    return int(module.main(argv[1:]) or 0)
  args = _parser().parse_args(argv)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
  try:
    if args.command == "ingest":
      ingest.ingest(args.input, args.output, name=args.name, source=args.source,
                    max_side=args.max_side, shard_size=args.shard_size, workers=args.workers,
                    overwrite=args.overwrite, image_format=args.image_format,
                    follow_symlinks=args.follow_symlinks, max_image_bytes=args.max_image_bytes)
      score_images.ensure_shipped(args.output)  # two-phase input's, for the shipped configs
    else:
      # Options only some builders take (`build` refuses them for the others).
      extra = {} if args.image_size is None else {"image_size": args.image_size}
      builders.build(args.name, args.output, limit=args.limit, overwrite=args.overwrite,
                     workers=args.workers, seed=args.seed, **extra)
  except KeyboardInterrupt:
    if errors.debug():
      raise
    print(f"jest-pod data {args.command}: stopped by Ctrl-C; what it left incomplete in "
          f"{args.output} was removed: rerun the same command to start again",
          file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (one line; --debug: the traceback)
    if errors.debug():
      raise
    print(f"jest-pod data {args.command}: error: {_failure(args.command, e, args.output)}",
          file=sys.stderr)
    return 1
  print(_summary(args.command, args.output))
  return 0


def _summary(command: str, output: str) -> str:
  """The last line of a successful ingest/build: what the folder now holds, and where (a
  build that found its set complete wrote nothing, so "holds", not "wrote")."""
  def counts(folder):
    m = manifest.read(folder)
    return f"{m['num_examples']} examples in {len(m['shards'])} shard(s)"
  if manifest.is_complete(output):
    return (f"jest-pod data {command}: done: {output} holds {counts(output)}; train on it "
            f"with config.input.data={output}")
  sets = sources.sets(output)  # a pool's root (build demo): one data set per folder
  return (f"jest-pod data {command}: done: {output} holds "
          + ", ".join(f"{name}/ ({counts(folder)})" for name, folder in sets.items())
          + (f"; the configs take it as data={output}" if "web" in sets else ""))


if __name__ == "__main__":
  sys.exit(main())
