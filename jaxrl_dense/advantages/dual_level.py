"""MatchTIR dual-level advantage (arXiv 2601.10712).

Fuses a trajectory-level GRPO advantage with a turn-level advantage computed from discounted turn
returns normalised across the samples of the same prompt that reach the same turn index:

  R_i         = sum_k r_{i,k}
  A^traj_i    = (R_i - mean_g R) / (std_g R + eps)                     (GRPO, unbiased std)
  G_{i,k}     = sum_{k' >= k} lambda^{k'-k} r_{i,k'}                    (lambda = 0.9)
  A^turn_{i,k}= (G_{i,k} - mean_{j in g, turn k exists} G_{j,k}) / (std + eps)
  A_{i,t}     = w * A^traj_i + (1 - w) * A^turn_{i,k(t)}   on tokens of turn k (w = 1/2), 0 elsewhere.

Singleton sets (one sample in the group, or one sample reaching turn k) use mean 0, std 1 (verl GRPO
convention). Turns are the maximal runs of `mask = 1` (tool outputs masked); see
`jaxrl_dense.ops.turn_ids_from_mask`.
Official code: quchangle1/MatchTIR `Code/verl/trainer/ppo/core_algos.py` (modified GRPO advantage).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_dense import ops

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["discounted_turn_returns", "per_turn_group_normalize", "dual_level_advantages"]


def discounted_turn_returns(r_turn: ArrayLike, turn_mask: ArrayLike, discount: float = 0.9) -> Array:
  """G_{i,k} = sum_{k' >= k, valid} discount^{k'-k} r_{i,k'}  (`[B, K] -> [B, K]`, 0 on invalid)."""
  r = jnp.asarray(r_turn, jnp.float32)
  tm = jnp.asarray(turn_mask, jnp.float32)
  chex.assert_rank([r, tm], 2)
  chex.assert_equal_shape([r, tm])

  def step(c, xs):
    rk, mk = xs
    c = (rk * mk + discount * c) * mk + c * (1.0 - mk)
    return c, c * mk

  _, g = lax.scan(step, jnp.zeros(r.shape[0], r.dtype), (r.T, tm.T), reverse=True)
  return g.T


def per_turn_group_normalize(v: ArrayLike, turn_mask: ArrayLike, group_ids: ArrayLike,
                             num_groups: int, eps: float = 1e-6, scale: bool = True) -> Array:
  """Normalises `v [B, K]` over the samples of each group that have turn k.

  out[i,k] = (v[i,k] - mean_{j in g(i), turn_mask[j,k]} v[j,k]) / (std + eps)  (unbiased std);
  a (group, turn) cell with one member uses mean 0, std 1. 0 where turn_mask = 0.
  """
  v = jnp.asarray(v, jnp.float32)
  tm = jnp.asarray(turn_mask, jnp.float32)
  group_ids = jnp.asarray(group_ids)
  chex.assert_rank([v, tm], 2)
  chex.assert_equal_shape([v, tm])
  chex.assert_shape(group_ids, (v.shape[0],))
  cnt = jax.ops.segment_sum(tm, group_ids, num_groups)  # [G, K]
  mu = jax.ops.segment_sum(v * tm, group_ids, num_groups) / jnp.maximum(cnt, 1.0)  # [G, K]
  dev = ((v - mu[group_ids]) ** 2) * tm  # [B, K]
  sd = jnp.sqrt(jax.ops.segment_sum(dev, group_ids, num_groups) / jnp.maximum(cnt - 1.0, 1.0))
  single = cnt <= 1  # [G, K]
  mu = jnp.where(single, 0.0, mu)
  sd = jnp.where(single, 1.0, sd)
  out = v - mu[group_ids]
  if scale:
    out = out / (sd[group_ids] + eps)
  return out * tm


def dual_level_advantages(r_turn: ArrayLike, turn_mask: ArrayLike, turn_ids: ArrayLike,
                          mask: ArrayLike, group_ids: ArrayLike, num_groups: int,
                          turn_discount: float = 0.9, traj_weight: float = 0.5,
                          eps: float = 1e-6) -> Array:
  """MatchTIR dual-level token advantages (see module docstring).

  Args:
    r_turn: `[B, K]` turn rewards (e.g. `turn_rewards_from_calls`).
    turn_mask: `[B, K]` 1 for turns that exist.
    turn_ids: int `[B, T]` turn of each token (-1 on masked tokens).
    mask: `[B, T]`.
    group_ids: int `[B]`; num_groups: static G.
    turn_discount: lambda (0.9, hard-coded in the official code).
    traj_weight: weight w of the trajectory-level advantage (1/2 in the official code).

  Returns:
    (advantages `[B, T]`, returns `[B, T]`), float32, stop-gradient, 0 on masked tokens; returns
    equal the advantages (GRPO convention).
  """
  r = jnp.asarray(r_turn, jnp.float32)
  tm = jnp.asarray(turn_mask, jnp.float32)
  turn_ids = jnp.asarray(turn_ids)
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_rank([r, tm, turn_ids, mask], 2)
  chex.assert_equal_shape([r, tm])
  chex.assert_equal_shape([turn_ids, mask])
  chex.assert_equal_shape_prefix([r, turn_ids], 1)
  if not 0.0 <= traj_weight <= 1.0:
    raise ValueError(f"traj_weight must be in [0, 1], got {traj_weight}.")
  total = jnp.sum(r * tm, axis=1)  # [B]
  a_traj = ops.grpo_normalize(total, group_ids, num_groups, eps=eps)  # [B]
  g = discounted_turn_returns(r, tm, turn_discount)  # [B, K]
  a_turn = per_turn_group_normalize(g, tm, group_ids, num_groups, eps=eps)  # [B, K]
  fused = traj_weight * a_traj[:, None] + (1.0 - traj_weight) * a_turn  # [B, K]
  adv = lax.stop_gradient(ops.broadcast_turns(fused, turn_ids) * mask)  # [B, T]
  return adv, adv
