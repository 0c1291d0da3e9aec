"""Implicit process rewards of PRIME (Cui et al., arXiv 2502.01456) and the PRM update losses.

The implicit PRM (Yuan et al., arXiv 2412.01981) is a causal LM π_φ; with a frozen reference π_ref
the per-token log-ratio ``q_t = log π_φ(y_t|·) − log π_ref(y_t|·)`` times β is a process reward
(paper Eq. 3) and its prefix sums are implicit Q-values. References: veRL recipe
``prime/prime_dp_rm.py`` (token scores, batch-norm) and ``prime/prime_core_algos.py`` (CE, detached
DPO / best-of-N losses, metrics); PRIME-RL/PRIME ``training/verl/workers/actor/dp_prime.py`` and
``training/verl/trainer/ppo/core_algos.py``.

Variants: ``"verl"`` = the maintained veRL recipe (β·q, last valid token forced to 0),
``"original"`` = PRIME-RL/PRIME (raw q without β on every valid token), ``"paper"`` = Eq. 3 as
written (β·q on every valid token).
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import ops
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

VARIANTS = ("verl", "original", "paper")
GRANULARITIES = ("token", "whole")
BON_MODES = ("none", "bon_acc", "bon_rm")


class ImplicitRewards(NamedTuple):
  """Output of :func:`implicit_token_rewards` (both ``[B, T]``, stop-gradient, 0 on padding)."""
  scores: Array   # token-level process rewards s[i, t]
  q: Array        # log-ratio q[i, t] = prm_logp − ref_logp (0 on padding)


def _check_nonempty_rows(mask, fn):
  if ops.is_concrete(mask):
    lengths = np.asarray(ops.valid_lengths(mask))
    if (lengths == 0).any():
      raise ValueError(f"{fn}: rows {np.flatnonzero(lengths == 0).tolist()} of `mask` have no valid "
                       "token; every response has L >= 1 (EOS counts), so empty rows are rejected")


@renamed_kwargs(logp_prm="prm_logp", logp_ref="ref_logp")
def token_log_ratio(prm_logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike) -> Array:
  """``q[i, t] = (prm_logp − ref_logp)[i, t]`` on valid tokens, 0 on padding. ``[B, T] -> [B, T]``.

  Differentiable w.r.t. ``prm_logp`` (use it inside PRM losses); not stop-gradient.
  """
  ops.check_token_arrays(prm_logp=prm_logp, ref_logp=ref_logp, mask=mask)
  m = ops.as_bool_mask(mask)
  return jnp.where(m, jnp.asarray(prm_logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32), 0.0)


@renamed_kwargs(variant="reference_impl", acc="outcome", logp_prm="prm_logp", logp_ref="ref_logp")
def implicit_token_rewards(prm_logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike, *,
                           beta: float = 0.05, reference_impl: str = "verl", granularity: str = "token",
                           lam: float = 0.0, outcome: ArrayLike | None = None,
                           use_gt: bool = False) -> ImplicitRewards:
  """Token-level implicit process rewards (PRIME, arXiv 2502.01456 Eq. 3).

  ``q = (prm_logp − ref_logp)·m``, then with L_i the valid length:

  * ``reference_impl="verl"`` (veRL recipe ``_forward_micro_batch``): ``r = β·q``; ``token`` granularity:
    ``s[i, t] = r[i, t]`` for ``t < L_i − 1`` and **``s[i, L_i − 1] = 0``** (the EOS token never
    carries a process reward). Non-default ``lam = λ ≠ 0``: ``q' = β·q`` (with ``use_gt``,
    ``q'[i, L_i−1] ← outcome_i − Σ_{t<L_i−1} q'[i, t]``), ``r_t = q'_t + λ·r_{t+1}``, then the same
    last-token drop. ``granularity="whole"`` is broken in the recipe (it raises for any L > 1) and
    raises ValueError here (unless every L_i = 1, where the recipe's result is reproduced).
  * ``reference_impl="original"`` (PRIME-RL/PRIME ``compute_implicit_reward``): **no β**; ``token``:
    ``s[i, t] = q[i, t]`` for all ``t < L_i``; ``whole``: ``s[i, L_i − 1] = Σ_{t<L_i} q[i, t]``.
  * ``reference_impl="paper"`` (Eq. 3): ``token``: ``s = β·q`` on every valid token; ``whole``:
    ``s[i, L_i − 1] = β Σ_t q[i, t]``.

  Normalise afterwards with :func:`prime_norm` (batch-norm, the default in both references).

  Args:
    prm_logp: ``[B, T]`` log π_φ of the realised response tokens.
    ref_logp: ``[B, T]`` log π_ref of the same tokens.
    mask: ``[B, T]`` response mask (1 up to and including EOS). Rows must be non-empty.
    beta: β (``beta_train``), 0.05 in PRIME.
    reference_impl: ``"verl"`` | ``"original"`` | ``"paper"``.
    granularity: ``"token"`` | ``"whole"``.
    lam, outcome, use_gt: veRL-only λ-return option (``outcome [B]`` needed when ``use_gt``).

  Returns:
    ``ImplicitRewards(scores [B, T], q [B, T])``, stop-gradient, 0 on padding.
  """
  ops.check_token_arrays(prm_logp=prm_logp, ref_logp=ref_logp, mask=mask)
  if reference_impl not in VARIANTS:
    raise ValueError(f"`reference_impl` must be one of {VARIANTS}, got {reference_impl!r}")
  if granularity not in GRANULARITIES:
    raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
  if lam != 0.0 and reference_impl != "verl":
    raise ValueError(f"`lam` (λ-return) exists only in reference_impl='verl', got reference_impl={reference_impl!r}")
  if reference_impl == "verl" and granularity == "whole":
    # The recipe writes a length-L slice into one element: it only runs when every L_i = 1, where
    # it equals the paper's whole granularity. Anything else (or unknown lengths under jit) raises.
    lengths = np.asarray(ops.valid_lengths(mask)) if ops.is_concrete(mask) else None
    if lengths is None or (lengths > 1).any():
      raise ValueError("granularity='whole' is broken in the veRL recipe (it writes a length-L "
                       "vector into one element and raises for any L > 1); use reference_impl='original' "
                       "or 'paper' for whole-response rewards")
    reference_impl = "paper"
  if use_gt and outcome is None:
    raise ValueError("`use_gt=True` needs `outcome` [B]")
  if outcome is not None:
    ops.check_row_arrays(jnp.shape(mask)[0], outcome=outcome)
  _check_nonempty_rows(mask, "implicit_token_rewards")

  m = ops.as_bool_mask(mask)                                        # [B, T]
  q = jax.lax.stop_gradient(token_log_ratio(prm_logp, ref_logp, m))  # [B, T]
  t = jnp.arange(m.shape[1], dtype=jnp.int32)[None, :]              # [1, T]
  last = ops.last_token_index(m)[:, None]                           # [B, 1]
  is_last = t == last                                               # [B, T]

  if reference_impl == "original":
    if granularity == "token":
      scores = q
    else:
      scores = jnp.where(is_last, jnp.sum(q, axis=1, keepdims=True), 0.0)
  elif reference_impl == "paper":
    r = beta * q
    scores = r if granularity == "token" else jnp.where(is_last, jnp.sum(r, 1, keepdims=True), 0.0)
  else:  # verl
    r = beta * q                                                    # [B, T]
    if lam != 0.0:
      if use_gt:
        before_last = jnp.sum(jnp.where(t < last, r, 0.0), axis=1, keepdims=True)   # [B, 1]
        gt = jnp.asarray(outcome, jnp.float32)[:, None] - before_last                   # [B, 1]
        r = jnp.where(is_last, gt, r)
      r = ops.reverse_cumsum(jnp.where(m, r, 0.0), gamma=lam)       # λ-return over all T
    scores = jnp.where(t < last, r, 0.0)                            # drop the last valid token
  scores = jnp.where(m, scores, 0.0)
  return ImplicitRewards(jax.lax.stop_gradient(scores), q)


def _row_keep(row_mask, b: int, fn: str):
  if row_mask is None:
    return None
  ops.check_row_arrays(b, row_mask=row_mask)
  return jnp.asarray(row_mask) > 0                                  # [B]


def prime_batch_norm(scores: ArrayLike, *, eps: float = 1e-6, row_mask: ArrayLike | None = None) -> Array:
  """PRIME ``prime_norm="batch_norm"`` (veRL recipe ``prime_dp_rm.py`` ``prime_norm``; PRIME-RL/PRIME
  inline in ``dp_prime.py`` ``update_policy``).

  ``C[i, t] = Σ_{s≥t} scores[i, s]`` (over the full row), ``Z = max_{i,t} |C[i, t]|``,
  ``scores / (Z + eps)``: the largest absolute process return of the batch becomes ≈ 1.
  The references take Z per data-parallel shard; to reproduce that, ``jax.vmap`` this function
  over a ``[num_shards, B / num_shards, T]`` reshape. Shapes: ``[B, T] -> [B, T]``.
  ``row_mask [B]`` (optional): rows where it is 0 (out-of-band groups of ``--filter_mode=mask``)
  take no part in Z and come out 0, so the result on the other rows equals this function on
  them alone.
  """
  chex.assert_rank(scores, 2, custom_message="`scores` must be [B, T]")
  s = jnp.asarray(scores, jnp.float32)
  keep = _row_keep(row_mask, s.shape[0], "prime_batch_norm")
  if keep is not None:
    s = jnp.where(keep[:, None], s, 0.0)
  c = ops.reverse_cumsum(s)                                         # [B, T]
  z = jnp.max(jnp.abs(c))
  return jax.lax.stop_gradient(s / (z + eps))


def zero_float_noise(scores: ArrayLike, q: ArrayLike, *, tol: float,
                     row_mask: ArrayLike | None = None) -> Array:
  """Guard of the scale-free batch-norm: process rewards of exactly 0 when the PRM is the reference.

  ``Z_q = max_{i,t} |Σ_{s≥t} q[i, s]|`` over the rows with ``row_mask > 0`` (all rows if None),
  with q the raw log-ratio ``log π_prm − log π_ref`` (0 on padding; β-free, so one tolerance
  serves every variant). Returns ``scores`` if ``Z_q ≥ tol`` and zeros otherwise (``tol = 0``:
  always ``scores``). Shapes: scores, q ``[B, T]`` -> ``[B, T]``.

  Why: :func:`prime_batch_norm` divides by ``Z + 1e-6``, so its output does not depend on how
  large the implicit rewards are. While the PRM still equals the reference (PRIME's start:
  both initialised from the same SFT model), q is only the float rounding between two forward
  programs (the PRM's update pass vs. the reference's scoring pass), which the norm would blow up
  to a full-size random process reward (jaxrl_dense's audit: logged ``prm/q_seq_mean`` of
  1e-5 at step 1 of SmolLM2 runs, float32, 48-token responses, and advantages in [−3.0, 3.4] on an
  all-wrong batch where RLOO's are 0). The default tolerance 1e-4 nats sits above that float32
  noise (estimate: a log-prob of magnitude ≤ ~20 carries ~1e-6 of rounding, and the errors of a
  few hundred tokens partly cancel; measured: ≤ 2e-5 per batch mean) and far below a trained
  PRM's sums (the same runs' Σ_t q moved by ~6 nats per step on average at --prm_lr=2e-5). It
  does not catch bfloat16 noise (~1e-2 per token): raise ``tol`` there.
  """
  ops.check_token_arrays(scores=scores, q=q)
  qq = jnp.asarray(q, jnp.float32)
  keep = _row_keep(row_mask, qq.shape[0], "zero_float_noise")
  if keep is not None:
    qq = jnp.where(keep[:, None], qq, 0.0)
  zq = jnp.max(jnp.abs(ops.reverse_cumsum(qq)))                     # scalar
  s = jnp.asarray(scores, jnp.float32)
  return jnp.where(zq >= tol, s, jnp.zeros_like(s))


def prime_norm(scores: ArrayLike, norm: str = "batch_norm", *, eps: float = 1e-6) -> Array:
  """``prime_norm`` switch: ``"batch_norm"`` (:func:`prime_batch_norm`) or ``"none"`` (identity)."""
  if norm == "batch_norm":
    return prime_batch_norm(scores, eps=eps)
  if norm == "none":
    chex.assert_rank(scores, 2, custom_message="`scores` must be [B, T]")
    return jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
  raise ValueError(f"`norm` must be 'batch_norm' or 'none', got {norm!r}")


# ----------------------------------------------------------------------------- PRM losses


def _log_clamped(log_p):
  # PyTorch's BCE clamps each log term at −100.
  return jnp.maximum(log_p, -100.0)


@renamed_kwargs(acc="outcome")
def prm_ce_loss_terms(q: ArrayLike, mask: ArrayLike, outcome: ArrayLike, *, beta: float = 0.05) -> Array:
  """Per-response implicit-PRM cross-entropy ``[B]`` (see :func:`prm_ce_loss`)."""
  ops.check_token_arrays(q=q, mask=mask)
  ops.check_row_arrays(jnp.shape(q)[0], outcome=outcome)
  z = beta * ops.masked_sum(q, mask, axis=1)                        # [B]
  y = jnp.asarray(outcome, jnp.float32)
  return -(y * _log_clamped(jax.nn.log_sigmoid(z)) + (1.0 - y) * _log_clamped(jax.nn.log_sigmoid(-z)))


@renamed_kwargs(acc="outcome")
def prm_ce_loss(q: ArrayLike, mask: ArrayLike, outcome: ArrayLike, *, beta: float = 0.05) -> Array:
  """Implicit-PRM cross-entropy loss (PRIME, arXiv 2502.01456 Sec. 3.2 / App. C.2; ``loss_type: ce``).

  Reference: ``compute_ce_dpo_loss_rm`` (veRL recipe ``prime/prime_core_algos.py``; PRIME-RL/PRIME
  ``training/verl/trainer/ppo/core_algos.py``).

  ``z_i = β Σ_t m[i,t] q[i,t]``, ``p_i = σ(z_i)``,
  ``ℓ = −(1/B) Σ_i [outcome_i log p_i + (1 − outcome_i) log(1 − p_i)]`` (each log clamped at −100 as in
  PyTorch's BCE). ``∂ℓ/∂q[i,t] = (p_i − outcome_i)·β·m[i,t]/B``: padded positions get no gradient.

  Args:
    q: ``[B, T]`` log-ratio ``prm_logp − ref_logp`` carrying the gradient to the PRM.
    mask: ``[B, T]`` response mask. outcome: ``[B]`` outcome labels in [0, 1]. beta: β (0.05).
  Returns: scalar mean over the B responses (use :func:`prm_ce_loss_terms` for (sum, count)).
  """
  return jnp.mean(prm_ce_loss_terms(q, mask, outcome, beta=beta))


def group_matrix(v: ArrayLike, n: int) -> Array:
  """``out[i, k] = v[g(i)·n + k]``: the n values of row i's prompt group. ``[B] -> [B, n]``.

  Builds the detached ``Q_bc`` / ``outcome_bc`` inputs of :func:`prm_detached_dpo_loss` from
  contiguous groups (e.g. ``group_matrix(stop_gradient(masked_sum(q, mask, 1)), n)``).
  """
  chex.assert_rank(v, 1, custom_message="`v` must be [B]")
  b = jnp.shape(v)[0]
  if n < 1 or b % n:
    raise ValueError(f"B = {b} rows must split into groups of n = {n}")
  g = jnp.reshape(jnp.asarray(v), (b // n, n))                      # [P, n]
  return jnp.repeat(g, n, axis=0)                                   # [B, n]


@renamed_kwargs(acc="outcome", acc_bc="outcome_bc")
def prm_detached_dpo_loss(q: ArrayLike, mask: ArrayLike, outcome: ArrayLike, q_bc: ArrayLike,
                          outcome_bc: ArrayLike, *, beta: float = 0.05, bon_mode: str = "none",
                          tie_atol: float = 1e-6) -> Array:
  """veRL recipe detached-DPO / best-of-N PRM loss (``prime/prime_core_algos.py``
  ``compute_detach_dpo_loss_rm``).

  ``Q_i = β Σ_t m q[i, t]``; the "other side" of i is
  ``C_i = {Q_bc[i,k] : outcome_bc[i,k] < outcome_i}`` if ``outcome_i > 0`` else ``{Q_bc[i,k] : outcome_bc[i,k] > outcome_i}``,
  ``O_i = β·mean(C_i)`` (0 if empty), ``sgn_i = +1 if outcome_i > 0 else −1``,
  ``ℓ_i = −log σ((Q_i − O_i)·sgn_i)``.
  ``bon_mode="none"`` (``loss_type: dpo``): ``mean_i ℓ_i``; ``"bon_acc"``: ``Σ_i w_i ℓ_i`` with
  ``w_i = n·(mean_k[outcome_bc[i,k] ≤ outcome_i])^(n−1)``; ``"bon_rm"``: ``w_i = n·(mean_k[β Q_bc[i,k] ≤ Q_i])^(n−1)``
  (the ≤ includes i itself, compared with ``tie_atol`` slack). The weights are not differentiated.

  Args:
    q: ``[B, T]`` log-ratio with gradient. mask: ``[B, T]``. outcome: ``[B]``.
    q_bc: ``[B, n]`` detached summed (unscaled) q of the n responses of i's prompt (i included).
    outcome_bc: ``[B, n]`` their labels. (Build both with :func:`group_matrix`.)
  Returns: scalar loss.
  """
  ops.check_token_arrays(q=q, mask=mask)
  b = ops.check_row_arrays(jnp.shape(q)[0], outcome=outcome)
  chex.assert_rank([q_bc, outcome_bc], 2, custom_message="`q_bc` and `outcome_bc` must be [B, n]")
  if jnp.shape(q_bc) != jnp.shape(outcome_bc) or jnp.shape(q_bc)[0] != b:
    raise ValueError(f"`q_bc` {jnp.shape(q_bc)} and `outcome_bc` {jnp.shape(outcome_bc)} must both be "
                     f"[B={b}, n]")
  if bon_mode not in BON_MODES:
    raise ValueError(f"`bon_mode` must be one of {BON_MODES}, got {bon_mode!r}")
  n = jnp.shape(q_bc)[1]
  outcome = jnp.asarray(outcome, jnp.float32)                               # [B]
  q_bc = jax.lax.stop_gradient(jnp.asarray(q_bc, jnp.float32))      # [B, n]
  outcome_bc = jnp.asarray(outcome_bc, jnp.float32)                         # [B, n]
  cur = ops.masked_sum(q, mask, axis=1) * beta                      # [B]
  pos = outcome > 0                                                     # [B]
  chosen = jnp.where(pos[:, None], outcome_bc < outcome[:, None], outcome_bc > outcome[:, None])  # [B, n]
  cnt = jnp.sum(chosen, axis=1)                                     # [B]
  other = jnp.where(cnt > 0, jnp.sum(jnp.where(chosen, q_bc, 0.0), 1) / jnp.maximum(cnt, 1), 0.0)
  other = other * beta                                              # [B]
  sgn = jnp.where(pos, 1.0, -1.0)
  per = -jax.nn.log_sigmoid((cur - other) * sgn)                    # [B]
  if bon_mode == "none":
    return jnp.mean(per)
  if bon_mode == "bon_acc":
    frac = jnp.mean((outcome_bc <= outcome[:, None]).astype(jnp.float32), axis=1)
  else:
    cur_d = jax.lax.stop_gradient(cur)
    frac = jnp.mean((q_bc * beta <= cur_d[:, None] + tie_atol).astype(jnp.float32), axis=1)
  w = jax.lax.stop_gradient(n * frac ** (n - 1))                    # [B]
  return jnp.sum(per * w)


# ----------------------------------------------------------------------------- PRM metrics


@renamed_kwargs(acc="outcome")
def prm_pairwise_accuracy(token_scores: ArrayLike, mask: ArrayLike, outcome: ArrayLike, *, n: int) -> Array:
  """PRM pairwise accuracy (``compute_dpo_accuracy``, both references).

  Per group of n contiguous responses with ``S_i = Σ_t m s[i, t]``, over pairs i < j with
  ``Δa = outcome_i − acc_j``, ``ΔS = S_i − S_j``:
  ``acc_g = Σ [(ΔS > 0) = (Δa > 0)]·|Δa| / Σ |Δa|`` (0.5 when ``Σ|Δa| = 0``); returns mean over groups.
  Shapes: token_scores, mask ``[B, T]``, outcome ``[B]`` -> scalar.
  """
  ops.check_token_arrays(token_scores=token_scores, mask=mask)
  b = ops.check_row_arrays(jnp.shape(mask)[0], outcome=outcome)
  if n < 1 or b % n:
    raise ValueError(f"B = {b} rows must split into groups of n = {n}")
  s = ops.masked_sum(token_scores, mask, axis=1).reshape(-1, n)     # [P, n]
  a = jnp.asarray(outcome, jnp.float32).reshape(-1, n)                  # [P, n]
  ds = s[:, :, None] - s[:, None, :]                                # [P, n, n]
  da = a[:, :, None] - a[:, None, :]                                # [P, n, n]
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)[None]               # [1, n, n]
  w = jnp.where(upper, jnp.abs(da), 0.0)
  agree = ((ds > 0) == (da > 0)).astype(jnp.float32)
  tot = jnp.sum(w, axis=(1, 2))                                     # [P]
  acc_g = jnp.where(tot == 0, 0.5, jnp.sum(agree * w, axis=(1, 2)) / jnp.where(tot == 0, 1.0, tot))
  return jnp.mean(acc_g)


@renamed_kwargs(acc="outcome")
def prm_sign_accuracy(token_scores: ArrayLike, mask: ArrayLike, outcome: ArrayLike) -> Array:
  """``dpo_abs_acc`` (veRL recipe): ``mean_i [sign(Σ_t m s[i,t]) = sign(2 outcome_i − 1)]``."""
  ops.check_token_arrays(token_scores=token_scores, mask=mask)
  ops.check_row_arrays(jnp.shape(mask)[0], outcome=outcome)
  s = ops.masked_sum(token_scores, mask, axis=1)
  return jnp.mean((jnp.sign(s) == jnp.sign(2.0 * jnp.asarray(outcome, jnp.float32) - 1.0)).astype(jnp.float32))


@renamed_kwargs(acc="outcome")
def prm_metrics(token_scores: ArrayLike, mask: ArrayLike, outcome: ArrayLike, *, n: int) -> dict:
  """``{"prm/dpo_acc": ..., "prm/dpo_abs_acc": ...}`` (the metrics the veRL recipe logs)."""
  return {"prm/dpo_acc": prm_pairwise_accuracy(token_scores, mask, outcome, n=n),
          "prm/dpo_abs_acc": prm_sign_accuracy(token_scores, mask, outcome)}
