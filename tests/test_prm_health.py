"""PRM health metrics and the reward-hacking alarm (jaxrl_dense.prm_health) against hand-computed values."""
import logging
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import prm_health
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
    with pytest.raises(ValueError, match="acc"):
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
  with caplog.at_level(logging.WARNING, logger="jaxrl_dense.prm_health"):
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
