"""Tests of the math outcome verifier (extraction, equivalence) and the shipped-data adapters."""
import random
import threading

import pytest

from jaxrl_dense.verifiers import datasets
from jaxrl_dense.verifiers import math as vmath

# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("response, expected", [
    ("so the result is \\boxed{42}.", "42"),
    ("\\boxed{1} first, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box wins
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("Final: \\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("The answer is 42.", "42"),
    ("The answer is -17.", "-17"),
    ("The answer is -3.5.", "-3.5"),
    ("Adding gives 7. The answer is 1,234. Done.", "1,234"),
    ("The answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("**Answer:** 12", "12"),
    ("Final Answer: The final answer is $-4$. I hope it is correct.", "-4"),
    ("the answers are 3, 4\nthanks", "3, 4"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### -5", "-5"),
    ("2 + 3 = 5", "5"),
    ("First 1 + 1 = 2.\nThen x = 2 + 8 = 10.", "10"),
])
def test_extract_answer(response, expected):
  assert vmath.extract_answer(response) == expected


@pytest.mark.parametrize("response", [None, "", "   ", "no answer here", "\\boxed{unbalanced", "The answer is"])
def test_extract_answer_none(response):
  assert vmath.extract_answer(response) is None


def test_extract_answer_order_is_configurable():
  text = "The answer is 3.\n\\boxed{5}"
  assert vmath.extract_answer(text) == "5"
  assert vmath.extract_answer(text, order=("answer_is", "boxed")) == "3"
  assert vmath.extract_answer("we get 7 and 8", order=("last_number",)) == "8"
  assert vmath.extract_answer("we get 7 and 8") is None  # last_number is opt-in


def test_extract_answer_bad_input():
  with pytest.raises(ValueError, match="unknown strategy"):
    vmath.extract_answer("\\boxed{1}", order=("boxed", "nope"))
  with pytest.raises(TypeError, match="response"):
    vmath.extract_answer(42)


def test_extract_last_boxed_long_garbage_is_fast():
  garbage = "{" * 50_000 + "\\boxed{" + "x" * 50_000
  assert vmath.extract_answer(garbage) is None


# ----------------------------------------------------------------------------- equivalence

EQUIVALENT = [
    # (response answer, gold)
    ("\\frac12", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac12"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("(1, 2)", "(1,2)"),
    ("(1,2)", "\\left( 1, 2 \\right)"),
    ("[0, 1)", "[0,1)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("(2,12) \\cup (12,102)", "(2,12)\\cup(12,102)"),
    ("10\\%", "10"),
    ("10%", "10"),
    ("x=3", "3"),
    ("x = -2", "-2"),
    ("\\text{(B)}", "B"),
    ("(C)", "C"),
    ("\\textbf{(D)}", "D"),
    ("5 \\text{ cm}", "5"),
    ("12 inches", "12"),
    ("4\\text{ cm}^2", "4"),
    ("\\$18.90", "18.90"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("27", "27.0"),
    ("27.0", "27"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("3\\pi", "3 \\pi"),
    ("x^2+2x+1", "(x+1)^2"),
    ("1+x^2", "x^2+1"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("6+9i", "9i+6"),
    ("-\\frac{1}{3}", "\\frac{-1}{3}"),
    (".5", "0.5"),
    ("2^{10}", "1024"),
    ("\\frac{7}{2}", "3.5"),
    ("2516_8", "2516_8"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("y = 2x + 3", "2x+3"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "0.33"),
    ("0.5", "\\frac{1}{3}"),
    ("(1,2)", "(2,1)"),
    ("[0, 1)", "[0, 1]"),
    ("(0,1)", "[0,1]"),
    ("\\text{(B)}", "C"),
    ("\\sqrt{2}", "2"),
    ("10", "100"),
    ("-3", "3"),
    ("x=3", "4"),
    ("1001", "1000"),
    ("27.5", "27"),
    ("x^2+1", "x^2-1"),
    ("\\frac{\\pi}{2}", "\\pi"),
    ("2\\sqrt{3}", "3\\sqrt{2}"),
    ("\\{1, 2\\}", "\\{1, 3\\}"),
    ("6+9i", "6-9i"),
    ("1000", "10,000"),
    ("5x", "5"),
    ("\\frac{1}{2}", "\\frac{1}{2}x"),
]


def test_equivalence_table_size():
  assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 40


@pytest.mark.parametrize("answer, gold", EQUIVALENT)
def test_equivalent_forms(answer, gold):
  assert vmath.score("So we get \\boxed{" + answer + "}.", gold) == 1.0


@pytest.mark.parametrize("answer, gold", NOT_EQUIVALENT)
def test_near_misses(answer, gold):
  assert vmath.score("So we get \\boxed{" + answer + "}.", gold) == 0.0


@pytest.mark.parametrize("response, gold, expected", [
    ("The answer is 42.", "42", 1.0),
    ("The answer is -42.", "-42", 1.0),
    ("The answer is -42.", "42", 0.0),
    ("The answer is 42.", 42, 1.0),
    ("The answer is -7.", -7, 1.0),
    ("The answer is 27.", 27.0, 1.0),
    ("The answer is 3.5.", 3.5, 1.0),
    ("The answer is 3.", 3.5, 0.0),
    ("I think it is 42", "42", 0.0),  # no recognised answer marker
    (None, "42", 0.0),
    ("", "42", 0.0),
])
def test_score_plain_answers_and_non_string_golds(response, gold, expected):
  assert vmath.score(response, gold) == expected


def test_score_bad_gold_raises():
  with pytest.raises(TypeError, match="gold"):
    vmath.score("\\boxed{1}", None)
  with pytest.raises(TypeError, match="gold"):
    vmath.score("\\boxed{1}", True)
  with pytest.raises(ValueError, match="empty"):
    vmath.score("\\boxed{1}", "  ")
  with pytest.raises(ValueError, match="finite"):
    vmath.score("\\boxed{1}", float("nan"))


def test_gold_to_str():
  assert vmath.gold_to_str(27.0) == "27"
  assert vmath.gold_to_str(142) == "142"
  assert vmath.gold_to_str(2.5) == "2.5"
  assert vmath.gold_to_str("\\frac12") == "\\frac12"


def test_score_in_non_main_thread():
  """math-verify's signal-based timeout would raise off the main thread; score must not."""
  out = {}

  def run():
    out["a"] = vmath.score("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")
    out["b"] = vmath.score("\\boxed{x^2+1}", "x^2-1")

  t = threading.Thread(target=run)
  t.start()
  t.join(60)
  assert out == {"a": 1.0, "b": 0.0}


# ----------------------------------------------------------------------------- shipped data


def test_shipped_files_match_checksums():
  result = datasets.verify_checksums()
  assert len(result) == 10
  assert all(result.values()), result


def test_shipped_path():
  p = datasets.shipped_path("math500_test.jsonl")
  assert p.is_file() and p == datasets.shipped_path("math500_test")
  assert datasets.shipped_path("README.md").is_file()
  with pytest.raises(FileNotFoundError, match="no shipped data file"):
    datasets.shipped_path("nope.jsonl")
  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.load("nope")


@pytest.mark.parametrize("name, n, first_gold", [
    ("gsm8k_test", 1319, "18"),
    ("gsm8k_train", 7473, "72"),
    ("math500", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("math_train", 11998, "2"),  # 2 of 12,000 rows have an empty gold and are skipped
    ("aime24", 30, "204"),
    ("amc23", 40, "27"),
    ("aimo_validation_aime", 90, "116"),
    ("aimo_validation_amc", 83, "142"),
    ("minerva_math", 272, "1.6"),
    ("olympiadbench", 675, "2"),
])
def test_dataset_adapters(name, n, first_gold):
  recs = datasets.load(name)
  assert len(recs) == n
  assert recs[0].gold == first_gold
  assert all(r.prompt.strip() and r.gold.strip() and r.source == name for r in recs)
  assert len({r.id for r in recs}) == n


def test_dataset_strict_mode_raises_on_empty_gold():
  with pytest.raises(ValueError, match="empty gold"):
    datasets.load("math_train", strict=True)


def test_gold_formats():
  assert datasets.gsm8k_gold("a\nb\n#### 1,234") == "1234"
  with pytest.raises(ValueError, match="####"):
    datasets.gsm8k_gold("no final line")
  assert datasets.olympiadbench_gold(["$69$,$84$"]) == "69,84"
  assert datasets.olympiadbench_gold("['$\\\\frac{1}{2}$', '3']") == "\\frac{1}{2}, 3"
  with pytest.raises(ValueError, match="non-empty list"):
    datasets.olympiadbench_gold([])
  minerva = datasets.load("minerva_math")
  assert all("boxed" not in r.gold for r in minerva)


def test_with_suffix():
  recs = datasets.with_suffix(datasets.load("aime24")[:2])
  assert all(r.prompt.endswith(datasets.PRIME_MATH_SUFFIX) for r in recs)


# ----------------------------------------------------------------------------- dataset-level checks


@pytest.fixture(scope="module")
def math500_golds():
  return [r.gold for r in datasets.load("math500")]


def test_math500_golds_verify_against_themselves(math500_golds):
  scores = [vmath.score("The final answer is \\boxed{" + g + "}", g) for g in math500_golds]
  assert sum(scores) == 500


def test_math500_shuffled_golds_mostly_fail(math500_golds):
  perm = list(math500_golds)
  random.Random(0).shuffle(perm)
  identical = sum(p == g for p, g in zip(perm, math500_golds))
  scores = [vmath.score("\\boxed{" + p + "}", g) for p, g in zip(perm, math500_golds)]
  assert sum(scores) >= identical  # identical strings must match
  assert sum(scores) / 500 <= 0.02, sum(scores)


def test_gsm8k_solutions_final_line_verifies():
  recs = datasets.load("gsm8k_test")
  rows = list(datasets.read_jsonl("gsm8k_test.jsonl"))
  for r, row in zip(recs, rows):
    final_line = row["answer"].strip().splitlines()[-1]
    assert vmath.score(final_line, r.gold) == 1.0, (final_line, r.gold)
  # and a wrong final line does not
  assert vmath.score("#### 19", recs[0].gold) == 0.0


@pytest.mark.parametrize("name", ["aime24", "amc23", "aimo_validation_aime", "aimo_validation_amc",
                                  "minerva_math", "olympiadbench"])
def test_eval_set_golds_verify_against_themselves(name):
  recs = datasets.load(name)
  assert all(vmath.score("\\boxed{" + r.gold + "}", r.gold) == 1.0 for r in recs)
