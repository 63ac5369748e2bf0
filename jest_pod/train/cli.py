"""`jest-pod train`: flags → config → `train.main.train`, with one-paragraph errors.

Parses `--config FILE.py[:ARGS]`, `--config.KEY=VALUE` overrides and `--workdir` (absl +
ml_collections, as big_vision does), and turns their failure modes (a missing file, a
misspelled key, a bad config argument, a failed validation) into one line on stderr with
exit code 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import ml_collections
from absl import flags

from jest_pod import checkpoint as ckpt_lib
from jest_pod import config as config_lib
from jest_pod import errors
from jest_pod.parallel import distributed
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.train import hooks
from jest_pod.train import lock as lock_lib
from jest_pod.train.hooks import TrainingDiverged, setup_logging
from jest_pod.train.main import train

log = logging.getLogger("jest_pod")


_TRAIN_USAGE = """\
usage: jest-pod train --config FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

Train a two-tower image-text model (SigLIP/CLIP), uniform or JEST. Rerun the same
command to resume from the latest checkpoint in DIR.

options:
  --config FILE.py[:ARGS]  config file; ARGS (comma-separated KEY or KEY=VALUE) go to its
                           get_config(), e.g. configs/siglip.py:runlocal,steps=100
  --config.KEY=VALUE       override one field of the config (dotted key), e.g.
                           --config.batch_size=32 --config.optax.lr=3e-4
  --workdir DIR            checkpoints, logs and metrics (may be gs://)
  -h, --help               show this help and exit

configs: {configs}

examples:
  jest-pod train --config configs/siglip.py:runlocal --workdir /tmp/run
  jest-pod train --config configs/reference.py:runlocal --workdir workdirs/reference
  jest-pod train --config configs/jest.py:runlocal,reference=workdirs/reference \\
      --workdir workdirs/jest --config.total_steps=200"""


def _known_configs() -> list[str]:
  try:
    names = sorted(f for f in os.listdir(config_lib.CONFIGS_DIR) if f.endswith(".py"))
  except OSError:
    return []
  return [f"configs/{f}" for f in names if not f.startswith("_")]


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name (or -name) in argv, '--name=V' or '--name V' form; last one wins."""
  value = None
  for i, a in enumerate(argv):
    for prefix in (f"--{name}", f"-{name}"):
      if a.startswith(prefix + "="):
        value = a[len(prefix) + 1:]
      elif a == prefix and i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _missing_config_file(cfg_arg: str) -> str | None:
  """A one-paragraph error if --config's file does not exist, else None."""
  path = cfg_arg.split(":", 1)[0]
  if os.path.isfile(path):
    return None
  msg = f"--config {cfg_arg}: config file {path!r} not found (relative to {os.getcwd()})."
  in_repo = os.path.join(config_lib.CONFIGS_DIR, os.path.basename(path))
  if os.path.isfile(in_repo):
    msg += f" Did you mean {in_repo}?"
  known = _known_configs()
  if known:
    msg += f" The repo's configs: {', '.join(known)}"
  return msg + " (e.g. --config configs/siglip.py:runlocal)."


def _split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
  """argv without its --config.KEY=VALUE (or --config.KEY VALUE) overrides, and those as
  (flag as written, dotted key, value): they go through config.override, not absl."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    for prefix in ("--config.", "-config."):
      if a.startswith(prefix):
        key, eq, value = a[len(prefix):].partition("=")
        if not eq and i + 1 < len(argv):
          i += 1
          value = argv[i]
          a = f"{a}={value}"
        overrides.append((a, key, value))
        break
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _config_file_error(e: BaseException, cfg_arg: str | None) -> str | None:
  """One line for a config file that raised, does not parse, failed an import or has no
  get_config (naming the file and line), else None (a flag error: _flag_error_message)."""
  if not cfg_arg:
    return None
  path = cfg_arg.split(":", 1)[0]
  root = list(errors.chain(e))[-1]
  if isinstance(root, AttributeError) and "get_config" in str(root):
    return (f"--config {cfg_arg}: {path} defines no get_config(); a config file is Python "
            "with `def get_config(arg=None):` returning an ml_collections.ConfigDict (see "
            "configs/siglip.py)")

  def in_config(frame):  # the --config file, or a config it loads from configs/
    return (os.path.realpath(frame.filename) == os.path.realpath(path)
            or os.path.basename(os.path.dirname(frame.filename)) == "configs")

  frames = traceback.extract_tb(root.__traceback__)
  if isinstance(root, SyntaxError) and root.filename:
    where = f"{root.filename} line {root.lineno}"
  elif isinstance(root, ImportError) and any(in_config(f) for f in frames):
    where = next(f"{f.filename} line {f.lineno}" for f in reversed(frames) if in_config(f))
  elif frames and in_config(frames[-1]):  # raised by the config's own code
    where = f"{frames[-1].filename} line {frames[-1].lineno}"
  else:  # raised by a library it calls (e.g. parse_arg's readable ValueError)
    return None
  text = root.msg if isinstance(root, SyntaxError) else str(root.args[0]) if (
      isinstance(root, KeyError) and root.args) else str(root)
  fix = ("install that module or fix the import" if isinstance(root, ImportError) else
         "fix the config file")
  return (f"--config {cfg_arg}: loading the config failed at {where}: "
          f"{type(root).__name__}: {' '.join(text.split())}; {fix}")


def _flag_error_message(e: BaseException, argv: list[str], cfg_arg: str | None) -> str:
  """absl / ml_collections flag errors → one paragraph without a traceback."""
  root = e
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  # KeyError's str() is the repr of its message; the innermost exception holds the
  # readable one.
  text = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
  text = " ".join(text.split())
  outer = str(e)
  where = outer.split(": ", 1)[0][len("flag "):] if outer.startswith("flag --") else ""
  if isinstance(e, flags.UnrecognizedFlagError) and not cfg_arg and "config." in outer:
    text += "; --config FILE must come before --config.KEY=VALUE overrides"
  elif isinstance(e, flags.UnrecognizedFlagError):
    text += "; the flags are --config, --config.KEY=VALUE and --workdir"
  return f"{where}: {text}" if where and where not in text else text


def main(argv: list[str]) -> int:
  def usage_error(msg: str) -> int:
    print(f"jest-pod train: error: {msg} (`jest-pod train --help` for usage)", file=sys.stderr)
    return 2

  argv = errors.take_debug_flag(list(argv))
  if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv):
    print(_TRAIN_USAGE.format(configs=", ".join(_known_configs()) or "(none found)"))
    return 0
  cfg_arg = _flag_value(argv, "config")
  if cfg_arg and (missing := _missing_config_file(cfg_arg)):
    return usage_error(missing)

  rest, overrides = _split_overrides(argv)
  fv = flags.FLAGS
  if "config" not in fv:
    flags.DEFINE_string("config", None, "config file, e.g. configs/siglip.py:runlocal")
    flags.DEFINE_string("workdir", None, "where checkpoints, logs and metrics go (may be gs://)")
  try:
    fv(["jest-pod train", *rest])
  except Exception as e:  # pylint: disable=broad-except
    if errors.debug():
      raise
    return usage_error(_flag_error_message(e, argv, cfg_arg))
  if fv.config is None or fv.workdir is None:
    return usage_error("--config and --workdir are required, e.g. jest-pod train "
                       "--config configs/siglip.py:runlocal --workdir /tmp/siglip")
  path, _, arg = fv.config.partition(":")
  try:
    config = config_lib.load(path, arg)  # the config file runs in here
  except Exception as e:  # pylint: disable=broad-except
    if errors.debug():
      raise
    return usage_error(_config_file_error(e, cfg_arg) or _flag_error_message(e, argv, cfg_arg))
  if config is None:
    return usage_error(f"--config {cfg_arg}: get_config() returned None; it must return "
                       "the config (an ml_collections.ConfigDict): a missing `return`?")
  if not isinstance(config, ml_collections.ConfigDict):
    return usage_error(f"--config {cfg_arg}: get_config() returned a "
                       f"{type(config).__name__}, not an ml_collections.ConfigDict")
  for flag, key, value in overrides:  # the one override path (config.override)
    try:
      config_lib.override(config, key, value)
    except config_lib.UnknownKey as e:
      return usage_error(f"{flag}: {e.describe('--config.')}")
    except (TypeError, ValueError) as e:
      return usage_error(f"{flag}: {' '.join(str(e).split())}")
  config.lock()  # a typo'd field set by code later fails instead of adding a key
  try:  # train() checks these too; here they are usage errors, before any set-up
    config_lib.validate(config)
    config_lib.check_input(config)
  except ValueError as e:
    return usage_error(str(e))
  except (AttributeError, KeyError, TypeError) as e:  # a config not built on base_config()
    if errors.debug():
      raise
    return usage_error(f"--config {cfg_arg}: the config lacks or mistypes a field "
                       f"({type(e).__name__}: {e}); build it on "
                       "jest_pod.config.base_config() as configs/siglip.py does")
  setup_logging()
  try:
    result = train(config, fv.workdir)  # also returns after a SIGTERM/Ctrl-C checkpoint
  except (ValueError, ckpt_lib.CheckpointError, TrainingDiverged, lock_lib.WorkdirBusy,
          tokenizer_lib.TokenizerError, errors.StorageError) as e:
    if errors.debug():
      log.exception("traceback (--debug)")
    # Raised alike on every host (config checks, replicated loss): leave together.
    log.error("%s", e)
    print(f"jest-pod train: error: {e}", file=sys.stderr)
    distributed.shutdown()
    return 1
  except KeyboardInterrupt:  # the second Ctrl-C (the first saves at the next step)
    if errors.debug():
      raise
    print(f"jest-pod train: stopped by Ctrl-C. {hooks.last_checkpoint_line(fv.workdir)}",
          file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if errors.debug():
      raise
    log.error("%s: %s", type(e).__name__, e)
    print(f"jest-pod train: error: {type(e).__name__}: {' '.join(str(e).split())} "
          "(unexpected: rerun with --debug for the traceback and report it). "
          f"{hooks.last_checkpoint_line(fv.workdir, 'remove the cause of that error')}",
          file=sys.stderr)
    distributed.shutdown()
    return 1
  # A barrier with the other processes, so none races through JAX's atexit teardown
  # while another still runs (the coordinator would log "another task died").
  distributed.shutdown()
  return 130 if result.get("interrupted") else 0
