"""GAE with a value model (Schulman et al., arXiv 1506.02438).

Reference: veRL ``verl/trainer/ppo/core_algos.py`` ``compute_gae_advantage_return`` (reference_impl="verl");
PRIME-RL/PRIME ``training/verl/trainer/ppo/core_algos.py`` (reference_impl="original").

Token density: ``token_rewards [B, T]`` (e.g. outcome on the last token plus per-token penalties).
"""
from __future__ import annotations

from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

VARIANTS = ("verl", "original")


@renamed_kwargs(variant="reference_impl")
def gae_advantages(token_rewards: ArrayLike, values: ArrayLike, mask: ArrayLike, *,
                   gamma: float = 1.0, lam: float = 1.0,
                   reference_impl: str = "verl") -> Tuple[Array, Array]:
  """GAE advantages and returns.

  ``δ_t = r_t + γ V_{t+1} − V_t``, ``A_t = δ_t + γλ A_{t+1}``, ``returns = A + V``,
  ``advantages = whiten(A; m)`` (batch-global).

  * ``reference_impl="verl"`` (veRL core): mask-aware scan — padded positions carry the next value and the
    λ-return through unchanged, and the value after the last valid token is 0 (``ops.gae``).
  * ``reference_impl="original"`` (PRIME-RL/PRIME's older veRL): plain scan over all T with
    ``V_{t+1}`` taken as is (padding values leak into the last valid token); whitening without
    the mean epsilon.

  Shapes: token_rewards, values, mask ``[B, T]`` -> ``(advantages, returns)`` ``[B, T]``,
  stop-gradient, 0 on padding.
  """
  ops.check_token_arrays(token_rewards=token_rewards, values=values, mask=mask)
  if reference_impl not in VARIANTS:
    raise ValueError(f"`reference_impl` must be one of {VARIANTS}, got {reference_impl!r}")
  m = ops.as_bool_mask(mask)
  r = jnp.asarray(token_rewards, jnp.float32)
  v = jnp.asarray(values, jnp.float32)
  if reference_impl == "verl":
    a = ops.gae(r, v, m, gamma, lam)
    mean_eps = 1e-8
  else:
    nextv = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)   # [B, T]
    delta = r + gamma * nextv - v                                           # [B, T]
    a = ops.reverse_cumsum(delta, gamma=gamma * lam)
    mean_eps = 0.0
  returns = jnp.where(m, a + v, 0.0)
  adv = ops.masked_whiten(a, m, mean_eps=mean_eps)
  return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(returns)
