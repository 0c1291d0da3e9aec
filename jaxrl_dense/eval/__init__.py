"""Evaluation of a policy on prompt records (see `loop`): greedy pass@1, sampled mean@k, the
k-sample estimators (pass@k, majority vote, best-of-n) and implicit-PRM scores of responses.

`from jaxrl_dense.eval import loop` (or the names re-exported here).
"""
from jaxrl_dense.eval.loop import (EvalResult, HeldoutPRM, best_of_n, default_verify_fn, evaluate,
                                   extract_answers, heldout_prm_auroc, implicit_prm_rewards, implicit_prm_sequence_reward,
                                   implicit_prm_step_rewards, majority_vote, mean_at_k, pass_at_k,
                                   pass_at_k_curve, prm_vote_weights, sampled_summary, write_report)

__all__ = ["EvalResult", "evaluate", "write_report", "default_verify_fn", "pass_at_k", "pass_at_k_curve",
           "mean_at_k", "majority_vote", "best_of_n", "prm_vote_weights", "extract_answers",
           "sampled_summary", "implicit_prm_sequence_reward", "implicit_prm_rewards",
           "implicit_prm_step_rewards", "heldout_prm_auroc", "HeldoutPRM"]
