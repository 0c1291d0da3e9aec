"""Implicit-PRM training objectives and step rewards.

"Free Process Rewards without Process Labels" (Yuan et al., arXiv 2412.01981): parameterise an
outcome reward as ``r_θ(y) = β log π_θ(y)/π_ref(y)``; then the partial sums of token log-ratios are
Q-values, so any ORM objective on response labels yields a PRM. Reference code: PRIME-RL/ImplicitPRM
``train/openrlhf/models/loss.py`` (DPO, KTO), ``ce_trainer.py`` (CE), ``eval/prm_eval_utils.py``
(step rewards, min/sum scoring); NCA as ``nca_pair`` in dvlab-research/TGDPO.

The objectives on sequence log-ratios (DPO, CE, NCA, KTO, `sequence_logratio`) live in
``losses/sequence.py`` and are handed on here; this module adds the step rewards and the step
scoring of the implicit PRM.
"""
from __future__ import annotations

from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense.losses.sequence import dpo_loss, implicit_ce_loss, kto_loss, nca_loss, sequence_logratio  # noqa: F401
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

STEP_MODES = ("single", "accumulative")
STEP_AGGREGATIONS = ("min", "sum")


@renamed_kwargs(logp_prm="prm_logp", logp_ref="ref_logp")
def implicit_step_rewards(prm_logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike,
                          step_ids: ArrayLike, num_steps: int, *, beta: float = 1.0,
                          mode: str = "single") -> Tuple[Array, Array]:
  """Step rewards from token log-ratios (arXiv 2412.01981 eval ``get_reward``).

  With step ends e_1 < … < e_K: ``Q_k = β Σ_{t ≤ e_k} q_t``; ``mode="single"``:
  ``r_k = Q_k − Q_{k−1} = β Σ_{t ∈ step k} q_t`` (segment sum); ``"accumulative"``: ``r_k = Q_k``.
  Shapes: ``[B, T]`` inputs, ``step_ids int32[B, T]`` (−1 on masked tokens), static S = num_steps
  -> ``(r [B, S], step_mask [B, S])``; r is 0 on empty steps. Stop-gradient.
  """
  ops.check_token_arrays(prm_logp=prm_logp, ref_logp=ref_logp, mask=mask, step_ids=step_ids)
  if mode not in STEP_MODES:
    raise ValueError(f"`mode` must be one of {STEP_MODES}, got {mode!r}")
  m = ops.as_bool_mask(mask)
  q = jnp.where(m, jnp.asarray(prm_logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32), 0.0)
  sid = jnp.where(m, jnp.asarray(step_ids), -1)
  step_mask = ops.step_mask_from_ids(sid, num_steps)                # [B, S]
  r = beta * ops.segment_sum(q, sid, num_steps)                     # [B, S]
  if mode == "accumulative":
    r = jnp.where(step_mask > 0, jnp.cumsum(r, axis=1), 0.0)
  return jax.lax.stop_gradient(r), step_mask


def aggregate_step_scores(v: ArrayLike, step_mask: ArrayLike, how: str = "min") -> Array:
  """Response score from step rewards: ``min_k v_k`` or ``Σ_k v_k`` over valid steps. ``[B, S] -> [B]``.

  Rows with no valid step score 0 (the reference uses a large sentinel for padded steps in min).
  """
  ops.check_token_arrays(v=v, step_mask=step_mask)
  if how not in STEP_AGGREGATIONS:
    raise ValueError(f"`how` must be one of {STEP_AGGREGATIONS}, got {how!r}")
  sm = ops.as_bool_mask(step_mask)
  v = jnp.asarray(v, jnp.float32)
  if how == "sum":
    return ops.masked_sum(v, sm, axis=1)
  out = jnp.min(jnp.where(sm, v, jnp.inf), axis=1)
  return jnp.where(jnp.any(sm, axis=1), out, 0.0)
