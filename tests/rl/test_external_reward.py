"""A served step-scoring PRM driving training: --process_reward=URL with
--algo=rloo in prime_math on chained arithmetic, the PRM a loopback reference server; the step
scores reach the batch and the advantage; 3 steps straight == 2 steps + resume + 1; a dead URL
exits 2 naming the flag before any model loads."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_dense.rewards import service
from jaxrl_dense.rl import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "prime_math.py"
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"
CHAIN = ["--train_data=chain_arith:train:shots=0,num_train=50", "--eval_data=",
         "--algo=rloo", "--filter=none"]


def toy_prm(prompts, responses, steps):
  """A deterministic step scorer that does not care about tokenizers: +1 for a step with an even
  number of characters, -1 for an odd one, scaled by 1/(1 + step index)."""
  del prompts
  return [[(1.0 if (b - a) % 2 == 0 else -1.0) / (1 + k) for k, (a, b) in enumerate(row)]
          for text, row in zip(responses, steps)]


@pytest.fixture(scope="module")
def prm_url():
  srv, url = service.serve(toy_prm)
  yield url
  srv.shutdown()


def _run(args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(SCRIPT), f"--flagfile={SMOKE}", *CHAIN, *args],
                        capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)


def _metrics(logdir):
  rows = [json.loads(l) for l in open(os.path.join(logdir, "metrics.jsonl")) if l.strip()]
  return {r["step"]: r for r in rows if "actor/loss" in r}


def test_config_rules():
  base = config_lib.from_args([f"--flagfile={SMOKE}", *CHAIN])
  cfg = config_lib.replace(base, process_reward="http://127.0.0.1:1/score", step_credit="pure")
  assert cfg.prime.estimator == "prime_rloo" and not cfg.prime.uses_prm
  fp = config_lib.fingerprint(cfg)
  assert fp["process_reward"] == "http" and fp["step_credit"] == "pure"  # the port is not the model
  assert "reward_timeout_s" not in fp and "process_reward" not in config_lib.fingerprint(base)
  for kw, flag in ((dict(algo="prime"), "process_reward"), (dict(advantage="grpo"), "process_reward"),
                   (dict(process_reward="localhost:80"), "process_reward"),
                   (dict(step_split="regex:("), "step_split")):
    with pytest.raises(config_lib.ConfigError, match=flag):
      config_lib.replace(cfg, **kw)


def test_trainer_puts_the_served_step_rewards_into_the_update(prm_url):
  from jaxrl_dense.rl import rollout
  from jaxrl_dense.rl.trainer import Trainer
  cfg = config_lib.replace(config_lib.from_args([f"--flagfile={SMOKE}", *CHAIN]), process_reward=prm_url,
                           steps=1)
  run = Trainer(cfg)
  seen = {}
  real = rollout.collect

  def spy(*a, **k):
    batch, stats = real(*a, **k)
    seen["batch"], seen["stats"] = batch, stats
    return batch, stats

  rollout.collect = spy
  try:
    m = run.train_step()
  finally:
    rollout.collect = real
    run.close()
  b = seen["batch"]
  assert b.process_rewards is not None and b.process_rewards.shape == b.response_mask.shape
  pr = np.asarray(b.process_rewards)
  assert np.all(pr[np.asarray(b.response_mask) == 0] == 0) and np.any(pr != 0)
  assert m["reward/steps_mean"] >= 1 and m["reward/service_failures"] == 0
  assert math.isfinite(m["reward/process_reward_mean"]) and m["reward/process_reward_mean"] != 0
  assert math.isfinite(m["actor/pg_loss"])


@pytest.mark.slow
def test_served_prm_run_resumes_exactly(tmp_path):
  """A tiny random discriminative PRM served over loopback HTTP: 3 steps == 2 + resume + 1."""
  from jaxrl_dense.models import prm_head
  from jaxrl_dense.rewards.local_prm import LocalPRM
  srv, prm_url = service.serve(LocalPRM(prm_head.load_discriminative_prm(_write_char_prm(tmp_path / "prm"))).score)
  try:
    _resume_check(prm_url, tmp_path)
  finally:
    srv.shutdown()


def _resume_check(prm_url, tmp_path):
  common = [f"--process_reward={prm_url}", "--step_credit=pure", "--checkpoint_every=1",
            "--checkpoint_keep=2"]
  a = _run([*common, "--steps=3", f"--logdir={tmp_path}/a", f"--checkpoint_dir={tmp_path}/a/ck"])
  assert a.returncode == 0, a.stderr[-3000:]
  b = _run([*common, "--steps=2", f"--logdir={tmp_path}/b", f"--checkpoint_dir={tmp_path}/b/ck"])
  assert b.returncode == 0, b.stderr[-3000:]
  r = _run([*common, "--steps=3", "--resume", f"--logdir={tmp_path}/b", f"--checkpoint_dir={tmp_path}/b/ck"])
  assert r.returncode == 0 and "restored step 2" in r.stdout, r.stderr[-3000:]
  ma, mb = _metrics(f"{tmp_path}/a"), _metrics(f"{tmp_path}/b")
  assert sorted(ma) == sorted(mb) == [1, 2, 3]
  for k, v in ma[3].items():
    if k.startswith("time") or k == "tokens_per_s" or not isinstance(v, float):
      continue
    np.testing.assert_allclose(v, mb[3][k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert ma[3]["reward/process_reward_mean"] != 0


def test_unreachable_prm_exits_2_before_any_model_loads(tmp_path):
  srv, url = service.serve(toy_prm)
  srv.shutdown()
  srv.server_close()
  r = _run([f"--process_reward={url}", f"--checkpoint_dir={tmp_path}/ck"], timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "--process_reward=" in r.stderr and "not reachable" in r.stderr
  assert " model=" not in r.stdout and not (tmp_path / "ck").exists()  # no model was built


# ------------------------------------------------------------------ a discriminative PRM directory


def _write_char_prm(path):
  """A tiny random Qwen2ForProcessRewardModel that reads the character tokenizer's ids."""
  import jax
  from jaxrl_dense.models import convert, hf_io
  from jaxrl_dense.models import tokenizer as tok_lib
  from jaxrl_dense.models.config import ModelConfig
  from jaxrl_dense.models.transformer import init_params
  tok = tok_lib.char_chat_tokenizer()
  mc = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                   tie_word_embeddings=False, max_position_embeddings=512)
  sd = {k: np.asarray(v, np.float32) * (10.0 if np.ndim(v) > 1 else 1.0)
        for k, v in convert.hf_state_dict_from_params(init_params(mc, jax.random.PRNGKey(0)), mc).items()
        if k != "lm_head.weight"}
  rng = np.random.default_rng(0)
  sd.update({"score.0.weight": rng.normal(0, 0.3, (32, 32)).astype(np.float32),
             "score.0.bias": np.zeros(32, np.float32),
             "score.2.weight": rng.normal(0, 0.3, (2, 32)).astype(np.float32),
             "score.2.bias": np.zeros(2, np.float32)})
  hf = mc.to_hf_dict()
  hf["architectures"] = ["Qwen2ForProcessRewardModel"]
  hf_io.write_hf_dir(path, hf, sd)
  tok.save_pretrained(str(path))
  return path


def test_local_prm_scores_each_step_at_its_last_character(tmp_path):
  from jaxrl_dense.models import prm_head
  from jaxrl_dense.rewards.local_prm import LocalPRM
  from jaxrl_dense.rewards import step_rewards as sr
  prm = prm_head.load_discriminative_prm(_write_char_prm(tmp_path / "prm"))
  local = LocalPRM(prm, bucket=16, batch_size=2)
  prompts = ["What is 3 + 4 + 2?", "What is 8 - 3?", "Hi"]
  responses = ["3 + 4 = 7. 7 + 2 = 9. The answer is 9.", "8 - 3 = 5. The answer is 5.", "no period"]
  steps = [sr.segment(r, "sentences") for r in responses]
  got = local.score(prompts, responses, steps)
  assert [len(g) for g in got] == [3, 2, 1] and local.requests == 2  # rows in batches of 2
  # by hand, row 0 alone: the chat template, the token holding each step's last character
  tok = prm.tokenizer
  full = tok.apply_chat_template([{"role": "user", "content": prompts[0]},
                                  {"role": "assistant", "content": responses[0]}], tokenize=False)
  start = full.rfind(responses[0])
  enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
  ids = enc["input_ids"]
  holder = {c: j for j, (a, e) in enumerate(enc["offset_mapping"]) for c in range(a, e)}
  pos = np.asarray([[holder[start + b - 1] for _, b in steps[0]]], np.int32)
  want = prm_head.prm_step_rewards(prm, np.asarray([ids], np.int32), np.ones((1, len(ids)), np.int32),
                                   pos, np.ones_like(pos))
  np.testing.assert_allclose(got[0], np.asarray(want)[0], atol=1e-5)
  assert len(set(np.round(got[0], 6))) > 1  # the steps get different scores
  # served by the reference server, the same numbers come back over HTTP
  srv, url = service.serve(local.score)
  try:
    served = service.RewardServiceClient(url).score(prompts, responses, steps)
  finally:
    srv.shutdown()
  for a, b in zip(served, got):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_trainer_with_an_in_process_prm_and_bad_prm_dirs(tmp_path):
  from jaxrl_dense.rl import load
  from jaxrl_dense.rl.trainer import Trainer
  d = _write_char_prm(tmp_path / "prm")
  cfg = config_lib.replace(config_lib.from_args([f"--flagfile={SMOKE}", *CHAIN]),
                           process_reward=f"prm:{d}", steps=1, step_credit="pure")
  load.check_inputs(cfg)
  run = Trainer(cfg)
  try:
    m = run.train_step()
  finally:
    run.close()
  assert m["reward/steps_mean"] >= 1 and math.isfinite(m["reward/process_reward_mean"])
  assert m["reward/process_reward_mean"] != 0
  causal = tmp_path / "causal"
  causal.mkdir()
  (causal / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
  notok = tmp_path / "notok"
  notok.mkdir()
  (notok / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForProcessRewardModel"]}))
  for spec, msg in ((f"prm:{causal}", "not a step-scoring PRM"), (f"prm:{notok}", "no tokenizer"),
                    (f"prm:{tmp_path}/none", "not a directory")):
    with pytest.raises(config_lib.ConfigError, match=msg):
      load.check_process_reward(spec)


def test_serve_prm_refuses_a_bad_directory(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "serve_prm.py"), f"--prm={tmp_path}/none"],
                     capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
  assert r.returncode == 2 and "not a directory" in r.stderr, r.stderr[-2000:]
