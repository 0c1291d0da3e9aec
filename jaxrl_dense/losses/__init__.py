"""Policy losses, loss aggregation, KL estimators and entropy.

Public API (stable names):
  ppo_clip_loss(logp, old_logp, advantages, mask, *, clip_ratio_low=0.2,
                clip_ratio_high=None, clip_ratio_c=3.0, log_ratio_clamp=20.0,
                loss_agg_mode="token-mean", loss_scale_factor=None)
      -> PolicyLossOutput(loss, loss_sum, count, metrics{pg_clipfrac, pg_clipfrac_lower, ppo_kl})
  ppo_clip_token_loss(...) -> PPOTokenTerms(token_loss, clipped, dual_clipped, neg_log_ratio)
  prime_policy_loss(logp, old_logp, advantages, mask, *, cliprange=0.2)   (PRIME-RL original)
  aggregate_terms(loss_mat, mask, mode, *, loss_scale_factor) -> (sum, count); aggregate(...);
  combine(mode, sums, counts); token_mean / seq_mean_token_sum / seq_mean_token_mean /
  seq_mean_token_sum_norm
  kl_k1, kl_abs, kl_k2, kl_k3, kl_in_reward(token_scores, old_logp, ref_logp, *, kl_coef)
  entropy_from_logits(logits, *, temperature=1.0)

Registries:
  get_kl(name) -> fn(logp, ref_logp) -> [B, T]; names "kl", "k1", "abs", "mse", "k2",
      "low_var_kl", "k3". A "+" suffix (straight-through k2 gradient, documented by veRL) raises
      NotImplementedError, as veRL at the pinned commit does.
  get_policy_loss(name) -> per-token terms fn(logp, old_logp, advantages, mask, *,
      clip_ratio_low, clip_ratio_high, clip_ratio_c) -> PPOTokenTerms (``losses/policy.py``): "ppo"
      (veRL vanilla), "ppo_original" (PRIME-RL), "gspo", "gspo_token", "cispo"; the jitted update
      dispatches --policy_loss through it. policy_loss(name, ...) -> PolicyLossOutput on one batch.
  rollout_correction(old_logp, sampler_logp, mask, *, is_level, is_threshold, rs_level,
      rs_low, rs_high) -> CorrectionOutput(weights, keep, metrics)   (``losses/rollout_correction.py``)
Adding a loss (e.g. ``losses/tgdpo.py``): write the module, then one ``*.register`` line below.
"""

from jaxrl_dense.losses import aggregation
from jaxrl_dense.losses.aggregation import (
    aggregate,
    aggregate_terms,
    combine,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from jaxrl_dense.losses.entropy import entropy_from_logits
from jaxrl_dense.losses.kl import kl_abs, kl_in_reward, kl_k1, kl_k2, kl_k3
from jaxrl_dense.losses.ppo import (
    PolicyLossOutput,
    PPOTokenTerms,
    ppo_clip_loss,
    ppo_clip_token_loss,
    prime_policy_loss,
)
from jaxrl_dense.registry import Registry, UnknownNameError

KL_ESTIMATORS = Registry("KL estimator")
KL_ESTIMATORS.register("kl", kl_k1)
KL_ESTIMATORS.register("k1", kl_k1)
KL_ESTIMATORS.register("abs", kl_abs)
KL_ESTIMATORS.register("mse", kl_k2)
KL_ESTIMATORS.register("k2", kl_k2)
KL_ESTIMATORS.register("low_var_kl", kl_k3)
KL_ESTIMATORS.register("k3", kl_k3)

from jaxrl_dense.losses import rollout_correction as rollout_correction_lib  # noqa: E402
from jaxrl_dense.losses.policy import (  # noqa: E402
    DEFAULT_AGG,
    DEFAULT_CLIPS,
    POLICY_LOSSES,
    cispo_terms,
    gspo_terms,
    gspo_token_terms,
    policy_loss,
    ppo_original_terms,
    ppo_terms,
)
from jaxrl_dense.losses.rollout_correction import (  # noqa: E402
    CorrectionOutput,
    is_weights,
    mismatch_metrics,
    rejection_mask,
    rollout_correction,
)


def get_kl(name: str):
  """KL estimator by name (see module docstring); '+' names raise NotImplementedError."""
  if isinstance(name, str) and name.endswith("+") and name[:-1] in KL_ESTIMATORS:
    raise NotImplementedError(
        f"KL estimator {name!r}: the '+' straight-through form (value of {name[:-1]!r}, gradient "
        "of k2) is not implemented; veRL at b178a3cd raises NotImplementedError for it too. "
        f"Use {name[:-1]!r} or 'k2'.")
  return KL_ESTIMATORS.get(name)


get_policy_loss = POLICY_LOSSES.get

__all__ = [
    "ppo_clip_loss", "ppo_clip_token_loss", "prime_policy_loss", "PolicyLossOutput",
    "PPOTokenTerms", "aggregation", "aggregate", "aggregate_terms", "combine", "token_mean",
    "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm",
    "kl_k1", "kl_abs", "kl_k2", "kl_k3", "kl_in_reward", "entropy_from_logits",
    "KL_ESTIMATORS", "POLICY_LOSSES", "get_kl", "get_policy_loss", "UnknownNameError",
    "policy_loss", "ppo_terms", "ppo_original_terms",
    "gspo_terms", "gspo_token_terms", "cispo_terms", "DEFAULT_CLIPS", "DEFAULT_AGG",
    "rollout_correction", "CorrectionOutput", "is_weights", "rejection_mask", "mismatch_metrics",
]

# Pairwise preference losses on token log-probs: TGDPO (arXiv 2506.14574) and plain DPO.
from jaxrl_dense.losses.tgdpo import dpo_loss_from_token_logps, tgdpo_loss  # noqa: E402

__all__ += ["tgdpo_loss", "dpo_loss_from_token_logps"]
