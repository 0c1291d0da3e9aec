"""Host-side helpers of the dense-reward method experiments (no flags, no model): contrastive pairs for
the implicit PRM, best-of-N reranking metrics, and the rule-based reward functions of the
Fine-Grained RLHF experiment. Kept flag-free so tests can import them next to other experiments.
"""
from __future__ import annotations

import collections
import re

import numpy as np


def contrastive_pairs(acc: np.ndarray, n: int) -> tuple:
  """(w, l) row indices: every correct x incorrect pair within each group of n rows."""
  w, l = [], []
  for g in range(len(acc) // n):
    rows = np.arange(g * n, (g + 1) * n)
    pos, neg = rows[acc[rows] > 0.5], rows[acc[rows] <= 0.5]
    for i in pos:
      for j in neg:
        w.append(i)
        l.append(j)
  return np.asarray(w, np.int32), np.asarray(l, np.int32)


def majority_vote_correct(answers, golds) -> float:
  votes = collections.Counter(a for a in answers if a is not None)
  if not votes:
    return 0.0
  top = max(votes.values())
  choice = next(a for a in answers if a is not None and votes[a] == top)  # first of the modes
  return float(str(choice) == str(golds[0]).strip())


def rerank_report(scores: np.ndarray, acc: np.ndarray, answers, golds, n: int) -> dict:
  p = len(acc) // n
  s, a = scores.reshape(p, n), acc.reshape(p, n)
  best = np.argmax(s, axis=1)  # ties -> first sample
  return {
      "best_of_n_prm": float(a[np.arange(p), best].mean()),
      "majority_vote": float(np.mean([majority_vote_correct(answers[i * n:(i + 1) * n],
                                                            golds[i * n:(i + 1) * n])
                                      for i in range(p)])),
      "random_choice": float(a.mean()),
      "oracle_pass_at_n": float(a.max(axis=1).mean()),
      "frac_groups_with_tied_top_score": float(np.mean(
          (s == s.max(axis=1, keepdims=True)).sum(axis=1) > 1)),
  }


_SUB_END = re.compile(r"[.,!?:\n]")
_SENT_END = re.compile(r"[.!?\n]")
_EQ = re.compile(r"(-?\d+)\s*([+\-*x×])\s*(-?\d+)\s*=\s*(-?\d+)")
_ANS = re.compile(r"answer is\s*:?\s*(-?\d+)", re.I)


def segment_ends(token_texts, pattern) -> list:
  """Indices of tokens whose text matches `pattern`, plus the last token (host side)."""
  ends = [i for i, s in enumerate(token_texts) if pattern.search(s)]
  if token_texts and (not ends or ends[-1] != len(token_texts) - 1):
    ends.append(len(token_texts) - 1)
  return ends


def _segments(token_texts, ends):
  out, start = [], 0
  for e in ends:
    out.append("".join(token_texts[start:e + 1]))
    start = e + 1
  return out


def relevance_judgments(token_texts) -> tuple:
  ends = segment_ends(token_texts, _SUB_END)
  seen, oks = set(), []
  for seg in _segments(token_texts, ends):
    key = seg.strip().lower()
    oks.append(bool(re.search(r"\d|answer", key)) and key not in seen)
    seen.add(key)
  return ends, oks, [True] * len(ends)


def factuality_judgments(token_texts, gold: str) -> tuple:
  ends = segment_ends(token_texts, _SENT_END)
  oks, valid = [], []
  for seg in _segments(token_texts, ends):
    m_eq, m_ans = _EQ.search(seg), _ANS.search(seg)
    if m_eq:
      a, op, b, c = m_eq.groups()
      a, b, c = int(a), int(b), int(c)
      val = a + b if op == "+" else a - b if op == "-" else a * b
      oks.append(val == c); valid.append(True)
    elif m_ans:
      oks.append(m_ans.group(1) == str(gold).strip()); valid.append(True)
    else:
      oks.append(False); valid.append(False)
  return ends, oks, valid


def pack(rows, width: int) -> tuple:
  """List of (ends, oks, valid) per row -> padded [B, J] arrays."""
  j = max(1, max(len(r[0]) for r in rows))
  end = np.zeros((len(rows), j), np.int32)
  ok = np.zeros((len(rows), j), bool)
  valid = np.zeros((len(rows), j), np.float32)
  for b, (e, o, v) in enumerate(rows):
    end[b, :len(e)] = e
    ok[b, :len(o)] = o
    valid[b, :len(v)] = v
  return end, ok, valid
