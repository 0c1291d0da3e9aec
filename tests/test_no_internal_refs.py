"""Code cites what a reader can open: papers and reference files, not internal notes.

Comments and docstrings of ``jaxrl_dense/``, ``experiments/``, ``benchmarks/`` and ``tests/`` must not point at
the project's internal spec files (``prime.md §6``, ``methods.md §1.4``, ``spec §3``, a bare ``§5``)
or at issue numbers and review findings (``issue 12``, ``issue #16 item 3``, ``defect 5e``): a
user's clone has neither. Cite the paper
(``PRIME, arXiv 2502.01456 Sec. 3.3``) or the reference file and function (veRL
``verl/trainer/ppo/core_algos.py`` ``agg_loss``) instead. Files under ``docs/`` are in the clone, so
``docs/methods.md`` is fine.
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("jaxrl_dense", "experiments", "benchmarks", "tests")

# Internal spec files (not docs/...), "spec §", any "§N", issue tags, review-finding tags.
PATTERN = re.compile(r"(?<![\w/])(?:methods|prime)\.md|spec §|§ ?[0-9]|[Ii]ssue ?#?[0-9]+|[Dd]efect ?[0-9]+")

# Files allowed to keep such references while being rewritten on a branch (none now). Shrink it as
# they are cleaned; `test_allow_list_is_not_stale` fails for an entry that no longer matches.
ALLOWED = frozenset({"tests/test_no_internal_refs.py"})  # its own patterns and controls


def find_refs(text: str) -> list:
  """``[(line_number, line)]`` of the lines of ``text`` that carry an internal reference."""
  return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if PATTERN.search(line)]


def scan(root: pathlib.Path, dirs=SCANNED) -> dict:
  """``{relative path: [(line_number, line)]}`` for every ``.py`` file under ``root/dirs`` with hits."""
  out = {}
  for d in dirs:
    for path in sorted((root / d).rglob("*.py")):
      if "__pycache__" in path.parts:
        continue
      hits = find_refs(path.read_text(encoding="utf-8"))
      if hits:
        out[path.relative_to(root).as_posix()] = hits
  return out


def test_no_internal_refs():
  found = scan(ROOT)
  bad = [f"{p}:{i}: {line}" for p, hits in found.items() if p not in ALLOWED for i, line in hits]
  assert not bad, ("internal spec / issue references (cite the paper or the reference file "
                   "instead):\n" + "\n".join(bad))


def test_allow_list_is_not_stale():
  found = scan(ROOT)
  missing = sorted(p for p in ALLOWED if not (ROOT / p).is_file())
  clean = sorted(p for p in ALLOWED if (ROOT / p).is_file() and p not in found)
  assert not missing and not clean, (f"remove from ALLOWED: {missing + clean} "
                                     f"(missing files: {missing}; files without references: {clean})")


def test_pattern_flags_internal_refs():
  # Control: each of these must be caught ...
  for s in ["(prime.md §6.1; both references)", "Spec: ``prime.md`` §4", "(methods.md §1.4)",
            "PRIME spec §3 sends", "see §5.2", "§ 7", "(issue 12)", "(issue #16 item 3)",
            "Issue 23 asked for", "issue#4", "(defect 5e)", "PROF survivors, Defect 5a"]:
    assert find_refs(s), s
  # ... and these must not: paper sections, docs in the clone, code that says "spec".
  for s in ["PRIME (arXiv 2502.01456, Sec. 3.3 Eq. 5)", "docs/methods.md", "see docs/prm_health.md",
            "spec = parse_spec(spec)", "mesh spec {spec!r}", "an issue with padding",
            "a defective checkpoint"]:
    assert not find_refs(s), s


def test_scan_names_file_and_line(tmp_path):
  # Control on files: a clean file passes, a tagged line is reported with its file and line number.
  pkg = tmp_path / "jaxrl_dense" / "sub"
  pkg.mkdir(parents=True)
  (pkg / "clean.py").write_text('"""GAE (arXiv 1506.02438)."""\nx = 1\n')
  (pkg / "tagged.py").write_text('x = 1\n# whitening as in prime.md §6.4 (issue 7)\n')
  assert scan(tmp_path, dirs=("jaxrl_dense",)) == {
      "jaxrl_dense/sub/tagged.py": [(2, "# whitening as in prime.md §6.4 (issue 7)")]}
