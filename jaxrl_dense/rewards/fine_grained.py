"""Fine-Grained RLHF token rewards and advantages (Wu et al., arXiv 2306.01693).

Several reward functions judge a response at their own granularity (sub-sentence, sentence, whole
response). Each segment judgment becomes a reward on the segment's last token, weighted per reward
function; a per-token KL penalty against the reference is added; PPO uses GAE with a value head.

  r_t = sum_k sum_j 1[t = T^k_j] * w_k * R_k(j)  -  beta * KL_t(old || ref)

Conventions: responses `[B, T]` right-padded with `mask` `[B, T]` (1 on generated tokens).
Segments: `seg_end [B, J]` int32 token index of each segment's last token (clamped to `L_b - 1`,
so segments cut by the length limit still land on the response), `seg_valid [B, J]`.
Rewards are stop-gradient. Official code: allenai/FineGrainedRLHF (fgrlhf/reward.py, fgrlhf/ppo.py,
fgrlhf/utils.py, tasks/qa_feedback/training/reward.py).
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "place_segment_rewards",
    "binary_segment_values",
    "normalize_sequence_score",
    "kl_shaped_rewards",
    "scale_rewards_keep_mean",
    "fine_grained_token_rewards",
    "fine_grained_advantages",
]


def place_segment_rewards(seg_end: ArrayLike, seg_value: ArrayLike, seg_valid: ArrayLike,
                          mask: ArrayLike) -> Array:
  """Scatter-adds segment values onto their last tokens.

  r[b, t] = sum_j 1[min(seg_end[b, j], L_b - 1) = t] * seg_valid[b, j] * seg_value[b, j]

  Ends beyond the response (segment truncated by the length limit) are clamped to `L_b - 1`;
  segments that end on the same token add up; rows with `L_b = 0` get no reward.

  Args:
    seg_end: int `[B, J]` index (in response coordinates) of each segment's last token.
    seg_value: float `[B, J]` reward of each segment.
    seg_valid: `[B, J]` 1 for a real segment, 0 for padding.
    mask: `[B, T]` response mask.

  Returns:
    `[B, T]` float32 rewards (stop-gradient).
  """
  seg_end = jnp.asarray(seg_end)
  seg_value = jnp.asarray(seg_value, jnp.float32)
  seg_valid = jnp.asarray(seg_valid, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_rank([seg_end, seg_value, seg_valid, mask], 2)
  chex.assert_equal_shape([seg_end, seg_value, seg_valid])
  chex.assert_equal_shape_prefix([seg_end, mask], 1)
  if not jnp.issubdtype(seg_end.dtype, jnp.integer):
    raise TypeError(f"seg_end must be an integer array, got dtype {seg_end.dtype}.")
  T = mask.shape[1]
  lengths = jnp.sum(mask, axis=1).astype(jnp.int32)  # [B]
  end = jnp.clip(seg_end, 0, jnp.maximum(lengths - 1, 0)[:, None])  # [B, J]
  valid = seg_valid * (lengths[:, None] > 0)  # [B, J]
  onehot = (end[:, :, None] == jnp.arange(T)[None, None, :]).astype(jnp.float32)  # [B, J, T]
  r = jnp.einsum("bj,bjt->bt", seg_value * valid, onehot)  # [B, T]
  return lax.stop_gradient(r * mask)


def binary_segment_values(ok: ArrayLike, pos: float, neg: float) -> Array:
  """Binary judgment -> segment value: `pos` where `ok`, else `neg` (FG-RLHF uses ±w_k).

  Args:
    ok: `[B, J]` bool/0-1 judgment (e.g. "segment free of irrelevance/repetition").
    pos, neg: values for ok / not ok.

  Returns:
    `[B, J]` float32.
  """
  ok = jnp.asarray(ok)
  chex.assert_rank(ok, 2)
  return jnp.where(ok.astype(bool), jnp.float32(pos), jnp.float32(neg))


def normalize_sequence_score(s: ArrayLike, mean: float, std: float, scale: float = 1.0,
                             bias: float = 0.0) -> Array:
  """Holistic (completeness) score: `((s - mean) / std) * scale + bias`  `[B] -> [B]`.

  FG-RLHF qa-feedback defaults: mean = -0.4468, std = 8.3012, scale = 0.3, bias = 0.
  """
  s = jnp.asarray(s, jnp.float32)
  chex.assert_rank(s, 1)
  if not std > 0:
    raise ValueError(f"std must be > 0, got {std}.")
  return ((s - mean) / std) * scale + bias


@renamed_kwargs(logp_ref="ref_logp", logp_old="old_logp")
def kl_shaped_rewards(r: ArrayLike, old_logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike,
                      kl_coef: float, estimator: str = "k1") -> Array:
  """Per-token KL shaping: `r_t - kl_coef * KL_t` on valid tokens (FG-RLHF `kl_penalize_reward`).

  KL_t is any estimator of `jaxrl_dense.losses.get_kl` ("k1"/"kl": old_logp - ref_logp, "abs",
  "k2"/"mse", "k3"/"low_var_kl"), applied through the core's `kl_in_reward`. FG-RLHF uses k1 with
  kl_coef = 0.3.

  Args:
    r: `[B, T]` task rewards.
    old_logp, ref_logp: `[B, T]` log-probs of the realized tokens.
    mask: `[B, T]`.

  Returns:
    `[B, T]` shaped rewards, 0 on padding (stop-gradient).
  """
  from jaxrl_dense import losses  # local import: rewards must not need losses at import time

  ops.check_token_arrays(r=r, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
  try:
    est = losses.get_kl(estimator)
  except losses.UnknownNameError as e:
    raise ValueError(f"estimator: {e}") from None
  return losses.kl_in_reward(r, old_logp, ref_logp, kl_coef=kl_coef, mask=mask, estimator=est)


def scale_rewards_keep_mean(r: ArrayLike, mask: ArrayLike, eps: float = 1e-8,
                            quirk: bool = False) -> Array:
  """Reward whitening without shifting the mean (FG-RLHF `whiten(shift_mean=False)`).

  correct (default):  r' = (r - mu) / sqrt(var + eps) + mu
  quirk=True (repo):  r' = (r - mu) * rsqrt(std + eps) + mu   (std passed where a variance is
                      expected, so rewards are scaled by 1/sqrt(std) instead of 1/std)
  mu, var: batch-global statistics over valid tokens (unbiased variance).

  Args:
    r: `[B, T]`; mask: `[B, T]` (needs >= 2 valid tokens).

  Returns:
    `[B, T]`, 0 on padding.
  """
  r = jnp.asarray(r, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_rank([r, mask], 2)
  chex.assert_equal_shape([r, mask])
  mu = ops.masked_mean(r, mask)
  var = ops.masked_var(r, mask)
  denom = jnp.sqrt(var) if quirk else var
  out = (r - mu) * lax.rsqrt(denom + eps) + mu
  return out * mask


@renamed_kwargs(logp_ref="ref_logp", logp_old="old_logp")
def fine_grained_token_rewards(seg_ends: Sequence[ArrayLike], seg_values: Sequence[ArrayLike],
                               seg_valids: Sequence[ArrayLike], weights: Sequence[float],
                               mask: ArrayLike, *, sequence_score: ArrayLike | None = None,
                               old_logp: ArrayLike | None = None,
                               ref_logp: ArrayLike | None = None, kl_coef: float = 0.0,
                               estimator: str = "k1") -> Array:
  """Assembles FG-RLHF token rewards from K segment-level reward functions.

  r_t = sum_k w_k * place(seg_end^k, R^k, valid^k)_t + 1[t = L-1] * sequence_score
        - kl_coef * KL_t(old || ref)

  Args:
    seg_ends, seg_values, seg_valids: length-K sequences of `[B, J_k]` arrays, one per reward
      function (J_k may differ, e.g. sub-sentences vs sentences).
    weights: length-K per-reward-function weights w_k (e.g. 0.3 relevance, 0.5 factuality).
    mask: `[B, T]`.
    sequence_score: optional `[B]` whole-response reward (e.g. `normalize_sequence_score(...)`)
      added on the last valid token.
    old_logp, ref_logp: `[B, T]`, required when `kl_coef != 0`.

  Returns:
    `[B, T]` float32 rewards (stop-gradient), 0 on padding.
  """
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_rank(mask, 2)
  if not (len(seg_ends) == len(seg_values) == len(seg_valids) == len(weights)):
    raise ValueError("seg_ends, seg_values, seg_valids and weights must have the same length; got "
                     f"{len(seg_ends)}, {len(seg_values)}, {len(seg_valids)}, {len(weights)}.")
  r = jnp.zeros_like(mask)  # [B, T]
  for e, v, ok, w in zip(seg_ends, seg_values, seg_valids, weights):
    r = r + w * place_segment_rewards(e, v, ok, mask)
  if sequence_score is not None:
    s = jnp.asarray(sequence_score, jnp.float32)
    chex.assert_shape(s, (mask.shape[0],))
    r = r + ops.place_at_last_token(s, mask)
  if kl_coef != 0.0:
    if old_logp is None or ref_logp is None:
      raise ValueError("old_logp and ref_logp are required when kl_coef != 0.")
    r = kl_shaped_rewards(r, old_logp, ref_logp, mask, kl_coef, estimator)
  return lax.stop_gradient(r * mask)


def fine_grained_advantages(rewards: ArrayLike, values: ArrayLike, mask: ArrayLike,
                            gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = True,
                            whiten_advantages: bool = True, quirk: bool = False,
                            eps: float = 1e-8) -> tuple[Array, Array]:
  """FG-RLHF advantages: optional mean-keeping reward scaling, GAE, advantage whitening.

  r' = scale_rewards_keep_mean(r) if whiten_rewards
  delta_t = r'_t + gamma V_{t+1} - V_t  (V after the last valid token = 0)
  A_t = delta_t + gamma lam A_{t+1};  returns_t = A_t + V_t;  A <- masked_whiten(A) (mean-shifted)

  The repo truncates GAE at the batch's longest valid length; with right padding and V = 0 after
  each row's end this equals the per-row computation done here.

  Args:
    rewards: `[B, T]` token rewards (e.g. from `fine_grained_token_rewards`).
    values: `[B, T]` value-head outputs V(s_t).
    mask: `[B, T]`.
    quirk: reproduce the repo's 1/sqrt(std) reward scaling (see `scale_rewards_keep_mean`).

  Returns:
    (advantages `[B, T]`, returns `[B, T]`), both stop-gradient and 0 on padding.
  """
  rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))
  chex.assert_rank([rewards, values, mask], 2)
  chex.assert_equal_shape([rewards, values, mask])
  if whiten_rewards:
    rewards = scale_rewards_keep_mean(rewards, mask, eps=eps, quirk=quirk)
  adv = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)  # [B, T]
  returns = (adv + values) * mask  # [B, T]
  if whiten_advantages:
    adv = ops.masked_whiten(adv, mask) * mask
  return lax.stop_gradient(adv), lax.stop_gradient(returns * mask)
