"""MatchTIR dual-level advantage (arXiv 2601.10712): hand-computed on 2 prompts x 3 samples x 6 tokens."""
import functools
import math

import jax
import numpy as np
import pytest

from jaxrl_dense.advantages import dual_level as dl
from jaxrl_dense.rewards import turn_level as tl

MASK = np.array([[1, 1, 0, 1, 0, 0],    # turns {0,1} {3}
                 [1, 0, 1, 1, 0, 0],    # turns {0} {2,3}
                 [1, 1, 1, 0, 0, 0],    # one turn
                 [1, 0, 1, 0, 1, 0],    # three turns
                 [1, 0, 0, 0, 0, 0],    # one turn
                 [1, 1, 0, 1, 1, 1]],   # turns {0,1} {3,4,5}
                np.float32)
R_TURN = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.0],
                   [0.0, 0.0, 1.0], [0.2, 0.0, 0.0], [0.2, 0.0, 0.0]], np.float32)
GROUPS = np.array([0, 0, 0, 1, 1, 1], np.int32)


def _z(x, i):
  x = np.asarray(x, np.float64)
  return (x[i] - x.mean()) / (x.std(ddof=1) + 1e-6)


def test_discounted_turn_returns():
  tm = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  g = dl.discounted_turn_returns(np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 5.0]]), tm, 0.9)
  np.testing.assert_allclose(g, [[0.81, 0.9, 1.0], [1 + 1.8, 2.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_dual_level_hand(jit):
  ids = tl.turn_ids_from_mask(MASK, 3)
  tm = tl.turn_mask_from_ids(ids, 3)
  np.testing.assert_array_equal(tm.sum(1), [2, 2, 1, 3, 1, 2])
  f = functools.partial(dl.dual_level_advantages, num_groups=2)
  adv, ret = (jax.jit(f) if jit else f)(R_TURN, tm, ids, MASK, GROUPS)
  np.testing.assert_allclose(ret, adv)
  adv = np.asarray(adv)
  # group 0: R = [1, 1, 0.5]; turn-0 returns G = [1, 0.9, 0.5]; turn-1 returns (rows 0,1) [0, 1].
  tr0 = [_z([1, 1, 0.5], i) for i in range(3)]
  t0 = [_z([1, 0.9, 0.5], i) for i in range(3)]
  t1 = [-math.sqrt(0.5), math.sqrt(0.5)]        # (x - 0.5) / std([0, 1]) = -+0.5 / 0.7071
  # group 1: R = [1, 0.2, 0.2]; turn 0 G = [0.81, 0.2, 0.2]; turn 1 (rows 3,5) [0.9, 0]; turn 2 row 3
  # only -> singleton: mean 0, std 1.
  tr1 = [_z([1, 0.2, 0.2], i) for i in range(3)]
  u0 = [_z([0.81, 0.2, 0.2], i) for i in range(3)]
  u1 = [math.sqrt(0.5), -math.sqrt(0.5)]
  u2 = 1.0 / (1.0 + 1e-6)
  h = lambda a, b: 0.5 * (a + b)
  want = np.zeros((6, 6))
  want[0, [0, 1]] = h(tr0[0], t0[0]); want[0, 3] = h(tr0[0], t1[0])
  want[1, 0] = h(tr0[1], t0[1]); want[1, [2, 3]] = h(tr0[1], t1[1])
  want[2, [0, 1, 2]] = h(tr0[2], t0[2])
  want[3, 0] = h(tr1[0], u0[0]); want[3, 2] = h(tr1[0], u1[0]); want[3, 4] = h(tr1[0], u2)
  want[4, 0] = h(tr1[1], u0[1])
  want[5, [0, 1]] = h(tr1[2], u0[2]); want[5, [3, 4, 5]] = h(tr1[2], u1[1])
  np.testing.assert_allclose(adv, want, atol=2e-5)
  # spot values computed by hand on paper
  np.testing.assert_allclose(adv[0, 0], 0.5 * (0.57735 + 0.75593), atol=1e-4)
  np.testing.assert_allclose(adv[3, 0], 1.1547, atol=1e-4)
  np.testing.assert_allclose(adv[0, 3], 0.5 * (0.57735 - 0.70711), atol=1e-4)
  np.testing.assert_allclose(adv[3, 4], 0.5 * (1.1547 + 1.0), atol=1e-4)


def test_traj_weight_extremes_and_errors():
  ids = tl.turn_ids_from_mask(MASK, 3)
  tm = tl.turn_mask_from_ids(ids, 3)
  only_traj = dl.dual_level_advantages(R_TURN, tm, ids, MASK, GROUPS, 2, traj_weight=1.0)[0]
  np.testing.assert_allclose(only_traj[0], _z([1, 1, 0.5], 0) * MASK[0], atol=1e-5)
  only_turn = dl.dual_level_advantages(R_TURN, tm, ids, MASK, GROUPS, 2, traj_weight=0.0)[0]
  np.testing.assert_allclose(only_turn[4], [_z([0.81, 0.2, 0.2], 1), 0, 0, 0, 0, 0], atol=1e-5)
  with pytest.raises(ValueError, match="traj_weight"):
    dl.dual_level_advantages(R_TURN, tm, ids, MASK, GROUPS, 2, traj_weight=1.5)


def test_per_turn_group_normalize_no_scale():
  v = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)
  tm = np.array([[1, 1], [1, 0]], np.float32)
  out = dl.per_turn_group_normalize(v, tm, np.array([0, 0]), 1, scale=False)
  np.testing.assert_allclose(out, [[-1.0, 2.0], [1.0, 0.0]])   # turn 1 singleton: mean 0
