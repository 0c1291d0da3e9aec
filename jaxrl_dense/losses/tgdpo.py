"""TGDPO: token-level reward guidance for DPO (arXiv 2506.14574), with plain DPO.

Each token's policy/reference log-ratio inside the DPO objective is re-weighted by a token reward
taken from a previously trained (DPO) model rm:

  rho_t = logp_theta_t - logp_ref_t,     rhat_t = logp_rm_t - logp_ref_t   (no beta inside)
  L = -log sigma( sum_t beta (1 + alpha beta rhat^w_t) rho^w_t m^w_t
                 - sum_t beta (1 - alpha beta rhat^l_t) rho^l_t m^l_t )

alpha = 0 gives plain DPO (Rafailov et al., arXiv 2305.18290):
  L_DPO = -log sigma( beta sum_t rho^w_t m^w_t - beta sum_t rho^l_t m^l_t ).
Logged rewards: beta * sum_t rho_t m_t (chosen / rejected), stop-gradient.
[CODE≠PAPER note] the official code does not clip the weights 1 ± alpha beta rhat, so they can be
<= 0 (a token's log-ratio then pushes the other way); `weight_clip=(lo, hi)` is an optional guard.
Official code: dvlab-research/TGDPO (src/llamafactory/train/tgdpo/trainer.py, dpo_loss "sigmoid").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_dense import ops
from jaxrl_dense.losses.sequence import dpo_loss, sequence_logratio

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["tgdpo_token_weights", "tgdpo_loss", "dpo_loss_from_token_logps"]


def tgdpo_token_weights(lp_rm: ArrayLike, lp_ref: ArrayLike, mask: ArrayLike, beta: float,
                        alpha: float, chosen: bool,
                        weight_clip: tuple[float | None, float | None] | None = None) -> Array:
  """w_t = 1 + alpha beta rhat_t (chosen) or 1 - alpha beta rhat_t (rejected), `[B, T]`, stop-grad.

  rhat_t = lp_rm_t - lp_ref_t; 0 on padding. `weight_clip=(lo, hi)` clips (None = unbounded).
  """
  lp_rm = jnp.asarray(lp_rm, jnp.float32)
  lp_ref = jnp.asarray(lp_ref, jnp.float32)
  ops.check_token_arrays(lp_rm=lp_rm, lp_ref=lp_ref, mask=mask)
  rhat = jax.lax.stop_gradient(lp_rm - lp_ref)  # [B, T]
  sign = 1.0 if chosen else -1.0
  w = 1.0 + sign * alpha * beta * rhat  # [B, T]
  if weight_clip is not None:
    lo, hi = weight_clip
    w = jnp.clip(w, lo, hi)
  return jnp.where(ops.as_bool_mask(mask), w, 0.0)


def tgdpo_loss(lp_pol_w: ArrayLike, lp_ref_w: ArrayLike, lp_rm_w: ArrayLike, mask_w: ArrayLike,
               lp_pol_l: ArrayLike, lp_ref_l: ArrayLike, lp_rm_l: ArrayLike, mask_l: ArrayLike,
               beta: float = 0.1, alpha: float = 0.5,
               weight_clip: tuple[float | None, float | None] | None = None
               ) -> tuple[Array, Array, Array]:
  """TGDPO loss (mean over pairs) with logged rewards.

  Args:
    lp_pol_w, lp_ref_w, lp_rm_w: `[B, Tw]` log-probs of the chosen response's tokens under the
      policy (trainable), the frozen reference and the guidance model; mask_w `[B, Tw]`.
    lp_pol_l, lp_ref_l, lp_rm_l, mask_l: same for the rejected response, `[B, Tl]`.
    beta: DPO temperature (0.1). alpha: guidance strength (0.5); 0 reduces exactly to DPO.
    weight_clip: optional (lo, hi) clip of the token weights (the official code has none).

  Returns:
    (loss scalar, chosen_reward `[B]`, rejected_reward `[B]`); rewards are beta * sum rho,
    stop-gradient.
  """
  ops.check_token_arrays(lp_pol_w=lp_pol_w, lp_ref_w=lp_ref_w, lp_rm_w=lp_rm_w, mask_w=mask_w)
  ops.check_token_arrays(lp_pol_l=lp_pol_l, lp_ref_l=lp_ref_l, lp_rm_l=lp_rm_l, mask_l=mask_l)
  if jnp.shape(lp_pol_w)[0] != jnp.shape(lp_pol_l)[0]:
    raise ValueError(f"chosen and rejected batches differ: {jnp.shape(lp_pol_w)[0]} vs "
                     f"{jnp.shape(lp_pol_l)[0]} pairs.")
  mw, ml = ops.as_bool_mask(mask_w), ops.as_bool_mask(mask_l)
  rho_w = jnp.where(mw, jnp.asarray(lp_pol_w, jnp.float32) - lp_ref_w, 0.0)  # [B, Tw]
  rho_l = jnp.where(ml, jnp.asarray(lp_pol_l, jnp.float32) - lp_ref_l, 0.0)  # [B, Tl]
  w_w = tgdpo_token_weights(lp_rm_w, lp_ref_w, mw, beta, alpha, True, weight_clip)  # [B, Tw]
  w_l = tgdpo_token_weights(lp_rm_l, lp_ref_l, ml, beta, alpha, False, weight_clip)  # [B, Tl]
  logits = beta * (jnp.sum(w_w * rho_w, axis=1) - jnp.sum(w_l * rho_l, axis=1))  # [B]
  loss = -jnp.mean(jax.nn.log_sigmoid(logits))
  chosen = jax.lax.stop_gradient(beta * jnp.sum(rho_w, axis=1))
  rejected = jax.lax.stop_gradient(beta * jnp.sum(rho_l, axis=1))
  return loss, chosen, rejected


def dpo_loss_from_token_logps(lp_pol_w: ArrayLike, lp_ref_w: ArrayLike, mask_w: ArrayLike,
                              lp_pol_l: ArrayLike, lp_ref_l: ArrayLike, mask_l: ArrayLike,
                              beta: float = 0.1) -> tuple[Array, Array, Array]:
  """Plain DPO from token log-probs: `-mean log sigma(beta (z_w - z_l))`, z = sum_t rho_t m_t.

  Returns (loss, chosen_reward `[B]`, rejected_reward `[B]`) like `tgdpo_loss`.
  """
  ops.check_token_arrays(lp_pol_w=lp_pol_w, lp_ref_w=lp_ref_w, mask_w=mask_w)
  ops.check_token_arrays(lp_pol_l=lp_pol_l, lp_ref_l=lp_ref_l, mask_l=mask_l)
  if jnp.shape(lp_pol_w)[0] != jnp.shape(lp_pol_l)[0]:
    raise ValueError(f"chosen and rejected batches differ: {jnp.shape(lp_pol_w)[0]} vs "
                     f"{jnp.shape(lp_pol_l)[0]} pairs.")
  z_w = sequence_logratio(lp_pol_w, lp_ref_w, mask_w)  # [B]
  z_l = sequence_logratio(lp_pol_l, lp_ref_l, mask_l)  # [B]
  loss = dpo_loss(z_w, z_l, beta=beta)
  return loss, jax.lax.stop_gradient(beta * z_w), jax.lax.stop_gradient(beta * z_l)
