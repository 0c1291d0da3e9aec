"""Step rewards from a process reward model: segmentation, placement on the policy's tokens, credit.

A step-scoring PRM (a discriminative PRM such as Qwen2.5-Math-PRM, a served one, or the implicit
PRM's per-step sums) gives one score per *step* of a response, in its own tokenizer. Turning those
into token rewards for the policy's estimators takes three pure pieces:

1. **Segmentation** (host, on the response text): character spans ``[(start, end), ...]`` of its
   steps. ``segment_by_separator`` (e.g. ``"\\n\\n"``), ``segment_by_regex`` (each match starts a
   step, e.g. ``r"Step \\d+:"``), ``segment_sentences`` (chain_arith's "a op b = c." sentences
   and "The answer is N."), or ``segment(text, spec)`` by name. Spans are trimmed of surrounding
   whitespace; whitespace-only steps are dropped; text after the last separator is a step.
2. **Placement** (host mapping, device math): ``token_offsets_from_ids`` gives the character span
   of every *sampled* policy token (from the ids, not a re-encoding: the trained ids must be the
   sampled ids); ``placement_weights(offsets, spans, mode)`` gives ``W [B, T, S]`` and
   ``place_step_scores(W, step_scores)`` = ``Σ_s W[b, t, s] · score[b, s]`` the token rewards
   ``[B, T]``. ``mode="last"``: the token holding a step's last character (the token that
   completes it, even when the step ends inside that token) carries the whole score; ``"spread"``:
   each token gets the score times the share of the step's characters it holds. Either way every
   placed step's score sums to itself over the tokens, whatever the two tokenizers.
3. **Credit** (device): how step rewards become returns. Summed returns (``ops.reverse_cumsum``,
   every estimator's default), PURE's min-form (Cheng et al., "Stop Summation: Min-Form Credit
   Assignment Is All Process Reward Model Needs for Reasoning", arXiv 2504.15275):
   ``min_form_values`` (``V_k = min_{j >= k} r_j``, the paper's definition) and
   ``pure_weighted_rewards`` (its implementation, CJReinforce/PURE
   ``turn_process_reward_logits_to_reward``: ``r*_k = softmax_k(−r/T) · r_k``, T = 0.1, so the
   summed return of step 0 is a soft minimum of the step rewards). PURE's reward of a 2-class head,
   ``p(correct) − p(incorrect)``, is the head's: ``models.prm_head.prm_logits_to_step_reward``.

The placed rewards enter every estimator through its one signature as ``process_rewards [B, T]``
(PRIME's RLOO, GRPO, REINFORCE++, GAE: ``advantages.EstimatorInputs``).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import _moved, ops

Array = jax.Array
Span = Tuple[int, int]

PLACEMENT_MODES = ("last", "spread")

# ----------------------------------------------------------------------------- segmentation


def _trimmed(text: str, start: int, end: int) -> Optional[Span]:
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return (start, end) if end > start else None


def _cut(text: str, cuts: Sequence[int]) -> List[Span]:
  bounds = [0, *cuts, len(text)]
  out = [_trimmed(text, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  return [s for s in out if s is not None]


def segment_by_separator(text: str, sep: str = "\n\n") -> List[Span]:
  """Steps separated by ``sep`` (the separator belongs to no step)."""
  if not sep:
    raise ValueError("segment_by_separator: the separator is empty")
  spans, pos = [], 0
  while True:
    hit = text.find(sep, pos)
    end = len(text) if hit < 0 else hit
    s = _trimmed(text, pos, end)
    if s is not None:
      spans.append(s)
    if hit < 0:
      return spans
    pos = hit + len(sep)


def segment_by_regex(text: str, pattern: str) -> List[Span]:
  """Each match of ``pattern`` starts a new step (e.g. ``r"Step \\d+:"``); text before the first
  match is a step of its own when it is not blank."""
  rx = re.compile(pattern)
  cuts = [m.start() for m in rx.finditer(text) if m.start() > 0 or m.end() > 0]
  return _cut(text, [c for c in cuts if c > 0])


_SENTENCE = re.compile(r"\.(?=\s|$)")


def segment_sentences(text: str) -> List[Span]:
  """Sentences ending in "." before whitespace or the end (chain_arith's "a op b = c." steps and
  "The answer is N."), trailing text without a period as the last step."""
  return _cut(text, [m.end() for m in _SENTENCE.finditer(text)])


def segment(text: str, spec: str) -> List[Span]:
  """``spec``: ``"sep:<separator>"`` (escapes such as ``\\n`` decoded), ``"regex:<pattern>"``,
  ``"sentences"`` / ``"chain_arith"``, or ``"paragraphs"`` (= ``"sep:\\n\\n"``)."""
  if spec in ("sentences", "chain_arith"):
    return segment_sentences(text)
  if spec == "paragraphs":
    return segment_by_separator(text, "\n\n")
  if spec.startswith("sep:"):
    return segment_by_separator(text, spec[4:].encode("utf-8").decode("unicode_escape"))
  if spec.startswith("regex:"):
    return segment_by_regex(text, spec[6:])
  raise ValueError(f"step segmentation {spec!r}; expected 'sentences', 'paragraphs', 'sep:<s>' "
                   f"or 'regex:<pattern>'")


# ----------------------------------------------------------------------------- placement (host)


def _is_byte_level(tokenizer) -> bool:
  backend = getattr(tokenizer, "backend_tokenizer", None)
  return backend is not None and "ByteLevel" in str(backend.decoder)


def token_offsets_from_ids(tokenizer, ids: Sequence[int]) -> Tuple[str, List[Span]]:
  """(text, character span of every token) of the token ids ``ids`` as they are (host).

  Works from the ids, so the spans are those of the sampled tokens even where re-encoding the
  text would tokenise it differently. Byte-level BPE: each token's bytes; a token that ends inside
  a multi-byte character holds that character (so a character split over two tokens is in both,
  and the token with its last byte completes it). Other tokenizers: each token decoded alone.
  Special tokens get the empty span at their position. Raises ValueError if the pieces do not
  rebuild ``tokenizer.decode(ids, skip_special_tokens=True)``."""
  ids = [int(i) for i in ids]
  special = set(getattr(tokenizer, "all_special_ids", []) or [])
  if _is_byte_level(tokenizer):
    from jaxrl_dense.models.tokenizer import bytes_to_unicode  # pylint: disable=import-outside-toplevel
    inv = {c: b for b, c in bytes_to_unicode().items()}
    toks = tokenizer.convert_ids_to_tokens(ids)
    pieces = [b"" if i in special else bytes(inv[c] for c in t) for i, t in zip(ids, toks)]
  else:
    pieces = [b"" if i in special else tokenizer.decode([i]).encode("utf-8") for i in ids]
  data = b"".join(pieces)
  text = data.decode("utf-8", errors="replace")
  want = tokenizer.decode(ids, skip_special_tokens=True)
  if text != want:
    raise ValueError(f"token_offsets_from_ids: token pieces rebuild {text!r}, the tokenizer decodes "
                     f"{want!r}; this tokenizer's pieces cannot be mapped to characters")
  # byte index -> index of the character holding it
  char_of = np.zeros(len(data) + 1, np.int64)
  pos = 0
  for ci, ch in enumerate(text):
    n = len(ch.encode("utf-8")) if ch != "\ufffd" else 1
    char_of[pos:pos + n] = ci
    pos += n
  char_of[len(data)] = len(text)
  spans, b = [], 0
  for p in pieces:
    if not p:
      c = int(char_of[b]) if b < len(data) else len(text)
      spans.append((c, c))
      continue
    spans.append((int(char_of[b]), int(char_of[b + len(p) - 1]) + 1))
    b += len(p)
  return text, spans


def placement_weights(offsets: Sequence[Sequence[Span]], step_spans: Sequence[Sequence[Span]], *,
                      mode: str = "last", num_cols: Optional[int] = None,
                      num_steps: Optional[int] = None, text_lengths: Optional[Sequence[int]] = None
                      ) -> np.ndarray:
  """float32 ``W [B, T, S]`` with ``token_rewards = Σ_s W[:, :, s] · step_scores[:, s]`` (host).

  ``offsets[b]``: the character span of each of row b's tokens (``token_offsets_from_ids`` or a
  fast tokenizer's ``offset_mapping``); ``step_spans[b]``: increasing, non-overlapping step spans
  of the same text. ``mode="last"``: ``W[b, t, s] = 1`` for the last token holding the step's last
  character; ``"spread"``: ``|chars(t) ∩ step s| / Σ_t' |chars(t') ∩ step s|``. A step no token
  covers (text cut off by the response limit) gets no weight. Spans past ``text_lengths[b]`` or
  the tokens' extent, or not increasing, raise ValueError naming the row."""
  if mode not in PLACEMENT_MODES:
    raise ValueError(f"placement mode {mode!r}; expected one of {PLACEMENT_MODES}")
  if len(offsets) != len(step_spans):
    raise ValueError(f"placement_weights: {len(offsets)} offset rows but {len(step_spans)} span rows")
  t_max = max((len(o) for o in offsets), default=0) if num_cols is None else int(num_cols)
  s_max = max((len(s) for s in step_spans), default=0) if num_steps is None else int(num_steps)
  w = np.zeros((len(offsets), t_max, max(s_max, 1)), np.float32)
  for b, (off, spans) in enumerate(zip(offsets, step_spans)):
    if len(off) > t_max or len(spans) > s_max:
      raise ValueError(f"placement_weights: row {b} has {len(off)} tokens / {len(spans)} steps, more "
                       f"than num_cols={t_max} / num_steps={s_max}")
    limit = text_lengths[b] if text_lengths is not None else max((e for _, e in off), default=0)
    prev = 0
    for s, (a, e) in enumerate(spans):
      if not (prev <= a < e <= limit):
        raise ValueError(f"placement_weights: row {b} step {s} span ({a}, {e}) is empty, overlaps "
                         f"the previous step or lies outside the text (length {limit})")
      prev = e
      if not off:
        continue
      lo = np.array([o[0] for o in off]); hi = np.array([o[1] for o in off])
      overlap = np.clip(np.minimum(hi, e) - np.maximum(lo, a), 0, None).astype(np.float32)
      if overlap.sum() == 0:
        continue
      if mode == "last":
        holders = np.nonzero((lo <= e - 1) & (hi > e - 1))[0]
        if holders.size:
          w[b, holders[-1], s] = 1.0
      else:
        w[b, :len(off), s] = overlap / overlap.sum()
  return w


# ----------------------------------------------------------------------------- device


def place_step_scores(weights: chex.Array, step_scores: chex.Array,
                      step_mask: Optional[chex.Array] = None) -> Array:
  """Token rewards ``[B, T] = Σ_s W[b, t, s] · score[b, s]`` (masked steps add 0). jit-safe."""
  chex.assert_rank(weights, 3)
  chex.assert_rank(step_scores, 2)
  chex.assert_equal_shape_prefix([weights, step_scores], 1)
  scores = jnp.asarray(step_scores, jnp.float32)
  if step_mask is not None:
    scores = jnp.where(jnp.asarray(step_mask) > 0, scores, 0.0)
  return jnp.einsum("bts,bs->bt", jnp.asarray(weights, jnp.float32), scores)


def min_form_values(step_rewards: chex.Array, step_mask: chex.Array) -> Array:
  """PURE's min-form value ``V_k = min_{j >= k, valid} r_j`` per step, ``[B, S] -> [B, S]`` (0 on
  invalid steps). The paper's definition (2504.15275 eq. 4), against the summed ``Σ_{j>=k} r_j``."""
  ops.check_token_arrays(step_rewards=step_rewards, step_mask=step_mask)
  m = jnp.asarray(step_mask) > 0
  r = jnp.where(m, jnp.asarray(step_rewards, jnp.float32), jnp.inf)
  v = jax.lax.cummin(r, axis=1, reverse=True)
  return jnp.where(m, v, 0.0)


def pure_weighted_rewards(step_rewards: chex.Array, step_mask: chex.Array, *,
                          temperature: float = 0.1) -> Array:
  """PURE's transformed step rewards ``r*_k = softmax_k(−r/T) r_k`` over a row's valid steps
  (CJReinforce/PURE ``turn_process_reward_logits_to_reward``; T = 0.1 there), ``[B, S]``; 0 on
  invalid steps. Summed over steps it is a soft minimum of the row's rewards (T -> 0: the min),
  so the usual summed return at step 0 becomes min-form."""
  ops.check_token_arrays(step_rewards=step_rewards, step_mask=step_mask)
  if not temperature > 0:
    raise ValueError(f"PURE temperature must be > 0, got {temperature}")
  m = jnp.asarray(step_mask) > 0
  r = jnp.where(m, jnp.asarray(step_rewards, jnp.float32), 0.0)
  logits = jnp.where(m, -r / temperature, -jnp.inf)
  w = jax.nn.softmax(logits, axis=1)
  w = jnp.where(jnp.any(m, axis=1, keepdims=True), w, 0.0)  # a row without steps: all 0
  return jnp.where(m, w * r, 0.0)


CREDIT_MODES = ("sum", "pure")


def credit_step_rewards(step_rewards: chex.Array, step_mask: chex.Array, *, mode: str = "sum",
                        temperature: float = 0.1) -> Array:
  """Step rewards for a summed-return estimator: "sum" leaves them (the canonical Σ form), "pure"
  applies ``pure_weighted_rewards`` (min-form credit). ``[B, S] -> [B, S]``."""
  if mode == "sum":
    ops.check_token_arrays(step_rewards=step_rewards, step_mask=step_mask)
    return jnp.where(jnp.asarray(step_mask) > 0, jnp.asarray(step_rewards, jnp.float32), 0.0)
  if mode == "pure":
    return pure_weighted_rewards(step_rewards, step_mask, temperature=temperature)
  raise ValueError(f"credit mode {mode!r}; expected one of {CREDIT_MODES}")


# Deprecated alias (one release): the 2-class head's reward lives beside the head.
__getattr__ = _moved.moved_names(__name__, {
    "prm_logits_to_step_reward": "jaxrl_dense.models.prm_head.prm_logits_to_step_reward"})
