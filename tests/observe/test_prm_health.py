"""PRM health metrics and the reward-hacking alarm (jaxrl_dense.observe.prm_health) against hand-computed values."""
import functools
import logging
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.observe import prm_health
from jaxrl_dense.rewards import prm_pairwise_accuracy


def _rank_auroc(scores, labels):
  """Independent exact AUROC: (sum of positive mid-ranks − P(P+1)/2) / (P·N)."""
  s = np.asarray(scores, np.float64)
  pos = np.asarray(labels) > 0.5
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s))
  i = 0
  while i < len(s):  # average ranks over ties
    j = i
    while j + 1 < len(s) and s[order[j + 1]] == s[order[i]]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  p, n = pos.sum(), (~pos).sum()
  return (ranks[pos].sum() - p * (p + 1) / 2) / (p * n)


class AurocTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_hand_cases(self):
    f = self.variant(prm_health.auroc)
    # Classic example: 3 of the 4 (pos, neg) pairs ordered correctly.
    np.testing.assert_allclose(f(jnp.array([0.1, 0.4, 0.35, 0.8]), jnp.array([0, 0, 1, 1])), 0.75)
    # Ties count 1/2: pos {1, 2}, neg {1, 0}: (1,1)=.5, (1,0)=1, (2,1)=1, (2,0)=1 -> 3.5 / 4.
    np.testing.assert_allclose(f(jnp.array([1.0, 1.0, 2.0, 0.0]), jnp.array([1, 0, 1, 0])), 0.875)
    np.testing.assert_allclose(f(jnp.full((5,), 3.0), jnp.array([1, 0, 1, 0, 0])), 0.5)
    np.testing.assert_allclose(f(jnp.array([3.0, 2.0, 1.0]), jnp.array([1, 0, 0])), 1.0)
    np.testing.assert_allclose(f(jnp.array([3.0, 2.0, 1.0]), jnp.array([0, 1, 1])), 0.0)
    # Fractional labels are thresholded at 0.5.
    np.testing.assert_allclose(f(jnp.array([0.2, 0.9]), jnp.array([0.4, 0.6])), 1.0)

  @chex.all_variants(with_pmap=False)
  def test_one_class_is_nan(self):
    f = self.variant(prm_health.auroc)
    assert np.isnan(f(jnp.array([0.1, 0.2]), jnp.array([1, 1])))
    assert np.isnan(f(jnp.array([0.1, 0.2]), jnp.array([0, 0])))

  def test_matches_rank_formula_with_ties(self):
    rng = np.random.default_rng(0)
    f = jax.jit(prm_health.auroc)
    for b in (7, 32):  # two shapes, so two compilations
      for _ in range(10):
        s = rng.integers(0, 5, b).astype(np.float32)  # many ties
        y = rng.integers(0, 2, b)
        y[:2] = (0, 1)  # both classes present
        np.testing.assert_allclose(f(s, y), _rank_auroc(s, y), rtol=1e-6)

  def test_shape_errors(self):
    with pytest.raises(AssertionError, match="scores"):
      prm_health.auroc(jnp.zeros((2, 2)), jnp.zeros((2, 2)))
    with pytest.raises(AssertionError, match="share"):
      prm_health.auroc(jnp.zeros(3), jnp.zeros(4))


class MetricsTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_pearson(self):
    f = self.variant(prm_health.pearson)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    # Hand: dx = (-1.5,-.5,.5,1.5), dy = (-3,-1,0,4): Σdxdy = 11, Σdx² = 5, Σdy² = 26.
    np.testing.assert_allclose(f(x, y), 11 / math.sqrt(5 * 26), rtol=1e-6)
    np.testing.assert_allclose(f(x, -2 * x + 1), -1.0, rtol=1e-6)
    assert np.isnan(f(x, np.ones(4)))

  @chex.all_variants(with_pmap=False)
  def test_sequence_implicit_reward_ignores_padding(self):
    q = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, -1.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    r = self.variant(lambda q, m: prm_health.sequence_implicit_reward(q, m, beta=0.5))(q, mask)
    np.testing.assert_allclose(r, [1.5, 2.0])

  @chex.all_variants(with_pmap=False)
  def test_last_step_share(self):
    s = jnp.array([[1.0, -1.0, 2.0, 9.0],    # steps 0,0,1 | pad: |2| / (1+1+2) = 0.5
                   [0.0, 0.0, 0.0, 0.0],     # no credit: excluded
                   [0.5, -0.5, 0.0, 0.0],    # one step: 1.0
                   [3.0, 0.0, 1.0, 0.0]])    # steps 0,1,2,2: (|1| + |0|) / 4 = 0.25
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids = jnp.array([[0, 0, 1, -1], [0, 1, -1, -1], [0, 0, -1, -1], [0, 1, 2, 2]])
    np.testing.assert_allclose(self.variant(prm_health.last_step_share)(s, mask, ids),
                               (0.5 + 1.0 + 0.25) / 3, rtol=1e-6)
    assert np.isnan(self.variant(prm_health.last_step_share)(jnp.zeros((1, 2)), jnp.ones((1, 2)),
                                                             jnp.zeros((1, 2), jnp.int32)))

  @chex.all_variants(with_pmap=False)
  def test_prm_health_metrics(self):
    rng = np.random.default_rng(1)
    b, t, n, beta = 6, 5, 3, 0.1
    q = rng.normal(size=(b, t)).astype(np.float32)
    s = rng.normal(size=(b, t)).astype(np.float32)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.float32)
    acc = np.array([1, 0, 1, 0, 0, 1], np.float32)
    ids = np.where(mask > 0, np.arange(t)[None] // 2, -1).astype(np.int32)
    f = self.variant(lambda *a: prm_health.prm_health_metrics(*a, n=n, beta=beta, step_ids=ids))
    out = f(s, q, mask, acc)
    r = beta * (q * mask).sum(1)
    g = (s * mask).sum(1)
    assert set(out) == {"prm_health/auroc", "prm_health/return_outcome_corr", "prm_health/pairwise_acc",
                        "prm_health/implicit_reward_mean", "prm_health/last_step_share"}
    np.testing.assert_allclose(out["prm_health/auroc"], _rank_auroc(r, acc), rtol=1e-6)
    np.testing.assert_allclose(out["prm_health/return_outcome_corr"], np.corrcoef(g, acc)[0, 1], rtol=1e-5)
    np.testing.assert_allclose(out["prm_health/pairwise_acc"], prm_pairwise_accuracy(q, mask, acc, n=n))
    np.testing.assert_allclose(out["prm_health/implicit_reward_mean"], r.mean(), rtol=1e-5)
    no_steps = prm_health.prm_health_metrics(s, q, mask, acc, n=n, beta=beta)
    assert "prm_health/last_step_share" not in no_steps

  def test_metrics_shape_errors(self):
    with pytest.raises(ValueError, match="share one"):
      prm_health.prm_health_metrics(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)),
                                    jnp.zeros(2), n=2)
    with pytest.raises(ValueError, match="outcome"):
      prm_health.prm_health_metrics(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)),
                                    jnp.zeros(3), n=2)


# ----------------------------------------------------------------------------- alarm


def test_trend_t_statistic_hand_value():
  # y = (0, 1, 3): slope 1.5, residuals (1/6, -1/3, 1/6), SSE = 1/6, SE = sqrt(SSE/1/2) -> t = 3√3.
  np.testing.assert_allclose(prm_health.trend_t_statistic([0.0, 1.0, 3.0]), 3 * math.sqrt(3), rtol=1e-12)
  assert prm_health.trend_t_statistic([1.0, 2.0, 3.0]) == math.inf
  assert prm_health.trend_t_statistic([0.3, 0.2, 0.1, 0.0]) == -math.inf
  assert prm_health.trend_t_statistic([0.5] * 5) == 0.0
  assert math.isnan(prm_health.trend_t_statistic([1.0, 2.0]))
  assert math.isnan(prm_health.trend_t_statistic([1.0, float("nan"), 2.0]))


def _series(steps, seed, p_slope, a_slope, noise=0.02):
  rng = np.random.default_rng(seed)
  k = np.arange(steps)
  return (0.1 + p_slope * k + noise * rng.normal(size=steps),
          0.5 + a_slope * k + noise * rng.normal(size=steps))


def test_alarm_fires_when_process_up_and_outcome_down(caplog):
  mon = prm_health.RewardHackingMonitor(window=10, t_threshold=2.0)
  p, a = _series(30, 0, 0.0, 0.0)
  p[15:] += 0.05 * np.arange(15)  # process reward climbs from step 15 ...
  a[15:] -= 0.02 * np.arange(15)  # ... while accuracy falls
  alarms = []
  with caplog.at_level(logging.WARNING, logger="jaxrl_dense.observe.prm_health"):
    for step in range(30):
      out = mon.update(step, p[step], a[step])
      alarms.append(out["prm_health/hacking_alarm"])
      if step < 9:
        assert math.isnan(out["prm_health/process_trend_t"]) and out["prm_health/hacking_alarm"] == 0
  assert alarms[:15] == [0] * 15  # flat noise: no alarm
  assert alarms[-1] == 1 and mon.alarm
  first = alarms.index(1)
  assert all(alarms[first:])  # stays on while the trends hold
  assert mon.num_alarms == 1
  warnings = [r for r in caplog.records if "reward-hacking alarm" in r.getMessage()]
  assert len(warnings) == 1 and f"at step {first}" in warnings[0].getMessage()


@pytest.mark.parametrize("p_slope,a_slope", [(0.05, 0.02), (-0.05, -0.02), (0.0, 0.0), (-0.05, 0.02)])
def test_no_alarm_otherwise(p_slope, a_slope):
  mon = prm_health.RewardHackingMonitor(window=8)
  p, a = _series(40, 3, p_slope, a_slope)
  outs = [mon.update(s, p[s], a[s]) for s in range(40)]
  assert not any(o["prm_health/hacking_alarm"] for o in outs)
  t_p = outs[-1]["prm_health/process_trend_t"]
  if p_slope > 0:
    assert t_p > 2.0  # the trend is seen; only the outcome side keeps the alarm off


def test_nonfinite_steps_are_skipped_and_state_round_trips():
  p, a = _series(25, 5, 0.05, -0.02)
  m1 = prm_health.RewardHackingMonitor(window=6)
  for s in range(12):
    m1.update(s, p[s], a[s])
  out = m1.update(12, float("nan"), 0.3)  # skipped: the window does not change
  assert out["prm_health/process_trend_t"] == pytest.approx(prm_health.trend_t_statistic(p[6:12]))
  m2 = prm_health.RewardHackingMonitor(window=6)
  m2.load_state_dict(m1.state_dict())
  for s in range(13, 25):
    assert m1.update(s, p[s], a[s]) == m2.update(s, p[s], a[s])
  with pytest.raises(ValueError, match="window"):
    prm_health.RewardHackingMonitor(window=7).load_state_dict(m1.state_dict())


@pytest.mark.parametrize("kw", [{"window": 2}, {"window": 3.0}, {"t_threshold": 0.0},
                                {"t_threshold": float("inf")}])
def test_monitor_validation(kw):
  with pytest.raises(ValueError, match="RewardHackingMonitor"):
    prm_health.RewardHackingMonitor(**kw)


# ----------------------------------------------------------------------------- step credit


class StepCreditTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_auroc_where_equals_sliced(self):
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, 20).astype(np.float32)
    y = rng.integers(0, 2, 20)
    w = rng.random(20) < 0.6
    f = self.variant(prm_health.auroc)
    np.testing.assert_allclose(f(s, y, w), _rank_auroc(s[w], y[w]), rtol=1e-6)
    np.testing.assert_allclose(f(s, y, np.ones(20, bool)), f(s, y), rtol=1e-6)

  @chex.all_variants(with_pmap=False)
  def test_step_scores_sum_min_and_absent_steps(self):
    r = jnp.array([[1.0, -2.0, 0.5, 3.0, 9.0],
                   [0.25, 0.5, -1.0, 0.0, 0.0]])
    sid = jnp.array([[0, 0, 1, 1, -1],     # last token (EOS) in no step
                     [0, 1, 1, -1, -1]])   # row 1 has 2 steps of S = 3
    f = self.variant(prm_health.step_scores, static_argnames=("num_steps", "reduce"))
    np.testing.assert_allclose(f(r, sid, num_steps=3, reduce="sum"),
                               [[-1.0, 3.5, np.nan], [0.25, -0.5, np.nan]])
    np.testing.assert_allclose(f(r, sid, num_steps=3, reduce="min"),
                               [[-2.0, 0.5, np.nan], [0.25, -1.0, np.nan]])

  @chex.all_variants(with_pmap=False)
  def test_first_error_metrics_by_hand(self):
    nan = np.nan
    scores = jnp.array([
        [0.5, -1.0, 0.2, 0.1],   # k=1: pred(τ=0) 1 ✓, argmin 1 ✓
        [0.3, 0.4, -0.2, nan],   # k=0: pred 2 ✗, argmin 2 ✗
        [0.1, 0.2, 0.3, 0.0],    # k=-1: pred -1 ✓ (0.0 is not below 0)
        [0.1, -0.1, 0.3, nan],   # k=-1: pred 1 ✗
    ])
    k = jnp.array([1, 0, -1, -1])
    f = self.variant(functools.partial(prm_health.first_error_metrics, threshold=0.0))
    m = f(scores, k)
    np.testing.assert_allclose(m["error_acc"], 0.5)
    np.testing.assert_allclose(m["correct_acc"], 0.5)
    np.testing.assert_allclose(m["f1"], 0.5)
    np.testing.assert_allclose(m["argmin_acc"], 0.5)
    # good steps: row 0 step 0 (0.5); rows 2, 3 all valid steps (0.1 .2 .3 0 | .1 -.1 .3);
    # bad: row 0 step 1 (-1.0), row 1 step 0 (0.3). Pairs good > bad: vs -1.0 all 8; vs 0.3:
    # 0.5 > 0.3 (1) and the two 0.3 ties (2 x 1/2) -> (8 + 1 + 1) / 16.
    np.testing.assert_allclose(m["step_auroc"], 10 / 16)
    assert (int(m["num_error"]), int(m["num_correct"]), int(m["num_good_steps"]),
            int(m["num_bad_steps"])) == (2, 2, 8, 2)
    np.testing.assert_array_equal(prm_health.predict_first_error(scores, 0.0), [1, 2, -1, 1])
    np.testing.assert_array_equal(prm_health.predict_first_error(scores, -5.0), [-1] * 4)
    # One class only: the other accuracy and the F1 are NaN.
    m1 = f(scores[:2], k[:2])
    assert np.isnan(m1["correct_acc"]) and np.isnan(m1["f1"]) and float(m1["error_acc"]) == 0.5
    # Constant scores (a PRM equal to its reference): AUROC 0.5, F1 0 at any threshold.
    z = jnp.where(jnp.isnan(scores), jnp.nan, 0.0)
    for t in (-1.0, 1.0):
      mz = prm_health.first_error_metrics(z, k, threshold=t)
      assert float(mz["f1"]) == 0.0 and float(mz["step_auroc"]) == 0.5

  def test_choose_threshold_is_the_best_f1(self):
    rng = np.random.default_rng(3)
    for trial in range(6):
      b, s_ = 40, 5
      n = rng.integers(2, s_ + 1, b)
      scores = np.round(rng.normal(size=(b, s_)), 1).astype(np.float32)  # ties
      scores[np.arange(s_)[None, :] >= n[:, None]] = np.nan
      k = np.where(rng.random(b) < 0.4, -1, rng.integers(0, n - 1))
      # plant a signal in half the trials: the first wrong step scores lower
      if trial % 2:
        scores[np.arange(b)[k >= 0], k[k >= 0]] -= 1.0
      tau = prm_health.choose_threshold(scores, k)
      best = float(prm_health.first_error_metrics(scores, k, threshold=tau)["f1"])
      grid = np.concatenate([np.unique(scores[~np.isnan(scores)]), np.linspace(-5, 5, 401)])
      brute = max(float(prm_health.first_error_metrics(scores, k, threshold=t)["f1"]) for t in grid)
      assert best == pytest.approx(brute, abs=1e-6), trial
    z = np.zeros((4, 3), np.float32)
    assert prm_health.choose_threshold(z, np.array([0, 1, -1, -1])) < 0  # lowest of equal F1
    with pytest.raises(ValueError, match="no finite step score"):
      prm_health.choose_threshold(np.full((2, 2), np.nan), np.array([0, -1]))

  def test_step_ids_from_offsets(self):
    # "1 + 2 = 3. The answer is 3." steps (0, 10), (11, 27); tokens: "1", " +", " 2", " =", " 3",
    # ".", " The", " answer", " is", " 3", ".", EOS (empty span).
    offs = [[(0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 10), (10, 14), (14, 21), (21, 24),
             (24, 26), (26, 27), (0, 0)]]
    ids = prm_health.step_ids_from_offsets(offs, [((0, 10), (11, 27))], num_cols=14)
    np.testing.assert_array_equal(ids, [[0] * 6 + [1] * 5 + [-1] * 3])
    # A lone separator space goes to the next step; text past the last step to none.
    ids = prm_health.step_ids_from_offsets([[(0, 10), (10, 11), (11, 27), (27, 29)]],
                                           [((0, 10), (11, 27))])
    np.testing.assert_array_equal(ids, [[0, 1, 1, -1]])
    with pytest.raises(ValueError, match="across the end 10 of a step"):
      prm_health.step_ids_from_offsets([[(0, 9), (9, 12)]], [((0, 10), (11, 27))])
    with pytest.raises(ValueError, match="increasing step spans"):
      prm_health.step_ids_from_offsets([[(0, 9)]], [((0, 10), (5, 10))])

  def test_chance_metrics(self):
    m = prm_health.chance_metrics([3, 4, 3, 4], [0, 2, -1, -1])
    np.testing.assert_allclose([m["error_acc"], m["correct_acc"], m["argmin_acc"]],
                               [(1 / 4 + 1 / 5) / 2, (1 / 4 + 1 / 5) / 2, (1 / 3 + 1 / 4) / 2])
    np.testing.assert_allclose(m["f1"], (1 / 4 + 1 / 5) / 2)
    assert m["step_auroc"] == 0.5
