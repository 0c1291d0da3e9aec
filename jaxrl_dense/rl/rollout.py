"""Rollout: sample a group batch, decode, verify, select groups -> a `RolloutBatch` (host numpy).

    verifier = Verifier(timeout_s=10.0)
    batch, stats = collect(params, model_config, tokenizer, encoder, records, key, cfg, verifier)

`collect` samples n responses for each of the G = prompts_per_step · oversample records with the
jitted KV-cache sampler (`sampling.generate`), decodes and verifies them (`verify_fn(texts, golds,
sources) -> [G·n]`, e.g. a `Verifier`), keeps prompts_per_step groups with
`filters.accuracy_band_filter` (PRIME-RL's accuracy filter; `select_groups`) and returns the kept rows as a
`RolloutBatch` plus host statistics (accuracy, pass / fill fractions, lengths, stage seconds).
With --filter_mode=resample it samples further rounds of G prompts until prompts_per_step groups
are in band (PRIME-RL's protocol; surplus in-band prompts go to a `PromptBuffer`). Every process
of a multi-process run calls it with the same records and key and gets the same batch.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import numpy as np

from jaxrl_dense import _deprecation, sampling
from jaxrl_dense.parallel import placement
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
  """The record with its last (user) message emptied: SAR's answer-only context (arXiv 2509.05489)."""
  msgs = tuple(record.prompt_messages)
  return dataclasses.replace(record, prompt_messages=msgs[:-1] + ({**msgs[-1], "content": ""},))


@_deprecation.renamed_kwargs(acc="outcome")
def select_groups(outcome, lengths, cfg: config_lib.PrimeConfig):
  """Kept rows [prompts_per_step · n] and per-group pass flags [G] (PRIME-RL's accuracy filter, host numpy).

  `filter="band"`: `filters.accuracy_band_filter` with the run's variant — verl: groups with
  acc_low <= mean outcome <= acc_high (and, with filter_truncated, longest response L < R − 1) are
  ordered first (stable) and the first prompts_per_step kept; original: same band, truncation at
  L >= R. Too few passing groups leave the failing ones in the kept rows (veRL's soft filter);
  what the update does with them is --filter_mode: fill trains on them, mask gives them weight 0,
  and resample (`collect`) first samples more prompts, as PRIME-RL does (a fixed-shape step can:
  the loop runs on the host, and only the final batch has the fixed shape). `none` / `prof` keep
  the first prompts_per_step groups (PROF filters responses inside the update).
  """
  r, f = cfg.rollout, cfg.filter
  band = f.filter == "band"
  out = accuracy_band_filter(
      np.asarray(outcome, np.float32), np.asarray(lengths), n=r.n, reference_impl=cfg.reference_impl,
      low=f.acc_low if band else 0.0, high=f.acc_high if band else 1.0,
      max_response_length=r.max_response_length, filter_truncated=band and f.filter_truncated,
      **({"oversample_factor": float(r.oversample)} if cfg.reference_impl == "verl" else {}))
  return np.asarray(out.indices)[:r.rows], np.asarray(out.prompt_pass)


class PromptBuffer:
  """--filter_mode=resample: prompts of surplus in-band groups, re-sampled first at the next step
  (PRIME-RL's `add_to_buffer`: prompts, not responses). Holds at most `capacity` records (the
  first surplus ones; the rest are dropped). `get_state()` / `set_state()`: JSON for the
  checkpoint, so a resumed run draws the same prompts."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self.records: list = []

  def __len__(self) -> int:
    return len(self.records)

  def add(self, records) -> None:
    self.records.extend(list(records)[:max(0, self.capacity - len(self.records))])

  def take(self, k: int) -> list:
    out, self.records = self.records[:k], self.records[k:]
    return out

  def get_state(self) -> list:
    return [dataclasses.asdict(x) for x in self.records]

  def set_state(self, state) -> None:
    from jaxrl_dense.data.prompts import PromptRecord  # pylint: disable=import-outside-toplevel
    self.records = [PromptRecord(**x) for x in (state or [])]


def first_round_records(buffer: "PromptBuffer | None", next_records: Callable[[int], list], k: int) -> list:
  """The k prompts of a step's first sampling round: buffered prompts first, then fresh ones."""
  head = buffer.take(k) if buffer is not None else []
  return head + (next_records(k - len(head)) if k > len(head) else [])


# Salt of the sampling keys of the resample rounds after the first (round 0 uses the step's key).
_RESAMPLE_SALT = 0x7E5A


def _sample_round(params, model_config, tokenizer, encoder, records, key, cfg: config_lib.PrimeConfig,
                  verify_fn: VerifyFn) -> dict:
  """Samples n responses for each record and verifies them: numpy tokens / mask / logp [G·n, R],
  outcome / lengths [G·n], and the seconds spent generating and verifying."""
  r = cfg.rollout
  n = r.n
  t0 = time.perf_counter()
  # --length_bucket: prompts padded to the bucket of this step's longest (the encoder's
  # bucket_multiple, set to it by the Trainer), so the sampler compiles once per bucket too.
  pb = encoder.batch(records, pad_to=None if r.length_bucket else r.max_prompt_length)
  g = r.generate_prompts
  if r.env:  # multi-turn: the environment answers between the model's turns (rl/multiturn.py)
    return _sample_turns(params, model_config, tokenizer, pb, records, key, cfg, verify_fn, t0)
  parts = []
  for i in range(0, len(records), g):  # --generate_batch_size prompts per sampler call
    gen = sampling.generate(params, model_config, pb.tokens[i:i + g], pb.mask[i:i + g],
                            key if g == len(records) else jax.random.fold_in(key, i // g),
                            max_new_tokens=r.max_response_length, temperature=r.temperature,
                            top_p=r.top_p, top_k=r.top_k, num_samples=n,
                            prompt_bucket=r.length_bucket or r.max_prompt_length, engine=r.rollout_engine)
    # to_host: np.asarray, or an all-gather when the rows live on several processes.
    parts.append(placement.to_host((gen.tokens, gen.mask, gen.logprobs)))
  tokens, mask, logp = (np.concatenate(x, axis=0) for x in zip(*parts))  # [G*n, R] each
  t1 = time.perf_counter()
  texts = decode_responses(tokenizer, tokens, mask)
  outcome = np.asarray(verify_fn(texts, [x.gold for x in records for _ in range(n)],
                             [x.verifier_source for x in records for _ in range(n)]), np.float32)  # [G*n]
  t2 = time.perf_counter()
  return {"records": list(records), "prompts": pb, "tokens": tokens, "mask": mask, "logp": logp,
          "outcome": outcome, "lengths": mask.sum(axis=1), "t_gen": t1 - t0, "t_ver": t2 - t1}


def _sample_turns(params, model_config, tokenizer, pb, records, key, cfg: config_lib.PrimeConfig,
                  verify_fn: VerifyFn, t0: float) -> dict:
  """`_sample_round` for --env: n multi-turn episodes per record; the verifier scores the model's
  turns only. --rollout_engine=continuous runs them with paused rows (`multiturn.rollout_turns_paused`:
  observations prefilled into each row's live KV pages), static one sampler call per turn
  (`multiturn.rollout_turns`). Adds observation_mask / turn_ids [G·n, R], the turn texts, and the
  tool and prefill statistics."""
  from jaxrl_dense import envs  # pylint: disable=import-outside-toplevel
  from jaxrl_dense.rl import multiturn  # pylint: disable=import-outside-toplevel
  r = cfg.rollout
  n = r.n
  eos = tuple(model_config.eos_token_ids)
  pad = model_config.pad_token_id if model_config.pad_token_id is not None else (eos[0] if eos else 0)
  paused = r.rollout_engine == "continuous"

  def generate_fn(ctx, cmask, k, num_samples, max_new, rows=None):
    gen = sampling.generate(params, model_config, ctx, cmask, k, max_new_tokens=max_new,
                            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            num_samples=num_samples, prompt_bucket=r.length_bucket or 16,
                            engine=r.rollout_engine)
    return placement.to_host((gen.tokens, gen.mask, gen.logprobs))

  def run_fn(ctx, cmask, k, **kw):
    from jaxrl_dense.sampling import engine as engine_lib  # pylint: disable=import-outside-toplevel
    return engine_lib.run_episodes(params, model_config, ctx, cmask, k, max_new_tokens=r.max_response_length,
                                   temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, eos_ids=eos,
                                   pad_id=pad, **kw)

  g = r.generate_prompts
  make_env = envs.make_env(r.env, max_turns=r.max_turns)
  outs, prefilled, reprefill, syncs, false_stops = [], 0, 0, 0, 0
  for i in range(0, len(records), g):  # --generate_batch_size prompts per call, as single-turn
    args = (tokenizer, np.asarray(pb.tokens[i:i + g]), np.asarray(pb.mask[i:i + g]), records[i:i + g],
            key if g == len(records) else jax.random.fold_in(key, i // g))
    kw = dict(n=n, make_env=make_env, max_turns=r.max_turns, max_response_length=r.max_response_length,
              eos_ids=eos, pad_id=pad)
    if paused:
      out, st = multiturn.rollout_turns_paused(run_fn, *args, **kw)
      if st is not None:
        prefilled, syncs, false_stops = (prefilled + st.prefill_real_tokens, syncs + st.host_syncs,
                                         false_stops + st.false_stops)
    else:
      out = multiturn.rollout_turns(generate_fn, *args, **kw)
    plens = np.asarray(pb.mask[i:i + g]).sum(axis=1)
    reprefill += multiturn.reprefill_tokens(out, plens, n)
    outs.append(out)
  cat = lambda f: np.concatenate([getattr(o, f) for o in outs], axis=0)
  turn_texts = [t for o in outs for t in o.turn_texts]
  infos = [x for o in outs for x in o.infos]
  t1 = time.perf_counter()
  texts = [multiturn.model_text(t) for t in turn_texts]
  outcome = np.asarray(verify_fn(texts, [x.gold for x in records for _ in range(n)],
                             [x.verifier_source for x in records for _ in range(n)]), np.float32)
  t2 = time.perf_counter()
  mask, obs = cat("mask"), cat("observation_mask")
  calls = [i for row in infos for i in row if i.get("tool")]
  errors = [i for i in calls if i.get("error")]
  stats = {"env/turns_mean": float(np.mean(cat("num_turns"))),
           "env/tool_calls_per_row": len(calls) / max(len(infos), 1),
           "env/tool_error_frac": len(errors) / max(len(calls), 1),
           "env/tool_timeouts": float(sum(i.get("error") == "timeout" for i in calls)),
           "env/observation_tokens_mean": float(obs.sum(axis=1).mean()),
           # context tokens prefilled per episode, and what one sampler call per turn prefills
           # (the prompt and every earlier turn again at each turn); equal on the static path
           "env/prefill_tokens": (prefilled if paused else reprefill) / max(len(infos), 1),
           "env/reprefill_tokens": reprefill / max(len(infos), 1)}
  if paused:  # device -> host round trips of the engine runs, and candidates that were no stop
    stats.update({"env/host_syncs": float(syncs), "env/false_stops_per_row": false_stops / max(len(infos), 1)})
  return {"records": list(records), "prompts": pb, "tokens": cat("tokens"), "mask": mask, "logp": cat("logp"),
          "observation_mask": obs, "turn_ids": cat("turn_ids"), "turn_texts": turn_texts,
          "outcome": outcome, "lengths": (mask + obs).sum(axis=1), "t_gen": t1 - t0, "t_ver": t2 - t1,
          "env_stats": stats}


def collect(params, model_config, tokenizer, encoder, records, key, cfg: config_lib.PrimeConfig,
            verify_fn: VerifyFn, *, next_records: Callable[[int], list] | None = None,
            buffer: PromptBuffer | None = None, process_scorer: Callable | None = None):
  """One step's rollout: (RolloutBatch of numpy arrays [B = prompts_per_step · n rows], stats).

  `records`: prompts_per_step · oversample PromptRecords (the first sampling round); `encoder`: a
  batching.PromptEncoder (prompts left-padded to max_prompt_length). The batch carries
  `in_band` [B] (1 on the groups that passed the band), the sampler's log-probs as `sampler_logp`
  (μ, always: bypass and the rollout correction read them) and the query-free prompts when
  `extra_reward` is SAR.

  --filter_mode (`cfg.filter_protocol`) fill / mask: one round, `select_groups`. resample
  (PRIME-RL's `fit` loop, training/verl/trainer/ppo/ray_trainer.py): while fewer than prompts_per_step groups are in band and
  fewer than --resample_max_rounds rounds are drawn, sample another prompts_per_step · oversample
  prompts from `next_records(k)` (the data iterator) with a fresh key (round j > 0:
  fold_in(fold_in(key, salt), j)); the batch holds the first prompts_per_step in-band groups in
  sampling order, then (when the cap is hit) out-of-band groups in sampling order as weight-0
  filler; the prompts of the surplus in-band groups go to `buffer` (re-sampled first next step).

  `process_scorer` (`rl.external_reward.make_process_scorer`, --process_reward): scores the picked
  rows with the served PRM into `RolloutBatch.process_rewards` [B, R] (its stats are merged).
  """
  r = cfg.rollout
  n = r.n
  k = r.prompts_per_step * r.oversample
  if len(records) != k:
    raise ValueError(f"collect: got {len(records)} records, expected prompts_per_step * oversample = {k}")
  mode = cfg.filter_protocol
  if mode == "resample" and next_records is None:
    raise ValueError("collect: --filter_mode=resample samples further prompts; pass next_records")
  rounds = [_sample_round(params, model_config, tokenizer, encoder, records, key, cfg, verify_fn)]
  if mode != "resample":
    rows, passed = select_groups(rounds[0]["outcome"], rounds[0]["lengths"], cfg)  # [B], [G]
    picks = [(0, int(g)) for g in rows[::n] // n]  # (round, group) of each kept group
    flags = [passed]
  else:
    passing, failing, flags = [], [], []
    salt_key = jax.random.fold_in(key, _RESAMPLE_SALT)
    while True:
      j = len(rounds) - 1
      passed = select_groups(rounds[j]["outcome"], rounds[j]["lengths"], cfg)[1]  # [G]
      flags.append(passed)
      for g, ok in enumerate(passed):
        (passing if ok else failing).append((j, g))
      if len(passing) >= r.prompts_per_step or len(rounds) >= cfg.filter.resample_max_rounds:
        break
      try:
        more = next_records(k)
      except StopIteration:
        more = []
      if len(more) != k:  # a finite data iterator ran out: stop drawing
        break
      rounds.append(_sample_round(params, model_config, tokenizer, encoder, more,
                                  jax.random.fold_in(salt_key, len(rounds)), cfg, verify_fn))
    picks = passing[:r.prompts_per_step]
    picks += failing[:r.prompts_per_step - len(picks)]
    if buffer is not None:
      buffer.add(rounds[j]["records"][g] for j, g in passing[r.prompts_per_step:])
  return _assemble(rounds, picks, flags, encoder, cfg, process_scorer,
                   policy=(params, model_config, tokenizer))


@functools.lru_cache(maxsize=8)
def _probe_scorer(model_config, micro_batch_size: int):
  """The jitted teacher-forced log-prob pass of IGPO's answer probes (one per model config)."""
  from jaxrl_dense.rl import steps  # pylint: disable=import-outside-toplevel
  return jax.jit(steps.make_logprobs(model_config, micro_batch_size=micro_batch_size))


def igpo_rewards(params, model_config, tokenizer, batch: RolloutBatch, records, cfg: config_lib.PrimeConfig):
  """--advantage=igpo: IGPO's turn rewards [B, K] of a multi-turn batch (`multiturn.igpo_turn_rewards`)
  under the rollout's policy params; records: the B rows' PromptRecords."""
  from jaxrl_dense.rl import multiturn  # pylint: disable=import-outside-toplevel
  mb = cfg.score_micro_batch_size
  score = _probe_scorer(model_config, mb)

  def score_fn(ct, cm, at, am):
    m = ct.shape[0]
    pad = -m % mb  # whole micro-batches (the extra rows repeat row 0 and are dropped)
    rows = lambda v: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) if pad else v
    probe = RolloutBatch(rows(ct), rows(cm), rows(at), rows((am > 0).astype(np.float32)),
                         outcome=np.zeros((m + pad,), np.float32))  # context -> the gold answer's tokens
    return np.asarray(placement.to_host(score(params, probe)))[:m]

  answers = [tokenizer.encode(cfg.igpo_answer_template.format(gold=x.gold), add_special_tokens=False)
             for x in records]
  eos = tuple(model_config.eos_token_ids)
  pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else (eos[0] if eos else 0)
  r, _ = multiturn.igpo_turn_rewards(score_fn, batch.prompt_tokens, batch.prompt_mask, batch.response_tokens,
                                     batch.turn_ids, answers, batch.outcome, num_turns=cfg.rollout.max_turns,
                                     pad_id=pad_id)
  return r


def _assemble(rounds, picks, flags, encoder, cfg: config_lib.PrimeConfig, process_scorer=None, policy=None):
  """The RolloutBatch of the picked (round, group) pairs, in order, and the step's statistics
  (flags: each round's per-group pass flags [G])."""
  r = cfg.rollout
  n = r.n
  rows = [(j, g * n + i) for j, g in picks for i in range(n)]  # (round, row) [B]
  take = lambda key: np.stack([rounds[j][key][i] for j, i in rows])
  tokens, mask, logp, outcome = take("tokens"), take("mask"), take("logp"), take("outcome")
  multi = "observation_mask" in rounds[0]  # --env: multi-turn rows
  if (mask.sum(axis=1) == 0).any():
    raise RuntimeError("a sampled response has no token (L = 0); the sampler must emit >= 1 token")
  in_band = np.repeat(np.asarray([flags[j][g] for j, g in picks], np.float32), n)  # [B]
  picked = [rounds[j]["records"][g] for j, g in picks]
  if len(rounds) == 1:  # the sampled prompt rows as they are
    pb = rounds[0]["prompts"]
    ptok, pmask = (np.repeat(np.asarray(x), n, axis=0)[[i for _, i in rows]] for x in (pb.tokens, pb.mask))
  else:  # rows from several rounds: encode the picked prompts together (same left-padded values)
    pb = encoder.batch(picked, pad_to=None if r.length_bucket else r.max_prompt_length)
    ptok, pmask = (np.repeat(np.asarray(x), n, axis=0) for x in (pb.tokens, pb.mask))
  qf_tok = qf_mask = None
  if cfg.extra_reward_name == "sar":
    epb = encoder.batch([empty_query(x) for x in picked], pad_to=r.max_prompt_length)
    qf_tok, qf_mask = (np.repeat(np.asarray(x), n, axis=0).astype(np.int32) for x in (epb.tokens, epb.mask))
  batch = RolloutBatch(
      prompt_tokens=ptok.astype(np.int32), prompt_mask=pmask.astype(np.int32),
      response_tokens=tokens.astype(np.int32), response_mask=mask.astype(np.float32),
      outcome=outcome.astype(np.float32),
      sampler_logp=logp.astype(np.float32),
      query_free_prompt_tokens=qf_tok, query_free_prompt_mask=qf_mask, in_band=in_band)
  env_stats = {}
  if multi:
    batch = batch._replace(observation_mask=take("observation_mask").astype(np.float32),
                           turn_ids=take("turn_ids").astype(np.int32))
    if cfg.advantage == "matchtir":  # MatchTIR: matched tool calls per turn, the outcome on the answer turn
      from jaxrl_dense import envs  # pylint: disable=import-outside-toplevel
      from jaxrl_dense.rl import multiturn  # pylint: disable=import-outside-toplevel
      turn_texts = [rounds[j]["turn_texts"][i] for j, i in rows]
      golds = [getattr(x, "gold_calls", None) for x in picked for _ in range(n)]
      batch = batch._replace(turn_rewards=multiturn.matchtir_turn_rewards(
          turn_texts, golds, outcome, num_turns=r.max_turns, parse_calls=envs.tool_calls))
    elif cfg.advantage == "igpo":  # IGPO: the gold answer's probability after each turn
      batch = batch._replace(turn_rewards=igpo_rewards(*policy, batch, [x for x in picked for _ in range(n)], cfg))
    for x in rounds:  # the tool statistics of every sampled row, averaged over the rounds
      for k, v in x["env_stats"].items():
        env_stats[k] = env_stats.get(k, 0.0) + v / len(rounds)
  scorer_stats = {}
  if process_scorer is not None:  # --process_reward: the served PRM's step rewards on these tokens
    proc, scorer_stats = process_scorer([x for x in picked for _ in range(n)], batch.response_tokens,
                                        batch.response_mask)
    batch = batch._replace(process_rewards=proc)
  if r.length_bucket:  # no padding waste: the batch's own lengths, bucketed
    batch = trim_batch(batch, r.length_bucket)
  outcome_all = np.concatenate([x["outcome"] for x in rounds])
  lengths = np.concatenate([x["lengths"] for x in rounds])
  t_gen, t_ver = sum(x["t_gen"] for x in rounds), sum(x["t_ver"] for x in rounds)
  stats = {"outcome/acc_sampled": float(np.mean(outcome_all)), "outcome/acc": float(np.mean(outcome)),
           "filter/pass_frac": float(np.mean(np.concatenate(flags))),
           "filter/fill_frac": float(1.0 - np.mean(in_band)),
           "filter/resample_rounds": float(len(rounds)),
           "response/length_mean": float(lengths.mean()),
           "response/truncated_frac": float((lengths >= r.max_response_length).mean()),
           "response/sampled_tokens": float(lengths.sum()),
           "time/generate": t_gen, "time/verify": t_ver, **scorer_stats, **env_stats}
  return batch, stats
