"""PRL process-reward advantage (arXiv 2601.10201): hand-computed values and the spec's properties."""
import functools

import jax
import numpy as np
import pytest

from jaxrl_dense import ops
from jaxrl_dense.advantages import prl

B, T = 6, 5
LENGTHS = np.array([4, 5, 2, 5, 1, 3])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)
GROUPS = np.repeat(np.arange(2, dtype=np.int32), 3)
OUTCOME = np.array([1, 0, 1, 0, 0, 1], np.float32)
RNG = np.random.default_rng(1)
LOGP_REF = -RNG.uniform(0.1, 2.0, size=(B, T)).astype(np.float32)
D = np.array([[0.5, -0.5, 1.0, 0.2, 0], [0.1, 0.2, 0.3, 0.4, 0.5], [0.2, -0.1, 0, 0, 0],
              [0.5, 0.5, -1.0, 1.0, 0.3], [0.7, 0, 0, 0, 0], [-0.2, 0.4, 0.1, 0, 0]], np.float32)
LOGP_OLD = (LOGP_REF + D) * MASK + 9.0 * (1 - MASK)   # junk on padding must not matter


def _grpo(o):
  out = np.zeros_like(o)
  for g in range(2):
    x = o[3 * g:3 * g + 3]
    out[3 * g:3 * g + 3] = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
  return out


@pytest.mark.parametrize("jit", [False, True])
def test_prl_fixed_steps_hand(jit):
  step_ids = ops.fixed_length_step_ids(MASK, 2)
  f = functools.partial(prl.prl_advantages, num_groups=2, eta=2.0)
  adv = np.asarray((jax.jit(f) if jit else f)(OUTCOME, LOGP_OLD, LOGP_REF, MASK, GROUPS,
                                              step_ids=step_ids)[0])
  a = _grpo(OUTCOME)
  # row 0: d = [.5, -.5, 1, .2], D = [1.2, .7, 1.2, .2]; steps {0,1} {2,3} -> ends at 1, 3.
  np.testing.assert_allclose(adv[0], a[0] - np.array([0.7, 0.7, 0.2, 0.2, 0]) / 2 - [0, 0, 0, 0, a[0]],
                             atol=1e-5)
  # row 1: D = [1.5, 1.4, 1.2, .9, .5]; ends at 1, 3, 4.
  np.testing.assert_allclose(adv[1], a[1] - np.array([1.4, 1.4, 0.9, 0.9, 0.5]) / 2, atol=1e-5)
  # row 4: one token: D = .7.
  np.testing.assert_allclose(adv[4], [a[4] - 0.35, 0, 0, 0, 0], atol=1e-5)
  # row 5: d = [-.2, .4, .1] -> D = [.3, .5, .1]; ends 1, 2.
  np.testing.assert_allclose(adv[5], [a[5] - 0.25, a[5] - 0.25, a[5] - 0.05, 0, 0], atol=1e-5)
  assert np.all(adv[MASK == 0] == 0)


def test_prl_eta_zero_and_large_is_grpo():
  step_ids = ops.fixed_length_step_ids(MASK, 2)
  want = _grpo(OUTCOME)[:, None] * MASK
  for eta in (0.0, 1e9):
    adv, ret = prl.prl_advantages(OUTCOME, LOGP_OLD, LOGP_REF, MASK, GROUPS, 2, step_ids, eta=eta)
    np.testing.assert_allclose(adv, want, atol=1e-5)
    np.testing.assert_allclose(ret, adv)
  with pytest.raises(ValueError, match="eta"):
    prl.prl_advantages(OUTCOME, LOGP_OLD, LOGP_REF, MASK, GROUPS, 2, step_ids, eta=-1.0)


def test_prl_one_step_uses_last_token_log_ratio():
  """K >= L: one step whose value is A~ - d_{L-1} / eta on every token."""
  step_ids = ops.fixed_length_step_ids(MASK, 8)
  adv = np.asarray(prl.prl_advantages(OUTCOME, LOGP_OLD, LOGP_REF, MASK, GROUPS, 2, step_ids,
                                      eta=4.0, norm_by_std=False)[0])
  centred = OUTCOME - np.repeat([OUTCOME[:3].mean(), OUTCOME[3:].mean()], 3)
  last = D[np.arange(B), LENGTHS - 1]
  np.testing.assert_allclose(adv, (centred - last / 4.0)[:, None] * MASK, atol=1e-5)


def test_prl_nonzero_fill_quirk():
  """Paper vs code: the code's "next non-zero" broadcast skips a step whose end value is exactly 0."""
  # Every token is a step (step_len 1). Row 3: d = [.5, .5, -1.5, 1, .5] -> D = [1, .5, 0, 1.5, .5]
  # (binary-exact values, so D_2 is exactly 0).
  d = D.copy()
  d[3] = [0.5, 0.5, -1.5, 1.0, 0.5]
  lr = np.full((B, T), -1.0, np.float32)
  lo = (lr + d) * MASK
  step_ids = ops.fixed_length_step_ids(MASK, 1)
  kw = dict(eta=1.0, norm_by_std=False)
  ok = np.asarray(prl.prl_advantages(OUTCOME, lo, lr, MASK, GROUPS, 2, step_ids, **kw)[0])
  q = np.asarray(prl.prl_advantages(OUTCOME, lo, lr, MASK, GROUPS, 2, step_ids,
                                    nonzero_fill_quirk=True, **kw)[0])
  base = -1.0 / 3.0   # row 3: outcome 0 in a group with mean 1/3
  np.testing.assert_allclose(ok[3], base - np.array([1.0, 0.5, 0.0, 1.5, 0.5]), atol=1e-5)
  np.testing.assert_allclose(q[3], base - np.array([1.0, 0.5, 1.5, 1.5, 0.5]), atol=1e-5)
  np.testing.assert_allclose(np.delete(q, 3, 0), np.delete(ok, 3, 0), atol=1e-5)


def test_fill_by_next_nonzero():
  x = np.array([[0.0, 2.0, 0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0, 5.0, 0.0]])
  m = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_allclose(prl.fill_by_next_nonzero(x, m),
                             [[2, 2, 3, 3, 3, 0], [1, 0, 0, 0, 0, 0]])
