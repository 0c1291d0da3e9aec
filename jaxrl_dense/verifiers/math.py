"""Math outcome verifier: answer extraction + equivalence (PRIME, arXiv 2502.01456; Eurus-2 / prime_math).

The outcome label of a math rollout is

    r_o(y, a*) = 1[ equiv(extract_answer(y), a*) ]  in {0.0, 1.0}

(extraction, normalisation and equivalence: `verifiers.math_answers`, re-exported here).

`score` is a pure function of its inputs. sympy may hang on adversarial LaTeX, in GMP code
that no signal interrupts, so `score` runs the sympy step in a warm child process that is
killed after `timeout_s` (the string and plain-number decisions, most answers, stay in this
process). For batches use `jaxrl_dense.verifiers.VerifierPool` / `verify_batch`: the same hard
limit per item, on several worker processes. math-verify's own (soft) timeout uses
`signal.alarm`, which works only in a main thread; `score` enables it only there.

The pool's workers score with `math_answers` (never with this module), so the isolation worker
below, a 1-worker `VerifierPool`, makes no import loop.
"""
from __future__ import annotations

import atexit
import os
import threading
from typing import Sequence

from jaxrl_dense.verifiers.math_answers import (DEFAULT_ORDER, STRATEGIES, extract_answer, extract_last_boxed,
                                                gold_to_str, normalize_answer, score_in_process)

__all__ = ["DEFAULT_ORDER", "STRATEGIES", "extract_answer", "extract_last_boxed", "gold_to_str", "normalize_answer",
           "score"]


# ----------------------------------------------------------------------------- hard time limit

# One warm worker process (a 1-worker `VerifierPool`) per process, started on the first answer
# that needs sympy; it runs `_sympy_equal` and is SIGKILLed (and replaced) past the time limit.
_ISOLATED_POOL = None
_ISOLATED_LOCK = threading.Lock()
# The first start waits for the pool's fork server to import and warm up math-verify (seconds).
_ISOLATED_START_TIMEOUT_S = 300.0


def _isolated_pool():
  """The process's isolation pool, started (and waited for) on first use."""
  global _ISOLATED_POOL
  with _ISOLATED_LOCK:
    if _ISOLATED_POOL is None or _ISOLATED_POOL.closed:
      from jaxrl_dense.verifiers.pool import VerifierPool
      pool = VerifierPool(workers=1)
      ok = pool._verify_math_answers(["1"], ["1"], _ISOLATED_START_TIMEOUT_S)  # worker is up
      if ok[0] != 1.0:
        pool.close()
        raise RuntimeError(f"math.score: the isolation worker failed to start: {pool.last_stats.statuses}")
      _ISOLATED_POOL = pool
    return _ISOLATED_POOL


def _close_isolated_pool() -> None:
  global _ISOLATED_POOL
  if _ISOLATED_POOL is not None:
    _ISOLATED_POOL.close()
    _ISOLATED_POOL = None


def _forget_isolated_pool_in_child() -> None:
  """After os.fork: the parent's pool (workers, pipes) is not ours; drop it without closing it."""
  global _ISOLATED_POOL, _ISOLATED_LOCK
  if _ISOLATED_POOL is not None:
    _ISOLATED_POOL._abandon()  # its __del__ must not stop the parent's worker
  _ISOLATED_POOL = None
  _ISOLATED_LOCK = threading.Lock()


atexit.register(_close_isolated_pool)
os.register_at_fork(after_in_child=_forget_isolated_pool_in_child)


def _isolated_sympy_equal(pred: str, gold_s: str, timeout_s: float) -> float:
  """`_sympy_equal` in the isolation worker, killed (and replaced) after `timeout_s`: 0.0 then."""
  return _isolated_pool()._verify_math_answers([pred], [gold_s], timeout_s)[0]


def _can_have_children() -> bool:
  """Daemonic multiprocessing processes (e.g. the pool's own workers) may not start processes."""
  import multiprocessing as mp
  return not mp.current_process().daemon


def score(response: str | None, gold: str | int | float, *, order: Sequence[str] = DEFAULT_ORDER,
          timeout_s: float | None = 5.0, isolate: bool = True) -> float:
  """Outcome label of one math response: 1.0 if its final answer equals `gold`, else 0.0.

    score = 1[ norm(a) == norm(a*)  or  math_verify(a, a*) ],  a = extract_answer(response)

  where two plain numbers (integers, decimals, a/b, \\frac{a}{b}) are compared exactly as
  rationals without sympy (decimals to 6 places, only when the gold is not an integer), and a
  plain number never equals a tuple, interval, set, matrix, relation or an expression with a
  free variable. A number followed by a unit ("5 cm", "5 \\text{ apples}") is the number, but
  a label that bounds or hedges it ("5 \\text{ or more}", "5 \\text{ not}") is not a unit
  (see `math_answers._NOT_A_LABEL`), and such an answer scores 0.

  Time: extraction, normalisation and the plain-number / string decisions run in this process
  (linear in the capped input). Answers that need sympy / math-verify run, with `isolate`, in a
  warm child process (one per process, started on first need, shared by threads) that is
  SIGKILLed after `timeout_s`: a call returns within about `timeout_s` (plus the one-time start)
  even on LaTeX such as `\\sin(10^{10^{6}})` whose GMP arithmetic no signal interrupts.

  Args:
    response: decoded response text; None / "" / no extractable answer -> 0.0.
    gold: the reference answer (LaTeX string, or an int / float such as AMC's 27.0).
    order: extraction order, see `extract_answer`.
    timeout_s: hard wall-clock limit (seconds) of the sympy step, after which it scores 0.0;
      None: no limit (runs in this process). Also bounds each math-verify call softly
      (`signal.alarm`, main thread only), at `max(1, timeout_s / 2)` in the child.
    isolate: run the sympy step in the child process (default). False: in this process, with
      only the soft limit; for callers that enforce a hard limit themselves (`VerifierPool`'s
      workers). In a daemonic process, which may not start children, it is always False.

  Returns:
    1.0 or 0.0 (python float).
  """
  isolated = isolate and timeout_s is not None and _can_have_children()
  return score_in_process(response, gold, order=order, timeout_s=timeout_s,
                          sympy_equal=_isolated_sympy_equal if isolated else None)
