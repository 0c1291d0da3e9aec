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

The k-sample estimators (pass@k, majority vote, best-of-n) live in `eval.estimators`, the
implicit PRM's scores of decoded responses and its held-out AUROC in `eval.prm` (their old names
here are deprecated aliases for one release).

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
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jaxrl_dense import _moved
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


# Moved to their own modules: the old names warn and return the new objects, for one release.
__getattr__ = _moved.moved_names(__name__, {
    **{name: f"jaxrl_dense.eval.estimators.{name}" for name in (
        "pass_at_k", "pass_at_k_curve", "mean_at_k", "majority_vote", "best_of_n", "prm_vote_weights",
        "extract_answers", "sampled_summary")},
    **{name: f"jaxrl_dense.eval.prm.{name}" for name in (
        "implicit_prm_sequence_reward", "implicit_prm_rewards", "implicit_prm_step_rewards")},
})
