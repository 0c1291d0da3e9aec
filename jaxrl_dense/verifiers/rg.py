"""reasoning-gym tasks: source specs and the task's own answer checker, as a verifier kind.

reasoning-gym (`pip install jaxrl_dense[rg]`, pinned to 0.1.25) generates 100+ procedural tasks
(arithmetic, algebra, logic puzzles, games, ...); each dataset entry is a dict with `question`,
`answer` and `metadata`, and each task scores a candidate answer with its own
`dataset.score_answer(answer, entry) -> float in [0, 1]` (exact match, numeric tolerance, a
puzzle-validity check, partial credit, ...). This module is the verifier side; the prompt
records are built by `jaxrl_dense.data.reasoning_gym`.

Spec syntax
-----------
    rg:<task>[:key=value,key=value,...]

`<task>` is a registered reasoning-gym dataset name (`task_names()`). Keys are `size` (number of
entries, default the task's own, 500), `seed` (default 0, so that a spec always names the same
entries; reasoning-gym's own default is a random seed) and the task's config fields, typed from
its config dataclass: int, float, str, bool (true/false/1/0/yes/no), `none` for an Optional
field, a Literal's value, an Enum member's name or value, and lists/tuples of str/int/float
written with `|` between items (`operators=+|-|*`; quote the flag for the shell). An unknown
task or key, a value of the wrong type, or a config that the task's `validate()` refuses raises
ValueError naming the spec (and the closest task names / the task's keys). The tasks in
`NOT_RECREATABLE` (6 of 106, whose entries depend on Python's string-hash seed) are refused.

Gold and scoring (the "rg" verifier kind)
-----------------------------------------
A record's gold is JSON: `{"rg": canonical spec, "index": i, "answer": entry answer, "q": sha256
of the question (16 hex)}`. The pool worker re-creates the entry deterministically,
`create_dataset(task, **options)[index]` (reasoning-gym seeds every entry from `seed + index`;
the dataset object of each spec is cached per worker, never pickled), checks that the
re-created question and answer are the recorded ones (a mismatch, e.g. another reasoning-gym
version, is a verifier error, not a wrong answer), takes the response's answer as the text
inside its last `<answer>...</answer>` tags (`reasoning_gym.utils.extract_answer`, the format
of reasoning-gym's own prompts and evals; no tags: None) and returns
`float(dataset.score_answer(answer, entry))`, clipped to [0, 1] (NaN -> 0).

reasoning-gym is imported lazily: without it, a spec raises ImportError saying how to install it.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import math as _pymath
import typing
from collections import OrderedDict
from collections.abc import Sequence as _AbcSequence
from typing import Any, Optional

__all__ = ["ANSWER_INSTRUCTION", "INSTALL_HINT", "NOT_RECREATABLE", "PREFIX", "RgSpec", "dataset", "decode_gold",
           "encode_gold", "entry", "extract_answer", "is_spec", "parse_spec", "parse_value", "require",
           "score", "score_detailed", "task_names"]

PREFIX = "rg:"
PINNED_VERSION = "0.1.25"
INSTALL_HINT = ("reasoning-gym is not installed; `rg:` sources need the optional extra: "
                "pip install 'jaxrl_dense[rg]' (reasoning-gym==" + PINNED_VERSION + ")")
DEFAULT_SEED = 0
LIST_SEPARATOR = "|"
# Appended to every task question (the user turn): the answer format `extract_answer` reads.
ANSWER_INSTRUCTION = ("Give your final answer between <answer> and </answer> tags, e.g. "
                      "<answer>your answer</answer>, with nothing else inside the tags.")
_CACHE_SIZE = 32
# Tasks whose entries depend on Python's per-process string-hash seed (set iteration order) in
# reasoning-gym 0.1.25: the pool's workers would re-create other entries than the records hold.
# Measured: entries 0-2 of seed 0 under PYTHONHASHSEED=1 and =2 differ for exactly these (of 106).
NOT_RECREATABLE = frozenset({"isomorphic_strings", "knight_swap", "list_functions",
                             "polynomial_multiplication", "ransom_note", "word_ladder"})


def require():
  """The `reasoning_gym` module; ImportError with the install line when it is missing."""
  try:
    import reasoning_gym  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{INSTALL_HINT} ({e})") from None
  return reasoning_gym


def _registry() -> dict:
  require()
  from reasoning_gym.factory import DATASETS  # pylint: disable=import-outside-toplevel
  return DATASETS


def task_names() -> list:
  """Sorted names of the registered reasoning-gym tasks."""
  return sorted(_registry())


def is_spec(spec: Any) -> bool:
  """True for strings of the form 'rg:...' (the sources this module serves)."""
  return isinstance(spec, str) and spec.startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class RgSpec:
  """A parsed `rg:<task>[:k=v,...]` spec.

  Attributes:
    task: reasoning-gym dataset name.
    options: tuple of (key, value text) pairs, sorted by key, always with `seed` and `size`
      (the canonical form: `canonical` re-parses to the same spec).
    kwargs: the typed keyword arguments of `reasoning_gym.create_dataset(task, **kwargs)`.
  """

  task: str
  options: tuple
  kwargs: dict = dataclasses.field(compare=False, hash=False)

  @property
  def canonical(self) -> str:
    return f"{PREFIX}{self.task}:" + ",".join(f"{k}={v}" for k, v in self.options)

  @property
  def size(self) -> int:
    return int(self.kwargs["size"])

  @property
  def seed(self) -> int:
    return int(self.kwargs["seed"])


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_scalar(text: str, tp: Any) -> Any:
  if tp is bool:
    low = text.strip().lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"expected a bool ({'/'.join(_TRUE)} or {'/'.join(_FALSE)})")
  if tp is int:
    return int(text)
  if tp is float:
    return float(text)
  if tp is str or tp is Any:
    return text
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    for member in tp:
      if text in (member.name, str(member.value)) or text.lower() == member.name.lower():
        return member
    raise ValueError(f"expected one of {[m.name for m in tp]}")
  raise TypeError(f"type {getattr(tp, '__name__', tp)} cannot be set from a spec")


def parse_value(text: str, tp: Any) -> Any:
  """`text` as a value of type `tp` (a config field's annotation); ValueError/TypeError else."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is typing.Union:
    inner = [a for a in args if a is not type(None)]
    if type(None) in args and text.strip().lower() == "none":
      return None
    errors = []
    for a in inner:
      try:
        return parse_value(text, a)
      except (ValueError, TypeError) as e:
        errors.append(str(e))
    raise ValueError("; ".join(errors))
  if origin is typing.Literal:
    for a in args:
      if text == str(a):
        return a
    raise ValueError(f"expected one of {list(args)}")
  if tp in (list, tuple) or origin in (list, tuple, _AbcSequence):
    item_tp = str
    if args:
      item_tp = args[0]
      if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(set(args)) > 1:
        raise TypeError(f"type {tp} cannot be set from a spec")
    items = [parse_value(x, item_tp) for x in text.split(LIST_SEPARATOR)] if text else []
    return tuple(items) if (tp is tuple or origin is tuple) else items
  return _parse_scalar(text, tp)


def _field_types(config_cls) -> dict:
  try:
    hints = typing.get_type_hints(config_cls)
  except Exception:  # an unresolvable forward reference: fall back to the raw annotations
    hints = {}
  return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls) if f.init}


def _describe_type(tp: Any) -> str:
  return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def parse_spec(spec: str) -> RgSpec:
  """'rg:<task>[:k=v,...]' -> RgSpec. Raises ValueError naming the spec (see the module docstring)."""
  s = str(spec)
  if not is_spec(s):
    raise ValueError(f"prompt source {s!r} is not a reasoning-gym spec ('rg:<task>[:k=v,...]')")
  registry = _registry()
  parts = s[len(PREFIX):].split(":", 1)
  task = parts[0].strip()
  if task not in registry:
    close = difflib.get_close_matches(task, list(registry), n=5, cutoff=0.5)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"known tasks: {', '.join(sorted(registry))}")
    raise ValueError(f"prompt source {s!r}: unknown reasoning-gym task {task!r}; {hint}")
  if task in NOT_RECREATABLE:
    raise ValueError(f"prompt source {s!r}: task {task!r} is not supported: its entries depend on "
                     f"Python's string-hash seed, so the verifier processes cannot re-create the "
                     f"entries the records hold (unsupported: {', '.join(sorted(NOT_RECREATABLE))})")
  _, config_cls = registry[task]
  types = _field_types(config_cls)
  texts: dict = {}
  for item in (parts[1].split(",") if len(parts) == 2 and parts[1].strip() else []):
    if "=" not in item:
      raise ValueError(f"prompt source {s!r}: expected key=value, got {item!r}")
    k, v = (x.strip() for x in item.split("=", 1))
    if k not in types:
      close = difflib.get_close_matches(k, list(types), n=3, cutoff=0.5)
      raise ValueError(f"prompt source {s!r}: unknown option {k!r} of task {task!r}"
                       f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; its options: "
                       f"{', '.join(f'{n} ({_describe_type(t)})' for n, t in types.items())}")
    if k in texts:
      raise ValueError(f"prompt source {s!r}: option {k!r} given twice")
    texts[k] = v
  texts.setdefault("seed", str(DEFAULT_SEED))
  kwargs: dict = {}
  for k, v in texts.items():
    try:
      kwargs[k] = parse_value(v, types[k])
    except (ValueError, TypeError) as e:
      raise ValueError(f"prompt source {s!r}: bad value {v!r} for option {k!r} "
                       f"({_describe_type(types[k])}): {e}") from None
  if "size" not in kwargs:
    size_field = next(f for f in dataclasses.fields(config_cls) if f.name == "size")
    kwargs["size"] = size_field.default
    texts["size"] = str(size_field.default)
  if not (isinstance(kwargs["seed"], int) and kwargs["seed"] >= 0):
    raise ValueError(f"prompt source {s!r}: seed must be an integer >= 0, got {texts['seed']!r}")
  if not (isinstance(kwargs["size"], int) and kwargs["size"] >= 1):
    raise ValueError(f"prompt source {s!r}: size must be an integer >= 1, got {texts['size']!r}")
  try:  # the task's own checks (reasoning-gym's create_dataset runs the same)
    config = config_cls(**kwargs)
    if hasattr(config, "validate"):
      config.validate()
  except Exception as e:  # AssertionError / ValueError / TypeError of the task's validate()
    raise ValueError(f"prompt source {s!r}: task {task!r} refuses this config: "
                     f"{type(e).__name__}: {e}") from None
  return RgSpec(task=task, options=tuple(sorted(texts.items())), kwargs=kwargs)


# --------------------------------------------------------------------------- datasets & entries
_DATASETS: "OrderedDict[str, Any]" = OrderedDict()


def dataset(spec: str | RgSpec):
  """The reasoning-gym dataset of a spec (cached per process, at most 32 specs)."""
  parsed = spec if isinstance(spec, RgSpec) else parse_spec(spec)
  key = parsed.canonical
  ds = _DATASETS.get(key)
  if ds is None:
    rg = require()
    ds = rg.create_dataset(parsed.task, **parsed.kwargs)
    _DATASETS[key] = ds
    while len(_DATASETS) > _CACHE_SIZE:
      _DATASETS.popitem(last=False)
  else:
    _DATASETS.move_to_end(key)
  return ds


def entry(spec: str | RgSpec, index: int) -> dict:
  """Entry `index` of a spec's dataset (deterministic in the spec: seed + index)."""
  ds = dataset(spec)
  if not 0 <= index < len(ds):
    raise IndexError(f"reasoning-gym spec {getattr(spec, 'canonical', spec)!r}: index {index} "
                     f"outside [0, {len(ds)})")
  return ds[index]


def question_hash(question: str) -> str:
  return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def _answer_text(answer: Any) -> str:
  return answer if isinstance(answer, str) else json.dumps(answer, sort_keys=True, default=str)


def encode_gold(spec: RgSpec, index: int, item: dict) -> str:
  """The record gold of entry `index` of `spec` (JSON; see the module docstring)."""
  return json.dumps({"rg": spec.canonical, "index": int(index), "answer": _answer_text(item["answer"]),
                     "q": question_hash(str(item["question"]))}, ensure_ascii=False)


def decode_gold(gold: str) -> dict:
  """The fields of an rg gold; ValueError for anything else."""
  try:
    g = json.loads(gold)
  except (TypeError, json.JSONDecodeError):
    raise ValueError(f"rg gold must be JSON with 'rg', 'index', 'answer', 'q', got {str(gold)[:80]!r}") from None
  if not (isinstance(g, dict) and is_spec(g.get("rg")) and isinstance(g.get("index"), int)
          and isinstance(g.get("answer"), str) and isinstance(g.get("q"), str)):
    raise ValueError(f"rg gold must be JSON with 'rg', 'index', 'answer', 'q', got {str(gold)[:80]!r}")
  return g


# --------------------------------------------------------------------------- scoring
def extract_answer(response: Optional[str]) -> Optional[str]:
  """The text inside the last <answer>...</answer> of a response (stripped), or None."""
  if not response:
    return None
  require()
  from reasoning_gym.utils import extract_answer as rg_extract  # pylint: disable=import-outside-toplevel
  return rg_extract(response)


def score_detailed(response: Optional[str], gold: str) -> tuple:
  """(score in [0, 1], reason): reason "ok", "no_answer" (no <answer> tags) or "wrong_answer".

  Raises (a verifier error, not a wrong answer) when the gold is malformed or the re-created
  entry is not the recorded one.
  """
  g = decode_gold(gold)
  spec = parse_spec(g["rg"])
  item = entry(spec, g["index"])
  if question_hash(str(item["question"])) != g["q"] or _answer_text(item["answer"]) != g["answer"]:
    raise RuntimeError(f"reasoning-gym re-created entry {g['index']} of {spec.canonical!r} differently "
                       f"from the record (another reasoning-gym version, or a task that is not "
                       f"deterministic across processes)")
  answer = extract_answer(response)
  s = float(dataset(spec).score_answer(answer, item))
  s = 0.0 if not _pymath.isfinite(s) else min(1.0, max(0.0, s))
  return s, "ok" if s >= 1.0 else ("no_answer" if answer is None else "wrong_answer")


def score(response: Optional[str], gold: str) -> float:
  """The task's `score_answer` of the response's <answer> text against the recorded entry."""
  return score_detailed(response, gold)[0]
