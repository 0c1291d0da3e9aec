"""SAR: Self-Aligned Reward (arXiv 2509.05489).

An answer that "needs" the question is better: compare the answer's perplexity with and without the
query. With nll_qa = -mean_t log p(a_t | q, a_<t) and nll_a = -mean_t log p(a_t | empty query, a_<t),
ppl = exp(nll):

  R_SA = max((ppl(a) - ppl(a|q)) / (ppl(a) + 1e-9), -1)            (default)
       = max(1 - exp(nll_qa - nll_a), -1)  up to the 1e-9            (computed this way when stable)

Options (as in the official `compute_ppl_qa_log`): `use_log` uses nll instead of ppl for both terms;
`clip_value > 1` caps each term at clip_value; `use_denominator=False` gives `A - QA`;
`use_comparison=False` (requires use_denominator=False) gives `-QA + 5`.
Training reward: `R = R_verifiable + factor * s(t) * R_SA` with factor 0.2 and s(t) = 1 (constant).

Official code: amazon-science/Self-Aligned-Reward-Towards_Effective_and_Efficient_Reasoners
(verl/utils/reward_score/efficiency_reward.py `compute_ppl_qa_log`, verl/utils/reward_score/__init__.py).
Use the behaviour (rollout) log-probs for both terms.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_dense import ops

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["self_aligned_reward", "sar_schedule", "combine_with_sar"]


def self_aligned_reward(logp_qa: ArrayLike, logp_a: ArrayLike, mask: ArrayLike,
                        mask_a: ArrayLike | None = None, *, use_log: bool = False,
                        use_denominator: bool = True, use_comparison: bool = True,
                        clip_value: float | None = None) -> Array:
  """Self-aligned reward per response.

  Args:
    logp_qa: `[B, T]` log-probs of the answer tokens given the query (rollout context).
    logp_a: `[B, T']` log-probs of the same answer tokens with an empty user message.
    mask: `[B, T]` answer mask for `logp_qa`.
    mask_a: `[B, T']` answer mask for `logp_a` (defaults to `mask`; both must cover the same
      number of tokens per row when given).
    use_log, use_denominator, use_comparison, clip_value: see module docstring. `clip_value` is
      applied only when > 1, as in the official code.

  Returns:
    `[B]` float32 rewards (stop-gradient). An empty answer (no valid tokens) has nll = 0 in both
    contexts and gets reward 0 (default form).
  """
  logp_qa = jnp.asarray(logp_qa, jnp.float32)
  logp_a = jnp.asarray(logp_a, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  mask_a = mask if mask_a is None else jnp.asarray(mask_a, jnp.float32)
  chex.assert_rank([logp_qa, logp_a, mask, mask_a], 2)
  chex.assert_equal_shape([logp_qa, mask])
  chex.assert_equal_shape([logp_a, mask_a])
  chex.assert_equal_shape_prefix([logp_qa, logp_a], 1)
  if not use_comparison and use_denominator:
    raise ValueError("use_comparison=False requires use_denominator=False (as in the official code).")
  nll_qa = -ops.masked_mean(logp_qa, mask, axis=1)  # [B]
  nll_a = -ops.masked_mean(logp_a, mask_a, axis=1)  # [B]
  clip = clip_value is not None and clip_value > 1
  if use_log:
    qa_term, a_term = nll_qa, nll_a
  else:
    qa_term, a_term = jnp.exp(nll_qa), jnp.exp(nll_a)
  if clip:
    qa_term = jnp.minimum(qa_term, clip_value)
    a_term = jnp.minimum(a_term, clip_value)
  if not use_comparison:
    r = -qa_term + 5.0
  elif use_denominator:
    if use_log or clip:
      r = (a_term - qa_term) / (a_term + 1e-9)
    else:
      # (ppl_a - ppl_qa) / ppl_a in log form: no overflow for large nll. ppl_a >= 1 so the 1e-9
      # changes the value by < 1e-9 relative.
      r = -jnp.expm1(nll_qa - nll_a)
    r = jnp.maximum(r, -1.0)
  else:
    r = a_term - qa_term
  return lax.stop_gradient(r)


def sar_schedule(step_ratio: ArrayLike, kind: str = "constant", peak_pos: float = 0.5,
                 bottom: float = 0.0, increase: bool = True, decrease: bool = True) -> Array:
  """Scheduler s(t) for the SAR coefficient, t = step_ratio = current step / total steps in [0, 1].

  constant: s = 1.
  linear:   s = bottom + (1 - bottom) * t / peak                    for t <= peak (1 if not increase)
            s = 1 - (1 - bottom) * (t - peak) / (1 - peak)          for t > peak  (1 if not decrease)
  (official `_default_compute_score` alpha scheduler.)
  """
  t = jnp.asarray(step_ratio, jnp.float32)
  if kind == "constant":
    return jnp.ones_like(t)
  if kind != "linear":
    raise ValueError(f"kind must be 'constant' or 'linear', got {kind!r}.")
  if not 0.0 < peak_pos < 1.0:
    raise ValueError(f"peak_pos must be in (0, 1), got {peak_pos}.")
  up = bottom + (1.0 - bottom) * (t / peak_pos) if increase else jnp.ones_like(t)
  down = 1.0 - (1.0 - bottom) * ((t - peak_pos) / (1.0 - peak_pos)) if decrease else jnp.ones_like(t)
  return jnp.where(t <= peak_pos, up, down)


def combine_with_sar(verifiable: ArrayLike, r_sa: ArrayLike, factor: float = 0.2,
                     schedule: ArrayLike = 1.0) -> Array:
  """Training reward `R = R_verifiable + factor * s(t) * R_SA`  (`[B]`, `[B]` -> `[B]`).

  Validation uses the verifiable reward only (do not call this at eval time).
  """
  verifiable = jnp.asarray(verifiable, jnp.float32)
  r_sa = jnp.asarray(r_sa, jnp.float32)
  chex.assert_rank([verifiable, r_sa], 1)
  chex.assert_equal_shape([verifiable, r_sa])
  return verifiable + factor * schedule * r_sa
