"""Which verifier scores a record: routing by `data_source`, as veRL's PRIME reward manager does.

veRL (`verl/utils/reward_score/__init__.py`, `default_compute_score`) sends the code sources of
Eurus-2-RL-Data (`codecontests`, `apps`, `codeforces`, `taco`) to `prime_code` (fraction of the
first <= 10 tests passed) and the math sources (`numina_*`, `lighteval/MATH`,
`openai/gsm8k`, ...) to `prime_math`. We route the same names the same way, by exact name only
(never by substring: `unicode_math` is math), and everything else to math. A row chooses its
verifier explicitly with a `verifier` field ("code" / "math"; `PromptRecord.verifier_source`
passes it here in place of the data_source), so other code datasets need no name list. The
explicit kind "rg" (records of `rg:<task>` sources, `jaxrl_dense.data.reasoning_gym`) routes to
the reasoning-gym task's own checker (`verifiers.rg`).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["CODE_SOURCES", "RG_SOURCES", "kind_of_source", "kinds_of_sources"]

# Eurus-2-RL-Data's code sources, routed to prime_code by veRL, and the explicit kind "code".
CODE_SOURCES = frozenset({"codecontests", "apps", "codeforces", "taco", "code"})
# The explicit kind "rg": a reasoning-gym task's `score_answer` (`verifiers.rg`).
RG_SOURCES = frozenset({"rg"})


def kind_of_source(data_source: str | None) -> str:
  """"code" for veRL's code sources and the explicit kind "code", "rg" for the explicit kind
  "rg" (exact names), else "math".

  Args:
    data_source: the record's `data_source` (veRL parquet column); None or "" means math.
  """
  if data_source is not None and not isinstance(data_source, str):
    raise TypeError(f"data_source must be a str or None, got {type(data_source).__name__}")
  s = (data_source or "").strip().lower()
  if s in CODE_SOURCES:
    return "code"
  return "rg" if s in RG_SOURCES else "math"


def kinds_of_sources(data_sources: Sequence[str | None]) -> list[str]:
  """`kind_of_source` of each source."""
  return [kind_of_source(s) for s in data_sources]
