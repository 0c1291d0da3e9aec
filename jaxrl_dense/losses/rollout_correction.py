"""Rollout correction: importance weights and rejection masks between the sampler and the trainer.

Three policies take part in an update: the sampler's behaviour policy ``μ`` (its log-probs come
with the rollout: a bf16 decode, top-p / top-k truncation, another kernel), the old policy
``π_old`` (the trainer's recomputed log-probs of the same weights) and the current ``π_θ``. PPO's
ratio ``π_θ / π_old`` assumes the samples came from ``π_old``; they came from ``μ``. With
``r = π_old / μ`` per token (``log r = o − b``, ``b = log μ``):

* truncated IS (TIS; Yao et al., "Your efficient RL framework secretly brings you off-policy RL
  training", 2025; veRL ``rollout_is``): the token loss is multiplied by ``w`` (no gradient)

      token     w_t = min(r_t, C)                        (veRL decoupled_token_is, TRL token_truncate)
      sequence  w_i = min(Π_t r_t, C) on every token     (veRL decoupled_seq_is, TRL sequence_truncate)

  with ``exp`` taken of the log clamped to ±20 (veRL); an optional lower truncation ``C_low``
  (TRL's clip_min) gives ``clip(r, C_low, C)``.
* rejection (masked IS, MIS; veRL ``rollout_rs``, TRL ``*_mask``): tokens / whole sequences whose
  ratio lies outside ``[C_min, C_max]`` leave the loss and its token count

      token      keep_t = C_min ≤ r_t ≤ C_max
      sequence   keep_i = C_min ≤ Π_t r_t ≤ C_max          (veRL seq_sum_k1, TRL sequence_mask)
      geometric  keep_i = C_min ≤ exp(Σ_t m log r_t / L_i) ≤ C_max   (veRL seq_mean_k1, "Geo-RS")
      k3         keep_i = Σ_t m (r_t − 1 − log r_t) / L_i ≤ K      (veRL seq_mean_k3)

  veRL states its k1 bounds on ``−log r`` (i.e. on ``μ / π_old``): its ``"L_U"`` is our
  ``[1/U, 1/L]``, identical for the symmetric defaults (0.5_2.0, 0.999_1.001 up to rounding).
* bypass (veRL ``bypass_mode``): ``π_old := μ`` (no recomputation); the PPO ratio ``π_θ / μ`` is
  then itself the importance weight, so only rejection applies (computed from ``sg(π_θ)`` and μ).

Identical ``μ`` and ``π_old`` give weights exactly 1 and keep every token (``log r = 0``).
Metrics (veRL's names without the ``rollout_corr/`` prefix, masked over valid tokens / rows):
``is_mean``, ``is_max``, ``is_min`` (the untruncated weight; sequence level: its exp(±20)-clamped
value; the mean token weighted, max / min per row), ``is_frac_high`` / ``is_frac_low`` (above C / below 1/C), ``is_ess`` (effective sample size
``1 / mean((w̃ / mean w̃)²)`` of the weights clamped to [1/C, C], veRL), ``rs_masked_frac`` (tokens),
``rs_seq_masked_frac`` (rows losing a token), and the mismatch ``kl = mean(b − o)``,
``k3_kl = mean(r − log r − 1)``, ``chi2_token = mean(r²) − 1``, ``chi2_seq = mean_i((Π r)²) − 1``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

SAFETY_BOUND = 20.0  # veRL: exp of log-ratios clamped to ±20
IS_LEVELS = ("none", "token", "sequence")
RS_LEVELS = ("none", "token", "sequence", "geometric", "k3")


class CorrectionOutput(NamedTuple):
  """weights: float32 [B, T] IS weights (0 on padding; 1 on valid tokens without IS); keep:
  float32 [B, T] rejection mask (1 = kept; 0 on padding); metrics: {name: scalar}."""
  weights: Array
  keep: Array
  metrics: dict


def _masked_mean(x, m):
  return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)


def _row_sum(x, m):
  return jnp.sum(jnp.where(m, x, 0.0), axis=1)


def is_weights(log_ratio: ArrayLike, mask: ArrayLike, *, level: str = "token", threshold: float = 2.0,
               low: Optional[float] = None) -> Array:
  """Truncated IS weights [B, T] from ``log r = log π_old − log μ`` (no gradient; 0 on padding).

  token: ``clip(exp(clip(log r, ±20)), low, threshold)``; sequence: the same of
  ``Σ_t m log r`` on every token of the row. ``low`` None: no lower truncation."""
  ops.check_token_arrays(log_ratio=log_ratio, mask=mask)
  if level not in ("token", "sequence"):
    raise ValueError(f"rollout IS level {level!r}; expected 'token' or 'sequence'")
  if not threshold > 0:
    raise ValueError(f"rollout IS threshold must be > 0, got {threshold}")
  m = ops.as_bool_mask(mask)
  lr = jnp.where(m, jnp.asarray(log_ratio, jnp.float32), 0.0)
  if level == "sequence":
    lr = jnp.broadcast_to(jnp.sum(lr, axis=1, keepdims=True), lr.shape)
  w = jnp.exp(jnp.clip(lr, -SAFETY_BOUND, SAFETY_BOUND))
  w = jnp.minimum(w, threshold) if low is None else jnp.clip(w, low, threshold)
  return jax.lax.stop_gradient(jnp.where(m, w, 0.0))


def rejection_mask(log_ratio: ArrayLike, mask: ArrayLike, *, level: str = "token", low: float = 0.5,
                   high: float = 2.0, k3_max: float = 0.01) -> Array:
  """Keep mask [B, T] (float32; 0 on padding): ratio inside ``[low, high]`` per token, per
  sequence product or per sequence geometric mean; ``low`` = 0 sets no lower bound. Level
  ``"k3"``: keep row i iff ``mean_t (r_t − 1 − log r_t) <= k3_max`` (veRL ``seq_mean_k3``, the
  ``decoupled_k3_rs`` preset; ``low``/``high`` unused). See the module docstring."""
  ops.check_token_arrays(log_ratio=log_ratio, mask=mask)
  if level not in RS_LEVELS[1:]:
    raise ValueError(f"rollout rejection level {level!r}; expected one of {RS_LEVELS[1:]}")
  m = ops.as_bool_mask(mask)
  lr = jnp.where(m, jnp.asarray(log_ratio, jnp.float32), 0.0)
  lr = jnp.clip(lr, -SAFETY_BOUND, SAFETY_BOUND)  # veRL clamps each token's log-ratio first
  if level == "k3":
    if not k3_max > 0:
      raise ValueError(f"rollout k3 rejection bound must be > 0, got k3_max={k3_max}")
    k3 = jnp.sum(jnp.where(m, jnp.exp(lr) - 1.0 - lr, 0.0), axis=1, keepdims=True)
    keep = k3 / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1) <= k3_max
    return jax.lax.stop_gradient(jnp.where(m & keep, 1.0, 0.0))
  if not (0 <= low <= high and high > 0):
    raise ValueError(f"rollout rejection bounds need 0 <= low <= high, high > 0; got low={low}, high={high}")
  if level == "sequence":
    lr = jnp.sum(lr, axis=1, keepdims=True)
  elif level == "geometric":
    lr = jnp.sum(lr, axis=1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1)
  lo = math.log(low) if low > 0 else -math.inf
  keep = (lr >= lo) & (lr <= math.log(high))
  return jax.lax.stop_gradient(jnp.where(m & keep, 1.0, 0.0))


@renamed_kwargs(old_log_prob="old_logp", sampler_log_prob="sampler_logp")
def mismatch_metrics(old_logp: ArrayLike, sampler_logp: ArrayLike, mask: ArrayLike) -> dict:
  """Off-policy diagnostics between π_old and μ (veRL ``compute_offpolicy_metrics``): kl, k3_kl,
  chi2_token, chi2_seq, and max_abs_log_ratio."""
  ops.check_token_arrays(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
  m = ops.as_bool_mask(mask)
  o = jnp.asarray(old_logp, jnp.float32)
  b = jnp.asarray(sampler_logp, jnp.float32)
  lr = jnp.where(m, o - b, 0.0)
  lrs = jnp.clip(lr, -SAFETY_BOUND, SAFETY_BOUND)
  rows = jnp.any(m, axis=1)
  # mean(r²) − 1 as mean(expm1(2 log r)): the same value without cancelling against 1, so float
  # noise stays relative to the log-ratios (≈ 0 when π_old = μ) instead of to 1.
  seq = jnp.expm1(2.0 * jnp.clip(jnp.sum(lr, axis=1), -SAFETY_BOUND, SAFETY_BOUND))
  return {
      "kl": _masked_mean(-lr, m),
      "k3_kl": _masked_mean(jnp.expm1(lr) - lr, m),
      "chi2_token": _masked_mean(jnp.expm1(2.0 * lrs), m),
      "chi2_seq": jnp.sum(jnp.where(rows, seq, 0.0)) / jnp.maximum(jnp.sum(rows), 1),
      "max_abs_log_ratio": jnp.max(jnp.where(m, jnp.abs(lr), 0.0)),
  }


@renamed_kwargs(old_log_prob="old_logp", sampler_log_prob="sampler_logp")
def rollout_correction(old_logp: ArrayLike, sampler_logp: ArrayLike, mask: ArrayLike, *,
                       is_level: str = "token", is_threshold: float = 2.0, is_low: Optional[float] = None,
                       rs_level: str = "none", rs_low: float = 0.5, rs_high: float = 2.0,
                       rs_k3_max: float = 0.01) -> CorrectionOutput:
  """IS weights and rejection mask between ``π_old`` (``old_logp``) and the sampler ``μ``
  (``sampler_logp``), all [B, T] with ``mask``; levels "none" switch a part off (weights 1 /
  keep all). Returns ``CorrectionOutput`` with the module docstring's metrics (no gradient)."""
  ops.check_token_arrays(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
  if is_level not in IS_LEVELS:
    raise ValueError(f"rollout IS level {is_level!r}; expected one of {IS_LEVELS}")
  if rs_level not in RS_LEVELS:
    raise ValueError(f"rollout rejection level {rs_level!r}; expected one of {RS_LEVELS}")
  m = ops.as_bool_mask(mask)
  mf = m.astype(jnp.float32)
  lr = jnp.where(m, jnp.asarray(old_logp, jnp.float32) - jnp.asarray(sampler_logp, jnp.float32), 0.0)
  lr = jax.lax.stop_gradient(lr)
  metrics = {}
  weights = mf
  if is_level != "none":
    weights = is_weights(lr, m, level=is_level, threshold=is_threshold, low=is_low)
    # veRL reports the weights before truncation (exp of the log clamped to ±20); the sequence
    # level per valid row.
    log_c = math.log(is_threshold)
    if is_level == "token":
      raw_log, valid = lr, m
    else:
      raw_log, valid = jnp.sum(lr, axis=1), jnp.any(m, axis=1)  # [B]
    raw = jnp.exp(jnp.clip(raw_log, -SAFETY_BOUND, SAFETY_BOUND))
    # the mean is token weighted at both levels (veRL), the extremes and fractions per row
    metrics["is_mean"] = _masked_mean(raw if is_level == "token" else jnp.broadcast_to(raw[:, None], lr.shape), m)
    metrics["is_max"] = jnp.max(jnp.where(valid, raw, -jnp.inf))
    metrics["is_min"] = jnp.min(jnp.where(valid, raw, jnp.inf))
    metrics["is_frac_high"] = _masked_mean((raw_log > log_c).astype(jnp.float32), valid)
    metrics["is_frac_low"] = _masked_mean((raw_log < -log_c).astype(jnp.float32), valid)
    w_ess = jnp.clip(jnp.exp(jnp.clip(lr if is_level == "token" else jnp.broadcast_to(raw_log[:, None], lr.shape),
                                      -SAFETY_BOUND, SAFETY_BOUND)), 1.0 / is_threshold, is_threshold)
    w_norm = w_ess / (_masked_mean(w_ess, m) + 1e-8)
    metrics["is_ess"] = 1.0 / _masked_mean(jnp.square(w_norm), m)
  keep = mf
  if rs_level != "none":
    keep = rejection_mask(lr, m, level=rs_level, low=rs_low, high=rs_high, k3_max=rs_k3_max)
    metrics["rs_masked_frac"] = _masked_mean(1.0 - keep, m)
    rows = jnp.any(m, axis=1)
    lost = jnp.any(m & (keep < 0.5), axis=1)
    metrics["rs_seq_masked_frac"] = jnp.sum(lost) / jnp.maximum(jnp.sum(rows), 1)
  metrics.update(mismatch_metrics(old_logp, sampler_logp, m))
  return CorrectionOutput(weights, keep, metrics)
