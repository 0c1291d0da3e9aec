"""Turn-level rewards for multi-turn (tool-integrated / search) rollouts: MatchTIR and IGPO.

Turns. In a multi-turn rollout the response `[B, T]` interleaves assistant turns (mask = 1) with tool /
environment outputs (mask = 0). A turn is a maximal run of `mask = 1`; `turn_ids [B, T]` gives each
token's 0-based turn index (-1 on masked tokens) with a static maximum `K = num_turns`, and
`turn_mask [B, K]` marks the turns that exist.

MatchTIR (arXiv 2601.10712): predicted tool calls are matched to ground-truth calls;
each call is rewarded by the similarity of its match, a turn by the mean of its calls (the answer turn
by token-set F1 of the answer). Matching modes:
  * "greedy"    - the official code's `hungarian_assignment` (it is greedy: pairs sorted by
                  similarity, accepted if both ends are free and s > 0). Pure JAX.
  * "hungarian" - a true optimal assignment (maximum total similarity), solved on the host with
                  `scipy.optimize.linear_sum_assignment` through `jax.pure_callback` (jit-safe,
                  runs on CPU). Matches with s = 0 count as unmatched.
  * "sinkhorn"  - entropic optimal transport with uniform marginals (1/P, 1/G), cost -S, reg 0.1;
                  call reward sum_g T[p, g] S[p, g]. Pure JAX (log domain).

IGPO (arXiv 2510.14967): information-gain turn rewards
  p_k = exp(mean_j log pi(a_j | q, turns < k, a_<j)),  r_k = p_{k+1} - p_k (non-final turns),
  final turn r = alpha * F1(pred, gold); its advantages are `jaxrl_dense.advantages.igpo_advantages`
  (`advantages/turn_level.py`; code and paper variants).

Official code: quchangle1/MatchTIR `Code/verl/utils/reward_score/tool.py` (`hungarian_assignment`,
`compute_process_KM`, `compute_process_ot`); GuoqingWang1/IGPO `scrl/llm_agent/generation.py`
(per-turn gold-answer probability), `verl/utils/reward_score/info_gain.py` (reward placement).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_dense import _moved, ops
from jaxrl_dense.ops import broadcast_turns, place_turn_rewards, turn_ids_from_mask, turn_mask_from_ids

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "turn_ids_from_mask",
    "turn_mask_from_ids",
    "broadcast_turns",
    "place_turn_rewards",
    "tool_call_similarity",
    "similarity_matrix",
    "assignment_call_rewards",
    "turn_rewards_from_calls",
    "token_f1",
    "extract_answer",
    "answer_likelihood",
    "information_gain_turn_rewards",
]


# ----------------------------------------------------------------------------------------------
# Turn machinery.


# `turn_ids_from_mask`, `turn_mask_from_ids`, `broadcast_turns` and `place_turn_rewards` live in
# `jaxrl_dense.ops` (shared with `advantages/`) and are imported above under the same names.


# ----------------------------------------------------------------------------------------------
# MatchTIR: call similarity (host side string/dict work).


def _key_jaccard(keys_p: Sequence[str], keys_g: Sequence[str]) -> float:
  if list(keys_p) == list(keys_g):
    return 1.0  # includes both empty
  if not keys_p or not keys_g:
    return 0.0
  a, b = collections.Counter(keys_p), collections.Counter(keys_g)
  inter = sum((a & b).values())
  return inter / (len(keys_p) + len(keys_g) - inter)


def tool_call_similarity(pred: Mapping[str, Any], gold: Mapping[str, Any]) -> float:
  """MatchTIR call similarity s(p, g) in [0, 1] (host side).

  s = 0 if the tool names differ (case-insensitive); otherwise
  s = (1 + J(keys_p, keys_g) + #{k in gold : pred[k] == gold[k]}) / (2 + |params_g|),
  J = multiset Jaccard |A n B| / (|A| + |B| - |A n B|), 1 if the key lists are equal (incl. both
  empty), 0 if exactly one is empty.

  Args:
    pred, gold: `{"name": str, "arguments": dict}`.
  """
  for nm, c in (("pred", pred), ("gold", gold)):
    if not isinstance(c, Mapping) or "name" not in c:
      raise ValueError(f"{nm} must be a mapping with a 'name' key, got {c!r}.")
  if str(pred["name"]).strip().lower() != str(gold["name"]).strip().lower():
    return 0.0
  ap = dict(pred.get("arguments") or {})
  ag = dict(gold.get("arguments") or {})
  j = _key_jaccard(list(ap.keys()), list(ag.keys()))
  same = sum(1 for k, v in ag.items() if k in ap and ap[k] == v)
  return (1.0 + j + same) / (2.0 + len(ag))


def similarity_matrix(preds: Sequence[Sequence[Mapping[str, Any]]],
                      golds: Sequence[Sequence[Mapping[str, Any]]], max_pred: int,
                      max_gold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Host-side padded similarity tensor for a batch.

  Returns:
    sim float32 `[B, P, G]`, pred_valid float32 `[B, P]`, gold_valid float32 `[B, G]`.
  """
  if len(preds) != len(golds):
    raise ValueError(f"preds and golds need the same batch size, got {len(preds)} and {len(golds)}.")
  B = len(preds)
  sim = np.zeros((B, max_pred, max_gold), np.float32)
  pv = np.zeros((B, max_pred), np.float32)
  gv = np.zeros((B, max_gold), np.float32)
  for b, (ps, gs) in enumerate(zip(preds, golds)):
    if len(ps) > max_pred or len(gs) > max_gold:
      raise ValueError(f"row {b}: {len(ps)} predicted / {len(gs)} gold calls exceed max_pred="
                       f"{max_pred} / max_gold={max_gold}.")
    pv[b, :len(ps)] = 1
    gv[b, :len(gs)] = 1
    for i, p in enumerate(ps):
      for j, g in enumerate(gs):
        sim[b, i, j] = tool_call_similarity(p, g)
  return sim, pv, gv


# ----------------------------------------------------------------------------------------------
# MatchTIR: assignments.


def _greedy_match(sim: Array) -> Array:
  """Greedy matching on `[P, G]` (invalid entries already <= 0): returns match indicator [P, G]."""
  P, G = sim.shape

  def body(_, carry):
    matched, row_free, col_free = carry
    avail = jnp.where(row_free[:, None] & col_free[None, :], sim, -jnp.inf)  # [P, G]
    flat = jnp.argmax(avail.reshape(-1))  # first maximum = stable row-major tie-break
    best = avail.reshape(-1)[flat]
    ok = best > 0
    i, j = flat // G, flat % G
    matched = matched.at[i, j].set(matched[i, j] | ok)
    row_free = row_free.at[i].set(row_free[i] & ~ok)
    col_free = col_free.at[j].set(col_free[j] & ~ok)
    return matched, row_free, col_free

  init = (jnp.zeros((P, G), bool), jnp.ones((P,), bool), jnp.ones((G,), bool))
  matched, _, _ = lax.fori_loop(0, min(P, G), body, init)
  return matched


def _hungarian_host(sim: np.ndarray) -> np.ndarray:
  import scipy.optimize  # host only

  sim = np.asarray(sim, np.float64)
  out = np.zeros(sim.shape, bool)
  for b in range(sim.shape[0]):
    rows, cols = scipy.optimize.linear_sum_assignment(sim[b], maximize=True)
    keep = sim[b, rows, cols] > 0
    out[b, rows[keep], cols[keep]] = True
  return out


def _sinkhorn_plan(sim: Array, pv: Array, gv: Array, reg: float, iters: int) -> Array:
  """Entropic OT plan on `[P, G]` with uniform marginals over the valid rows / columns."""
  n_p = jnp.maximum(jnp.sum(pv), 1.0)
  n_g = jnp.maximum(jnp.sum(gv), 1.0)
  log_a = jnp.where(pv > 0, -jnp.log(n_p), -jnp.inf)  # [P]
  log_b = jnp.where(gv > 0, -jnp.log(n_g), -jnp.inf)  # [G]
  valid = (pv[:, None] > 0) & (gv[None, :] > 0)  # [P, G]
  log_k = jnp.where(valid, sim / reg, -jnp.inf)  # [P, G]  (cost = -S)

  def lse(x, axis):
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.squeeze(m, axis) + jnp.log(jnp.sum(jnp.exp(x - m), axis=axis))

  def body(_, fg):
    f, g = fg
    f = jnp.where(pv > 0, log_a - lse(log_k + g[None, :], 1), 0.0)
    g = jnp.where(gv > 0, log_b - lse(log_k + f[:, None], 0), 0.0)
    return f, g

  f, g = lax.fori_loop(0, iters, body, (jnp.zeros_like(pv), jnp.zeros_like(gv)))
  plan = jnp.exp(log_k + f[:, None] + g[None, :])  # [P, G]
  return jnp.where(valid, plan, 0.0)


def assignment_call_rewards(sim: ArrayLike, pred_valid: ArrayLike, gold_valid: ArrayLike,
                            mode: str = "greedy", unmatched_penalty: float = 0.0,
                            reg: float = 0.1, iters: int = 100) -> Array:
  """MatchTIR per-call rewards from a predicted-vs-gold similarity matrix.

  hard modes ("greedy", "hungarian"): r[b, p] = S[b, p, g*(p)] for a matched call, else
    `unmatched_penalty` (0 in MatchTIR's training reward, -0.5 in its function default).
  "sinkhorn": r[b, p] = sum_g T[b, p, g] S[b, p, g] with T the entropic OT plan (uniform marginals
    1/P_b, 1/G_b over valid calls, cost -S, regulariser `reg`).
  Invalid (padding) predictions get 0. No gold calls: every valid prediction is unmatched.

  Args:
    sim: `[B, P, G]` similarities in [0, 1].
    pred_valid: `[B, P]`; gold_valid: `[B, G]`.

  Returns:
    `[B, P]` float32 (stop-gradient).
  """
  sim = jnp.asarray(sim, jnp.float32)
  pv = jnp.asarray(pred_valid, jnp.float32)
  gv = jnp.asarray(gold_valid, jnp.float32)
  chex.assert_rank(sim, 3)
  chex.assert_rank([pv, gv], 2)
  chex.assert_shape(pv, sim.shape[:2])
  chex.assert_shape(gv, (sim.shape[0], sim.shape[2]))
  valid = (pv[:, :, None] > 0) & (gv[:, None, :] > 0)  # [B, P, G]
  s = jnp.where(valid, sim, 0.0)  # [B, P, G]
  if mode == "sinkhorn":
    plan = jax.vmap(lambda a, b, c: _sinkhorn_plan(a, b, c, reg, iters))(s, pv, gv)  # [B, P, G]
    r = jnp.sum(plan * s, axis=2)  # [B, P]
    return lax.stop_gradient(r * pv)
  if mode == "greedy":
    matched = jax.vmap(_greedy_match)(s)  # [B, P, G]
  elif mode == "hungarian":
    matched = jax.pure_callback(_hungarian_host, jax.ShapeDtypeStruct(s.shape, jnp.bool_), s,
                                vmap_method="sequential")
  else:
    raise ValueError(f"mode must be 'greedy', 'hungarian' or 'sinkhorn', got {mode!r}.")
  has = jnp.any(matched, axis=2)  # [B, P]
  r = jnp.where(has, jnp.sum(jnp.where(matched, s, 0.0), axis=2), unmatched_penalty)  # [B, P]
  return lax.stop_gradient(r * pv)


def turn_rewards_from_calls(r_call: ArrayLike, call_turn: ArrayLike, pred_valid: ArrayLike,
                            num_turns: int, answer_turn_score: ArrayLike | None = None,
                            answer_turn: ArrayLike | None = None) -> Array:
  """Turn reward = mean of its calls' rewards; the answer turn gets the answer score (F1).

  r_turn[b, k] = mean_{p: call_turn[b,p] = k, valid} r_call[b, p]   (0 for a turn without calls)
  r_turn[b, answer_turn[b]] = answer_turn_score[b]   (replaces; answer_turn < 0 means no answer)

  Args:
    r_call: `[B, P]`; call_turn: int `[B, P]` turn of each call; pred_valid: `[B, P]`.
    num_turns: static K.
    answer_turn_score: optional `[B]`; answer_turn: optional int `[B]`.

  Returns:
    `[B, K]` float32.
  """
  r_call = jnp.asarray(r_call, jnp.float32)
  call_turn = jnp.asarray(call_turn)
  pv = jnp.asarray(pred_valid, jnp.float32)
  chex.assert_rank([r_call, call_turn, pv], 2)
  chex.assert_equal_shape([r_call, call_turn, pv])
  ids = jnp.where(pv > 0, call_turn, -1)  # [B, P]
  oh = (ids[:, :, None] == jnp.arange(num_turns)[None, None, :]).astype(jnp.float32)  # [B, P, K]
  tot = jnp.einsum("bp,bpk->bk", r_call, oh)  # [B, K]
  cnt = jnp.sum(oh, axis=1)  # [B, K]
  r_turn = jnp.where(cnt > 0, tot / jnp.maximum(cnt, 1.0), 0.0)  # [B, K]
  if answer_turn_score is not None:
    if answer_turn is None:
      raise ValueError("answer_turn is required with answer_turn_score.")
    sc = jnp.asarray(answer_turn_score, jnp.float32)
    at = jnp.asarray(answer_turn)
    chex.assert_shape([sc, at], (r_call.shape[0],))
    is_ans = at[:, None] == jnp.arange(num_turns)[None, :]  # [B, K]
    r_turn = jnp.where(is_ans, sc[:, None], r_turn)
  return r_turn


def _normalize_answer(s: str) -> list[str]:
  s = s.lower()
  s = "".join(" " if ch in string.punctuation else ch for ch in s)
  return s.split()


def token_f1(pred: str, gold: str) -> float:
  """Token-set F1 between two strings (lower-cased, punctuation -> space), host side."""
  p, g = set(_normalize_answer(pred)), set(_normalize_answer(gold))
  common = len(p & g)
  if common == 0:
    return 0.0
  prec, rec = common / len(p), common / len(g)
  return 2 * prec * rec / (prec + rec)


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(text: str) -> str | None:
  """Last `<answer>...</answer>` span of a response, or None."""
  found = _ANSWER_RE.findall(text)
  return found[-1].strip() if found else None


# ----------------------------------------------------------------------------------------------
# IGPO.


def answer_likelihood(logp_answer: ArrayLike, answer_mask: ArrayLike) -> Array:
  """p_k = exp(mean_j log pi(a_j | q, turns < k, a_<j))  (`[B, K1, A] -> [B, K1]`).

  Rows with no answer tokens (e.g. truncated) get p = 0.
  """
  lp = jnp.asarray(logp_answer, jnp.float32)
  am = jnp.asarray(answer_mask, jnp.float32)
  chex.assert_rank([lp, am], 3)
  chex.assert_equal_shape([lp, am])
  cnt = jnp.sum(am, axis=2)  # [B, K1]
  mean = jnp.sum(lp * am, axis=2) / jnp.maximum(cnt, 1.0)  # [B, K1]
  return lax.stop_gradient(jnp.where(cnt > 0, jnp.exp(mean), 0.0))


def information_gain_turn_rewards(p: ArrayLike, turn_mask: ArrayLike, outcome: ArrayLike,
                                  outcome_weight: float = 1.0) -> Array:
  """IGPO turn rewards.

  With n_b = sum_k turn_mask[b, k] turns (a prefix) and p[b, k] the gold-answer likelihood after k
  completed turns (k = 0: prompt only):
    r[b, k] = p[b, k+1] - p[b, k]        for k < n_b - 1
    r[b, n_b - 1] = outcome_weight * outcome[b]    (F1 of the final answer)
    r[b, k] = 0                          for k >= n_b
  A 1-turn trajectory gets the outcome only.

  Args:
    p: `[B, K + 1]` (or wider) likelihoods; turn_mask: `[B, K]`; outcome: `[B]`.

  Returns:
    `[B, K]` float32 (stop-gradient).
  """
  p = jnp.asarray(p, jnp.float32)
  tm = jnp.asarray(turn_mask, jnp.float32)
  o = jnp.asarray(outcome, jnp.float32)
  chex.assert_rank([p, tm], 2)
  chex.assert_rank(o, 1)
  B, K = tm.shape
  if p.shape[0] != B or p.shape[1] < K:
    raise ValueError(f"p must have shape [B, >= K] = [{B}, >= {K}] (K + 1 to give gains for all "
                     f"turns), got {p.shape}.")
  chex.assert_shape(o, (B,))
  p = jnp.pad(p, ((0, 0), (0, max(0, K + 1 - p.shape[1]))))[:, :K + 1]  # [B, K+1]
  gain = p[:, 1:] - p[:, :-1]  # [B, K]
  n = jnp.sum(tm, axis=1).astype(jnp.int32)  # [B]
  k = jnp.arange(K)[None, :]
  r = jnp.where(k < (n - 1)[:, None], gain, 0.0)
  r = jnp.where(k == (n - 1)[:, None], outcome_weight * o[:, None], r)
  return lax.stop_gradient(r * tm)


# Deprecated alias (one release): IGPO's advantages are an advantage estimator.
__getattr__ = _moved.moved_names(__name__, {"igpo_advantages": "jaxrl_dense.advantages.igpo_advantages"})
