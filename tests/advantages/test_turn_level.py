"""MatchTIR turn rewards (arXiv 2601.10712) and IGPO information gain (arXiv 2510.14967): hand-computed values."""
import functools
import math

import jax
import numpy as np
import pytest

from jaxrl_dense.advantages import igpo_advantages
from jaxrl_dense.rewards import turn_level as tl


def _maybe_jit(fn, jit, **static):
  f = functools.partial(fn, **static)
  return jax.jit(f) if jit else f


# ------------------------------------------------------------------------------------ turns


def test_turn_ids_from_mask_and_placement():
  mask = np.array([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0]], np.float32)
  ids = tl.turn_ids_from_mask(mask, 3)
  np.testing.assert_array_equal(ids, [[0, 0, -1, 1, -1, 2], [-1, 0, 0, 0, -1, -1]])
  # runs beyond num_turns are dropped (-1)
  np.testing.assert_array_equal(tl.turn_ids_from_mask(mask, 2)[0], [0, 0, -1, 1, -1, -1])
  np.testing.assert_array_equal(tl.turn_mask_from_ids(ids, 3), [[1, 1, 1], [1, 0, 0]])
  r = tl.place_turn_rewards(np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]), ids, mask)
  np.testing.assert_allclose(r, [[0, 0.1, 0, 0.2, 0, 0.3], [0, 0, 0, 0.4, 0, 0]], atol=1e-7)
  np.testing.assert_allclose(tl.broadcast_turns(np.array([[1.0, 2, 3], [4, 5, 6]]), ids),
                             [[1, 1, 0, 2, 0, 3], [0, 4, 4, 4, 0, 0]])


# ------------------------------------------------------------------------------------ MatchTIR


def test_tool_call_similarity_hand():
  g = {"name": "Search", "arguments": {"q": "paris", "k": 3}}
  assert tl.tool_call_similarity({"name": "search", "arguments": {"q": "paris", "k": 5}}, g) == 0.75
  assert tl.tool_call_similarity({"name": "lookup", "arguments": {"q": "paris", "k": 3}}, g) == 0.0
  assert tl.tool_call_similarity({"name": "search", "arguments": {"q": "paris"}}, g) == 2.5 / 4
  assert tl.tool_call_similarity({"name": "search", "arguments": {}}, g) == 1 / 4
  assert tl.tool_call_similarity({"name": "now"}, {"name": "NOW", "arguments": {}}) == 1.0
  # extra predicted key: J = 2/3, both gold values match -> (1 + 2/3 + 2) / 4
  p = {"name": "search", "arguments": {"q": "paris", "k": 3, "lang": "fr"}}
  assert abs(tl.tool_call_similarity(p, g) - (1 + 2 / 3 + 2) / 4) < 1e-12
  with pytest.raises(ValueError, match="pred"):
    tl.tool_call_similarity({"arguments": {}}, g)


def test_similarity_matrix_padding_and_errors():
  preds = [[{"name": "a"}, {"name": "b"}], []]
  golds = [[{"name": "b"}], [{"name": "a"}]]
  sim, pv, gv = tl.similarity_matrix(preds, golds, max_pred=3, max_gold=2)
  assert sim.shape == (2, 3, 2)
  np.testing.assert_allclose(sim[0, :, 0], [0, 1, 0])
  np.testing.assert_array_equal(pv, [[1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(gv, [[1, 0], [1, 0]])
  with pytest.raises(ValueError, match="max_pred"):
    tl.similarity_matrix(preds, golds, max_pred=1, max_gold=2)


SIM = np.array([[[0.9, 0.8], [0.8, 0.0]],       # greedy != optimal
                [[0.0, 0.0], [0.0, 0.5]]],      # first prediction matches nothing
               np.float32)
PV = np.ones((2, 2), np.float32)
GV = np.ones((2, 2), np.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_greedy_vs_optimal_assignment(jit):
  """Paper vs code: the official "hungarian" matcher is greedy; the optimal one differs."""
  greedy = _maybe_jit(tl.assignment_call_rewards, jit, mode="greedy", unmatched_penalty=-0.5)
  hung = _maybe_jit(tl.assignment_call_rewards, jit, mode="hungarian", unmatched_penalty=-0.5)
  # greedy takes (0,0)=0.9 first; prediction 1 is then left with s=0 -> unmatched.
  np.testing.assert_allclose(greedy(SIM, PV, GV), [[0.9, -0.5], [-0.5, 0.5]], atol=1e-6)
  # optimal assignment maximises the total: (0,1) + (1,0) = 1.6 > 0.9.
  np.testing.assert_allclose(hung(SIM, PV, GV), [[0.8, 0.8], [-0.5, 0.5]], atol=1e-6)


def test_assignment_padding_and_no_gold():
  pv = np.array([[1, 0], [1, 1]], np.float32)
  gv = np.array([[1, 1], [0, 0]], np.float32)
  for mode in ("greedy", "hungarian"):
    r = tl.assignment_call_rewards(SIM, pv, gv, mode=mode, unmatched_penalty=-0.5)
    np.testing.assert_allclose(r, [[0.9, 0.0], [-0.5, -0.5]], atol=1e-6)
  r = tl.assignment_call_rewards(SIM, pv, gv, mode="sinkhorn")
  np.testing.assert_allclose(r[1], [0.0, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="mode"):
    tl.assignment_call_rewards(SIM, PV, GV, mode="auction")


def test_greedy_ties_break_row_major():
  sim = np.array([[[0.5, 0.5], [0.5, 0.5]]], np.float32)
  r = tl.assignment_call_rewards(sim, np.ones((1, 2)), np.ones((1, 2)), mode="greedy")
  np.testing.assert_allclose(r, [[0.5, 0.5]])
  # more predictions than gold: the weaker one is unmatched
  sim = np.array([[[0.3], [0.6], [0.1]]], np.float32)
  r = tl.assignment_call_rewards(sim, np.ones((1, 3)), np.ones((1, 1)), mode="greedy")
  np.testing.assert_allclose(r, [[0.0, 0.6, 0.0]])


@pytest.mark.parametrize("jit", [False, True])
def test_sinkhorn_hand(jit):
  f = _maybe_jit(tl.assignment_call_rewards, jit, mode="sinkhorn", reg=0.1, iters=200)
  sim = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.7, 0.0], [0.0, 0.0]]], np.float32)
  pv = np.array([[1, 1], [1, 0]], np.float32)
  gv = np.array([[1, 1], [1, 0]], np.float32)
  r = f(sim, pv, gv)
  # symmetric 2x2 with marginals 1/2: T[p,p] = 0.5 e^10 / (e^10 + 1).
  diag = 0.5 * math.exp(10) / (math.exp(10) + 1)
  # one prediction, one gold: the whole unit mass on the pair.
  np.testing.assert_allclose(r, [[diag, diag], [0.7, 0.0]], rtol=1e-5)


def test_turn_rewards_from_calls_and_f1():
  r_call = np.array([[0.5, 1.0, 0.25, 0.0], [0.8, 0.0, 0.0, 0.0]], np.float32)
  call_turn = np.array([[0, 0, 1, 3], [1, 0, 0, 0]], np.int32)
  pv = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  f1 = tl.token_f1("The answer is 42.", "42")
  assert abs(f1 - 0.4) < 1e-12     # precision 1/4, recall 1
  assert tl.token_f1("Paris, France", "paris france") == 1.0
  assert tl.token_f1("", "x") == 0.0
  assert tl.extract_answer("a <answer> 1 </answer> b <answer>Paris</answer>") == "Paris"
  assert tl.extract_answer("none") is None
  r = tl.turn_rewards_from_calls(r_call, call_turn, pv, 3, answer_turn_score=np.array([f1, 1.0]),
                                 answer_turn=np.array([2, -1]))
  np.testing.assert_allclose(r, [[0.75, 0.25, 0.4], [0.0, 0.8, 0.0]], atol=1e-6)
  with pytest.raises(ValueError, match="answer_turn"):
    tl.turn_rewards_from_calls(r_call, call_turn, pv, 3, answer_turn_score=np.zeros(2))


# ------------------------------------------------------------------------------------ IGPO


def test_answer_likelihood_and_information_gain():
  lp = np.log(np.array([[[0.5, 0.5], [0.25, 1.0]], [[0.9, 0.1], [0.3, 0.3]]], np.float32))
  am = np.array([[[1, 1], [1, 1]], [[1, 0], [0, 0]]], np.float32)
  p = tl.answer_likelihood(lp, am)
  np.testing.assert_allclose(p, [[0.5, 0.5], [0.9, 0.0]], rtol=1e-6)   # geometric mean; empty -> 0

  p = np.array([[0.1, 0.3, 0.2, 0.9], [0.4, 0.9, 0.0, 0.0], [0.5, 0.6, 0.7, 0.8]], np.float32)
  tm = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)
  o = np.array([0.5, 1.0, 0.0], np.float32)
  r = tl.information_gain_turn_rewards(p, tm, o)
  np.testing.assert_allclose(r, [[0.2, -0.1, 0.5],     # gains for non-final turns, F1 last
                                 [1.0, 0.0, 0.0],      # one turn: outcome only
                                 [0.1, 0.0, 0.0]], atol=1e-6)
  with pytest.raises(ValueError, match="p must"):
    tl.information_gain_turn_rewards(p[:, :2], tm, o)


# 2 groups of 3 (rows 3,4 | row 5 is a singleton group), T = 6, tool outputs masked.
IG_MASK = np.array([[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]], np.float32)
IG_R = np.array([[0.2, 1.0, 0], [-0.1, 0.5, 0], [0.0, 0, 0],
                 [1.0, 0, 0], [0.1, 0.2, 0.0], [0.7, 0, 0]], np.float32)
IG_GROUPS = np.array([0, 0, 0, 1, 1, 2], np.int32)


@pytest.mark.parametrize("jit", [False, True])
def test_igpo_code_advantages_hand(jit):
  ids = tl.turn_ids_from_mask(IG_MASK, 3)
  tm = tl.turn_mask_from_ids(ids, 3)
  f = _maybe_jit(igpo_advantages, jit, num_groups=3, variant="code")
  adv = f(IG_R, tm, ids, IG_MASK, IG_GROUPS)[0]
  a, b = 1.6 / 3, 0.4   # group-0 position means at t = 0, 1
  want = np.array([
      [1.2 - a, 1.2 - b, 0, 1.0 - 0.5, 1.0 - 0.5, 0],
      [0.4 - a, 0, 0.5 - 0.5 / 3, 0.5 - 0.5, 0.5 - 0.5, 0.5 - 0.5 / 3],
      [0 - a, 0 - b, 0 - 0.5 / 3, 0, 0, 0],
      [0.35, 0.5, 0.4, 0.5, 0, 0],
      [-0.35, 0, -0.4, 0, 0, 0],
      [0.7, 0.7, 0, 0, 0, 0]])   # singleton group: mean 0
  np.testing.assert_allclose(adv, want, atol=1e-6)


def test_igpo_code_vs_paper_variant():
  """Paper vs code: the code subtracts the position-wise group mean and never divides by the std."""
  ids = tl.turn_ids_from_mask(IG_MASK, 3)
  tm = tl.turn_mask_from_ids(ids, 3)
  code = lambda *a: igpo_advantages(*a, num_groups=3, variant="code")[0]
  paper = lambda *a: igpo_advantages(*a, num_groups=3, variant="paper")[0]
  a1, a3 = code(IG_R, tm, ids, IG_MASK, IG_GROUPS), code(3 * IG_R, tm, ids, IG_MASK, IG_GROUPS)
  np.testing.assert_allclose(a3, 3 * np.asarray(a1), atol=1e-5)           # no std: scales
  p1, p3 = paper(IG_R, tm, ids, IG_MASK, IG_GROUPS), paper(3 * IG_R, tm, ids, IG_MASK, IG_GROUPS)
  # z-scored: invariant (row 5 is a singleton group: mean 0, std 1, so it scales)
  np.testing.assert_allclose(np.asarray(p3)[:5], np.asarray(p1)[:5], atol=1e-4)
  np.testing.assert_allclose(np.asarray(p3)[5], 3 * np.asarray(p1)[5], atol=1e-4)
  # paper variant by hand for row 4 (group 1 = rows 3, 4; valid turn rewards {1.0, 0.1, 0.2, 0.0}).
  vals = np.array([1.0, 0.1, 0.2, 0.0])
  mu, sd = vals.mean(), vals.std(ddof=1)
  z = (np.array([0.1, 0.2, 0.0]) - mu) / (sd + 1e-6)
  g = [z.sum(), z[1:].sum(), z[2]]
  np.testing.assert_allclose(p1[4], [g[0], 0, g[1], 0, g[2], 0], atol=1e-5)
  with pytest.raises(ValueError, match="variant"):
    igpo_advantages(IG_R, tm, ids, IG_MASK, IG_GROUPS, 3, variant="other")
