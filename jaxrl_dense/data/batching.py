"""Chat template -> token ids -> left-padded, length-bucketed prompt batches.

Public API
----------
`PromptEncoder(tokenizer, *, max_prompt_length, bucket_multiple=64, overflow="error",
               pad_id=None)`
    `encode(messages) -> list[int]` (cached), `encode_many(list of messages)` (batched),
    `batch(records, *, pad_to=None, num_rows=None)
    -> PromptBatch`, `filter_overlong(records) -> (kept, dropped)`.
`encode_batch(tokenizer, records, *, max_prompt_length, bucket_multiple=64, ...)`: one-shot form.
`render_chat(tokenizer, messages) -> str`: the tokenizer's chat template with
    `add_generation_prompt=True` (the text ends where the assistant's answer starts).
`bucket_length(n, multiple, max_length) -> int`: ceil(n / multiple) * multiple, capped.
`PromptBatch(tokens [B, L] int32, mask [B, L] int32, lengths [B] int32, truncated [B] bool,
             valid [B] bool, uids list[str])`.

Padding and buckets
-------------------
Prompts are LEFT-padded (the architecture's convention: the last prompt token sits at column
L−1 for every row, so generation appends at the same column). L is a bucket: the longest prompt
of the batch rounded up to a multiple of `bucket_multiple` and capped at `max_prompt_length`, or
exactly `pad_to` when given (pass `pad_to=max_prompt_length` for a single shape and no
recompilation at all; with buckets a jitted function compiles once per distinct bucket, at most
ceil(max_prompt_length / bucket_multiple) times). `num_rows` pads the batch to a fixed number of
rows by repeating the last real prompt (so no row is all padding; `valid` marks the real rows).

Over-long prompts
-----------------
`overflow="error"` (default) raises a ValueError naming the record uid and its token count;
`"truncate"` keeps the LAST `max_prompt_length` tokens (the question and the generation prompt
survive; the start of a long system prompt / few-shot block is cut) and sets `truncated[i]`;
`filter_overlong` drops them up front (veRL's `filter_overlong_prompts`) and returns the uids.

Tokenizer: anything with `apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)` and `__call__(text, add_special_tokens=False)["input_ids"]`, i.e. a
transformers `PreTrainedTokenizerFast` (as `jaxrl_dense.models.load_pretrained` returns).
The rendered text already holds the template's special tokens (BOS, `<|im_start|>`), so it is
encoded with `add_special_tokens=False` to avoid a doubled BOS.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

_OVERFLOW_MODES = ("error", "truncate")


@dataclasses.dataclass
class PromptBatch:
  """A left-padded batch of prompts (numpy; hand to jax with `jnp.asarray` / device_put).

  Attributes:
    tokens: [B, L] int32 token ids, left-padded with `pad_id`.
    mask: [B, L] int32, 1 on prompt tokens, 0 on padding.
    lengths: [B] int32 prompt lengths after truncation.
    truncated: [B] bool, True where the prompt was cut to `max_prompt_length`.
    valid: [B] bool, False on rows added by `num_rows` padding (copies of the last prompt).
    uids: the records' uids (padding rows repeat the last uid).
  """

  tokens: np.ndarray
  mask: np.ndarray
  lengths: np.ndarray
  truncated: np.ndarray
  valid: np.ndarray
  uids: list

  @property
  def shape(self) -> tuple:
    return self.tokens.shape


def bucket_length(n: int, multiple: int, max_length: int) -> int:
  """Smallest multiple of `multiple` that is >= n, capped at `max_length` (and >= 1)."""
  if multiple < 1:
    raise ValueError(f"bucket_multiple must be >= 1, got {multiple}")
  if max_length < 1:
    raise ValueError(f"max_prompt_length must be >= 1, got {max_length}")
  return int(min(max(1, math.ceil(n / multiple) * multiple), max_length))


def _messages_of(item: Any) -> tuple:
  msgs = getattr(item, "prompt_messages", item)
  if isinstance(msgs, dict):
    raise TypeError("expected a PromptRecord or a sequence of chat messages, got a single dict")
  return tuple(msgs)


def render_chat(tokenizer: Any, messages: Sequence[dict]) -> str:
  """The prompt text: the tokenizer's chat template with the generation prompt appended."""
  if not hasattr(tokenizer, "apply_chat_template"):
    raise TypeError(f"tokenizer {type(tokenizer).__name__} has no apply_chat_template; pass a "
                    f"transformers tokenizer (e.g. LoadedModel.tokenizer)")
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template set; set "
                     f"tokenizer.chat_template (a Jinja template) before encoding chat prompts")
  text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                       tokenize=False)
  if not isinstance(text, str):
    raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, "
                    f"expected str")
  return text


def _encode_text(tokenizer: Any, text: str) -> list:
  out = tokenizer(text, add_special_tokens=False)
  ids = out["input_ids"] if not isinstance(out, list) else out
  return [int(i) for i in ids]


def default_pad_id(tokenizer: Any) -> int:
  for attr in ("pad_token_id", "eos_token_id"):
    v = getattr(tokenizer, attr, None)
    if isinstance(v, int):
      return v
  return 0


class PromptEncoder:
  """Encodes chat prompts with a tokenizer and builds bucketed, left-padded batches.

  Encodings are cached by message content, so re-encoding the eval set every k steps, or the
  same training prompt in a later epoch, costs nothing.
  """

  def __init__(self, tokenizer: Any, *, max_prompt_length: int, bucket_multiple: int = 64,
               overflow: str = "error", pad_id: Optional[int] = None):
    if overflow not in _OVERFLOW_MODES:
      raise ValueError(f"overflow must be one of {_OVERFLOW_MODES}, got {overflow!r}")
    bucket_length(1, bucket_multiple, max_prompt_length)  # validates both
    self.tokenizer = tokenizer
    self.max_prompt_length = int(max_prompt_length)
    self.bucket_multiple = int(bucket_multiple)
    self.overflow = overflow
    self.pad_id = default_pad_id(tokenizer) if pad_id is None else int(pad_id)
    self._cache: dict = {}

  def encode(self, messages: Sequence[dict]) -> list:
    """Token ids of the rendered chat prompt (not truncated)."""
    key = tuple((m["role"], m["content"]) for m in messages)
    ids = self._cache.get(key)
    if ids is None:
      ids = _encode_text(self.tokenizer, render_chat(self.tokenizer, messages))
      if not ids:
        raise ValueError(f"prompt {key!r:.120} encodes to zero tokens")
      self._cache[key] = ids
    return ids

  def encode_many(self, messages_list: Sequence[Sequence[dict]]) -> list:
    """`[encode(m) for m in messages_list]`, tokenizing the uncached prompts in one batch.

    Uses the Rust backend's `encode_batch` when the tokenizer exposes `backend_tokenizer`
    (same ids as `tokenizer(text, add_special_tokens=False)`, without the per-call overhead).
    """
    keys = [tuple((m["role"], m["content"]) for m in msgs) for msgs in messages_list]
    todo = {}
    for key, msgs in zip(keys, messages_list):
      if key not in self._cache and key not in todo:
        todo[key] = render_chat(self.tokenizer, msgs)
    if todo:
      texts = list(todo.values())
      backend = getattr(self.tokenizer, "backend_tokenizer", None)
      if backend is not None and hasattr(backend, "encode_batch"):
        encoded = [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
      else:
        encoded = [_encode_text(self.tokenizer, t) for t in texts]
      for key, ids in zip(todo, encoded):
        if not ids:
          raise ValueError(f"prompt {key!r:.120} encodes to zero tokens")
        self._cache[key] = ids
    return [self._cache[k] for k in keys]

  def filter_overlong(self, records: Sequence[Any]) -> tuple:
    """(records whose prompt fits max_prompt_length, uids of the dropped ones)."""
    kept, dropped = [], []
    self.encode_many([_messages_of(r) for r in records])  # fills the cache in one batch
    for r in records:
      if len(self.encode(_messages_of(r))) <= self.max_prompt_length:
        kept.append(r)
      else:
        dropped.append(getattr(r, "uid", None))
    return kept, dropped

  def batch(self, records: Sequence[Any], *, pad_to: Optional[int] = None,
            num_rows: Optional[int] = None) -> PromptBatch:
    """Left-padded batch of `records` (PromptRecords or message sequences).

    Args:
      records: B >= 1 prompts.
      pad_to: fixed width L (>= every prompt after truncation, <= max_prompt_length); default:
        the bucket of the longest prompt.
      num_rows: pad to this many rows by repeating the last prompt (valid=False on copies).
    """
    if len(records) == 0:
      raise ValueError("PromptEncoder.batch: no records")
    if num_rows is not None and num_rows < len(records):
      raise ValueError(f"num_rows={num_rows} is smaller than the batch ({len(records)} records)")
    seqs, truncated, uids = [], [], []
    all_ids = self.encode_many([_messages_of(r) for r in records])
    for i, (r, ids) in enumerate(zip(records, all_ids)):
      uid = getattr(r, "uid", f"#{i}")
      cut = len(ids) > self.max_prompt_length
      if cut:
        if self.overflow == "error":
          raise ValueError(f"prompt {uid!r} has {len(ids)} tokens > max_prompt_length="
                           f"{self.max_prompt_length}; raise max_prompt_length, drop it with "
                           f"filter_overlong, or use overflow='truncate'")
        ids = ids[-self.max_prompt_length:]
      seqs.append(ids)
      truncated.append(cut)
      uids.append(uid)
    longest = max(len(s) for s in seqs)
    if pad_to is None:
      width = bucket_length(longest, self.bucket_multiple, self.max_prompt_length)
    else:
      if not (longest <= pad_to <= self.max_prompt_length):
        raise ValueError(f"pad_to={pad_to} must be in [longest prompt={longest}, "
                         f"max_prompt_length={self.max_prompt_length}]")
      width = int(pad_to)
    rows = len(seqs) if num_rows is None else int(num_rows)
    tokens = np.full((rows, width), self.pad_id, dtype=np.int32)  # [B, L]
    mask = np.zeros((rows, width), dtype=np.int32)  # [B, L]
    lengths = np.zeros((rows,), dtype=np.int32)  # [B]
    for i in range(rows):
      s = seqs[min(i, len(seqs) - 1)]
      tokens[i, width - len(s):] = s
      mask[i, width - len(s):] = 1
      lengths[i] = len(s)
    valid = np.arange(rows) < len(seqs)  # [B]
    trunc = np.array([truncated[min(i, len(seqs) - 1)] for i in range(rows)], dtype=bool)
    uids = uids + [uids[-1]] * (rows - len(seqs))
    return PromptBatch(tokens=tokens, mask=mask, lengths=lengths, truncated=trunc, valid=valid,
                       uids=uids)


def encode_batch(tokenizer: Any, records: Sequence[Any], *, max_prompt_length: int,
                 bucket_multiple: int = 64, overflow: str = "error", pad_id: Optional[int] = None,
                 pad_to: Optional[int] = None, num_rows: Optional[int] = None) -> PromptBatch:
  """One-shot `PromptEncoder(...).batch(records)` (no cache reuse across calls)."""
  enc = PromptEncoder(tokenizer, max_prompt_length=max_prompt_length,
                      bucket_multiple=bucket_multiple, overflow=overflow, pad_id=pad_id)
  return enc.batch(records, pad_to=pad_to, num_rows=num_rows)
