"""KL estimators between the policy and the reference (veRL ``core_algos.py`` ``kl_penalty``).

With ``d = ℓ − ℓ_ref`` (per-token log-probs of the sampled token), Schulman's estimators
(http://joschu.net/blog/kl-approx.html):
  k1 / "kl": d;   "abs": |d|;   k2 / "mse": d²/2;
  k3 / "low_var_kl": with ``u = clip(ℓ_ref − ℓ, −20, 20)``, ``clip(e^u − u − 1, −10, 10)``.
All are elementwise ``[B, T] -> [B, T]`` and differentiable in ``logp`` (for a KL loss).
PRIME trains with no KL term (κ = 0 in both references).
"""
from __future__ import annotations

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array


def _d(logp, ref_logp):
  ops.check_token_arrays(logp=logp, ref_logp=ref_logp)
  return jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)


@renamed_kwargs(log_prob="logp", ref_log_prob="ref_logp")
def kl_k1(logp: ArrayLike, ref_logp: ArrayLike) -> Array:
  """k1: ``ℓ − ℓ_ref`` (unbiased, high variance)."""
  return _d(logp, ref_logp)


@renamed_kwargs(log_prob="logp", ref_log_prob="ref_logp")
def kl_abs(logp: ArrayLike, ref_logp: ArrayLike) -> Array:
  """``|ℓ − ℓ_ref|``."""
  return jnp.abs(_d(logp, ref_logp))


@renamed_kwargs(log_prob="logp", ref_log_prob="ref_logp")
def kl_k2(logp: ArrayLike, ref_logp: ArrayLike) -> Array:
  """k2 ("mse"): ``½ (ℓ − ℓ_ref)²``."""
  return 0.5 * jnp.square(_d(logp, ref_logp))


@renamed_kwargs(log_prob="logp", ref_log_prob="ref_logp")
def kl_k3(logp: ArrayLike, ref_logp: ArrayLike) -> Array:
  """k3 ("low_var_kl"): ``u = clip(ℓ_ref − ℓ, −20, 20)``, ``clip(e^u − u − 1, −10, 10)``."""
  u = jnp.clip(-_d(logp, ref_logp), -20.0, 20.0)
  return jnp.clip(jnp.exp(u) - u - 1.0, -10.0, 10.0)


@renamed_kwargs(old_log_prob="old_logp", ref_log_prob="ref_logp")
def kl_in_reward(token_scores: ArrayLike, old_logp: ArrayLike, ref_logp: ArrayLike, *,
                 kl_coef: float, mask: Optional[ArrayLike] = None,
                 estimator: Callable[[ArrayLike, ArrayLike], Array] = kl_k1) -> Array:
  """KL-in-reward (veRL ``compute_rewards``): ``r_t = s_t − κ·kl(o_t, ℓ_ref,t)`` with fixed κ.

  Default estimator k1: ``r = s − κ (o − ℓ_ref)``. With ``mask``, the penalty is applied on valid
  tokens only and the output is 0 on padding. Shapes ``[B, T]``; stop-gradient (it is a reward).
  """
  ops.check_token_arrays(token_scores=token_scores, old_logp=old_logp,
                         ref_logp=ref_logp)
  r = jnp.asarray(token_scores, jnp.float32) - kl_coef * estimator(old_logp, ref_logp)
  if mask is not None:
    ops.check_token_arrays(token_scores=token_scores, mask=mask)
    r = jnp.where(ops.as_bool_mask(mask), r, 0.0)
  return jax.lax.stop_gradient(r)
