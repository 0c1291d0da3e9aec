"""Multi-turn RL: the turn rewards of multi-turn episodes (MatchTIR, IGPO), on the host.

The episodes themselves (the policy acts, an environment answers, the policy acts again) are
rolled out by `jaxrl_dense.sampling.multiturn` (`rollout_turns`, `rollout_turns_paused`), whose
names this module also hands on, so that `rl.multiturn.rollout_turns` stays the trainer's one
entry (tests replace it here). The evaluation uses the sampling module directly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxrl_dense.sampling.multiturn import (GenerateFn, RunEpisodesFn, TurnRollout, model_text, reprefill_tokens,
                                            rollout_turns, rollout_turns_paused, stop_candidates, stop_cut,
                                            turn_texts_of)

__all__ = ["TurnRollout", "stop_cut", "stop_candidates", "rollout_turns", "rollout_turns_paused", "reprefill_tokens", "model_text", "turn_texts_of", "matchtir_turn_rewards",
           "answer_probe_batch", "igpo_turn_rewards"]


def matchtir_turn_rewards(turn_texts: Sequence[Sequence[str]], gold_calls: Sequence, outcome, *,
                          num_turns: int, parse_calls: Callable[[str], list], mode: str = "greedy",
                          unmatched_penalty: float = 0.0) -> np.ndarray:
  """MatchTIR turn rewards [N, K] (arXiv 2601.10712; host side).

  The predicted calls of each row (every call of every turn, `parse_calls(turn text)`) are
  matched to the row's gold calls (`rewards.turn_level.assignment_call_rewards`, greedy = the
  official code); a turn's reward is the mean of its calls' rewards; the answer turn (the last
  one) gets the outcome label instead (for verifiable math the verifier's label plays the role
  of MatchTIR's answer F1). Turns without calls and beyond the row's turns get 0.
  """
  from jaxrl_dense.rewards import turn_level  # pylint: disable=import-outside-toplevel
  N = len(turn_texts)
  # Argument values compare after whitespace is removed ("8 - 3" is the call "8-3").
  canon = lambda c: {"name": c["name"], "arguments": {k: "".join(str(v).split())
                                                      for k, v in dict(c.get("arguments") or {}).items()}}
  preds, call_turn = [], []
  for texts in turn_texts:
    row, where = [], []
    for k, t in enumerate(texts[:num_turns]):
      calls = [canon(c) for c in parse_calls(t)]
      row += calls
      where += [k] * len(calls)
    preds.append(row)
    call_turn.append(where)
  P = max(1, max(len(p) for p in preds))
  golds = [[canon(c) for c in (gc or [])] for gc in gold_calls]
  Gt = max(1, max(len(gc) for gc in golds))
  sim, pv, gv = turn_level.similarity_matrix(preds, golds, P, Gt)  # [N, P, Gt], [N, P], [N, Gt]
  ct = np.full((N, P), -1, np.int32)
  for b, where in enumerate(call_turn):
    ct[b, :len(where)] = where
  r_call = np.asarray(turn_level.assignment_call_rewards(sim, pv, gv, mode=mode,
                                                         unmatched_penalty=unmatched_penalty))
  nt = np.asarray([min(len(t), num_turns) for t in turn_texts], np.int32)
  answer_turn = np.maximum(nt - 1, 0)
  out = np.asarray(turn_level.turn_rewards_from_calls(r_call, ct, pv, num_turns, np.asarray(outcome, np.float32),
                                                      answer_turn), np.float32)
  k = np.arange(num_turns)[None, :]
  return np.where(k < nt[:, None], out, 0.0).astype(np.float32)


def answer_probe_batch(prompt_tokens, prompt_mask, tokens, turn_ids, answer_ids: Sequence[Sequence[int]], *,
                       num_turns: int, pad_id: int = 0, bucket: int = 64) -> tuple:
  """IGPO's probe sequences: for row b and k = 0..K−1, the context after k completed turns
  (the prompt and every response token before turn k's first token: turns < k and their
  observations) followed by the row's gold-answer ids.

  Returns (context [B·K, W] left-padded, context_mask, answer [B·K, A] right-padded, answer_mask
  float32, valid [B, K]) with W and A rounded up to `bucket`; valid[b, k] = turn k exists (the
  other probes repeat k = 0 and are ignored). Host numpy."""
  pt, pm = np.asarray(prompt_tokens), np.asarray(prompt_mask)
  tok, tid = np.asarray(tokens), np.asarray(turn_ids)
  B = tok.shape[0]
  ctxs, valid = [], np.zeros((B, num_turns), bool)
  for b in range(B):
    prompt = pt[b][pm[b] > 0].tolist()
    for k in range(num_turns):
      pos = np.flatnonzero(tid[b] == k)
      valid[b, k] = pos.size > 0
      start = int(pos[0]) if pos.size else 0
      ctxs.append(prompt + tok[b, :start].tolist())
  up = lambda x: max(bucket, -(-x // bucket) * bucket)
  W = up(max(len(c) for c in ctxs))
  A = up(max(1, max(len(a) for a in answer_ids)))
  ct = np.full((B * num_turns, W), pad_id, np.int32)
  cm = np.zeros((B * num_turns, W), np.int32)
  at = np.full((B * num_turns, A), pad_id, np.int32)
  am = np.zeros((B * num_turns, A), np.float32)
  for j, c in enumerate(ctxs):
    ct[j, W - len(c):], cm[j, W - len(c):] = c, 1
    a = list(answer_ids[j // num_turns])[:A]
    at[j, :len(a)], am[j, :len(a)] = a, 1.0
  return ct, cm, at, am, valid


def igpo_turn_rewards(score_fn: Callable, prompt_tokens, prompt_mask, tokens, turn_ids, answer_ids, outcome, *,
                      num_turns: int, pad_id: int = 0, bucket: int = 64) -> tuple:
  """IGPO turn rewards [B, K] (arXiv 2510.14967) and the likelihoods p [B, K].

  p[b, k] = exp(mean_j log π(a_j | q, turns < k, a_<j)): the policy's (`score_fn(context,
  context_mask, answer, answer_mask) -> logp [M, A]`, a teacher-forced pass) probability of the
  gold answer after k completed turns; then `rewards.turn_level.information_gain_turn_rewards`:
  r_k = p_{k+1} − p_k on non-final turns, the outcome on the final turn."""
  from jaxrl_dense.rewards import turn_level  # pylint: disable=import-outside-toplevel
  ct, cm, at, am, valid = answer_probe_batch(prompt_tokens, prompt_mask, tokens, turn_ids, answer_ids,
                                             num_turns=num_turns, pad_id=pad_id, bucket=bucket)
  B = valid.shape[0]
  logp = np.asarray(score_fn(ct, cm, at, am), np.float32).reshape(B, num_turns, -1)
  p = np.asarray(turn_level.answer_likelihood(logp, am.reshape(B, num_turns, -1)))  # [B, K]
  p = np.where(valid, p, 0.0)
  r = turn_level.information_gain_turn_rewards(p, valid.astype(np.float32), np.asarray(outcome, np.float32))
  return np.asarray(r, np.float32), p.astype(np.float32)
