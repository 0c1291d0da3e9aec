"""Outcome-reward advantage estimators of veRL core (``core_algos.py``): GRPO, Dr.GRPO, RLOO,
REINFORCE++, REINFORCE++-baseline.

Reward density is part of each signature: ``scores [B]`` = one scalar per response (sequence
density); ``token_rewards [B, T]`` = token density. Nothing here sums a dense reward into a scalar:
callers that hold token rewards reduce them explicitly (e.g. ``ops.masked_sum(r, mask, axis=1)``).
Groups are ``group_ids int32[B]`` with a static ``num_groups`` (``ops.contiguous_group_ids``).
All return ``(advantages [B, T], returns [B, T])``, stop-gradient, 0 on padding.
Reference: volcengine/verl ``verl/trainer/ppo/core_algos.py`` @ b178a3cd.
"""
from __future__ import annotations

from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops

Array = jax.Array
ArrayLike = chex.Array


def _broadcast(v, mask):
  m = ops.as_bool_mask(mask)
  return jnp.where(m, v[:, None], 0.0)                              # [B, T]


def _check(scores, mask, group_ids):
  chex.assert_rank(mask, 2, custom_message="`mask` must be [B, T]")
  ops.check_row_arrays(jnp.shape(mask)[0], scores=scores, group_ids=group_ids)


def grpo_advantages(scores: ArrayLike, mask: ArrayLike, group_ids: ArrayLike, num_groups: int, *,
                    eps: float = 1e-6, scale_by_std: bool = True) -> Tuple[Array, Array]:
  """GRPO (Shao et al., arXiv 2402.03300): ``a_i = (s_i − μ_g)/(σ_g + eps)``, broadcast over tokens.

  σ is the unbiased group std; a singleton group has μ = 0, σ = 1 (veRL). ``scale_by_std=False``
  gives Dr.GRPO (Liu et al., arXiv 2503.20783): ``a_i = s_i − μ_g``. Returns = advantages.
  Shapes: scores ``[B]`` (sequence density), mask ``[B, T]``, group_ids ``[B]``.
  """
  _check(scores, mask, group_ids)
  a = ops.grpo_normalize(scores, group_ids, num_groups, eps=eps, scale=scale_by_std)   # [B]
  adv = jax.lax.stop_gradient(_broadcast(a, mask))
  return adv, adv


def dr_grpo_advantages(scores: ArrayLike, mask: ArrayLike, group_ids: ArrayLike,
                       num_groups: int) -> Tuple[Array, Array]:
  """Dr.GRPO (arXiv 2503.20783): GRPO without the std division, ``a_i = s_i − μ_g``."""
  return grpo_advantages(scores, mask, group_ids, num_groups, scale_by_std=False)


def rloo_advantages(scores: ArrayLike, mask: ArrayLike, group_ids: ArrayLike,
                    num_groups: int) -> Tuple[Array, Array]:
  """Outcome RLOO (Ahmadian et al., arXiv 2402.14740): ``a_i = s_i − mean_{j≠i, j∈g} s_j``.

  Equals ``n_g/(n_g−1)·(s_i − μ_g)``; a singleton group keeps ``a_i = s_i`` (veRL). Broadcast over
  valid tokens; returns = advantages. Shapes: scores ``[B]``, mask ``[B, T]``, group_ids ``[B]``.
  """
  _check(scores, mask, group_ids)
  s = jnp.asarray(scores, jnp.float32)
  a = s - ops.leave_one_out_baseline(s, group_ids, num_groups)      # [B]
  adv = jax.lax.stop_gradient(_broadcast(a, mask))
  return adv, adv


def _keep_rows(m, row_mask):
  """The token mask with the rows of ``row_mask [B] == 0`` switched off (None: unchanged)."""
  if row_mask is None:
    return m
  ops.check_row_arrays(m.shape[0], row_mask=row_mask)
  return m & (jnp.asarray(row_mask) > 0)[:, None]


def reinforce_pp_advantages(token_rewards: ArrayLike, mask: ArrayLike, *,
                            gamma: float = 1.0, row_mask: ArrayLike = None) -> Tuple[Array, Array]:
  """REINFORCE++ (Hu, arXiv 2501.03262), veRL form; token density ``[B, T]``.

  Backward scan ``c ← r_t + γ c; G_t = c; c ← c·m_t`` (the return resets at masked tokens),
  ``A = whiten(G; m)·m`` (batch-global, veRL statistics). Returns ``(A, G)``.
  ``row_mask [B]``: rows where it is 0 leave the whitening statistics and get 0.
  """
  ops.check_token_arrays(token_rewards=token_rewards, mask=mask)
  r = jnp.asarray(token_rewards, jnp.float32)
  m = _keep_rows(ops.as_bool_mask(mask), row_mask)

  def step(c, r_t, m_t):
    c = r_t + gamma * c
    return jnp.where(m_t, c, 0.0), c

  returns = ops._reverse_scan_bt(step, jnp.zeros(r.shape[:1], r.dtype), r, m)   # [B, T]
  returns = jnp.where(m, returns, 0.0)
  adv = ops.masked_whiten(returns, m)
  return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(returns)


def reinforce_pp_baseline_advantages(scores: ArrayLike, mask: ArrayLike, group_ids: ArrayLike,
                                     num_groups: int, *, row_mask: ArrayLike = None) -> Tuple[Array, Array]:
  """REINFORCE++-baseline (veRL): ``a_i = s_i − μ_g`` (singleton: μ = 0), broadcast over valid
  tokens, then batch-global ``whiten(·; m)·m``. Returns = advantages.
  Shapes: scores ``[B]``, mask ``[B, T]``, group_ids ``[B]``; ``row_mask [B]`` (whole groups):
  rows where it is 0 leave the whitening statistics and get 0.
  """
  _check(scores, mask, group_ids)
  a = ops.grpo_normalize(scores, group_ids, num_groups, scale=False)   # [B]
  m = _keep_rows(ops.as_bool_mask(mask), row_mask)
  adv = ops.masked_whiten(_broadcast(a, m), m)
  adv = jax.lax.stop_gradient(adv)
  return adv, adv
