"""Loss aggregation modes (veRL ``verl/trainer/ppo/core_algos.py`` ``agg_loss``) as ``(sum, count)`` pairs.

A train step sums the ``sum`` and ``count`` of every micro-batch (and ``psum``s them over devices)
and divides once, so the loss does not depend on micro-batching or the data-parallel degree
(Tunix-style). On a single batch, ``sum / count`` equals veRL's ``agg_loss`` with dp_size 1.

Mode                         sum                                  count
token-mean (default)         Σ_{i,t} m·x                          Σ_{i,t} m
seq-mean-token-sum           Σ_i Σ_t m·x                          #rows with ≥ 1 valid token
seq-mean-token-mean          Σ_i Σ_t m·x / (Σ_t m + 1e−8)         #rows with ≥ 1 valid token
seq-mean-token-sum-norm      Σ_{i,t} m·x                          F = loss_scale_factor, or T

``seq-mean-token-sum-norm`` (Dr.GRPO, arXiv 2503.20783) divides by a constant: its count is NOT
additive. Combine micro-batches with :func:`combine`, which sums the sums and keeps one F.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops

Array = jax.Array
ArrayLike = chex.Array

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADDITIVE_COUNT = {"token-mean": True, "seq-mean-token-sum": True, "seq-mean-token-mean": True,
                  "seq-mean-token-sum-norm": False}


def _prep(loss_mat, mask):
  ops.check_token_arrays(loss_mat=loss_mat, mask=mask)
  m = ops.as_bool_mask(mask)
  return jnp.where(m, jnp.asarray(loss_mat, jnp.float32), 0.0), m


def token_mean(loss_mat: ArrayLike, mask: ArrayLike) -> Tuple[Array, Array]:
  """``(Σ m·x, Σ m)``. Shapes ``[B, T]`` -> two scalars."""
  x, m = _prep(loss_mat, mask)
  return jnp.sum(x), jnp.sum(m, dtype=jnp.float32)


def seq_mean_token_sum(loss_mat: ArrayLike, mask: ArrayLike) -> Tuple[Array, Array]:
  """``(Σ_i Σ_t m·x, #rows with a valid token)``."""
  x, m = _prep(loss_mat, mask)
  return jnp.sum(x), jnp.sum(jnp.any(m, axis=1), dtype=jnp.float32)


def seq_mean_token_mean(loss_mat: ArrayLike, mask: ArrayLike) -> Tuple[Array, Array]:
  """``(Σ_i Σ_t m·x / (Σ_t m + 1e−8), #rows with a valid token)``."""
  x, m = _prep(loss_mat, mask)
  per_row = jnp.sum(x, axis=1) / (jnp.sum(m, axis=1, dtype=jnp.float32) + 1e-8)   # [B]
  return jnp.sum(per_row), jnp.sum(jnp.any(m, axis=1), dtype=jnp.float32)


def seq_mean_token_sum_norm(loss_mat: ArrayLike, mask: ArrayLike, *,
                            loss_scale_factor: Optional[float] = None) -> Tuple[Array, Array]:
  """``(Σ m·x, F)`` with F = ``loss_scale_factor`` or the padded length T (constant count)."""
  x, _ = _prep(loss_mat, mask)
  f = float(jnp.shape(x)[1]) if loss_scale_factor is None else float(loss_scale_factor)
  if f <= 0:
    raise ValueError(f"`loss_scale_factor` must be > 0, got {loss_scale_factor}")
  return jnp.sum(x), jnp.asarray(f, jnp.float32)


_FNS = {"token-mean": token_mean, "seq-mean-token-sum": seq_mean_token_sum,
        "seq-mean-token-mean": seq_mean_token_mean,
        "seq-mean-token-sum-norm": seq_mean_token_sum_norm}


def aggregate_terms(loss_mat: ArrayLike, mask: ArrayLike, mode: str = "token-mean", *,
                    loss_scale_factor: Optional[float] = None) -> Tuple[Array, Array]:
  """``(sum, count)`` of ``loss_mat [B, T]`` under ``mode`` (see the module table)."""
  if mode not in _FNS:
    raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(MODES)}")
  if mode == "seq-mean-token-sum-norm":
    return seq_mean_token_sum_norm(loss_mat, mask, loss_scale_factor=loss_scale_factor)
  if loss_scale_factor is not None:
    raise ValueError(f"`loss_scale_factor` only applies to 'seq-mean-token-sum-norm', not {mode!r}")
  return _FNS[mode](loss_mat, mask)


def combine(mode: str, sums: Sequence[ArrayLike], counts: Sequence[ArrayLike]) -> Array:
  """Loss over several micro-batches: ``Σ sums / Σ counts`` (additive modes) or ``Σ sums / F``."""
  if mode not in _FNS:
    raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(MODES)}")
  total = sum(jnp.asarray(s) for s in sums)
  if ADDITIVE_COUNT[mode]:
    return total / sum(jnp.asarray(c) for c in counts)
  return total / jnp.asarray(counts[0])


def aggregate(loss_mat: ArrayLike, mask: ArrayLike, mode: str = "token-mean", *,
              loss_scale_factor: Optional[float] = None) -> Array:
  """Scalar loss of one batch: ``sum / count`` (= veRL ``agg_loss`` on one rank)."""
  s, c = aggregate_terms(loss_mat, mask, mode, loss_scale_factor=loss_scale_factor)
  return s / c
