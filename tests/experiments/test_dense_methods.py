"""Host-side pieces of the tier-1 experiments (no model): pairs, reranking metrics, rule rewards."""
import numpy as np

from tests.experiments._experiment_module import load_experiment

dr = load_experiment("dense_rules")


def test_contrastive_pairs():
  acc = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0], np.float32)
  w, l = dr.contrastive_pairs(acc, 3)
  assert list(zip(w, l)) == [(0, 1), (0, 2), (7, 6), (7, 8)]   # group 2 (all correct): no pair


def test_rerank_report():
  scores = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.0])
  acc = np.array([0, 1, 0, 0, 1, 1], np.float32)
  answers = [5, 7, 5, 4, 4, None]
  golds = ["7"] * 3 + ["4"] * 3
  rep = dr.rerank_report(scores, acc, answers, golds, 3)
  assert rep["best_of_n_prm"] == 0.5            # picks row 1 (correct) and row 3 (tie -> first, wrong)
  assert rep["majority_vote"] == 0.5            # group 0 votes 5 (wrong); group 1 votes 4 (right)
  np.testing.assert_allclose(rep["random_choice"], 0.5)
  assert rep["oracle_pass_at_n"] == 1.0
  assert rep["frac_groups_with_tied_top_score"] == 0.5
  assert dr.majority_vote_correct([None, None], ["1", "1"]) == 0.0


def test_rule_rewards():
  toks = ["3", " +", " 4", " =", " 8", ".", " The", " answer", " is", " 7", ".", " Bye", "!"]
  ends, ok, valid = dr.factuality_judgments(toks, "7")
  assert ends == [5, 10, 12]
  assert ok[:2] == [False, True] and valid == [True, True, False]   # wrong equation, right answer
  ends, ok, valid = dr.relevance_judgments(toks)
  assert ends == [5, 10, 12] and ok == [True, True, False]
  # repeats are irrelevant; a response without a final delimiter still ends a segment
  ends, ok, _ = dr.relevance_judgments(["1", ".", "1", ".", "2"])
  assert ends == [1, 3, 4] and ok == [True, False, True]
  e, o, v = dr.pack([(ends, ok, [True] * 3), ([0], [False], [True])], 5)
  np.testing.assert_array_equal(e, [[1, 3, 4], [0, 0, 0]])
  np.testing.assert_array_equal(v, [[1, 1, 1], [1, 0, 0]])
