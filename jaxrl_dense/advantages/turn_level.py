"""IGPO turn-level advantages (arXiv 2510.14967).

Turn rewards `r [B, K]` (information gain p_{k+1} - p_k on non-final turns, alpha * F1 on the final
turn: `jaxrl_dense.rewards.information_gain_turn_rewards`) become token advantages:

  variant="code"  : G_{i,k} = sum_{k' >= k} gamma^{k'-k} r_{i,k'};  A_{i,t} = G_{i,k(t)} - mean_{j in g(i)} G_{j,t}
  variant="paper" : z = (r - mean_g r) / (std_g r + eps) over the group's valid turns; A = discounted
                    cumulative sum of z over turns, on the turn's tokens.

Turns follow `jaxrl_dense.ops` (`turn_ids [B, T]`, `turn_mask [B, K]`).
The code variant follows the official code, GuoqingWang1/IGPO `verl/trainer/ppo/core_algos.py`
`compute_grpo_outcome_advantage`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_dense import ops

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["igpo_advantages"]


def igpo_advantages(turn_rewards: ArrayLike, turn_mask: ArrayLike, turn_ids: ArrayLike,
                    mask: ArrayLike, group_ids: ArrayLike, num_groups: int, gamma: float = 1.0,
                    variant: str = "code", eps: float = 1e-6) -> Array:
  """IGPO advantages.

  variant="code" (official `compute_grpo_outcome_advantage`): token returns
    G_t = sum_{k' >= k(t)} gamma^{k'-k(t)} r_{k'} (turn rewards sit on turn-end tokens; the return is
    taken over the turn axis, so tool-output tokens neither add nor stop it), then
    A_{i,t} = G_{i,t} - mean_{j in g(i)} G_{j,t}   (position-wise group mean over all n group members,
    0 at positions where a member has no token; the std is computed but NOT applied in the code;
    singleton group: mean 0).
  variant="paper" [INFERRED from summaries]: z-normalise all valid turn rewards within the group
    (mean, unbiased std, eps), then discounted cumulative sum over turns, broadcast to turn tokens.

  Args:
    turn_rewards: `[B, K]`; turn_mask: `[B, K]`; turn_ids: int `[B, T]`; mask: `[B, T]`;
    group_ids: int `[B]` in [0, num_groups).

  Returns:
    (advantages `[B, T]`, returns `[B, T]`), float32, stop-gradient, 0 on masked tokens; returns
    equal the advantages (GRPO convention).
  """
  r = jnp.asarray(turn_rewards, jnp.float32)
  tm = jnp.asarray(turn_mask, jnp.float32)
  turn_ids = jnp.asarray(turn_ids)
  mask = jnp.asarray(mask, jnp.float32)
  group_ids = jnp.asarray(group_ids)
  chex.assert_rank([r, tm, turn_ids, mask], 2)
  chex.assert_equal_shape([r, tm])
  chex.assert_equal_shape([turn_ids, mask])
  chex.assert_shape(group_ids, (r.shape[0],))
  r = r * tm

  def turn_returns(x):  # [B, K] -> [B, K], reverse discounted cumsum over the turn axis
    def step(c, xs):
      xk, mk = xs
      c = (xk + gamma * c) * mk + c * (1.0 - mk)
      return c, c * mk
    _, g = lax.scan(step, jnp.zeros(x.shape[0], x.dtype), (x.T, tm.T), reverse=True)
    return g.T

  if variant == "code":
    g_tok = ops.broadcast_turns(turn_returns(r), turn_ids) * mask  # [B, T]
    cnt = jax.ops.segment_sum(jnp.ones_like(group_ids, jnp.float32), group_ids, num_groups)  # [G]
    tot = jax.ops.segment_sum(g_tok, group_ids, num_groups)  # [G, T]
    mean = jnp.where((cnt > 1)[:, None], tot / jnp.maximum(cnt, 1.0)[:, None], 0.0)  # [G, T]
    adv = (g_tok - mean[group_ids]) * mask
  elif variant == "paper":
    flat_g = jnp.repeat(group_ids, r.shape[1])  # [B*K]
    flat_r, flat_m = r.reshape(-1), tm.reshape(-1)
    cnt = jax.ops.segment_sum(flat_m, flat_g, num_groups)  # [G]
    mu = jax.ops.segment_sum(flat_r * flat_m, flat_g, num_groups) / jnp.maximum(cnt, 1.0)
    ss = jax.ops.segment_sum(((flat_r - mu[flat_g]) ** 2) * flat_m, flat_g, num_groups)
    sd = jnp.sqrt(ss / jnp.maximum(cnt - 1.0, 1.0))
    mu = jnp.where(cnt > 1, mu, 0.0)
    sd = jnp.where(cnt > 1, sd, 1.0)
    z = (r - mu[group_ids][:, None]) / (sd[group_ids][:, None] + eps) * tm  # [B, K]
    adv = ops.broadcast_turns(turn_returns(z), turn_ids) * mask
  else:
    raise ValueError(f"variant must be 'code' or 'paper', got {variant!r}.")
  adv = lax.stop_gradient(adv)
  return adv, adv
