"""The chained-arithmetic task: problems, worked solutions, disjoint splits, prompt, names."""
import collections

import numpy as np
import pytest

from jaxrl_dense.data import arithmetic, chain_arith as ca, prompts
from jaxrl_dense.verifiers import math as vmath


def test_problem_solution_and_expression():
  p = ca.ChainProblem((52, 17, 9, 21), ("-", "+", "-"))
  assert p.values == (35, 44, 23) and p.answer == 23 and p.depth == 3
  assert p.question == "What is ((52 - 17) + 9) - 21?"
  assert p.solution() == "52 - 17 = 35. 35 + 9 = 44. 44 - 21 = 23. The answer is 23."
  q = ca.ChainProblem((6, 7, 15), ("*", "+"))
  assert q.question == "What is (6 * 7) + 15?" and q.answer == 57
  # The written solution is exactly what the shared verifier and extractor accept.
  assert arithmetic.extract_answer(p.solution()) == 23
  assert vmath.score(p.solution(), str(p.answer)) == 1.0
  assert vmath.score(p.solution().replace("is 23", "is 24"), "23") == 0.0
  # eval() of the expression agrees with the step values (left-nested = Python precedence here
  # because of the parentheses).
  assert eval(p.expression) == p.answer and eval(q.expression) == q.answer
  with pytest.raises(ValueError, match="len\\(operands\\) == len\\(ops\\) \\+ 1"):
    ca.ChainProblem((1, 2), ("+", "+"))
  with pytest.raises(ValueError, match="ops must be in"):
    ca.ChainProblem((1, 2), ("/",))


def test_key_ignores_first_step_order_only():
  a = ca.ChainProblem((3, 5, 2), ("+", "-"))
  b = ca.ChainProblem((5, 3, 2), ("+", "-"))
  c = ca.ChainProblem((5, 3, 2), ("-", "-"))
  d = ca.ChainProblem((3, 2, 5), ("+", "-"))
  assert a.key == b.key and a.key != c.key and a.key != d.key


@pytest.mark.parametrize("task", [
    ca.ChainArithTask(),
    ca.ChainArithTask(ops=("+", "-", "*"), min_depth=2, max_depth=4, num_eval=600,
                      num_train=3000, seed=3),
])
def test_splits_disjoint_deterministic_and_valid(task):
  train, ev = ca.make_problem_splits(task)
  assert len(ev) == task.num_eval >= 500 and len(train) == task.num_train
  ev_keys = {p.key for p in ev}
  train_keys = {p.key for p in train}
  assert len(ev_keys) == len(ev) and len(train_keys) == len(train)  # distinct within a split
  assert not ev_keys & train_keys  # disjoint
  shot_keys = {p.key for p in ca.FEW_SHOT_EXAMPLES}
  assert not shot_keys & (ev_keys | train_keys)
  for p in ev + train[:2000]:
    assert task.min_depth <= p.depth <= task.max_depth
    assert set(p.ops) <= set(task.ops)
    assert all(v >= 0 for v in p.values)
    assert p.operands[0] <= task.max_operand
    for op, b, v in zip(p.ops, p.operands[1:], p.values):
      assert v <= task.max_value
      assert (2 <= b <= task.max_mul_operand) if op == "*" else (1 <= b <= task.max_operand)
  depths = collections.Counter(p.depth for p in ev)
  assert set(depths) == set(range(task.min_depth, task.max_depth + 1))
  ops = collections.Counter(o for p in ev for o in p.ops)
  assert set(ops) == set(task.ops)
  # Deterministic: a fresh computation (cache cleared) gives identical lists.
  ca.make_problem_splits.cache_clear()
  again = ca.make_problem_splits(task)
  assert again == (train, ev)
  other = ca.make_problem_splits(ca.ChainArithTask(seed=task.seed + 1, num_eval=task.num_eval,
                                                   num_train=10, ops=task.ops,
                                                   min_depth=task.min_depth,
                                                   max_depth=task.max_depth))
  assert [p.key for p in other[1]] != [p.key for p in ev]


def test_records_and_prompt_layout():
  task = ca.ChainArithTask(num_eval=500, num_train=50)
  train, ev = ca.make_splits(task)
  assert len(ev) == 500 and len(train) == 50
  r = ev[0]
  msgs = r.prompt_messages
  assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
  shots = ca._shot_examples(task.ops, task.min_depth, task.max_depth)[:3]
  assert [m["content"] for m in msgs[0:6:2]] == [ex.question for ex in shots]
  assert [m["content"] for m in msgs[1:6:2]] == [ex.solution() for ex in shots]
  assert all(m["content"].endswith(f"The answer is {ex.answer}.")
             for m, ex in zip(msgs[1::2], shots))
  # Examples within the task's depth range come first: depth 2-3 tasks get no depth-4 example.
  assert [ex.depth for ex in shots] == [2, 3, 2]
  assert [ex.depth for ex in ca._shot_examples(("+", "-"), 4, 4)][:1] == [4]
  assert "*" not in "".join(m["content"] for m in msgs[:-1])  # no "*" shot when ops are +, -
  p = ca.make_problem_splits(task)[1][0]
  assert msgs[-1]["content"] == p.question and r.gold == str(p.answer)
  assert r.data_source == "chain_arith" and r.uid.startswith("chain_arith:eval:")
  assert len({x.uid for x in ev}) == 500 and len({x.uid for x in train}) == 50
  # With "*" the worked example using "*" is among the shots.
  tm = ca.ChainArithTask(ops=("+", "-", "*"), num_eval=5, num_train=5)
  shots = [m["content"] for m in ca.make_splits(tm)[1][0].prompt_messages[0:6:2]]
  assert "What is (6 * 7) + 15?" in shots
  zero = ca.make_splits(ca.ChainArithTask(num_shots=0, num_eval=3, num_train=3))[1][0]
  assert len(zero.prompt_messages) == 1
  sys_rec = ca.make_splits(task, system_prompt="Be brief.")[1][0]
  assert sys_rec.prompt_messages[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("kwargs, what", [
    (dict(ops=("+", "/")), "ops must be distinct values"),
    (dict(min_depth=3, max_depth=2), "depths must satisfy"),
    (dict(max_depth=9), "depths must satisfy"),
    (dict(num_eval=0), "num_eval and num_train must be >= 1"),
    (dict(num_shots=5), "num_shots must be in \\[0, 4\\]"),
    (dict(max_operand=60, max_value=100), "max_value=100 must be >= 2 \\* max_operand"),
])
def test_task_validation(kwargs, what):
  with pytest.raises(ValueError, match=what):
    ca.ChainArithTask(**kwargs)


def test_single_op_tasks():
  # Only "-": chains that hit 0 are redrawn, so every problem has its full depth.
  task = ca.ChainArithTask(ops=("-",), min_depth=4, max_depth=4, num_eval=50, num_train=50,
                           num_shots=0)
  train, ev = ca.make_problem_splits(task)
  assert all(p.depth == 4 and p.ops == ("-",) * 4 and min(p.values) >= 0 for p in train + ev)
  task = ca.ChainArithTask(ops=("*",), min_depth=2, max_depth=2, max_value=200, num_eval=20,
                           num_train=20, num_shots=0)
  assert all(p.answer <= 200 for p in ca.make_problem_splits(task)[1])


def test_too_small_problem_space_raises():
  task = ca.ChainArithTask(min_depth=1, max_depth=1, max_operand=2, max_value=4, ops=("+",),
                           num_eval=50, num_train=10, num_shots=0)
  with pytest.raises(ValueError, match="could draw only"):
    ca.make_problem_splits(task)


def test_source_names_through_load_prompts():
  ev = prompts.load_prompts("chain_arith:eval")
  assert len(ev) == 500 and ev[0].data_source == "chain_arith"
  assert ev == ca.make_splits(ca.ChainArithTask())[1]
  tr = prompts.load_prompts("chain_arith:train:depth=2-4,ops=+-*,num_train=100,shots=2", limit=7)
  assert len(tr) == 7 and len(tr[0].prompt_messages) == 5
  task, split = ca.parse_source("chain_arith:train:depth=2-4,ops=+-*,num_train=100,shots=2")
  assert split == "train" and (task.min_depth, task.max_depth, task.ops, task.num_shots) == (
      2, 4, ("+", "-", "*"), 2)
  assert ca.parse_source("chain_arith:eval:depth=3")[0].min_depth == 3
  for bad, what in [("chain_arith", "name the split"), ("chain_arith:test", "name the split"),
                    ("chain_arith:eval:foo=1", "unknown key 'foo'"),
                    ("chain_arith:eval:depth=x", "bad value 'x' for 'depth'"),
                    ("chain_arith:eval:max_depth", "expected key=value"),
                    ("chain_arith:eval:depth=1-9", "depths must satisfy")]:
    with pytest.raises(ValueError, match=what):
      prompts.load_prompts(bad)
  assert ca.is_source("chain_arith:eval") and not ca.is_source("arithmetic")
  assert not ca.is_source("chain_arithmetic.jsonl")


# ----------------------------------------------------------------------------- step labels


def _check_spans(sol):
  """Spans are increasing, separated by one space, cover the text, and hold the sentences."""
  assert sol.num_steps == sol.problem.depth + 1
  ends = [0] + [e + 1 for _, e in sol.step_spans[:-1]]
  assert [s for s, _ in sol.step_spans] == ends
  assert sol.step_spans[-1][1] == len(sol.text)
  assert " ".join(sol.steps) == sol.text
  assert all(st.endswith(".") for st in sol.steps)
  assert sol.steps[-1].startswith("The answer is ")


def test_correct_solution_is_the_worked_solution_with_spans():
  p = ca.ChainProblem((52, 17, 9, 21), ("-", "+", "-"))
  sol = ca.correct_solution(p)
  assert sol.text == p.solution() and sol.first_error == -1 and sol.mode == "correct"
  assert sol.steps == ("52 - 17 = 35.", "35 + 9 = 44.", "44 - 21 = 23.", "The answer is 23.")
  assert sol.step_spans == ((0, 13), (14, 26), (27, 40), (41, 58))
  _check_spans(sol)


class _FixedRng:
  """Stands in for a Generator: integers(n) returns a fixed index (to pick a known delta)."""

  def __init__(self, i):
    self.i = i

  def integers(self, n):
    assert 0 <= self.i < n
    return self.i


def test_corrupt_solution_by_hand():
  p = ca.ChainProblem((52, 17, 9, 21), ("-", "+", "-"))
  # deltas for step 1 (value 44) with max_delta=3: [-3, -2, -1, 1, 2, 3]; index 4 -> +2.
  prop = ca.corrupt_solution(p, 1, "propagated", _FixedRng(4))
  assert prop.text == "52 - 17 = 35. 35 + 9 = 46. 46 - 21 = 25. The answer is 25."
  assert prop.first_error == 1 and prop.mode == "propagated"
  inc = ca.corrupt_solution(p, 1, "inconsistent", _FixedRng(4))
  assert inc.text == "52 - 17 = 35. 35 + 9 = 46. 44 - 21 = 23. The answer is 23."
  assert arithmetic.extract_answer(inc.text) == p.answer  # the outcome looks right
  assert vmath.score(prop.text, str(p.answer)) == 0.0 and vmath.score(inc.text, str(p.answer)) == 1.0
  last = ca.corrupt_solution(p, 2, "propagated", _FixedRng(0))  # 23 - 3 = 20
  assert last.steps[2:] == ("44 - 21 = 20.", "The answer is 20.")
  for sol in (prop, inc, last):
    _check_spans(sol)
  # Only deltas that keep every written number >= 0: (2 - 1) - 1 = 0 at step 1 allows d > 0 only;
  # at step 0 (value 1) d = -1 gives 0 there but -1 after, so again d > 0 only.
  q = ca.ChainProblem((2, 1, 1), ("-", "-"))
  for step in (0, 1):
    got = {ca.corrupt_solution(q, step, "inconsistent", _FixedRng(i)).steps[step] for i in range(3)}
    assert len(got) == 3 and all(" = -" not in g for g in got)
    with pytest.raises(AssertionError):  # a 4th delta does not exist
      ca.corrupt_solution(q, step, "inconsistent", _FixedRng(3))
  for bad, what in [(dict(step=3), "step must be in \\[0, 3\\)"), (dict(step=-1), "step must be"),
                    (dict(mode="shuffled"), "mode must be one of"),
                    (dict(max_delta=0), "max_delta must be >= 1")]:
    kw = {**dict(step=0, mode="propagated", rng=np.random.default_rng(0)), **bad}
    with pytest.raises(ValueError, match=what):
      ca.corrupt_solution(p, **kw)


def test_step_credit_solutions_properties_and_determinism():
  task = ca.ChainArithTask(ops=("+", "-", "*"), min_depth=1, max_depth=5, num_eval=300,
                           num_train=10, num_shots=0)
  _, ev = ca.make_problem_splits(task)
  errors = collections.Counter()
  for i, p in enumerate(ev):
    sols = ca.step_credit_solutions(p, [7, i])
    assert [s.mode for s in sols] == ["correct", "propagated", "inconsistent"]
    assert sols == ca.step_credit_solutions(p, [7, i])  # deterministic in the seed
    good, prop, inc = sols
    assert good == ca.correct_solution(p)
    for s in sols:
      _check_spans(s)
      assert s.problem == p
    for s in (prop, inc):
      k = s.first_error
      assert 0 <= k < p.depth
      errors[(p.depth, k)] += 1
      assert s.steps[:k] == good.steps[:k]  # every step before k is right
      assert s.steps[k] != good.steps[k]
      # Step k's left side and operand are right, its result is wrong by at most 3.
      left, right = s.steps[k][:-1].split(" = ")
      assert left == good.steps[k].split(" = ")[0]
      assert int(right) != p.values[k] and abs(int(right) - p.values[k]) <= 3 and int(right) >= 0
      assert "-" not in s.text.replace(" - ", "")  # no negative number is ever written
    # propagated: every later equation is arithmetically right from its written left side,
    # and the final answer is wrong; inconsistent: later steps as in the correct solution.
    for st in prop.steps[prop.first_error + 1:-1]:
      lhs, rhs = st[:-1].split(" = ")
      assert eval(lhs) == int(rhs)
    assert arithmetic.extract_answer(prop.text) != p.answer
    assert arithmetic.extract_answer(prop.text) == int(prop.steps[-2][:-1].split(" = ")[1])
    assert inc.steps[inc.first_error + 1:] == good.steps[inc.first_error + 1:]
  # The first wrong step covers every equation of every depth.
  for d in range(1, 6):
    assert {k for (dd, k) in errors if dd == d} == set(range(d)), d
  assert ca.step_credit_solutions(ev[0], 1) != ca.step_credit_solutions(ev[0], 2) or \
      ca.step_credit_solutions(ev[1], 1) != ca.step_credit_solutions(ev[1], 2)


def test_tool_shots_show_calculator_calls_that_the_tool_env_answers():
  """tools=1: the worked examples call the calculator for every step, in the format the tool
  environment parses and answers; tools=0 keeps the task's fingerprint as before the field."""
  from jaxrl_dense import envs
  from jaxrl_dense.data import chain_arith as ca
  task, _ = ca.parse_source("chain_arith:eval:tools=1,num_eval=3")
  assert task.tool_shots == 1 and "tool_shots" in task.to_json()
  assert "tool_shots" not in ca.parse_source("chain_arith:eval")[0].to_json()
  rec = ca.load_source("chain_arith:eval:tools=1,num_eval=3")[0]
  shot = rec.prompt_messages[1]["content"]
  calls = envs.tool_calls(shot)
  problem = ca._shot_examples(task.ops, task.min_depth, task.max_depth)[0]
  assert [c["arguments"]["expression"] for c in calls] == [
      c["arguments"]["expression"] for c in problem.calculator_calls()]
  env = envs.make_env("tool:calculator", max_turns=8)()
  env.reset(rec)
  for chunk, value in zip(shot.split("</tool>")[:-1], problem.values):  # each call's result is the shot's
    assert env.step(chunk + "</tool>").observation == f"\n<result>{value}</result>\n"
  with pytest.raises(ValueError, match="tool_shots"):
    ca.parse_source("chain_arith:eval:tools=2")
  first = ca.make_problem_splits(task)[1][0]  # the record's gold calls: its own problem's steps
  assert rec.gold_calls == first.calculator_calls() and len(rec.gold_calls) == first.depth
