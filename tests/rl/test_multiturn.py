"""Multi-turn rollouts (rl/multiturn.py): the trained sequence is exactly the sampled ids plus the
observation ids, observations are masked out of the loss, turn ids mark the model tokens, and the
trainer's log-probs of the assembled rows equal the sampler's."""
from typing import NamedTuple

import jax
import numpy as np
import pytest

from jaxrl_dense import sampling
from jaxrl_dense.models import ModelConfig, init_params
from jaxrl_dense.models import tokenizer as tok_lib
from jaxrl_dense.rl import multiturn, steps
from jaxrl_dense.rl.batch import RolloutBatch, trim_batch


class _Step(NamedTuple):
  observation: str
  reward: float
  done: bool
  info: dict


class ScriptedEnv:
  """Answers every turn that ends in `stop` with a fixed observation; ends the episode on a turn
  without it (the tool-env contract of jaxrl_dense.envs)."""

  def __init__(self, stop="</tool>", observation="\n<result>7</result>\n", first=""):
    self.stop_strings = tuple(stop) if isinstance(stop, (list, tuple)) else (stop,)
    self.observation = observation
    self.first = first  # the observation the episode opens with ('' for none)
    self.actions = []

  def reset(self, record):
    return self.first

  def step(self, action):
    self.actions.append(action)
    if any(x in action for x in self.stop_strings):
      return _Step(self.observation, 0.0, False, {"tool": "calc", "error": None})
    return _Step("", 0.0, True, {})


def assert_scoring_equals_sampler(config, params, pt, pm, out, n=4):
  """The update's scoring pass over the episodes' RolloutBatch gives the sampler's log-probs on
  every model token (observations attended, not scored). Returns (score fn, batch)."""
  rows = out.tokens.shape[0]
  batch = RolloutBatch(prompt_tokens=np.repeat(pt, n, 0), prompt_mask=np.repeat(pm, n, 0),
                       response_tokens=out.tokens, response_mask=out.mask, outcome=np.zeros(rows, np.float32),
                       sampler_logp=out.logp, observation_mask=out.observation_mask, turn_ids=out.turn_ids)
  batch.check(n)
  score = jax.jit(steps.make_scoring(config, micro_batch_size=rows, with_policy=True, with_ref=False,
                             with_prm=False, with_entropy=False))
  old = np.asarray(score(params, None, None, batch.sequences())["old_logp"])
  np.testing.assert_allclose(old * out.mask, out.logp, atol=2e-5)
  return score, batch


@pytest.fixture(scope="module")
def chars():
  return tok_lib.char_chat_tokenizer()


def _ids(tok, text):
  return tok.encode(text, add_special_tokens=False)


def test_stop_cut_finds_the_token_that_completes_the_stop(chars):
  ids = _ids(chars, "ab</tool>cd")
  assert multiturn.stop_cut(chars, ids, ("</tool>",)) == len("ab</tool>")
  assert multiturn.stop_cut(chars, ids, ("zz",)) is None
  assert multiturn.stop_cut(chars, ids, ()) is None
  assert multiturn.stop_cut(chars, _ids(chars, "</tool>"), ("</tool>",)) == 7


def test_scripted_three_turn_episode_token_by_token(chars):
  """Two tool calls then an answer: ids, masks, turn ids and sampler log-probs at each position."""
  eos = chars.convert_tokens_to_ids("<|im_end|>")
  turns = ["x=<tool>calc: 3+4</tool>JUNK", "<tool>calc: 7*1</tool>", "The answer is 7."]
  calls = []

  def generate_fn(ctx, cmask, key, num_samples, max_new, rows=None):
    k = len(calls)
    calls.append((np.asarray(ctx), np.asarray(cmask), num_samples, max_new))
    ids = _ids(chars, turns[k]) + ([eos] if k == 2 else [])
    rows = ctx.shape[0] * num_samples
    tok = np.zeros((rows, max_new), np.int32)
    msk = np.zeros((rows, max_new), np.int32)
    lp = np.zeros((rows, max_new), np.float32)
    tok[:, :len(ids)] = ids
    msk[:, :len(ids)] = 1
    lp[:, :len(ids)] = -(np.arange(len(ids)) + 1) / 100.0 - k  # distinct per turn and position
    return tok, msk, lp

  prompt = _ids(chars, "Q?")
  pt = np.asarray([[0, 0] + prompt], np.int32)
  pm = np.asarray([[0, 0] + [1] * len(prompt)], np.int32)
  envs = []
  make_env = lambda: envs.append(ScriptedEnv()) or envs[-1]
  out = multiturn.rollout_turns(generate_fn, chars, pt, pm, [None], jax.random.PRNGKey(0), n=1,
                                make_env=make_env, max_turns=4, max_response_length=128, eos_ids=(eos,))
  obs = _ids(chars, "\n<result>7</result>\n")
  t0 = _ids(chars, "x=<tool>calc: 3+4</tool>")  # JUNK after the stop string is dropped
  t1 = _ids(chars, "<tool>calc: 7*1</tool>")
  t2 = _ids(chars, "The answer is 7.") + [eos]
  want = t0 + obs + t1 + obs + t2
  L = len(want)
  np.testing.assert_array_equal(out.tokens[0, :L], want)
  assert (out.tokens[0, L:] == 0).all()
  kinds = [0] * len(t0) + [-1] * len(obs) + [1] * len(t1) + [-1] * len(obs) + [2] * len(t2)
  np.testing.assert_array_equal(out.turn_ids[0, :L], kinds)
  assert (out.turn_ids[0, L:] == -1).all()
  np.testing.assert_array_equal(out.mask[0, :L], np.asarray(kinds) >= 0)
  np.testing.assert_array_equal(out.observation_mask[0, :L], np.asarray(kinds) < 0)
  assert out.mask[0, L:].sum() == 0 and out.observation_mask[0, L:].sum() == 0
  # the sampler's log-probs sit on the kept sampled tokens, 0 on observations
  np.testing.assert_allclose(out.logp[0, :len(t0)], -(np.arange(len(t0)) + 1) / 100.0)
  np.testing.assert_allclose(out.logp[0, len(t0) + len(obs):len(t0) + len(obs) + len(t1)],
                             -(np.arange(len(t1)) + 1) / 100.0 - 1)
  assert (out.logp[0][out.observation_mask[0] > 0] == 0).all()
  assert out.num_turns.tolist() == [3]
  assert out.turn_texts[0] == ["x=<tool>calc: 3+4</tool>", "<tool>calc: 7*1</tool>", "The answer is 7."]
  assert envs[0].actions == out.turn_texts[0]
  # turn k > 0 is sampled from the exact ids so far: prompt + turns + observations, left-padded
  for k, upto in ((1, t0 + obs), (2, t0 + obs + t1 + obs)):
    ctx, cmask, ns, _ = calls[k]
    assert ns == 1
    np.testing.assert_array_equal(ctx[0][cmask[0] > 0], prompt + upto)
  # the turn ids are the maximal runs of the model mask (the turn-level estimators' convention)
  from jaxrl_dense.rewards.turn_level import turn_ids_from_mask
  np.testing.assert_array_equal(np.asarray(turn_ids_from_mask(out.mask, 4)), out.turn_ids)
  assert multiturn.model_text(out.turn_texts[0]) == "x=<tool>calc: 3+4</tool><tool>calc: 7*1</tool>The answer is 7."


def test_budget_cuts_observation_and_ends_the_episode(chars):
  """Observations count against --max_response_length; a row that fills it stops."""
  def generate_fn(ctx, cmask, key, num_samples, max_new, rows=None):
    ids = _ids(chars, "<tool>a</tool>")
    tok = np.zeros((ctx.shape[0] * num_samples, max_new), np.int32)
    msk = np.zeros_like(tok)
    k = min(len(ids), max_new)
    tok[:, :k], msk[:, :k] = ids[:k], 1
    return tok, msk, np.zeros(tok.shape, np.float32)

  pt = np.asarray([_ids(chars, "Q")], np.int32)
  out = multiturn.rollout_turns(generate_fn, chars, pt, np.ones_like(pt), [None], jax.random.PRNGKey(0), n=2,
                                make_env=lambda: ScriptedEnv(observation="O" * 30), max_turns=8,
                                max_response_length=40, eos_ids=(2,))
  # 14 call tokens + 26 of the 30 observation tokens fill the 40 slots; nothing after
  for b in range(2):
    assert out.mask[b].sum() == 14 and out.observation_mask[b].sum() == 26
    assert out.num_turns[b] == 1


CONFIG = ModelConfig(model_type="llama", vocab_size=104, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     eos_token_ids=(2,), pad_token_id=0)


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_trainer_logprobs_of_the_assembled_rows_equal_the_sampler(chars, engine):
  """A real (random) model through sampling.generate: the update's scoring pass over
  RolloutBatch.sequences() (observations attended, not scored) gives the sampler's log-probs on
  every model token of every turn: the trained ids and their contexts are the sampled ones."""
  params = init_params(CONFIG, jax.random.PRNGKey(1))

  def generate_fn(ctx, cmask, key, num_samples, max_new, rows=None):
    gen = sampling.generate(params, CONFIG, ctx, cmask, key, max_new_tokens=max_new, temperature=1.0,
                            num_samples=num_samples, prompt_bucket=16, engine=engine)
    return tuple(np.asarray(x) for x in (gen.tokens, gen.mask, gen.logprobs))

  prompts = [_ids(chars, "What is 3+4?"), _ids(chars, "Hi")]
  P = 16
  pt = np.zeros((2, P), np.int32)
  pm = np.zeros((2, P), np.int32)
  for i, p in enumerate(prompts):
    pt[i, P - len(p):], pm[i, P - len(p):] = p, 1
  # a random model emits some of these often: use them as "tool call" stops for several turns
  out = multiturn.rollout_turns(generate_fn, chars, pt, pm, [None, None], jax.random.PRNGKey(3), n=4,
                                make_env=lambda: ScriptedEnv(stop=list("aeiou0123456789"), observation="<r>ok</r>"),
                                max_turns=4, max_response_length=48, eos_ids=(2,))
  assert out.num_turns.max() >= 3 and out.observation_mask.sum() > 0
  from jaxrl_dense.rewards.turn_level import turn_ids_from_mask
  np.testing.assert_array_equal(np.asarray(turn_ids_from_mask(out.mask, 4)), out.turn_ids)
  for b in range(8):  # token by token: turn k's ids decode to its text, each observation to the env's
    for k, text in enumerate(out.turn_texts[b]):
      assert chars.decode(out.tokens[b][out.turn_ids[b] == k].tolist(), skip_special_tokens=True) == text
    o = out.observation_mask[b] > 0
    runs = np.split(out.tokens[b][o], np.flatnonzero(np.diff(np.flatnonzero(o)) > 1) + 1) if o.any() else []
    for j, run in enumerate(runs):
      got = chars.decode(run.tolist())
      assert got == "<r>ok</r>" or (j == len(runs) - 1 and "<r>ok</r>".startswith(got)), got
  score, batch = assert_scoring_equals_sampler(CONFIG, params, pt, pm, out)
  # control: without the observations in the attention mask the log-probs of later turns differ
  seq = batch._replace(observation_mask=None).sequences()
  wrong = np.asarray(score(params, None, None, seq)["old_logp"])
  later = (out.turn_ids > 0)
  assert np.abs((wrong - out.logp)[later]).max() > 1e-2
  # trimming keeps observations (the response extent counts them)
  t = trim_batch(batch, 8)
  assert t.response_tokens.shape[1] >= int(batch.response_lengths().max())
  np.testing.assert_array_equal(t.observation_mask, out.observation_mask[:, :t.response_tokens.shape[1]])


def test_the_batch_keeps_sampled_ids_that_re_encoding_would_change(smollm2):
  """BPE: a sampled split of a word decodes to text that re-encodes to different ids; the
  rollout keeps the sampled ids (and so their log-probs), not a re-tokenisation."""
  tok = smollm2.tokenizer
  word = _ids(tok, " calculator")
  pieces = [i for ch in " calculator" for i in _ids(tok, ch)]  # one id per character
  assert tok.decode(pieces) == " calculator" and _ids(tok, tok.decode(pieces)) == word != pieces
  sampled = pieces + _ids(tok, "<tool>x</tool>")

  turn = []

  def generate_fn(ctx, cmask, key, num_samples, max_new, rows=None):
    out = np.zeros((ctx.shape[0] * num_samples, max_new), np.int32)
    m = np.zeros_like(out)
    s = sampled if not turn else _ids(tok, "done") + [smollm2.config.eos_token_ids[0]]
    turn.append(1)
    out[:, :len(s)], m[:, :len(s)] = s, 1
    return out, m, np.zeros(out.shape, np.float32)

  pt = np.asarray([_ids(tok, "Q")], np.int32)
  out = multiturn.rollout_turns(generate_fn, tok, pt, np.ones_like(pt), [None], jax.random.PRNGKey(0), n=1,
                                make_env=lambda: ScriptedEnv(), max_turns=2, max_response_length=64,
                                eos_ids=smollm2.config.eos_token_ids)
  np.testing.assert_array_equal(out.tokens[0, :len(sampled)], sampled)
  re_encoded = _ids(tok, out.turn_texts[0][0])
  assert re_encoded != sampled  # what a re-tokenising pipeline would train on
