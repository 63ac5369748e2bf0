"""The `jest-pod` command: one entry point, one module per subcommand.

Each subcommand lives in its own module with a `main(argv: list[str]) -> int`;
they are imported lazily so that `jest-pod data ...` does not pay for JAX start-up
it does not need.
"""

import faulthandler
import importlib
import sys

from jest_pod import errors

SUBCOMMANDS = {
    "train": ("jest_pod.train.cli", "train a model from a config (uniform or JEST)"),
    "data": ("jest_pod.data.cli", "ingest, build real offline data sets, tokenizer, reference cache"),
    "eval": ("jest_pod.evaluators.cli", "evaluate a checkpoint: zero-shot and retrieval"),
    "embed": ("jest_pod.interop.embed_cli", "embed every record of a data set with any checkpoint"),
    "export": ("jest_pod.interop.export", "a SigLIP-family learner to Hugging Face or big_vision"),
    "plot": ("jest_pod.experiments.plot", "draw learning curves of several runs"),
    "bench": ("jest_pod.experiments.bench", "benchmarks: selection, step split, data pipeline"),
    "demo": ("jest_pod.experiments.demo", "the end-to-end CPU demo: uniform vs JEST on real data"),
    "sweep": ("jest_pod.experiments.sweep", "the paper's experiments in miniature over seeds, tables + figures"),
}


def _usage() -> str:
  lines = ["usage: jest-pod <command> [args...]", "", "commands:"]
  lines += [f"  {name:<7} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
  lines += ["", "`jest-pod <command> --help` for a command's options."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  # A crash in native code (a segfault reported once during an async checkpoint save,
  # issue 32, not reproduced) then prints every thread's Python stack to stderr.
  if not faulthandler.is_enabled():
    faulthandler.enable()
  # `--debug` anywhere: failures keep their traceback (each command reads errors.debug()).
  argv = errors.take_debug_flag(list(sys.argv[1:] if argv is None else argv))
  if len(argv) > 1 and argv[0] == "help" and argv[1] in SUBCOMMANDS:
    argv = [argv[1], "--help"]  # `jest-pod help train` = `jest-pod train --help`
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"jest-pod: unknown command {name!r}; choose one of: "
          f"{', '.join(SUBCOMMANDS)}", file=sys.stderr)
    return 2
  module = importlib.import_module(SUBCOMMANDS[name][0])
  # Commands report their own expected failures; anything that escapes is one line too.
  return errors.run_command(f"jest-pod {name}", lambda: module.main(rest))


if __name__ == "__main__":
  sys.exit(main())
