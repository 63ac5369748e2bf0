"""How the package's modules import each other: no import cycle anywhere in jest_pod/,
none between jest_pod.config and jest_pod.jest even at function level (config validates
against jest's registries; jest never imports config), and every import at the top of its
module (a function-level import hides a layering problem; one is allowed only for a
dependency that may be missing at run time, listed in OPTIONAL). The CLI stays cheap by
importing each subcommand's module only when it runs (cli.py's importlib table), not by
hiding imports inside functions."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules a function may import because they may be absent at run time: TensorFlow and
# CLU are the optional `tf` extra (train/writers.py falls back to tensorboard's writer);
# psutil is not a dependency (bench data counts its workers' CPU time when it is there).
OPTIONAL: set[str] = {"tensorflow", "clu", "psutil"}


def _modules(*subpackages):
  """{dotted module name: ast tree} of jest_pod/<sub>/**.py ("." for the whole package)."""
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


def _top_level_imports(tree, modules=()) -> set[str]:
  """The modules a module imports at its top. `from pkg import sub` names pkg.sub when it
  is one of `modules` (the package's __init__ is not a dependency then: Python imports a
  submodule of a package that is still initialising), else pkg and pkg.sub."""
  deps = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        deps |= {sub} if sub in modules else {node.module, sub}
    elif isinstance(node, ast.Import):
      deps |= {a.name for a in node.names}
  return deps


def test_no_function_level_imports():
  inner = []
  for name, tree in _modules(".").items():
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
  assert _top_level_imports(tree, {"x.y"}) == {"x.y", "z"}


def test_no_import_cycle_in_the_package():
  mods = _modules(".")
  graph = {m: {d for d in _top_level_imports(t, mods) if d in mods and d != m}
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


def test_importing_any_command_starts_no_jax_backend():
  """The demo and the sweep's worker processes choose the CPU device count after their
  imports (`demo.set_cpu_devices`): only possible while no import has started JAX."""
  script = (
      "import importlib, jax\n"
      "from jest_pod import cli\n"
      "from jest_pod.experiments import bench\n"
      "for m in [m for m, _ in cli.SUBCOMMANDS.values()] + list(bench.WHAT.values()):\n"
      "  importlib.import_module(m)\n"
      "jax.config.update('jax_num_cpu_devices', 3)  # raises once a backend exists\n"
      "assert jax.device_count() == 3, jax.devices()\n")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
