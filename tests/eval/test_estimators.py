"""Sampling estimators of jaxrl_dense.eval.estimators: unbiased pass@k (Chen et al. 2021) against
brute-force enumeration of k-subsets, mean@k, majority vote (ties), best-of-N, PRM-weighted vote."""
import itertools
import math

import numpy as np
import pytest

from jaxrl_dense.eval import estimators as ev
from jaxrl_dense.eval import prm as eval_prm


def brute_pass_at_k(n: int, c: int, k: int) -> float:
  """Fraction of the k-subsets of n samples (c correct) that hold at least one correct sample."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8])
def test_pass_at_k_matches_subset_enumeration(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      got = ev.pass_at_k(n, c, k)
      assert isinstance(got, float)
      assert got == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_forms():
  assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
  assert ev.pass_at_k(10, 0, 5) == 0.0
  assert ev.pass_at_k(10, 10, 10) == 1.0
  assert ev.pass_at_k(10, 1, 10) == 1.0  # n - c = 9 < k = 10
  assert ev.pass_at_k(10, 6, 5) == 1.0  # n - c = 4 < k: every 5-subset has a correct one
  # 1 - C(n-c, k) / C(n, k) with exact integers, for a size where the binomials are huge.
  n, c, k = 200, 17, 40
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert ev.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_arrays_broadcast():
  n = np.array([4, 4, 4, 6])
  c = np.array([0, 1, 4, 2])
  got = ev.pass_at_k(n, c, 2)
  assert isinstance(got, np.ndarray) and got.shape == (4,) and got.dtype == np.float64
  want = [brute_pass_at_k(int(a), int(b), 2) for a, b in zip(n, c)]
  np.testing.assert_allclose(got, want, atol=1e-12)
  # k as an array too, and a 2-D grid via broadcasting.
  ks = np.array([[1], [2], [3]])
  grid = ev.pass_at_k(5, np.arange(6)[None, :], ks)
  assert grid.shape == (3, 6)
  for a in range(3):
    for cc in range(6):
      assert grid[a, cc] == pytest.approx(brute_pass_at_k(5, cc, a + 1), abs=1e-12)
  # numpy integer scalars and lists work; a 0-d array input still returns a float.
  assert isinstance(ev.pass_at_k(np.int64(5), np.int32(2), 2), float)
  np.testing.assert_allclose(ev.pass_at_k([3, 3], [1, 2], [1, 1]), [1 / 3, 2 / 3])


def test_pass_at_k_monotone_in_k_and_c():
  n = 16
  for c in range(n + 1):
    vals = [ev.pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:]))
  for k in (1, 4, 16):
    vals = [ev.pass_at_k(n, c, k) for c in range(n + 1)]
    assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("args, what", [
    ((4, 2, 5), "k must be in"),
    ((4, 2, 0), "k must be in"),
    ((4, 5, 2), "num_correct must be in"),
    ((4, -1, 2), "num_correct must be in"),
    ((0, 0, 1), "num_samples must be >= 1"),
    ((4, 1.5, 1), "must be integers"),
    (([4, 4], [1, 1], [1, 5]), "k must be in"),
])
def test_pass_at_k_rejects_bad_inputs(args, what):
  with pytest.raises(ValueError, match=what):
    ev.pass_at_k(*args)


def test_pass_at_k_unbiased_by_simulation():
  # E over draws of n samples from a Bernoulli(p) model of the estimate equals 1 - (1-p)^k.
  rng = np.random.default_rng(0)
  p, n, k = 0.2, 8, 3
  c = rng.binomial(n, p, size=20000)
  est = ev.pass_at_k(n, c, k).mean()
  assert est == pytest.approx(1 - (1 - p) ** k, abs=0.01)


def test_pass_at_k_curve_and_mean_at_k():
  scores = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], float)
  curve = ev.pass_at_k_curve(scores)
  assert sorted(curve) == ["pass@1", "pass@2", "pass@4"]
  assert curve["pass@1"] == pytest.approx(np.mean([0.25, 0.5, 0.0]))
  assert curve["pass@4"] == pytest.approx(2 / 3)  # = mean_i max_j s[i, j] at k = n
  assert curve["pass@2"] == pytest.approx(np.mean([brute_pass_at_k(4, 1, 2),
                                                   brute_pass_at_k(4, 2, 2), 0.0]))
  assert ev.mean_at_k(scores) == pytest.approx(3 / 12)
  assert ev.pass_at_k_curve(np.ones((2, 3)))["pass@3"] == 1.0
  assert sorted(ev.pass_at_k_curve(np.ones((2, 6)))) == ["pass@1", "pass@2", "pass@4", "pass@6"]
  with pytest.raises(ValueError, match=r"\[N problems, k samples\]"):
    ev.mean_at_k(np.ones(4))


def test_majority_vote_plain_and_ties():
  answers = [["3", "3", "4", None],      # majority 3 (correct)
             ["5", "6", "6", "6"],       # majority 6 (wrong)
             ["1", "2", None, None],     # tie 1 (correct) / 2 (wrong)
             [None, None, None, None]]   # nothing extracted
  scores = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], float)
  np.testing.assert_allclose(ev.majority_vote(answers, scores), [1, 0, 0.5, 0])
  np.testing.assert_allclose(ev.majority_vote(answers, scores, ties="first"), [1, 0, 1, 0])
  tie_wrong_first = [["2", "1"]]
  np.testing.assert_allclose(ev.majority_vote(tie_wrong_first, [[0, 1]], ties="first"), [0])
  np.testing.assert_allclose(ev.majority_vote(tie_wrong_first, [[0, 1]]), [0.5])
  # Three-way tie: expected correctness is 1/3.
  np.testing.assert_allclose(ev.majority_vote([["a", "b", "c"]], [[0, 1, 0]]), [1 / 3])


def test_weighted_vote_overrides_count():
  answers = [["7", "8", "8"]]
  scores = np.array([[1, 0, 0]], float)
  assert ev.majority_vote(answers, scores)[0] == 0.0
  w = np.array([[0.9, 0.3, 0.3]])  # 0.9 > 0.6
  assert ev.majority_vote(answers, scores, w)[0] == 1.0
  w_rewards = ev.prm_vote_weights(np.array([[3.0, -2.0, -2.0]]))
  np.testing.assert_allclose(w_rewards, 1 / (1 + np.exp(-np.array([[3.0, -2.0, -2.0]]))))
  assert ev.majority_vote(answers, scores, w_rewards)[0] == 1.0
  with pytest.raises(ValueError, match="weights must be >= 0"):
    ev.majority_vote(answers, scores, -w)
  with pytest.raises(ValueError, match="answers must be 1 lists of 3"):
    ev.majority_vote([["7", "8"]], scores)
  with pytest.raises(ValueError, match="ties must be one of"):
    ev.majority_vote(answers, scores, ties="random")


def test_best_of_n_and_ties():
  scores = np.array([[0, 1, 0], [1, 0, 0], [0, 1, 1]], float)
  rewards = np.array([[0.1, 0.7, -1.0], [0.2, 0.5, 0.3], [2.0, 2.0, 2.0]])
  np.testing.assert_allclose(ev.best_of_n(scores, rewards), [1, 0, 2 / 3])
  np.testing.assert_allclose(ev.best_of_n(scores, rewards, ties="first"), [1, 0, 0])
  # With rewards equal to the scores best-of-N is the oracle pass@n.
  np.testing.assert_allclose(ev.best_of_n(scores, scores), scores.max(axis=1))
  with pytest.raises(ValueError, match="rewards shape"):
    ev.best_of_n(scores, rewards[:, :2])


def test_implicit_prm_sequence_reward_and_summary():
  lp_prm = np.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
  lp_ref = np.array([[-1.5, -1.0, -9.0], [-2.0, -2.0, -2.0]])
  mask = np.array([[1, 1, 0], [1, 1, 1]], float)
  r = eval_prm.implicit_prm_sequence_reward(lp_prm, lp_ref, mask, beta=0.1)
  np.testing.assert_allclose(r, [0.1 * (0.5 - 1.0), 0.1 * 3.0])
  with pytest.raises(ValueError, match="must be equal"):
    eval_prm.implicit_prm_sequence_reward(lp_prm, lp_ref[:, :2], mask)

  scores = np.array([[1, 0], [0, 0]], float)
  answers = [["4", "5"], ["1", None]]
  rewards = np.array([[1.0, -1.0], [0.0, 0.0]])
  s = ev.sampled_summary(scores, answers, rewards)
  assert s == pytest.approx({"pass@1": 0.25, "pass@2": 0.5, "mean@2": 0.25, "maj@2": 0.25,
                             "prm_best_of_n@2": 0.5, "prm_vote@2": 0.5})
  assert set(ev.sampled_summary(scores)) == {"pass@1", "pass@2", "mean@2"}


def test_extract_answers_normalises():
  got = ev.extract_answers(["so 2 + 3 = 5. The answer is 5.", "The answer is $1,000$.", "none"])
  assert got[0] == "5" and got[1] == "1000" and got[2] is None
