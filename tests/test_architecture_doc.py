"""docs/architecture.md's module tree matches the package on disk.

The tree is the map a newcomer reads first; a module added without a line there (or a line left
behind by a move) fails here, naming the path.
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def doc_tree(text: str) -> set:
  """Paths named by the ``jaxrl_dense/`` code block: indentation (2 spaces) gives the nesting;
  ``a.py, b.py`` on one line names both; ``# ...`` comments and continuation lines are ignored."""
  block = re.search(r"```\njaxrl_dense/\n(.*?)```", text, re.S)
  assert block, "docs/architecture.md has no ```jaxrl_dense/ tree block"
  paths, stack = set(), []
  for line in block.group(1).splitlines():
    body = line.split("#", 1)[0].rstrip()
    if not body.strip():
      continue
    depth = (len(body) - len(body.lstrip(" "))) // 2
    if depth == 0:  # a sibling of jaxrl_dense/ (experiments/): outside the package
      break
    stack = stack[:depth - 1]
    names = [n.strip() for n in body.strip().split(",")]
    for name in names:
      paths.add("/".join(stack + [name.rstrip("/")]))
    if len(names) == 1 and names[0].endswith("/"):
      stack.append(names[0].rstrip("/"))
  return paths


def disk_tree() -> set:
  pkg = ROOT / "jaxrl_dense"
  out = set()
  for p in pkg.rglob("*.py"):
    rel = p.relative_to(pkg)
    if "__pycache__" in rel.parts or (p.name == "__init__.py" and len(rel.parts) > 1):
      continue
    out.add(rel.as_posix())
    for k in range(1, len(rel.parts)):
      out.add("/".join(rel.parts[:k]))
  return out


def test_parser_nesting_and_lists():
  text = "```\njaxrl_dense/\n  a.py  # x\n  d/   # y\n    b.py, c.py\n    e/\n      f.py\n  g.py\n" \
         "experiments/\n```"
  assert doc_tree(text) == {"a.py", "d", "d/b.py", "d/c.py", "d/e", "d/e/f.py", "g.py"}


def test_every_module_is_in_the_tree_and_every_line_exists():
  named = doc_tree((ROOT / "docs" / "architecture.md").read_text())
  on_disk = disk_tree()
  missing = sorted(on_disk - named)
  stale = sorted(p for p in named - on_disk if not (ROOT / "jaxrl_dense" / p).exists())
  assert not missing, f"modules missing from docs/architecture.md's tree: {missing}"
  assert not stale, f"docs/architecture.md names paths that do not exist: {stale}"


def test_check_fails_on_a_module_the_doc_leaves_out():
  """Control: dropping one line of the real doc is caught."""
  text = (ROOT / "docs" / "architecture.md").read_text()
  cut = re.sub(r"\n      page_table\.py[^\n]*", "", text, count=1)
  assert cut != text
  assert "sampling/engine/page_table.py" in disk_tree() - doc_tree(cut)


def unmirrored_test_folders(root: pathlib.Path) -> list:
  """Folders under tests/ that mirror no package folder (``jaxrl_dense/<name>/``) and no top-level
  script folder (``experiments/``, ``benchmarks/``); ``golden/`` holds reference data."""
  bad = []
  for d in sorted(p for p in (root / "tests").iterdir() if p.is_dir()):
    if d.name in ("golden", "__pycache__") or d.name.startswith("."):
      continue
    if not ((root / "jaxrl_dense" / d.name).is_dir() or d.name in ("experiments", "benchmarks")):
      bad.append(d.name)
  return bad


def test_test_folders_mirror_the_package(tmp_path):
  """tests/rl/ tests jaxrl_dense/rl/, tests/sampling/ tests jaxrl_dense/sampling/, ...; only
  cross-cutting checks (golden parity, properties, these guards) sit at tests/ itself."""
  assert not unmirrored_test_folders(ROOT), unmirrored_test_folders(ROOT)
  # control: a folder named after no package is reported
  (tmp_path / "tests" / "rl").mkdir(parents=True)
  (tmp_path / "tests" / "misc").mkdir()
  (tmp_path / "jaxrl_dense" / "rl").mkdir(parents=True)
  assert unmirrored_test_folders(tmp_path) == ["misc"]
