"""Tests for jaxrl_dense.eval.loop on a tiny random model with a tiny chat tokenizer."""
import json

import jax
import numpy as np
import pytest

from jaxrl_dense import sampling
from jaxrl_dense.eval import estimators, loop as evaluation, prm as eval_prm
from jaxrl_dense.data import arithmetic, batching
from jaxrl_dense.models import transformer
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.models.tokenizer import char_chat_tokenizer as tiny_chat_tokenizer

MAX_NEW = 8


@pytest.fixture(scope="module")
def setup():
  tok = tiny_chat_tokenizer()
  config = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512,
                       eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
  params = transformer.init_params(config, jax.random.key(0))
  task = arithmetic.ArithmeticTask(ops=("+",), max_digits=1, num_eval=5, num_shots=1)
  _, records = arithmetic.make_splits(task)
  return tok, config, params, records


def _len_parity_verifier(texts, golds, sources):
  assert all(s == "arithmetic" for s in sources)
  assert len(texts) == len(golds)
  return [float(len(t) % 2 == 0) for t in texts]


def test_greedy_matches_direct_generation(setup):
  tok, config, params, records = setup
  res = evaluation.evaluate(params, config, tok, records, max_new_tokens=MAX_NEW,
                            batch_size=len(records), verify_fn=_len_parity_verifier)
  enc = batching.PromptEncoder(tok, max_prompt_length=1024)
  pb = enc.batch(records)
  out = sampling.generate(params, config, pb.tokens, pb.mask, jax.random.key(0),
                          max_new_tokens=MAX_NEW, temperature=0.0)
  toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  expected = [tok.decode(toks[i, :lens[i]].tolist(), skip_special_tokens=True)
              for i in range(len(records))]
  assert [p["responses"][0] for p in res.problems] == expected
  assert [p["lengths"][0] for p in res.problems] == lens.tolist()
  scores = [float(len(t) % 2 == 0) for t in expected]
  assert res.summary["accuracy"] == pytest.approx(np.mean(scores))
  assert res.summary["pass@1"] == res.summary["accuracy"]
  assert res.summary["num_problems"] == 5 and res.summary["num_samples"] == 1
  assert res.summary["mean_response_length"] == pytest.approx(lens.mean())
  assert [p["uid"] for p in res.problems] == [r.uid for r in records]
  assert [p["gold"] for p in res.problems] == [r.gold for r in records]


def test_batches_padded_and_compiled_once(setup):
  tok, config, params, records = setup
  # batch_size 2 over 5 records: 3 batches, the last one padded; one compile for all of them,
  # and none when the hook runs again.
  res1 = evaluation.evaluate(params, config, tok, records, max_new_tokens=MAX_NEW,
                             batch_size=2, verify_fn=_len_parity_verifier)
  n0 = sampling.TRACE_COUNT["generate"]
  res2 = evaluation.evaluate(params, config, tok, records, max_new_tokens=MAX_NEW,
                             batch_size=2, verify_fn=_len_parity_verifier)
  assert sampling.TRACE_COUNT["generate"] == n0
  assert [p["responses"] for p in res1.problems] == [p["responses"] for p in res2.problems]
  assert len(res1.problems) == 5


def test_sampled_mean_at_k(setup):
  tok, config, params, records = setup
  kw = dict(max_new_tokens=MAX_NEW, num_samples=3, temperature=1.0, batch_size=4,
            verify_fn=_len_parity_verifier)
  res = evaluation.evaluate(params, config, tok, records, seed=1, **kw)
  again = evaluation.evaluate(params, config, tok, records, seed=1, **kw)
  other = evaluation.evaluate(params, config, tok, records, seed=2, **kw)
  assert all(len(p["responses"]) == 3 and len(p["scores"]) == 3 for p in res.problems)
  assert [p["responses"] for p in res.problems] == [p["responses"] for p in again.problems]
  assert [p["responses"] for p in res.problems] != [p["responses"] for p in other.problems]
  s = np.array([p["scores"] for p in res.problems])
  assert res.summary["mean@3"] == pytest.approx(s.mean())
  assert res.summary["pass@3"] == pytest.approx(s.max(1).mean())
  assert res.summary["pass@3"] >= res.summary["mean@3"]


def _answer_generator(tok, records, correct):
  """A generate_fn that answers "The answer is N." (right or wrong per `correct`)."""
  answers = {}
  for r, ok in zip(records, correct):
    answers[r.question] = r.gold if ok else str(int(r.gold) + 1)
  enc = batching.PromptEncoder(tok, max_prompt_length=1024)
  prompt_text = {tuple(enc.encode(r.prompt_messages)): r.question for r in records}

  def generate_fn(params, config, tokens, mask, rng, *, max_new_tokens, num_samples, **kw):
    rows = []
    for t, m in zip(np.asarray(tokens), np.asarray(mask)):
      q = prompt_text[tuple(t[m.astype(bool)].tolist())]
      ids = tok(f"The answer is {answers[q]}.", add_special_tokens=False)["input_ids"]
      ids = (ids + [tok.eos_token_id])[:max_new_tokens]
      rows += [ids] * num_samples
    out = np.full((len(rows), max_new_tokens), tok.pad_token_id, np.int32)
    for i, ids in enumerate(rows):
      out[i, :len(ids)] = ids
    lengths = np.array([len(ids) for ids in rows], np.int32)
    return sampling.GenerationOutput(tokens=out, logprobs=None, mask=None, raw_logprobs=None,
                                     lengths=lengths)

  return generate_fn


def test_default_verifier_scores_answers(setup, tmp_path):
  tok, config, params, records = setup
  correct = [True, False, True, True, False]
  res = evaluation.evaluate(params, config, tok, records, max_new_tokens=32, batch_size=2,
                            generate_fn=_answer_generator(tok, records, correct))
  assert [p["scores"] for p in res.problems] == [[float(c)] for c in correct]
  assert res.summary["pass@1"] == pytest.approx(0.6)
  assert res.summary["truncated_rate"] == 0.0
  assert res.problems[1]["responses"][0] == f"The answer is {int(records[1].gold) + 1}."
  path = evaluation.write_report(res, tmp_path / "r" / "report.json", model="tiny",
                                 dataset="arithmetic")
  data = json.loads(path.read_text())
  assert data["model"] == "tiny" and data["summary"]["pass@1"] == pytest.approx(0.6)
  assert len(data["problems"]) == 5 and data["problems"][0]["uid"] == records[0].uid


def test_truncated_rate(setup):
  tok, config, params, records = setup
  res = evaluation.evaluate(params, config, tok, records, max_new_tokens=4, batch_size=5,
                            generate_fn=_answer_generator(tok, records, [True] * 5))
  assert res.summary["truncated_rate"] == 1.0
  assert res.summary["accuracy"] == 0.0  # "The " is not an answer


@pytest.mark.parametrize("kw, match", [
    (dict(num_samples=2, temperature=0.0), "greedy"),
    (dict(num_samples=0), "num_samples"),
    (dict(temperature=-1.0), "temperature"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments(setup, kw, match):
  tok, config, params, records = setup
  args = dict(max_new_tokens=MAX_NEW, verify_fn=_len_parity_verifier)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    evaluation.evaluate(params, config, tok, records, **args)
  with pytest.raises(ValueError, match="no records"):
    evaluation.evaluate(params, config, tok, [], max_new_tokens=MAX_NEW)


# ------------------------------------------------------------------------------ eval_math CLI
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EVAL_MATH = os.path.join(_REPO, "experiments", "eval_math.py")


def _run_cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, _EVAL_MATH, *args], capture_output=True, text=True,
                        timeout=timeout, env=env)


@pytest.mark.parametrize("args, flag", [
    (["--dataset=nope"], "--dataset='nope'"),
    (["--num_problems=-1"], "--num_problems"),
    (["--nogreedy", "--temperature=0"], "--temperature"),
    (["--model=/does/not/exist"], "--model"),
])
def test_eval_math_bad_flag_fails_early(args, flag):
  out = _run_cli(*args, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert flag in out.stderr
  assert "[eval]" not in out.stdout  # nothing was loaded or evaluated


@pytest.mark.slow
def test_eval_math_cli_writes_report(setup, tmp_path):
  tok, config, params, _ = setup
  from jaxrl_dense.models import loading
  model_dir = loading.save_pretrained(params, config, tok, tmp_path / "tiny_hf")
  report = tmp_path / "report.json"
  out = _run_cli(f"--model={model_dir}", "--dataset=arithmetic", "--arith_max_digits=1",
                 "--arith_num_eval=5", "--arith_shots=1", "--num_problems=3",
                 "--max_new_tokens=4", f"--output={report}")
  assert out.returncode == 0, out.stderr[-3000:]
  data = json.loads(report.read_text())
  assert data["summary"]["num_problems"] == 3 and data["dataset"] == "arithmetic"
  assert data["flags"]["max_new_tokens"] == 4
  assert all(len(p["responses"]) == 1 and p["lengths"][0] <= 4 for p in data["problems"])
  # the held-out split of the same task, in order
  task = arithmetic.ArithmeticTask(ops=("+", "-", "*"), max_digits=1, num_eval=5, num_shots=1)
  assert [p["uid"] for p in data["problems"]] == [r.uid for r in arithmetic.make_splits(task)[1][:3]]


# ------------------------------------------------ implicit-PRM rewards and sampled estimators
def test_implicit_prm_rewards_match_direct_scoring(setup):
  tok, config, params, records = setup
  from jaxrl_dense.models import logprobs as lp_lib
  prm_params = transformer.init_params(config, jax.random.key(7))
  recs = records[:3]
  responses = [["The answer is 3.", "1 + 2 = 3."], ["4", "no idea"], ["The answer is 12.", "x"]]
  truncated = np.array([[False, True], [False, False], [True, False]])
  r = eval_prm.implicit_prm_rewards(prm_params, params, config, tok, recs, responses,
                                      beta=0.1, batch_size=4, truncated=truncated)
  assert r.shape == (3, 2) and np.isfinite(r).all()
  enc = batching.PromptEncoder(tok, max_prompt_length=1024)
  for i, j in ((0, 0), (2, 0)):  # one complete response (+ EOS), one truncated; other rows padded
    p = enc.encode(recs[i].prompt_messages)
    a = tok(responses[i][j], add_special_tokens=False)["input_ids"]
    a = a if truncated[i, j] else a + [config.eos_token_ids[0]]
    t = np.array([p + a], np.int32)
    m = np.ones_like(t)
    lp = np.asarray(lp_lib.token_logprobs(prm_params, config, t, m))[0, len(p):]
    lr = np.asarray(lp_lib.token_logprobs(params, config, t, m))[0, len(p):]
    assert r[i, j] == pytest.approx(0.1 * float((lp - lr).sum()), abs=1e-4)
  same = eval_prm.implicit_prm_rewards(params, params, config, tok, recs, responses,
                                         batch_size=4, truncated=truncated)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="same number k"):
    eval_prm.implicit_prm_rewards(params, params, config, tok, recs, [["a"], ["b", "c"], ["d"]])


@pytest.mark.parametrize("args, flag", [
    (["--prm_model=smollm2"], "--prm_model='smollm2': needs --nogreedy"),
    (["--nogreedy", "--samples=4", "--ks=1,8"], "--ks"),
    (["--dataset=chain_arith"], "name the split"),
])
def test_eval_math_sampled_flags_fail_early(args, flag):
  out = _run_cli(*args, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert flag in out.stderr


@pytest.mark.slow
def test_eval_math_cli_sampled_estimators_with_prm(setup, tmp_path):
  tok, config, params, _ = setup
  from jaxrl_dense.models import loading
  model_dir = loading.save_pretrained(params, config, tok, tmp_path / "tiny_hf")
  prm_dir = loading.save_pretrained(transformer.init_params(config, jax.random.key(3)), config,
                                    tok, tmp_path / "tiny_prm")
  report = tmp_path / "report.json"
  out = _run_cli(f"--model={model_dir}", "--dataset=chain_arith:eval:shots=1,num_train=10",
                 "--num_problems=2", "--nogreedy", "--samples=4", "--temperature=1.0",
                 "--max_new_tokens=6", f"--prm_model={prm_dir}", f"--output={report}")
  assert out.returncode == 0, out.stderr[-3000:]
  data = json.loads(report.read_text())
  s = data["summary"]
  for key in ("pass@1", "pass@2", "pass@4", "mean@4", "maj@4", "prm_best_of_n@4", "prm_vote@4"):
    assert 0.0 <= s[key] <= 1.0, key
  scores = np.array([p["scores"] for p in data["problems"]])
  assert s["pass@1"] == pytest.approx(s["mean@4"]) == pytest.approx(scores.mean())
  assert s["pass@4"] == pytest.approx(scores.max(1).mean())
  rewards = np.array([p["prm_rewards"] for p in data["problems"]])
  assert rewards.shape == (2, 4) and np.isfinite(rewards).all()
  assert s["prm_best_of_n@4"] == pytest.approx(estimators.best_of_n(scores, rewards).mean())
  assert all(len(p["answers"]) == 4 for p in data["problems"])
  assert data["problems"][0]["uid"].startswith("chain_arith:eval:")
