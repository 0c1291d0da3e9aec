"""PROF consistency filter (arXiv 2509.03403): hand-computed scores and hand-made groups."""
import functools

import jax
import numpy as np
import pytest

from jaxrl_dense.filters import prof

# 2 prompts x 3 samples, up to 3 steps each.
V = np.array([[0.8, 0.6, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0],
              [0.9, 0.5, 0.1], [0.4, 0.4, 0.0], [0.3, 0.7, 0.0]], np.float32)
SM = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], np.float32)
O = np.array([1, 0, 1, 0, 1, 1], np.float32)
GROUPS = np.repeat(np.arange(2, dtype=np.int32), 3)


@pytest.mark.parametrize("jit", [False, True])
def test_consistency_code_hand(jit):
  f = functools.partial(prof.prof_consistency, len_penalty=10.0, min_steps=2, max_steps=30)
  c = np.asarray((jax.jit(f) if jit else f)(V, SM, O, batch_mean=0.5))
  want = [(2 * 0.3 + 2 * 0.1) / 2,               # correct, 2 steps
          2 * (0.2 - 0.5) * -1 - 10,             # incorrect, 1 step -> penalised
          0.0 - 10,                              # no steps: c = 0, then penalised
          -(2 * 0.4 + 0 + 2 * -0.4) / 3,         # incorrect, 3 steps
          (2 * -0.1 * 2) / 2,
          (2 * -0.2 + 2 * 0.2) / 2]
  np.testing.assert_allclose(c, want, atol=1e-6)
  # default batch mean = mean of the 11 valid step scores
  mu = V[SM > 0].mean()
  c2 = prof.prof_consistency(V, SM, O)
  np.testing.assert_allclose(c2[0], (2 * (0.8 - mu) + 2 * (0.6 - mu)) / 2, atol=1e-6)


def test_consistency_code_vs_paper():
  """Paper vs code: code centres on the batch mean, doubles, penalises outside the sign flip, uses
  H < 2 / H > H_max; the paper has no centring, penalty inside the sign, H = 1 / H >= H_max."""
  code = np.asarray(prof.prof_consistency(V, SM, O, batch_mean=0.5, max_steps=3))
  paper = np.asarray(prof.prof_consistency(V, SM, O, max_steps=3, variant="paper"))
  np.testing.assert_allclose(paper, [0.7,                       # mean 0.7, no penalty
                                     -(0.2 - 10),               # H = 1: penalty inside the flip
                                     0.0,                       # H = 0: no penalty in the paper
                                     -(0.5 - 10),               # H = 3 >= H_max: penalised
                                     0.4, 0.5], atol=1e-6)
  # code: H = 3 is not > 3 -> no penalty; H = 1 penalised *after* the sign flip (negative).
  np.testing.assert_allclose(code[3], 0.0, atol=1e-6)
  assert code[1] < -9 and paper[1] > 9
  with pytest.raises(ValueError, match="variant"):
    prof.prof_consistency(V, SM, O, variant="other")


def _keep(o, c, k, groups=GROUPS, g=2, **kw):
  return np.asarray(prof.prof_filter(np.array(o, np.float32), np.array(c, np.float32), groups, g,
                                     n_remove=k, **kw))


def test_filter_hand_groups():
  # group A: P=2, N=1, k=1: delta=1, k_pos=min(1, round(1))=1 -> drop the lowest-c correct (idx 1).
  # group B: P=1, N=2, k=1: delta=-1, k_pos=round(0)=0 -> drop the lowest-c incorrect (idx 4).
  o = [1, 1, 0, 0, 0, 1]
  c = [0.5, -0.2, 0.3, 0.1, -0.4, 0.7]
  np.testing.assert_array_equal(_keep(o, c, 1), [1, 0, 1, 1, 0, 1])
  # k=2. A: k_pos = min(2, round(1.5)=2) = 2 -> both correct dropped.
  #      B: (delta + k)/2 = 0.5 rounds half-to-even to 0 -> two incorrect dropped.
  np.testing.assert_array_equal(_keep(o, c, 2), [0, 0, 1, 0, 0, 1])


def test_filter_edge_groups():
  # all-correct group with a tie: drop the k=2 lowest c (0.1, then the earlier 0.3).
  # all-incorrect group: k_pos = round(-0.5) = 0 -> drop the two lowest-c incorrect.
  o = [1, 1, 1, 0, 0, 0]
  c = [0.3, 0.3, 0.1, 0.2, -0.5, 0.0]
  np.testing.assert_array_equal(_keep(o, c, 2), [0, 1, 0, 1, 0, 0])
  # k >= n removes the whole group; k = 0 keeps everything.
  np.testing.assert_array_equal(_keep(o, c, 4), [0] * 6)
  np.testing.assert_array_equal(_keep(o, c, 0), [1] * 6)
  # balanced mixed group, k=2: P=N=2 (n=4), k_pos = round(1) = 1 -> one correct + one incorrect.
  g4 = np.zeros(4, np.int32)
  np.testing.assert_array_equal(_keep([1, 0, 1, 0], [0.2, 0.9, -0.1, 0.4], 2, groups=g4, g=1),
                                [1, 1, 0, 0])


def test_filter_random_incorrect_mode():
  o = [1, 0, 0, 0, 0, 0]
  c = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
  g = np.zeros(6, np.int32)
  k_det = _keep(o, c, 3, groups=g, g=1)
  np.testing.assert_array_equal(k_det, [1, 0, 0, 0, 1, 1])   # lowest-c incorrect dropped
  seen = set()
  for s in range(8):
    keep = _keep(o, c, 3, groups=g, g=1, incorrect_mode="random", key=jax.random.PRNGKey(s))
    assert keep[0] and keep.sum() == 3
    seen.add(tuple(keep))
  assert len(seen) > 1
  with pytest.raises(ValueError, match="key"):
    _keep(o, c, 3, groups=g, g=1, incorrect_mode="random")


def test_filter_jit_equals_eager():
  o = np.array([1, 1, 0, 0, 0, 1], np.float32)
  c = np.array([0.5, -0.2, 0.3, 0.1, -0.4, 0.7], np.float32)
  f = functools.partial(prof.prof_filter, num_groups=2, n_remove=1)
  np.testing.assert_array_equal(jax.jit(f)(o, c, GROUPS), f(o, c, GROUPS))


def test_blend_rewards():
  r = prof.prof_blend_rewards(O, V, SM, beta=0.8)
  np.testing.assert_allclose(r[:3], [1 + 0.8 * 0.7, 0.8 * 0.2, 1.0], atol=1e-6)
