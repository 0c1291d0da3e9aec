"""SAR self-aligned reward (arXiv 2509.05489): hand-computed values."""
import functools
import math

import jax
import numpy as np
import pytest

from jaxrl_dense.rewards import sar

# 2 prompts x 3 samples, 4 answer tokens. Token log-probs chosen so the per-row means are simple.
MASK = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0],
                 [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
# mean log p(a | q): -1, -2, (empty), -0.5, -1000, -3
LP_QA = np.array([[-0.5, -1.5, 9, 9], [-2, -2, -2, -2], [9, 9, 9, 9],
                  [-0.5, 9, 9, 9], [-1000, -1000, -1000, 9], [-3, -3, -3, -3]], np.float32)
# mean log p(a | no query): -2, -1, (empty), -0.5, -1001, -3.5
LP_A = np.array([[-2, -2, 9, 9], [-1, -1, -1, -1], [9, 9, 9, 9],
                 [-0.5, 9, 9, 9], [-1001, -1001, -1001, 9], [-3.5, -3.5, -3.5, -3.5]], np.float32)
NLL_QA = np.array([1, 2, 0, 0.5, 1000, 3.0])
NLL_A = np.array([2, 1, 0, 0.5, 1001, 3.5])


@pytest.mark.parametrize("jit", [False, True])
def test_default_form_hand(jit):
  f = jax.jit(sar.self_aligned_reward) if jit else sar.self_aligned_reward
  r = np.asarray(f(LP_QA, LP_A, MASK))
  want = [1 - math.exp(-1),       # (e^2 - e^1) / e^2
          -1.0,                   # (e - e^2)/e = 1 - e < -1 -> clipped at -1
          0.0,                    # empty answer: ppl 1 in both contexts
          0.0,                    # query does not help
          1 - math.exp(-1),       # huge nll: no overflow in the log form
          1 - math.exp(-0.5)]
  np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(r))


def test_matches_ppl_formula_where_ppl_is_finite():
  r = np.asarray(sar.self_aligned_reward(LP_QA, LP_A, MASK))
  ok = NLL_A < 50
  ppl_qa, ppl_a = np.exp(NLL_QA[ok]), np.exp(NLL_A[ok])
  ref = np.maximum((ppl_a - ppl_qa) / (ppl_a + 1e-9), -1)
  np.testing.assert_allclose(r[ok], ref, rtol=1e-5, atol=1e-6)


def test_options_hand():
  rows = slice(0, 2)
  lq, la, m = LP_QA[rows], LP_A[rows], MASK[rows]
  e = math.e
  np.testing.assert_allclose(sar.self_aligned_reward(lq, la, m, use_log=True),
                             [(2 - 1) / 2, max((1 - 2) / 1, -1)], rtol=1e-5)
  np.testing.assert_allclose(sar.self_aligned_reward(lq, la, m, use_denominator=False),
                             [e ** 2 - e, e - e ** 2], rtol=1e-5)
  np.testing.assert_allclose(
      sar.self_aligned_reward(lq, la, m, use_denominator=False, use_comparison=False),
      [-e + 5, -e ** 2 + 5], rtol=1e-5)
  # clip_value 3 caps each ppl term: row 0 (QA=e, A=min(e^2,3)=3), row 1 (QA=3, A=e).
  np.testing.assert_allclose(sar.self_aligned_reward(lq, la, m, clip_value=3.0),
                             [(3 - e) / 3, max((e - 3) / e, -1)], rtol=1e-5)
  # clip_value <= 1 is ignored, as in the official code.
  np.testing.assert_allclose(sar.self_aligned_reward(lq, la, m, clip_value=1.0),
                             sar.self_aligned_reward(lq, la, m), rtol=1e-6)


def test_separate_answer_only_mask():
  # The answer-only context may have a different padded width; same tokens, same means.
  la_wide = np.concatenate([LP_A, np.full((6, 2), 7.0, np.float32)], axis=1)
  m_wide = np.concatenate([MASK, np.zeros((6, 2), np.float32)], axis=1)
  np.testing.assert_allclose(sar.self_aligned_reward(LP_QA, la_wide, MASK, m_wide),
                             sar.self_aligned_reward(LP_QA, LP_A, MASK), rtol=1e-6)


def test_bad_options_and_shapes():
  with pytest.raises(ValueError, match="use_comparison"):
    sar.self_aligned_reward(LP_QA, LP_A, MASK, use_comparison=False)
  with pytest.raises(AssertionError):
    sar.self_aligned_reward(LP_QA[:, :3], LP_A, MASK)


def test_schedule_and_combination():
  np.testing.assert_allclose(sar.sar_schedule(np.array([0.0, 0.3, 1.0])), [1, 1, 1])
  lin = functools.partial(sar.sar_schedule, kind="linear", peak_pos=0.5)
  np.testing.assert_allclose(lin(np.array([0.0, 0.25, 0.5, 0.75, 1.0])), [0, 0.5, 1, 0.5, 0],
                             atol=1e-6)
  np.testing.assert_allclose(lin(np.array([0.25, 0.75]), bottom=0.2), [0.6, 0.6], atol=1e-6)
  np.testing.assert_allclose(lin(np.array([0.25, 0.75]), increase=False, decrease=False), [1, 1])
  with pytest.raises(ValueError, match="kind"):
    sar.sar_schedule(0.5, kind="cosine")
  r = sar.combine_with_sar(np.array([1.0, 0.0]), np.array([0.5, -1.0]), factor=0.2, schedule=0.5)
  np.testing.assert_allclose(r, [1.05, -0.1], atol=1e-7)
