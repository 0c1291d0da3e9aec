"""Tests of the PRIME training loop: rl/ step builders, rl.trainer and experiments/prime_math.py.

Fast tests check the jitted step builders on a tiny model against direct computations (the
global-token-count normalisation, the PRM CE update, scoring) and the flag validation. Slow tests
(`-m slow`) run the smoke config end to end in subprocesses: resume exactness, the compile count,
and the NaN stop.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_dense import losses, models
from jaxrl_dense.rewards import implicit_prm
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import rollout
from jaxrl_dense.rl import state as state_lib
from jaxrl_dense.rl import steps
from jaxrl_dense.rl.batch import RolloutBatch

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "prime_math.py"
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"

TINY = models.ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                          max_position_embeddings=64, eos_token_ids=(1,), pad_token_id=0)
P, R = 5, 6  # prompt / response lengths of the synthetic batches


def _smoke_config(**overrides):
  """The smoke flag file parsed as prime_math parses it, plus overrides (flag name -> value)."""
  return config_lib.replace(config_lib.from_args([f"--flagfile={SMOKE}"]), **overrides)


def _batch(b=8, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, TINY.vocab_size, size=(b, P + R)).astype(np.int32)
  prompt_mask = np.ones((b, P), np.int32)
  prompt_mask[::3, :2] = 0  # some left padding
  lengths = rng.integers(1, R + 1, size=b)
  resp_mask = (np.arange(R)[None, :] < lengths[:, None]).astype(np.int32)
  tokens[:, P:][resp_mask == 0] = 0
  return {
      "tokens": jnp.asarray(tokens),
      "attention_mask": jnp.asarray(np.concatenate([prompt_mask, resp_mask], 1)),
      "response_mask": jnp.asarray(resp_mask, jnp.float32),
      "acc": jnp.asarray(rng.integers(0, 2, size=b), jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=(b, R)), jnp.float32),
  }


def _params(seed=0):
  return models.init_params(TINY, jax.random.PRNGKey(seed))


def _resp_logp(params, batch):
  lp = models.token_logprobs(params, TINY, batch["tokens"], batch["attention_mask"])
  return lp[:, P:]  # [B, R]


def test_scoring_matches_token_logprobs():
  params, ref = _params(0), _params(1)
  batch = _batch()
  scoring = jax.jit(steps.make_scoring(TINY, micro_batch_size=4, with_prm=True))
  out = scoring(params, ref, ref, batch)
  np.testing.assert_allclose(out["old_logp"], _resp_logp(params, batch), atol=1e-5)
  np.testing.assert_allclose(out["ref_logp"], _resp_logp(ref, batch), atol=1e-5)
  np.testing.assert_allclose(out["prm_logp"], _resp_logp(ref, batch), atol=1e-5)
  assert out["entropy"].shape == (8, R) and bool(jnp.all(out["entropy"] >= 0))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_update_is_the_global_mean_gradient(agg):
  """One mini-batch, SGD(lr=1): Δθ = −∇ of the loss of the WHOLE batch, for any micro-batch size."""
  params = _params(0)
  batch = _batch()
  batch["old_logp"] = _resp_logp(params, batch) + 0.05 * jax.random.normal(jax.random.PRNGKey(3), (8, R))
  settings = config_lib.PolicyConfig(loss_agg=agg, entropy_coeff=0.01)

  def full_loss(p):
    logp = _resp_logp(p, batch)
    _, ent = models.token_logprobs(p, TINY, batch["tokens"], batch["attention_mask"], return_entropy=True)
    terms = losses.ppo_clip_token_loss(logp, batch["old_logp"], batch["advantages"])
    s, c = losses.aggregate_terms(terms.token_loss, batch["response_mask"], agg)
    es, _ = losses.aggregate_terms(ent[:, P:], batch["response_mask"], agg)
    return (s - 0.01 * es) / c

  grads = jax.grad(full_loss)(params)
  expected = jax.tree.map(lambda p, g: p - g, params, grads)
  results = []
  for micro in (8, 2):
    opt = optax.sgd(1.0)
    update = jax.jit(steps.make_policy_update(TINY, opt, settings, mini_batch_size=8, micro_batch_size=micro,
                                      shuffle=False), donate_argnums=(0,))
    st = state_lib.init_train_state(jax.tree.map(jnp.copy, params), opt)
    new, metrics = update(st, batch, jax.random.PRNGKey(0))
    results.append(new.params)
    assert int(new.step) == 1
    np.testing.assert_allclose(metrics["actor/loss"], full_loss(params), rtol=1e-5, atol=1e-6)
  for got in results:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), got, expected)


@pytest.mark.parametrize("norm,shards", [("micro_batch", 1), ("device_micro_batch", 2)])
def test_policy_update_reference_normalisers(norm, shards):
  """--loss_norm: [O] mean of micro-batch token means; [V] mean over micro-batches and device
  shards of their token means (docs/algorithms.md). SGD(lr=1) step = −∇ of that loss."""
  params = _params(0)
  batch = _batch()
  batch["old_logp"] = _resp_logp(params, batch) + 0.05 * jax.random.normal(jax.random.PRNGKey(3), (8, R))
  micro, parts = 4, 4 // shards  # rows per (shard of a) micro-batch

  def ref_loss(p):
    terms = losses.ppo_clip_token_loss(_resp_logp(p, batch), batch["old_logp"], batch["advantages"])
    m = batch["response_mask"]
    means = [jnp.sum(terms.token_loss[i:i + parts] * m[i:i + parts]) / jnp.sum(m[i:i + parts])
             for i in range(0, 8, parts)]
    return sum(means) / len(means)

  expected = jax.tree.map(lambda p, g: p - g, params, jax.grad(ref_loss)(params))
  opt = optax.sgd(1.0)
  settings = config_lib.PolicyConfig(entropy_coeff=0.0, loss_norm=norm)
  update = jax.jit(steps.make_policy_update(TINY, opt, settings, loss_shards=shards, mini_batch_size=8,
                                    micro_batch_size=micro, shuffle=False), donate_argnums=(0,))
  new, metrics = update(state_lib.init_train_state(jax.tree.map(jnp.copy, params), opt), batch,
                        jax.random.PRNGKey(0))
  np.testing.assert_allclose(metrics["actor/pg_loss"], ref_loss(params), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new.params, expected)
  # The default (global token count) differs from both on these unequal lengths.
  glob = jax.jit(steps.make_policy_update(TINY, opt, config_lib.PolicyConfig(entropy_coeff=0.0),
                                  mini_batch_size=8, micro_batch_size=micro, shuffle=False), donate_argnums=(0,))
  _, m2 = glob(state_lib.init_train_state(jax.tree.map(jnp.copy, params), opt), batch, jax.random.PRNGKey(0))
  assert abs(float(m2["actor/pg_loss"]) - float(ref_loss(params))) > 1e-4


def test_policy_update_minibatches_and_epochs_count_optimizer_steps():
  params = _params(0)
  batch = _batch()
  batch["old_logp"] = _resp_logp(params, batch)
  opt = optax.adam(1e-3)
  update = jax.jit(steps.make_policy_update(TINY, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=4,
                                    micro_batch_size=2, epochs=3), donate_argnums=(0,))
  new, metrics = update(state_lib.init_train_state(params, opt), batch, jax.random.PRNGKey(1))
  assert int(new.step) == 6  # 2 mini-batches x 3 epochs
  assert bool(metrics["actor/loss_finite"])
  with pytest.raises(ValueError, match="micro_batch_size"):
    bad = steps.make_policy_update(TINY, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=4,
                                   micro_batch_size=3)
    bad(state_lib.init_train_state(_params(0), opt), batch, jax.random.PRNGKey(1))


def test_prm_update_ce_gradient_and_scores():
  """PRM step = SGD on the mini-batch-mean CE (veRL recipe `compute_ce_dpo_loss_rm`); returned
  scores use pre-step params."""
  prm, ref = _params(0), _params(1)
  batch = _batch()
  batch["ref_logp"] = _resp_logp(ref, batch)
  beta = 0.5

  def ce(p):
    q = implicit_prm.token_log_ratio(_resp_logp(p, batch), batch["ref_logp"], batch["response_mask"])
    return implicit_prm.prm_ce_loss(q, batch["response_mask"], batch["acc"], beta=beta)

  expected = jax.tree.map(lambda p, g: p - 0.1 * g, prm, jax.grad(ce)(prm))
  opt = optax.sgd(0.1)
  update = jax.jit(steps.make_prm_update(TINY, opt, beta=beta, mini_batch_size=8, micro_batch_size=2), donate_argnums=(0,))
  new, prm_logp, metrics = update(state_lib.init_train_state(jax.tree.map(jnp.copy, prm), opt), batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new.params, expected)
  np.testing.assert_allclose(prm_logp, _resp_logp(prm, batch), atol=1e-5)
  np.testing.assert_allclose(metrics["prm/loss"], ce(prm), rtol=1e-5)
  # Repeated AdamW steps on one batch drive the CE loss down.
  opt = state_lib.make_optimizer(1e-2, grad_clip=10.0)
  update = jax.jit(steps.make_prm_update(TINY, opt, beta=beta, mini_batch_size=4, micro_batch_size=4), donate_argnums=(0,))
  st = state_lib.init_train_state(_params(0), opt)
  first = None
  for _ in range(5):
    st, _, m = update(st, batch)
    first = float(m["prm/loss"]) if first is None else first
  assert float(m["prm/loss"]) < first - 0.05


def test_select_groups_soft_band_filter():
  cfg = config_lib.build(config_lib.PrimeConfig, dict(n=4, prompts_per_step=2, oversample=2,
                                                      max_response_length=8, micro_batch_size=4,
                                                      prm_micro_batch_size=4, score_micro_batch_size=4))
  acc = np.array([0, 0, 0, 0,  1, 0, 0, 0,  1, 1, 1, 1,  1, 1, 0, 0], np.float32)  # 0, .25, 1, .5
  lengths = np.array([3] * 16)
  rows, ok = rollout.select_groups(acc, lengths, cfg)
  assert ok.tolist() == [False, True, False, True]
  assert rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]  # groups 1 and 3
  lengths[4] = 7  # verl: L >= R - 1 counts as truncated
  rows, ok = rollout.select_groups(acc, lengths, cfg)
  assert ok.tolist() == [False, False, False, True]
  assert rows.tolist() == [12, 13, 14, 15, 0, 1, 2, 3]  # soft fill: group 3, then group 0


def _run(args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO), env=env)


@pytest.mark.parametrize("flag,value", [("n", "1"), ("micro_batch_size", "5"), ("mesh", "data:3"),
                                        ("acc_low", "0.9"), ("model", "/no/such/model")])
def test_bad_flag_fails_before_any_work(flag, value, tmp_path):
  r = _run([f"--flagfile={SMOKE}", f"--{flag}={value}", f"--checkpoint_dir={tmp_path}/ck"], timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert f"--{flag}=" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "ck").exists()  # nothing was built


def test_eurus2_config_dry_run_prints_plan():
  r = _run([f"--flagfile={REPO / 'experiments' / 'configs' / 'eurus2_7b_prime.flags'}", "--dry_run"],
           timeout=120)
  out = r.stdout + r.stderr
  assert "memory per device" in out and "7" in out, out[-3000:]
  # The SFT checkpoint and the parquet files are not on this machine: named, exit status 1.
  assert r.returncode == 1 and "--model=" in out, out[-3000:]


# ------------------------------------------------------------------------------ slow, end to end
def _metrics(logdir):
  rows = [json.loads(l) for l in open(os.path.join(logdir, "metrics.jsonl")) if l.strip()]
  return {r["step"]: r for r in rows if "actor/loss" in r}


def _comparable(rec):
  return {k: v for k, v in rec.items() if not k.startswith("time/") and k not in ("time", "tokens_per_s")}


@pytest.mark.slow
def test_smoke_end_to_end_and_exact_resume(tmp_path):
  """Smoke config: 4 steps straight == 2 steps + a fresh process resuming + 2 steps."""
  from jaxrl_dense import checkpoint as ckpt_lib
  # --hacking_window=3: the reward-hacking monitor's t values are finite from step 3 and must be
  # rebuilt from the checkpointed history on resume.
  common = [f"--flagfile={SMOKE}", "--eval_data=", "--checkpoint_every=1", "--checkpoint_keep=2",
            "--hacking_window=3"]
  a = [*common, "--steps=4", f"--logdir={tmp_path}/a", f"--checkpoint_dir={tmp_path}/a/ck"]
  b = [*common, "--steps=2", f"--logdir={tmp_path}/b", f"--checkpoint_dir={tmp_path}/b/ck"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env) for args in (a, b)]
  for p in procs:
    out, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-3000:]
  r = _run([*common, "--steps=4", "--resume", f"--logdir={tmp_path}/b", f"--checkpoint_dir={tmp_path}/b/ck"],
           timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "restored step 2" in r.stdout
  ma, mb = _metrics(f"{tmp_path}/a"), _metrics(f"{tmp_path}/b")
  assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
  assert math.isnan(mb[2]["prm_health/process_trend_t"]) and not math.isnan(mb[4]["prm_health/process_trend_t"])
  for s in ma:
    ra, rb = _comparable(ma[s]), _comparable(mb[s])
    assert ra.keys() == rb.keys()
    for k in ra:
      assert math.isfinite(ra[k]) or k.startswith("prm_health/"), (s, k, ra[k])  # NaN: one label
      np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6, err_msg=f"step {s} {k}")
  sa, _ = ckpt_lib.Checkpointer(f"{tmp_path}/a/ck", fingerprint=_fingerprint(f"{tmp_path}/a/ck")).restore()
  sb, _ = ckpt_lib.Checkpointer(f"{tmp_path}/b/ck", fingerprint=_fingerprint(f"{tmp_path}/b/ck")).restore()
  leaves_a, leaves_b = jax.tree.leaves(sa), jax.tree.leaves(sb)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=1e-6)
  assert int(np.asarray(sa["policy"]["step"])) == 4
  # A different config must not resume from (or overwrite) this checkpoint.
  r = _run([*common, "--steps=6", "--resume", "--beta=0.1", f"--checkpoint_dir={tmp_path}/b/ck"], timeout=600)
  assert r.returncode == 4 and "beta" in r.stderr, r.stderr[-3000:]
  assert sorted(int(p.name) for p in (tmp_path / "b" / "ck").iterdir() if p.name.isdigit())[-1] == 4


def _fingerprint(ckpt_dir):
  """The fingerprint stored in a checkpoint dir (to open it read-only for comparison)."""
  steps_ = sorted(int(p.name) for p in pathlib.Path(ckpt_dir).iterdir() if p.name.isdigit())
  return json.load(open(pathlib.Path(ckpt_dir) / str(steps_[-1]) / "fingerprint" / "metadata"))


@pytest.mark.slow
def test_sample_pages_prm_health_and_held_out_prm_auroc(tmp_path):
  """--sample_every writes the token heatmap of a step's trained groups (from the jitted update's
  token series); the update reports PRM health; the eval scores its responses with the PRM."""
  from jaxrl_dense.rl.trainer import Trainer
  from jaxrl_dense.observe import prm_health
  # --generate_batch_size=4: the 8 sampled prompts go through the sampler in two calls.
  # --prm_on_filler: the smoke model solves nothing, so no group is in band and the PRM (trained on
  # in-band groups only by default) would not move.
  run = Trainer(_smoke_config(steps=1, sample_every=1, logdir=str(tmp_path), generate_batch_size=4,
                              prm_on_filler=True))
  try:
    assert run.prm_is_reference()  # PRM initialised from the reference: eval skips its AUROC
    m = run.train_step()
    assert not run.prm_is_reference()  # one PRM update later it is scored
    for k in ("prm_health/auroc", "prm_health/return_outcome_corr", "prm_health/implicit_reward_mean"):
      assert k in m and (math.isnan(m[k]) or -1.0 <= m[k] <= 1.0 or k.endswith("mean")), (k, m.get(k))
    batch, series = run.last_rollout
    assert set(series) == {"advantage", "return", "log_ratio_ref", "process_reward", "entropy"}
    b, r = np.asarray(batch.response_mask).shape
    for v in series.values():
      assert v.shape == (b, r) and np.isfinite(v).all()
    pad = np.asarray(batch.response_mask) == 0
    assert (series["process_reward"][pad] == 0).all() and (series["log_ratio_ref"][pad] == 0).all()
    # the process reward the update used is beta * (log pi_prm - log pi_ref) on real tokens
    assert np.abs(series["process_reward"][~pad]).max() > 0
    page = run.write_samples(str(tmp_path / "samples"))
    html = pathlib.Path(page["html"]).read_text()
    assert page["html"].name == "step_00001.html" and "process_reward" in html and "advantage" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    ev = run.evaluate()
    assert 0.0 <= ev["eval/pass@1"] <= 1.0 and "eval/prm_auroc" in ev
    assert math.isnan(ev["eval/prm_auroc"]) or 0.0 <= ev["eval/prm_auroc"] <= 1.0
    eval_page = tmp_path / "samples" / "eval_00001.html"  # one page per eval, PRM token rewards
    assert eval_page.exists() and "process_reward" in eval_page.read_text()
  finally:
    run.close()
  # the eval's token rewards sum to its sequence rewards (the AUROC's scores)
  from jaxrl_dense.eval import prm as eval_prm
  run = Trainer(_smoke_config(steps=1))
  try:
    recs = run.eval_records[:3]
    resp = [["12"], ["7 + 5 = 12"], ["x"]]
    r, tok, mask, q = eval_prm.implicit_prm_rewards(
        models.init_params(run.model_config, jax.random.PRNGKey(5)), run.state.ref_params,
        run.model_config, run.tokenizer, recs, resp, beta=0.05, batch_size=2, encoder=run.encoder,
        token_rewards=True)
    np.testing.assert_allclose(q.sum(1), r.reshape(-1), rtol=1e-4, atol=1e-6)
    assert (q[mask == 0] == 0).all() and tok.shape == mask.shape == q.shape
  finally:
    run.close()
  # the monitor replays a history silently and alarms on a rising reward with falling accuracy
  mon = prm_health.RewardHackingMonitor(window=4, t_threshold=2.0)
  outs = [mon.update(i, 0.1 * i, 1.0 - 0.1 * i + 0.01 * (i % 2)) for i in range(1, 7)]
  assert outs[2]["prm_health/hacking_alarm"] == 0 and outs[-1]["prm_health/hacking_alarm"] == 1


@pytest.mark.slow
def test_steps_after_the_first_never_recompile(tmp_path):
  from jaxrl_dense.rl.trainer import Trainer
  run = Trainer(_smoke_config(eval_data="", steps=3))
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  try:
    run.train_step()
    first = len(compiles)
    assert first > 0
    run.train_step()
    run.train_step()
    assert len(compiles) == first, f"{len(compiles) - first} compilations after step 1"
  finally:
    jax.monitoring.clear_event_listeners()
    run.close()


@pytest.mark.slow
def test_length_buckets_trim_batches_and_compile_once_per_bucket():
  """--length_bucket=4: every trained batch is cut to its longest prompt / response rounded up to
  a multiple of 4 (never wider than the flag file's maxima), and the update compiles only when a
  new (prompt, response) bucket appears."""
  from jaxrl_dense.rl.trainer import Trainer
  run = Trainer(_smoke_config(eval_data="", steps=4, length_bucket=4))
  shapes, compiles = [], []
  orig = run.update_fn

  def spy(state, batch, key):
    shapes.append((batch.prompt_tokens.shape[1], batch.response_tokens.shape[1]))
    longest = int(np.asarray(batch.prompt_mask).sum(1).max())
    assert shapes[-1][0] - 4 < longest <= shapes[-1][0], (shapes[-1], longest)
    return orig(state, batch, key)

  run.update_fn = spy
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  try:
    counts = []
    for _ in range(4):
      before = len(compiles)
      run.train_step()
      counts.append(len(compiles) - before)
  finally:
    jax.monitoring.clear_event_listeners()
    run.close()
  for (p, r) in shapes:
    assert p % 4 == 0 and r % 4 == 0 and p <= 48 and r <= 16, shapes
  print("buckets", shapes, "compiles per step", counts)
  assert any(p < 48 for p, _ in shapes), shapes  # the prompts are shorter than their padding
  assert len(set(shapes)) < len(shapes), shapes  # a bucket repeats: the no-recompile check bites
  new_bucket = [i == 0 or shapes[i] not in shapes[:i] for i in range(len(shapes))]
  for i in range(1, 4):  # a step compiles the update only for a bucket not seen before
    if not new_bucket[i]:
      assert counts[i] == 0, (shapes, counts)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  """lr=1e30 makes step 1's update blow the params up; step 2's loss is NaN."""
  r = _run([f"--flagfile={SMOKE}", "--eval_data=", "--steps=4", "--lr=1e30", "--grad_clip=0",
            "--checkpoint_every=1", f"--checkpoint_dir={tmp_path}/ck"], timeout=1200)
  assert r.returncode == 3, r.stderr[-3000:]
  assert "not finite" in r.stderr and "last good checkpoint is step 1" in r.stderr, r.stderr[-3000:]
  saved = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
  assert saved == [1]


@pytest.mark.slow
def test_smoke_runs_sharded_on_8_simulated_devices(tmp_path):
  """data:2 x fsdp:2 x tensor:2 on 8 simulated CPU devices: params, optimizer states and batches
  sharded, every jitted step compiled with explicit shardings."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, str(SCRIPT), f"--flagfile={SMOKE}", "--eval_data=", "--steps=2",
                      "--mesh=data:2,fsdp:2,tensor:2", f"--logdir={tmp_path}"],
                     capture_output=True, text=True, timeout=1200, cwd=str(REPO), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "devices=8" in r.stdout
  m = _metrics(str(tmp_path))
  assert sorted(m) == [1, 2]
  for rec in m.values():
    for k, v in _comparable(rec).items():
      assert math.isfinite(v) or k.startswith("prm_health/"), (k, v)


def test_share_prompt_group_size_and_fallback():
  build = lambda **kw: config_lib.build(config_lib.PrimeConfig, kw)
  assert build(n=4, micro_batch_size=8, prm_micro_batch_size=8, score_micro_batch_size=16).prompt_group == 4
  # A micro-batch that would split a group: full rows instead (same math, no sharing).
  assert build(n=3, micro_batch_size=2, prm_micro_batch_size=3, score_micro_batch_size=3,
               prompts_per_step=4).prompt_group == 1
  assert build(n=4, share_prompt=False).prompt_group == 1


@pytest.mark.slow
def test_dry_run_aot_writes_the_compiled_memory_plan(tmp_path):
  """--dry_run --aot compiles the sampler and the one jitted update for --mesh on simulated CPU
  devices (no weights read) and writes per-device bytes; a LoRA PRM shrinks the resident state."""
  plans = {}
  for name, extra in (("full", ["--plan_target=v5e"]), ("lora", ["--prm_lora_rank=4"])):
    path = tmp_path / f"{name}.json"
    r = _run([f"--flagfile={SMOKE}", "--dry_run", "--aot", "--mesh=data:2,fsdp:2,tensor:2",
              f"--plan_json={path}", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Compiled memory plan" in r.stdout and "peak per device" in r.stdout
    plans[name] = json.loads(path.read_text())
  full, lora_ = plans["full"], plans["lora"]
  assert full["devices"] == 8 and full["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert set(full["programs"]) == {"generate", "update"}
  for m in full["programs"].values():
    assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"] > 0
  upd = full["programs"]["update"]
  # the update's arguments are the (donated) state plus the batch; its state outputs alias them
  assert upd["argument_bytes"] >= full["resident_state_bytes"] and upd["alias_bytes"] >= 0.9 * full["resident_state_bytes"]
  assert full["peak_bytes_per_device"] == max(full["generate_with_state_bytes"], upd["peak_bytes"])
  assert lora_["lora"]["prm"]["rank"] == 4 and lora_["resident_state_bytes"] < 0.7 * full["resident_state_bytes"]
  # --plan_target checks the peak against the chip's memory less the runtime's reserve
  assert full["target"]["target"] == "v5e" and full["target"]["fits"] is True
  assert full["target"]["peak_gib"] == round(full["peak_bytes_per_device"] / 2**30, 2)
  assert "target" not in lora_


def test_prm_losses_dispatch_through_the_registry():
  """make_prm_update takes a PRM_LOSSES name; grouping and row-summing come from the entry."""
  from jaxrl_dense import rewards
  info = {n: rewards.PRM_LOSSES.info(n) for n in rewards.PRM_LOSSES.names()}
  assert info["ce"] == {"grouped": False, "sums_rows": False}
  assert info["dpo"] == {"grouped": True, "sums_rows": False}
  assert info["bon_acc"]["sums_rows"] and info["bon_rm"]["grouped"]
  opt = optax.sgd(0.1)
  for bad in ("nope", implicit_prm.prm_ce_loss):
    with pytest.raises(ValueError, match="registered PRM loss"):
      steps.make_prm_update(TINY, opt, beta=0.05, mini_batch_size=4, micro_batch_size=4, loss_fn=bad)
  with pytest.raises(ValueError, match="group-wise PRM loss"):   # grouped: needs groups of n >= 2
    steps.make_prm_update(TINY, opt, beta=0.05, mini_batch_size=4, micro_batch_size=4, loss_fn="dpo")


def test_plan_target_fit_and_memory_fraction():
  """`plan_lib.target_fit`: a GPU plan fits when the pool (fraction x HBM) holds the peak and the
  rest holds the reserve; the needed fraction is rounded up; a TPU plan fits HBM - reserve."""
  from jaxrl_dense.rl import plan as plan_lib
  gib = 2**30
  h = plan_lib.target_fit(int(57.25 * gib), "h100")
  assert h["memory_fraction"] == 0.75 and h["fits"] and h["need_fraction"] == 0.72
  h = plan_lib.target_fit(int(70 * gib), "h100")   # above JAX's default pool (59.7 GiB)
  assert not h["fits"] and h["need_fraction"] == 0.88 and h["fits_budget"]
  assert plan_lib.target_fit(int(70 * gib), "h100", 0.9)["fits"]
  assert not plan_lib.target_fit(int(70 * gib), "h100", 0.99)["fits"]   # no room left for the reserve
  assert not plan_lib.target_fit(int(77 * gib), "h100")["fits_budget"]
  assert plan_lib.target_fit(int(15.2 * gib), "v5e")["fits"] and not plan_lib.target_fit(int(15.5 * gib), "v5e")["fits"]
  with pytest.raises(config_lib.ConfigError, match="plan_target"):
    plan_lib.target_fit(1, "a100")
  cfg = config_lib.from_args(["--memory_fraction=0.9", "--plan_target=h100"])
  assert cfg.memory_fraction == 0.9 and cfg.plan_target == "h100"
  with pytest.raises(config_lib.ConfigError, match="memory_fraction"):
    config_lib.from_args(["--memory_fraction=1.5"])


@pytest.mark.slow
def test_prm_auroc_tool_scores_a_runs_heldout_responses(tmp_path):
  """experiments/prm_auroc.py restores a run's PRM from its checkpoint and reports the held-out
  AUROC of its sequence reward on an eval report's responses; a mismatched config is refused."""
  common = [f"--flagfile={SMOKE}", "--steps=1", f"--checkpoint_dir={tmp_path}/ck"]
  r = _run([*common, "--eval_at_start=false", f"--logdir={tmp_path}"])
  assert r.returncode == 0, r.stderr[-3000:]
  report = tmp_path / "eval_step00001_end.json"
  tool = REPO / "experiments" / "prm_auroc.py"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(tool), *common, f"--report={report}", f"--out={tmp_path}/a.json"],
                     capture_output=True, text=True, timeout=900, cwd=str(REPO), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "a.json").read_text())
  assert res["step"] == 1 and res["num"] == 16 and 0 <= res["positives"] <= 16
  assert math.isnan(res["auroc"]) or 0.0 <= res["auroc"] <= 1.0
  r = subprocess.run([sys.executable, str(tool), *common, "--beta=0.1", f"--report={report}"],
                     capture_output=True, text=True, timeout=900, cwd=str(REPO), env=env)
  assert r.returncode == 4 and "beta" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_prm_is_reference_detects_an_untrained_prm():
  """The eval skips the PRM's AUROC only while the PRM equals the reference (every implicit reward
  exactly 0): full weights equal leaf for leaf, or LoRA adapters whose B is still zero."""
  from jaxrl_dense.rl.trainer import Trainer
  for overrides in ({}, {"prm_lora_rank": 2}):
    run = Trainer(_smoke_config(steps=1, eval_data="", **overrides))
    try:
      assert run.prm_is_reference(), overrides
      state = run.state
      leaves = jax.tree_util.tree_leaves_with_path(state.prm.params)
      target = next(p for p, _ in leaves if "lora_b" in jax.tree_util.keystr(p)) if overrides else leaves[-1][0]
      bumped = jax.tree_util.tree_map_with_path(lambda p, x: x + 1e-3 if p == target else x, state.prm.params)
      run.state = state._replace(prm=state.prm._replace(params=bumped))
      assert not run.prm_is_reference(), overrides
    finally:
      run.close()


# ------------------------------------------- inputs checked before work
def _prompt_rows(path, contents):
  path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": c}],
                                      "reward_model": {"ground_truth": "2"}}) + "\n" for c in contents))
  return str(path)


def test_output_dirs_must_be_directories_or_creatable(tmp_path):
  from jaxrl_dense.rl import load, plan as plan_lib
  afile = tmp_path / "afile"
  afile.write_text("x")
  for name in load.OUTPUT_DIRS:
    for path, why in ((afile, "exists and is not a directory"), (afile / "sub" / "d", "is not a directory")):
      with pytest.raises(config_lib.ConfigError, match=why) as e:
        load.check_inputs(_smoke_config(**{name: str(path)}))
      assert e.value.field == name
    load.check_inputs(_smoke_config(**{name: str(tmp_path / "new" / "nested")}))  # creatable
    load.check_inputs(_smoke_config(**{name: str(tmp_path)}))  # an existing directory
  assert not (tmp_path / "new").exists()  # checked, not created
  text, problems = plan_lib.plan(_smoke_config(checkpoint_dir=str(afile), plan_json=str(tmp_path)))
  assert any("--checkpoint_dir=" in p for p in problems) and any("--plan_json=" in p for p in problems)


def test_upper_bounds_of_top_k_arith_num_eval_and_verify_workers(tmp_path):
  from jaxrl_dense.rl import load
  load.check_inputs(_smoke_config(top_k=104, arith_num_eval=15146, verify_workers=4 * os.cpu_count()))
  for name, value, why in (("top_k", 105, "vocabulary size 104"),
                           ("arith_num_eval", 15147, "15147 distinct problems"),
                           ("verify_workers", 4 * os.cpu_count() + 1, "CPUs of this machine")):
    with pytest.raises(config_lib.ConfigError, match=why) as e:
      load.check_inputs(_smoke_config(**{name: value}))
    assert e.value.field == name
  # --arith_num_eval bounds only the arithmetic task
  train = _prompt_rows(tmp_path / "train.jsonl", ["1+1?"])
  load.check_inputs(_smoke_config(arith_num_eval=20000, train_data=train, eval_data=""))


def test_damaged_model_and_tokenizer_files_name_the_flag_and_file(tmp_path):
  from jaxrl_dense.rl import load
  cfg = _smoke_config()
  bad_gguf = tmp_path / "bad.gguf"
  bad_gguf.write_bytes(os.urandom(4096))
  bad_json = tmp_path / "bad_json"
  bad_json.mkdir()
  (bad_json / "config.json").write_text('{"model_type": "llama", "vocab')
  (bad_json / "model.safetensors").write_bytes(b"")
  bad_st = tmp_path / "bad_st"
  bad_st.mkdir()
  (bad_st / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
  (bad_st / "model.safetensors").write_bytes(os.urandom(4096))
  for spec, what in ((bad_gguf, "not a readable GGUF"), (bad_json, "config.json"), (bad_st, "model.safetensors")):
    for name in ("model", "prm_model"):
      with pytest.raises(config_lib.ConfigError, match=what) as e:
        load.load_model(str(spec), cfg, name=name)
      assert e.value.field == name and str(spec) in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="not a readable GGUF") as e:
    load.load_tokenizer(str(bad_gguf))
  assert e.value.field == "tokenizer"
  with pytest.raises(config_lib.ConfigError, match="not a readable GGUF") as e:  # --top_k reads the vocab
    load.check_limits(config_lib.replace(cfg, model=str(bad_gguf), top_k=5))
  assert e.value.field == "model"


def test_dropped_eval_prompts_are_counted(tmp_path, capsys):
  from jaxrl_dense.rl.trainer import Trainer
  ev = _prompt_rows(tmp_path / "ev.jsonl", ["1+1?"] + ["1+1? " * 40] * 3)
  run = Trainer(_smoke_config(eval_data=ev))
  try:
    assert len(run.eval_records) == 1
  finally:
    run.close()
  assert "[data] dropped 3 eval prompts longer than --max_prompt_length (1 left)" in capsys.readouterr().out


def test_resume_refuses_a_train_file_whose_content_changed(tmp_path):
  """The checkpoint fingerprint holds a hash of a --train_data file: fewer rows or the same count
  with other content under the same path is refused (exit 4's error), before any model loads."""
  from jaxrl_dense import checkpoint as ckpt_lib
  from jaxrl_dense.rl import load
  train = tmp_path / "train.jsonl"
  _prompt_rows(train, [f"{i}+1?" for i in range(8)])
  cfg = _smoke_config(train_data=str(train))
  open_ = lambda: ckpt_lib.Checkpointer(tmp_path / "ck", fingerprint=load.checkpoint_fingerprint(cfg))
  with open_() as c:
    c.save(1, {"w": jnp.zeros(2)}, {"step": 1}, force=True)
  open_().close()  # unchanged: resumes
  for rows in ([f"{i}+2?" for i in range(8)], [f"{i}+1?" for i in range(4)]):
    _prompt_rows(train, rows)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="train_data_sha256"):
      open_()


@pytest.mark.slow
def test_resume_without_a_complete_checkpoint_starts_fresh_once(tmp_path):
  """A kill inside the first save leaves only Orbax's tmp directory: --resume says it starts
  fresh, and metrics.jsonl holds one step-0 eval row (not the killed attempt's as well)."""
  ck, logs = tmp_path / "ck", tmp_path / "logs"
  (ck / "1.orbax-checkpoint-tmp-1234").mkdir(parents=True)
  logs.mkdir()
  (logs / "metrics.jsonl").write_text(json.dumps({"step": 0, "time": 0.0, "eval/pass@1": 0.0}) + "\n")
  ev = _prompt_rows(tmp_path / "ev.jsonl", ["1+1?"] + ["1+1? " * 40] * 3)
  r = _run([f"--flagfile={SMOKE}", "--steps=1", "--resume", f"--checkpoint_dir={ck}", f"--logdir={logs}",
            f"--eval_data={ev}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"[resume] no complete checkpoint in {ck}; starting from step 0" in r.stdout, r.stdout[-2000:]
  assert "[data] dropped 3 eval prompts" in r.stdout and "on 1 problems" in r.stdout, r.stdout[-2000:]
  rows = [json.loads(l) for l in open(logs / "metrics.jsonl") if l.strip()]
  assert [row["step"] for row in rows if "eval/pass@1" in row] == [0, 1], rows
  assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [1]


def test_passes_take_one_typed_batch_and_keep_the_mapping_form():
  """Each pass on a RolloutBatch (filled in by `_replace`) equals the deprecated Mapping form."""
  params, ref = _params(0), _params(1)
  d = _batch()
  d["ref_logp"], d["old_logp"] = _resp_logp(ref, d), _resp_logp(params, d)
  d["weight"] = jnp.asarray([1, 1, 1, 1, 0, 0, 1, 1], jnp.float32)
  rb = RolloutBatch(d["tokens"][:, :P], d["attention_mask"][:, :P], d["tokens"][:, P:], d["response_mask"],
                    d["acc"], ref_logp=d["ref_logp"], old_logp=d["old_logp"], advantages=d["advantages"],
                    in_band=d["weight"])
  lp, ent = steps.make_logprobs(TINY, micro_batch_size=4, with_entropy=True)(params, rb)
  np.testing.assert_allclose(lp, _resp_logp(params, d), atol=1e-5)
  assert ent.shape == (8, R)
  np.testing.assert_allclose(steps.make_logprobs(TINY, micro_batch_size=2)(ref, rb), d["ref_logp"], atol=1e-5)
  opt = optax.sgd(0.1)
  prm = jax.jit(steps.make_prm_update(TINY, opt, beta=0.5, mini_batch_size=4, micro_batch_size=2), donate_argnums=(0,))
  init = lambda: state_lib.init_train_state(jax.tree.map(jnp.copy, params), opt)
  st_t, out, m_t = prm(init(), rb)
  st_d, lp_d, m_d = prm(init(), d)
  assert isinstance(out, RolloutBatch)
  np.testing.assert_array_equal(out.outcome, rb.outcome)
  np.testing.assert_allclose(out.prm_logp, lp_d, atol=1e-6)
  np.testing.assert_allclose(m_t["prm/loss"], m_d["prm/loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), st_t.params, st_d.params)
  # The policy loss covers response_mask x keep x weights x rollout_rs_keep.
  keep = jnp.asarray([1, 0, 1, 1, 1, 1, 0, 1], bool)
  rs = jnp.asarray(np.random.default_rng(1).integers(0, 2, (8, R)), jnp.float32)
  typed = rb._replace(keep=keep, weights=d["weight"], rollout_rs_keep=rs)
  pm = d["response_mask"] * keep[:, None] * d["weight"][:, None] * rs
  np.testing.assert_array_equal(typed.policy_mask(), pm)
  pol = jax.jit(steps.make_policy_update(TINY, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=8,
                                 micro_batch_size=4, shuffle=False), donate_argnums=(0,))
  st_t, out_t, m_t = pol(init(), typed, jax.random.PRNGKey(0))
  assert isinstance(out_t, RolloutBatch)  # the policy pass returns its batch, as the PRM pass does
  np.testing.assert_array_equal(out_t.advantages, typed.advantages)
  st_d, m_d = pol(init(), dict(d, response_mask=pm), jax.random.PRNGKey(0))
  np.testing.assert_allclose(m_t["actor/loss"], m_d["actor/loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), st_t.params, st_d.params)
  with pytest.raises(ValueError, match="advantages"):
    pol(init(), rb._replace(advantages=None), jax.random.PRNGKey(0))
