"""PRM health: is the implicit process reward still tracking the outcome?

A learned process reward model (PRM) can drift away from the verifier it is trained on, and the
policy can learn to please the PRM instead of solving the task (reward hacking; the motivation of
PRIME's online PRM update, Cui et al., arXiv 2502.01456 Sec. 3.2). These metrics say, every step,
how well the PRM's rewards agree with the verifier labels of the same batch, and
:class:`RewardHackingMonitor` raises an alarm when the two trend apart.

Conventions as in ``jaxrl_dense.ops``: ``[B, T]`` arrays with a ``mask`` (1 on response tokens
including EOS), groups of ``n`` contiguous rows per prompt, ``step_ids [B, T]`` int with −1 on
padding. Labels ``outcome [B]`` are the verifier's outcome rewards; a response is *positive* when
``outcome > 0.5`` (binary labels are 0/1; fractional labels, e.g. a share of passed tests, are
thresholded at 0.5).

Pure metrics (jit-safe: no Python control flow on values; NaN where undefined)
------------------------------------------------------------------------------
``sequence_implicit_reward(q, mask, *, beta)`` -> ``[B]``
    ``r_i = β Σ_t m[i,t] q[i,t]``, the implicit outcome reward of the PRM (its CE-loss logit).
``auroc(scores, labels)`` -> scalar
    Exact ROC AUC (Mann–Whitney U with ties counted 1/2); NaN without both classes.
``pearson(x, y)`` -> scalar; NaN when either has zero variance.
``last_step_share(token_scores, mask, step_ids)`` -> scalar
    Mean over responses of the share of absolute process credit on the final step.
``prm_health_metrics(...)`` -> dict of the metrics below, ready for ``MetricsWriter.write``:

    prm_health/auroc              AUROC of r_i (sequence implicit reward) vs acc_i > 0.5
    prm_health/return_outcome_corr Pearson corr of the process return G_i = Σ_t m s[i,t] with acc_i
    prm_health/pairwise_acc       ``rewards.prm_pairwise_accuracy`` of q (within-group ranking)
    prm_health/last_step_share    see ``last_step_share`` (only when ``step_ids`` is given)
    prm_health/implicit_reward_mean  mean_i r_i (what the alarm tracks by default)

Step credit (does the PRM locate the first wrong step? ProcessBench-style, arXiv 2412.06559)
-------------------------------------------------------------------------------------------
Solutions whose steps carry labels (e.g. ``data.chain_arith.step_credit_solutions``: the first
wrong step ``k_i``, −1 when none) are scored with the PRM's token rewards ``β q_t``; each step's
score is the sum (or min) over its tokens, and the metrics say whether low step scores fall on the
first wrong step. ``experiments/prm_step_credit.py`` runs it on a run's PRM.

``step_ids_from_offsets(offsets, step_spans, num_cols)`` -> int32 ``[B, T]`` (host)
    Step of every token from the tokenizer's character offsets (−1: no step).
``step_scores(token_rewards, step_ids, num_steps, reduce="sum"|"min")`` -> ``[B, S]``, NaN where
    a step has no token.
``predict_first_error(scores, threshold)`` -> ``[B]``: the first step whose score is below the
    threshold, −1 if none.
``first_error_metrics(scores, first_error, threshold=...)`` -> dict: ``error_acc``,
    ``correct_acc``, ``f1`` (ProcessBench), ``argmin_acc``, ``step_auroc`` and counts.
``choose_threshold(scores, first_error)`` -> float (host): the threshold of the best F1 on a
    calibration split. ``chance_metrics(num_steps, first_error)``: the same metrics of a uniform
    random guess.

Host-side monitor
-----------------
``RewardHackingMonitor(window=20, t_threshold=2.0)``: ``update(step, process_reward,
outcome_acc) -> dict`` with ``prm_health/hacking_alarm`` (0/1) and the two trend statistics; logs
a warning when the alarm switches on. The rule is in its docstring and in ``docs/prm_health.md``.
"""
from __future__ import annotations

import collections
import logging
import math
from typing import Mapping, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import ops
from jaxrl_dense.rewards import prm_pairwise_accuracy
from jaxrl_dense._deprecation import renamed_kwargs

Array = jax.Array
ArrayLike = chex.Array

logger = logging.getLogger(__name__)

__all__ = ["position_bin_means", "POSITION_BINS", "sequence_implicit_reward", "auroc", "pearson", "last_step_share", "prm_health_metrics",
           "RewardHackingMonitor", "trend_t_statistic", "step_ids_from_offsets", "step_scores",
           "predict_first_error", "first_error_metrics", "choose_threshold", "chance_metrics",
           "STEP_REDUCTIONS"]


def sequence_implicit_reward(q: ArrayLike, mask: ArrayLike, *, beta: float = 0.05) -> Array:
  """Sequence-level implicit reward ``r_i = β Σ_t m[i,t] q[i,t]`` (PRIME Eq. 3 summed). ``[B, T] -> [B]``.

  ``q = log π_φ − log π_ref`` per token (``rewards.token_log_ratio``); ``σ(r_i)`` is the PRM's
  probability that response i is correct (the logit of ``rewards.prm_ce_loss``).
  """
  ops.check_token_arrays(q=q, mask=mask)
  return beta * ops.masked_sum(jnp.asarray(q, jnp.float32), mask, axis=1)          # [B]


def auroc(scores: ArrayLike, labels: ArrayLike, where: Optional[ArrayLike] = None) -> Array:
  """Exact area under the ROC curve of ``scores`` for the positives ``labels > 0.5``. ``[B], [B] -> ()``.

  ``AUROC = Σ_{i∈P, j∈N} ([s_i > s_j] + ½[s_i = s_j]) / (|P|·|N|)`` (the Mann–Whitney U statistic
  over |P|·|N|; ties count one half, so a constant score gives 0.5). O(B²) pairwise comparison,
  jit-safe; NaN when the batch holds only one class. Non-finite scores are compared as they are
  (NaN compares false both ways, i.e. counts 0). ``where [B]`` (optional, bool): only these
  entries take part (masked equals sliced).
  """
  chex.assert_rank([scores, labels], 1, custom_message="`scores` and `labels` must be [B]")
  chex.assert_equal_shape([scores, labels], custom_message="`scores` and `labels` must share [B]")
  s = jnp.asarray(scores, jnp.float32)                                             # [B]
  pos = jnp.asarray(labels, jnp.float32) > 0.5                                     # [B]
  w = jnp.ones_like(pos) if where is None else jnp.asarray(where, bool)            # [B]
  chex.assert_equal_shape([pos, w], custom_message="`where` must be [B] like `scores`")
  pair = (pos & w)[:, None] & (~pos & w)[None, :]                                  # [B, B] i∈P, j∈N
  win = (s[:, None] > s[None, :]).astype(jnp.float32)                              # [B, B]
  tie = (s[:, None] == s[None, :]).astype(jnp.float32)                             # [B, B]
  u = jnp.sum(jnp.where(pair, win + 0.5 * tie, 0.0))
  cnt = jnp.sum(pair.astype(jnp.float32))
  return jnp.where(cnt > 0, u / jnp.maximum(cnt, 1.0), jnp.nan)


def pearson(x: ArrayLike, y: ArrayLike) -> Array:
  """Pearson correlation ``cov(x, y) / (std x · std y)`` of two ``[B]`` vectors; NaN if either is constant."""
  chex.assert_rank([x, y], 1, custom_message="`x` and `y` must be [B]")
  chex.assert_equal_shape([x, y], custom_message="`x` and `y` must share [B]")
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  dx = x - jnp.mean(x)
  dy = y - jnp.mean(y)
  sxx, syy = jnp.sum(dx * dx), jnp.sum(dy * dy)
  ok = (sxx > 0) & (syy > 0)
  r = jnp.sum(dx * dy) / jnp.sqrt(jnp.where(ok, sxx * syy, 1.0))
  return jnp.where(ok, jnp.clip(r, -1.0, 1.0), jnp.nan)


def last_step_share(token_scores: ArrayLike, mask: ArrayLike, step_ids: ArrayLike) -> Array:
  """Share of the absolute process credit that falls on each response's last step. ``-> ()``.

  With ``K_i = max_t step_ids[i, t]`` over valid tokens (the last step of response i),
  ``share_i = Σ_{t: step=K_i} m|s[i,t]| / Σ_t m|s[i,t]|`` and the result is the mean of
  ``share_i`` over responses with non-zero credit (NaN if none). 1.0 means the PRM behaves like an
  outcome reward model (all credit at the end); ``1/steps`` means credit spread evenly. Absolute
  values, so positive and negative credit inside a step do not cancel. Note that PRIME's "verl"
  variant zeroes the EOS token's reward (``rewards.implicit_token_rewards``); pass ``q`` to
  measure the raw PRM. Shapes: all ``[B, T]``; ``step_ids`` int, −1 (or any id) on padding.
  """
  ops.check_token_arrays(token_scores=token_scores, mask=mask, step_ids=step_ids)
  m = ops.as_bool_mask(mask)                                                       # [B, T]
  a = jnp.where(m, jnp.abs(jnp.asarray(token_scores, jnp.float32)), 0.0)           # [B, T]
  sid = jnp.asarray(step_ids, jnp.int32)                                           # [B, T]
  last = jnp.max(jnp.where(m, sid, jnp.iinfo(jnp.int32).min), axis=1, keepdims=True)  # [B, 1]
  on_last = m & (sid == last)                                                      # [B, T]
  tot = jnp.sum(a, axis=1)                                                         # [B]
  share = jnp.sum(jnp.where(on_last, a, 0.0), axis=1) / jnp.where(tot > 0, tot, 1.0)
  has = tot > 0
  k = jnp.sum(has.astype(jnp.float32))
  return jnp.where(k > 0, jnp.sum(jnp.where(has, share, 0.0)) / jnp.maximum(k, 1.0), jnp.nan)


@renamed_kwargs(acc="outcome")
def prm_health_metrics(token_scores: ArrayLike, q: ArrayLike, mask: ArrayLike, outcome: ArrayLike, *,
                       n: int, beta: float = 0.05, step_ids: Optional[ArrayLike] = None,
                       prefix: str = "prm_health/") -> dict:
  """Per-step PRM health metrics of one batch (see the module docstring for each key).

  Args:
    token_scores: ``[B, T]`` process rewards ``s`` fed to the advantage (e.g.
      ``implicit_token_rewards(...).scores``, before or after ``prime_norm``; the correlation is
      scale-free).
    q: ``[B, T]`` per-token log-ratio ``log π_φ − log π_ref`` of the PRM (``ImplicitRewards.q``).
    mask: ``[B, T]`` response mask. outcome: ``[B]`` verifier outcome rewards.
    n: samples per prompt (static; groups are contiguous rows) for the pairwise accuracy.
    beta: β of the implicit reward.
    step_ids: optional ``[B, T]`` step index per token (e.g. ``viz.step_ids_from_texts`` or
      ``ops.step_ids_from_delimiter``); without it ``last_step_share`` is omitted.
  Returns:
    dict of JAX scalars keyed ``prefix + name``.
  """
  ops.check_token_arrays(token_scores=token_scores, q=q, mask=mask)
  ops.check_row_arrays(jnp.shape(mask)[0], outcome=outcome)
  r = sequence_implicit_reward(q, mask, beta=beta)                                 # [B]
  g = ops.masked_sum(jnp.asarray(token_scores, jnp.float32), mask, axis=1)         # [B]
  a = jnp.asarray(outcome, jnp.float32)
  out = {
      "auroc": auroc(r, a),
      "return_outcome_corr": pearson(g, a),
      "pairwise_acc": prm_pairwise_accuracy(q, mask, a, n=n),
      "implicit_reward_mean": jnp.mean(r),
  }
  if step_ids is not None:
    out["last_step_share"] = last_step_share(token_scores, mask, step_ids)
  return {prefix + k: v for k, v in out.items()}


# ----------------------------------------------------------------------------- step credit

STEP_REDUCTIONS = ("sum", "min")


def step_ids_from_offsets(offsets: Sequence[Sequence[Sequence[int]]],
                          step_spans: Sequence[Sequence[Sequence[int]]],
                          num_cols: Optional[int] = None) -> np.ndarray:
  """Step index of every token from its character span, int32 ``[B, T]`` with −1 = no step (host).

  Row i has token character spans ``offsets[i] = [(a_t, b_t), ...]`` (a fast tokenizer's
  ``offset_mapping`` of the text it scored, ``add_special_tokens=False``) and step spans
  ``step_spans[i] = [(start_s, end_s), ...]`` (increasing, e.g. ``StepSolution.step_spans``).
  Step s owns the characters ``[end_{s−1}, end_s)`` (``end_{−1} = 0``: the text between two
  steps, a separating space, belongs to the step after it); token t belongs to the step owning its
  last character ``b_t − 1``. Tokens with an empty span (EOS, other specials) or past the last
  step's end get −1, and so does the padding up to ``num_cols`` (default: the longest row).

  Exact by construction: the token ids scored are the ones whose offsets are given, and a token
  that crosses a step end (``a_t < end_s < b_t``, part of two steps) raises ValueError instead of
  being assigned to one of them.
  """
  if len(offsets) != len(step_spans):
    raise ValueError(f"step_ids_from_offsets: {len(offsets)} offset rows but {len(step_spans)} "
                     f"step-span rows")
  t = max((len(o) for o in offsets), default=0) if num_cols is None else int(num_cols)
  out = np.full((len(offsets), t), -1, np.int32)
  for i, (off, spans) in enumerate(zip(offsets, step_spans)):
    if len(off) > t:
      raise ValueError(f"step_ids_from_offsets: row {i} has {len(off)} tokens > num_cols={t}")
    ends = np.asarray([e for _, e in spans], np.int64)                              # [S]
    if ends.size == 0 or np.any(np.diff(ends) <= 0):
      raise ValueError(f"step_ids_from_offsets: row {i} needs increasing step spans, got {spans}")
    for j, (a, b) in enumerate(off):
      a, b = int(a), int(b)
      if b <= a:
        continue  # a special token (EOS): no text, no step
      cross = ends[(ends > a) & (ends < b)]
      if cross.size:
        raise ValueError(f"step_ids_from_offsets: row {i} token {j} spans characters [{a}, {b}), "
                         f"across the end {int(cross[0])} of a step; its reward cannot be given "
                         f"to one step")
      s = int(np.searchsorted(ends, b - 1, side="right"))  # first step with end > b - 1
      if s < len(ends):
        out[i, j] = s
  return out


def step_scores(token_rewards: ArrayLike, step_ids: ArrayLike, num_steps: int, *,
                reduce: str = "sum") -> Array:
  """Per-step PRM scores ``[B, T] -> [B, S]``: ``Σ_{t∈s} r[i,t]`` (``"sum"``) or ``min_{t∈s} r[i,t]``.

  ``r`` are the token rewards ``β q_t`` (``eval.prm.implicit_prm_rewards(token_rewards=True)``);
  a step's sum is the change of the implicit Q-value over the step (PRIME Eq. 3 summed over the
  step, the "implicit step reward" of Yuan et al., arXiv 2412.01981). ``step_ids [B, T]`` int with
  −1 (or ≥ S) on tokens of no step. Steps without tokens (rows with fewer steps) are NaN.
  """
  if reduce not in STEP_REDUCTIONS:
    raise ValueError(f"step_scores: reduce must be one of {STEP_REDUCTIONS}, got {reduce!r}")
  ops.check_token_arrays(token_rewards=token_rewards, step_ids=step_ids)
  seg = ops.segment_sum if reduce == "sum" else ops.segment_min
  out = seg(jnp.asarray(token_rewards, jnp.float32), step_ids, num_steps)         # [B, S]
  has = ops.step_mask_from_ids(step_ids, num_steps) > 0                           # [B, S]
  return jnp.where(has, out, jnp.nan)


def predict_first_error(scores: ArrayLike, threshold: float) -> Array:
  """First step whose score is below ``threshold``, −1 if none. ``[B, S] -> int32 [B]``.

  NaN scores (absent steps) never count as below.
  """
  chex.assert_rank(scores, 2, custom_message="`scores` must be [B, S]")
  s = jnp.asarray(scores, jnp.float32)
  below = s < threshold                                                            # [B, S] NaN: False
  return jnp.where(jnp.any(below, axis=1), jnp.argmax(below, axis=1), -1).astype(jnp.int32)


def _masked_mean(x, m):
  m = m.astype(jnp.float32)
  n = jnp.sum(m)
  return jnp.where(n > 0, jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(n, 1.0), jnp.nan)


def _harmonic(a, b):
  return jnp.where(a + b > 0, 2.0 * a * b / jnp.where(a + b > 0, a + b, 1.0), 0.0)


def first_error_metrics(scores: ArrayLike, first_error: ArrayLike, *, threshold: float) -> dict:
  """Does a low step score mark the first wrong step? ``scores [B, S]``, ``first_error [B]`` -> dict.

  ``first_error[i]`` is the index of the first wrong step of solution i (−1: no error); NaN
  scores mark steps a row does not have. With ``p_i = predict_first_error(scores, threshold)``:

  * ``error_acc = mean_{i: k_i ≥ 0} [p_i = k_i]`` (exactly the first wrong step found),
  * ``correct_acc = mean_{i: k_i = −1} [p_i = −1]`` (no step of a right solution flagged),
  * ``f1 = 2·error_acc·correct_acc / (error_acc + correct_acc)`` (ProcessBench's F1, Zheng et al.
    arXiv 2412.06559 Sec. 3: the harmonic mean of the accuracies on erroneous and correct samples),
  * ``argmin_acc = mean_{i: k_i ≥ 0} [argmin_s scores[i, s] = k_i]`` (threshold-free),
  * ``step_auroc``: AUROC of step scores with the steps before the first error (every step of a
    right solution) positive and the first wrong step negative; later steps left out. 0.5 is
    chance, 1.0 means every first wrong step scores below every good step.
  * ``num_error``, ``num_correct``, ``num_good_steps``, ``num_bad_steps``.

  Accuracies are NaN without rows of their kind. Jit-safe.
  """
  chex.assert_rank(scores, 2, custom_message="`scores` must be [B, S]")
  ops.check_row_arrays(jnp.shape(scores)[0], first_error=first_error)
  s = jnp.asarray(scores, jnp.float32)                                             # [B, S]
  k = jnp.asarray(first_error, jnp.int32)                                          # [B]
  valid = ~jnp.isnan(s)                                                            # [B, S]
  err = k >= 0
  pred = predict_first_error(s, threshold)                                         # [B]
  error_acc = _masked_mean((pred == k).astype(jnp.float32), err)
  correct_acc = _masked_mean((pred == -1).astype(jnp.float32), ~err)
  amin = jnp.argmin(jnp.where(valid, s, jnp.inf), axis=1)                          # [B]
  argmin_acc = _masked_mean((amin == k).astype(jnp.float32), err)
  pos = jnp.arange(s.shape[1])[None, :]                                            # [1, S]
  good = valid & ((k[:, None] < 0) | (pos < k[:, None]))                           # [B, S]
  bad = valid & (pos == k[:, None])                                                # [B, S]
  step_auroc = auroc(s.reshape(-1), good.reshape(-1), where=(good | bad).reshape(-1))
  f1 = jnp.where(jnp.isnan(error_acc) | jnp.isnan(correct_acc), jnp.nan,
                 _harmonic(error_acc, correct_acc))
  return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": f1, "argmin_acc": argmin_acc,
          "step_auroc": step_auroc, "num_error": jnp.sum(err), "num_correct": jnp.sum(~err),
          "num_good_steps": jnp.sum(good), "num_bad_steps": jnp.sum(bad)}


def choose_threshold(scores: ArrayLike, first_error: ArrayLike) -> float:
  """The threshold with the best ``first_error_metrics(...)["f1"]`` on these (calibration) rows.

  Row i is predicted right exactly when the threshold τ lies in an interval of its prefix minima
  ``m_s = min_{j≤s} scores[i, j]``: ``m_k < τ ≤ m_{k−1}`` for a first error k (``m_{−1} = +∞``),
  ``τ ≤ m_{S−1}`` for a right solution. F1 is therefore constant between consecutive distinct
  step scores; every such gap is tried (its midpoint, in float32), plus one value below all scores
  and one above; the lowest τ among equal best F1 wins. Host-side (numpy); ties and NaN as in
  :func:`first_error_metrics`.
  """
  s = np.asarray(scores, np.float32)                                               # [B, S]
  k = np.asarray(first_error, np.int64)                                            # [B]
  if s.ndim != 2 or k.shape != (s.shape[0],):
    raise ValueError(f"choose_threshold: scores must be [B, S] and first_error [B], got "
                     f"{s.shape} and {k.shape}")
  u = np.unique(s[~np.isnan(s)])                                                   # sorted
  if u.size == 0:
    raise ValueError("choose_threshold: no finite step score")
  mids = (u[:-1] + (u[1:] - u[:-1]) / np.float32(2)).astype(np.float32)
  mids = np.where(mids > u[:-1], mids, u[1:])                                      # stays in (u_i, u_{i+1}]
  cand = np.concatenate([[u[0] - max(1.0, abs(u[0]))], mids,
                         [u[-1] + max(1.0, abs(u[-1]))]]).astype(np.float32)      # [C]
  m = np.fmin.accumulate(np.where(np.isnan(s), np.inf, s), axis=1)                 # [B, S] prefix min
  m = np.concatenate([np.full((s.shape[0], 1), np.inf, np.float32), m], axis=1)   # [B, S+1]; col 0 = m_{-1}
  err = k >= 0
  rows = np.arange(s.shape[0])
  hi = np.where(err, m[rows, np.maximum(k, 0)], m[:, -1])                          # m_{k-1} | m_{S-1}
  lo = np.where(err, m[rows, np.maximum(k, 0) + 1], -np.inf)                       # m_k | -inf
  hit = (lo[None, :] < cand[:, None]) & (cand[:, None] <= hi[None, :])             # [C, B]
  ea = hit[:, err].mean(1) if err.any() else np.full(cand.shape, np.nan)
  ca = hit[:, ~err].mean(1) if (~err).any() else np.full(cand.shape, np.nan)
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.where(ea + ca > 0, 2 * ea * ca / (ea + ca), 0.0)
  f1 = np.where(np.isnan(f1), -1.0, f1)
  return float(cand[int(np.argmax(f1))])


def chance_metrics(num_steps: ArrayLike, first_error: ArrayLike) -> dict:
  """Expected metrics of a uniform random guess (host): each solution's prediction uniform over
  "no error" and its ``S_i`` steps, the argmin uniform over its steps, AUROC 0.5.

  ``error_acc = mean_{k_i ≥ 0} 1/(S_i+1)``, ``correct_acc = mean_{k_i = −1} 1/(S_i+1)``, ``f1`` their
  harmonic mean, ``argmin_acc = mean_{k_i ≥ 0} 1/S_i``, ``step_auroc = 0.5``.
  """
  n = np.asarray(num_steps, np.float64)
  k = np.asarray(first_error)
  err = k >= 0
  ea = float(np.mean(1.0 / (n[err] + 1))) if err.any() else float("nan")
  ca = float(np.mean(1.0 / (n[~err] + 1))) if (~err).any() else float("nan")
  return {"error_acc": ea, "correct_acc": ca, "f1": 2 * ea * ca / (ea + ca),
          "argmin_acc": float(np.mean(1.0 / n[err])) if err.any() else float("nan"),
          "step_auroc": 0.5}


# ----------------------------------------------------------------------------- reward-hacking alarm


def trend_t_statistic(values) -> float:
  """t statistic of the least-squares slope of ``values`` against ``0, 1, …, W−1``.

  ``b = Σ (x−x̄)(y−ȳ) / Σ (x−x̄)²``, ``SE = sqrt(Σ e² / (W−2) / Σ (x−x̄)²)`` with ``e`` the
  residuals, ``t = b / SE``. A perfect line (``Σ e² = 0``) gives ±inf (0 if flat); NaN values
  or ``W < 3`` give NaN.
  """
  y = np.asarray(values, np.float64)
  w = y.shape[0]
  if w < 3 or not np.all(np.isfinite(y)):
    return float("nan")
  x = np.arange(w, dtype=np.float64)
  dx = x - x.mean()
  sxx = float(np.sum(dx * dx))
  b = float(np.sum(dx * (y - y.mean()))) / sxx
  resid = y - (y.mean() + b * dx)
  sse = float(np.sum(resid * resid))
  scale = max(1.0, float(np.max(np.abs(y))))
  if sse <= (1e-12 * scale) ** 2 * w:  # exact line up to rounding
    return 0.0 if abs(b) <= 1e-12 * scale else math.copysign(math.inf, b)
  return b / math.sqrt(sse / (w - 2) / sxx)


class RewardHackingMonitor:
  """Alarm when the process reward trends up while the outcome accuracy trends down.

  Rule (evaluated by :meth:`update` every step; also in ``docs/prm_health.md``):

  * Keep the last ``window`` (W) values of the process reward ``p_k`` and of the outcome accuracy
    ``a_k`` (both finite; a step with a non-finite value is skipped and does not enter the window).
  * Once W values are held, fit a least-squares line to each against the position ``0…W−1`` and
    take the slope's t statistic (:func:`trend_t_statistic`): ``t_p`` and ``t_a``.
  * **Alarm** ⇔ ``t_p ≥ t_threshold`` and ``t_a ≤ −t_threshold``, i.e. over the same window the
    process reward rises and the outcome accuracy falls, each with a slope at least
    ``t_threshold`` standard errors away from 0 (default 2.0 ≈ a one-sided 5% test when W ≥ 10).
    Before W values are held the alarm is 0 and the t values are NaN.
  * A ``logging`` warning is emitted when the alarm switches on (0 → 1), not on every step it
    stays on; :attr:`num_alarms` counts those switches.

  What to feed it: ``process_reward`` = the mean sequence-level implicit reward
  ``mean_i β Σ_t q[i,t]`` of the batch (``prm_health/implicit_reward_mean``; not the batch-normed
  scores, whose scale is reset every step), ``outcome_acc`` = the verifier accuracy of the sampled
  batch before any accuracy filter (``outcome/acc_sampled``) or of the latest evaluation.

  Args:
    window: W ≥ 3 steps.
    t_threshold: > 0.
    prefix: key prefix of the returned metrics.
  """

  def __init__(self, window: int = 20, t_threshold: float = 2.0, prefix: str = "prm_health/"):
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 3:
      raise ValueError(f"RewardHackingMonitor: window must be an int >= 3, got {window!r}")
    if not (isinstance(t_threshold, (int, float)) and math.isfinite(t_threshold)
            and t_threshold > 0):
      raise ValueError(f"RewardHackingMonitor: t_threshold must be a finite number > 0, "
                       f"got {t_threshold!r}")
    self.window = int(window)
    self.t_threshold = float(t_threshold)
    self.prefix = prefix
    self._p: collections.deque = collections.deque(maxlen=self.window)
    self._a: collections.deque = collections.deque(maxlen=self.window)
    self._steps: collections.deque = collections.deque(maxlen=self.window)
    self.alarm = False
    self.num_alarms = 0

  def update(self, step: int, process_reward: float, outcome_acc: float, *, quiet: bool = False) -> dict:
    """Adds one step's values; returns ``{prefix+"hacking_alarm": 0|1, prefix+"process_trend_t",
    prefix+"outcome_trend_t"}`` (python floats/ints, NaN t values until W values are held).
    ``quiet``: no warning (replaying a resumed run's history)."""
    p, a = float(process_reward), float(outcome_acc)
    if math.isfinite(p) and math.isfinite(a):
      self._p.append(p)
      self._a.append(a)
      self._steps.append(int(step))
    t_p = t_a = float("nan")
    alarm = False
    if len(self._p) == self.window:
      t_p = trend_t_statistic(self._p)
      t_a = trend_t_statistic(self._a)
      alarm = t_p >= self.t_threshold and t_a <= -self.t_threshold
    if alarm and not self.alarm:
      self.num_alarms += 1
    if alarm and not self.alarm and not quiet:
      logger.warning(
          "reward-hacking alarm at step %d: over steps %d..%d the process reward rose "
          "(%.4g -> %.4g, slope t=%.2f) while outcome accuracy fell (%.4g -> %.4g, slope t=%.2f); "
          "threshold |t| >= %.2f", int(step), self._steps[0], self._steps[-1], self._p[0],
          self._p[-1], t_p, self._a[0], self._a[-1], t_a, self.t_threshold)
    self.alarm = alarm
    return {self.prefix + "hacking_alarm": int(alarm), self.prefix + "process_trend_t": t_p,
            self.prefix + "outcome_trend_t": t_a}

  def state_dict(self) -> dict:
    """JSON-serialisable state (for checkpoints): the window contents and alarm counters."""
    return {"window": self.window, "t_threshold": self.t_threshold, "steps": list(self._steps),
            "process_reward": list(self._p), "outcome_acc": list(self._a),
            "alarm": bool(self.alarm), "num_alarms": int(self.num_alarms)}

  def load_state_dict(self, state: Mapping) -> None:
    """Restores :meth:`state_dict` (window and threshold must match this monitor's)."""
    if int(state["window"]) != self.window or float(state["t_threshold"]) != self.t_threshold:
      raise ValueError(f"RewardHackingMonitor.load_state_dict: saved window/t_threshold "
                       f"({state['window']}, {state['t_threshold']}) differ from this monitor's "
                       f"({self.window}, {self.t_threshold})")
    if not (len(state["steps"]) == len(state["process_reward"]) == len(state["outcome_acc"])):
      raise ValueError("RewardHackingMonitor.load_state_dict: steps/process_reward/outcome_acc "
                       "lengths differ")
    self._steps = collections.deque((int(s) for s in state["steps"]), maxlen=self.window)
    self._p = collections.deque((float(v) for v in state["process_reward"]), maxlen=self.window)
    self._a = collections.deque((float(v) for v in state["outcome_acc"]), maxlen=self.window)
    self.alarm = bool(state["alarm"])
    self.num_alarms = int(state["num_alarms"])


POSITION_BINS = 4


def position_bin_means(r, mask, row_weight, bins: int = POSITION_BINS):
  """Mean of the token values r [B, T] by relative position: token t of a response of L tokens
  falls in bin floor(bins · t / L) (quantiles of each response); rows weighted by row_weight [B].
  Returns [bins] (0 for an empty bin)."""
  m = mask.astype(jnp.float32) * row_weight[:, None]  # [B, T]
  length = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)  # [B, 1]
  t = jnp.arange(mask.shape[1], dtype=jnp.float32)[None, :]  # [1, T]
  idx = jnp.clip(jnp.floor(bins * t / length), 0, bins - 1).astype(jnp.int32)  # [B, T]
  one_hot = jax.nn.one_hot(idx, bins, dtype=jnp.float32) * m[..., None]  # [B, T, bins]
  num = jnp.sum(one_hot * r[..., None], axis=(0, 1))
  den = jnp.sum(one_hot, axis=(0, 1))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)  # [bins]
