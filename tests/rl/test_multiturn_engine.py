"""Multi-turn episodes on the continuous engine with paused rows (`engine.run_episodes`,
`multiturn.rollout_turns_paused`): a row stops at a stop candidate, keeps its KV pages while the
host steps the environment, the observation is prefilled into the same row, and the turn resumes.
The episodes are exactly the per-turn path's (`rollout_turns` with one engine call per turn, each
re-prefilling the context): same ids, masks, turn ids and keys, log-probs within float rounding."""
import dataclasses
import jax
import numpy as np
import optax
import pytest
from tests.rl import test_multiturn

from jaxrl_dense.sampling import engine as engine_lib
from jaxrl_dense import envs
from jaxrl_dense.models import ModelConfig, forward, init_params
from jaxrl_dense.models import tokenizer as tok_lib
from jaxrl_dense.rl import multiturn

CONFIG = ModelConfig(model_type="llama", vocab_size=104, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     eos_token_ids=(2,), pad_token_id=0)
# 4 slots for 8 rows (rows wait while others pause), pages of 4 tokens, 4 decode steps per call;
# one decode width and prefill bucket, few table spans (few compiled programs)
ENGINE = engine_lib.EngineConfig(page_size=4, max_slots=4, steps_per_call=4, prefill_chunk=16,
                                 min_prefill_bucket=16, min_decode_width=4, min_table_tokens=64)
# The per-turn reference runs another schedule (the keys are per episode, not per slot or call):
# one prefill bucket and decode width, so its many context lengths compile few programs.
REF_ENGINE = engine_lib.EngineConfig(page_size=16, max_slots=8, steps_per_call=8, prefill_chunk=128,
                                     min_prefill_bucket=128, min_decode_width=8, min_table_tokens=128)
# Vowels stop a turn; "1" followed by a digit too, so a lone digit is a candidate that completes no
# stop string (the row resumes its turn: a false stop).
STOPS = list("aeiou") + ["1" + d for d in "0123456789"]


def ScriptedEnv(first=""):  # pylint: disable=invalid-name
  """tests/rl/test_multiturn.py's scripted tool env stopping at STOPS: answers a turn that holds a stop
  string with a fixed observation; a turn without one ends the episode."""
  return test_multiturn.ScriptedEnv(stop=STOPS, observation="<r>ok</r>", first=first)


@pytest.fixture(scope="module")
def chars():
  return tok_lib.char_chat_tokenizer()


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.PRNGKey(1))


def _prompts(chars, texts, width=16):
  pt = np.zeros((len(texts), width), np.int32)
  pm = np.zeros((len(texts), width), np.int32)
  for i, t in enumerate(texts):
    ids = chars.encode(t, add_special_tokens=False)
    pt[i, width - len(ids):], pm[i, width - len(ids):] = ids, 1
  return pt, pm


def _episodes(params, chars, pt, pm, key, *, paused, n=4, first="", max_turns=4, R=64,
              temperature=1.0, make_env=None):
  """The same episodes by either path: one engine call per turn, or one paused-row engine run."""
  make_env = make_env or (lambda: ScriptedEnv(first))
  kw = dict(n=n, make_env=make_env, max_turns=max_turns, max_response_length=R, eos_ids=(2,))
  records = [None] * pt.shape[0]
  if paused:
    def run_fn(ctx, cmask, k, **a):
      return engine_lib.run_episodes(params, CONFIG, ctx, cmask, k, max_new_tokens=R,
                                     temperature=temperature, engine=ENGINE, **a)
    return multiturn.rollout_turns_paused(run_fn, chars, pt, pm, records, key, **kw)

  def generate_fn(ctx, cmask, k, num_samples, max_new, rows=None):
    out, _ = engine_lib.run(params, CONFIG, ctx, cmask, k, max_new_tokens=max_new, temperature=temperature,
                            num_samples=num_samples, row_ids=rows, engine=REF_ENGINE)
    return tuple(np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
  return multiturn.rollout_turns(generate_fn, chars, pt, pm, records, key, **kw), None


def _assert_same(a, b):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.observation_mask, b.observation_mask)
  np.testing.assert_array_equal(a.turn_ids, b.turn_ids)
  np.testing.assert_allclose(a.logp, b.logp, atol=2e-5)
  assert a.turn_texts == b.turn_texts and a.observations == b.observations


def _both_paths(chars, params, first):
  """(first, prompts, per-turn episodes, paused episodes, the paused run's EngineStats)."""
  pt, pm = _prompts(chars, ["What is 3+4?", "Hi"])
  key = jax.random.PRNGKey(3)
  ref, _ = _episodes(params, chars, pt, pm, key, paused=False, first=first)
  out, st = _episodes(params, chars, pt, pm, key, paused=True, first=first)
  return first, (pt, pm), ref, out, st


@pytest.fixture(scope="module")
def plain(chars, params):
  return _both_paths(chars, params, "")


@pytest.fixture(scope="module")
def opened(chars, params):  # environments that open with an observation
  return _both_paths(chars, params, "go:")


@pytest.mark.parametrize("paths", ["plain", "opened"])
def test_paused_rows_equal_per_turn_re_prefill(chars, paths, request):
  """Several rows with different turn counts (stop strings, EOS, max_turns, the response budget),
  4 slots for 8 rows: the paused-row run gives the per-turn episodes
  token by token; it prefills the prompt once and then only observations; every page is freed;
  false candidates resumed their turns. `first`: environments that open with an observation
  (turn 0 is then keyed fold_in(key, 0) on each row's own context)."""
  first, (pt, pm), ref, out, st = request.getfixturevalue(paths)
  _assert_same(out, ref)
  assert len(set(out.num_turns.tolist())) >= 2 and out.num_turns.max() >= 3  # the rows differ
  assert out.observation_mask.sum() > 0
  assert st.pages_in_use_at_end == 0  # (run_episodes also ran PagePool.check_all_free)
  assert st.false_stops > 0  # lone digits: candidates that completed no stop string
  assert st.resumed_turns == int((out.num_turns - 1).sum())  # every later turn started in place
  # prefilled: each context once (a prompt shared by its 4 samples), then per resumed turn the
  # turn's last kept token and the observation; the per-turn path prefills far more
  plens = pm.sum(axis=1)
  ctx = sum(int(plens[b // 4]) + len(first) for b in range(8)) if first else int(plens.sum())
  fed = sum(1 + len(chars.encode(out.observations[b][k], add_special_tokens=False))
            for b in range(8) for k in range(int(out.num_turns[b]) - 1))
  assert st.prefill_real_tokens == ctx + fed
  assert st.prefill_real_tokens < multiturn.reprefill_tokens(out, plens, 4)


@pytest.mark.parametrize("paths", ["plain", "opened"])
def test_trainer_scores_the_paused_batch_as_the_engine_sampled(params, paths, request):
  """The update's scoring pass over RolloutBatch.sequences() gives the engine's log-probs on
  every model token of every turn of the paused-row batch (observations attended, not scored)."""
  first, (pt, pm), _, out, _ = request.getfixturevalue(paths)
  assert out.num_turns.max() >= 3
  if first:  # the first observation is part of the response region, before turn 0
    assert (out.observation_mask[:, :3] == 1).all()
  test_multiturn.assert_scoring_equals_sampler(CONFIG, params, pt, pm, out)


def test_control_observation_prefilled_at_the_wrong_start_is_caught(chars, params, plain, monkeypatch):
  """Control: resuming a row without re-feeding its last kept token (the observation written one
  position late, the stop token's KV never cached) changes later turns, and the equality fails."""
  _, (pt, pm), ref, _, _ = plain
  key = jax.random.PRNGKey(3)
  good = engine_lib.engine._resume_tokens
  monkeypatch.setattr(engine_lib.engine, "_resume_tokens",
                      lambda toks, start, keep, obs: (good(toks, start, keep, obs)[0][1:], start + keep))
  bad, st = _episodes(params, chars, pt, pm, key, paused=True)
  assert st.resumed_turns > 0
  with pytest.raises(AssertionError):
    _assert_same(bad, ref)
  first_turn = ref.turn_ids == 0  # turn 0 never reads a resumed context: still identical there
  np.testing.assert_allclose(bad.logp[first_turn], ref.logp[first_turn], atol=2e-5)


def test_step_fn_contract_errors_name_the_problem(chars, params):
  pt, pm = _prompts(chars, ["Hi"])
  run = lambda fn, **kw: engine_lib.run_episodes(params, CONFIG, pt, pm, jax.random.PRNGKey(0), step_fn=fn,
                                                 stop_token_ids=[5], max_new_tokens=4, engine=ENGINE, **kw)
  with pytest.raises(RuntimeError, match="resumed row 0 after its budget"):
    run(lambda r, t, lp: engine_lib.RESUME)
  with pytest.raises(ValueError, match="keep must be in"):
    run(lambda r, t, lp: engine_lib.NextTurn(keep=len(t) + 1, observation=[4], max_new=1, salt=1))
  with pytest.raises(ValueError, match="exceeds the pages reserved"):
    run(lambda r, t, lp: engine_lib.NextTurn(keep=len(t), observation=[4] * 40, max_new=8, salt=1))
  with pytest.raises(ValueError, match="stop_token_ids must lie in"):
    engine_lib.run_episodes(params, CONFIG, pt, pm, jax.random.PRNGKey(0), step_fn=lambda *a: None,
                            stop_token_ids=[CONFIG.vocab_size], max_new_tokens=4)


# ------------------------------------------------------------------------------------------------
# A 3-turn calculator episode: a tiny char-level model trained (a few hundred Adam steps on CPU) to
# call the real calculator twice and then answer.
PROMPT = "2+3 then *2?"
TURNS = ["<tool>calculator: 2+3</tool>", "<tool>calculator: 5*2</tool>", "The answer is 10."]
OBS = ["\n<result>5</result>\n", "\n<result>10</result>\n"]
TOOL_CONFIG = ModelConfig(model_type="llama", vocab_size=104, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          eos_token_ids=(2,), pad_token_id=0)


@pytest.fixture(scope="module")
def tool_model(chars):
  """Params that write TURNS[k] after the prompt and k observations (teacher-forced memorisation)."""
  eos = chars.convert_tokens_to_ids("<|im_end|>")
  cfg = dataclasses.replace(TOOL_CONFIG, eos_token_ids=(eos,))
  enc = lambda t: chars.encode(t, add_special_tokens=False)
  seq = enc(PROMPT) + enc(TURNS[0]) + enc(OBS[0]) + enc(TURNS[1]) + enc(OBS[1]) + enc(TURNS[2]) + [eos]
  tokens = np.asarray([seq], np.int32)
  params = init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.adam(3e-3)

  @jax.jit
  def step(p, s):
    def loss(p):
      logits = forward(p, cfg, tokens[:, :-1], np.ones_like(tokens[:, :-1]))
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    l, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  state = opt.init(params)
  for _ in range(400):
    params, state, l = step(params, state)
  assert float(l) < 0.05, float(l)
  return cfg, params


def test_three_turn_calculator_episode_token_by_token(chars, tool_model):
  """The trained model through the engine with the real calculator (ToolEnv): turn 0 pauses at
  '>' of '<tool>' (a false stop) and at '</tool>', the calculator's result is prefilled into the
  row, and so on for 3 turns; ids, masks, turn ids token by token; the per-turn path agrees."""
  cfg, params = tool_model
  eos = cfg.eos_token_ids[0]
  enc = lambda t: chars.encode(t, add_special_tokens=False)
  pt, pm = _prompts(chars, [PROMPT])
  make_env = envs.make_env("tool:calculator", max_turns=4)
  R = 128

  def run_fn(ctx, cmask, k, **a):
    return engine_lib.run_episodes(params, cfg, ctx, cmask, k, max_new_tokens=R, temperature=0.0,
                                   engine=ENGINE, **a)
  out, st = multiturn.rollout_turns_paused(run_fn, chars, pt, pm, [None], jax.random.PRNGKey(0), n=1,
                                           make_env=make_env, max_turns=4, max_response_length=R,
                                           eos_ids=(eos,))
  t0, t1, t2 = enc(TURNS[0]), enc(TURNS[1]), enc(TURNS[2]) + [eos]
  o0, o1 = enc(OBS[0]), enc(OBS[1])
  want = t0 + o0 + t1 + o1 + t2
  L = len(want)
  np.testing.assert_array_equal(out.tokens[0, :L], want)
  assert (out.tokens[0, L:] == 0).all()
  kinds = [0] * len(t0) + [-1] * len(o0) + [1] * len(t1) + [-1] * len(o1) + [2] * len(t2)
  np.testing.assert_array_equal(out.turn_ids[0, :L], kinds)
  assert (out.turn_ids[0, L:] == -1).all()
  np.testing.assert_array_equal(out.mask[0], np.asarray(kinds + [-1] * (R - L)) >= 0)
  np.testing.assert_array_equal(out.observation_mask[0, :L], np.asarray(kinds) < 0)
  assert out.observation_mask[0, L:].sum() == 0
  assert (out.logp[0][out.mask[0] == 0] == 0).all()
  assert out.num_turns.tolist() == [3] and out.turn_texts[0] == TURNS
  assert out.observations[0] == OBS + [""]
  assert [i["call"]["arguments"]["expression"] for i in out.infos[0][:2]] == ["2+3", "5*2"]
  # pauses: '>' of '<tool>' (false), '>' of '</tool>' (a call), twice; then EOS
  assert st.false_stops == 2 and st.resumed_turns == 2 and st.pauses == 5
  assert st.pages_in_use_at_end == 0
  # prefilled: the prompt once, then per call its last token + the result (no re-prefill)
  assert st.prefill_real_tokens == int(pm.sum()) + (1 + len(o0)) + (1 + len(o1))
  assert multiturn.reprefill_tokens(out, pm.sum(axis=1), 1) == (
      3 * int(pm.sum()) + len(t0 + o0) + len(t0 + o0 + t1 + o1))

  def generate_fn(ctx, cmask, k, num_samples, max_new, rows=None):
    o, _ = engine_lib.run(params, cfg, ctx, cmask, k, max_new_tokens=max_new, temperature=0.0,
                          num_samples=num_samples, row_ids=rows, engine=REF_ENGINE)
    return tuple(np.asarray(x) for x in (o.tokens, o.mask, o.logprobs))
  ref = multiturn.rollout_turns(generate_fn, chars, pt, pm, [None], jax.random.PRNGKey(0), n=1,
                                make_env=make_env, max_turns=4, max_response_length=R, eos_ids=(eos,))
  _assert_same(out, ref)


def test_eval_with_paused_rows_gives_the_per_turn_episodes(chars, params):
  """`evaluation.evaluate(env=..., paused=True)` (the trainer's eval under
  --rollout_engine=continuous) scores the episodes that one engine call per turn gives on the
  same encoded prompts and key (sampled: the keys are per episode and turn, not per call)."""
  from jaxrl_dense.eval import loop as evaluation
  from jaxrl_dense.data import batching
  from jaxrl_dense.data.records import PromptRecord
  recs = [PromptRecord(prompt_messages=({"role": "user", "content": q},), gold="x", data_source="t",
                       uid=f"t:{i}") for i, q in enumerate(["What is 3+4?", "Hi", "Go 12"])]
  verify = lambda texts, golds, sources: [float(len(t) % 2) for t in texts]
  res = evaluation.evaluate(params, CONFIG, chars, recs, max_new_tokens=48, batch_size=3,
                            verify_fn=verify, env=lambda: ScriptedEnv(), max_turns=4, eos_ids=(2,),
                            temperature=1.0, num_samples=4, paused=True)
  enc = batching.PromptEncoder(chars, max_prompt_length=1024)
  width = batching.bucket_length(max(len(enc.encode(r.prompt_messages)) for r in recs),
                                 enc.bucket_multiple, enc.max_prompt_length)
  pb = enc.batch(recs, pad_to=width, num_rows=3)
  key = jax.random.fold_in(jax.random.key(0), 0)  # evaluate's key of batch 0 (seed 0)
  ref, _ = _episodes(params, chars, np.asarray(pb.tokens), np.asarray(pb.mask), key, paused=False,
                     n=4, R=48, temperature=1.0)
  got = [e for p in res.problems for e in p["episodes"]]
  assert [e["turns"] for e in got] == ref.turn_texts
  assert [e["observations"] for e in got] == ref.observations
  assert max(len(e["turns"]) for e in got) >= 3  # a multi-turn eval
  texts = [multiturn.model_text(t) for t in ref.turn_texts]
  assert [x for p in res.problems for x in p["scores"]] == verify(texts, None, None)
