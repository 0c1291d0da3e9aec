"""Evaluation of a policy on prompt records: the loop (`loop`: greedy pass@1, sampled mean@k, the
JSON report), the k-sample estimators (`estimators`: pass@k, majority vote, best-of-n) and the
implicit PRM's scores of decoded responses (`prm`: sequence / token / step rewards, held-out AUROC).

`from jaxrl_dense.eval import loop, estimators, prm` (or the names re-exported here).
"""
from jaxrl_dense.eval.estimators import (best_of_n, extract_answers, majority_vote, mean_at_k, pass_at_k,
                                         pass_at_k_curve, prm_vote_weights, sampled_summary)
from jaxrl_dense.eval.loop import EvalResult, default_verify_fn, evaluate, write_report
from jaxrl_dense.eval.prm import (HeldoutPRM, heldout_prm_auroc, implicit_prm_rewards,
                                  implicit_prm_sequence_reward, implicit_prm_step_rewards)

__all__ = ["EvalResult", "evaluate", "write_report", "default_verify_fn", "pass_at_k", "pass_at_k_curve",
           "mean_at_k", "majority_vote", "best_of_n", "prm_vote_weights", "extract_answers",
           "sampled_summary", "implicit_prm_sequence_reward", "implicit_prm_rewards",
           "implicit_prm_step_rewards", "heldout_prm_auroc", "HeldoutPRM"]
