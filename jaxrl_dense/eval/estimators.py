"""Estimators over k sampled responses per problem (scores s [N, k] of `eval.loop.evaluate`, 1 if
sample j of problem i is correct): unbiased pass@k (Chen et al. 2021, arXiv 2107.03374), mean@k,
majority vote, best-of-N reranking and a PRM-weighted vote with an implicit PRM's sequence
reward. Host-side numpy.

`pass_at_k(n, c, k)`   unbiased pass@k, 1 - C(n-c, k) / C(n, k) (scalars or arrays);
                       `pass_at_k_curve(scores, ks)` averages it over problems.
`mean_at_k(scores)`    mean@k (expected accuracy of one sample).
`majority_vote(answers, scores, weights=None, ties="expected")` maj@k per problem (weighted by
                       `weights` for a PRM-weighted vote); `extract_answers(texts)` the keys.
`best_of_n(scores, rewards)` correctness of the top-reward response (reranking).
`prm_vote_weights(r)` = sigmoid(r). `sampled_summary(...)` collects all of them in one dict.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
  if n - c < k:
    return 1.0
  # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)   (Chen et al. 2021, Fig. 3)
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(num_samples: Any, num_correct: Any, k: Any) -> Any:
  """Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code", arXiv 2107.03374, Eq. 1 and Fig. 3).

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

  the probability that at least one of k responses drawn without replacement from the n sampled
  ones (c of them correct) is correct; E[pass@k-estimate] is the true pass@k of the model. The
  product form never forms the (huge) binomial coefficients. It is 1 when n - c < k (every
  k-subset holds a correct response).

  Args:
    num_samples: n, responses sampled per problem (int or int array, >= 1).
    num_correct: c, correct ones among them (0 <= c <= n), broadcastable with n.
    k: 1 <= k <= n (int or int array, broadcastable).
  Returns:
    a python float when every argument is a scalar, else a float64 array of the broadcast shape.
  Raises:
    ValueError naming the offending values (non-integer, c outside [0, n], k outside [1, n]).
  """
  n_a, c_a, k_a = (np.asarray(x) for x in (num_samples, num_correct, k))
  for name, a in (("num_samples", n_a), ("num_correct", c_a), ("k", k_a)):
    if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0)):
      raise ValueError(f"pass_at_k: {name} must be integers, got {a!r}")
  n_b, c_b, k_b = np.broadcast_arrays(n_a.astype(np.int64), c_a.astype(np.int64),
                                      k_a.astype(np.int64))
  if (n_b < 1).any():
    raise ValueError(f"pass_at_k: num_samples must be >= 1, got {n_a.tolist()}")
  if ((c_b < 0) | (c_b > n_b)).any():
    raise ValueError(f"pass_at_k: num_correct must be in [0, num_samples], got num_correct="
                     f"{c_a.tolist()}, num_samples={n_a.tolist()}")
  if ((k_b < 1) | (k_b > n_b)).any():
    raise ValueError(f"pass_at_k: k must be in [1, num_samples] (pass@k needs k <= n samples), "
                     f"got k={k_a.tolist()}, num_samples={n_a.tolist()}")
  out = np.array([_pass_at_k_scalar(int(n), int(c), int(kk))
                  for n, c, kk in zip(n_b.ravel(), c_b.ravel(), k_b.ravel())],
                 dtype=np.float64).reshape(n_b.shape)
  if n_a.ndim == 0 and c_a.ndim == 0 and k_a.ndim == 0:
    return float(out)
  return out


def _scores_2d(scores: Any, name: str = "scores") -> np.ndarray:
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
    raise ValueError(f"{name} must be a non-empty [N problems, k samples] array, got shape "
                     f"{s.shape}")
  if not np.isfinite(s).all():
    raise ValueError(f"{name} must be finite")
  return s


def mean_at_k(scores: Any) -> float:
  """mean@k = (1/N) sum_i (1/k) sum_j s[i, j] for scores [N, k] (PRIME's AIME "avg@16").

  The expected accuracy of one sampled response, i.e. the unbiased pass@1 from k samples.
  """
  return float(_scores_2d(scores).mean())


def _pick(values: np.ndarray, correct: np.ndarray, ties: str) -> float:
  """Correctness of the argmax of `values` (ties: "expected" = mean over the tied, "first")."""
  best = np.max(values)
  tied = np.flatnonzero(values >= best - 1e-12 * max(1.0, abs(best)))
  if ties == "first":
    return float(correct[tied[0]])
  return float(np.mean(correct[tied]))


_TIES = ("expected", "first")


def majority_vote(answers: Sequence[Sequence[Optional[str]]], scores: Any,
                  weights: Any = None, *, ties: str = "expected") -> np.ndarray:
  """Per-problem correctness of the (weighted) majority answer ("maj@k", self-consistency).

  For problem i the vote of answer a is W_i(a) = sum_{j: answers[i][j] == a} w[i, j] (w = 1 for
  plain majority vote); samples whose answer is None (no answer extracted) do not vote. The
  voted answer is argmax_a W_i(a); its correctness is the score of a sample with that answer
  (max over them, so a verifier that scores equal answers equally gives that score). Ties:
  "expected" = the mean correctness over the tied answers (the expectation under a uniformly
  random tie break, deterministic); "first" = the tied answer that occurs first. A problem with
  no extracted answer scores 0.

  Args:
    answers: N lists of k normalised answers (str or None), e.g. `extract_answers(texts)`.
    scores: [N, k] verifier scores in {0, 1}.
    weights: optional [N, k] non-negative vote weights (e.g. `prm_vote_weights(rewards)`).
    ties: "expected" | "first".
  Returns:
    [N] float64 correctness in [0, 1]; its mean is maj@k (or the weighted-vote accuracy).
  """
  s = _scores_2d(scores)
  if ties not in _TIES:
    raise ValueError(f"majority_vote: ties must be one of {_TIES}, got {ties!r}")
  if len(answers) != s.shape[0] or any(len(a) != s.shape[1] for a in answers):
    raise ValueError(f"majority_vote: answers must be {s.shape[0]} lists of {s.shape[1]} "
                     f"answers (the shape of scores), got {[len(a) for a in answers][:8]}...")
  w = np.ones_like(s) if weights is None else _scores_2d(weights, "weights")
  if w.shape != s.shape:
    raise ValueError(f"majority_vote: weights shape {w.shape} != scores shape {s.shape}")
  if (w < 0).any():
    raise ValueError("majority_vote: weights must be >= 0 (use prm_vote_weights for rewards)")
  out = np.zeros(s.shape[0], np.float64)
  for i, row in enumerate(answers):
    total: dict = {}
    correct: dict = {}
    for j, a in enumerate(row):
      if a is None:
        continue
      total[a] = total.get(a, 0.0) + float(w[i, j])
      correct[a] = max(correct.get(a, 0.0), float(s[i, j]))
    if not total:
      continue
    keys = list(total)  # insertion order = first occurrence
    out[i] = _pick(np.array([total[a] for a in keys]), np.array([correct[a] for a in keys]), ties)
  return out


def best_of_n(scores: Any, rewards: Any, *, ties: str = "expected") -> np.ndarray:
  """Per-problem correctness of the highest-reward response (reranking, best-of-N).

  out[i] = s[i, argmax_j r[i, j]]; ties: "expected" = mean score of the tied responses,
  "first" = the first of them. With r the implicit PRM's sequence reward
  (`implicit_prm_sequence_reward`) this is PRM best-of-N (PRIME, arXiv 2502.01456 Sec. 5.2;
  Yuan et al. 2024, arXiv 2412.01981).

  Args:
    scores: [N, k] verifier scores. rewards: [N, k] finite rewards.
  Returns:
    [N] float64; its mean is the best-of-N accuracy.
  """
  s = _scores_2d(scores)
  r = _scores_2d(rewards, "rewards")
  if r.shape != s.shape:
    raise ValueError(f"best_of_n: rewards shape {r.shape} != scores shape {s.shape}")
  if ties not in _TIES:
    raise ValueError(f"best_of_n: ties must be one of {_TIES}, got {ties!r}")
  return np.array([_pick(r[i], s[i], ties) for i in range(s.shape[0])], np.float64)


def prm_vote_weights(rewards: Any) -> np.ndarray:
  """sigmoid(r): the implicit PRM's probability that a response is correct (its CE objective
  models p(correct) = sigma(beta * log pi_phi / pi_ref), PRIME Eq. 4), as vote weights."""
  r = np.asarray(rewards, np.float64)
  return 0.5 * (1.0 + np.tanh(0.5 * r))  # stable sigmoid


def extract_answers(texts: Sequence[str]) -> list:
  """Normalised final answers (`verifiers.math.extract_answer` + `normalize_answer`), None if
  none: the keys majority vote compares."""
  from jaxrl_dense.verifiers import math as vmath
  out = []
  for t in texts:
    a = vmath.extract_answer(t)
    if a is not None:
      try:
        a = vmath.normalize_answer(a)
      except Exception:  # an unparsable answer still votes as its raw text
        pass
    out.append(a)
  return out


def pass_at_k_curve(scores: Any, ks: Optional[Sequence[int]] = None) -> dict:
  """{"pass@k": mean_i pass_at_k(n, c_i, k)} for ks (default 1, 2, 4, ... and n), c_i = number
  of samples with score >= 0.5 in row i of scores [N, n]."""
  s = _scores_2d(scores)
  n = s.shape[1]
  if ks is None:
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
  c = (s >= 0.5).sum(axis=1)
  return {f"pass@{k}": float(np.mean(pass_at_k(n, c, k))) for k in ks}


def sampled_summary(scores: Any, answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
                    rewards: Any = None, ks: Optional[Sequence[int]] = None) -> dict:
  """The estimators of k samples per problem as one dict: unbiased pass@k for ks, mean@n,
  maj@n (with `answers`), and with implicit-PRM `rewards` [N, n]: prm_best_of_n@n (top reward)
  and prm_vote@n (majority vote weighted by sigmoid(reward))."""
  s = _scores_2d(scores)
  n = s.shape[1]
  out = pass_at_k_curve(s, ks)
  out[f"mean@{n}"] = mean_at_k(s)
  if answers is not None:
    out[f"maj@{n}"] = float(majority_vote(answers, s).mean())
  if rewards is not None:
    out[f"prm_best_of_n@{n}"] = float(best_of_n(s, rewards).mean())
    if answers is not None:
      out[f"prm_vote@{n}"] = float(majority_vote(answers, s, prm_vote_weights(rewards)).mean())
  return out
