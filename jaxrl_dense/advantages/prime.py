"""PRIME advantage: RLOO per reward source, then returns and whitening.

PRIME (Cui et al., arXiv 2502.01456, Sec. 3.3 Eq. 5) combines the token-level implicit process reward
(density ``[B, T]``) and the outcome label (density ``[B]``) with separate leave-one-out baselines.
References: veRL recipe ``prime/prime_core_algos.py::compute_rloo_advantage_return`` ("verl") and
PRIME-RL/PRIME ``core_algos.py::compute_rloo_returns`` ("original"); "paper" is Eq. 5 as printed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

VARIANTS = ("verl", "original", "paper")


def _check_n(b: int, n: int, fn: str):
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
    raise ValueError(f"{fn}: `n` (samples per prompt) must be a static Python int, got {n!r}")
  if n < 2:
    raise ValueError(f"{fn}: leave-one-out needs n >= 2 samples per prompt (group of size {n} "
                     "would divide by n − 1 = 0)")
  if b % n:
    raise ValueError(f"{fn}: B = {b} rows do not split into contiguous groups of n = {n}")


def _check_rows_nonempty(mask, fn):
  if ops.is_concrete(mask):
    lengths = np.asarray(jnp.sum(ops.as_bool_mask(mask), axis=-1))
    if (lengths == 0).any():
      raise ValueError(f"{fn}: rows {np.flatnonzero(lengths == 0).tolist()} of the reward mask are "
                       "empty; their mean reward is undefined (the reference yields NaN)")


def leave_one_out_token_rewards(rewards: ArrayLike, reward_mask: ArrayLike, *, n: int) -> Array:
  """PRIME's leave-one-out transform of one reward source (in both references below).

  For each group G of n contiguous rows, with ``μ_i = mean_{t∈M_i} r[i, t]`` and
  ``b_G = Σ_{j∈G} μ_j / (n − 1)``:  ``r'[i, t] = r[i, t]·n/(n−1) − b_G`` on M, 0 outside.
  For a single-token (outcome) reward this is exactly RLOO, ``r_i − mean_{j≠i} r_j``.
  Shapes: rewards, reward_mask ``[B, T]`` -> ``[B, T]``. Raises for n < 2 or empty mask rows.
  """
  b, _ = ops.check_token_arrays(rewards=rewards, reward_mask=reward_mask)
  _check_n(b, n, "leave_one_out_token_rewards")
  _check_rows_nonempty(reward_mask, "leave_one_out_token_rewards")
  m = ops.as_bool_mask(reward_mask)
  r = jnp.where(m, jnp.asarray(rewards, jnp.float32), 0.0)          # [B, T]
  mu = ops.masked_mean(r, m, axis=1)                                # [B]
  base = jnp.sum(mu.reshape(-1, n), axis=1) / (n - 1)               # [P]
  base = jnp.repeat(base, n)                                        # [B]
  return jnp.where(m, r * (n / (n - 1)) - base[:, None], 0.0)


def paper_process_baseline(rewards: ArrayLike, mask: ArrayLike, *, n: int) -> Array:
  """Eq. 5 process term: ``r[i, t] − (1/(n−1)) Σ_{j≠i} μ_j`` on valid tokens (μ_j = mean of row j).

  Differs from :func:`leave_one_out_token_rewards` by exactly ``(r[i, t] − μ_i)/(n − 1)``.
  """
  b, _ = ops.check_token_arrays(rewards=rewards, mask=mask)
  _check_n(b, n, "paper_process_baseline")
  _check_rows_nonempty(mask, "paper_process_baseline")
  m = ops.as_bool_mask(mask)
  r = jnp.where(m, jnp.asarray(rewards, jnp.float32), 0.0)
  mu = ops.masked_mean(r, m, axis=1)                                # [B]
  tot = jnp.repeat(jnp.sum(mu.reshape(-1, n), axis=1), n)           # [B]
  return jnp.where(m, r - ((tot - mu) / (n - 1))[:, None], 0.0)


@renamed_kwargs(variant="reference_impl", acc="outcome")
def prime_rloo_advantages(token_rewards: Optional[ArrayLike], outcome: Optional[ArrayLike],
                          mask: ArrayLike, *, n: int, reference_impl: str = "verl",
                          process_coef: Optional[float] = None,
                          outcome_coef: Optional[float] = None, process_gamma: float = 1.0,
                          outcome_gamma: float = 1.0,
                          whiten: Optional[bool] = None,
                          row_mask: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """PRIME RLOO advantages from token process rewards ``[B, T]`` and outcome labels ``[B]``.

  Let ``LOO`` be :func:`leave_one_out_token_rewards` (groups of n contiguous rows) and
  ``O[i, t] = acc_i`` at the last valid token (``L_i − 1``), with reward mask = that position.

  * ``reference_impl="verl"`` (veRL recipe, default): ``F = c_p·LOO(s; m) + c_o·LOO(O; one-hot)``,
    ``returns[i, t] = Σ_{s≥t} F[i, s]·m[i, s]`` (no discount), ``A = whiten(returns; m)`` with
    veRL's 1e-8 terms. Defaults ``c_p = c_o = 5`` (only the ratio matters after whitening).
  * ``reference_impl="original"`` (PRIME-RL/PRIME): no coefficients (defaults 1), each source discounted
    by its own γ over all positions, ``returns = D_process + D_outcome``, whiten without the
    mean epsilon.
  * ``reference_impl="paper"`` (Eq. 5): process ``r[i,t] − mean_{j≠i} μ_j`` discounted by γ_p, plus the
    outcome RLOO ``acc_i − mean_{j≠i} acc_j`` at the last token (γ_o = 1 broadcasts it to every
    token); coefficients default 1; no whitening by default.

  A source is skipped when its input is None or its coefficient is 0 (as the references do); with
  no source left, returns and advantages are all 0.

  ``row_mask [B]`` (optional, constant within each group): rows where it is 0 (out-of-band groups
  under ``--filter_mode=mask``) take no part in the whitening statistics, and their returns and
  advantages are 0. The leave-one-out is per group, so the other rows get exactly what this
  function gives on them alone (the masked rows must still be non-empty).

  Args:
    token_rewards: ``[B, T]`` process rewards (e.g. batch-normed implicit PRM scores) or None.
    outcome: ``[B]`` outcome labels or None.
    mask: ``[B, T]`` response mask (rows non-empty).
    n: static samples per prompt (≥ 2; n = 1 raises).
    row_mask: ``[B]`` 1 = the row takes part, 0 = it is masked out; None = all rows.
  Returns:
    ``(advantages [B, T], returns [B, T])``, stop-gradient, 0 on padding.
  """
  chex.assert_rank(mask, 2, custom_message="`mask` must be [B, T]")
  b = jnp.shape(mask)[0]
  if token_rewards is not None:
    ops.check_token_arrays(token_rewards=token_rewards, mask=mask)
  if outcome is not None:
    ops.check_row_arrays(b, outcome=outcome)
  if reference_impl not in VARIANTS:
    raise ValueError(f"`reference_impl` must be one of {VARIANTS}, got {reference_impl!r}")
  _check_n(b, n, "prime_rloo_advantages")
  if reference_impl == "verl" and (process_gamma != 1.0 or outcome_gamma != 1.0):
    raise ValueError("reference_impl='verl' has no discount (γ = 1); use reference_impl='original' for "
                     f"per-source gammas, got process_gamma={process_gamma}, "
                     f"outcome_gamma={outcome_gamma}")
  default_coef = 5.0 if reference_impl == "verl" else 1.0
  c_p = default_coef if process_coef is None else float(process_coef)
  c_o = default_coef if outcome_coef is None else float(outcome_coef)
  if whiten is None:
    whiten = reference_impl != "paper"

  m = ops.as_bool_mask(mask)                                        # [B, T]
  _check_rows_nonempty(m, "prime_rloo_advantages")
  parts = []
  if token_rewards is not None and c_p != 0.0:
    if reference_impl == "paper":
      proc = paper_process_baseline(token_rewards, m, n=n)
    else:
      proc = leave_one_out_token_rewards(token_rewards, m, n=n)     # [B, T]
    parts.append((c_p * proc, process_gamma))
  if outcome is not None and c_o != 0.0:
    out_mask = ops.place_at_last_token(jnp.ones((b,), jnp.float32), m) > 0   # [B, T]
    out_r = ops.place_at_last_token(outcome, m)                         # [B, T]
    parts.append((c_o * leave_one_out_token_rewards(out_r, out_mask, n=n), outcome_gamma))
  if not parts:  # the references then return all-zero returns and advantages
    parts.append((jnp.zeros(m.shape, jnp.float32), 1.0))

  if reference_impl == "verl":
    total = sum(p for p, _ in parts)
    returns = ops.reverse_cumsum(total, m)                          # [B, T]
  else:
    returns = sum(ops.reverse_cumsum(p, gamma=g) for p, g in parts)
    returns = jnp.where(m, returns, 0.0)
  if row_mask is not None:
    ops.check_row_arrays(b, row_mask=row_mask)
    m = m & (jnp.asarray(row_mask) > 0)[:, None]                    # [B, T] rows taking part
    returns = jnp.where(m, returns, 0.0)
  if whiten:
    mean_eps = 1e-8 if reference_impl == "verl" else 0.0
    adv = ops.masked_whiten(returns, m, mean_eps=mean_eps)
  else:
    adv = returns
  return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(returns)
