"""Multi-turn rollouts: the policy acts, an environment answers, the policy acts again.

    out = rollout_turns(generate_fn, tokenizer, prompt_tokens, prompt_mask, records, key,
                        n=4, make_env=envs.make_env("tool:calculator"), max_turns=4,
                        max_response_length=256, eos_ids=(2,))

Each row's response region is the exact interleaving of what the sampler emitted and what the
environment returned, as token ids:

    [ turn 0 ids | observation 0 ids | turn 1 ids | observation 1 ids | turn 2 ids | pad ... ]
      mask 1       observation 1       mask 1       observation 1       mask 1
      turn_id 0    turn_id -1          turn_id 1    turn_id -1          turn_id 2

Exact by construction (the point SkyRL's step-wise training makes about re-tokenising a chat):
the model tokens are the SAMPLED ids, cut only at the token where a stop string completes;
observation text is encoded once and its ids appended; the next turn is sampled from the ids
of the prompt + everything so far, never from re-encoded text. So the trainer's log-probs of the
trained sequence are the sampler's (`logp`) up to float rounding, and token rewards / importance
ratios land on the tokens that were sampled. Observations are attended to (they are context) but
have mask 0: no loss, no implicit-PRM reward, no advantage; turn ids mark the model tokens.

A turn ends at EOS, at a stop string of the environment (e.g. ``</tool>``: the tokens the
sampler produced after the stop are dropped, as vLLM drops text after a stop string), or at the
row's remaining budget. After a stop string the environment's `step(text of the turn)` gives the
observation; the episode ends when the environment says done, the turn ended without a stop
string, `max_turns` turns were taken, or the `max_response_length` tokens of the response region
are used up (observations count against it; an observation that does not fit is cut).

Two drivers, one book-keeping (`_Episodes`: the stop cut, the budget, the environment step, the
observation ids):

* `rollout_turns` (the static sampler, any `GenerateFn`): each turn is one batched call over the
  rows still active (turn 0 shares each prompt's prefill among its n samples; later turns
  re-prefill the row's context). Active rows are padded to a power of two, the context width and
  the turn's token budget to multiples of 64, so the number of compiled programs stays small.
* `rollout_turns_paused` (the continuous engine, `engine.run_episodes`): one run for every turn.
  A row stops inside the jitted decode loop at a stop candidate (a token that can complete a stop
  string, `stop_candidates`); the host checks the real stop string, steps the environment, and
  the observation ids are prefilled into the row's own KV pages at its current length, so the
  prompt and earlier turns are never prefilled again. Keys are per episode (token s of row i's
  turn k: fold_in(fold_in(fold_in(key, k), i), s)), so it samples exactly what `rollout_turns` on
  the engine samples (tested token by token).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

__all__ = ["TurnRollout", "stop_cut", "stop_candidates", "rollout_turns", "rollout_turns_paused", "reprefill_tokens",
           "model_text", "turn_texts_of"]

# generate_fn(context_tokens [N, W], context_mask [N, W], key, num_samples, max_new_tokens, rows)
#   -> (tokens [N*num_samples, max_new], mask, logp): numpy, rows prompt-major, mask 1 up to and
#   including EOS. rows: int [N*num_samples] the episode index of each output row; a sampler with
#   per-row keys (the continuous engine's `row_ids`) draws each episode's tokens with its own key,
#   whatever rows share the call (the static sampler ignores it).
GenerateFn = Callable[[np.ndarray, np.ndarray, jax.Array, int, int], tuple]


class TurnRollout(NamedTuple):
  """Host numpy arrays of N = G·n multi-turn rows (row g·n + i is sample i of prompt g).

  tokens: int32 [N, R] model ids and observation ids, right-padded with `pad_id`.
  mask: float32 [N, R] 1 on model (sampled) tokens: the loss / reward mask.
  observation_mask: float32 [N, R] 1 on observation tokens (attended, never trained).
  logp: float32 [N, R] the sampler's log-probs of the model tokens, 0 elsewhere.
  turn_ids: int32 [N, R] turn index of each model token, -1 on observations and padding.
  num_turns: int32 [N] turns taken.
  turn_texts: per row, the decoded text of each model turn.
  observations: per row, the observation text after each turn ('' when none).
  infos: per row, the environment's info dict of each step.
  env_rewards: float32 [N, max_turns] the environment's reward of each turn.
  """
  tokens: np.ndarray
  mask: np.ndarray
  observation_mask: np.ndarray
  logp: np.ndarray
  turn_ids: np.ndarray
  num_turns: np.ndarray
  turn_texts: list
  observations: list
  infos: list
  env_rewards: np.ndarray


def stop_cut(tokenizer, ids: Sequence[int], stop_strings: Sequence[str]) -> int | None:
  """The shortest prefix length k such that decode(ids[:k]) contains a stop string, or None.

  Decoding is of the sampled ids themselves (special tokens skipped), so the cut falls on the
  token that completes the stop string, wherever the tokenizer split it."""
  if not stop_strings or not len(ids):
    return None
  dec = lambda k: tokenizer.decode(list(ids[:k]), skip_special_tokens=True)
  if not any(s in dec(len(ids)) for s in stop_strings):
    return None
  lo, hi = 1, len(ids)  # containment is monotone in the prefix: binary search the first hit
  while lo < hi:
    mid = (lo + hi) // 2
    if any(s in dec(mid) for s in stop_strings):
      hi = mid
    else:
      lo = mid + 1
  return lo


def _pow2(k: int) -> int:
  return 1 << max(0, int(k - 1).bit_length())


_CANDIDATES: dict = {}


def stop_candidates(tokenizer, stop_strings: Sequence[str]) -> np.ndarray:
  """int32 ids whose decoded text holds the last character of a stop string: the tokens that can
  complete one, on which the engine pauses a row (`engine.run_episodes`) for the host to check
  `stop_cut`. Built once per tokenizer and stop set. A token missing from the table costs no
  exactness: the turn then runs on to EOS or its budget and is cut there, as the per-turn path cuts."""
  ends = sorted({x[-1] for x in stop_strings if x})
  key = (id(tokenizer), tuple(ends))
  if key not in _CANDIDATES:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    _CANDIDATES[key] = np.asarray([i for i, t in enumerate(texts) if any(c in t for c in ends)], np.int32)
  return _CANDIDATES[key]


class _Episodes:
  """Host book-keeping of N = G·n episodes, shared by both rollout paths: each row's ids, log-probs
  and turn kinds so far, its environment, and what a finished turn keeps and appends."""

  def __init__(self, tokenizer, records, n: int, make_env, max_turns: int, R: int, eos_ids):
    self.tokenizer, self.max_turns, self.R = tokenizer, max_turns, R
    self.eos = set(int(e) for e in eos_ids)
    N = len(records) * n
    self.envs = [make_env() for _ in range(N)]
    self.ids = [[] for _ in range(N)]
    self.lps = [[] for _ in range(N)]
    self.kind = [[] for _ in range(N)]  # per token: turn index (>= 0) or -1 for an observation
    self.texts = [[] for _ in range(N)]
    self.obs_texts = [[] for _ in range(N)]
    self.infos = [[] for _ in range(N)]
    self.env_rewards = np.zeros((N, max_turns), np.float32)
    self.first = [env.reset(records[i // n]) for i, env in enumerate(self.envs)]
    for i, text in enumerate(self.first):
      self._put_observation(i, text)
    self.stops = [tuple(getattr(env, "stop_strings", ()) or ()) for env in self.envs]
    self.active = [self.room(i) > 0 for i in range(N)]  # the row takes another turn

  def room(self, i: int) -> int:
    return self.R - len(self.ids[i])

  def _put_observation(self, i: int, text: str) -> list:
    """Appends the observation's ids, cut to the room left; returns them."""
    o = self.tokenizer.encode(text, add_special_tokens=False)[:max(self.room(i), 0)] if text else []
    self.ids[i] += list(o)
    self.lps[i] += [0.0] * len(o)
    self.kind[i] += [-1] * len(o)
    return list(o)

  def turn_over(self, i: int, new: Sequence[int]) -> bool:
    """Whether a turn sampled so far (`new`) is finished: EOS, its budget, or a stop string."""
    return (len(new) >= self.room(i) or (bool(len(new)) and int(new[-1]) in self.eos)
            or stop_cut(self.tokenizer, new, self.stops[i]) is not None)

  def end_turn(self, i: int, turn: int, new: Sequence[int], new_lp: Sequence[float]) -> tuple:
    """Row i's turn `turn` sampled `new` (to EOS, the sampler's budget, or past a stop string):
    keeps the ids up to the stop string and within the room left, steps the environment with
    their text, appends its observation. Returns (kept, observation ids), the ids None when the
    episode is over (done, no stop string, EOS, max_turns, or the response region full)."""
    new, new_lp = [int(x) for x in new], [float(x) for x in new_lp]
    eos = self.eos
    cut = stop_cut(self.tokenizer, [x for x in new if x not in eos] if new and new[-1] in eos else new,
                   self.stops[i])
    stopped = cut is not None
    if stopped:
      new, new_lp = new[:cut], new_lp[:cut]
    ended = bool(new) and new[-1] in eos
    room = self.room(i)
    full = len(new) >= room
    new, new_lp = new[:room], new_lp[:room]
    self.ids[i] += new
    self.lps[i] += new_lp
    self.kind[i] += [turn] * len(new)
    text = self.tokenizer.decode(new, skip_special_tokens=True)
    self.texts[i].append(text)
    res = self.envs[i].step(text)
    self.env_rewards[i, turn] = float(res.reward)
    self.infos[i].append(dict(res.info or {}))
    obs = res.observation if (stopped and not ended and not full and not res.done) else ""
    self.obs_texts[i].append(obs)
    o = self._put_observation(i, obs) if obs else []
    if not obs or turn == self.max_turns - 1 or self.room(i) <= 0:
      self.active[i] = False
    return len(new), (o if self.active[i] else None)

  def result(self, pad_id: int) -> TurnRollout:
    N, R = len(self.ids), self.R
    tokens = np.full((N, R), pad_id, np.int32)
    mask = np.zeros((N, R), np.float32)
    obs_mask = np.zeros((N, R), np.float32)
    logp = np.zeros((N, R), np.float32)
    turn_ids = np.full((N, R), -1, np.int32)
    for i in range(N):
      k = np.asarray(self.kind[i], np.int32)
      L = len(self.ids[i])
      tokens[i, :L] = self.ids[i]
      logp[i, :L] = self.lps[i]
      mask[i, :L] = k >= 0
      obs_mask[i, :L] = k < 0
      turn_ids[i, :L] = k
    return TurnRollout(tokens, mask, obs_mask, logp, turn_ids,
                       np.asarray([len(x) for x in self.texts], np.int32), self.texts, self.obs_texts,
                       self.infos, self.env_rewards)


def _check_args(prompt_tokens, records, max_turns, name):
  if len(records) != prompt_tokens.shape[0]:
    raise ValueError(f"{name}: {len(records)} records for {prompt_tokens.shape[0]} prompts")
  if max_turns < 1:
    raise ValueError(f"{name}: max_turns must be >= 1, got {max_turns}")


def rollout_turns(generate_fn: GenerateFn, tokenizer, prompt_tokens, prompt_mask, records, key, *, n: int,
                  make_env: Callable[[], object], max_turns: int, max_response_length: int,
                  eos_ids: Sequence[int], pad_id: int = 0, width_bucket: int = 64) -> TurnRollout:
  """Samples n multi-turn episodes for each of the G prompts, one sampler call per turn (see the
  module docstring).

  Args:
    generate_fn: the sampler (`GenerateFn` above), e.g. `sampling.generate` bound to the params,
      model config and sampling settings.
    tokenizer: decodes model turns, encodes observations (`encode(text, add_special_tokens=False)`).
    prompt_tokens, prompt_mask: [G, P] left-padded prompts.
    records: the G PromptRecords (each environment is `reset` with its row's record).
    key: PRNG key; turn 0 uses it as a single-turn rollout would, turn k > 0 `fold_in(key, k)`
      (and so does turn 0 when an environment's reset gave a first observation).
    n: samples per prompt.
    make_env: builds one environment (`envs.Environment`) per row.
    max_turns: turns per episode (>= 1).
    max_response_length: R, the response region's width (model + observation tokens).
    eos_ids: the ids that end a turn and the episode.
  """
  pt, pm = np.asarray(prompt_tokens), np.asarray(prompt_mask)
  _check_args(pt, records, max_turns, "rollout_turns")
  g, R = pt.shape[0], int(max_response_length)
  N = g * n
  prompts = [pt[i][pm[i] > 0].tolist() for i in range(g)]
  eps = _Episodes(tokenizer, records, n, make_env, max_turns, R, eos_ids)
  for turn in range(max_turns):
    rows = [i for i in range(N) if eps.active[i]]
    if not rows:
      break
    if turn == 0 and not any(eps.first):  # the single-turn call: n samples share each prompt's prefill
      tok, msk, lp = generate_fn(pt, pm, key, n, R, np.arange(N, dtype=np.int32))
      outs = {i: (tok[i], msk[i], lp[i]) for i in rows}
    else:
      ctx = [prompts[i // n] + eps.ids[i] for i in rows]
      width = -(-max(len(c) for c in ctx) // width_bucket) * width_bucket
      m = _pow2(len(rows))
      ct = np.full((m, width), pad_id, np.int32)
      cm = np.zeros((m, width), np.int32)
      for j in range(m):  # rows beyond the active ones repeat the first (outputs dropped)
        c = ctx[j] if j < len(ctx) else ctx[0]
        ct[j, width - len(c):] = c
        cm[j, width - len(c):] = 1
      room = max(eps.room(i) for i in rows)
      max_new = min(R, -(-room // width_bucket) * width_bucket)
      ids = np.asarray(rows + [rows[0]] * (m - len(rows)), np.int32)
      tok, msk, lp = generate_fn(ct, cm, jax.random.fold_in(key, turn), 1, max_new, ids)
      outs = {i: (tok[j], msk[j], lp[j]) for j, i in enumerate(rows)}
    for i in rows:
      t, mk, l = outs[i]
      length = int(np.sum(np.asarray(mk) > 0))
      eps.end_turn(i, turn, np.asarray(t[:length]), np.asarray(l[:length]))
  return eps.result(pad_id)


# run_fn(context_tokens [M, W], context_mask [M, W], key, *, num_samples, max_new_per_row [M·ns],
#   row_ids [M·ns], salt, step_fn, stop_token_ids) -> engine.EngineStats: `engine.run_episodes`
#   bound to the params, model config, sampling settings and max_new_tokens = R.
RunEpisodesFn = Callable[..., object]


def rollout_turns_paused(run_fn: RunEpisodesFn, tokenizer, prompt_tokens, prompt_mask, records, key, *,
                         n: int, make_env: Callable[[], object], max_turns: int, max_response_length: int,
                         eos_ids: Sequence[int], pad_id: int = 0, stop_token_ids=None) -> tuple:
  """`rollout_turns` on the continuous engine with paused rows: the same episodes (ids, masks,
  turn ids, the sampler's log-probs; the same keys: token s of row i's turn k is drawn with
  fold_in(fold_in(fold_in(key, k), i), s), turn 0 with `key` itself unless a first observation),
  but one engine run for all turns. A row stops sampling at a stop candidate
  (`stop_candidates`, or `stop_token_ids`), EOS or the room left; the host checks `stop_cut` (a
  false candidate resumes the turn), steps the environment, and the engine prefills only the
  observation into the row's live pages (`engine.run_episodes`) instead of re-prefilling the
  prompt and every earlier turn. Returns (TurnRollout, EngineStats)."""
  pt, pm = np.asarray(prompt_tokens), np.asarray(prompt_mask)
  _check_args(pt, records, max_turns, "rollout_turns_paused")
  from jaxrl_dense.sampling.engine import engine as engine_lib  # pylint: disable=import-outside-toplevel
  g, R = pt.shape[0], int(max_response_length)
  N = g * n
  eps = _Episodes(tokenizer, records, n, make_env, max_turns, R, eos_ids)
  if stop_token_ids is None:
    stop_token_ids = stop_candidates(tokenizer, sorted({x for st in eps.stops for x in st}))
  turn = [0] * N

  def step_fn(r, tokens, logp):
    i = rows[r]
    if not eps.turn_over(i, tokens):
      return engine_lib.RESUME  # a candidate that completes no stop string
    kept, obs = eps.end_turn(i, turn[i], tokens, logp)
    turn[i] += 1
    if obs is None:
      return None
    return engine_lib.NextTurn(keep=kept, observation=obs, max_new=eps.room(i), salt=turn[i])

  rows = [i for i in range(N) if eps.active[i]]
  if not rows:
    return eps.result(pad_id), None
  if not any(eps.first):  # turn 0 as the single-turn call: n samples share each prompt's prefill
    ct, cm, ns, salt = pt, pm, n, -1
  else:
    ctx = [pt[i // n][pm[i // n] > 0].tolist() + eps.ids[i] for i in rows]
    width = max(len(c) for c in ctx)
    ct = np.zeros((len(rows), width), np.int32)
    cm = np.zeros((len(rows), width), np.int32)
    for j, c in enumerate(ctx):
      ct[j, width - len(c):], cm[j, width - len(c):] = c, 1
    ns, salt = 1, 0
  stats = run_fn(ct, cm, key, num_samples=ns, max_new_per_row=np.asarray([eps.room(i) for i in rows], np.int32),
                 row_ids=np.asarray(rows, np.int32), salt=salt, step_fn=step_fn,
                 stop_token_ids=np.asarray(stop_token_ids, np.int32))
  return eps.result(pad_id), stats


def reprefill_tokens(out: TurnRollout, prompt_lengths: Sequence[int], n: int) -> int:
  """Context tokens the per-turn path (`rollout_turns`) prefills for these episodes: each prompt
  once at turn 0 (its n samples share it; with a first observation, each row's context), then at
  every turn k > 0 each row's prompt and every response token before the turn."""
  total = 0
  for b in range(out.tokens.shape[0]):
    plen = int(prompt_lengths[b // n])
    first = np.flatnonzero(out.turn_ids[b] == 0)
    lead = int(first[0]) if first.size else 0  # a first observation
    if lead or b % n == 0:
      total += plen + lead
    for k in range(1, int(out.num_turns[b])):
      pos = np.flatnonzero(out.turn_ids[b] == k)
      total += plen + int(pos[0]) if pos.size else 0
  return total


def model_text(turn_texts: Sequence[str]) -> str:
  """The text a verifier scores: the model's turns only, joined (an observation, e.g. a tool's
  printed number, can never be taken for the model's answer)."""
  return "".join(turn_texts)


def turn_texts_of(tokenizer, tokens, turn_ids, num_turns: int) -> list:
  """Per row, the decoded text of each model turn, from the token layout (for sample pages)."""
  tokens, turn_ids = np.asarray(tokens), np.asarray(turn_ids)
  return [[tokenizer.decode(tokens[b][turn_ids[b] == k].tolist(), skip_special_tokens=True)
           for k in range(num_turns) if np.any(turn_ids[b] == k)] for b in range(tokens.shape[0])]
