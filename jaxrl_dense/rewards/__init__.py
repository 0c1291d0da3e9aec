"""Dense rewards: PRIME implicit process rewards, PRM losses/metrics, Implicit-PRM objectives.

Public API (stable names; shapes ``[B, T]`` with ``mask``, see ``jaxrl_dense.ops``):

  Token rewards (stop-gradient)
    implicit_token_rewards(prm_logp, ref_logp, mask, *, beta, reference_impl, granularity, lam, outcome, use_gt)
        -> ImplicitRewards(scores, q)        reference_impl "verl" (default) | "original" | "paper"
    token_log_ratio(prm_logp, ref_logp, mask) -> q            (differentiable, for PRM losses)
    prime_batch_norm(scores, *, eps, row_mask) / prime_norm(scores, norm="batch_norm"|"none")
    zero_float_noise(scores, q, *, tol, row_mask)   (0 while the PRM is the reference up to rounding)
  PRM losses (carry gradients)
    prm_ce_loss(q, mask, outcome, *, beta) / prm_ce_loss_terms(...) -> [B]
    prm_detached_dpo_loss(q, mask, outcome, q_bc, outcome_bc, *, beta, bon_mode="none"|"bon_acc"|"bon_rm")
    group_matrix(v, n) -> [B, n]             (builds q_bc / outcome_bc from contiguous groups)
  PRM metrics
    prm_pairwise_accuracy(token_scores, mask, outcome, *, n), prm_sign_accuracy(...), prm_metrics(...)
  Implicit-PRM objectives (arXiv 2412.01981)
    sequence_logratio, dpo_loss, implicit_ce_loss, nca_loss, kto_loss,
    implicit_step_rewards(prm_logp, ref_logp, mask, step_ids, num_steps, *, beta, mode),
    aggregate_step_scores(v, step_mask, how="min"|"sum")

Registry: ``get_prm_loss(name)`` with names "ce", "dpo" (detached DPO), "bon_acc", "bon_rm".
New reward modules (e.g. ``rewards/sar.py``): add the module, import its public names here.
"""
import functools

from jaxrl_dense import _moved
from jaxrl_dense.registry import Registry
from jaxrl_dense.rewards.implicit_prm import (
    ImplicitRewards,
    group_matrix,
    implicit_token_rewards,
    prime_batch_norm,
    prime_norm,
    prm_ce_loss,
    prm_ce_loss_terms,
    prm_detached_dpo_loss,
    prm_metrics,
    prm_pairwise_accuracy,
    prm_sign_accuracy,
    token_log_ratio,
    zero_float_noise,
)
from jaxrl_dense.rewards.implicit_prm_objectives import (
    aggregate_step_scores,
    dpo_loss,
    implicit_ce_loss,
    implicit_step_rewards,
    kto_loss,
    nca_loss,
    sequence_logratio,
)

# PRM losses: `loss(q, mask, outcome, *, beta)` or, registered with grouped=True, `loss(q, mask, outcome,
# q_bc, outcome_bc, *, beta)` where q_bc / outcome_bc are the row's group from a no-grad pass. `sums_rows`:
# the loss SUMS its per-row terms (best-of-N forms of the veRL recipe `compute_detach_dpo_loss_rm`)
# instead of averaging them.
# `rl.steps.make_prm_update` dispatches on these entries (register a new loss here to train it).
PRM_LOSSES = Registry("PRM loss")
PRM_LOSSES.register("ce", prm_ce_loss, grouped=False, sums_rows=False)
PRM_LOSSES.register("dpo", functools.partial(prm_detached_dpo_loss, bon_mode="none"),
                    grouped=True, sums_rows=False)
PRM_LOSSES.register("bon_acc", functools.partial(prm_detached_dpo_loss, bon_mode="bon_acc"),
                    grouped=True, sums_rows=True)
PRM_LOSSES.register("bon_rm", functools.partial(prm_detached_dpo_loss, bon_mode="bon_rm"),
                    grouped=True, sums_rows=True)
get_prm_loss = PRM_LOSSES.get

__all__ = [
    "ImplicitRewards", "implicit_token_rewards", "token_log_ratio", "prime_batch_norm", "prime_norm",
    "zero_float_noise",
    "prm_ce_loss", "prm_ce_loss_terms", "prm_detached_dpo_loss", "group_matrix",
    "prm_pairwise_accuracy", "prm_sign_accuracy", "prm_metrics",
    "sequence_logratio", "dpo_loss", "implicit_ce_loss", "nca_loss", "kto_loss",
    "implicit_step_rewards", "aggregate_step_scores", "PRM_LOSSES", "get_prm_loss",
]

# Fine-grained rewards: Fine-Grained RLHF (arXiv 2306.01693), MatchTIR (arXiv 2601.10712), IGPO
# (arXiv 2510.14967), SAR (arXiv 2509.05489).
from jaxrl_dense.rewards.fine_grained import (  # noqa: E402
    fine_grained_advantages,
    fine_grained_token_rewards,
    kl_shaped_rewards,
    place_segment_rewards,
)
from jaxrl_dense.rewards.sar import combine_with_sar, sar_schedule, self_aligned_reward  # noqa: E402
from jaxrl_dense.rewards.overlong import overlong_penalty  # noqa: E402  (DAPO overlong shaping)
from jaxrl_dense.rewards.turn_level import (  # noqa: E402
    assignment_call_rewards,
    information_gain_turn_rewards,
    turn_rewards_from_calls,
)
__all__ += [
    "fine_grained_token_rewards", "fine_grained_advantages", "kl_shaped_rewards",
    "place_segment_rewards", "self_aligned_reward", "sar_schedule", "combine_with_sar",
    "assignment_call_rewards", "turn_rewards_from_calls", "information_gain_turn_rewards",
    "overlong_penalty",
]

# Step rewards from a process reward model: segmentation, placement across tokenizers, credit
# (summed or PURE's min-form); rewards/step_rewards.py.
from jaxrl_dense.rewards import step_rewards  # noqa: E402
from jaxrl_dense.rewards.step_rewards import (  # noqa: E402
    credit_step_rewards,
    min_form_values,
    place_step_scores,
    placement_weights,
    pure_weighted_rewards,
    segment,
    token_offsets_from_ids,
)
__all__ += [
    "step_rewards", "segment", "token_offsets_from_ids", "placement_weights", "place_step_scores",
    "min_form_values", "pure_weighted_rewards", "credit_step_rewards",
]
from jaxrl_dense.rewards import service  # noqa: E402  (served PRM: HTTP client + reference server)
__all__ += ["service"]


# Deprecated alias (one release): the 2-class head's reward lives beside the head.
__getattr__ = _moved.moved_names(__name__, {
    "prm_logits_to_step_reward": "jaxrl_dense.models.prm_head.prm_logits_to_step_reward"})
