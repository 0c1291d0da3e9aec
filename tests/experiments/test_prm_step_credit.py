"""Step credit of the implicit PRM: exact token-to-step mapping on real and toy
tokenizers, `eval_prm.implicit_prm_step_rewards`, and experiments/prm_step_credit.py on a tiny
random model (the initial PRM = reference, and a checkpointed PRM that differs from it)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from jaxrl_dense.eval import prm as eval_prm
from jaxrl_dense.observe import prm_health
from jaxrl_dense.data import chain_arith as ca
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import load

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOL = REPO / "experiments" / "prm_step_credit.py"
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"
# The smoke run on chained arithmetic: zero-shot prompts fit its 48-token prompt limit.
FLAGS = [f"--flagfile={SMOKE}", "--train_data=chain_arith:train:shots=0,num_train=50",
         "--eval_data=chain_arith:eval:shots=0,num_eval=40"]


def _solutions(num, ops=("+", "-", "*")):
  task = ca.ChainArithTask(ops=ops, min_depth=1, max_depth=5, num_eval=num, num_train=10,
                           num_shots=0)
  return [s for i, p in enumerate(ca.make_problem_splits(task)[1])
          for s in ca.step_credit_solutions(p, [0, i])]


def test_smollm2_and_char_tokens_fall_exactly_in_steps():
  """Every token of a solution is in exactly one step and each step's tokens decode to that step
  (plus the separating space before it): the SmolLM2 BPE and the character tokenizer."""
  sols = _solutions(100)
  for name in ("smollm2", "chars"):
    tok = load.load_tokenizer(name)
    encs = [tok(s.text, add_special_tokens=False, return_offsets_mapping=True) for s in sols]
    ids = prm_health.step_ids_from_offsets([e["offset_mapping"] for e in encs],
                                           [s.step_spans for s in sols])
    for row, (s, e) in enumerate(zip(sols, encs)):
      n = len(e["input_ids"])
      assert (ids[row, :n] >= 0).all() and (ids[row, n:] == -1).all(), (name, s.text)
      assert (np.diff(ids[row, :n]) >= 0).all()
      for k, step in enumerate(s.steps):
        toks = [t for t, sid in zip(e["input_ids"], ids[row, :n]) if sid == k]
        assert tok.decode(toks) == ("" if k == 0 else " ") + step, (name, k, s.text)


def test_implicit_prm_step_rewards_sum_to_the_sequence_reward():
  """Per-step sums plus the EOS token's reward are the sequence reward; a different PRM moves
  them; a wrong span list is refused."""
  import pytest
  from jaxrl_dense import models
  from jaxrl_dense.rl.trainer import Trainer
  cfg = config_lib.from_args(FLAGS)
  run = Trainer(cfg)
  try:
    task, _ = ca.parse_source(cfg.eval_data)
    probs = ca.make_problem_splits(task)[1][:3]
    groups = [ca.step_credit_solutions(p, [1, i]) for i, p in enumerate(probs)]
    recs = [ca.to_record(p, task, "eval") for p in probs]
    prm = models.init_params(run.model_config, jax.random.PRNGKey(7))
    r, sid, q = eval_prm.implicit_prm_step_rewards(
        prm, run.state.ref_params, run.model_config, run.tokenizer, recs,
        [[s.text for s in g] for g in groups], [[s.step_spans for s in g] for g in groups],
        beta=0.05, batch_size=4, encoder=run.encoder)
    sols = [s for g in groups for s in g]
    assert r.shape == (9,) and sid.shape == q.shape and q.shape[0] == 9
    s_max = max(s.num_steps for s in sols)
    sc = np.asarray(prm_health.step_scores(q, sid, s_max))                          # [9, S]
    eos = np.array([q[i, len(s.text)] for i, s in enumerate(sols)])  # chars: 1 token per char
    np.testing.assert_allclose(np.nansum(sc, 1) + eos, r, rtol=1e-4, atol=1e-6)
    for i, s in enumerate(sols):
      assert np.isfinite(sc[i, :s.num_steps]).all() and np.isnan(sc[i, s.num_steps:]).all()
      assert sid[i, len(s.text)] == -1  # EOS
    assert np.abs(sc[np.isfinite(sc)]).max() > 0
    with pytest.raises(ValueError, match="one span list per response"):
      eval_prm.implicit_prm_step_rewards(
          prm, run.state.ref_params, run.model_config, run.tokenizer, recs,
          [[s.text for s in g] for g in groups], [[s.step_spans for s in g][:2] for g in groups])
  finally:
    run.close()


def _tool(args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO), env=env)


def _check_report(res, num_problems):
  assert res["num_problems"] == num_problems and res["num_solutions"] == {
      "correct": num_problems, "propagated": num_problems, "inconsistent": num_problems}
  assert sum(res["first_error_counts"].values()) == 3 * num_problems
  assert res["first_error_counts"]["-1"] == num_problems
  for reduce in ("sum", "min"):
    d = res["reductions"][reduce]
    assert set(d) == {"threshold", "calib", "test", "test_by_mode"}
    assert set(d["test_by_mode"]) == {"propagated", "inconsistent"}
    for m in [d["calib"], d["test"], *d["test_by_mode"].values()]:
      for key in ("error_acc", "correct_acc", "f1", "argmin_acc", "step_auroc"):
        assert 0.0 <= m[key] <= 1.0, (reduce, key, m)
    t = d["test"]
    assert t["num_error"] == 2 * num_problems and t["num_correct"] == num_problems
    assert t["num_bad_steps"] == 2 * num_problems
  assert set(res["chance"]) == {"error_acc", "correct_acc", "f1", "argmin_acc", "step_auroc"}
  assert set(res["solution_auroc"]) == {"propagated", "inconsistent"}
  assert len(res["examples"]) == 3 * 3 and all(
      len(e["step_scores_sum"]) == len(e["steps"]) for e in res["examples"])


def test_tool_initial_prm_is_at_chance_and_refuses_bad_data(tmp_path):
  out = tmp_path / "initial.json"
  r = _tool([*FLAGS, "--num_problems=4", "--calib_problems=4", f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  text = out.read_text()
  res = json.loads(text)
  assert str(tmp_path) not in text and str(REPO) not in text  # no absolute path in the report
  _check_report(res, 4)
  assert res["prm"] == "initial" and res["prm_is_reference"] and res["all_rewards_zero"]
  assert "equals the reference" in res["note"] and "equals the reference" in r.stdout
  for reduce in ("sum", "min"):
    t = res["reductions"][reduce]["test"]
    assert t["step_auroc"] == 0.5 and t["f1"] == 0.0 and t["correct_acc"] == 1.0
  assert all(v == 0.5 for v in res["solution_auroc"].values())
  assert all(all(x == 0.0 for x in e["step_scores_sum"]) for e in res["examples"])
  assert "chance: f1=" in r.stdout and "step_auroc=" in r.stdout
  for bad, flag in [(["--eval_data=arithmetic"], "--eval_data="),
                    (["--step_data=chain_arith:train"], "--step_data="),
                    (["--num_problems=30", "--calib_problems=20"], "--num_problems=")]:
    r = _tool([*FLAGS, *bad], timeout=120)
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_tool_scores_a_checkpointed_prm(tmp_path):
  """A PRM that differs from the reference, saved as prime_math saves it (`load.open_checkpointer`,
  whose fingerprint holds the --train_data file's hash), is restored (its rewards are not 0);
  other flags than the run's, and an empty directory, are refused."""
  from jaxrl_dense.rl.trainer import Trainer
  ck = tmp_path / "ck"
  train = tmp_path / "train.jsonl"  # a file: the run's checkpoint fingerprint carries its sha256
  train.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1?"}],
                                       "reward_model": {"ground_truth": str(i + 1)}}) + "\n"
                           for i in range(8)))
  flags_ = [*FLAGS, f"--train_data={train}"]
  cfg = config_lib.from_args([*flags_, f"--checkpoint_dir={ck}"])
  ckpt = load.open_checkpointer(cfg)
  assert "train_data_sha256" in load.checkpoint_fingerprint(cfg)
  run = Trainer(cfg)
  try:
    state = run.state
    bumped = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape, x.dtype),
                          state.prm.params)
    run.state = state._replace(prm=state.prm._replace(params=bumped))
    run.step = 1
    assert run.save(ckpt, [], force=True)
    ckpt.close()
  finally:
    run.close()
  out = tmp_path / "ckpt.json"
  r = _tool([*flags_, f"--checkpoint_dir={ck}", "--num_problems=4", "--calib_problems=4",
             f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  _check_report(res, 4)
  assert res["prm"] == "checkpoint" and res["step"] == 1 and not res["prm_is_reference"]
  assert not res["all_rewards_zero"] and res["note"] == ""
  assert any(x != 0.0 for e in res["examples"] for x in e["step_scores_sum"])
  r = _tool([*flags_, f"--checkpoint_dir={ck}", "--num_problems=4", "--calib_problems=4", "--beta=0.1"],
            timeout=300)
  assert r.returncode == 4 and "beta" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  (tmp_path / "empty").mkdir()
  r = _tool([*flags_, f"--checkpoint_dir={tmp_path / 'empty'}", "--num_problems=4", "--calib_problems=4"],
            timeout=300)
  assert r.returncode == 4 and "holds no checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
