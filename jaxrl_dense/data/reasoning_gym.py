"""reasoning-gym tasks as prompt sources: `--train_data=rg:<task>[:k=v,...]` (and `--eval_data`).

    rg:basic_arithmetic:size=64,seed=0
    rg:chain_sum:min_terms=2,max_terms=3,size=32,seed=1
    'rg:basic_arithmetic:operators=+|-,size=200'      (list values: items separated by '|')

The spec syntax, the option typing and the scoring live in `jaxrl_dense.verifiers.rg` (the
verifier process pool imports that module, not this package). Here each of the spec's `size`
entries becomes one `PromptRecord`:

  * user turn: the entry's question, a blank line, then `verifiers.rg.ANSWER_INSTRUCTION` (answer
    between <answer> and </answer> tags, the format reasoning-gym's own prompts ask for and its
    `extract_answer` reads); preceded by a system message when `system_prompt` is given;
  * gold: JSON {"rg": canonical spec, "index": i, "answer": the entry's answer, "q": question
    hash}, from which the "rg" verifier re-creates the entry and calls the task's `score_answer`;
  * verifier "rg" (so the records route to that verifier, whatever the data_source);
    data_source "rg:<task>"; uid "rg:<task>:<seed>:<index>".

The same spec gives the same records (reasoning-gym seeds entry i from seed + i).

Public API: `is_source(spec)`, `load_source(spec, *, system_prompt=None, limit=None)`.
"""
from __future__ import annotations

from typing import Optional

from jaxrl_dense.data.records import PromptRecord

__all__ = ["is_source", "load_source", "to_record"]


def is_source(spec) -> bool:
  """True for 'rg:...' prompt-source names (this module's)."""
  from jaxrl_dense.verifiers import rg
  return rg.is_spec(str(spec))


def to_record(spec, index: int, item: dict, system_prompt: Optional[str] = None) -> PromptRecord:
  """The PromptRecord of entry `index` (`item`, a reasoning-gym entry) of a parsed spec."""
  from jaxrl_dense.verifiers import rg
  question = str(item["question"]).strip()
  msgs = []
  if system_prompt:
    msgs.append({"role": "system", "content": system_prompt})
  msgs.append({"role": "user", "content": f"{question}\n\n{rg.ANSWER_INSTRUCTION}"})
  return PromptRecord(prompt_messages=tuple(msgs), gold=rg.encode_gold(spec, index, item),
                      data_source=f"rg:{spec.task}", uid=f"rg:{spec.task}:{spec.seed}:{index}",
                      verifier="rg")


def load_source(spec: str, *, system_prompt: Optional[str] = None,
                limit: Optional[int] = None) -> list:
  """The records of an 'rg:<task>[:k=v,...]' source (the first `limit` entries when given).

  Raises ValueError naming the spec (unknown task/option, bad value, a config the task refuses)
  and ImportError with the install line when reasoning-gym is missing.
  """
  from jaxrl_dense.verifiers import rg
  parsed = rg.parse_spec(spec)
  ds = rg.dataset(parsed)
  n = len(ds) if limit is None else min(limit, len(ds))
  records = []
  for i in range(n):
    try:
      item = ds[i]
    except Exception as e:  # a task generator that fails on this config: name the spec
      raise ValueError(f"prompt source {spec!r}: reasoning-gym could not generate entry {i}: "
                       f"{type(e).__name__}: {e}") from None
    records.append(to_record(parsed, i, item, system_prompt))
  return records
