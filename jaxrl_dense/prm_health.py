"""PRM health: is the implicit process reward still tracking the outcome? (issue #16 item 3).

A learned process reward model (PRM) can drift away from the verifier it is trained on, and the
policy can learn to please the PRM instead of solving the task (reward hacking; the motivation of
PRIME's online PRM update, Cui et al., arXiv 2502.01456 §3.2). These metrics say, every step,
how well the PRM's rewards agree with the verifier labels of the same batch, and
:class:`RewardHackingMonitor` raises an alarm when the two trend apart.

Conventions as in ``jaxrl_dense.ops``: ``[B, T]`` arrays with a ``mask`` (1 on response tokens
including EOS), groups of ``n`` contiguous rows per prompt, ``step_ids [B, T]`` int with −1 on
padding. Labels ``acc [B]`` are the verifier's outcome rewards; a response is *positive* when
``acc > 0.5`` (binary labels are 0/1; fractional labels, e.g. a share of passed tests, are
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
from typing import Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import ops
from jaxrl_dense.rewards import prm_pairwise_accuracy

Array = jax.Array
ArrayLike = chex.Array

logger = logging.getLogger(__name__)

__all__ = ["sequence_implicit_reward", "auroc", "pearson", "last_step_share", "prm_health_metrics",
           "RewardHackingMonitor", "trend_t_statistic"]


def sequence_implicit_reward(q: ArrayLike, mask: ArrayLike, *, beta: float = 0.05) -> Array:
  """Sequence-level implicit reward ``r_i = β Σ_t m[i,t] q[i,t]`` (PRIME Eq. 3 summed). ``[B, T] -> [B]``.

  ``q = log π_φ − log π_ref`` per token (``rewards.token_log_ratio``); ``σ(r_i)`` is the PRM's
  probability that response i is correct (the logit of ``rewards.prm_ce_loss``).
  """
  ops.check_token_arrays(q=q, mask=mask)
  return beta * ops.masked_sum(jnp.asarray(q, jnp.float32), mask, axis=1)          # [B]


def auroc(scores: ArrayLike, labels: ArrayLike) -> Array:
  """Exact area under the ROC curve of ``scores`` for the positives ``labels > 0.5``. ``[B], [B] -> ()``.

  ``AUROC = Σ_{i∈P, j∈N} ([s_i > s_j] + ½[s_i = s_j]) / (|P|·|N|)`` (the Mann–Whitney U statistic
  over |P|·|N|; ties count one half, so a constant score gives 0.5). O(B²) pairwise comparison,
  jit-safe; NaN when the batch holds only one class. Non-finite scores are compared as they are
  (NaN compares false both ways, i.e. counts 0).
  """
  chex.assert_rank([scores, labels], 1, custom_message="`scores` and `labels` must be [B]")
  chex.assert_equal_shape([scores, labels], custom_message="`scores` and `labels` must share [B]")
  s = jnp.asarray(scores, jnp.float32)                                             # [B]
  pos = jnp.asarray(labels, jnp.float32) > 0.5                                     # [B]
  pair = pos[:, None] & ~pos[None, :]                                              # [B, B] i∈P, j∈N
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


def prm_health_metrics(token_scores: ArrayLike, q: ArrayLike, mask: ArrayLike, acc: ArrayLike, *,
                       n: int, beta: float = 0.05, step_ids: Optional[ArrayLike] = None,
                       prefix: str = "prm_health/") -> dict:
  """Per-step PRM health metrics of one batch (see the module docstring for each key).

  Args:
    token_scores: ``[B, T]`` process rewards ``s`` fed to the advantage (e.g.
      ``implicit_token_rewards(...).scores``, before or after ``prime_norm``; the correlation is
      scale-free).
    q: ``[B, T]`` per-token log-ratio ``log π_φ − log π_ref`` of the PRM (``ImplicitRewards.q``).
    mask: ``[B, T]`` response mask. acc: ``[B]`` verifier outcome rewards.
    n: samples per prompt (static; groups are contiguous rows) for the pairwise accuracy.
    beta: β of the implicit reward.
    step_ids: optional ``[B, T]`` step index per token (e.g. ``viz.step_ids_from_texts`` or
      ``ops.step_ids_from_delimiter``); without it ``last_step_share`` is omitted.
  Returns:
    dict of JAX scalars keyed ``prefix + name``.
  """
  ops.check_token_arrays(token_scores=token_scores, q=q, mask=mask)
  ops.check_row_arrays(jnp.shape(mask)[0], acc=acc)
  r = sequence_implicit_reward(q, mask, beta=beta)                                 # [B]
  g = ops.masked_sum(jnp.asarray(token_scores, jnp.float32), mask, axis=1)         # [B]
  a = jnp.asarray(acc, jnp.float32)
  out = {
      "auroc": auroc(r, a),
      "return_outcome_corr": pearson(g, a),
      "pairwise_acc": prm_pairwise_accuracy(q, mask, a, n=n),
      "implicit_reward_mean": jnp.mean(r),
  }
  if step_ids is not None:
    out["last_step_share"] = last_step_share(token_scores, mask, step_ids)
  return {prefix + k: v for k, v in out.items()}


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
