"""Math answers in this process: extraction, normalisation, equivalence (PRIME, arXiv 2502.01456).

The outcome label of a math rollout is

    r_o(y, a*) = 1[ equiv(extract_answer(y), a*) ]  in {0.0, 1.0},

where `extract_answer` pulls the final answer out of the decoded response text and
`equiv` is (i) equality of the two normalised strings (fast path, no sympy), else
(ii) `math_verify.verify` (LaTeX -> sympy, numeric/symbolic/set/interval equality).

Extraction follows PRIME's `match_answer` rules in spirit (Cui et al., 2025, "Process
Reinforcement through Implicit Rewards"; `prime_math` in veRL): the last `\\boxed{...}`
(brace-balanced, also `\\fbox`), "The answer is X" / "answer: X" (text after the last marker,
cut at the end of the sentence), a GSM8K-style "#### X", a trailing "= X". The order is
configurable.

Everything here runs in the calling process; sympy may hang on adversarial LaTeX, so callers
bound it from outside: `verifiers.math.score` runs the sympy step in a warm child process that is
killed after its time limit, and the `VerifierPool` workers (which score with `score_in_process`)
are killed by their parent. math-verify's own (soft) timeout uses `signal.alarm`, which works
only in a main thread; it is enabled only there.
"""
from __future__ import annotations

import logging
import math as _pymath
import re
import threading
from fractions import Fraction
from typing import Callable, Sequence

__all__ = [
    "DEFAULT_ORDER",
    "STRATEGIES",
    "extract_answer",
    "extract_last_boxed",
    "gold_to_str",
    "normalize_answer",
    "score_in_process",
]

# math-verify logs every parse timeout / failure as a warning; labels are our output, not logs.
logging.getLogger("math_verify").setLevel(logging.ERROR)

DEFAULT_ORDER: tuple[str, ...] = ("boxed", "answer_is", "hash", "equals")

# Responses longer than this are cut from the left before extraction (the answer is at the end);
# keeps every regex below linear-time-bounded on garbage.
_MAX_RESPONSE_CHARS = 20_000
# Extracted answers longer than this cannot be a sensible final answer; sympy is never asked.
_MAX_ANSWER_CHARS = 1_000


# ----------------------------------------------------------------------------- extraction


def _balanced_brace_content(text: str, open_idx: int) -> str | None:
  """Content of the `{...}` group opening at `text[open_idx]`, or None if unbalanced."""
  depth = 0
  for i in range(open_idx, len(text)):
    c = text[i]
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[open_idx + 1:i]
  return None


def extract_last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (nested braces allowed).

  Also accepts the brace-less form `\\boxed 5` (content up to the next whitespace or `$`).
  Returns None when there is no box or the last one is unbalanced.
  """
  if not text:
    return None
  idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if idx < 0:
    return None
  j = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
  while j < len(text) and text[j] == " ":
    j += 1
  if j < len(text) and text[j] == "{":
    return _balanced_brace_content(text, j)
  if j > idx + len("\\fbox") and j < len(text):  # "\boxed 5": at least one space was skipped
    m = re.match(r"[^\s$]+", text[j:])
    return m.group(0) if m else None
  return None


_ANSWER_MARKER = re.compile(r"answers?\s*(?:is|are|:)\s*:?", re.IGNORECASE)
_MATH_SPAN = re.compile(r"^\s*(?:\$\$?([^$]{1,2000})\$\$?|\\\((.{1,2000}?)\\\)|\\\[(.{1,2000}?)\\\])")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def _cut_sentence(s: str) -> str:
  """First line of `s`, cut before the first sentence-ending period ("3.5" survives)."""
  s = s.strip()
  m = _MATH_SPAN.match(s)
  if m:  # "The answer is $-\frac12$. ..." -> the math span
    return next(g for g in m.groups() if g is not None).strip()
  s = s.split("\n", 1)[0]
  m = _SENTENCE_END.search(s)
  if m:
    s = s[:m.start()]
  return s.strip()


def _extract_answer_is(text: str) -> str | None:
  last = None
  for last in _ANSWER_MARKER.finditer(text):
    pass
  if last is None:
    return None
  rest = text[last.end():]
  out = _cut_sentence(rest.lstrip("*").lstrip())
  return out or None


def _extract_hash(text: str) -> str | None:
  idx = text.rfind("####")
  if idx < 0:
    return None
  out = text[idx + 4:].strip().split("\n", 1)[0].strip()
  return out or None


def _extract_equals(text: str) -> str | None:
  lines = [l for l in text.strip().split("\n") if l.strip()]
  if not lines or "=" not in lines[-1]:
    return None
  out = _cut_sentence(lines[-1].rsplit("=", 1)[1])
  return out or None


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _extract_last_number(text: str) -> str | None:
  last = None
  for last in _LAST_NUMBER.finditer(text):
    pass
  return last.group(0) if last else None


STRATEGIES = {
    "boxed": extract_last_boxed,
    "answer_is": _extract_answer_is,
    "hash": _extract_hash,
    "equals": _extract_equals,
    "last_number": _extract_last_number,  # not in DEFAULT_ORDER: lenient, for untrained models
}


def _clean_extracted(ans: str) -> str:
  ans = ans.strip()
  # Markdown bold / trailing punctuation / enclosing $...$ left by the sentence cut.
  ans = ans.strip("*").strip()
  ans = ans.rstrip(".,;:!").strip()
  if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
    ans = ans.strip("$").strip()
  return ans


def extract_answer(response: str | None, order: Sequence[str] = DEFAULT_ORDER) -> str | None:
  """Final answer of a model response, or None when none is found.

  Args:
    response: decoded response text (special tokens removed). None / "" give None.
    order: extraction strategies tried in turn, the first non-empty result wins; names from
      `STRATEGIES`: "boxed" (last `\\boxed{}`/`\\fbox{}`, nested braces), "answer_is"
      ("The answer is X." / "Answer: X", after the last marker, to the end of the sentence),
      "hash" ("#### X"), "equals" (the last line's trailing "= X"), "last_number".

  Returns:
    the answer text (LaTeX allowed), with enclosing `$`, `**` and trailing punctuation removed.
  """
  if response is None:
    return None
  if not isinstance(response, str):
    raise TypeError(f"extract_answer: response must be str or None, got {type(response).__name__}")
  for name in order:
    if name not in STRATEGIES:
      raise ValueError(f"extract_answer: unknown strategy {name!r} in order; known: {sorted(STRATEGIES)}")
  text = response[-_MAX_RESPONSE_CHARS:]
  for name in order:
    ans = STRATEGIES[name](text)
    if ans is not None:
      ans = _clean_extracted(ans)
      if ans:
        return ans
  return None


# ----------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "cm|mm|km|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mph|"
    "units?|sq|square|cubic|degrees?|deg|dollars?|cents?|seconds?|sec|minutes?|min|hours?|hrs?|days?|"
    "weeks?|months?|years?|kg|grams?|g|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|"
    "people|students|points|ways|times|percent|%"
)
_UNIT_TAIL = re.compile(
    r"^(?P<num>[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:\\frac\{\d+\}\{\d+\})?)\s*"
    r"(?:(?:\\(?:text|mathrm|mbox|textrm)\s*\{(?P<label>[a-zA-Z ./]*)\})|(?:" + _UNIT_WORDS + r"))"
    r"(?:\^\{?[23]\}?)?\s*$")
# Words that change, bound or hedge the number they follow ("5 or more", "5 not", "5 dozen",
# "5 or seven"): a `\text{...}` label holding one of them is not a unit and is never dropped.
_NOT_A_LABEL = frozenset("""
    or and nor but either neither both versus vs plus minus
    not no none never non without except unless if else otherwise
    more less fewer greater larger bigger higher smaller lower least most than over under above below
    at about around approximately approx roughly nearly almost circa ca ish
    some any all many few several up to from between until till respectively
    maybe perhaps possibly probably likely unlikely guess estimate estimated
    negative squared cubed pi i e infinity infinite undefined
    zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
    half halves dozen dozens hundred hundreds thousand thousands million millions billion billions
    trillion trillions
""".split())
_MAX_LABEL_WORDS = 4


def _is_unit_label(label: str) -> bool:
  """True when the content of a `\\text{...}` after a number names a unit or a counted noun
  ("cm", "square feet", "m/s", "apples"): at most `_MAX_LABEL_WORDS` words of letters, none of
  them in `_NOT_A_LABEL`."""
  words = [w for w in re.split(r"[\s./]+", label.lower()) if w]
  return len(words) <= _MAX_LABEL_WORDS and not any(w in _NOT_A_LABEL for w in words)


_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_ZEROS = re.compile(r"^([-+]?\d+)\.(\d*?)0+$")
_LATEX_SPACING = re.compile(r"(?<!\\)\\[!,;: ]")
_ASSIGNMENT = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?=(?!=)")


def _fix_fracs(s: str) -> str:
  """`\\frac12` -> `\\frac{1}{2}`, `\\frac{a}b` -> `\\frac{a}{b}` (single-token arguments)."""
  s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])", r"\\frac\1{\2}", s)
  s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*(\{[^{}]*\})", r"\\frac{\1}\2", s)
  return s


def normalize_answer(ans: str | int | float) -> str:
  """Canonical string form of an answer for the fast exact-match path (no sympy).

  Removes `$`, `\\left`/`\\right`, LaTeX spacing, `\\text{}` wrappers and trailing units,
  `\\dfrac`/`\\tfrac`, thousands separators, percent and degree signs, `\\$`, a leading
  single-variable assignment ("x = 3" -> "3"), trailing decimal zeros ("27.0" -> "27"),
  multiple-choice parentheses ("(C)" -> "C") and all whitespace.
  """
  s = gold_to_str(ans) if not isinstance(ans, str) else ans
  s = s.strip()
  if len(s) > _MAX_ANSWER_CHARS:
    return s
  boxed = extract_last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
  if boxed is not None:
    s = boxed
  s = s.replace("\n", " ")
  s = _LATEX_SPACING.sub(lambda m: "" if m.group(0) == "\\!" else " ", s)  # not the "\\" row break
  s = s.replace("~", " ")
  s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = s.replace("\\$", "").replace("$", "")
  if s.startswith("\\(") and s.endswith("\\)"):
    s = s[2:-2]
  if s.startswith("\\[") and s.endswith("\\]"):
    s = s[2:-2]
  s = s.strip()
  # Degrees and percent.
  s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
  s = s.replace("\\%", "").replace("%", "")
  s = re.sub(r"\s+percent$", "", s)
  # Trailing unit after a number ("5 \text{ cm}^2", "12 inches").
  m = _UNIT_TAIL.match(s.strip())
  if m and (m.group("label") is None or _is_unit_label(m.group("label"))):
    s = m.group("num")
  # Remaining \text{...} wrappers: keep the content.
  for _ in range(3):
    s2 = _TEXT_CMD.sub(r"\1", s)
    if s2 == s:
      break
    s = s2
  s = s.strip().rstrip(".").strip()
  s = re.sub(r"\s+", "", s)
  s = s.replace("{,}", ",")
  if _THOUSANDS.match(s):
    s = s.replace(",", "")
  s = _ASSIGNMENT.sub("", s)
  s = _fix_fracs(s)
  s = re.sub(r"\\sqrt\s*(\d|[a-zA-Z])", r"\\sqrt{\1}", s)
  m = _DECIMAL_ZEROS.match(s)
  if m:
    s = m.group(1) + ("." + m.group(2) if m.group(2) else "")
  if s.startswith("."):
    s = "0" + s
  elif s.startswith("-."):
    s = "-0" + s[1:]
  if s.startswith("+") and len(s) > 1:
    s = s[1:]
  m = _CHOICE.match(s)
  if m:
    s = m.group(1).upper()
  return s


def gold_to_str(gold: str | int | float) -> str:
  """Gold answer as text: ints as digits, integral floats without ".0" (AMC's "27.0")."""
  if isinstance(gold, bool):
    raise TypeError(f"gold must be str, int or float, got bool ({gold!r})")
  if isinstance(gold, str):
    return gold
  if isinstance(gold, int):
    return str(gold)
  if isinstance(gold, float):
    if not _pymath.isfinite(gold):
      raise ValueError(f"gold must be finite, got {gold!r}")
    return str(int(gold)) if gold.is_integer() else repr(gold)
  try:  # numpy scalars
    import numpy as np
    if isinstance(gold, np.integer):
      return str(int(gold))
    if isinstance(gold, np.floating):
      return gold_to_str(float(gold))
  except ImportError:  # pragma: no cover
    pass
  raise TypeError(f"gold must be str, int or float, got {type(gold).__name__} ({gold!r:.80})")


# ----------------------------------------------------------------------------- equivalence


def _signal_timeout(timeout_s: float | None) -> int | None:
  """math-verify's per-call timeout (whole seconds, signal.alarm): only usable in a main thread."""
  if timeout_s is None or threading.current_thread() is not threading.main_thread():
    return None
  return max(1, int(_pymath.ceil(timeout_s)))


def _math_verify_equal(pred: str, gold: str, timeout_s: float | None) -> bool | None:
  """math-verify equivalence of two answer strings; None when either side does not parse."""
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

  t = _signal_timeout(timeout_s)
  cfg = (LatexExtractionConfig(), ExprExtractionConfig())
  gold_parsed = parse("$" + gold + "$", extraction_config=cfg, parsing_timeout=t)
  if not gold_parsed:
    return None
  pred_parsed = parse("$" + pred + "$", extraction_config=cfg, parsing_timeout=t)
  if not pred_parsed:
    return None
  if _symbols_mismatch(gold_parsed[0], pred_parsed[0]) or _numerically_different(gold_parsed[0], pred_parsed[0]):
    return False
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def _numerically_different(gold, pred) -> bool:
  """True when two scalar expressions certainly differ: their values at the same random point
  (or their constant values) are far apart. Skips sympy's slow `simplify` on wrong answers.
  Only ever decides "different"; anything unclear (sets, relations, matrices, non-finite or
  non-numeric values, close values) returns False and is left to math-verify."""
  from sympy import Expr, Float, Symbol

  if not (isinstance(gold, Expr) and isinstance(pred, Expr)):
    return False
  symbols = sorted(gold.free_symbols | pred.free_symbols, key=str)
  if len(symbols) > 8 or any(not isinstance(x, Symbol) for x in symbols):
    return False
  points = [{}] if not symbols else [
      {x: Float(v) for x, v in zip(symbols, vals)}
      for vals in ([0.5377 + 0.13 * k for k in range(len(symbols))],
                   [1.8327 - 0.21 * k for k in range(len(symbols))])]
  for point in points:
    try:
      a = complex(gold.evalf(20, subs=point) if point else gold.evalf(20))
      b = complex(pred.evalf(20, subs=point) if point else pred.evalf(20))
    except (TypeError, ValueError, ArithmeticError, AttributeError, RecursionError):
      return False
    if not all(_pymath.isfinite(v) for v in (a.real, a.imag, b.real, b.imag)):
      return False
    if abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b)):
      return False  # agrees here (or close): let math-verify decide
  return True


def _symbols_mismatch(gold, pred) -> bool:
  """A constant expression never equals one with free symbols (skips sympy's slow simplify)."""
  from sympy import Expr

  return (isinstance(gold, Expr) and isinstance(pred, Expr)
          and bool(gold.free_symbols) != bool(pred.free_symbols))


_PLAIN_NUMBER = re.compile(r"^-?(?:\\frac\{(\d{1,30})\}\{(\d{1,30})\}|(\d{1,30})/(\d{1,30})|(\d{1,30}(?:\.\d{1,30})?))$")


def _as_number(s: str) -> Fraction | None:
  """A plain integer / decimal / a/b / \\frac{a}{b} (normalised form) as an exact Fraction."""
  m = _PLAIN_NUMBER.match(s)
  if not m:
    return None
  sign = -1 if s.startswith("-") else 1
  num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
  if num is not None:
    if int(den) == 0:
      return None
    return sign * Fraction(int(num), int(den))
  return sign * Fraction(m.group(5))


_NOT_A_NUMBER = re.compile(r",|\\begin|\\cup|\\cap|\\\{|\\infty|=|<|>|\\[lg]eq?\b|\\(?:right|left)arrow|\\to\b")
_LATEX_COMMAND = re.compile(r"\\[a-zA-Z]+")
_FUNCTION_WORDS = re.compile(r"sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|arc|pi")


def _could_be_number(s: str) -> bool:
  """False when the normalised answer `s` is certainly not a single real/complex number:
  a tuple, interval, set, matrix, relation, or an expression with a free variable (a letter
  other than e, i outside LaTeX commands and function names)."""
  if _NOT_A_NUMBER.search(s):
    return False
  bare = _FUNCTION_WORDS.sub("", _LATEX_COMMAND.sub("", s))
  return not re.search(r"[a-df-hj-zA-Z]", bare)


def _numbers_equal(a: Fraction, b: Fraction, decimal: bool) -> bool:
  """`a` (the answer) equals `b` (the gold): exact when the gold is an integer or neither side
  is written as a decimal; else (a non-integer gold, a decimal on either side) to 6 places
  relative, math-verify's float_rounding ("0.333333" for 1/3). An integer gold therefore never
  accepts a decimal that is not equal to it ("1000000.5" for 1000000)."""
  if a == b:
    return True
  return decimal and b.denominator != 1 and abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))


def _fast_equal(pred_n: str, gold_n: str) -> bool | None:
  """Equality of two normalised answers decided without sympy, or None when sympy must decide.

  Decides: equal strings; two plain numbers (integers, decimals, a/b, \\frac{a}{b}: compared as
  rationals, see `_numbers_equal`); a plain number against a tuple, interval, set, matrix,
  relation or an expression with a free variable (never equal); an answer ending in "+" or
  "-" that the gold does not end in (a hedge, "5+" for "5 or more").
  """
  if pred_n == gold_n and pred_n:
    return True
  if pred_n.endswith(("+", "-")) and not gold_n.endswith(pred_n[-1]):
    return False
  pred_num, gold_num = _as_number(pred_n), _as_number(gold_n)
  if pred_num is not None and gold_num is not None:
    return _numbers_equal(pred_num, gold_num, "." in pred_n or "." in gold_n)
  if (pred_num is not None and not _could_be_number(gold_n)) or (
      gold_num is not None and not _could_be_number(pred_n)):
    return False
  return None


def _sympy_equal(pred: str, gold_s: str, timeout_s: float | None) -> bool:
  """Equality of two extracted answers: `_fast_equal` of their normal forms, else math-verify
  (on the normal forms, then on the raw strings when a normal form does not parse). Unbounded
  in time on adversarial LaTeX; `timeout_s` is math-verify's soft, main-thread-only limit."""
  pred_n, gold_n = normalize_answer(pred), normalize_answer(gold_s)
  fast = _fast_equal(pred_n, gold_n)
  if fast is not None:
    return fast
  eq = _math_verify_equal(pred_n, gold_n, timeout_s)
  if eq is None and (pred_n, gold_n) != (pred, gold_s):
    eq = _math_verify_equal(pred, gold_s, timeout_s)  # normalisation may have broken the LaTeX
  return bool(eq)


# ----------------------------------------------------------------------------- the label


def score_in_process(response: str | None, gold: str | int | float, *, order: Sequence[str] = DEFAULT_ORDER,
                     timeout_s: float | None = 5.0,
                     sympy_equal: Callable[[str, str, float | None], bool] | None = None) -> float:
  """Outcome label of one math response (see `verifiers.math.score`), decided in this process.

  Validates `gold` and `timeout_s`, extracts the answer, and decides the plain-number / string
  cases here; the rest goes to `sympy_equal(pred, gold, timeout_s)`, by default `_sympy_equal`
  in this process under math-verify's soft limit only. `verifiers.math.score` passes its
  isolated child process instead.

  Returns:
    1.0 or 0.0 (python float).
  """
  gold_s = gold_to_str(gold).strip()
  if not gold_s:
    raise ValueError("score: gold answer is empty")
  if timeout_s is not None and not (timeout_s > 0 and _pymath.isfinite(timeout_s)):
    raise ValueError(f"score: timeout_s must be a finite number > 0 or None, got {timeout_s}")
  pred = extract_answer(response, order)
  if pred is None or len(pred) > _MAX_ANSWER_CHARS:
    return 0.0
  # Gold may itself be given boxed (e.g. a solution line); compare its content.
  if gold_s.startswith(("\\boxed", "\\fbox")):
    gold_s = extract_last_boxed(gold_s) or gold_s
  fast = _fast_equal(normalize_answer(pred), normalize_answer(gold_s))
  if fast is not None:  # most answers, right or wrong, end here
    return float(fast)
  return float((sympy_equal or _sympy_equal)(pred, gold_s, timeout_s))
