"""Outcome verifiers: the labels r_o(y) PRIME learns from (math answers, code tests).

  * `math.score(response, gold)`: answer extraction + normalised-string / math-verify equality.
  * `code.score(response, tests)`: last ```python block against tests in a sandbox.
  * `verify_batch(responses, golds, kind="math", timeout_s=5.0, workers=None)` and the reusable
    `VerifierPool`: the same checks in worker processes, each item under a hard wall-clock limit.
  * `datasets`: shipped math eval/train sets as (prompt, gold) records.
"""
from jaxrl_dense.verifiers import code, datasets, math
from jaxrl_dense.verifiers.math import extract_answer
from jaxrl_dense.verifiers.pool import VerifierPool, VerifyStats, get_pool, verify_batch

__all__ = ["VerifierPool", "VerifyStats", "code", "datasets", "extract_answer", "get_pool", "math",
           "verify_batch"]
