"""`PromptRecord`: one RL prompt, the record every prompt source produces.

The readers (`data.prompts`) and the generated tasks (`data.arithmetic`, `data.chain_arith`,
`data.reasoning_gym`) all build these; this module imports none of them.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

__all__ = ["PromptRecord", "VERIFIER_KINDS"]

# Explicit verifier kinds of a record / row (`verifiers.pool.KINDS`).
VERIFIER_KINDS = ("math", "code", "rg")


@dataclasses.dataclass(frozen=True, eq=True)
class PromptRecord:
  """One RL prompt.

  Attributes:
    prompt_messages: chat messages, a tuple of `{"role": str, "content": str}` dicts, ending
      with the user turn the policy answers.
    gold: reference answer (string) handed to the verifier.
    data_source: dataset name (veRL's `data_source`), e.g. "arithmetic", "math500_test".
    uid: stable identifier, unique within its dataset (e.g. "gsm8k_test:17").
    verifier: "math", "code" or "rg" to choose the verifier explicitly (a row's `verifier`
      field; "rg": a reasoning-gym task's checker, gold = `verifiers.rg` JSON); None routes by
      the exact `data_source` name (`verifiers.kind_of_source`).
    gold_calls: reference tool calls `({"name": str, "arguments": {...}}, ...)` of a solution
      (MatchTIR's matching target, --advantage=matchtir), or None.
  """

  prompt_messages: tuple
  gold: str
  data_source: str
  uid: str
  verifier: Optional[str] = None
  gold_calls: Optional[tuple] = None

  def __post_init__(self):
    msgs = self.prompt_messages
    if isinstance(msgs, list):
      object.__setattr__(self, "prompt_messages", tuple(msgs))
      msgs = self.prompt_messages
    if not isinstance(msgs, tuple) or not msgs:
      raise ValueError(f"PromptRecord {self.uid!r}: prompt_messages must be a non-empty "
                       f"sequence of messages, got {type(msgs).__name__} {msgs!r:.80}")
    for m in msgs:
      if not (type(m) is dict or isinstance(m, Mapping)) or type(m.get("role")) is not str or \
          type(m.get("content")) is not str:
        raise ValueError(f"PromptRecord {self.uid!r}: each message must be a dict with string "
                         f"'role' and 'content', got {m!r:.120}")
    if not isinstance(self.gold, str):
      raise ValueError(f"PromptRecord {self.uid!r}: gold must be a str, got "
                       f"{type(self.gold).__name__}")
    if self.gold_calls is not None:
      calls = tuple(self.gold_calls)
      if not all(isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in calls):
        raise ValueError(f"PromptRecord {self.uid!r}: gold_calls must be dicts with a string 'name', "
                         f"got {calls!r:.120}")
      object.__setattr__(self, "gold_calls", calls)
    if self.verifier is not None and self.verifier not in VERIFIER_KINDS:
      raise ValueError(f"PromptRecord {self.uid!r}: verifier must be one of {VERIFIER_KINDS} or None, "
                       f"got {self.verifier!r:.40}")

  @property
  def verifier_source(self) -> str:
    """What the verifier routes on: the explicit kind ("math"/"code"/"rg") or the data_source."""
    return self.verifier or self.data_source

  @property
  def question(self) -> str:
    """The content of the last user message (handy for reports)."""
    for m in reversed(self.prompt_messages):
      if m["role"] == "user":
        return m["content"]
    return self.prompt_messages[-1]["content"]

  def to_json(self) -> dict:
    out = {"prompt": [dict(m) for m in self.prompt_messages], "gold": self.gold,
           "data_source": self.data_source, "uid": self.uid}
    if self.verifier is not None:
      out["verifier"] = self.verifier
    return out
