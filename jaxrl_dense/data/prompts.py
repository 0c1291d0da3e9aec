"""Prompt datasets: one record type, readers for jsonl / parquet / the shipped math sets.

Public API
----------
`PromptRecord(prompt_messages, gold, data_source, uid)`
    One RL prompt. `prompt_messages` is a tuple of chat messages `{"role", "content"}` (the
    tokenizer's chat template turns it into tokens, see `data.batching`); `gold` is the
    reference answer as a string (what the verifier compares against); `data_source` names the
    dataset (veRL's column; verifiers may dispatch on it); `uid` is a stable id, unique within
    a dataset.

`load_prompts(source, *, instruction=None, system_prompt=None, data_source=None, limit=None)`
    -> list[PromptRecord]. `source` is a `.jsonl` / `.json` (one object per line) or `.parquet`
    path, or the name of a shipped math set (`SHIPPED_DATASETS`, read through
    `jaxrl_dense.verifiers.datasets`).

`load_jsonl(path, ...)`, `load_parquet(path, ...)`: the two readers behind `load_prompts`.

`PromptDataError(ValueError)`: raised for a malformed file or row; the message names the file
and the 1-based line (jsonl) or 0-based row (parquet) and what is wrong.

Accepted row layouts (per row, auto-detected)
---------------------------------------------
* veRL / Eurus-2-RL-Data parquet (or jsonl with the same fields):
  `prompt`: list of `{"role", "content"}` messages; `reward_model`: `{"ground_truth": ...}`
  (a JSON-encoded string is accepted too); optional `data_source`; optional
  `extra_info.index` (used for the uid).
* plain: `problem` or `question` (str) and `answer` (str or number). The user message is the
  problem text, followed by `instruction` when given (e.g. `BOXED_INSTRUCTION`), preceded by a
  `system_prompt` message when given. For veRL rows the messages are used as they are
  (`instruction` / `system_prompt` are not applied: the prompt is already formatted).

Golds are kept as strings: a number becomes `str(value)` (AMC's 27.0 -> "27.0"); the math
verifier compares answers semantically, so such formatting does not matter there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional

# The record type lives in `data/records.py` (the task modules import it from there, so that this
# module can load their sources without an import loop); re-exported here under the same names.
from jaxrl_dense.data.records import VERIFIER_KINDS, PromptRecord

# Appended to plain math problems (PRIME's instruction, as in Eurus-2-RL-Data and
# `jaxrl_dense.verifiers.datasets.PRIME_MATH_SUFFIX`).
BOXED_INSTRUCTION = "Present the answer in LaTex format: \\boxed{Your answer}"

# Names accepted by `load_prompts` for the math sets shipped in `jaxrl_dense/data/datasets/`.
# (The names of `jaxrl_dense.verifiers.datasets.DATASETS`; "math500_test" is accepted for
# "math500", after its file name.)
SHIPPED_DATASETS = (
    "gsm8k_train", "gsm8k_test", "math_train", "math500", "aime24", "amc23",
    "minerva_math", "olympiadbench", "aimo_validation_aime", "aimo_validation_amc",
)
_ALIASES = {"math500_test": "math500"}

DATASETS_DIR = pathlib.Path(__file__).resolve().parent / "datasets"

_VALID_ROLES = ("system", "user", "assistant", "tool")



class PromptDataError(ValueError):
  """A prompt file or row is malformed; the message names the file and line/row."""


def with_system_instruction(record: PromptRecord, text: str) -> PromptRecord:
  """The record with `text` appended to its system message (a system message is added first when
  it has none), e.g. a tool environment's call format."""
  msgs = list(record.prompt_messages)
  if msgs and msgs[0]["role"] == "system":
    msgs[0] = {**msgs[0], "content": (msgs[0]["content"].rstrip() + "\n\n" + text).strip()}
  else:
    msgs.insert(0, {"role": "system", "content": text})
  return dataclasses.replace(record, prompt_messages=tuple(msgs))


def _gold_to_str(value: Any, where: str) -> str:
  if isinstance(value, bool) or value is None:
    raise PromptDataError(f"{where}: the answer must be a string or a number, got {value!r}")
  if isinstance(value, (int, float, str)):
    text = str(value).strip()
    if not text:
      raise PromptDataError(f"{where}: the answer is empty")
    return text
  if isinstance(value, (list, tuple)) and value and all(
      isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
    # veRL ground truths are occasionally lists of acceptable answers; keep them JSON-encoded.
    return json.dumps(list(value))
  raise PromptDataError(f"{where}: the answer must be a string or a number, got "
                        f"{type(value).__name__} {value!r:.80}")


def _check_messages(messages: Any, where: str) -> tuple:
  if isinstance(messages, str):
    try:
      messages = json.loads(messages)
    except json.JSONDecodeError as e:
      raise PromptDataError(f"{where}: 'prompt' is a string that is not a JSON list of chat "
                            f"messages ({e})") from None
  # pyarrow may hand back numpy arrays for list columns when read via pandas; accept sequences.
  if hasattr(messages, "tolist") and not isinstance(messages, (list, tuple)):
    messages = messages.tolist()
  if not isinstance(messages, (list, tuple)) or not messages:
    raise PromptDataError(f"{where}: 'prompt' must be a non-empty list of chat messages, got "
                          f"{type(messages).__name__}")
  out = []
  for k, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise PromptDataError(f"{where}: prompt message {k} is {type(m).__name__}, expected a dict "
                            f"with 'role' and 'content'")
    role, content = m.get("role"), m.get("content")
    if role not in _VALID_ROLES:
      raise PromptDataError(f"{where}: prompt message {k} has role {role!r}; expected one of "
                            f"{_VALID_ROLES}")
    if not isinstance(content, str) or not content.strip():
      raise PromptDataError(f"{where}: prompt message {k} ({role}) has no text content")
    out.append({"role": role, "content": content})
  if out[-1]["role"] != "user":
    raise PromptDataError(f"{where}: the last prompt message must be the user's turn, got "
                          f"{out[-1]['role']!r}")
  return tuple(out)


def _plain_messages(text: str, instruction: Optional[str], system_prompt: Optional[str]) -> tuple:
  content = text.strip()
  if instruction:
    content = f"{content}\n\n{instruction}" if content else instruction
  msgs = []
  if system_prompt:
    msgs.append({"role": "system", "content": system_prompt})
  msgs.append({"role": "user", "content": content})
  return tuple(msgs)


def _is_chat_prompt(value: Any) -> bool:
  """veRL layout: `prompt` is a list of messages (or a JSON string of one)."""
  if value is None:
    return False
  if isinstance(value, str):
    return value.lstrip().startswith("[")
  return isinstance(value, (list, tuple)) or hasattr(value, "tolist")


def record_from_row(row: Mapping[str, Any], *, where: str, default_source: str, default_uid: str,
                    instruction: Optional[str] = None, system_prompt: Optional[str] = None,
                    data_source: Optional[str] = None) -> PromptRecord:
  """Turns one row (veRL or plain layout, see the module docstring) into a `PromptRecord`.

  Args:
    row: the decoded row.
    where: "file line N" / "file row N", used in error messages.
    default_source: data_source when the row has none (the file stem).
    default_uid: uid when the row has no `extra_info.index` / `id` / `uid`.
    instruction, system_prompt: applied to plain rows only.
    data_source: overrides the row's data_source when given.
  Raises:
    PromptDataError naming `where` and what is wrong.
  """
  if not isinstance(row, Mapping):
    raise PromptDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if _is_chat_prompt(row.get("prompt")):
    messages = _check_messages(row["prompt"], where)
    rm = row.get("reward_model")
    if isinstance(rm, str):
      try:
        rm = json.loads(rm)
      except json.JSONDecodeError:
        raise PromptDataError(f"{where}: 'reward_model' is a string that is not JSON") from None
    if isinstance(rm, Mapping) and "ground_truth" in rm:
      gold = _gold_to_str(rm["ground_truth"], f"{where} (reward_model.ground_truth)")
    elif "answer" in row:
      gold = _gold_to_str(row["answer"], f"{where} (answer)")
    else:
      raise PromptDataError(f"{where}: veRL-style row (chat 'prompt') has no "
                            f"'reward_model.ground_truth' and no 'answer'")
  else:
    text = None
    for key in ("problem", "question", "prompt"):
      if isinstance(row.get(key), str) and row[key].strip():
        text = row[key]
        break
    if text is None:
      raise PromptDataError(f"{where}: no prompt found: expected a veRL 'prompt' list of chat "
                            f"messages, or a non-empty 'problem'/'question' string; keys are "
                            f"{sorted(row)}")
    if "answer" not in row:
      rm = row.get("reward_model")
      if isinstance(rm, Mapping) and "ground_truth" in rm:
        gold = _gold_to_str(rm["ground_truth"], f"{where} (reward_model.ground_truth)")
      else:
        raise PromptDataError(f"{where}: missing 'answer' (keys are {sorted(row)})")
    else:
      gold = _gold_to_str(row["answer"], f"{where} (answer)")
    messages = _plain_messages(text, instruction, system_prompt)
  src = data_source or row.get("data_source") or default_source
  if not isinstance(src, str):
    raise PromptDataError(f"{where}: 'data_source' must be a string, got {src!r:.60}")
  uid = None
  extra = row.get("extra_info")
  if isinstance(extra, Mapping) and extra.get("index") is not None:
    uid = f"{src}:{extra['index']}"
  elif row.get("uid") is not None:
    uid = str(row["uid"])
  elif row.get("id") is not None:
    uid = f"{src}:{row['id']}"
  if uid is None:
    uid = default_uid
  verifier = row.get("verifier")
  if verifier is not None and verifier not in VERIFIER_KINDS:
    raise PromptDataError(f"{where}: 'verifier' must be one of {VERIFIER_KINDS}, got {verifier!r:.40}")
  record = PromptRecord(prompt_messages=messages, gold=gold, data_source=src, uid=uid, verifier=verifier)
  from jaxrl_dense.verifiers import code as code_verifier
  from jaxrl_dense.verifiers import dispatch
  if dispatch.kind_of_source(record.verifier_source) == "code":
    try:  # a code row's gold must be tests: refuse it here, not by scoring every program 1 or 0
      code_verifier.normalize_tests(gold)
    except (ValueError, TypeError) as e:
      raise PromptDataError(f"{where}: routed to the code verifier (data_source {src!r}"
                            f"{', verifier code' if verifier else ''}) but its gold is not a test "
                            f"spec: {e}") from None
  return record


def _dedupe_uids(records: list, path: str) -> list:
  seen: dict = {}
  out = []
  for r in records:
    if r.uid in seen:
      seen[r.uid] += 1
      r = dataclasses.replace(r, uid=f"{r.uid}#{seen[r.uid]}")
    else:
      seen[r.uid] = 0
    out.append(r)
  return out


def load_jsonl(path: str | os.PathLike, *, instruction: Optional[str] = None,
               system_prompt: Optional[str] = None, data_source: Optional[str] = None,
               limit: Optional[int] = None) -> list:
  """Reads a JSON-lines prompt file (one object per line; blank lines skipped).

  Raises PromptDataError("<path> line <n>: ...") for undecodable JSON or a malformed row.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
  stem = path.stem
  records = []
  with open(path, "r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path} line {lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      records.append(record_from_row(row, where=where, default_source=stem,
                                     default_uid=f"{stem}:{len(records)}", instruction=instruction,
                                     system_prompt=system_prompt, data_source=data_source))
      if limit is not None and len(records) >= limit:
        break
  if not records:
    raise PromptDataError(f"{path}: no rows")
  return _dedupe_uids(records, str(path))


def load_parquet(path: str | os.PathLike, *, instruction: Optional[str] = None,
                 system_prompt: Optional[str] = None, data_source: Optional[str] = None,
                 limit: Optional[int] = None) -> list:
  """Reads a parquet prompt file (veRL / Eurus-2-RL-Data columns, or plain problem/answer).

  Raises PromptDataError("<path> row <i>: ...") (0-based row index) for a malformed row.
  """
  import pyarrow.parquet as pq  # local import: pyarrow is heavy and only needed here

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid & co.
    raise PromptDataError(f"{path}: not a readable parquet file ({e})") from None
  stem = path.stem
  records = []
  row_index = 0
  for batch in pf.iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      where = f"{path} row {row_index}"
      records.append(record_from_row(row, where=where, default_source=stem,
                                     default_uid=f"{stem}:{row_index}", instruction=instruction,
                                     system_prompt=system_prompt, data_source=data_source))
      row_index += 1
      if limit is not None and len(records) >= limit:
        return _dedupe_uids(records, str(path))
  if not records:
    raise PromptDataError(f"{path}: no rows")
  return _dedupe_uids(records, str(path))


def load_shipped(name: str, *, instruction: Optional[str] = BOXED_INSTRUCTION,
                 system_prompt: Optional[str] = None, limit: Optional[int] = None) -> list:
  """Loads one of `SHIPPED_DATASETS` through `jaxrl_dense.verifiers.datasets.load`.

  The verifier package's adapters know each file's schema (GSM8K's "#### N", Minerva's last
  `\\boxed{}`, OlympiadBench's list-valued answers) and yield `MathRecord(prompt, gold, source,
  id)`; each becomes a plain-layout record (problem text + `instruction` as the user turn).
  """
  name = _ALIASES.get(name, name)
  if name not in SHIPPED_DATASETS:
    raise ValueError(f"unknown shipped dataset {name!r}; expected one of {SHIPPED_DATASETS}")
  from jaxrl_dense.verifiers import datasets as vdatasets  # verifiers import data, not vice versa

  records = []
  for i, item in enumerate(vdatasets.load(name)):
    records.append(PromptRecord(
        prompt_messages=_plain_messages(item.prompt, instruction, system_prompt),
        gold=_gold_to_str(item.gold, f"shipped dataset {name} item {i}"),
        data_source=name,
        uid=str(item.id) if str(item.id).startswith(name) else f"{name}:{item.id}"))
    if limit is not None and len(records) >= limit:
      break
  if not records:
    raise PromptDataError(f"shipped dataset {name}: no rows")
  return _dedupe_uids(records, name)


def load_prompts(source: str | os.PathLike, *, instruction: Optional[str] = None,
                 system_prompt: Optional[str] = None, data_source: Optional[str] = None,
                 limit: Optional[int] = None) -> list:
  """Loads prompts from a path (`.jsonl`/`.json`/`.parquet`) or a shipped dataset name.

  For shipped names, `instruction=None` means `BOXED_INSTRUCTION`. The generated chained-
  arithmetic task is loaded by name too: `chain_arith:train` / `chain_arith:eval[:k=v,...]`
  (see `jaxrl_dense.data.chain_arith.parse_source`; `instruction` is not applied to it), and so
  are reasoning-gym tasks: `rg:<task>[:k=v,...]` (see `jaxrl_dense.data.reasoning_gym`; the
  optional extra `pip install jaxrl_dense[rg]`; `instruction` is not applied: the records carry
  their own <answer>-tag instruction).
  """
  if limit is not None and limit <= 0:
    raise ValueError(f"limit must be positive, got {limit}")
  s = str(source)
  from jaxrl_dense.data import chain_arith  # generated task: 'chain_arith:train|eval[:k=v,...]'
  if chain_arith.is_source(s):
    return chain_arith.load_source(s, system_prompt=system_prompt, limit=limit)
  from jaxrl_dense.data import reasoning_gym  # generated tasks: 'rg:<task>[:k=v,...]'
  if reasoning_gym.is_source(s):
    return reasoning_gym.load_source(s, system_prompt=system_prompt, limit=limit)
  if s in SHIPPED_DATASETS or s in _ALIASES:
    return load_shipped(s, instruction=BOXED_INSTRUCTION if instruction is None else instruction,
                        system_prompt=system_prompt, limit=limit)
  suffix = pathlib.Path(s).suffix.lower()
  kw = dict(instruction=instruction, system_prompt=system_prompt, data_source=data_source,
            limit=limit)
  if suffix in (".jsonl", ".json"):
    return load_jsonl(s, **kw)
  if suffix in (".parquet", ".pq"):
    return load_parquet(s, **kw)
  raise ValueError(f"prompt source {s!r}: expected a .jsonl/.json/.parquet path, one of the "
                   f"shipped datasets {SHIPPED_DATASETS}, 'chain_arith:<split>[:...]' or "
                   f"'rg:<task>[:...]'")


def write_jsonl(records: Iterable[PromptRecord], path: str | os.PathLike) -> None:
  """Writes records in the veRL-like jsonl layout that `load_jsonl` reads back."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps({"prompt": [dict(m) for m in r.prompt_messages],
                          "reward_model": {"ground_truth": r.gold},
                          "data_source": r.data_source, "uid": r.uid}) + "\n")
