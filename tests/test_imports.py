"""The import graph of `jaxrl_dense` has no cycle, between modules or between folders.

Nodes are the package's modules (a package is its `__init__`); an arrow `a -> b` is any `import` or
`from ... import` statement in `a`'s source naming `b`, at module level or inside a function (a
function-level import is still an arrow; it only delays the loop). `from p import x` points at the
module `p.x` when that is a module, else at `p`. Only arrows inside the package count.

Run as a script to print the graph's cycles: `python tests/test_imports.py`.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "jaxrl_dense"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def import_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> Dict[str, Set[str]]:
  """{module: modules of `package` it imports}, from the source files under `root/package`."""
  files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
  graph: Dict[str, Set[str]] = {m: set() for m in files}
  for mod, path in files.items():
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      targets: List[str] = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package of `mod`
          anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
      for t in targets:
        while t and t not in files:  # `import a.b.c` of a non-module attribute: its module
          t = t.rpartition(".")[0]
        if t and t != mod and (t == package or t.startswith(package + ".")):
          graph[mod].add(t)
  return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """The strongly connected components with more than one module (or a self-loop), sorted."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  on_stack: Set[str] = set()
  out: List[List[str]] = []

  def visit(v: str) -> None:  # Tarjan's algorithm (recursion depth <= number of modules)
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in graph.get(v, ()):
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def test_cycle_finder_detects_a_loop_and_passes_a_dag():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"a"}}) == [["a"]]
  assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_graph_builder_sees_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "low.py").write_text("def f():\n  from pkg.sub import high\n  return high\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "high.py").write_text("from .. import low\nimport os\n")
  graph = import_graph(tmp_path, "pkg")
  assert graph["pkg.low"] == {"pkg.sub.high"} and graph["pkg.sub.high"] == {"pkg.low"}
  assert cycles(graph) == [["pkg.low", "pkg.sub.high"]]


def test_the_package_graph_is_big_enough_to_mean_something():
  graph = import_graph()
  assert len(graph) > 50 and sum(map(len, graph.values())) > 100
  assert "jaxrl_dense.ops" in graph["jaxrl_dense.advantages.outcome"]


KNOWN_CYCLES: List[List[str]] = []


def test_jaxrl_dense_has_no_import_cycle():
  found = cycles(import_graph())
  new = [c for c in found if c not in KNOWN_CYCLES]
  assert not new, "import cycles (each a set of modules that import each other):\n" + "\n".join(
      " <-> ".join(c) for c in new)
  assert found == KNOWN_CYCLES, f"a known cycle is gone; remove it from KNOWN_CYCLES: {found}"


def folder_graph(graph: Dict[str, Set[str]], package: str = PACKAGE) -> Dict[str, Set[str]]:
  """The module graph collapsed to the package's folders (and top-level modules): `pkg.rl.prime`
  and `pkg.rl.steps` are both `pkg.rl`. Arrows into the package's own `__init__` (its face,
  which only hands names on) are left out."""
  top = lambda m: ".".join(m.split(".")[:2])
  out: Dict[str, Set[str]] = {}
  for a, targets in graph.items():
    if a == package:
      continue
    out.setdefault(top(a), set()).update(top(b) for b in targets if b != package and top(b) != top(a))
  return out


def test_folder_graph_collapses_modules_and_finds_a_folder_loop():
  g = {"p.a.x": {"p.b.y", "p"}, "p.b.y": {"p.a.z"}, "p.a.z": set(), "p": {"p.a.x"}}
  assert folder_graph(g, "p") == {"p.a": {"p.b"}, "p.b": {"p.a"}}
  assert cycles(folder_graph(g, "p")) == [["p.a", "p.b"]]  # no module loop, but a folder loop
  assert cycles(g) == [["p", "p.a.x"]]


def test_folders_are_layered_no_folder_imports_one_above_it():
  """The folders of `jaxrl_dense` (`rl/`, `sampling/`, `models/`, ...) form a layering: no two
  folders import each other, directly or around a loop, so every import runs down
  (`docs/architecture.md`'s tree reads top to bottom as the pipeline)."""
  found = cycles(folder_graph(import_graph()))
  assert not found, "folders that import each other:\n" + "\n".join(" <-> ".join(c) for c in found)


if __name__ == "__main__":
  g = import_graph()
  print(f"{len(g)} modules, {sum(map(len, g.values()))} arrows")
  for c in cycles(g):
    print("cycle:", " <-> ".join(c))
    for a in c:
      print("   ", a, "->", sorted(set(c) & g[a]))
