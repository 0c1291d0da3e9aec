"""Adapters from the shipped math data files to (prompt text, gold answer) records.

The files live in `jaxrl_dense/data/datasets/` (see its README.md for sources, licenses and
schemas; SHA256SUMS for checksums). Each adapter knows its file's gold-answer format:

  gsm8k_{test,train}     gold = text after the final "#### " of `answer`, commas removed
  math500 / math_train   gold = `answer` (LaTeX)
  aime24                 gold = `answer` (integer string)
  amc23, aimo_*_amc      gold = `answer` (float such as 27.0 -> "27")
  aimo_validation_aime   gold = `answer`
  minerva_math           gold = last \\boxed{} of `solution`
  olympiadbench          gold = `final_answer` (a list, or a string holding a Python list):
                         items with `$` removed, joined by ", "

The prompt is the raw problem text; PRIME appends `PRIME_MATH_SUFFIX` (`with_suffix`).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import pathlib
from typing import Callable, Iterator

from jaxrl_dense.verifiers.math import extract_last_boxed, gold_to_str

__all__ = [
    "DATASETS",
    "MathRecord",
    "PRIME_MATH_SUFFIX",
    "datasets_dir",
    "load",
    "read_jsonl",
    "shipped_path",
    "verify_checksums",
    "with_suffix",
]

PRIME_MATH_SUFFIX = "Present the answer in LaTex format: \\boxed{Your answer}"


@dataclasses.dataclass(frozen=True)
class MathRecord:
  """One problem: `prompt` (problem text), `gold` (answer string), `source` (dataset), `id`
  (MATH-500: its `unique_id`; otherwise "<source>/<row index in the file>")."""
  prompt: str
  gold: str
  source: str
  id: str


def datasets_dir() -> pathlib.Path:
  """Folder of the shipped data files (inside the installed package)."""
  return pathlib.Path(__file__).resolve().parent.parent / "data" / "datasets"


def shipped_path(name: str) -> pathlib.Path:
  """Path of a shipped data file, e.g. `shipped_path("math500_test.jsonl")` (".jsonl" optional)."""
  d = datasets_dir()
  for cand in (name, name + ".jsonl"):
    p = d / cand
    if "/" not in cand and p.is_file():
      return p
  available = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
  raise FileNotFoundError(f"shipped_path: no shipped data file {name!r} in {d}; available: {available}")


def verify_checksums() -> dict[str, bool]:
  """sha256 of every shipped file against SHA256SUMS: {file name: matches}."""
  out = {}
  for line in shipped_path("SHA256SUMS").read_text().splitlines():
    if not line.strip():
      continue
    digest, name = line.split(maxsplit=1)
    name = name.lstrip("*")
    out[name] = hashlib.sha256(shipped_path(name).read_bytes()).hexdigest() == digest
  return out


def read_jsonl(name: str) -> Iterator[dict]:
  """Rows of a shipped jsonl file."""
  with open(shipped_path(name), encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{name}:{line_no}: invalid JSON ({e})") from e


def _field(row: dict, key: str, name: str, i: int):
  if key not in row or row[key] is None:
    raise ValueError(f"{name} row {i}: missing field {key!r}")
  return row[key]


def gsm8k_gold(solution: str) -> str:
  """GSM8K gold: the text after the last "####", thousands commas removed."""
  idx = solution.rfind("####")
  if idx < 0:
    raise ValueError(f"GSM8K solution has no '####' line: {solution[-80:]!r}")
  return solution[idx + 4:].strip().replace(",", "")


def olympiadbench_gold(final_answer) -> str:
  """OlympiadBench gold: a list (or its string form) of LaTeX answers -> one string."""
  if isinstance(final_answer, str):
    try:
      final_answer = ast.literal_eval(final_answer)
    except (ValueError, SyntaxError):
      final_answer = [final_answer]
  if not isinstance(final_answer, (list, tuple)) or not final_answer:
    raise ValueError(f"OlympiadBench final_answer must be a non-empty list, got {final_answer!r}")
  return ", ".join(str(a).replace("$", "").strip() for a in final_answer)


def _make(file: str, source: str, prompt_key: str | tuple[str, ...], gold_fn: Callable[[dict], str],
          id_fn: Callable[[dict, int], str] | None = None) -> Callable[[], list[MathRecord]]:
  keys = (prompt_key,) if isinstance(prompt_key, str) else prompt_key

  def loader(strict: bool = False) -> list[MathRecord]:
    out = []
    for i, row in enumerate(read_jsonl(file)):
      key = next((k for k in keys if row.get(k)), None)
      if key is None:
        raise ValueError(f"{file} row {i}: none of the prompt fields {keys} present")
      gold = gold_fn(row)
      if not gold.strip():
        if strict:
          raise ValueError(f"{file} row {i}: empty gold answer")
        continue  # unverifiable row (math_train has 2)
      rid = id_fn(row, i) if id_fn else f"{source}/{i}"  # source ids repeat (aimo_amc)
      out.append(MathRecord(prompt=row[key], gold=gold, source=source, id=rid))
    return out

  loader.__doc__ = f"Records of {file} ({source})."
  return loader


def _answer(row: dict) -> str:
  return gold_to_str(row["answer"]).strip()


def _minerva_gold(row: dict) -> str:
  g = extract_last_boxed(row["solution"])
  if g is None:
    raise ValueError(f"minerva_math idx {row.get('idx')}: solution has no \\boxed{{}}")
  return g.strip()


DATASETS: dict[str, Callable[[], list[MathRecord]]] = {
    "gsm8k_test": _make("gsm8k_test.jsonl", "gsm8k_test", "question", lambda r: gsm8k_gold(r["answer"])),
    "gsm8k_train": _make("gsm8k_train.jsonl", "gsm8k_train", "question", lambda r: gsm8k_gold(r["answer"])),
    "math500": _make("math500_test.jsonl", "math500", "problem", _answer, lambda r, i: r["unique_id"]),
    "math_train": _make("math_train.jsonl", "math_train", "problem", _answer),
    "aime24": _make("aime24.jsonl", "aime24", ("problem", "question"), _answer),
    "amc23": _make("amc23.jsonl", "amc23", ("problem", "question"), _answer),
    "aimo_validation_aime": _make("aimo_validation_aime.jsonl", "aimo_validation_aime", "question", _answer),
    "aimo_validation_amc": _make("aimo_validation_amc.jsonl", "aimo_validation_amc", "question", _answer),
    "minerva_math": _make("minerva_math.jsonl", "minerva_math", "problem", _minerva_gold),
    "olympiadbench": _make("olympiadbench.jsonl", "olympiadbench", "question",
                           lambda r: olympiadbench_gold(r["final_answer"])),
}


def load(name: str, strict: bool = False) -> list[MathRecord]:
  """All records of a shipped math dataset; `name` is a key of `DATASETS`.

  Rows whose gold answer is empty cannot be verified and are skipped (math_train: 2 of
  12,000); `strict=True` raises ValueError on them instead.
  """
  if name not in DATASETS:
    raise ValueError(f"load: unknown dataset {name!r}; known: {sorted(DATASETS)}")
  return DATASETS[name](strict)


def with_suffix(records: list[MathRecord], suffix: str = PRIME_MATH_SUFFIX, sep: str = " ") -> list[MathRecord]:
  """Records with `suffix` appended to each prompt (PRIME's math instruction by default)."""
  return [dataclasses.replace(r, prompt=r.prompt.rstrip() + sep + suffix) for r in records]
