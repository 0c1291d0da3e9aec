"""Objectives on sequence log-ratios: DPO, unpaired cross-entropy, NCA, KTO.

Each takes sequence log-ratios ``z [B] = Σ_t (logp_θ − logp_ref)·m`` (see :func:`sequence_logratio`)
and returns a scalar mean. As outcome-reward objectives on response labels they train an implicit
PRM ("Free Process Rewards without Process Labels", Yuan et al., arXiv 2412.01981; reference code:
PRIME-RL/ImplicitPRM ``train/openrlhf/models/loss.py`` (DPO, KTO), ``ce_trainer.py`` (CE); NCA as
``nca_pair`` in dvlab-research/TGDPO); DPO is also the objective that TGDPO re-weights
(``losses/tgdpo.py``).
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

__all__ = ["sequence_logratio", "dpo_loss", "implicit_ce_loss", "nca_loss", "kto_loss"]


@renamed_kwargs(logp_ref="ref_logp", logp_policy="policy_logp")
def sequence_logratio(policy_logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike) -> Array:
  """``z_i = Σ_t (policy_logp − ref_logp)[i, t]·m[i, t]`` in float32. ``[B, T] -> [B]``."""
  ops.check_token_arrays(policy_logp=policy_logp, ref_logp=ref_logp, mask=mask)
  d = jnp.asarray(policy_logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
  return ops.masked_sum(d, mask, axis=1)


def _pair(z_w, z_l):
  chex.assert_rank([z_w, z_l], 1, custom_message="`z_w` and `z_l` must be [B] sequence log-ratios")
  if jnp.shape(z_w) != jnp.shape(z_l):
    raise ValueError(f"`z_w` {jnp.shape(z_w)} and `z_l` {jnp.shape(z_l)} must have the same shape")
  return jnp.asarray(z_w, jnp.float32), jnp.asarray(z_l, jnp.float32)


def dpo_loss(z_w: ArrayLike, z_l: ArrayLike, *, beta: float = 0.05) -> Array:
  """DPO (Rafailov et al., arXiv 2305.18290) as an implicit PRM: ``mean −log σ(β(z_w − z_l))``.

  z_w, z_l: ``[B]`` sequence log-ratios of chosen / rejected responses.
  """
  z_w, z_l = _pair(z_w, z_l)
  return jnp.mean(-jax.nn.log_sigmoid(beta * (z_w - z_l)))


def implicit_ce_loss(z: ArrayLike, labels: ArrayLike, *, beta: float = 0.05) -> Array:
  """Unpaired cross-entropy: ``mean BCE(σ(β z), l) = −mean[l log σ(βz) + (1−l) log σ(−βz)]``.

  z: ``[B]`` sequence log-ratios; labels: ``[B]`` in [0, 1] (arXiv 2412.01981, CE variant).
  """
  chex.assert_rank([z, labels], 1, custom_message="`z` and `labels` must be [B]")
  if jnp.shape(z) != jnp.shape(labels):
    raise ValueError(f"`z` {jnp.shape(z)} and `labels` {jnp.shape(labels)} differ in shape")
  x = beta * jnp.asarray(z, jnp.float32)
  y = jnp.asarray(labels, jnp.float32)
  return jnp.mean(-(y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x)))


def nca_loss(z_w: ArrayLike, z_l: ArrayLike, *, beta: float = 0.05) -> Array:
  """NCA (Chen et al., arXiv 2402.05369), pairwise form as TGDPO's ``nca_pair``:

  ``mean[−log σ(β z_w) − ½ log σ(−β z_w) − ½ log σ(−β z_l)]``.
  """
  z_w, z_l = _pair(z_w, z_l)
  return jnp.mean(-jax.nn.log_sigmoid(beta * z_w) - 0.5 * jax.nn.log_sigmoid(-beta * z_w)
                  - 0.5 * jax.nn.log_sigmoid(-beta * z_l))


def kto_loss(z_w: ArrayLike, z_l: ArrayLike, *, beta: float = 0.05,
             kl_ref: Optional[ArrayLike] = None, w_desirable: float = 1.0,
             w_undesirable: float = 1.0) -> Array:
  """KTO (Ethayarajh et al., arXiv 2402.01306) as in ImplicitPRM's OpenRLHF losses.

  Balanced form (``kl_ref=None``, ``VanillaKTOLoss``): ``KL_w = max(mean z_w, 0)``,
  ``KL_l = max(mean z_l, 0)``, ``L = mean(concat[1 − σ(β(z_w − KL_l)), 1 − σ(β(KL_w − z_l))])``.
  Unbalanced form (``KTOLoss``): one detached scalar ``KL = max(kl_ref, 0)`` (estimated from
  mismatched pairs), ``L = mean(concat[λ_D(1 − σ(β(z_w − KL))), λ_U(1 − σ(β(KL − z_l)))])``.
  z_w: ``[Bw]`` desirable, z_l: ``[Bl]`` undesirable sequence log-ratios.
  """
  chex.assert_rank([z_w, z_l], 1, custom_message="`z_w` and `z_l` must be 1-D")
  z_w = jnp.asarray(z_w, jnp.float32)
  z_l = jnp.asarray(z_l, jnp.float32)
  if kl_ref is None:
    kl_w = jnp.maximum(jnp.mean(z_w), 0.0)
    kl_l = jnp.maximum(jnp.mean(z_l), 0.0)
    losses = jnp.concatenate([1.0 - jax.nn.sigmoid(beta * (z_w - kl_l)),
                              1.0 - jax.nn.sigmoid(beta * (kl_w - z_l))])
    return jnp.mean(losses)
  chex.assert_rank(kl_ref, 0, custom_message="`kl_ref` must be a scalar")
  kl = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(kl_ref, jnp.float32), 0.0))
  losses = jnp.concatenate([w_desirable * (1.0 - jax.nn.sigmoid(beta * (z_w - kl))),
                            w_undesirable * (1.0 - jax.nn.sigmoid(beta * (kl - z_l)))])
  return jnp.mean(losses)
