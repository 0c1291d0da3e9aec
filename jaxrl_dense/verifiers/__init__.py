"""Outcome verifiers: the labels r_o(y) PRIME learns from (math answers, code tests).

  * `math.score(response, gold)`: answer extraction + normalised-string / math-verify equality.
  * `code.score(response, tests)`: last ```python block against tests in a sandbox.
  * `verify_batch(responses, golds, kind="math", timeout_s=5.0, workers=None)` and the reusable
    `VerifierPool`: the same checks in worker processes, each item under a hard wall-clock limit.
  * `datasets`: shipped math eval/train sets as (prompt, gold) records.
  * `rg.score(response, gold)`: a reasoning-gym task's own checker on the <answer> text
    (records of `rg:<task>` sources; optional extra `jaxrl_dense[rg]`).
  * `kind_of_source(data_source)`: "code", "rg" or "math", routed by data source as veRL does.
"""
from jaxrl_dense.verifiers import code, datasets, math, rg
from jaxrl_dense.verifiers.dispatch import CODE_SOURCES, RG_SOURCES, kind_of_source, kinds_of_sources
from jaxrl_dense.verifiers.math import extract_answer
from jaxrl_dense.verifiers.pool import VerifierPool, VerifyStats, get_pool, verify_batch

__all__ = ["CODE_SOURCES", "RG_SOURCES", "VerifierPool", "VerifyStats", "code", "datasets", "extract_answer",
           "get_pool", "kind_of_source", "kinds_of_sources", "math", "rg", "verify_batch"]
