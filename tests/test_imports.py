"""The package's layering, checked statically: every ``import`` / ``from ... import`` node of every module
under nextstep_jax/ (at any depth, relative imports resolved) becomes an edge between the project's own
modules, and the rules below, written out as data, name the edges that may not exist.

Nothing is imported: the modules are only parsed with `ast`, so this runs in well under a second.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "nextstep_jax"
ROOT = REPO / PACKAGE

# ------------------------------------------------------------------------------------------------
# The rules (data)
# ------------------------------------------------------------------------------------------------
# Entry points (python -m nextstep_jax.X). Everything else in the package is library.
ENTRY_POINTS = tuple(f"{PACKAGE}.{m}" for m in (
    "train", "train_vae", "dpo", "distill", "sample", "export", "evaluate", "latents", "aot", "demo",
    "data.__main__"))
# The one entry point that may import other entry points (it chains them).
MAY_IMPORT_ENTRY_POINTS = (f"{PACKAGE}.demo",)

# (rule, the importing modules: these modules or packages, the forbidden targets: these modules or
# packages; PACKAGE itself means anything of the project). A name covers the module, or the package
# and everything below it. The rules hold the library: an entry point inside a package (the data
# command, data.__main__) wires the library together as the others do (it loads the VAE with run).
FORBIDDEN = (
    ("models are independent of data, training, sampling, evaluation, interop, run, config",
     (f"{PACKAGE}.models",),
     tuple(f"{PACKAGE}.{m}" for m in ("data", "training", "sampling", "evaluation", "interop", "run",
                                      "config"))),
    ("data is independent of models, training, sampling, evaluation, interop, run",
     (f"{PACKAGE}.data",),
     tuple(f"{PACKAGE}.{m}" for m in ("models", "training", "sampling", "evaluation", "interop", "run"))),
    ("parallel and batch import nothing of the project",
     (f"{PACKAGE}.parallel", f"{PACKAGE}.batch"),
     (PACKAGE,)),
)
# (rule, the importing modules, the only project modules they may import): every other edge from them
# is forbidden. storage stays below everything that reads or writes paths (config, data, run, training).
ONLY_IMPORTS = (
    ("storage imports nothing of the project but errors",
     (f"{PACKAGE}.storage",),
     (f"{PACKAGE}.errors",)),
)
ENTRY_POINT_RULE = "no library module (nor entry point other than demo) imports an entry point"
FUNCTION_LEVEL_RULE = "no function-level import of a project module"


# ------------------------------------------------------------------------------------------------
# The walker
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Edge:
  source: str        # importing module, dotted
  target: str        # imported project module (or package), dotted
  path: str          # the importing file, relative to the repository
  line: int
  module_level: bool  # False: the import node sits inside a def, lambda or class body

  def __str__(self) -> str:
    where = "" if self.module_level else " (inside a function/class)"
    return f"{self.path}:{self.line}: {self.source} -> {self.target}{where}"


def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
  """(dotted name, is a package) of a file under the package root."""
  rel = path.relative_to(root.parent).with_suffix("")
  parts = list(rel.parts)
  is_package = parts[-1] == "__init__"
  if is_package:
    parts = parts[:-1]
  return ".".join(parts), is_package


def project_modules(root: Path = ROOT) -> dict[str, Path]:
  """Dotted name -> file, for every module and package of the project."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    if "__pycache__" in path.parts:
      continue
    out[module_name(path, root)[0]] = path
  return out


def _resolve_relative(current: str, is_package: bool, level: int, module: str | None) -> str:
  base = current.split(".") if is_package else current.split(".")[:-1]
  if level > 1:
    base = base[:len(base) - (level - 1)]
  return ".".join(base + ([module] if module else []))


def _in_project(name: str, package: str = PACKAGE) -> bool:
  return name == package or name.startswith(package + ".")


def _closest_module(name: str, modules) -> str:
  """The deepest existing project module that `name` names or lies in (an attribute of a module)."""
  parts = name.split(".")
  while len(parts) > 1 and ".".join(parts) not in modules:
    parts.pop()
  return ".".join(parts)


def imports_of(source_text: str, current: str, is_package: bool, modules, path: str = "<string>",
               package: str = PACKAGE) -> list[Edge]:
  """Every project import in `source_text` (module `current`), at any depth of the tree."""
  tree = ast.parse(source_text, filename=path)
  edges: list[Edge] = []

  def add(target: str, node: ast.stmt, module_level: bool) -> None:
    if _in_project(target, package):
      edges.append(Edge(current, _closest_module(target, modules), path, node.lineno, module_level))

  def visit(node: ast.AST, module_level: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        for alias in child.names:
          add(alias.name, child, module_level)
      elif isinstance(child, ast.ImportFrom):
        base = (_resolve_relative(current, is_package, child.level, child.module) if child.level
                else child.module or "")
        if not _in_project(base, package):
          continue
        for alias in child.names:
          # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg.
          sub = f"{base}.{alias.name}"
          add(sub if alias.name != "*" and sub in modules else base, child, module_level)
      inner = module_level and not isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
      visit(child, inner)

  visit(tree, True)
  return list(dict.fromkeys(edges))   # one edge per line even when it names several things


def all_edges(root: Path = ROOT) -> list[Edge]:
  modules = project_modules(root)
  edges = []
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    edges += imports_of(path.read_text(encoding="utf-8"), name, is_package, modules,
                        os.path.relpath(path, REPO))
  return edges


def _covers(names, module: str) -> bool:
  return any(module == n or module.startswith(n + ".") for n in names)


def violations(edges) -> list[str]:
  """Each forbidden edge, once per rule it breaks, as 'rule: file:line: source -> target'."""
  out = []
  for e in edges:
    if e.target == e.source:
      continue
    if e.target in ENTRY_POINTS and e.source not in MAY_IMPORT_ENTRY_POINTS:
      out.append(f"{ENTRY_POINT_RULE}: {e}")
    for rule, sources, targets in FORBIDDEN:
      if e.source not in ENTRY_POINTS and _covers(sources, e.source) and _covers(targets, e.target):
        out.append(f"{rule}: {e}")
    for rule, sources, allowed in ONLY_IMPORTS:
      if _covers(sources, e.source) and not _covers(allowed, e.target):
        out.append(f"{rule}: {e}")
    if not e.module_level:
      out.append(f"{FUNCTION_LEVEL_RULE}: {e}")
  return out


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edges():
  return all_edges()


def test_walker_finds_real_edges(edges):
  """Guards against a vacuous pass: the walker sees the package and edges that are known to exist."""
  modules = project_modules()
  assert len(modules) > 30 and all(ep in modules for ep in ENTRY_POINTS), sorted(modules)
  found = {(e.source, e.target) for e in edges}
  assert ("nextstep_jax.training.loop", "nextstep_jax.run") in found
  assert len(found) > 50


def test_walker_resolves_relative_nested_and_from_imports():
  modules = {"nextstep_jax", "nextstep_jax.models", "nextstep_jax.models.vae", "nextstep_jax.models.layers",
             "nextstep_jax.data", "nextstep_jax.data.digits", "nextstep_jax.train", "nextstep_jax.batch"}
  text = (
      "import os\n"
      "from . import layers\n"                            # 2: nextstep_jax.models.layers
      "from ..data import digits\n"                       # 3: nextstep_jax.data.digits
      "from ..batch import IGNORE\n"                      # 4: nextstep_jax.batch (a name in it)
      "import nextstep_jax.data.digits as d\n"           # 5
      "try:\n"
      "  from nextstep_jax import train\n"                # 7: module level (inside try)
      "except ImportError:\n"
      "  pass\n"
      "def f():\n"
      "  from nextstep_jax.data import digits\n"          # 11: function level
      "  return [__import__('json')]\n"
      "class C:\n"
      "  def g(self):\n"
      "    if True:\n"
      "      import nextstep_jax.models.layers\n"         # 16: function level, nested
  )
  got = [(e.target, e.line, e.module_level)
         for e in imports_of(text, "nextstep_jax.models.vae", False, modules)]
  assert got == [("nextstep_jax.models.layers", 2, True), ("nextstep_jax.data.digits", 3, True),
                 ("nextstep_jax.batch", 4, True), ("nextstep_jax.data.digits", 5, True),
                 ("nextstep_jax.train", 7, True), ("nextstep_jax.data.digits", 11, False),
                 ("nextstep_jax.models.layers", 16, False)]
  # In a package's __init__, "." is the package itself.
  got = imports_of("from .vae import x\n", "nextstep_jax.models", True, modules)
  assert [e.target for e in got] == ["nextstep_jax.models.vae"]


def test_checker_flags_synthetic_forbidden_edges():
  def edge(source, target, module_level=True):
    return Edge(source, target, "x.py", 1, module_level)

  bad = [edge("nextstep_jax.models.vae", "nextstep_jax.data.digits"),
         edge("nextstep_jax.data.mixture", "nextstep_jax.models"),
         edge("nextstep_jax.training.loop", "nextstep_jax.train"),
         edge("nextstep_jax.sample", "nextstep_jax.export"),
         edge("nextstep_jax.parallel", "nextstep_jax.config"),
         edge("nextstep_jax.batch", "nextstep_jax"),
         edge("nextstep_jax.sampling.runner", "nextstep_jax.run", module_level=False),
         edge("nextstep_jax.storage", "nextstep_jax.config"),
         edge("nextstep_jax.storage", "nextstep_jax")]
  found = violations(bad)
  assert len(found) == len(bad), found
  for e, v in zip(bad, found):
    assert f"{e.source} -> {e.target}" in v
  fine = [edge("nextstep_jax.demo", "nextstep_jax.train"),
          edge("nextstep_jax.training.loop", "nextstep_jax.training.aot"),   # not the entry point aot
          edge("nextstep_jax.training.loop", "nextstep_jax.run"),
          edge("nextstep_jax.models.nextstep", "nextstep_jax.batch"),
          edge("nextstep_jax.data.mixture", "nextstep_jax.parallel"),
          edge("nextstep_jax.data.__main__", "nextstep_jax.run"),   # an entry point, not data's library
          edge("nextstep_jax.storage", "nextstep_jax.errors"),
          edge("nextstep_jax.data.settings", "nextstep_jax.storage"),
          edge("nextstep_jax.train", "nextstep_jax.training.loop")]
  assert violations(fine) == []


def test_no_forbidden_imports(edges):
  found = violations(edges)
  assert not found, f"{len(found)} forbidden import(s):\n" + "\n".join(found)
