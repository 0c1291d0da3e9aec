"""The policy-loss menu: PPO, GSPO, GSPO-token and CISPO with one signature.

Every loss here is a per-token term function

    terms = fn(logp, old_logp, advantages, mask, *, clip_ratio_low, clip_ratio_high,
               clip_ratio_c) -> PPOTokenTerms(token_loss, clipped, dual_clipped, neg_log_ratio)

on ``[B, T]`` arrays (``mask`` 1 on response tokens). The jitted update multiplies
``token_loss`` by the rollout-correction weights (``losses.rollout_correction``) and aggregates
it with ``losses.aggregation`` under its global token / sequence count, as for PPO; losses that
do not use ``clip_ratio_c`` (the dual clip) ignore it. ``policy_loss`` does the same on one batch
(the veRL ``compute_policy_loss_*`` functions' value). Notation: ``ℓ = log π_θ``, ``o = log
π_old``, ``Δ = ℓ − o``, ``A`` the advantage, ``m`` the mask, ``L_i = Σ_t m_it``, ``sg`` stop-gradient.

* ``ppo`` (veRL ``vanilla``; Schulman et al. 1707.06347, clip-higher DAPO 2503.14476, dual clip
  1912.09729): ``ρ = exp(clip(Δ, ±20))``, ``max(−Aρ, −A clip(ρ, 1−ε_l, 1+ε_h))``, dual clip at c.
* ``ppo_original`` (PRIME-RL): plain clip, no ratio clamp, no dual clip.
* ``gspo`` (Zheng et al., Group Sequence Policy Optimization, 2507.18071, eq. 5; TRL
  ``importance_sampling_level="sequence"``): the sequence ratio
  ``s_i = exp(Σ_t m Δ / L_i)`` (differentiable) and the sequence advantage
  ``Â_i = Σ_t m A / L_i`` on every token: ``max(−Â_i s_i, −Â_i clip(s_i, 1−ε_l, 1+ε_h))``.
  With token-level advantages (PRIME's process rewards) only their row mean reaches it.
* ``gspo_token`` (2507.18071 eq. 10; veRL ``gspo``, TRL ``experimental/gspo_token``):
  ``s_it = sg(s_i) · exp(ℓ_t − sg(ℓ_t))`` (value s_i, gradient s_i ∇ℓ_t), log clamped at 10 (veRL),
  with the token advantages: ``max(−A_t s_it, −A_t clip(s_it, 1−ε_l, 1+ε_h))``. The GSPO that keeps
  dense rewards; with sequence-constant advantages its loss and gradient equal ``gspo``'s.
* ``cispo`` (MiniMax-M1, 2506.13585 eq. 4; veRL ``cispo``): ``−sg(clip(ρ, 1−ε_l, 1+ε_h)) · A · ℓ``
  with ``ρ = exp(clip(Δ, ±20))``: the clipped IS weight scales the REINFORCE term, so no token's
  gradient is dropped. TRL's ``clamp(ρ, max=ε_max)`` is ``ε_h = ε_max − 1`` with ``ε_l ≥ 1``.

Anchor defaults (``DEFAULT_CLIPS``, used when the flags are left at "loss default"): ppo
0.2 / 0.2 (veRL); gspo and gspo_token 3e-4 / 4e-4 (GSPO, arXiv 2507.18071 Sec. 5.1; veRL's GSPO scripts);
cispo ε_l = 10 (no lower bound) / ε_h = 0.2 (veRL's CISPO example; TRL/ScaleRL use ε_max = 5).
``DEFAULT_AGG``: seq-mean-token-mean for the GSPO pair (veRL forces it), token-mean otherwise.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense.losses.ppo import PolicyLossOutput, PPOTokenTerms, loss_output, ppo_clip_token_loss
from jaxrl_dense.registry import Registry
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

GSPO_LOG_RATIO_CLAMP = 10.0  # veRL clamps log s_it at 10 ("for numerical stability")
LOG_RATIO_CLAMP = 20.0       # veRL vanilla / cispo clamp Δ at ±20

DEFAULT_CLIPS = {"ppo": (0.2, 0.2), "ppo_original": (0.2, 0.2), "gspo": (3e-4, 4e-4),
                 "gspo_token": (3e-4, 4e-4), "cispo": (10.0, 0.2)}
DEFAULT_AGG = {"ppo": "token-mean", "ppo_original": "token-mean", "gspo": "seq-mean-token-mean",
               "gspo_token": "seq-mean-token-mean", "cispo": "token-mean"}


def _prep(logp, old_logp, advantages, mask):
  ops.check_token_arrays(logp=logp, old_logp=old_logp, advantages=advantages,
                         mask=mask)
  m = ops.as_bool_mask(mask)
  lp = jnp.asarray(logp, jnp.float32)
  # padding may hold junk (even inf): keep it out of every row reduction
  old = jnp.where(m, jnp.asarray(old_logp, jnp.float32), lp)
  a = jnp.where(m, jnp.asarray(advantages, jnp.float32), 0.0)
  return lp, old, a, m


def _row_mean(x, m):
  """Σ_t m x / max(L, 1) per row, [B, 1]."""
  mf = m.astype(jnp.float32)
  return jnp.sum(jnp.where(m, x, 0.0), axis=1, keepdims=True) / jnp.maximum(jnp.sum(mf, axis=1, keepdims=True), 1.0)


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def ppo_terms(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike, mask: ArrayLike, *,
              clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
              clip_ratio_c: Optional[float] = 3.0) -> PPOTokenTerms:
  """veRL vanilla PPO per token (``losses.ppo_clip_token_loss``: ratio clamp ±20, dual clip at
  ``clip_ratio_c``; None or <= 1 disables it)."""
  lp, old, a, _ = _prep(logp, old_logp, advantages, mask)
  c = clip_ratio_c if (clip_ratio_c is not None and clip_ratio_c > 1) else None
  return ppo_clip_token_loss(lp, old, a, clip_ratio_low=clip_ratio_low,
                             clip_ratio_high=clip_ratio_high, clip_ratio_c=c,
                             log_ratio_clamp=LOG_RATIO_CLAMP)


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def ppo_original_terms(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                       mask: ArrayLike, *, clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
                       clip_ratio_c: Optional[float] = None) -> PPOTokenTerms:
  """PRIME-RL's PPO per token: plain clip, no ratio clamp, no dual clip (``clip_ratio_c`` unused)."""
  del clip_ratio_c
  lp, old, a, _ = _prep(logp, old_logp, advantages, mask)
  return ppo_clip_token_loss(lp, old, a, clip_ratio_low=clip_ratio_low,
                             clip_ratio_high=clip_ratio_high, clip_ratio_c=None, log_ratio_clamp=None)


def _clip_pair(a, ratio, lo, hi):
  l1 = -a * ratio
  l2 = -a * jnp.clip(ratio, 1.0 - lo, 1.0 + hi)
  return jnp.maximum(l1, l2), l2 > l1


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def gspo_terms(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike, mask: ArrayLike, *,
               clip_ratio_low: float = 3e-4, clip_ratio_high: float = 4e-4,
               clip_ratio_c: Optional[float] = None,
               log_ratio_clamp: Optional[float] = GSPO_LOG_RATIO_CLAMP) -> PPOTokenTerms:
  """GSPO (2507.18071 eq. 5; TRL importance_sampling_level="sequence"), per token.

  ``s_i = exp(min(Σ_t m (ℓ − o) / L_i, 10))`` (differentiable), ``Â_i = Σ_t m A / L_i``;
  token loss ``max(−Â_i s_i, −Â_i clip(s_i, 1 − ε_l, 1 + ε_h))`` on each of row i's tokens, so a
  seq-mean-token-mean aggregate is the mean over sequences of the sequence loss. Shapes [B, T].
  ``log_ratio_clamp`` None drops the upper clamp of ``log s_i`` (TRL has none)."""
  del clip_ratio_c
  lp, old, a, m = _prep(logp, old_logp, advantages, mask)
  log_s = _row_mean(lp - old, m)  # [B, 1]
  if log_ratio_clamp is not None:
    log_s = jnp.minimum(log_s, log_ratio_clamp)
  s = jnp.exp(log_s)
  a_seq = _row_mean(a, m)  # [B, 1]
  loss, clipped = _clip_pair(a_seq, s, clip_ratio_low, clip_ratio_high)  # [B, 1]
  shape = lp.shape
  return PPOTokenTerms(jnp.broadcast_to(loss, shape), jnp.broadcast_to(clipped, shape) & m,
                       jnp.zeros(shape, bool), -(lp - old))


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def gspo_token_terms(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                     mask: ArrayLike, *, clip_ratio_low: float = 3e-4, clip_ratio_high: float = 4e-4,
                     clip_ratio_c: Optional[float] = None,
                     log_ratio_clamp: Optional[float] = GSPO_LOG_RATIO_CLAMP) -> PPOTokenTerms:
  """GSPO-token (2507.18071 eq. 10; veRL ``gspo``, TRL ``experimental/gspo_token``), per token.

  ``log s_it = min(sg(Σ_t m (ℓ − o) / L_i) + ℓ_t − sg(ℓ_t), 10)``; token loss
  ``max(−A_t s_it, −A_t clip(s_it, 1 − ε_l, 1 + ε_h))``: the sequence ratio's value with each
  token's own gradient and advantage (dense process rewards reach it). Shapes [B, T].
  ``log_ratio_clamp`` None drops the clamp (TRL's experimental GSPO-token has none)."""
  del clip_ratio_c
  lp, old, a, m = _prep(logp, old_logp, advantages, mask)
  sg = jax.lax.stop_gradient
  log_s = sg(_row_mean(lp - old, m)) + lp - sg(lp)  # [B, T]
  if log_ratio_clamp is not None:
    log_s = jnp.minimum(log_s, log_ratio_clamp)
  loss, clipped = _clip_pair(a, jnp.exp(log_s), clip_ratio_low, clip_ratio_high)
  return PPOTokenTerms(loss, clipped, jnp.zeros(lp.shape, bool), -(lp - old))


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def cispo_terms(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike, mask: ArrayLike, *,
                clip_ratio_low: float = 10.0, clip_ratio_high: float = 0.2,
                clip_ratio_c: Optional[float] = None,
                log_ratio_clamp: Optional[float] = LOG_RATIO_CLAMP) -> PPOTokenTerms:
  """CISPO (MiniMax-M1, 2506.13585 eq. 4; veRL ``cispo``), per token.

  ``ρ = exp(clip(ℓ − o, ±20))``, token loss ``−sg(clip(ρ, 1 − ε_l, 1 + ε_h)) · A · ℓ``; ``clipped``
  marks ρ outside the clip range (veRL's ``pg_clipfrac``). Shapes [B, T]. ``log_ratio_clamp``
  None drops the ±20 clamp (TRL's cispo has none)."""
  del clip_ratio_c
  lp, old, a, _ = _prep(logp, old_logp, advantages, mask)
  delta = lp - old
  if log_ratio_clamp is not None:
    delta = jnp.clip(delta, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(delta)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  loss = -jax.lax.stop_gradient(clipped_ratio) * a * lp
  return PPOTokenTerms(loss, ratio != clipped_ratio, jnp.zeros(lp.shape, bool), -delta)


# The per-token terms by name: what `--policy_loss` selects and the jitted update dispatches on
# (re-exported as `losses.POLICY_LOSSES` / `losses.get_policy_loss`).
POLICY_LOSSES = Registry("policy loss")
POLICY_LOSSES.register("ppo", ppo_terms)
POLICY_LOSSES.register("ppo_original", ppo_original_terms)
POLICY_LOSSES.register("gspo", gspo_terms)
POLICY_LOSSES.register("gspo_token", gspo_token_terms)
POLICY_LOSSES.register("cispo", cispo_terms)


@renamed_kwargs(log_prob="logp", old_log_prob="old_logp")
def policy_loss(name: str, logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                mask: ArrayLike, *, clip_ratio_low: Optional[float] = None,
                clip_ratio_high: Optional[float] = None, clip_ratio_c: Optional[float] = 3.0,
                loss_agg_mode: Optional[str] = None, is_weights: Optional[ArrayLike] = None,
                loss_scale_factor: Optional[float] = None, **loss_options) -> PolicyLossOutput:
  """One batch's policy loss by registry name (``POLICY_LOSSES`` in ``losses``), veRL's value.

  ``loss = agg(token_loss · w, m)`` with ``w`` the rollout-correction weights (``is_weights``
  [B, T], no gradient; None = 1) and ``agg`` = ``loss_agg_mode`` (None: the loss's
  ``DEFAULT_AGG``). Clip values None take ``DEFAULT_CLIPS[name]``; ``loss_options`` go to the
  term function (e.g. ``log_ratio_clamp=None`` for TRL's unclamped GSPO / CISPO). Metrics: ``pg_clipfrac``,
  ``pg_clipfrac_lower`` (dual clip; 0 for the others), ``ppo_kl = mean_m(o − ℓ)``."""
  fn = POLICY_LOSSES.get(name)
  lo, hi = DEFAULT_CLIPS[name]
  lo = lo if clip_ratio_low is None else clip_ratio_low
  hi = hi if clip_ratio_high is None else clip_ratio_high
  terms = fn(logp, old_logp, advantages, mask, clip_ratio_low=lo, clip_ratio_high=hi,
             clip_ratio_c=clip_ratio_c, **loss_options)
  x = terms.token_loss
  if is_weights is not None:
    x = x * jax.lax.stop_gradient(jnp.asarray(is_weights, jnp.float32))
  return loss_output(terms, x, mask, loss_agg_mode or DEFAULT_AGG[name], loss_scale_factor)
