"""Advantage estimators. Every function returns ``(advantages [B, T], returns [B, T])``,
stop-gradient and 0 on padding, and names the reward density it accepts in its signature:
``token_rewards [B, T]`` (token density) or ``scores [B]`` (sequence density).

Public API (stable names):
  prime_rloo_advantages(token_rewards, outcome, mask, *, n, reference_impl="verl"|"original"|"paper",
                        process_coef, outcome_coef, process_gamma, outcome_gamma, whiten)
  leave_one_out_token_rewards(rewards, reward_mask, *, n), paper_process_baseline(...)
  grpo_advantages(scores, mask, group_ids, num_groups, *, eps=1e-6, scale_by_std=True)
  dr_grpo_advantages(scores, mask, group_ids, num_groups)
  rloo_advantages(scores, mask, group_ids, num_groups)
  reinforce_pp_advantages(token_rewards, mask, *, gamma)
  reinforce_pp_baseline_advantages(scores, mask, group_ids, num_groups)
  gae_advantages(token_rewards, values, mask, *, gamma, lam, reference_impl="verl"|"original")
  prl_advantages(...), dual_level_advantages(...) (MatchTIR), igpo_advantages(...) (turn_level.py)

Adding a method: write ``advantages/<name>.py`` with a pure function, export it here, and register
an adapter in ``ESTIMATORS`` (below) when a trainer should reach it by name.

One calling convention (what trainers call; no caller branches on a name):
``ESTIMATORS.get(name)(inputs: AdvantageInputs, hp: AdvantageParams) -> (advantages, returns)``.
Each entry is a small adapter that takes what its estimator needs from ``inputs`` (outcome
``[B]``, mask ``[B, T]``, optional process rewards / old / ref log-probs / step ids ``[B, T]``) and
``hp`` (static: n, reference_impl, coefficients, gamma, eta). Registered: "prime_rloo", "grpo",
"dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "prl", "matchtir", "igpo". The raw
functions above keep their own signatures (the golden tests call them by name).
"""
from jaxrl_dense.advantages.gae import gae_advantages
from jaxrl_dense.advantages.outcome import (
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from jaxrl_dense.advantages.prime import (
    leave_one_out_token_rewards,
    paper_process_baseline,
    prime_rloo_advantages,
)
from jaxrl_dense.registry import Registry, UnknownNameError

__all__ = [
    "prime_rloo_advantages", "leave_one_out_token_rewards", "paper_process_baseline",
    "grpo_advantages", "dr_grpo_advantages", "rloo_advantages", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "gae_advantages", "UnknownNameError",
]

# Dense-reward advantages of PRL (arXiv 2601.10201), MatchTIR (arXiv 2601.10712) and IGPO
# (arXiv 2510.14967); same (advantages, returns) contract.
from jaxrl_dense.advantages.dual_level import dual_level_advantages  # noqa: E402
from jaxrl_dense.advantages.prl import prl_advantages  # noqa: E402
from jaxrl_dense.advantages.turn_level import igpo_advantages  # noqa: E402

__all__ += ["prl_advantages", "dual_level_advantages", "igpo_advantages"]


# ------------------------------------------------------------------ one calling convention
import dataclasses as _dc  # noqa: E402
from typing import NamedTuple as _NamedTuple, Optional as _Optional  # noqa: E402

import jax as _jax  # noqa: E402

from jaxrl_dense import _deprecation, ops as _ops  # noqa: E402


class AdvantageInputs(_NamedTuple):
  """Arrays an estimator may read. Rows come in contiguous groups of ``AdvantageParams.n``.

  outcome: ``[B]`` sequence reward (verifier label, plus any extra reward).
  mask: ``[B, T]`` response mask (rows non-empty).
  process_rewards: ``[B, T]`` token process rewards (PRIME: batch-normed implicit rewards) or None.
  old_logp, ref_logp: ``[B, T]`` behaviour / reference log-probs (PRL) or None.
  step_ids: ``[B, T]`` step index of each token (PRL) or None.
  row_mask: ``[B]`` 1 = the row takes part, 0 = masked out (whole groups: the out-of-band groups
    of ``--filter_mode=mask``), or None (all rows). Masked rows get advantages and returns of 0
    and leave every batch statistic (whitening); the other rows get what the estimator gives on
    them alone.
  turn_rewards: ``[B, K]`` turn-level rewards of a multi-turn rollout (MatchTIR) or None.
  turn_ids: int ``[B, T]`` turn of each model token (−1 elsewhere) or None.
  """
  outcome: _jax.Array
  mask: _jax.Array
  process_rewards: _Optional[_jax.Array] = None
  old_logp: _Optional[_jax.Array] = None
  ref_logp: _Optional[_jax.Array] = None
  step_ids: _Optional[_jax.Array] = None
  row_mask: _Optional[_jax.Array] = None
  turn_rewards: _Optional[_jax.Array] = None
  turn_ids: _Optional[_jax.Array] = None


@_dc.dataclass(frozen=True)
class AdvantageParams:
  """Static hyper-parameters of the estimators (each adapter reads the ones it needs)."""
  n: int
  reference_impl: str = "verl"  # which reference's PRIME formulas (prime_rloo)
  process_coef: float = 5.0
  outcome_coef: float = 5.0
  gamma: float = 1.0  # PRIME original / REINFORCE++
  prl_eta: float = 200.0
  igpo_variant: str = "code"
  variant = _deprecation.renamed_attribute("reference_impl")

  def __post_init__(self):
    if not isinstance(self.n, int) or self.n < 1:
      raise ValueError(f"AdvantageParams.n={self.n!r} must be an int >= 1")


AdvantageParams.__init__ = _deprecation.renamed_kwargs(variant="reference_impl")(AdvantageParams.__init__)


def _groups(x: AdvantageInputs, hp: AdvantageParams):
  g = x.outcome.shape[0] // hp.n
  return _ops.contiguous_group_ids(g, hp.n), g


def _prime_rloo(x: AdvantageInputs, hp: AdvantageParams):
  gammas = ({} if hp.reference_impl == "verl" else {"process_gamma": hp.gamma, "outcome_gamma": hp.gamma})
  return prime_rloo_advantages(x.process_rewards, x.outcome, x.mask, n=hp.n, reference_impl=hp.reference_impl,
                               process_coef=hp.process_coef, outcome_coef=hp.outcome_coef,
                               row_mask=x.row_mask, **gammas)


def _zero_masked_rows(out, row_mask):
  """(advantages, returns) with the masked rows set to 0: enough for group-local estimators,
  whose rows depend on their own group only."""
  if row_mask is None:
    return out
  keep = (_jax.numpy.asarray(row_mask) > 0)[:, None]
  return tuple(_jax.numpy.where(keep, y, 0.0) for y in out)


def _sequence(fn, *, batch_stats: bool = False):
  def adapter(x: AdvantageInputs, hp: AdvantageParams):
    if batch_stats:  # whitening over the batch: the estimator takes the row mask itself
      return fn(x.outcome, x.mask, *_groups(x, hp), row_mask=x.row_mask)
    return _zero_masked_rows(fn(x.outcome, x.mask, *_groups(x, hp)), x.row_mask)
  adapter.__name__ = adapter.__qualname__ = f"sequence_adapter_{fn.__name__}"
  adapter.__doc__ = f"``{fn.__name__}(outcome, mask, group_ids, num_groups)``."
  return adapter


def _reinforce_pp(x: AdvantageInputs, hp: AdvantageParams):
  return reinforce_pp_advantages(_ops.place_at_last_token(x.outcome, x.mask), x.mask, gamma=hp.gamma,
                                 row_mask=x.row_mask)


def _prl(x: AdvantageInputs, hp: AdvantageParams):
  if x.old_logp is None or x.ref_logp is None or x.step_ids is None:
    raise ValueError("prl needs old_logp, ref_logp and step_ids [B, T] in AdvantageInputs")
  gids, g = _groups(x, hp)
  return _zero_masked_rows(
      prl_advantages(x.outcome, x.old_logp, x.ref_logp, x.mask, gids, g, x.step_ids, eta=hp.prl_eta),
      x.row_mask)


def _turns(name, fn, **static):
  """Adapter of a turn-level estimator ``fn(turn_rewards, turn_mask, turn_ids, mask, group_ids,
  num_groups, **kw)``; ``static`` maps its keyword arguments to AdvantageParams fields."""
  def adapter(x: AdvantageInputs, hp: AdvantageParams):
    if x.turn_rewards is None or x.turn_ids is None:
      raise ValueError(f"{name} needs turn_rewards [B, K] and turn_ids [B, T] in AdvantageInputs "
                       "(a multi-turn rollout: --env)")
    k = x.turn_rewards.shape[1]
    gids, g = _groups(x, hp)
    kw = {arg: getattr(hp, field) for arg, field in static.items()}
    return _zero_masked_rows(
        fn(x.turn_rewards, _ops.turn_mask_from_ids(x.turn_ids, k), x.turn_ids, x.mask, gids, g, **kw),
        x.row_mask)
  adapter.__name__ = adapter.__qualname__ = f"turn_adapter_{name}"
  return adapter


_matchtir = _turns("matchtir", dual_level_advantages)
_igpo = _turns("igpo", igpo_advantages, variant="igpo_variant")


ESTIMATORS = Registry("advantage estimator")
ESTIMATORS.register("prime_rloo", _prime_rloo)
ESTIMATORS.register("grpo", _sequence(grpo_advantages))
ESTIMATORS.register("dr_grpo", _sequence(dr_grpo_advantages))
ESTIMATORS.register("rloo", _sequence(rloo_advantages))
ESTIMATORS.register("reinforce_pp", _reinforce_pp)
ESTIMATORS.register("reinforce_pp_baseline", _sequence(reinforce_pp_baseline_advantages, batch_stats=True))
ESTIMATORS.register("prl", _prl)
ESTIMATORS.register("matchtir", _matchtir)
ESTIMATORS.register("igpo", _igpo)
__all__ += ["AdvantageInputs", "AdvantageParams", "ESTIMATORS"]
