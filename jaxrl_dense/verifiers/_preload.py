"""Imported once by the pool's fork server: loads math-verify / sympy and warms up the LaTeX
parser (ANTLR builds its prediction tables lazily: the first parse of each construct costs
10-1000 ms), so that every worker forked from it, including replacements of killed workers,
starts warm."""
from jaxrl_dense.verifiers import code as _code  # noqa: F401  (imported once, for every worker)
from jaxrl_dense.verifiers import sandbox as _sandbox
from jaxrl_dense.verifiers import math_answers as _math_answers

_WARMUP = (
    ("\\frac{1}{2}", "0.5"), ("(1,2)", "(1, 2)"), ("x^2+1", "1+x^2"), ("[0, 1)", "(0,1]"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "4"), ("(-\\infty, 3] \\cup (5, \\infty)", "x"),
    ("\\{1, 2\\}", "\\{2, 1\\}"), ("3+4i", "4i+3"), ("1011_2", "11"), ("3\\pm 2\\sqrt{2}", "1"),
    ("\\frac{3\\pi}{4}", "135^\\circ"), ("\\log_2 5", "\\ln 5"), ("\\sin x", "\\cos x"),
    ("y = 2x + 3", "2x+3"), ("1 < x < 2", "(1,2)"), ("\\text{east}", "east"), ("a_1 + b", "c"),
    ("2^{10}", "1024"), ("\\binom{5}{2}", "10"), ("5!", "120"), ("e^{2}", "7.389"), ("|x-1|", "2"),
)
for _gold, _pred in _WARMUP:
  _math_answers.score_in_process("\\boxed{" + _pred + "}", _gold)  # in the fork server itself
_sandbox.bwrap_available()  # probe bubblewrap once; forked workers inherit the cached answer
