"""TGDPO (arXiv 2506.14574) next to plain DPO: hand-computed values, gradients, masking."""
import functools
import math

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrl_dense.losses import tgdpo
from jaxrl_dense.rewards import dpo_loss, sequence_logratio


def _softplus(x):
  return math.log1p(math.exp(x))


def test_tgdpo_hand_one_pair():
  beta, alpha = 0.1, 0.5
  ref_w = np.array([[-1.0, -2.0, -3.0]]); ref_l = np.array([[-1.0, -1.0]])
  pol_w = ref_w + [[0.2, -0.1, 5.0]]      # rho_w = [.2, -.1], third token is padding
  pol_l = ref_l + [[0.3, 7.0]]            # rho_l = [.3]
  rm_w = ref_w + [[1.0, 2.0, 0.0]]        # rhat_w = [1, 2]
  rm_l = ref_l + [[-2.0, 0.0]]            # rhat_l = [-2]
  mw = np.array([[1, 1, 0]]); ml = np.array([[1, 0]])
  loss, ch, rj = tgdpo.tgdpo_loss(pol_w, ref_w, rm_w, mw, pol_l, ref_l, rm_l, ml, beta=beta,
                                  alpha=alpha)
  # weights: chosen 1 + 0.05 * [1, 2] = [1.05, 1.1]; rejected 1 - 0.05 * (-2) = 1.1
  logits = beta * ((1.05 * 0.2 + 1.1 * -0.1) - 1.1 * 0.3)   # = -0.023
  np.testing.assert_allclose(loss, _softplus(-logits), rtol=1e-5)
  np.testing.assert_allclose(ch, [beta * 0.1], rtol=1e-5)
  np.testing.assert_allclose(rj, [beta * 0.3], rtol=1e-5)


def _batch(seed=0, b=6, tw=6, tl=5):
  rng = np.random.default_rng(seed)
  f = lambda *s: (-rng.uniform(0.1, 3.0, size=s)).astype(np.float32)
  lw = rng.integers(1, tw + 1, size=b); ll = rng.integers(1, tl + 1, size=b)
  mw = (np.arange(tw)[None] < lw[:, None]).astype(np.float32)
  ml = (np.arange(tl)[None] < ll[:, None]).astype(np.float32)
  return (f(b, tw), f(b, tw), f(b, tw), mw, f(b, tl), f(b, tl), f(b, tl), ml)


@pytest.mark.parametrize("jit", [False, True])
def test_alpha_zero_is_dpo(jit):
  pw, rw, mw_, mw, pl, rl, ml_, ml = _batch()
  f = functools.partial(tgdpo.tgdpo_loss, beta=0.1, alpha=0.0)
  loss, ch, rj = (jax.jit(f) if jit else f)(pw, rw, mw_, mw, pl, rl, ml_, ml)
  d_loss, d_ch, d_rj = tgdpo.dpo_loss_from_token_logps(pw, rw, mw, pl, rl, ml, beta=0.1)
  np.testing.assert_allclose(loss, d_loss, rtol=1e-6)
  np.testing.assert_allclose(ch, d_ch, rtol=1e-6)
  np.testing.assert_allclose(rj, d_rj, rtol=1e-6)
  # and the core's implicit-PRM DPO on sequence log-ratios agrees
  core = dpo_loss(sequence_logratio(pw, rw, mw), sequence_logratio(pl, rl, ml), beta=0.1)
  np.testing.assert_allclose(d_loss, core, rtol=1e-6)


def test_unclipped_weights_can_go_negative():
  """Paper vs code: the official weights 1 ± alpha beta rhat are not clipped."""
  ref = np.array([[-1.0, -1.0]]); m = np.ones((1, 2))
  rm_w = ref + [[-30.0, 0.0]]   # chosen token the guide dislikes strongly: 1 + .05 * -30 = -0.5
  w = tgdpo.tgdpo_token_weights(rm_w, ref, m, 0.1, 0.5, chosen=True)
  np.testing.assert_allclose(w, [[-0.5, 1.0]], atol=1e-6)
  wc = tgdpo.tgdpo_token_weights(rm_w, ref, m, 0.1, 0.5, chosen=True, weight_clip=(0.0, None))
  np.testing.assert_allclose(wc, [[0.0, 1.0]], atol=1e-6)
  pol_w = ref + [[1.0, 0.0]]
  a = tgdpo.tgdpo_loss(pol_w, ref, rm_w, m, ref, ref, ref, m, beta=0.1)[0]
  b = tgdpo.tgdpo_loss(pol_w, ref, rm_w, m, ref, ref, ref, m, beta=0.1, weight_clip=(0.0, None))[0]
  np.testing.assert_allclose(a, _softplus(-0.1 * -0.5), rtol=1e-5)   # raising the token *hurts*
  np.testing.assert_allclose(b, math.log(2.0), rtol=1e-5)


def test_gradient_matches_formula_and_check_grads():
  pw, rw, mw_, mw, pl, rl, ml_, ml = _batch(seed=3)
  beta, alpha = 0.1, 0.5
  fn = lambda pw_, pl_: tgdpo.tgdpo_loss(pw_, rw, mw_, mw, pl_, rl, ml_, ml, beta=beta,
                                         alpha=alpha)[0]
  gw, gl = jax.grad(fn, argnums=(0, 1))(pw, pl)
  ww = (1 + alpha * beta * (mw_ - rw)) * mw
  wl = (1 - alpha * beta * (ml_ - rl)) * ml
  logits = beta * ((ww * (pw - rw)).sum(1) - (wl * (pl - rl)).sum(1))
  coef = -(1 - 1 / (1 + np.exp(-logits))) / pw.shape[0]   # d(-log sigmoid)/d logits, mean
  np.testing.assert_allclose(gw, coef[:, None] * beta * ww, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gl, -coef[:, None] * beta * wl, rtol=1e-4, atol=1e-7)
  # the guidance model gets no gradient (its reward is stop-gradient)
  g_rm = jax.grad(lambda r: tgdpo.tgdpo_loss(pw, rw, r, mw, pl, rl, ml_, ml)[0])(mw_)
  np.testing.assert_allclose(g_rm, 0.0)
  check_grads(fn, (pw, pl), order=1, modes=["rev"],
              atol=5e-2, rtol=5e-2)


def test_masked_equals_sliced():
  pw, rw, mw_, mw, pl, rl, ml_, ml = _batch(seed=5)
  mw[:, 3:] = 0; ml[:, 2:] = 0
  mw[:, 0] = 1; ml[:, 0] = 1
  junk = lambda x, m: np.where(m > 0, x, 123.0).astype(np.float32)
  full = tgdpo.tgdpo_loss(junk(pw, mw), rw, junk(mw_, mw), mw, junk(pl, ml), rl, junk(ml_, ml), ml)
  sl = tgdpo.tgdpo_loss(pw[:, :3], rw[:, :3], mw_[:, :3], mw[:, :3], pl[:, :2], rl[:, :2],
                        ml_[:, :2], ml[:, :2])
  for a, b in zip(full, sl):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_shapes():
  pw, rw, mw_, mw, pl, rl, ml_, ml = _batch()
  with pytest.raises(ValueError, match="pairs"):
    tgdpo.tgdpo_loss(pw, rw, mw_, mw, pl[:3], rl[:3], ml_[:3], ml[:3])
  with pytest.raises(ValueError, match="shape"):
    tgdpo.tgdpo_loss(pw[:, :2], rw, mw_, mw, pl, rl, ml_, ml)
