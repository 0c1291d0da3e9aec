"""The implicit PRM on decoded responses (PRIME, arXiv 2502.01456; Yuan et al., arXiv 2412.01981):
token rewards beta * (log pi_prm - log pi_ref) of responses re-tokenised after their prompt, their
sums per response and per reasoning step, and the PRM's held-out AUROC on an eval's responses.

`implicit_prm_sequence_reward(prm_logp, ref_logp, mask, beta)` r = beta * sum log(pi_prm/pi_ref);
`implicit_prm_rewards(prm_params, ref_params, ...)` computes it for decoded responses (and,
    with `token_rewards=True`, the token rewards a heatmap page draws);
`implicit_prm_step_rewards(...)` the same token rewards with the step of every token, from the
    responses' step character spans (`prm_health.step_scores` turns them into step scores);
`heldout_prm_auroc(prm_params, ref_params, ..., problems)` AUROC of r against the verifier's
    labels on an eval's responses (the trainer's eval/prm_auroc and experiments/prm_auroc.py).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from jaxrl_dense import _deprecation
from jaxrl_dense.data import batching


@_deprecation.renamed_kwargs(logp_prm="prm_logp", logp_ref="ref_logp")
def implicit_prm_sequence_reward(prm_logp: Any, ref_logp: Any, mask: Any, *,
                                 beta: float = 0.05) -> np.ndarray:
  """r_i = beta * sum_t m[i, t] (log pi_phi - log pi_ref)[i, t]: the implicit PRM's outcome reward
  (PRIME Eq. 3 summed over the response; arXiv 2412.01981). [B, T] x3 -> [B] float64."""
  lp, lr, m = (np.asarray(x, np.float64) for x in (prm_logp, ref_logp, mask))
  if lp.ndim != 2 or lp.shape != lr.shape or lp.shape != m.shape:
    raise ValueError(f"implicit_prm_sequence_reward: prm_logp {lp.shape}, ref_logp {lr.shape} "
                     f"and mask {m.shape} must be equal [B, T] shapes")
  return beta * np.sum((lp - lr) * m, axis=1)


def implicit_prm_rewards(prm_params: Any, ref_params: Any, config: Any, tokenizer: Any,
                         records: Sequence[Any], responses: Sequence[Sequence[str]], *,
                         beta: float = 0.05, batch_size: int = 16,
                         encoder: Optional[batching.PromptEncoder] = None,
                         max_prompt_length: int = 1024, truncated: Any = None,
                         token_rewards: bool = False):
  """Implicit-PRM sequence rewards [N, k] of decoded responses (re-tokenised after the prompt).

  Each row is the left-padded chat prompt followed by the response's tokens (+ the first EOS id
  unless `truncated[i, j]`), right-padded to the longest response; r = beta * sum over the
  response tokens of (log pi_prm - log pi_ref) (`implicit_prm_sequence_reward`). Rows run in
  fixed batches of `batch_size` (padded), so the scorer compiles once.

  `token_rewards=True` returns `(r [N, k], tokens [N*k, R], mask [N*k, R], q [N*k, R])` with the
  response token ids, their mask and the token rewards beta * (log pi_prm - log pi_ref) (0 on
  padding), rows problem-major: what `viz.write_sample_page` draws.
  """
  from jaxrl_dense.models import logprobs as lp_lib
  if encoder is None:
    encoder = batching.PromptEncoder(tokenizer, max_prompt_length=max_prompt_length)
  if len(records) != len(responses):
    raise ValueError(f"implicit_prm_rewards: {len(records)} records but {len(responses)} "
                     f"response lists")
  k = len(responses[0]) if responses else 0
  if k < 1 or any(len(r) != k for r in responses):
    raise ValueError("implicit_prm_rewards: every problem needs the same number k >= 1 of "
                     "responses")
  eos = int(config.eos_token_ids[0])
  pad = batching.default_pad_id(tokenizer)
  prompts = [encoder.encode(r.prompt_messages) for r in records]
  rows = []
  for i, resp in enumerate(responses):
    for j, text in enumerate(resp):
      ids = batching._encode_text(tokenizer, text)
      if truncated is None or not bool(np.asarray(truncated)[i, j]):
        ids = ids + [eos]
      rows.append((prompts[i], ids or [eos]))
  width_p = max(len(p) for p, _ in rows)
  width_r = max(len(r) for _, r in rows)
  tokens = np.full((len(rows), width_p + width_r), pad, np.int32)  # [N*k, P+R]
  attn = np.zeros_like(tokens)
  rmask = np.zeros_like(tokens, dtype=np.float32)
  for b, (p, r) in enumerate(rows):
    tokens[b, width_p - len(p):width_p] = p
    tokens[b, width_p:width_p + len(r)] = r
    attn[b, width_p - len(p):width_p + len(r)] = 1
    rmask[b, width_p:width_p + len(r)] = 1.0
  out = np.zeros(len(rows), np.float64)
  q_tok = np.zeros((len(rows), width_r), np.float32) if token_rewards else None
  bs = max(1, min(batch_size, len(rows)))
  for start in range(0, len(rows), bs):
    sl = slice(start, start + bs)
    n_real = tokens[sl].shape[0]
    t, a = tokens[sl], attn[sl]
    if n_real < bs:  # pad to the fixed batch by repeating the last row
      t = np.concatenate([t, np.repeat(t[-1:], bs - n_real, 0)])
      a = np.concatenate([a, np.repeat(a[-1:], bs - n_real, 0)])
    lp_prm = np.asarray(lp_lib.token_logprobs(prm_params, config, t, a))[:n_real]
    lp_ref = np.asarray(lp_lib.token_logprobs(ref_params, config, t, a))[:n_real]
    out[sl] = implicit_prm_sequence_reward(lp_prm, lp_ref, rmask[sl], beta=beta)
    if token_rewards:  # token_logprobs' column t is log p(token t | tokens < t)
      q_tok[sl] = beta * (lp_prm - lp_ref)[:, width_p:] * rmask[sl, width_p:]
  if token_rewards:
    return (out.reshape(len(records), k), tokens[:, width_p:], rmask[:, width_p:], q_tok)
  return out.reshape(len(records), k)


class HeldoutPRM(NamedTuple):
  """`heldout_prm_auroc`'s result: the AUROC, r [N, k], the verifier's scores [N, k] and, rows
  problem-major, the response tokens, their mask and the token rewards [N*k, R]."""
  auroc: float
  rewards: np.ndarray
  scores: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray
  token_rewards: np.ndarray


def heldout_prm_auroc(prm_params: Any, ref_params: Any, config: Any, tokenizer: Any,
                      records: Sequence[Any], problems: Sequence[dict], *, beta: float,
                      max_new_tokens: int, batch_size: int = 16,
                      encoder: Optional[batching.PromptEncoder] = None) -> HeldoutPRM:
  """The implicit PRM's quality on held-out responses: AUROC of the sequence reward
  r = beta * sum_t log(pi_prm / pi_ref) (`implicit_prm_rewards`) against the verifier's labels
  (score > 0.5), over every response of `problems` (`EvalResult.problems`, or the "problems" of a
  written report; `records[i]` is problem i's prompt). A response whose length reached
  `max_new_tokens` was cut off, so it is scored without an EOS. AUROC is NaN when every label
  agrees (`prm_health.auroc`)."""
  from jaxrl_dense.observe import prm_health  # pylint: disable=import-outside-toplevel
  truncated = np.array([[ln >= max_new_tokens for ln in p["lengths"]] for p in problems])
  r, tokens, mask, q = implicit_prm_rewards(
      prm_params, ref_params, config, tokenizer, records, [p["responses"] for p in problems],
      beta=beta, batch_size=batch_size, encoder=encoder, truncated=truncated, token_rewards=True)
  scores = np.array([p["scores"] for p in problems], np.float32)  # [N, k]
  auroc = float(prm_health.auroc(r.reshape(-1), scores.reshape(-1) > 0.5))
  return HeldoutPRM(auroc, r, scores, tokens, mask, q)


def implicit_prm_step_rewards(prm_params: Any, ref_params: Any, config: Any, tokenizer: Any,
                              records: Sequence[Any], responses: Sequence[Sequence[str]],
                              step_spans: Sequence[Sequence[Any]], *, beta: float = 0.05,
                              batch_size: int = 16,
                              encoder: Optional[batching.PromptEncoder] = None,
                              max_prompt_length: int = 1024):
  """Token rewards of whole (EOS-terminated) responses and the step of each token.

  `responses[i][j]` is scored after `records[i]`'s prompt exactly as `implicit_prm_rewards(...,
  token_rewards=True)` scores it; `step_spans[i][j]` are its steps' character spans (e.g.
  `chain_arith.StepSolution.step_spans`). The tokenizer's `offset_mapping` of each response is
  checked to give the scored token ids, then `prm_health.step_ids_from_offsets` assigns every token
  to a step (-1: the EOS token and padding). Returns `(r [N*k], step_ids [N*k, R], q [N*k, R])`,
  rows problem-major: sequence rewards r = beta * sum_t (log pi_prm - log pi_ref), the step ids and
  the token rewards beta * (log pi_prm - log pi_ref) (0 on padding).
  """
  from jaxrl_dense.observe import prm_health
  if len(step_spans) != len(responses) or any(len(a) != len(b) for a, b in zip(step_spans, responses)):
    raise ValueError("implicit_prm_step_rewards: `step_spans` must hold one span list per response")
  r, tokens, mask, q = implicit_prm_rewards(
      prm_params, ref_params, config, tokenizer, records, responses, beta=beta,
      batch_size=batch_size, encoder=encoder, max_prompt_length=max_prompt_length,
      token_rewards=True)  # [N, k]; [N*k, R] x3
  texts = [t for resp in responses for t in resp]
  offsets = []
  for row, text in enumerate(texts):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    if int(mask[row].sum()) != len(ids) + 1 or tokens[row, :len(ids)].tolist() != ids:
      raise ValueError(f"implicit_prm_step_rewards: response {row}'s offsets tokenisation differs "
                       f"from the scored tokens")
    offsets.append(list(enc["offset_mapping"]))
  step_ids = prm_health.step_ids_from_offsets(offsets, [s for spans in step_spans for s in spans],
                                              num_cols=tokens.shape[1])
  return r.reshape(-1), step_ids, q
