"""Chained arithmetic with written step solutions: a task where step-level credit can matter.

    What is ((8 - 3) + 9) - 7?
    8 - 3 = 5. 5 + 9 = 14. 14 - 7 = 7. The answer is 7.

Each problem is a left-nested expression of `depth` operations (default 2–3, up to 6): the
first step combines two operands, every later step combines the running value with one new
operand. The worked solution writes one "a op b = c." sentence per step and ends "The answer is
N." (the existing arithmetic task's answer format, so `jaxrl_dense.verifiers.math` and
`arithmetic.extract_answer` read it). A wrong intermediate result makes every later step wrong,
so a process reward has several places to assign credit, unlike the one-step arithmetic task.

Public API
----------
`ChainArithTask(ops=("+", "-"), min_depth=2, max_depth=3, max_operand=9, max_mul_operand=9,
                max_value=999, num_eval=500, num_train=10000, seed=0, num_shots=3)`
    Frozen, hashable task description (put it in a config fingerprint).
`ChainProblem(operands, ops)` with `.answer`, `.values` (running results), `.question`,
    `.solution()`, `.key` (canonical, for disjointness).
`make_problem_splits(task) -> (train problems, eval problems)`; `make_splits(task)` the same as
    `PromptRecord`s (gold = the integer answer as a string, data_source "chain_arith").
`build_messages(problem, task)`: `num_shots` fixed worked examples (user question, assistant
    solution) then the question — the 3-turn few-shot chat layout of `data.arithmetic`.
`parse_source(spec) -> (task, split)` and `load_source(spec, ...)`: the prompt-source names
    `chain_arith:train` / `chain_arith:eval`, optionally with task fields
    `chain_arith:eval:depth=2-4,max_operand=20,ops=+-*` (what `data.prompts.load_prompts`
    accepts, hence `--train_data` / `--eval_data` / `--dataset` of the experiments).
`extract_answer`: `data.arithmetic.extract_answer` (the integer after the last "The answer is").
`correct_solution(problem)`, `corrupt_solution(problem, step, mode, rng)`,
`step_credit_solutions(problem, seed)` -> `StepSolution`s (text, character span of every step,
    first wrong step): the labelled solutions of `experiments/prm_step_credit.py` (below).

Sampling and splits
-------------------
Depth is uniform in [min_depth, max_depth]; each step's op is uniform over the ops allowed at
that point: "+" with an operand in [1, max_operand] (result <= max_value), "-" with an operand
in [1, min(max_operand, running value)] (every intermediate result >= 0), "*" with an operand in
[2, max_mul_operand] (result <= max_value). The first operand is uniform in [1, max_operand].
The eval split is the first `num_eval` distinct problems (by `.key`) drawn from
`default_rng([seed, 0])`; the train split the first `num_train` distinct problems drawn from
`default_rng([seed, 1])` whose key is not in the eval split. Neither contains a few-shot
example. Both are deterministic in the task (same lists, same order, on any machine).

`key` treats the commutative first step as unordered ("(3 + 5) - 2" and "(5 + 3) - 2" are one
problem), so a held-out problem is never a reordering of a training problem's first step.

Difficulty (measured: SmolLM2-135M-Instruct, greedy, our JAX sampler, 3-shot prompt, the first
200 held-out problems, 48 new tokens): 27.5% (55/200; depth 2: 58%, depth 3: 3.6%; format
followed 100%). With operands up to 20 the same model gets 13% (100 problems); with operands up
to 99 and an earlier shot choice that included the depth-4 example, 3.0% (200 problems; 0% at
depth 2, where it often wrote extra steps: hence in-range examples first). Typical failures are
step errors, not format: skipped or invented steps ("(6 - 5) + 10: 6 - 5 = 1. 10 + 10 = 20.") and
wrong intermediate sums, which is where a process reward can assign credit.

Step labels (ProcessBench-style solutions with a known first wrong step)
-----------------------------------------------------------------------
A written solution has `depth + 1` steps: the `depth` equation sentences "a op b = c." and the
answer sentence "The answer is N."; `StepSolution.step_spans[s] = (start, end)` is the character
span of step s in its text (steps are separated by one space, not part of any span). A corrupted
solution changes the result of one equation, step k, to `c + d` with `d` uniform in
`±[1, max_delta]` (only values that keep every written number >= 0), so step k is its first wrong
step. Later steps are either "propagated" (computed correctly from the wrong value: every later
result and the final answer are wrong, the answer differs from the gold one) or "inconsistent"
(left as in the correct solution: the next step starts from the correct value and the final
answer is right, so only a process signal can see the error). The answer sentence is never the
first wrong step.

With the default operands 1-9 there are only ~1.3k distinct depth-2 problems, so once the eval
split has taken its share the 10k training problems are ~11% depth 2 and ~89% depth 3 (the
held-out split is ~44% / 56%).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from jaxrl_dense.data.arithmetic import extract_answer  # noqa: F401  (re-exported)
from jaxrl_dense.data.records import PromptRecord

DATA_SOURCE = "chain_arith"
OPS = ("+", "-", "*")
SPLITS = ("train", "eval")
MIN_DEPTH, MAX_DEPTH = 1, 6


def _apply(a: int, op: str, b: int) -> int:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


@dataclasses.dataclass(frozen=True)
class ChainProblem:
  """((o0 op0 o1) op1 o2) ... : `len(ops)` steps over `len(ops) + 1` operands."""

  operands: tuple
  ops: tuple

  def __post_init__(self):
    object.__setattr__(self, "operands", tuple(int(x) for x in self.operands))
    object.__setattr__(self, "ops", tuple(self.ops))
    if len(self.ops) < 1 or len(self.operands) != len(self.ops) + 1:
      raise ValueError(f"ChainProblem needs len(operands) == len(ops) + 1 >= 2, got operands="
                       f"{self.operands}, ops={self.ops}")
    if any(o not in OPS for o in self.ops):
      raise ValueError(f"ChainProblem ops must be in {OPS}, got {self.ops}")

  @property
  def depth(self) -> int:
    return len(self.ops)

  @property
  def values(self) -> tuple:
    """Running results after each step (the last one is the answer)."""
    out, acc = [], self.operands[0]
    for op, b in zip(self.ops, self.operands[1:]):
      acc = _apply(acc, op, b)
      out.append(acc)
    return tuple(out)

  @property
  def answer(self) -> int:
    return self.values[-1]

  def calculator_calls(self) -> tuple:
    """The solution's steps as calculator tool calls, `{"name": "calculator", "arguments":
    {"expression": "a op b"}}` per step (MatchTIR's gold calls for a tool rollout)."""
    lefts = (self.operands[0],) + self.values[:-1]
    return tuple({"name": "calculator", "arguments": {"expression": f"{a} {op} {b}"}}
                 for a, op, b in zip(lefts, self.ops, self.operands[1:]))

  @property
  def expression(self) -> str:
    """'((52 - 17) + 9) - 21' (the outermost step is not parenthesised)."""
    expr = str(self.operands[0])
    for i, (op, b) in enumerate(zip(self.ops, self.operands[1:])):
      expr = f"{expr} {op} {b}"
      if i < self.depth - 1:
        expr = f"({expr})"
    return expr

  @property
  def question(self) -> str:
    return f"What is {self.expression}?"

  def solution(self) -> str:
    """'52 - 17 = 35. 35 + 9 = 44. 44 - 21 = 23. The answer is 23.'"""
    parts, acc = [], self.operands[0]
    for op, b, v in zip(self.ops, self.operands[1:], self.values):
      parts.append(f"{acc} {op} {b} = {v}.")
      acc = v
    return " ".join(parts) + f" The answer is {self.answer}."

  def tool_solution(self) -> str:
    """The solution written with calculator calls, as a multi-turn tool episode reads (the call,
    then the environment's result, then the step): '<tool>calculator: 52 - 17</tool>\n<result>35
    </result>\n52 - 17 = 35. <tool>calculator: 35 + 9</tool>...The answer is 44.'"""
    parts, acc = [], self.operands[0]
    for op, b, v in zip(self.ops, self.operands[1:], self.values):
      parts.append(f"<tool>calculator: {acc} {op} {b}</tool>\n<result>{v}</result>\n{acc} {op} {b} = {v}.")
      acc = v
    return " ".join(parts) + f" The answer is {self.answer}."

  @property
  def key(self) -> tuple:
    """Canonical identity: the first step's operands unordered when its op commutes."""
    first = self.operands[:2]
    if self.ops[0] in ("+", "*"):
      first = tuple(sorted(first))
    return (self.ops, first + self.operands[2:])


# Fixed worked examples. A task's prompt uses the first `num_shots` of those whose ops are all in
# task.ops, the ones whose depth is in [min_depth, max_depth] first (SmolLM2 imitates the number
# of steps of the examples: a depth-4 example makes it write extra steps on depth-2 problems).
FEW_SHOT_EXAMPLES = (
    ChainProblem((14, 23, 8), ("+", "-")),
    ChainProblem((52, 17, 9, 21), ("-", "+", "-")),
    ChainProblem((6, 7, 15), ("*", "+")),
    ChainProblem((31, 6, 12, 40, 27), ("+", "-", "+", "-")),
    ChainProblem((45, 12, 30), ("-", "+")),
)


@dataclasses.dataclass(frozen=True)
class ChainArithTask:
  """Configuration of the chained-arithmetic task (hashable; see the module docstring).

  Attributes:
    ops: subset of ("+", "-", "*").
    min_depth, max_depth: steps per problem (uniform in this range; 1..6).
    max_operand: "+" / "-" operands and the first operand are in [1, max_operand].
    max_mul_operand: "*" operands are in [2, max_mul_operand].
    max_value: "+" and "*" steps keep the running value <= this.
    num_eval: held-out problems (distinct keys).
    num_train: training problems (distinct keys, none in the eval split).
    seed: split seed.
    num_shots: worked examples in the prompt (0 = zero-shot).
    tool_shots: 1 = the worked examples call the calculator for every step
      (`ChainProblem.tool_solution`, for --env=tool:calculator); 0 = written arithmetic.
  """

  ops: tuple = ("+", "-")
  min_depth: int = 2
  max_depth: int = 3
  max_operand: int = 9
  max_mul_operand: int = 9
  max_value: int = 999
  num_eval: int = 500
  num_train: int = 10000
  seed: int = 0
  num_shots: int = 3
  tool_shots: int = 0

  def __post_init__(self):
    ops = tuple(self.ops)
    object.__setattr__(self, "ops", ops)
    if not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
      raise ValueError(f"ChainArithTask.ops must be distinct values from {OPS}, got {ops!r}")
    if not (MIN_DEPTH <= self.min_depth <= self.max_depth <= MAX_DEPTH):
      raise ValueError(f"ChainArithTask depths must satisfy {MIN_DEPTH} <= min_depth <= max_depth "
                       f"<= {MAX_DEPTH}, got min_depth={self.min_depth}, "
                       f"max_depth={self.max_depth}")
    if not 2 <= self.max_operand <= 9999:
      raise ValueError(f"ChainArithTask.max_operand must be in [2, 9999], got {self.max_operand}")
    if "*" in ops and not 2 <= self.max_mul_operand <= 99:
      raise ValueError(f"ChainArithTask.max_mul_operand must be in [2, 99], got "
                       f"{self.max_mul_operand}")
    if self.max_value < 2 * self.max_operand:
      raise ValueError(f"ChainArithTask.max_value={self.max_value} must be >= 2 * max_operand="
                       f"{2 * self.max_operand} (so '+' is always possible)")
    if self.tool_shots not in (0, 1):
      raise ValueError(f"ChainArithTask.tool_shots must be 0 or 1, got {self.tool_shots}")
    if self.num_eval < 1 or self.num_train < 1:
      raise ValueError(f"ChainArithTask.num_eval and num_train must be >= 1, got "
                       f"num_eval={self.num_eval}, num_train={self.num_train}")
    usable = _shot_examples(ops, self.min_depth, self.max_depth)
    if not 0 <= self.num_shots <= len(usable):
      raise ValueError(f"ChainArithTask.num_shots must be in [0, {len(usable)}] for ops={ops} "
                       f"(worked examples using only these ops), got {self.num_shots}")

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["ops"] = list(self.ops)
    if not self.tool_shots:  # written before the field existed: the same fingerprint
      d.pop("tool_shots")
    return d


@functools.lru_cache(maxsize=None)
def _shot_examples(ops: tuple, min_depth: int, max_depth: int) -> tuple:
  """Worked examples usable with `ops`, those with min_depth <= depth <= max_depth first."""
  usable = [ex for ex in FEW_SHOT_EXAMPLES if set(ex.ops) <= set(ops)]
  in_range = [ex for ex in usable if min_depth <= ex.depth <= max_depth]
  return tuple(in_range + [ex for ex in usable if ex not in in_range])


def sample_problem(task: ChainArithTask, rng: np.random.Generator) -> ChainProblem:
  """One problem drawn as described in the module docstring (a chain that reaches a value where
  no op of `task.ops` is legal, e.g. 0 with ops=("-",), is redrawn)."""
  for _ in range(100):
    depth = int(rng.integers(task.min_depth, task.max_depth + 1))
    acc = int(rng.integers(1, task.max_operand + 1))
    operands, ops = [acc], []
    for _ in range(depth):
      allowed = [o for o in task.ops
                 if (o == "+" and acc + 1 <= task.max_value)
                 or (o == "-" and acc >= 1)
                 or (o == "*" and acc * 2 <= task.max_value)]
      if not allowed:
        break
      op = allowed[int(rng.integers(len(allowed)))]
      if op == "+":
        b = int(rng.integers(1, min(task.max_operand, task.max_value - acc) + 1))
      elif op == "-":
        b = int(rng.integers(1, min(task.max_operand, acc) + 1))
      else:
        hi = task.max_mul_operand if acc == 0 else min(task.max_mul_operand, task.max_value // acc)
        b = int(rng.integers(2, hi + 1))
      acc = _apply(acc, op, b)
      operands.append(b)
      ops.append(op)
    if len(ops) == depth:
      return ChainProblem(tuple(operands), tuple(ops))
  raise ValueError(f"ChainArithTask: no legal chain of depth {task.min_depth}-{task.max_depth} "
                   f"found in 100 draws for {task}")


def _draw_distinct(task: ChainArithTask, rng: np.random.Generator, count: int,
                   exclude: set, what: str) -> list:
  out, seen = [], set(exclude)
  tries, max_tries = 0, 50 * count + 1000
  while len(out) < count:
    tries += 1
    if tries > max_tries:
      raise ValueError(f"ChainArithTask: could draw only {len(out)} distinct {what} problems of "
                       f"{count} in {max_tries} tries; the problem space of {task} is too small")
    p = sample_problem(task, rng)
    if p.key in seen:
      continue
    seen.add(p.key)
    out.append(p)
  return out


@functools.lru_cache(maxsize=8)
def make_problem_splits(task: ChainArithTask) -> tuple:
  """(train problems, eval problems) as tuples, disjoint by `.key`; no few-shot example in
  either."""
  shots = {ex.key for ex in FEW_SHOT_EXAMPLES}
  ev = _draw_distinct(task, np.random.default_rng([task.seed, 0]), task.num_eval, shots, "eval")
  exclude = shots | {p.key for p in ev}
  train = _draw_distinct(task, np.random.default_rng([task.seed, 1]), task.num_train, exclude,
                         "train")
  return tuple(train), tuple(ev)


def build_messages(problem: ChainProblem, task: ChainArithTask,
                   system_prompt: Optional[str] = None) -> tuple:
  """`task.num_shots` worked examples (user question, assistant solution), then the question."""
  msgs = []
  if system_prompt:
    msgs.append({"role": "system", "content": system_prompt})
  for ex in _shot_examples(task.ops, task.min_depth, task.max_depth)[:task.num_shots]:
    msgs.append({"role": "user", "content": ex.question})
    msgs.append({"role": "assistant", "content": ex.tool_solution() if task.tool_shots else ex.solution()})
  msgs.append({"role": "user", "content": problem.question})
  return tuple(msgs)


def to_record(problem: ChainProblem, task: ChainArithTask, split: str,
              system_prompt: Optional[str] = None) -> PromptRecord:
  uid = "".join(f"{a}{op}" for a, op in zip(problem.operands, problem.ops)) + \
      str(problem.operands[-1])
  return PromptRecord(prompt_messages=build_messages(problem, task, system_prompt),
                      gold=str(problem.answer), data_source=DATA_SOURCE,
                      uid=f"{DATA_SOURCE}:{split}:{uid}", gold_calls=problem.calculator_calls())


def make_splits(task: ChainArithTask, system_prompt: Optional[str] = None) -> tuple:
  """(train records, eval records) as `PromptRecord`s (gold = the integer answer as a string)."""
  train, ev = make_problem_splits(task)
  return ([to_record(p, task, "train", system_prompt) for p in train],
          [to_record(p, task, "eval", system_prompt) for p in ev])


# ----------------------------------------------------------------------------- source names
_INT_FIELDS = ("min_depth", "max_depth", "max_operand", "max_mul_operand", "max_value",
               "num_eval", "num_train", "seed", "num_shots", "tool_shots")
_ALIASES = {"shots": "num_shots", "tools": "tool_shots"}


def is_source(spec: str) -> bool:
  """True for prompt-source names this module serves ('chain_arith' or 'chain_arith:...')."""
  s = str(spec)
  return s == DATA_SOURCE or s.startswith(DATA_SOURCE + ":")


def parse_source(spec: str) -> tuple:
  """'chain_arith:eval[:k=v,...]' -> (ChainArithTask, 'eval'). Raises ValueError naming the spec.

  Keys: the ChainArithTask fields (`ops` written as characters, e.g. `ops=+-*`), `shots` for
  num_shots and `depth=A-B` (or `depth=A`) for min_depth/max_depth.
  """
  s = str(spec)
  if not is_source(s):
    raise ValueError(f"{s!r} is not a chain_arith source")
  parts = s.split(":", 2)
  if len(parts) < 2 or parts[1] not in SPLITS:
    raise ValueError(f"prompt source {s!r}: name the split, 'chain_arith:train' or "
                     f"'chain_arith:eval' (optionally ':key=value,...')")
  split = parts[1]
  kwargs: dict = {}
  items = parts[2].split(",") if len(parts) == 3 and parts[2] else []
  for item in items:
    if "=" not in item:
      raise ValueError(f"prompt source {s!r}: expected key=value, got {item!r}")
    k, v = (x.strip() for x in item.split("=", 1))
    name = _ALIASES.get(k, k)
    if k not in ("ops", "depth") and name not in _INT_FIELDS:
      raise ValueError(f"prompt source {s!r}: unknown key {k!r}; known: ops, depth, shots, "
                       f"{', '.join(_INT_FIELDS)}")
    try:
      if k == "ops":
        kwargs["ops"] = tuple(v)
      elif k == "depth":
        lo, _, hi = v.partition("-")
        kwargs["min_depth"], kwargs["max_depth"] = int(lo), int(hi or lo)
      else:
        kwargs[name] = int(v)
    except ValueError:
      raise ValueError(f"prompt source {s!r}: bad value {v!r} for {k!r}") from None
  try:
    task = ChainArithTask(**kwargs)
  except ValueError as e:
    raise ValueError(f"prompt source {s!r}: {e}") from None
  return task, split


def load_source(spec: str, *, system_prompt: Optional[str] = None,
                limit: Optional[int] = None) -> list:
  """The records of a 'chain_arith:<split>[:...]' source (first `limit` when given)."""
  task, split = parse_source(spec)
  problems = make_problem_splits(task)[0 if split == "train" else 1]
  if limit is not None:
    problems = problems[:limit]
  return [to_record(p, task, split, system_prompt) for p in problems]


# ----------------------------------------------------------------------------- step labels
CORRECT = "correct"
CORRUPTION_MODES = ("propagated", "inconsistent")


@dataclasses.dataclass(frozen=True)
class StepSolution:
  """A written solution of `problem` with the label of every step (see "Step labels" above).

  Attributes:
    problem: the ChainProblem it solves.
    text: the solution text ("8 - 3 = 5. 5 + 9 = 14. The answer is 14.").
    step_spans: `((start, end), ...)`, one per step (`problem.depth` equations, then the answer
      sentence): `text[start:end]` is the step's sentence including its final ".".
    first_error: index of the first wrong step, -1 when every step is right.
    mode: "correct", "propagated" or "inconsistent".
  """

  problem: ChainProblem
  text: str
  step_spans: tuple
  first_error: int
  mode: str

  @property
  def num_steps(self) -> int:
    return len(self.step_spans)

  @property
  def steps(self) -> tuple:
    """The text of each step."""
    return tuple(self.text[s:e] for s, e in self.step_spans)


def _render(problem: ChainProblem, lefts, results, answer: int, first_error: int,
            mode: str) -> StepSolution:
  """Joins "a op b = c." per step and "The answer is N." with single spaces, recording spans."""
  sentences = [f"{a} {op} {b} = {c}." for a, op, b, c in
               zip(lefts, problem.ops, problem.operands[1:], results)]
  sentences.append(f"The answer is {answer}.")
  spans, pos = [], 0
  for sent in sentences:
    spans.append((pos, pos + len(sent)))
    pos += len(sent) + 1
  return StepSolution(problem, " ".join(sentences), tuple(spans), int(first_error), mode)


def correct_solution(problem: ChainProblem) -> StepSolution:
  """The worked solution (`problem.solution()`) with its step spans; `first_error = -1`."""
  lefts = (problem.operands[0],) + problem.values[:-1]
  return _render(problem, lefts, problem.values, problem.answer, -1, CORRECT)


def _propagate(problem: ChainProblem, step: int, wrong: int) -> tuple:
  """Results when step `step` writes `wrong` and every later step is computed from it."""
  out, acc = list(problem.values[:step]) + [wrong], wrong
  for op, b in zip(problem.ops[step + 1:], problem.operands[step + 2:]):
    acc = _apply(acc, op, b)
    out.append(acc)
  return tuple(out)


def corrupt_solution(problem: ChainProblem, step: int, mode: str, rng: np.random.Generator, *,
                     max_delta: int = 3) -> StepSolution:
  """The solution whose first wrong step is `step` (0-based equation index; see the module docstring).

  Step `step` writes `c + d` instead of its result c, with `d` drawn uniformly from the non-zero
  integers in [-max_delta, max_delta] that keep the wrong value (and, for either mode, every
  value the propagated solution would write) >= 0. `mode="propagated"`: later steps start from the
  wrong value and compute correctly; the answer sentence states the last (wrong) result.
  `mode="inconsistent"`: later steps and the answer are those of the correct solution.

  Raises:
    ValueError: `step` not in [0, problem.depth), unknown `mode`, or `max_delta < 1`.
  """
  if not 0 <= step < problem.depth:
    raise ValueError(f"corrupt_solution: step must be in [0, {problem.depth}) for a depth-"
                     f"{problem.depth} problem, got {step}")
  if mode not in CORRUPTION_MODES:
    raise ValueError(f"corrupt_solution: mode must be one of {CORRUPTION_MODES}, got {mode!r}")
  if max_delta < 1:
    raise ValueError(f"corrupt_solution: max_delta must be >= 1, got {max_delta}")
  c = problem.values[step]
  deltas = [d for d in range(-max_delta, max_delta + 1)
            if d != 0 and min(_propagate(problem, step, c + d)) >= 0]  # d > 0 always qualifies
  d = deltas[int(rng.integers(len(deltas)))]
  correct_lefts = (problem.operands[0],) + problem.values[:-1]
  if mode == "propagated":
    results = _propagate(problem, step, c + d)
    lefts = (problem.operands[0],) + results[:-1]
    answer = results[-1]
  else:
    results = problem.values[:step] + (c + d,) + problem.values[step + 1:]
    lefts, answer = correct_lefts, problem.answer
  return _render(problem, lefts, results, answer, step, mode)


def step_credit_solutions(problem: ChainProblem, seed, *, max_delta: int = 3) -> tuple:
  """(correct, propagated, inconsistent) solutions of `problem`; each corrupted one's first wrong
  step is uniform over the equations, drawn with its wrong value from `default_rng(seed)` (an int
  or a sequence of ints, e.g. `[base_seed, problem_index]`): deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  out = [correct_solution(problem)]
  for mode in CORRUPTION_MODES:
    step = int(rng.integers(problem.depth))
    out.append(corrupt_solution(problem, step, mode, rng, max_delta=max_delta))
  return tuple(out)
