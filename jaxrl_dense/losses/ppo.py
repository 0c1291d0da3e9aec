"""PPO clipped policy losses (Schulman et al., arXiv 1707.06347).

veRL core ``compute_policy_loss_vanilla`` (used by the veRL PRIME recipe): log-ratio clamp,
asymmetric clip-higher (DAPO, arXiv 2503.14476), dual clip (Ye et al., arXiv 1912.09729).
PRIME-RL/PRIME's original policy loss: plain PPO clip, token mean.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense.losses import aggregation
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array


class PolicyLossOutput(NamedTuple):
  """``loss = loss_sum / count`` (differentiable); metrics are masked means over the batch."""
  loss: Array
  loss_sum: Array
  count: Array
  metrics: dict


class PPOTokenTerms(NamedTuple):
  token_loss: Array      # [B, T]
  clipped: Array         # [B, T] bool: L2 > L1 (ratio clip active)
  dual_clipped: Array    # [B, T] bool: Lc > L3 and A < 0 (dual clip active)
  neg_log_ratio: Array   # [B, T] −Δ (ppo_kl terms)


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def ppo_clip_token_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike, *,
                        clip_ratio_low: float = 0.2, clip_ratio_high: Optional[float] = None,
                        clip_ratio_c: Optional[float] = 3.0,
                        log_ratio_clamp: Optional[float] = 20.0) -> PPOTokenTerms:
  """Per-token PPO clip loss (veRL vanilla).

  ``Δ = clip(ℓ − o, −κ, κ)`` (κ = ``log_ratio_clamp``; None: no clamp), ``ρ = e^Δ``,
  ``L1 = −A ρ``, ``L2 = −A clip(ρ, 1 − ε_low, 1 + ε_high)``, ``Lc = max(L1, L2)``;
  dual clip (``c = clip_ratio_c``; None: off): ``L3 = −A c``, loss ``= min(L3, Lc)`` where
  ``A < 0`` else ``Lc``. ``clip_ratio_high=None`` means symmetric (``ε_high = ε_low``).
  Shapes: all ``[B, T]``.
  """
  ops.check_token_arrays(logp=logp, old_logp=old_logp, advantages=advantages)
  eps_high = clip_ratio_low if clip_ratio_high is None else clip_ratio_high
  if clip_ratio_c is not None and clip_ratio_c <= 1.0:
    raise ValueError(f"`clip_ratio_c` must be > 1 for dual clip, got {clip_ratio_c}")
  lp = jnp.asarray(logp, jnp.float32)
  a = jnp.asarray(advantages, jnp.float32)
  delta = lp - jnp.asarray(old_logp, jnp.float32)               # [B, T]
  if log_ratio_clamp is not None:
    delta = jnp.clip(delta, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(delta)
  l1 = -a * ratio
  l2 = -a * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + eps_high)
  lc = jnp.maximum(l1, l2)
  clipped = l2 > l1
  if clip_ratio_c is None:
    loss = lc
    dual = jnp.zeros_like(clipped)
  else:
    l3 = -a * clip_ratio_c
    loss = jnp.where(a < 0, jnp.minimum(l3, lc), lc)
    dual = (lc > l3) & (a < 0)
  return PPOTokenTerms(loss, clipped, dual, -delta)


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def ppo_clip_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                  mask: ArrayLike, *, clip_ratio_low: float = 0.2,
                  clip_ratio_high: Optional[float] = None, clip_ratio_c: Optional[float] = 3.0,
                  log_ratio_clamp: Optional[float] = 20.0, loss_agg_mode: str = "token-mean",
                  loss_scale_factor: Optional[float] = None) -> PolicyLossOutput:
  """PPO clip loss aggregated by ``loss_agg_mode`` (veRL ``compute_policy_loss_vanilla``).

  Token loss from :func:`ppo_clip_token_loss`; aggregation from ``losses.aggregation``.
  Metrics (veRL masked means, 1e-8 in the denominator): ``pg_clipfrac = mean_m[L2 > L1]``,
  ``pg_clipfrac_lower = mean_m[Lc > L3 ∧ A < 0]``, ``ppo_kl = mean_m(−Δ)``.
  Shapes: logp, old_logp, advantages, mask ``[B, T]``. Gradient flows into ``logp``.
  """
  ops.check_token_arrays(logp=logp, old_logp=old_logp, advantages=advantages,
                         mask=mask)
  terms = ppo_clip_token_loss(logp, old_logp, advantages, clip_ratio_low=clip_ratio_low,
                              clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
                              log_ratio_clamp=log_ratio_clamp)
  return loss_output(terms, terms.token_loss, mask, loss_agg_mode, loss_scale_factor)


def loss_output(terms: PPOTokenTerms, token_loss: ArrayLike, mask: ArrayLike, loss_agg_mode: str,
                loss_scale_factor: Optional[float] = None) -> PolicyLossOutput:
  """`token_loss` [B, T] aggregated by ``loss_agg_mode``, with the veRL metrics of ``terms``
  (masked means, 1e-8 in the denominator): pg_clipfrac, pg_clipfrac_lower, ppo_kl."""
  s, c = aggregation.aggregate_terms(token_loss, mask, loss_agg_mode, loss_scale_factor=loss_scale_factor)
  m = ops.as_bool_mask(mask)
  metrics = {
      "pg_clipfrac": ops.masked_mean(terms.clipped.astype(jnp.float32), m, eps=1e-8),
      "pg_clipfrac_lower": ops.masked_mean(terms.dual_clipped.astype(jnp.float32), m, eps=1e-8),
      "ppo_kl": jax.lax.stop_gradient(ops.masked_mean(terms.neg_log_ratio, m, eps=1e-8)),
  }
  return PolicyLossOutput(s / c, s, c, metrics)


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def prime_policy_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                      mask: ArrayLike, *, cliprange: float = 0.2) -> PolicyLossOutput:
  """PRIME-RL/PRIME's original policy loss (``training/verl/trainer/ppo/core_algos.py``
  ``compute_policy_loss``).

  ``ρ = e^(ℓ − o)`` (no clamp), token loss ``max(−Aρ, −A clip(ρ, 1−ε, 1+ε))``, no dual clip,
  token mean (masked mean without epsilon). Metrics: ``pg_clipfrac``, ``ppo_kl`` (= mean_m(o − ℓ)).
  """
  ops.check_token_arrays(logp=logp, old_logp=old_logp, advantages=advantages,
                         mask=mask)
  terms = ppo_clip_token_loss(logp, old_logp, advantages, clip_ratio_low=cliprange,
                              clip_ratio_high=cliprange, clip_ratio_c=None, log_ratio_clamp=None)
  s, c = aggregation.token_mean(terms.token_loss, mask)
  m = ops.as_bool_mask(mask)
  metrics = {
      "pg_clipfrac": ops.masked_mean(terms.clipped.astype(jnp.float32), m),
      "ppo_kl": jax.lax.stop_gradient(ops.masked_mean(terms.neg_log_ratio, m)),
  }
  return PolicyLossOutput(s / c, s, c, metrics)
