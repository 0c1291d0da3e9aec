"""The trainer on multi-turn tool rollouts (--env): MatchTIR and IGPO end to end on chain_arith
with the calculator tool. A scripted sampler stands in for a model that already calls tools (a
random smoke model never writes a well-formed call): even rows call the calculator on the first
step, read the result and answer; odd rows answer at once. Everything after the sampler is the
production path: the environment, the verifier, the turn rewards, the one jitted update."""
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrl_dense import sampling
from jaxrl_dense.rl import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"
MT_FLAGS = ["--train_data=chain_arith:train:shots=0", "--max_prompt_length=512", "--algo=grpo",
            "--env=tool:calculator", "--max_turns=3", "--max_response_length=80"]


def _config(**overrides):
  cfg = config_lib.from_args([f"--flagfile={SMOKE}", *MT_FLAGS, "--eval_data="])
  return config_lib.replace(cfg, **overrides)


def _scripted_generate(tokenizer, calls):
  """sampling.generate's contract, with a fixed policy (see the module docstring)."""
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

  def generate(params, config, ctx, cmask, key, *, max_new_tokens, num_samples=1, **kw):
    ctx = np.asarray(ctx)
    rows = []
    for c, m in zip(ctx, np.asarray(cmask)):
      text = tokenizer.decode(c[m > 0].tolist(), skip_special_tokens=False)
      expr = re.findall(r"What is (.*?)\?", text)[-1]
      first = re.search(r"(\d+) ([-+*]) (\d+)", expr).group(0)
      for s in range(num_samples):
        if "<result>" in text.split("What is")[-1]:  # (the system prompt shows the format too)
          out = f"The answer is {eval(expr)}."  # pylint: disable=eval-used
        elif len(rows) % 2 == 0:
          out = f"<tool>calculator: {first}</tool> and more"
        else:
          out = "The answer is 5."
        ids = tokenizer.encode(out, add_special_tokens=False) + [eos]
        rows.append(ids[:max_new_tokens])
    calls.append(len(rows))
    tok = np.zeros((len(rows), max_new_tokens), np.int32)
    msk = np.zeros_like(tok)
    for i, ids in enumerate(rows):
      tok[i, :len(ids)], msk[i, :len(ids)] = ids, 1
    lp = np.where(msk > 0, -0.5, 0.0).astype(np.float32)
    return sampling.GenerationOutput(tok, lp, msk, lp, msk.sum(-1))

  return generate


@pytest.mark.parametrize("advantage", ["matchtir", "igpo"])
def test_turn_level_methods_train_on_tool_rollouts(advantage, monkeypatch, tmp_path):
  from jaxrl_dense.rl.trainer import Trainer
  run = Trainer(_config(advantage=advantage, sample_every=1, logdir=str(tmp_path)))
  calls = []
  monkeypatch.setattr(sampling, "generate", _scripted_generate(run.tokenizer, calls))
  try:
    assert "<tool>" in run.train_records[0].prompt_messages[0]["content"]  # the call format is in the prompt
    before = jax.tree.map(np.asarray, run.state.policy.params)
    m = run.train_step()
    batch, series = run.last_rollout
    page = run.write_samples(str(tmp_path / "samples"))
  finally:
    run.close()
  html = open(page["html"]).read()  # the sample page shows the tool's result between the turns
  assert '<span class="obs" title="observation (not trained)">' in html and "result" in html
  assert len(calls) == 2  # turn 0 for every row, turn 1 for the rows that called the tool
  assert m["env/tool_calls_per_row"] == pytest.approx(0.5) and m["env/tool_error_frac"] == 0.0
  assert m["env/turns_mean"] == pytest.approx(1.5)
  obs = np.asarray(batch.observation_mask) > 0
  model = np.asarray(batch.response_mask) > 0
  assert obs[::2].any(axis=1).all() and not obs[1::2].any()  # even rows hold the tool's result
  assert not (obs & model).any()
  # the observation is the calculator's result, as ids appended after the call
  from jaxrl_dense.rl import multiturn
  texts = multiturn.turn_texts_of(run.tokenizer, batch.response_tokens, batch.turn_ids, 3)
  assert texts[0][0].startswith("<tool>calculator:") and texts[0][0].endswith("</tool>")
  assert texts[0][1].startswith("The answer is")
  obs_text = run.tokenizer.decode(np.asarray(batch.response_tokens)[0][obs[0]].tolist())
  assert re.fullmatch(r"\n<result>\d+</result>\n", obs_text), obs_text
  np.testing.assert_array_equal(np.asarray(batch.outcome)[::2], 1.0)  # tool users answer right
  tr = np.asarray(batch.turn_rewards)
  assert tr.shape == (batch.num_rows, 3)
  if advantage == "matchtir":
    # the call matches the gold first step exactly: s = (1 + J + 1) / (2 + 1) = 1; answer turn = outcome
    np.testing.assert_allclose(tr[::2, 0], 1.0)
    np.testing.assert_allclose(tr[::2, 1], 1.0)
    np.testing.assert_allclose(tr[1::2, 0], np.asarray(batch.outcome)[1::2])
  else:  # IGPO: turn 0 of a tool user gets p_1 - p_0 (the result raised the gold answer's probability or not)
    assert np.abs(tr[::2, 0]).max() > 0 and (np.abs(tr[::2, 0]) <= 1).all()
    np.testing.assert_allclose(tr[::2, 1], 1.0)
    np.testing.assert_allclose(tr[1::2, 0], np.asarray(batch.outcome)[1::2])
  adv = series["advantage"]
  assert (adv[obs] == 0).all() and np.abs(adv[model]).max() > 0  # observations get no advantage
  bad = [k for k, v in m.items() if not math.isfinite(v) and k != "kl_ref"]  # kl_ref: NaN, no reference
  assert not bad, bad
  after = jax.tree.map(np.asarray, run.state.policy.params)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_bad_multiturn_flags_name_the_flag():
  with pytest.raises(config_lib.ConfigError, match="env"):
    _config(env="tool:abacus")
  with pytest.raises(config_lib.ConfigError, match="advantage"):
    config_lib.replace(config_lib.from_args([f"--flagfile={SMOKE}"]), algo="grpo", advantage="matchtir")
  with pytest.raises(config_lib.ConfigError, match="igpo_answer_template"):
    _config(advantage="igpo", igpo_answer_template="The answer is 5.")


def _metrics(d):
  import json
  return {r["step"]: r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "step" in r and
          not any(k.startswith("eval/") for k in r)}


@pytest.mark.parametrize("advantage", ["igpo", "matchtir"])
def test_turn_level_smoke_run_resumes_exactly(tmp_path, advantage):
  """3 steps straight == 2 steps + a fresh process resuming for the third (real random model)."""
  common = [f"--flagfile={SMOKE}", *MT_FLAGS, f"--advantage={advantage}", "--eval_data=", "--checkpoint_every=1"]
  runs = {"a": ["--steps=3"], "b": ["--steps=2"]}
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = str(REPO / "experiments" / "prime_math.py")
  procs = [subprocess.Popen([sys.executable, script, *common, *extra, f"--logdir={tmp_path}/{k}",
                             f"--checkpoint_dir={tmp_path}/{k}/ck"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env)
           for k, extra in runs.items()]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  r = subprocess.run([sys.executable, script, *common, "--steps=3", "--resume", f"--logdir={tmp_path}/b",
                      f"--checkpoint_dir={tmp_path}/b/ck"], capture_output=True, text=True, cwd=str(REPO),
                     env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "restored step 2" in r.stdout
  ma, mb = _metrics(f"{tmp_path}/a"), _metrics(f"{tmp_path}/b")
  assert sorted(ma) == sorted(mb) == [1, 2, 3]
  for s in ma:
    for k, v in ma[s].items():
      if k.startswith("time/") or k in ("time", "tokens_per_s") or not isinstance(v, float):
        continue
      if math.isnan(v):
        assert math.isnan(mb[s][k]), (s, k)
        continue
      np.testing.assert_allclose(v, mb[s][k], rtol=1e-5, atol=1e-6, err_msg=f"step {s} {k}")
  assert "reward/turn_reward_sum" in ma[3] and "env/turns_mean" in ma[3]


def test_eval_runs_the_same_episodes_and_scores_model_turns_only(monkeypatch, tmp_path):
  """--env: the greedy eval is multi-turn too; its report lists each problem's turns and tool
  results, and the verifier never reads an observation."""
  import json
  from jaxrl_dense.rl.trainer import Trainer
  run = Trainer(_config(advantage="matchtir", logdir=str(tmp_path),
                        eval_data="chain_arith:eval:num_eval=4,shots=0", eval_batch_size=4))
  calls = []
  monkeypatch.setattr(sampling, "generate", _scripted_generate(run.tokenizer, calls))
  try:
    report = run.evaluate()
  finally:
    run.close()
  assert len(calls) == 2
  res = json.load(open(tmp_path / "eval_step00000.json"))
  p0, p1 = res["problems"][0], res["problems"][1]
  ep = p0["episodes"][0]
  assert ep["turns"][0].startswith("<tool>calculator:") and ep["turns"][1] == f"The answer is {p0['gold']}."
  assert re.fullmatch(r"\n<result>\d+</result>\n", ep["observations"][0])
  assert p0["scores"] == [1.0] and p0["responses"][0] == "".join(ep["turns"])
  assert p1["episodes"][0]["turns"] == ["The answer is 5."] and p1["scores"] == [float(p1["gold"] == "5")]
  assert report["eval/pass@1"] == pytest.approx(np.mean([p["scores"][0] for p in res["problems"]]))


def test_the_planned_update_takes_multi_turn_batches():
  """--aot / the memory plan lower the update an --env run runs: its abstract batch carries the
  observation mask, the turn ids and (MatchTIR / IGPO) the turn rewards."""
  from jaxrl_dense.parallel import mesh as mesh_lib
  from jaxrl_dense.rl import plan as plan_lib
  cfg = _config(advantage="igpo")
  mesh = mesh_lib.make_mesh(cfg.mesh)
  update_fn, (state, batch, key), _, _ = plan_lib.abstract_update(cfg, mesh)
  rows, R = cfg.prime.rollout.rows, cfg.prime.rollout.max_response_length
  assert batch.observation_mask.shape == (rows, R) and batch.turn_ids.dtype == np.int32
  assert batch.turn_rewards.shape == (rows, cfg.prime.rollout.max_turns)
  with mesh_lib.use_mesh(mesh):
    lowered = update_fn.lower(state, batch, key)
  flat = jax.tree.leaves(lowered.args_info)  # the turn arrays are arguments of the program
  assert sum(1 for a in flat if tuple(a.shape) == (rows, cfg.prime.rollout.max_turns)) == 1


def test_continuous_engine_runs_episodes_with_paused_rows(monkeypatch, tmp_path):
  """--rollout_engine=continuous --env: the trainer's rollout is the paused-row engine run (never
  one sampler call per turn), on the real random model; its prefill and round-trip counts are logged."""
  from jaxrl_dense.rl import multiturn
  from jaxrl_dense.rl.trainer import Trainer

  def per_turn(*a, **k):
    raise AssertionError("the per-turn path ran")
  monkeypatch.setattr(multiturn, "rollout_turns", per_turn)
  run = Trainer(_config(advantage="matchtir", rollout_engine="continuous", sample_every=1, logdir=str(tmp_path)))
  try:
    m = run.train_step()
    batch, _ = run.last_rollout
  finally:
    run.close()
  assert m["env/host_syncs"] >= 1 and m["env/prefill_tokens"] > 0
  assert m["env/prefill_tokens"] <= m["env/reprefill_tokens"]
  assert not (np.asarray(batch.observation_mask) * np.asarray(batch.response_mask)).any()
  assert math.isfinite(m["env/false_stops_per_row"])
