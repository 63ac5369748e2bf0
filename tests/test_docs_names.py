"""The docs name only code that exists (issue 22): every name in backticks in README.md
and WORKSPACE_NOTES.md that reads as this package's code must import or exist.

What counts as a code name (prose, shell commands, metric names and other libraries'
names are left alone):
  - a dotted Python name, with or without call arguments or `-> result`, whose first
    part is this package (`jest_pod.x.y`), one of its modules by dotted path
    (`jest.reference.build_cache`, `config.validate`; `X_lib` is the import alias of X)
    or by module name (`sources.source_names`, `feed.IteratorState`), or a class defined
    in it (`Tokenizer.sha256`): the attribute chain must resolve;
  - `config.KEY.KEY...`: a key of `config.base_config()`, checked as far as the base
    config has the section (per-entry dicts such as `config.evals.<name>` are free);
  - a file name ending in .py: some file of the repository has that name;
  - a path under the repository's folders (`configs/jest.py:runlocal`, `tools/eval`) or
    one of the package's (`train/writers.py`, `evaluators/__init__`), and a module path
    with an attribute (`train/feed.SkipCounter`): it must exist / resolve.
Spans with placeholders (<name>, *, ..., DIR, WORKDIR) are left out.
"""

import ast
import functools
import importlib
import inspect
import os
import pkgutil
import re

import pytest

import jest_pod
from jest_pod import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "WORKSPACE_NOTES.md")
REPO_ROOTS = ("jest_pod", "configs", "tests", "tools", "launch", "docs", ".ci")
IDENT = r"[A-Za-z_]\w*"
DOTTED = re.compile(rf"({IDENT}(?:\.{IDENT})+)(?:\(.*\))?(?:\s*->.*)?")
# A dotted span whose last part is one of these is a file name, not code.
FILE_EXTS = {"json", "jsonl", "md", "toml", "sh", "txt", "model", "safetensors", "npz",
             "png", "JPG", "jpg", "zip", "tsv", "csv", "gz", "tar", "array_record"}


@functools.cache
def _modules() -> dict[str, list[str]]:
  """{last part of a module name: [full names]} of every module of the package."""
  out: dict[str, list[str]] = {}
  for info in pkgutil.walk_packages(jest_pod.__path__, "jest_pod."):
    out.setdefault(info.name.rsplit(".", 1)[1], []).append(info.name)
  return out


@functools.cache
def _classes() -> dict[str, list[tuple[str, str]]]:
  """{class name: [(module, qualified name)]} of the package's top-level classes."""
  out: dict[str, list[tuple[str, str]]] = {}
  for names in _modules().values():
    for mod in names:
      path = os.path.join(REPO, *mod.split("."))
      path = path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__init__.py")
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for node in tree.body:
        if isinstance(node, ast.ClassDef):
          out.setdefault(node.name, []).append((mod, node.name))
  return out


def _resolve(module: str, attrs: list[str]) -> bool:
  try:
    obj = importlib.import_module(module)
  except ImportError:
    return False
  for i, a in enumerate(attrs):
    if hasattr(obj, a):
      obj = getattr(obj, a)
    elif isinstance(obj, type):  # an instance attribute: a dataclass field or self.a = ...
      return i == len(attrs) - 1 and _instance_attribute(obj, a)
    else:
      try:  # a submodule its package does not import
        obj = importlib.import_module(f"{obj.__name__}.{a}")
      except (ImportError, AttributeError):
        return False
  return True


def _instance_attribute(cls: type, name: str) -> bool:
  if name in getattr(cls, "__dataclass_fields__", {}):
    return True
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    return False
  return re.search(rf"\bself\.{name}\b(?:\s*,\s*self\.\w+)*\s*(?::[^=]+)?=(?!=)", source) is not None


def _resolve_dotted(parts: list[str]) -> bool:
  """Whether `parts` (a.b.c) names something of the package, tried every way it may
  mean (package path, module name, class name)."""
  ways = []
  if parts[0] == "jest_pod":
    ways.append(("jest_pod", parts[1:]))
  ways.append(("jest_pod", parts))  # jest.reference.build_cache, config.validate
  for mod in _modules().get(parts[0], []):
    ways.append((mod, parts[1:]))
  for mod, cls in _classes().get(parts[0], []):
    ways.append((mod, [cls] + parts[1:]))
  return any(_resolve(m, a) for m, a in ways)


def _is_code(parts: list[str]) -> bool:
  head = parts[0].removesuffix("_lib")
  return head == "jest_pod" or head in _modules() or head in _classes()


def _config_key_ok(keys: list[str]) -> bool:
  node = config_lib.base_config()
  for k in keys:
    if not hasattr(node, "keys"):
      return True  # a leaf's own attribute, or a per-entry dict
    if k not in node.keys():
      return False
    node = node[k]
  return True


def check(span: str) -> str | None:
  """None when `span` is fine (or not a code name), else why it is stale."""
  if re.search(r"<|\*|\.\.\.|\bDIR\b|WORKDIR|DATA\b|\s(?!->)", span.split("(")[0]):
    return None
  m = DOTTED.fullmatch(span)
  if m:
    parts = m.group(1).split(".")
    if parts[-1] == "py" and len(parts) == 2:
      found = any(parts[0] + ".py" in files for _, _, files in os.walk(REPO)
                  if ".venv" not in _)
      return None if found else f"no file named {parts[0]}.py"
    if parts[-1] in FILE_EXTS or not _is_code(parts):
      return None
    if parts[0] == "config" and parts[1] in config_lib.base_config().keys():
      return None if _config_key_ok(parts[1:]) else f"{'.'.join(parts)} is no config key"
    parts[0] = parts[0].removesuffix("_lib")
    return None if _resolve_dotted(parts) else f"{'.'.join(parts)} does not resolve"
  path = span.split(":")[0]
  if "/" not in path or " " in path:
    return None
  if path.split("/")[0] in REPO_ROOTS:
    return None if os.path.exists(os.path.join(REPO, path)) else f"{path} does not exist"
  pkg = os.path.join(REPO, "jest_pod")
  if path.split("/")[0] not in {n for n in os.listdir(pkg)
                                if os.path.isdir(os.path.join(pkg, n))}:
    return None
  mod = re.fullmatch(rf"([\w/]+)\.({IDENT}(?:\.{IDENT})*)", path)
  if path.endswith(".py") or path.endswith("/"):
    return None if os.path.exists(os.path.join(pkg, path)) else f"jest_pod/{path} does not exist"
  if mod:  # train/feed.SkipCounter
    name = "jest_pod." + mod.group(1).replace("/", ".")
    return None if _resolve(name, mod.group(2).split(".")) else f"{path} does not resolve"
  if re.fullmatch(r"[\w/]+", path) and "__" in path:  # evaluators/__init__
    return None if os.path.exists(os.path.join(pkg, path + ".py")) else f"{path} does not exist"
  return None  # data/skipped_records, train/loss: metric names


def _spans(doc: str) -> list[tuple[int, str]]:
  with open(os.path.join(REPO, doc), encoding="utf-8") as f:
    text = f.read()
  return [(text.count("\n", 0, m.start()) + 1, m.group(1))
          for m in re.finditer(r"`([^`\n]+)`", text)]


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_only_code_that_exists(doc):
  stale = [f"{doc}:{line}: `{span}`: {why}" for line, span in _spans(doc)
           if (why := check(span))]
  assert not stale, "\n".join(stale)


def test_the_rule_catches_stale_names_and_leaves_prose_alone():
  for stale in ("jest_pod.train.DEVICE_KEYS", "pipeline.source_names", "sources._Nope",
                "jest.reference.nope", "config_lib.nope", "config.input.nope",
                "Tokenizer.nope", "Part.nope", "train/feed.Nope", "train/nope.py", "configs/nope.py:x",
                "nope_module_xyz.py", "evaluators/__nope__",
                "jest_pod.checkpoint.nope(path) -> x"):
    assert check(stale), stale
  for fine in ("jest_pod.data.input_config.DEVICE_KEYS", "sources.source_names",
               "config_lib.resolve(config)", "config.input.max_pixels",
               "config.evals", "config.selection.reference", "Tokenizer.sha256",
               "Tokenizer.pad_id", "Part.family", "train/feed.SkipCounter",
               "train/writers.py", "configs/jest.py:runlocal", "tools/eval",
               "evaluators/__init__", "jest_pod.checkpoint.load_params(path, step=None) -> x",
               # not this package's code:
               "np.stack", "cv2.resize", "SiglipModel.from_pretrained(PATH)", "e.g.",
               "metrics.jsonl", "manifest.json", "train/loss", "data/skipped_records",
               "z/0shot/<set>_top1", "DIR/manifest.json", "jest-pod data verify DIR",
               "model.apply({'params': p}, image)", "gs://"):
    assert check(fine) is None, fine


def _cells(section: str, first: str) -> list[str]:
  """The cells after the first of the table row of `section` that starts with `first`."""
  rows = [line for line in section.splitlines() if line.startswith(f"| {first} |")]
  assert len(rows) == 1, (first, rows)
  return [c.strip().strip("*") for c in rows[0].split("|")[2:-1]]


def test_the_readmes_two_demo_tables_are_one_runs_figures():
  """The demo's table and the public-reference walk-through's repeat uniform, JEST and the
  reference from one demo run, so they cannot disagree (they once gave JEST 0.535 and
  0.544)."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  demo = text[text.index("## What the demo shows"):]
  demo = demo[:demo.index("\n## ", 3)]
  public = text[text.index("**Shown offline on the CPU**"):]
  public = public[:public.index("![")]
  assert _cells(demo, "uniform")[:3] == _cells(public, "uniform")[:3]
  assert _cells(demo, "JEST")[:3] == _cells(public, "JEST, the demo's reference")[:3]
  assert (_cells(demo, "reference (curated)")[:3]
          == _cells(public, "the demo's reference (FlexiViT, curated)")[:3])
