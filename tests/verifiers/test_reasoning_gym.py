"""reasoning-gym tasks as prompt sources (`rg:<task>[:k=v,...]`) and the "rg" verifier kind.

Records build deterministically from a spec; the task's own `score_answer` runs in the verifier
process pool on the re-created entry (gold answer -> 1.0, wrong -> < 1, no tags -> no_answer, a
gold that does not re-create -> a counted verifier error); bad specs raise naming the spec; and
a 2-step smoke run of experiments/prime_math.py trains on one rg task and evaluates on another.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("reasoning_gym")

from jaxrl_dense import verifiers  # noqa: E402
from jaxrl_dense.data import prompts  # noqa: E402
from jaxrl_dense.data import reasoning_gym as rg_data  # noqa: E402
from jaxrl_dense.verifiers import rg  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
SPECS = ("rg:basic_arithmetic:size=12,seed=0", "rg:chain_sum:size=12,seed=3,max_terms=4",
         "rg:knights_knaves:size=6,seed=1", "rg:zebra_puzzles:size=4,seed=0,num_people=3")


@pytest.fixture(scope="module")
def pool():
  p = verifiers.VerifierPool(workers=2)
  yield p
  p.close()


def _answer(record) -> str:
  return json.loads(record.gold)["answer"]


@pytest.mark.parametrize("spec", SPECS)
def test_records_are_deterministic_and_well_formed(spec):
  a, b = prompts.load_prompts(spec), prompts.load_prompts(spec)
  assert a == b and len(a) == rg.parse_spec(spec).size
  assert len({r.uid for r in a}) == len(a)
  assert len({r.question for r in a}) > 1
  for i, r in enumerate(a):
    assert r.verifier == "rg" and r.verifier_source == "rg"
    assert r.data_source == "rg:" + spec.split(":")[1]
    assert r.prompt_messages[-1]["role"] == "user" and r.question.endswith(rg.ANSWER_INSTRUCTION)
    g = rg.decode_gold(r.gold)
    assert g["index"] == i and rg.parse_spec(g["rg"]).canonical == g["rg"]
    assert r.question.startswith(str(rg.entry(g["rg"], i)["question"]).strip())
  # another seed gives other problems; limit / system_prompt apply
  seed = rg.parse_spec(spec).seed
  other = prompts.load_prompts(spec.replace(f"seed={seed}", f"seed={seed + 100}"))
  assert [r.question for r in other] != [r.question for r in a]
  cut = prompts.load_prompts(spec, limit=2, system_prompt="Be brief.")
  assert len(cut) == 2 and cut[0].prompt_messages[0] == {"role": "system", "content": "Be brief."}
  assert cut[0].gold == a[0].gold


def test_canonical_spec_orders_options_and_fills_seed_and_size():
  s = rg.parse_spec("rg:chain_sum:max_terms=4,min_terms=3")
  assert s.canonical == "rg:chain_sum:max_terms=4,min_terms=3,seed=0,size=500"
  assert rg.parse_spec(s.canonical) == s
  assert s.kwargs == {"max_terms": 4, "min_terms": 3, "seed": 0, "size": 500}


def test_option_typing_from_the_config_dataclass():
  s = rg.parse_spec("rg:basic_arithmetic:operators=+|-,allow_parentheses=no,format_style=natural,size=5")
  assert s.kwargs["operators"] == ["+", "-"] and s.kwargs["allow_parentheses"] is False
  assert s.kwargs["format_style"] == "natural"
  for r in rg_data.load_source("rg:basic_arithmetic:operators=+|-,allow_parentheses=no,size=5"):
    expr = r.question.split("\n")[0]
    assert "*" not in expr and "/" not in expr and "(" not in expr, expr
  import typing
  assert rg.parse_value("none", typing.Optional[int]) is None
  assert rg.parse_value("7", typing.Optional[int]) == 7
  assert rg.parse_value("a|b", tuple[str, ...]) == ("a", "b")
  assert rg.parse_value("0.5|2", list[float]) == [0.5, 2.0]
  with pytest.raises(ValueError):
    rg.parse_value("maybe", bool)


@pytest.mark.parametrize("spec,what", [
    ("rg:basic_arithmatic", "did you mean basic_arithmetic"),
    ("rg:", "known tasks: ab, acre"),
    ("rg:chain_sum:max_term=3", "unknown option 'max_term' of task 'chain_sum' (did you mean max_terms"),
    ("rg:chain_sum:max_terms=three", "bad value 'three' for option 'max_terms' (int)"),
    ("rg:chain_sum:min_terms=5,max_terms=2", "refuses this config"),
    ("rg:chain_sum:size=0", "size must be an integer >= 1"),
    ("rg:chain_sum:seed=-1", "seed must be an integer >= 0"),
    ("rg:chain_sum:size", "expected key=value"),
    ("rg:chain_sum:size=3,size=4", "given twice"),
    ("rg:basic_arithmetic:format_style=fancy", "expected one of ['simple', 'natural']"),
    ("rg:word_ladder", "string-hash seed"),
])
def test_bad_specs_raise_naming_the_spec(spec, what):
  with pytest.raises(ValueError) as e:
    prompts.load_prompts(spec)
  assert repr(spec) in str(e.value) and what in str(e.value), str(e.value)


def test_bad_spec_is_a_flag_error_before_any_work():
  from jaxrl_dense.rl import config as config_lib
  from jaxrl_dense.rl import load
  cfg = config_lib.from_args([f"--flagfile={REPO / 'experiments' / 'configs' / 'smoke.flags'}"])
  with pytest.raises(config_lib.ConfigError, match=r"--train_data='rg:chain_summ'.*did you mean chain_sum"):
    load.check_data_spec("train_data", "rg:chain_summ", cfg, allow_empty=False)
  load.check_data_spec("eval_data", "rg:chain_sum:size=3", cfg, allow_empty=True)


def test_gold_scores_one_and_wrong_answers_less_in_the_pool(pool):
  records = [r for spec in SPECS for r in prompts.load_prompts(spec)]
  golds = [r.gold for r in records]
  kinds = verifiers.kinds_of_sources([r.verifier_source for r in records])
  assert set(kinds) == {"rg"}
  right = [f"Let me think.\n<answer>{_answer(r)}</answer>" for r in records]
  np.testing.assert_array_equal(pool.verify(right, golds, kinds=kinds, timeout_s=10.0), 1.0)
  assert pool.last_stats.errors == 0 and pool.last_stats.timeouts == 0

  def wrong(r):
    a = _answer(r)
    if "knight" in a:  # swap every role: a different assignment
      return a.replace("knight", "@").replace("knave", "knight").replace("@", "knave")
    return "alice" if a != "alice" else "bob" if r.data_source == "rg:zebra_puzzles" else str(int(a) + 1)

  wrong_resp = [f"<answer>{wrong(r)}</answer>" for r in records]
  scores = pool.verify(wrong_resp, golds, kinds=kinds, timeout_s=10.0)
  assert (scores < 1.0).all() and (scores >= 0.0).all(), scores
  assert set(pool.last_stats.failure_reasons()) == {"wrong_answer"}
  # the answer outside the tags does not count; the last tag pair does
  scores = pool.verify([_answer(r) for r in records], golds, kinds=kinds, timeout_s=10.0)
  np.testing.assert_array_equal(scores, 0.0)
  assert pool.last_stats.failure_reasons() == {"no_answer": len(records)}
  last = [f"<answer>{wrong(r)}</answer> no: <answer>{_answer(r)}</answer>" for r in records[:3]]
  np.testing.assert_array_equal(pool.verify(last, golds[:3], kinds="rg", timeout_s=10.0), 1.0)


def test_partial_credit_is_the_tasks_own(pool):
  r = prompts.load_prompts(SPECS[0], limit=1)[0]
  a = _answer(r)
  s = pool.verify([f"<answer>x = {a}</answer>"], [r.gold], kinds="rg", timeout_s=10.0)[0]
  ds = rg.dataset(rg.decode_gold(r.gold)["rg"])
  assert s == pytest.approx(ds.score_answer(f"x = {a}", ds[0])) and 0.0 < s < 1.0


def test_a_gold_that_does_not_recreate_is_a_counted_error_not_a_wrong_answer(pool):
  r = prompts.load_prompts(SPECS[1], limit=2)
  g = json.loads(r[0].gold)
  g["index"] = 1  # entry 1's question is not the recorded one
  bad = [json.dumps(g), '{"rg": "rg:chain_sum", "index": "x"}', r[1].gold]
  resp = [f"<answer>{_answer(r[0])}</answer>", "<answer>1</answer>", f"<answer>{_answer(r[1])}</answer>"]
  scores = pool.verify(resp, bad, kinds="rg", timeout_s=10.0)
  np.testing.assert_array_equal(scores, [0.0, 0.0, 1.0])
  st = pool.last_stats
  assert st.errors == 2 and "differently" in st.statuses[0] and "rg gold must be JSON" in st.statuses[1]
  with pytest.raises(TypeError, match="golds\\[0\\] must be the JSON string of an rg gold"):
    pool.verify(["x"], [3], kinds="rg")


def test_missing_package_says_how_to_install(monkeypatch):
  from jaxrl_dense.rl import config as config_lib
  from jaxrl_dense.rl import load
  monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym -> ImportError
  monkeypatch.setattr(rg, "_DATASETS", type(rg._DATASETS)())
  with pytest.raises(ImportError, match=r"pip install 'jaxrl_dense\[rg\]'"):
    prompts.load_prompts("rg:chain_sum:size=2")
  cfg = config_lib.from_args([f"--flagfile={REPO / 'experiments' / 'configs' / 'smoke.flags'}"])
  with pytest.raises(config_lib.ConfigError, match=r"--eval_data='rg:chain_sum'.*pip install"):
    load.check_data_spec("eval_data", "rg:chain_sum", cfg, allow_empty=True)
  assert not rg_data.is_source("chain_arith:eval") and rg_data.is_source("rg:x")


def test_two_step_prime_math_run_on_rg_tasks(tmp_path):
  """experiments/prime_math.py with the smoke model: train on rg:basic_arithmetic, eval on rg:chain_sum."""
  flags = REPO / "experiments" / "configs" / "smoke.flags"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "prime_math.py"), f"--flagfile={flags}",
                      "--train_data=rg:basic_arithmetic:size=64,seed=0",
                      "--eval_data=rg:chain_sum:size=4,seed=1,max_terms=3", "--steps=2",
                      "--max_prompt_length=256", f"--logdir={tmp_path}"],
                     capture_output=True, text=True, timeout=600, cwd=str(REPO), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if l.strip()]
  steps = {x["step"]: x for x in rows if "actor/loss" in x}
  assert sorted(steps) == [1, 2]
  assert all(np.isfinite(x["actor/loss"]) for x in steps.values())
  ev = json.loads((tmp_path / "eval_step00002_end.json").read_text())
  assert ev["summary"]["num_problems"] == 4
  assert [p["uid"] for p in ev["problems"]] == [f"rg:chain_sum:1:{i}" for i in range(4)]
  assert all(rg.decode_gold(p["gold"])["rg"] == "rg:chain_sum:max_terms=3,seed=1,size=4"
             for p in ev["problems"])


def test_eval_math_refuses_a_bad_rg_spec_naming_the_flag():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "eval_math.py"), "--dataset=rg:chain_sum:sise=3"],
                     capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
  assert r.returncode == 2 and "--dataset='rg:chain_sum:sise=3'" in r.stderr and "size" in r.stderr, r.stderr[-2000:]
