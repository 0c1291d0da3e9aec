"""Rollout: sample a group batch, decode, verify, select groups -> a `RolloutBatch` (host numpy).

    verifier = Verifier(timeout_s=10.0)
    batch, stats = collect(params, model_config, tokenizer, encoder, records, key, cfg, verifier)

`collect` samples n responses for each of the G = prompts_per_step · oversample records with the
jitted KV-cache sampler (`sampling.generate`), decodes and verifies them (`verify_fn(texts, golds,
sources) -> [G·n]`, e.g. a `Verifier`), keeps prompts_per_step groups with
`filters.accuracy_band_filter` (spec §8; `select_groups`) and returns the kept rows as a
`RolloutBatch` plus host statistics (accuracy, pass fraction, lengths, stage seconds). Every
process of a multi-process run calls it with the same records and key and gets the same batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from jaxrl_dense import sampling, sharding
from jaxrl_dense.filters import accuracy_band_filter
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl.batch import RolloutBatch, trim_batch

VerifyFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]


class Verifier:
  """Outcome labels of decoded responses, in jaxrl_dense's verifier process pool.

  Every item runs under a hard wall-clock limit (`timeout_s`); a timeout or an error scores 0.0
  (veRL's PrimeRewardManager behaviour). The verifier kind of each row comes from its data source
  as veRL routes it (`verifiers.kind_of_source`: exactly codecontests / apps / codeforces / taco, or
  a row's explicit `verifier: code` to the code sandbox, scored as the fraction of tests passed; the
  rest to math). `code_sandbox`: "auto" (bubblewrap, refused where unusable) or "unsafe".
  `last_stats` holds the pool's `VerifyStats` of the last call (why items failed).
  """

  def __init__(self, timeout_s: float, workers: int = 0, code_sandbox: str = "auto"):
    from jaxrl_dense import verifiers
    self.timeout_s = timeout_s
    self._pool = verifiers.VerifierPool(workers=workers or None, code_sandbox=code_sandbox)

  @property
  def last_stats(self):
    return self._pool.last_stats

  def __call__(self, texts: Sequence[str], golds: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    from jaxrl_dense import verifiers
    kinds = verifiers.kinds_of_sources(sources)
    return np.asarray(self._pool.verify(list(texts), list(golds), kinds=kinds,
                                        timeout_s=self.timeout_s), np.float32)

  def close(self) -> None:
    self._pool.close()


def decode_responses(tokenizer, tokens, mask) -> list:
  """Decoded response texts (special tokens skipped), padding removed. tokens, mask: [N, R]."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  return [tokenizer.decode(tokens[i, :int(mask[i].sum())].tolist(), skip_special_tokens=True)
          for i in range(tokens.shape[0])]


def empty_query(record):
  """The record with its last (user) message emptied: SAR's answer-only context (methods.md §1.9)."""
  msgs = tuple(record.prompt_messages)
  return dataclasses.replace(record, prompt_messages=msgs[:-1] + ({**msgs[-1], "content": ""},))


def select_groups(acc, lengths, cfg: config_lib.PrimeConfig):
  """Kept rows [prompts_per_step · n] and per-group pass flags [G] (spec §8, host numpy).

  `filter="band"`: `filters.accuracy_band_filter` with the run's variant — verl: groups with
  acc_low <= mean acc <= acc_high (and, with filter_truncated, longest response L < R − 1) are
  ordered first (stable) and the first prompts_per_step kept: a soft filter, failing groups fill the
  batch when too few pass. original: same band, truncation at L >= R; PRIME-RL re-samples until
  enough groups pass, which a fixed-shape step cannot, so failing groups fill the batch too
  (reported as filter/pass_frac). `none` / `prof` keep the first prompts_per_step groups (PROF
  filters responses inside the update).
  """
  r, f = cfg.rollout, cfg.filter
  band = f.filter == "band"
  out = accuracy_band_filter(
      np.asarray(acc, np.float32), np.asarray(lengths), n=r.n, variant=cfg.prime_variant,
      low=f.acc_low if band else 0.0, high=f.acc_high if band else 1.0,
      max_response_length=r.max_response_length, filter_truncated=band and f.filter_truncated,
      **({"oversample_factor": float(r.oversample)} if cfg.prime_variant == "verl" else {}))
  return np.asarray(out.indices)[:r.rows], np.asarray(out.prompt_pass)


def collect(params, model_config, tokenizer, encoder, records, key, cfg: config_lib.PrimeConfig,
            verify_fn: VerifyFn):
  """One step's rollout: (RolloutBatch of numpy arrays [B = prompts_per_step · n rows], stats).

  `records`: prompts_per_step · oversample PromptRecords; `encoder`: a batching.PromptEncoder
  (prompts left-padded to max_prompt_length). The batch carries the sampler's log-probs as
  `old_logp` when the update reuses them (`recompute_old_logp=False`) and the query-free prompts
  when `extra_reward` is SAR.
  """
  r = cfg.rollout
  n = r.n
  if len(records) != r.prompts_per_step * r.oversample:
    raise ValueError(f"collect: got {len(records)} records, expected prompts_per_step * oversample = "
                     f"{r.prompts_per_step * r.oversample}")
  t0 = time.perf_counter()
  # --length_bucket: prompts padded to the bucket of this step's longest (the encoder's
  # bucket_multiple, set to it by the Trainer), so the sampler compiles once per bucket too.
  pb = encoder.batch(records, pad_to=None if r.length_bucket else r.max_prompt_length)
  g = r.generate_prompts
  parts = []
  for i in range(0, len(records), g):  # --generate_batch_size prompts per sampler call
    gen = sampling.generate(params, model_config, pb.tokens[i:i + g], pb.mask[i:i + g],
                            key if g == len(records) else jax.random.fold_in(key, i // g),
                            max_new_tokens=r.max_response_length, temperature=r.temperature,
                            top_p=r.top_p, top_k=r.top_k, num_samples=n,
                            prompt_bucket=r.length_bucket or r.max_prompt_length, engine=r.rollout_engine)
    # to_host: np.asarray, or an all-gather when the rows live on several processes.
    parts.append(sharding.to_host((gen.tokens, gen.mask, gen.logprobs)))
  tokens, mask, logp = (np.concatenate(x, axis=0) for x in zip(*parts))  # [G*n, R] each
  lengths = mask.sum(axis=1)
  t1 = time.perf_counter()
  texts = decode_responses(tokenizer, tokens, mask)
  acc = verify_fn(texts, [x.gold for x in records for _ in range(n)],
                  [x.verifier_source for x in records for _ in range(n)])  # [G*n]
  t2 = time.perf_counter()
  rows, passed = select_groups(acc, lengths, cfg)  # [B], [G]
  if (mask[rows].sum(axis=1) == 0).any():
    raise RuntimeError("a sampled response has no token (L = 0); the sampler must emit >= 1 token")
  rep = lambda x: np.repeat(np.asarray(x), n, axis=0)[rows]
  qf_tok = qf_mask = None
  if config_lib.parse_extra_reward(cfg.extra_reward)[0] == "sar":
    epb = encoder.batch([empty_query(x) for x in records], pad_to=r.max_prompt_length)
    qf_tok, qf_mask = rep(epb.tokens).astype(np.int32), rep(epb.mask).astype(np.int32)
  batch = RolloutBatch(
      prompt_tokens=rep(pb.tokens).astype(np.int32), prompt_mask=rep(pb.mask).astype(np.int32),
      response_tokens=tokens[rows].astype(np.int32), response_mask=mask[rows].astype(np.float32),
      acc=np.asarray(acc)[rows].astype(np.float32),
      old_logp=None if cfg.policy.recompute_old_logp else logp[rows].astype(np.float32),
      query_free_prompt_tokens=qf_tok, query_free_prompt_mask=qf_mask)
  if r.length_bucket:  # no padding waste: the batch's own lengths, bucketed (issue 13)
    batch = trim_batch(batch, r.length_bucket)
  stats = {"outcome/acc_sampled": float(np.mean(acc)), "outcome/acc": float(np.mean(acc[rows])),
           "filter/pass_frac": float(np.mean(passed)), "response/length_mean": float(lengths.mean()),
           "response/truncated_frac": float((lengths >= r.max_response_length).mean()),
           "response/sampled_tokens": float(lengths.sum()),
           "time/generate": t1 - t0, "time/verify": t2 - t1}
  return batch, stats
