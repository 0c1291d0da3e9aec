"""Synthetic arithmetic task: 1–2 digit +, −, × with disjoint train / held-out eval splits.

Public API
----------
`ArithmeticTask(ops=("+", "-", "*"), min_digits=1, max_digits=2, num_eval=200, seed=0,
                num_shots=3, nonnegative_subtraction=True)`
    Frozen, hashable description of the task (put it in the config fingerprint).
`make_splits(task) -> (train: list[PromptRecord], eval: list[PromptRecord])`
    Deterministic in `task` (same task -> identical lists, in the same order, on any machine).
`build_messages(problem, num_shots=3) -> tuple[dict, ...]`
    The chat conversation: `num_shots` fixed worked examples (user question, assistant answer
    ending "The answer is N.") followed by the user question.
`ArithmeticProblem(a, op, b)` with `.answer` (int), `.question` ("What is 23 + 45?").
`extract_answer(text) -> int | None`: the integer after the last "The answer is".
`DATA_SOURCE = "arithmetic"`: the `data_source` of every record.

Problem space and splits
------------------------
Operands are the integers with `min_digits`…`max_digits` digits (1–2 digits: 0…99). A problem
is (a, op, b); with `nonnegative_subtraction` only a ≥ b is used for "−". Problems are grouped
by a canonical key — (min, max) for the commutative + and ×, (a, b) for − — so "3 + 5" and
"5 + 3" are one problem for disjointness. The keys are permuted with `seed`; the first
`num_eval` keys (skipping the few-shot examples) form the eval split, one orientation each
(chosen by the same rng); every problem whose key is not in the eval split is in the train split.
So train ∩ eval = ∅ by problem, and the eval split never contains a few-shot example.

Prompt (measured with transformers, greedy, SmolLM2-135M-Instruct: 35.5% on 1–2 digit additions
and 17.5% on 2-digit mixed +, −, × with a 3-shot prompt of this form, format followed 100%;
7–22% zero-shot) — see `build_messages`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

import numpy as np

from jaxrl_dense.data.records import PromptRecord

DATA_SOURCE = "arithmetic"
OPS = ("+", "-", "*")

_ANSWER_RE = re.compile(r"answer is\s*:?\s*\$?\s*(-?\s*\d[\d,]*)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
  """One problem a op b."""

  a: int
  op: str
  b: int

  @property
  def answer(self) -> int:
    if self.op == "+":
      return self.a + self.b
    if self.op == "-":
      return self.a - self.b
    if self.op == "*":
      return self.a * self.b
    raise ValueError(f"unknown op {self.op!r}")

  @property
  def question(self) -> str:
    return f"What is {self.a} {self.op} {self.b}?"

  @property
  def key(self) -> tuple:
    """Canonical key: commutative ops ignore operand order."""
    if self.op in ("+", "*"):
      return (self.op, min(self.a, self.b), max(self.a, self.b))
    return (self.op, self.a, self.b)

  def solution(self) -> str:
    """The assistant's worked answer, ending "The answer is N."."""
    return f"{self.a} {self.op} {self.b} = {self.answer}. The answer is {self.answer}."


# Fixed few-shot examples, one per op; never in the eval split.
FEW_SHOT_EXAMPLES = (
    ArithmeticProblem(14, "+", 23),
    ArithmeticProblem(52, "-", 17),
    ArithmeticProblem(6, "*", 7),
)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Configuration of the synthetic arithmetic task (hashable; goes into config fingerprints).

  Attributes:
    ops: subset of ("+", "-", "*").
    min_digits, max_digits: operand digit range (1–2 digits = 0…99).
    num_eval: size of the held-out eval split (distinct problems).
    seed: split seed (the train iterator has its own shuffle seed).
    num_shots: worked examples in the prompt (0 = zero-shot; at most len(FEW_SHOT_EXAMPLES)).
    nonnegative_subtraction: only a ≥ b for "−" (answers stay ≥ 0).
  """

  ops: tuple = OPS
  min_digits: int = 1
  max_digits: int = 2
  num_eval: int = 200
  seed: int = 0
  num_shots: int = 3
  nonnegative_subtraction: bool = True

  def __post_init__(self):
    ops = tuple(self.ops)
    object.__setattr__(self, "ops", ops)
    if not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
      raise ValueError(f"ArithmeticTask.ops must be distinct values from {OPS}, got {ops!r}")
    if not (1 <= self.min_digits <= self.max_digits <= 4):
      raise ValueError(f"ArithmeticTask digits must satisfy 1 <= min_digits <= max_digits <= 4, "
                       f"got min_digits={self.min_digits}, max_digits={self.max_digits}")
    if self.num_eval < 1:
      raise ValueError(f"ArithmeticTask.num_eval must be >= 1, got {self.num_eval}")
    if not (0 <= self.num_shots <= len(FEW_SHOT_EXAMPLES)):
      raise ValueError(f"ArithmeticTask.num_shots must be in [0, {len(FEW_SHOT_EXAMPLES)}], "
                       f"got {self.num_shots}")

  def to_json(self) -> dict:
    return {"ops": list(self.ops), "min_digits": self.min_digits, "max_digits": self.max_digits,
            "num_eval": self.num_eval, "seed": self.seed, "num_shots": self.num_shots,
            "nonnegative_subtraction": self.nonnegative_subtraction}


def _operands(min_digits: int, max_digits: int) -> range:
  lo = 0 if min_digits == 1 else 10 ** (min_digits - 1)
  return range(lo, 10 ** max_digits)


def all_problems(task: ArithmeticTask) -> list:
  """Every problem of the task, in a fixed (op, a, b) order."""
  xs = _operands(task.min_digits, task.max_digits)
  out = []
  for op in task.ops:
    for a in xs:
      for b in xs:
        if op == "-" and task.nonnegative_subtraction and a < b:
          continue
        out.append(ArithmeticProblem(a, op, b))
  return out


def build_messages(problem: ArithmeticProblem, num_shots: int = 3) -> tuple:
  """Chat conversation for `problem`: `num_shots` worked examples, then the question.

  Returns a tuple of {"role", "content"} dicts; every assistant turn ends "The answer is N.".
  """
  if not (0 <= num_shots <= len(FEW_SHOT_EXAMPLES)):
    raise ValueError(f"num_shots must be in [0, {len(FEW_SHOT_EXAMPLES)}], got {num_shots}")
  return _shots_prefix(num_shots) + ({"role": "user", "content": problem.question},)


@functools.lru_cache(maxsize=None)
def _shots_prefix(num_shots: int) -> tuple:
  msgs = []
  for ex in FEW_SHOT_EXAMPLES[:num_shots]:
    msgs.append({"role": "user", "content": ex.question})
    msgs.append({"role": "assistant", "content": ex.solution()})
  return tuple(msgs)


def to_record(problem: ArithmeticProblem, num_shots: int = 3, split: str = "train") -> PromptRecord:
  return PromptRecord(prompt_messages=build_messages(problem, num_shots), gold=str(problem.answer),
                      data_source=DATA_SOURCE,
                      uid=f"{DATA_SOURCE}:{split}:{problem.a}{problem.op}{problem.b}")


def _candidate_keys(problems: list) -> tuple:
  """({key: problems}, sorted keys that may go to the eval split: all but the few-shot examples')."""
  by_key: dict = {}
  for p in problems:
    by_key.setdefault(p.key, []).append(p)
  shot_keys = {p.key for p in FEW_SHOT_EXAMPLES}
  return by_key, [k for k in sorted(by_key) if k not in shot_keys]  # fixed order before the permutation


def num_distinct_problems(task: ArithmeticTask) -> int:
  """Distinct problems (canonical keys, few-shot examples excluded) that the splits share out:
  `num_eval` must stay below it."""
  return len(_candidate_keys(all_problems(task))[1])


def make_problem_splits(task: ArithmeticTask) -> tuple:
  """(train problems, eval problems): disjoint by canonical key; see the module docstring."""
  problems = all_problems(task)
  by_key, candidates = _candidate_keys(problems)
  if task.num_eval >= len(candidates):
    raise ValueError(f"ArithmeticTask.num_eval={task.num_eval} leaves no training problems "
                     f"(only {len(candidates)} distinct problems for ops={task.ops}, "
                     f"digits {task.min_digits}-{task.max_digits})")
  rng = np.random.default_rng(task.seed)
  order = rng.permutation(len(candidates))
  eval_keys = [candidates[i] for i in order[:task.num_eval]]
  eval_problems = []
  for k in eval_keys:
    group = by_key[k]
    eval_problems.append(group[int(rng.integers(len(group)))])
  eval_set = set(eval_keys)
  train_problems = [p for p in problems if p.key not in eval_set]
  return train_problems, eval_problems


def make_splits(task: ArithmeticTask) -> tuple:
  """(train records, eval records) as `PromptRecord`s (gold = the integer answer as a string)."""
  train, ev = make_problem_splits(task)
  return ([to_record(p, task.num_shots, "train") for p in train],
          [to_record(p, task.num_shots, "eval") for p in ev])


def extract_answer(text: str) -> Optional[int]:
  """The integer after the last "The answer is" in `text` (commas/spaces removed), else None."""
  matches = _ANSWER_RE.findall(text)
  if not matches:
    return None
  digits = re.sub(r"[\s,]", "", matches[-1])
  try:
    return int(digits)
  except ValueError:
    return None
