"""PRL: Process Reward Learning advantage (arXiv 2601.10201).

From the KL-regularised objective E[r] - (1/eta) KL(pi || pi_0), the optimum satisfies
r - (1/eta) log pi*/pi_0 = const; decomposed along the sequence, the outcome reward becomes per-step
rewards: the GRPO outcome advantage minus (1/eta) times the log-ratio of the remaining suffix.

  A~_i     = (o_i - mean_g o) / (std_g o + eps)            (GRPO; singleton group: mean 0, std 1)
  d_t      = (logp_old_t - logp_ref_t) * m_t
  D_t      = sum_{s >= t} d_s                                (suffix sum, includes t)
  A_{i,t}  = A~_i - D_{i, e(t)} / eta                        e(t) = last token of t's step

eta = 0 disables PRL (plain GRPO advantage on every valid token).
Steps: fixed length K (`ops.fixed_length_step_ids`) or split at newline tokens
(`ops.step_ids_from_delimiter`); the last valid token always ends the last step.

Paper vs code [CODE≠PAPER quirk]: the official code broadcasts the step-end values by "fill each
zero with the next non-zero to its right" (`left_fill_by_next_nonzero`), so a step whose end value
D_{e} is exactly 0 takes the value of the next step (and tokens after the last non-zero value get 0).
`nonzero_fill_quirk=True` reproduces that; the default uses explicit step ids.
Official code: MaxwellJryao/Process-Reward-Learning (verl/trainer/ppo/core_algos.py,
verl/trainer/ppo/ray_trainer.py).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["fill_by_next_nonzero", "prl_advantages"]


def fill_by_next_nonzero(x: ArrayLike, mask: ArrayLike) -> Array:
  """out[b, t] = x[b, t] if x[b, t] != 0 else the first non-zero x[b, s], s > t (0 if none).

  Only valid tokens are read and written (padding output 0). This is the PRL repo's broadcast.
  """
  x = jnp.asarray(x, jnp.float32)
  m = ops.as_bool_mask(mask)
  chex.assert_rank([x, m], 2)
  chex.assert_equal_shape([x, m])
  x = jnp.where(m, x, 0.0)

  def step(c, xs):
    xt, mt = xs
    c = jnp.where(mt & (xt != 0), xt, c)
    return c, c

  _, out = lax.scan(step, jnp.zeros(x.shape[0], x.dtype), (x.T, m.T), reverse=True)
  return jnp.where(m, out.T, 0.0)


@renamed_kwargs(logp_ref="ref_logp", logp_old="old_logp")
def prl_advantages(outcome: ArrayLike, old_logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike,
                   group_ids: ArrayLike, num_groups: int, step_ids: ArrayLike, eta: float = 200.0,
                   norm_by_std: bool = True, eps: float = 1e-6,
                   nonzero_fill_quirk: bool = False) -> Array:
  """PRL token advantages (see module docstring).

  Args:
    outcome: `[B]` outcome rewards (e.g. 0/1 verifier results).
    old_logp: `[B, T]` behaviour-policy log-probs of the realized tokens.
    ref_logp: `[B, T]` reference log-probs.
    mask: `[B, T]`.
    group_ids: int `[B]`; num_groups: static G.
    step_ids: int `[B, T]` step of each token (-1 on masked tokens), steps contiguous.
    eta: inverse KL strength; 0 disables the process term (plain GRPO).
    norm_by_std: divide by the group std (GRPO) or only centre.
    nonzero_fill_quirk: reproduce the official next-non-zero broadcast.

  Returns:
    (advantages `[B, T]`, returns `[B, T]`), float32, stop-gradient, 0 on padding; returns equal
    the advantages (GRPO convention).
  """
  lo, lr = jnp.asarray(old_logp, jnp.float32), jnp.asarray(ref_logp, jnp.float32)
  ops.check_token_arrays(old_logp=lo, ref_logp=lr, mask=mask, step_ids=step_ids)
  ops.check_row_arrays(lo.shape[0], outcome=outcome, group_ids=group_ids)
  if eta < 0:
    raise ValueError(f"eta must be >= 0 (0 disables PRL), got {eta}.")
  m = ops.as_bool_mask(mask)
  a_out = ops.grpo_normalize(jnp.asarray(outcome, jnp.float32), group_ids, num_groups, eps=eps,
                             scale=norm_by_std)  # [B]
  adv = jnp.where(m, a_out[:, None], 0.0)  # [B, T]
  if eta == 0:
    adv = lax.stop_gradient(adv)
    return adv, adv
  d = jnp.where(m, lo - lr, 0.0)  # [B, T]
  suffix = ops.reverse_cumsum(d, m)  # [B, T]  D_t
  step_ids = jnp.asarray(step_ids)
  ends = ops.step_ends_from_ids(step_ids) & m  # [B, T]
  if nonzero_fill_quirk:
    at_end = fill_by_next_nonzero(jnp.where(ends, suffix, 0.0), m)  # [B, T]
  else:
    num_steps = step_ids.shape[1]  # static upper bound: at most one step per token
    step_val = ops.segment_sum(jnp.where(ends, suffix, 0.0), step_ids, num_steps)  # [B, S]
    at_end = ops.broadcast_steps(step_val, step_ids)  # [B, T]
  adv = lax.stop_gradient(jnp.where(m, adv - at_end / eta, 0.0))
  return adv, adv
