"""Fine-Grained RLHF (arXiv 2306.01693): hand-computed values on 2 prompts x 3 samples x 5 tokens."""
import functools
import math

import jax
import numpy as np
import pytest

from jaxrl_dense.rewards import fine_grained as fg

B, T = 6, 5
LENGTHS = np.array([5, 3, 0, 4, 5, 1])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)

# Sub-sentence segments (relevance RM): ends, judged ok?, valid.
REL_END = np.array([[1, 4], [1, 4], [0, 0], [3, 3], [0, 0], [2, 0]], np.int32)
REL_OK = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [1, 1], [1, 1]], bool)
REL_VALID = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [0, 0], [1, 0]], np.float32)


def _maybe_jit(fn, jit, **static):
  f = functools.partial(fn, **static)
  return jax.jit(f) if jit else f


@pytest.mark.parametrize("jit", [False, True])
def test_place_segment_rewards_hand(jit):
  vals = fg.binary_segment_values(REL_OK, 1.0, -1.0)
  r = _maybe_jit(fg.place_segment_rewards, jit)(REL_END, vals, REL_VALID, MASK)
  want = np.zeros((B, T), np.float32)
  want[0, 1] = 1.0; want[0, 4] = -1.0       # ok, not ok
  want[1, 1] = -1.0; want[1, 2] = 1.0       # end 4 truncated to L-1 = 2
  # row 2: empty response -> nothing, even for a valid segment
  want[3, 3] = 1.0 - 1.0                     # two segments on the same token add
  # row 4: no valid segments
  want[5, 0] = 1.0                           # end 2 clamped to L-1 = 0
  np.testing.assert_allclose(r, want, atol=1e-7)


def test_place_segment_rewards_rejects_float_ends():
  with pytest.raises(TypeError, match="seg_end"):
    fg.place_segment_rewards(REL_END.astype(np.float32), np.zeros((B, 2)), REL_VALID, MASK)


def test_normalize_sequence_score():
  mu, sd = -0.4468, 8.3012
  out = fg.normalize_sequence_score(np.array([mu, mu + sd, mu - 2 * sd]), mu, sd, scale=0.3, bias=0.1)
  np.testing.assert_allclose(out, [0.1, 0.4, -0.5], atol=1e-6)
  with pytest.raises(ValueError, match="std"):
    fg.normalize_sequence_score(np.zeros(2), 0.0, 0.0)


def test_kl_shaped_rewards_estimators():
  r = np.array([[1.0, 0.0, 2.0]])
  lo = np.array([[-1.0, -2.0, -0.5]])
  lr = np.array([[-1.5, -1.0, -0.5]])
  m = np.array([[1.0, 1.0, 0.0]])
  x = lo - lr  # [0.5, -1.0, 0]
  k1 = fg.kl_shaped_rewards(r, lo, lr, m, 0.3)
  np.testing.assert_allclose(k1, [[1.0 - 0.15, 0.3, 0.0]], atol=1e-6)
  k3 = fg.kl_shaped_rewards(r, lo, lr, m, 0.3, estimator="k3")
  want = (r - 0.3 * (np.exp(-x) - 1 + x)) * m
  np.testing.assert_allclose(k3, want, atol=1e-6)
  with pytest.raises(ValueError, match="estimator"):
    fg.kl_shaped_rewards(r, lo, lr, m, 0.3, estimator="k9")


@pytest.mark.parametrize("jit", [False, True])
def test_fine_grained_token_rewards_hand(jit):
  # Factuality RM (sentences): one sentence per row ending at the last token, row 4 judged wrong.
  fact_end = np.array([[4], [2], [0], [3], [4], [0]], np.int32)
  fact_ok = np.array([[1], [1], [1], [1], [0], [1]], bool)
  fact_valid = np.ones((B, 1), np.float32)
  seq = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)
  lo = np.full((B, T), -1.0, np.float32)
  lr = np.full((B, T), -1.2, np.float32)   # k1 KL = 0.2 per valid token
  w_rel, w_fact, kl = 0.3, 0.5, 0.3

  def f(*a):
    return fg.fine_grained_token_rewards(
        [REL_END, a[0]], [fg.binary_segment_values(REL_OK, 1.0, -1.0),
                          fg.binary_segment_values(a[1], 1.0, -1.0)],
        [REL_VALID, fact_valid], [w_rel, w_fact], MASK, sequence_score=a[2], old_logp=lo,
        ref_logp=lr, kl_coef=kl)

  r = (jax.jit(f) if jit else f)(fact_end, fact_ok, seq)
  want = np.zeros((B, T), np.float32)
  want[0] = [0, 0.3, 0, 0, -0.3 + 0.5 + 0.1]
  want[1] = [0, -0.3, 0.3 + 0.5 + 0.2, 0, 0]
  want[3] = [0, 0, 0, 0.5 + 0.4, 0]
  want[4] = [0, 0, 0, 0, -0.5 + 0.5]
  want[5] = [0.3 + 0.5 + 0.6, 0, 0, 0, 0]
  want = (want - kl * 0.2) * MASK
  np.testing.assert_allclose(r, want, atol=1e-6)


def test_no_segments_gives_only_kl():
  lo = np.full((B, T), -1.0, np.float32)
  lr = np.full((B, T), -1.5, np.float32)
  r = fg.fine_grained_token_rewards([], [], [], [], MASK, old_logp=lo, ref_logp=lr, kl_coef=0.3)
  np.testing.assert_allclose(r, -0.15 * MASK, atol=1e-7)
  with pytest.raises(ValueError, match="old_logp"):
    fg.fine_grained_token_rewards([], [], [], [], MASK, kl_coef=0.3)
  with pytest.raises(ValueError, match="same length"):
    fg.fine_grained_token_rewards([REL_END], [], [], [], MASK)


def test_scale_rewards_keep_mean_std_vs_variance_quirk():
  """Paper vs code: the repo divides by sqrt(std) (std passed as a variance); we default to 1/std."""
  r = np.array([[1.0, 3.0, 99.0]])
  m = np.array([[1.0, 1.0, 0.0]])
  # mu = 2, unbiased var = 2, std = sqrt(2)
  ok = fg.scale_rewards_keep_mean(r, m, eps=0.0)
  np.testing.assert_allclose(ok, [[2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), 0.0]], atol=1e-6)
  quirk = fg.scale_rewards_keep_mean(r, m, eps=0.0, quirk=True)
  np.testing.assert_allclose(quirk, [[2 - 2 ** -0.25, 2 + 2 ** -0.25, 0.0]], atol=1e-6)
  # mean kept, and the two agree exactly when std = 1.
  r1 = np.array([[1.0, 2.0, 3.0]])
  np.testing.assert_allclose(fg.scale_rewards_keep_mean(r1, np.ones((1, 3)), eps=0.0),
                             fg.scale_rewards_keep_mean(r1, np.ones((1, 3)), eps=0.0, quirk=True),
                             atol=1e-6)


def _np_gae(r, v, m, gamma, lam):
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    L = int(m[b].sum())
    last = 0.0
    for t in reversed(range(L)):
      nv = v[b, t + 1] if t + 1 < L else 0.0
      delta = r[b, t] + gamma * nv - v[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv


def _np_whiten(x, m, shift_mean=True):
  xs = x[m > 0]
  mu, var = xs.mean(), xs.var(ddof=1)
  out = (x - mu) / np.sqrt(var + 1e-8)
  if not shift_mean:
    out = out + mu
  return out * m


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("whiten", [False, True])
def test_fine_grained_advantages_vs_loop(jit, whiten):
  rng = np.random.default_rng(0)
  r = rng.normal(size=(B, T)).astype(np.float32) * MASK
  v = rng.normal(size=(B, T)).astype(np.float32)
  f = _maybe_jit(fg.fine_grained_advantages, jit, gamma=0.9, lam=0.95, whiten_rewards=whiten,
                 whiten_advantages=whiten)
  adv, ret = f(r, v, MASK)
  r_in = _np_whiten(r, MASK, shift_mean=False) if whiten else r
  want = _np_gae(r_in, v, MASK, 0.9, 0.95)
  np.testing.assert_allclose(ret, (want + v) * MASK, atol=1e-5)
  if whiten:
    want = _np_whiten(want, MASK)
  np.testing.assert_allclose(adv, want, atol=1e-5)
  assert np.all(np.asarray(adv)[MASK == 0] == 0)


def test_advantages_gamma1_lambda1_equals_reward_to_go_minus_value():
  r = np.array([[0.0, 1.0, 0.0, 2.0]], np.float32)
  v = np.array([[0.5, 0.25, 1.0, 3.0]], np.float32)
  m = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
  adv, ret = fg.fine_grained_advantages(r, v, m, gamma=1.0, lam=1.0, whiten_rewards=False,
                                        whiten_advantages=False)
  np.testing.assert_allclose(adv, [[1 - 0.5, 1 - 0.25, 0 - 1.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[1.0, 1.0, 0.0, 0.0]], atol=1e-6)
