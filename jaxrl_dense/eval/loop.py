"""Evaluation of a policy on prompt records: greedy pass@1 and sampled mean@k, per problem.

Public API
----------
`evaluate(params, config, tokenizer, records, *, max_new_tokens, num_samples=1,
          temperature=0.0, top_p=1.0, batch_size=32, max_prompt_length=1024, seed=0,
          verify_fn=None, encoder=None, generate_fn=None) -> EvalResult`
    For each record, `num_samples` = k responses (greedy when temperature == 0, then k must be
    1) from `jaxrl_dense.sampling.generate`, decoded with `tokenizer` (special tokens skipped)
    and labelled by `verify_fn(texts, golds, data_sources) -> [N] scores in {0, 1}`.
    Default `verify_fn`: `default_verify_fn()` (the verifier process pool when
    `jaxrl_dense.verifiers` provides one, else `verifiers.math.score` in this process).
`EvalResult(summary: dict, problems: list[dict])` with `.to_json()`; `write_report(result,
    path, **extra)` writes it as JSON (`extra` e.g. model, dataset, flags).

Metrics (summary keys), with s[i, j] ∈ {0, 1} the score of sample j of problem i, N problems:
    accuracy      = mean_i mean_j s[i, j]   (= pass@1 when greedy, = mean@k when sampled)
    pass@1 / mean@k (the same number under its usual name: "pass@1" if k == 1 else "mean@k")
    pass@k        = mean_i max_j s[i, j]    (only when k > 1)
    mean_response_length (tokens, incl. EOS), truncated_rate (no EOS within max_new_tokens),
    num_problems, num_samples, temperature, tokens_per_s (generated tokens / generation wall s),
    eval_seconds.
PRIME's authors report AIME as mean@16 at temperature 0.3 (k=16); the arithmetic and MATH-500
numbers in this project are greedy pass@1.

Estimators over k sampled responses per problem (scores s [N, k] from `evaluate`):
`pass_at_k(n, c, k)`   unbiased pass@k of Chen et al. 2021, 1 - C(n-c, k) / C(n, k) (scalars
                       or arrays); `pass_at_k_curve(scores, ks)` averages it over problems.
`mean_at_k(scores)`    mean@k (expected accuracy of one sample).
`majority_vote(answers, scores, weights=None, ties="expected")` maj@k per problem (weighted by
                       `weights` for a PRM-weighted vote); `extract_answers(texts)` the keys.
`best_of_n(scores, rewards)` correctness of the top-reward response (reranking).
`implicit_prm_sequence_reward(logp_prm, logp_ref, mask, beta)` r = beta * sum log(pi_prm/pi_ref);
`implicit_prm_rewards(prm_params, ref_params, ...)` computes it for decoded responses;
`prm_vote_weights(r)` = sigmoid(r). `sampled_summary(...)` collects all of them in one dict.
`implicit_prm_step_rewards(...)` the same token rewards with the step of every token, from the
    responses' step character spans (`prm_health.step_scores` turns them into step scores).
`heldout_prm_auroc(prm_params, ref_params, ..., problems)` the PRM's held-out quality on an
    eval's responses: AUROC of r against the verifier's labels (the trainer's eval/prm_auroc and
    experiments/prm_auroc.py), with the token rewards a heatmap page draws.

Shapes never change between calls with the same records: every batch is padded to `batch_size`
rows (by repeating the last prompt; the copies are ignored) and to one prompt width (the
bucket of the longest prompt of `records`), so the jitted sampler compiles once per
(records, settings) and an eval hook that runs every k training steps does not recompile.
Per-problem entries: {"uid", "question", "gold", "data_source", "responses": [k str],
"scores": [k float], "lengths": [k int], "mean_score"}.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from jaxrl_dense.data import batching

VerifyFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]


@dataclasses.dataclass
class EvalResult:
  """Summary metrics and per-problem results of `evaluate`."""

  summary: dict
  problems: list

  def to_json(self) -> dict:
    return {"summary": self.summary, "problems": self.problems}


def default_verify_fn() -> VerifyFn:
  """The project's outcome verifier as a `verify_fn`.

  Uses `jaxrl_dense.verifiers.verify_batch` (process pool, hard timeouts) when the verifier
  package provides it, else `jaxrl_dense.verifiers.math.score` one response at a time.
  """
  try:
    from jaxrl_dense import verifiers
    verify_batch = getattr(verifiers, "verify_batch", None)
  except ImportError:
    verify_batch = None
  if verify_batch is not None:

    def fn(texts, golds, sources):
      # routed by source as in training: shipped sets and "arithmetic" are math, `rg:` records rg
      return verify_batch(list(texts), list(golds), kind=verifiers.kinds_of_sources(sources))

    return fn
  from jaxrl_dense.verifiers import math as vmath

  def fn_seq(texts, golds, sources):
    del sources
    return [vmath.score(t, g) for t, g in zip(texts, golds)]

  return fn_seq


def _decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list:
  return [tokenizer.decode(tokens[i, :int(lengths[i])].tolist(), skip_special_tokens=True)
          for i in range(tokens.shape[0])]


def evaluate(params: Any, config: Any, tokenizer: Any, records: Sequence[Any], *,
             max_new_tokens: int, num_samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 32, max_prompt_length: int = 1024,
             seed: int = 0, verify_fn: Optional[VerifyFn] = None,
             encoder: Optional[batching.PromptEncoder] = None,
             generate_fn: Optional[Callable] = None, eos_ids: Optional[Sequence[int]] = None,
             progress: bool = False, env: Optional[Callable] = None, max_turns: int = 1,
             paused: bool = False) -> EvalResult:
  """Generates, verifies and scores `records`; see the module docstring.

  Args:
    params, config: the policy (params pytree, possibly sharded) and its ModelConfig.
    tokenizer: transformers tokenizer with a chat template (decodes the responses too).
    records: PromptRecords (prompt_messages, gold, data_source, uid).
    max_new_tokens: response length limit.
    num_samples: k samples per problem (k > 1 needs temperature > 0).
    temperature, top_p: sampling settings (temperature 0 = greedy).
    batch_size: prompts per generate call (rows = batch_size * k).
    max_prompt_length: longer prompts raise (via the encoder) — filter them first.
    seed: PRNG seed; batch b uses fold_in(key(seed), b), so results do not depend on what ran
      before.
    verify_fn: (texts, golds, data_sources) -> scores; default `default_verify_fn()`.
    encoder: a PromptEncoder to reuse (its cache); default one over `tokenizer`.
    generate_fn: replaces `jaxrl_dense.sampling.generate` (same signature), e.g. a pre-jitted,
      sharded sampler from the training loop.
    eos_ids: stop ids (default: the config's).
    progress: show a tqdm bar over batches.
    env, max_turns: a multi-turn environment factory (`envs.make_env(spec)`) and its turn cap:
      each response is an episode of `sampling.multiturn.rollout_turns` (the tool's results appended as
      observation tokens, `max_new_tokens` = the whole response region), scored on the model's
      turns only; each problem also lists its turns and observations.
    paused: with `env`, run the episodes on the continuous engine with paused rows
      (`sampling.multiturn.rollout_turns_paused`: observations prefilled into each row's live KV pages)
      instead of one `generate_fn` call per turn. The same episodes either way (same keys).
  """
  if not records:
    raise ValueError("evaluate: no records")
  if num_samples < 1:
    raise ValueError(f"evaluate: num_samples must be >= 1, got {num_samples}")
  if temperature < 0:
    raise ValueError(f"evaluate: temperature must be >= 0, got {temperature}")
  if temperature == 0 and num_samples != 1:
    raise ValueError(f"evaluate: greedy decoding (temperature=0) gives identical samples; use "
                     f"num_samples=1 or a temperature > 0 (got num_samples={num_samples})")
  if batch_size < 1:
    raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
  if max_new_tokens < 1:
    raise ValueError(f"evaluate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if encoder is None:
    encoder = batching.PromptEncoder(tokenizer, max_prompt_length=max_prompt_length)
  if generate_fn is None:
    from jaxrl_dense import sampling
    generate_fn = sampling.generate
  if verify_fn is None:
    verify_fn = default_verify_fn()

  records = list(records)
  batch_size = min(batch_size, len(records))
  longest = max(len(encoder.encode(r.prompt_messages)) for r in records)
  if longest > encoder.max_prompt_length:
    raise ValueError(f"evaluate: a prompt has {longest} tokens > max_prompt_length="
                     f"{encoder.max_prompt_length}; filter with encoder.filter_overlong first")
  width = batching.bucket_length(longest, encoder.bucket_multiple, encoder.max_prompt_length)
  k = int(num_samples)
  base_key = jax.random.key(seed)
  all_tokens, all_lengths, all_texts, all_turns = [], [], [], []
  eos = set(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
  gen_seconds = 0.0
  t_start = time.perf_counter()
  starts = range(0, len(records), batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc="eval", unit="batch")
  for b, start in enumerate(starts):
    chunk = records[start:start + batch_size]
    pb = encoder.batch(chunk, pad_to=width, num_rows=batch_size)
    t0 = time.perf_counter()
    n_real = len(chunk) * k  # rows are prompt-major; the padding prompts come last
    key = jax.random.fold_in(base_key, b)
    if env is None:
      out = generate_fn(params, config, pb.tokens, pb.mask, key, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, eos_ids=eos_ids, num_samples=k)
      tokens, lengths = jax.device_get((out.tokens, out.lengths))  # [b*k, T], [b*k]
      all_texts += _decode(tokenizer, np.asarray(tokens)[:n_real], np.asarray(lengths)[:n_real])
    else:  # multi-turn episodes; the verifier reads the model's turns only
      from jaxrl_dense.sampling import multiturn  # pylint: disable=import-outside-toplevel

      def gen(ctx, cmask, kk, ns, mx, rows=None):
        o = generate_fn(params, config, ctx, cmask, kk, max_new_tokens=mx, temperature=temperature,
                        top_p=top_p, eos_ids=eos_ids, num_samples=ns)
        return tuple(np.asarray(x) for x in jax.device_get((o.tokens, o.mask, o.logprobs)))

      recs = list(chunk) + [chunk[0]] * (pb.tokens.shape[0] - len(chunk))
      pad = config.pad_token_id if config.pad_token_id is not None else min(eos, default=0)
      args = (tokenizer, np.asarray(pb.tokens), np.asarray(pb.mask), recs, key)
      kw = dict(n=k, make_env=env, max_turns=max_turns, max_response_length=max_new_tokens,
                eos_ids=tuple(eos), pad_id=pad)
      if paused:
        from jaxrl_dense.sampling import engine as engine_lib  # pylint: disable=import-outside-toplevel

        def run_fn(ctx, cmask, kk, **a):
          return engine_lib.run_episodes(params, config, ctx, cmask, kk, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, eos_ids=tuple(eos),
                                         pad_id=pad, **a)
        ep, _ = multiturn.rollout_turns_paused(run_fn, *args, **kw)
      else:
        ep = multiturn.rollout_turns(gen, *args, **kw)
      tokens, lengths = ep.tokens, (ep.mask + ep.observation_mask).sum(axis=1).astype(np.int32)
      all_texts += [multiturn.model_text(t) for t in ep.turn_texts[:n_real]]
      all_turns += [{"turns": t, "observations": o} for t, o in zip(ep.turn_texts[:n_real], ep.observations[:n_real])]
    gen_seconds += time.perf_counter() - t0
    all_tokens.append(np.asarray(tokens)[:n_real])
    all_lengths.append(np.asarray(lengths)[:n_real])
  tokens = np.concatenate(all_tokens, axis=0)  # [N*k, T]
  lengths = np.concatenate(all_lengths, axis=0)  # [N*k]
  texts = all_texts
  golds = [r.gold for r in records for _ in range(k)]
  sources = [r.verifier_source for r in records for _ in range(k)]
  scores = np.asarray(verify_fn(texts, golds, sources), dtype=np.float64)  # [N*k]
  if scores.shape != (len(texts),):
    raise ValueError(f"verify_fn returned shape {scores.shape}, expected ({len(texts)},)")
  scores = scores.reshape(len(records), k)  # [N, k]
  lengths_nk = lengths.reshape(len(records), k)  # [N, k]
  # A response without EOS within max_new_tokens has length == max_new_tokens and ends in a
  # non-EOS token; with EOS at the very last position it is complete.
  last_tok = tokens[np.arange(tokens.shape[0]), np.maximum(lengths - 1, 0)]
  truncated = (lengths >= max_new_tokens) & ~np.isin(last_tok, list(eos))
  problems = []
  for i, r in enumerate(records):
    problems.append({
        "uid": r.uid, "question": r.question, "gold": r.gold, "data_source": r.data_source,
        "responses": texts[i * k:(i + 1) * k], "scores": scores[i].tolist(),
        "lengths": lengths_nk[i].astype(int).tolist(), "mean_score": float(scores[i].mean()),
        **({"episodes": all_turns[i * k:(i + 1) * k]} if all_turns else {}),
    })
  acc = float(scores.mean())
  summary = {
      "accuracy": acc,
      ("pass@1" if k == 1 else f"mean@{k}"): acc,
      "num_problems": len(records), "num_samples": k, "temperature": float(temperature),
      "top_p": float(top_p), "max_new_tokens": int(max_new_tokens),
      "mean_response_length": float(lengths.mean()),
      "truncated_rate": float(truncated.mean()),
      "tokens_per_s": float(lengths.sum() / max(gen_seconds, 1e-9)),
      "eval_seconds": time.perf_counter() - t_start,
  }
  if k > 1:
    summary[f"pass@{k}"] = float(scores.max(axis=1).mean())
  return EvalResult(summary=summary, problems=problems)


def write_report(result: EvalResult, path: str | os.PathLike, **extra: Any) -> pathlib.Path:
  """Writes {"summary", "problems", **extra} as indented JSON; returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = dict(extra)
  payload.update(result.to_json())
  tmp = path.with_suffix(path.suffix + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, default=str)
  os.replace(tmp, path)
  return path


# ============================================================================================
# Estimators over k sampled responses per problem: unbiased pass@k (arXiv 2107.03374), mean@k,
# majority vote, best-of-N and PRM-weighted vote with an implicit PRM's sequence reward.
# ============================================================================================
def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
  if n - c < k:
    return 1.0
  # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)   (Chen et al. 2021, Fig. 3)
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(num_samples: Any, num_correct: Any, k: Any) -> Any:
  """Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code", arXiv 2107.03374, Eq. 1 and Fig. 3).

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

  the probability that at least one of k responses drawn without replacement from the n sampled
  ones (c of them correct) is correct; E[pass@k-estimate] is the true pass@k of the model. The
  product form never forms the (huge) binomial coefficients. It is 1 when n - c < k (every
  k-subset holds a correct response).

  Args:
    num_samples: n, responses sampled per problem (int or int array, >= 1).
    num_correct: c, correct ones among them (0 <= c <= n), broadcastable with n.
    k: 1 <= k <= n (int or int array, broadcastable).
  Returns:
    a python float when every argument is a scalar, else a float64 array of the broadcast shape.
  Raises:
    ValueError naming the offending values (non-integer, c outside [0, n], k outside [1, n]).
  """
  n_a, c_a, k_a = (np.asarray(x) for x in (num_samples, num_correct, k))
  for name, a in (("num_samples", n_a), ("num_correct", c_a), ("k", k_a)):
    if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0)):
      raise ValueError(f"pass_at_k: {name} must be integers, got {a!r}")
  n_b, c_b, k_b = np.broadcast_arrays(n_a.astype(np.int64), c_a.astype(np.int64),
                                      k_a.astype(np.int64))
  if (n_b < 1).any():
    raise ValueError(f"pass_at_k: num_samples must be >= 1, got {n_a.tolist()}")
  if ((c_b < 0) | (c_b > n_b)).any():
    raise ValueError(f"pass_at_k: num_correct must be in [0, num_samples], got num_correct="
                     f"{c_a.tolist()}, num_samples={n_a.tolist()}")
  if ((k_b < 1) | (k_b > n_b)).any():
    raise ValueError(f"pass_at_k: k must be in [1, num_samples] (pass@k needs k <= n samples), "
                     f"got k={k_a.tolist()}, num_samples={n_a.tolist()}")
  out = np.array([_pass_at_k_scalar(int(n), int(c), int(kk))
                  for n, c, kk in zip(n_b.ravel(), c_b.ravel(), k_b.ravel())],
                 dtype=np.float64).reshape(n_b.shape)
  if n_a.ndim == 0 and c_a.ndim == 0 and k_a.ndim == 0:
    return float(out)
  return out


def _scores_2d(scores: Any, name: str = "scores") -> np.ndarray:
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
    raise ValueError(f"{name} must be a non-empty [N problems, k samples] array, got shape "
                     f"{s.shape}")
  if not np.isfinite(s).all():
    raise ValueError(f"{name} must be finite")
  return s


def mean_at_k(scores: Any) -> float:
  """mean@k = (1/N) sum_i (1/k) sum_j s[i, j] for scores [N, k] (PRIME's AIME "avg@16").

  The expected accuracy of one sampled response, i.e. the unbiased pass@1 from k samples.
  """
  return float(_scores_2d(scores).mean())


def _pick(values: np.ndarray, correct: np.ndarray, ties: str) -> float:
  """Correctness of the argmax of `values` (ties: "expected" = mean over the tied, "first")."""
  best = np.max(values)
  tied = np.flatnonzero(values >= best - 1e-12 * max(1.0, abs(best)))
  if ties == "first":
    return float(correct[tied[0]])
  return float(np.mean(correct[tied]))


_TIES = ("expected", "first")


def majority_vote(answers: Sequence[Sequence[Optional[str]]], scores: Any,
                  weights: Any = None, *, ties: str = "expected") -> np.ndarray:
  """Per-problem correctness of the (weighted) majority answer ("maj@k", self-consistency).

  For problem i the vote of answer a is W_i(a) = sum_{j: answers[i][j] == a} w[i, j] (w = 1 for
  plain majority vote); samples whose answer is None (no answer extracted) do not vote. The
  voted answer is argmax_a W_i(a); its correctness is the score of a sample with that answer
  (max over them, so a verifier that scores equal answers equally gives that score). Ties:
  "expected" = the mean correctness over the tied answers (the expectation under a uniformly
  random tie break, deterministic); "first" = the tied answer that occurs first. A problem with
  no extracted answer scores 0.

  Args:
    answers: N lists of k normalised answers (str or None), e.g. `extract_answers(texts)`.
    scores: [N, k] verifier scores in {0, 1}.
    weights: optional [N, k] non-negative vote weights (e.g. `prm_vote_weights(rewards)`).
    ties: "expected" | "first".
  Returns:
    [N] float64 correctness in [0, 1]; its mean is maj@k (or the weighted-vote accuracy).
  """
  s = _scores_2d(scores)
  if ties not in _TIES:
    raise ValueError(f"majority_vote: ties must be one of {_TIES}, got {ties!r}")
  if len(answers) != s.shape[0] or any(len(a) != s.shape[1] for a in answers):
    raise ValueError(f"majority_vote: answers must be {s.shape[0]} lists of {s.shape[1]} "
                     f"answers (the shape of scores), got {[len(a) for a in answers][:8]}...")
  w = np.ones_like(s) if weights is None else _scores_2d(weights, "weights")
  if w.shape != s.shape:
    raise ValueError(f"majority_vote: weights shape {w.shape} != scores shape {s.shape}")
  if (w < 0).any():
    raise ValueError("majority_vote: weights must be >= 0 (use prm_vote_weights for rewards)")
  out = np.zeros(s.shape[0], np.float64)
  for i, row in enumerate(answers):
    total: dict = {}
    correct: dict = {}
    for j, a in enumerate(row):
      if a is None:
        continue
      total[a] = total.get(a, 0.0) + float(w[i, j])
      correct[a] = max(correct.get(a, 0.0), float(s[i, j]))
    if not total:
      continue
    keys = list(total)  # insertion order = first occurrence
    out[i] = _pick(np.array([total[a] for a in keys]), np.array([correct[a] for a in keys]), ties)
  return out


def best_of_n(scores: Any, rewards: Any, *, ties: str = "expected") -> np.ndarray:
  """Per-problem correctness of the highest-reward response (reranking, best-of-N).

  out[i] = s[i, argmax_j r[i, j]]; ties: "expected" = mean score of the tied responses,
  "first" = the first of them. With r the implicit PRM's sequence reward
  (`implicit_prm_sequence_reward`) this is PRM best-of-N (PRIME, arXiv 2502.01456 Sec. 5.2;
  Yuan et al. 2024, arXiv 2412.01981).

  Args:
    scores: [N, k] verifier scores. rewards: [N, k] finite rewards.
  Returns:
    [N] float64; its mean is the best-of-N accuracy.
  """
  s = _scores_2d(scores)
  r = _scores_2d(rewards, "rewards")
  if r.shape != s.shape:
    raise ValueError(f"best_of_n: rewards shape {r.shape} != scores shape {s.shape}")
  if ties not in _TIES:
    raise ValueError(f"best_of_n: ties must be one of {_TIES}, got {ties!r}")
  return np.array([_pick(r[i], s[i], ties) for i in range(s.shape[0])], np.float64)


def prm_vote_weights(rewards: Any) -> np.ndarray:
  """sigmoid(r): the implicit PRM's probability that a response is correct (its CE objective
  models p(correct) = sigma(beta * log pi_phi / pi_ref), PRIME Eq. 4), as vote weights."""
  r = np.asarray(rewards, np.float64)
  return 0.5 * (1.0 + np.tanh(0.5 * r))  # stable sigmoid


def implicit_prm_sequence_reward(logp_prm: Any, logp_ref: Any, mask: Any, *,
                                 beta: float = 0.05) -> np.ndarray:
  """r_i = beta * sum_t m[i, t] (log pi_phi - log pi_ref)[i, t]: the implicit PRM's outcome reward
  (PRIME Eq. 3 summed over the response; arXiv 2412.01981). [B, T] x3 -> [B] float64."""
  lp, lr, m = (np.asarray(x, np.float64) for x in (logp_prm, logp_ref, mask))
  if lp.ndim != 2 or lp.shape != lr.shape or lp.shape != m.shape:
    raise ValueError(f"implicit_prm_sequence_reward: logp_prm {lp.shape}, logp_ref {lr.shape} "
                     f"and mask {m.shape} must be equal [B, T] shapes")
  return beta * np.sum((lp - lr) * m, axis=1)


def extract_answers(texts: Sequence[str]) -> list:
  """Normalised final answers (`verifiers.math.extract_answer` + `normalize_answer`), None if
  none: the keys majority vote compares."""
  from jaxrl_dense.verifiers import math as vmath
  out = []
  for t in texts:
    a = vmath.extract_answer(t)
    if a is not None:
      try:
        a = vmath.normalize_answer(a)
      except Exception:  # an unparsable answer still votes as its raw text
        pass
    out.append(a)
  return out


def pass_at_k_curve(scores: Any, ks: Optional[Sequence[int]] = None) -> dict:
  """{"pass@k": mean_i pass_at_k(n, c_i, k)} for ks (default 1, 2, 4, ... and n), c_i = number
  of samples with score >= 0.5 in row i of scores [N, n]."""
  s = _scores_2d(scores)
  n = s.shape[1]
  if ks is None:
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
  c = (s >= 0.5).sum(axis=1)
  return {f"pass@{k}": float(np.mean(pass_at_k(n, c, k))) for k in ks}


def sampled_summary(scores: Any, answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
                    rewards: Any = None, ks: Optional[Sequence[int]] = None) -> dict:
  """The estimators of k samples per problem as one dict: unbiased pass@k for ks, mean@n,
  maj@n (with `answers`), and with implicit-PRM `rewards` [N, n]: prm_best_of_n@n (top reward)
  and prm_vote@n (majority vote weighted by sigmoid(reward))."""
  s = _scores_2d(scores)
  n = s.shape[1]
  out = pass_at_k_curve(s, ks)
  out[f"mean@{n}"] = mean_at_k(s)
  if answers is not None:
    out[f"maj@{n}"] = float(majority_vote(answers, s).mean())
  if rewards is not None:
    out[f"prm_best_of_n@{n}"] = float(best_of_n(s, rewards).mean())
    if answers is not None:
      out[f"prm_vote@{n}"] = float(majority_vote(answers, s, prm_vote_weights(rewards)).mean())
  return out


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
