"""How the package's modules import each other: no cycle inside jest_pod/data/, none
between jest_pod.config and jest_pod.jest (config validates against jest's registries;
jest never imports config), and imports at the top of the module in data/, evaluators/,
config/, jest/ and train/ (a function-level import hides a layering problem; one is
allowed only for a dependency that may be missing at run time, listed in OPTIONAL)."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules a function may import because they may be absent at run time: TensorFlow and
# CLU are the optional `tf` extra (train/writers.py falls back to tensorboard's writer).
OPTIONAL: set[str] = {"tensorflow", "clu"}
# The packages whose modules import at the top only.
TOP_LEVEL_ONLY = ("data", "evaluators", "config", "jest", "train")


def _modules(*subpackages):
  """{dotted module name: ast tree} of jest_pod/<sub>/**.py."""
  out = {}
  for sub in subpackages:
    for dirpath, _, files in os.walk(os.path.join(REPO, "jest_pod", sub)):
      for f in sorted(files):
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
          with open(path, encoding="utf-8") as fh:
            out[name] = ast.parse(fh.read(), path)
  return out


def _top_level_imports(tree) -> set[str]:
  deps = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      deps |= {a.name for a in node.names}
  return deps


def test_no_function_level_imports_in_data_evaluators_config_jest_and_train():
  inner = []
  for name, tree in _modules(*TOP_LEVEL_ONLY).items():
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for n in ast.walk(fn):
          if isinstance(n, ast.Import):
            mods = [a.name for a in n.names]
          elif isinstance(n, ast.ImportFrom):
            mods = [n.module or ""]
          else:
            continue
          inner += [f"{name}:{n.lineno} imports {m}" for m in mods
                    if m.split(".")[0] not in OPTIONAL]
  assert not inner, "function-level imports:\n" + "\n".join(inner)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One import cycle through each module that is on one (depth-first search)."""
  out = []
  for start in sorted(graph):
    stack, seen = [(start, [start])], set()
    while stack:
      node, path = stack.pop()
      if start in graph.get(node, ()):
        out.append(path + [start])
        break
      for d in sorted(graph.get(node, ())):
        if d not in seen:
          seen.add(d)
          stack.append((d, path + [d]))
  return out


def test_the_checks_see_what_they_look_for():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
      ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []
  tree = ast.parse("from x import y\nimport z\ndef f():\n  import w")
  assert _top_level_imports(tree) == {"x", "x.y", "z"}


def test_no_import_cycle_inside_data():
  mods = _modules("data")
  graph = {m: {d for d in _top_level_imports(t) if d in mods and d != m}
           for m, t in mods.items()}
  cycles = _cycles(graph)
  assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def _package_imports(tree) -> set[str]:
  """Every jest_pod.* module a module imports, at any level of the module."""
  deps = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      deps |= {a.name for a in node.names}
  return {d for d in deps if d.startswith("jest_pod.")}


def test_no_import_cycle_between_config_and_jest():
  """config → jest (validation reads SCORES, LOSSES, DISTILL_KINDS) and never back."""
  into_config = [f"{m} imports {d}" for m, t in _modules("jest").items()
                 for d in _package_imports(t)
                 if d == "jest_pod.config" or d.startswith("jest_pod.config.")]
  assert not into_config, "jest imports config: " + "; ".join(into_config)
  graph = {"config": set(), "jest": set()}
  for pkg, other in (("config", "jest"), ("jest", "config")):
    for t in _modules(pkg).values():
      if any(d.startswith(f"jest_pod.{other}") for d in _package_imports(t)):
        graph[pkg].add(other)
  assert not _cycles(graph), graph
