"""PRIME's accuracy-band prompt filter (arXiv 2502.01456), as pure index/mask functions.

A prompt (group of n contiguous responses) passes when ``low ≤ mean outcome ≤ high`` (inclusive) and,
optionally, none of its responses hit the length limit. Two reference behaviours:

* ``reference_impl="original"`` (PRIME-RL/PRIME ``training/verl/trainer/ppo/ray_trainer.py``
  ``RayPRIMETrainer.filter``): hard removal — a keep mask; truncation means
  ``L ≥ max_response_length``.
* ``reference_impl="verl"`` (veRL recipe ``prime/prime_ray_trainer.py`` ``filter_and_downsample``): soft —
  prompts are stably reordered passing-first and the first ``⌊B / oversample_factor⌋`` rows are
  kept (failing prompts fill the batch when too few pass); truncation means
  ``L ≥ max_response_length − 1``.

Everything is jit-safe (static n, B and oversample_factor) and works on numpy inputs on the host.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

VARIANTS = ("verl", "original")


class FilterOutput(NamedTuple):
  """``keep_mask bool[B]``: rows kept. ``indices int32[K]``: kept rows in the order to use them
  (verl: K = ⌊B / oversample_factor⌋; original: K = B, passing rows first, then the rest — take
  the first ``keep_mask.sum()``). ``prompt_pass bool[P]``: per-prompt pass flags."""
  keep_mask: Array
  indices: Array
  prompt_pass: Array


def _check(outcome, lengths, n):
  b = ops.check_row_arrays(None, outcome=outcome)
  if lengths is not None:
    ops.check_row_arrays(b, lengths=lengths)
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or b % n:
    raise ValueError(f"`n` must be a static int >= 1 dividing B = {b}, got {n!r}")
  return b


@renamed_kwargs(acc="outcome")
def prompt_pass_flags(outcome: ArrayLike, *, n: int, low: float = 0.2, high: float = 0.8,
                      lengths: Optional[ArrayLike] = None,
                      truncation_length: Optional[int] = None) -> Array:
  """``bool[P]``: ``low ≤ mean_{group} outcome ≤ high`` and (if ``truncation_length`` is given)
  ``max_{group} L < truncation_length``. outcome, lengths: ``[B]`` with B = P·n contiguous groups."""
  b = _check(outcome, lengths, n)
  mean = jnp.mean(jnp.asarray(outcome, jnp.float32).reshape(b // n, n), axis=1)   # [P]
  ok = (mean >= low) & (mean <= high)
  if truncation_length is not None:
    if lengths is None:
      raise ValueError("the truncation filter needs `lengths` [B] (valid response lengths)")
    longest = jnp.max(jnp.asarray(lengths).reshape(b // n, n), axis=1)         # [P]
    ok = ok & (longest < truncation_length)
  return ok


@renamed_kwargs(variant="reference_impl", acc="outcome")
def accuracy_band_filter(outcome: ArrayLike, lengths: Optional[ArrayLike] = None, *, n: int,
                         reference_impl: str = "verl", low: float = 0.2, high: float = 0.8,
                         max_response_length: Optional[int] = None,
                         filter_truncated: bool = False,
                         oversample_factor: float = 1.0) -> FilterOutput:
  """PRIME accuracy-band filter over B = P·n responses (the two variants of the module docstring).

  Args:
    outcome: ``[B]`` outcome labels; lengths: ``[B]`` valid response lengths (needed with
      ``filter_truncated``).
    n: static samples per prompt. reference_impl: ``"verl"`` (soft reorder + downsample) or
      ``"original"`` (hard keep mask).
    low, high: inclusive accuracy band (0.2, 0.8).
    max_response_length, filter_truncated: truncation filter (verl: ``L ≥ max − 1`` fails;
      original: ``L ≥ max`` fails).
    oversample_factor: verl only; K = ⌊B / oversample_factor⌋ rows are kept.
  Returns: :class:`FilterOutput`.
  """
  b = _check(outcome, lengths, n)
  if reference_impl not in VARIANTS:
    raise ValueError(f"`reference_impl` must be one of {VARIANTS}, got {reference_impl!r}")
  trunc = None
  if filter_truncated:
    if max_response_length is None:
      raise ValueError("`filter_truncated=True` needs `max_response_length`")
    trunc = max_response_length - 1 if reference_impl == "verl" else max_response_length
  ok = prompt_pass_flags(outcome, n=n, low=low, high=high, lengths=lengths, truncation_length=trunc)
  order = jnp.argsort(jnp.logical_not(ok), stable=True)             # [P] passing first
  rows = (order[:, None] * n + jnp.arange(n)[None, :]).reshape(-1).astype(jnp.int32)   # [B]
  if reference_impl == "original":
    if oversample_factor != 1.0:
      raise ValueError("`oversample_factor` applies to reference_impl='verl' only")
    return FilterOutput(jnp.repeat(ok, n), rows, ok)
  if oversample_factor < 1.0:
    raise ValueError(f"`oversample_factor` must be >= 1, got {oversample_factor}")
  k = int(b // oversample_factor)
  idx = rows[:k]                                                    # [K]
  keep = jnp.zeros((b,), bool).at[idx].set(True)
  return FilterOutput(keep, idx, ok)
