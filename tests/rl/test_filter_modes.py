"""PRIME's filter protocol: --filter_mode=fill|mask|resample, the PRM trained on in-band
groups only, the float-noise guard of the batch-norm, and the per-step filter diagnostics.

The key checks: the mask-mode update equals the update on the in-band groups alone (PRIME, RLOO,
GRPO), and a resample run on the library trainer resumes exactly with a non-empty prompt buffer."""
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import advantages, models
from jaxrl_dense.models import lora
from jaxrl_dense.rewards import implicit_prm
from jaxrl_dense.rl import RolloutBatch, config as config_lib, prime, rollout

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"
TINY = models.ModelConfig(model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,),
                          pad_token_id=0)
# 4 groups of 4: groups 0 and 2 in the band (acc 2/4, 1/4), group 1 all wrong, group 3 all right.
ACC = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1], np.float32)
IN_BAND = np.repeat(np.array([1, 0, 1, 0], np.float32), 4)


def _cfg(**kw):
  base = dict(n=4, prompts_per_step=4, micro_batch_size=4, prm_micro_batch_size=4,
              score_micro_batch_size=4, max_prompt_length=5, max_response_length=6, lr=1e-2,
              prm_lr=1e-2, prm_update="after")
  return config_lib.build(config_lib.PrimeConfig, {**base, **kw})


def _batch(acc=ACC, in_band=IN_BAND, seed=0):
  rng = np.random.default_rng(seed)
  b, p, r = acc.shape[0], 5, 6
  lengths = rng.integers(1, r + 1, b)
  rm = (np.arange(r)[None] < lengths[:, None]).astype(np.float32)
  pm = np.ones((b // 4, p), np.int32)
  pm[1, :2] = 0
  return RolloutBatch(
      prompt_tokens=np.repeat(rng.integers(2, 48, (b // 4, p)) * pm, 4, 0).astype(np.int32),
      prompt_mask=np.repeat(pm, 4, 0), response_tokens=(rng.integers(2, 48, (b, r)) * rm).astype(np.int32),
      response_mask=rm, outcome=np.asarray(acc, np.float32),
      in_band=None if in_band is None else np.asarray(in_band, np.float32))


def _rows(batch, rows):
  return jax.tree.map(lambda x: x[rows], batch)


def _params(key):
  return models.init_params(TINY, jax.random.PRNGKey(key))


# ------------------------------------------------------------------------------ configuration
def test_filter_mode_defaults_follow_the_variant_and_are_validated():
  assert _cfg().filter_protocol == "fill" and not _cfg().masks_filler
  assert _cfg(reference_impl="original").filter_protocol == "resample"
  assert _cfg(reference_impl="original", filter_mode="fill").filter_protocol == "fill"
  assert _cfg(filter_mode="mask").masks_filler and _cfg(filter_mode="resample").masks_filler
  assert _cfg(filter="none", reference_impl="original").filter_protocol == "fill"
  for bad in (dict(filter_mode="drop"), dict(filter_mode="mask", filter="none"),
              dict(filter_mode="resample", filter="prof"), dict(resample_max_rounds=0),
              dict(prm_noise_tol=-1.0)):
    with pytest.raises(config_lib.ConfigError, match=f"--{next(k for k in bad if k != 'filter')}="):
      _cfg(**bad)
  args = config_lib.from_args([f"--flagfile={SMOKE}", "--filter_mode=resample", "--resample_max_rounds=3"])
  assert args.prime.filter_protocol == "resample" and args.prime.filter.resample_max_rounds == 3
  # Left out of the fingerprint at their defaults (older checkpoints resume); in it otherwise.
  base = config_lib.RunConfig()
  fp = config_lib.fingerprint(base)
  assert not {"filter_mode", "resample_max_rounds", "process_on_filler", "prm_on_filler",
              "prm_noise_tol"} & set(fp)
  fp_r = config_lib.fingerprint(config_lib.replace(base, filter_mode="resample"))
  assert fp_r["filter_mode"] == "resample" and fp_r["resample_max_rounds"] == 8
  assert "resample_max_rounds" in config_lib.fingerprint(config_lib.replace(base, reference_impl="original"))


# ------------------------------------------------------------------------- pure functions
def test_row_masked_batch_norm_and_prime_rloo_equal_the_sub_batch():
  rng = np.random.default_rng(1)
  mask = jnp.asarray(np.arange(6)[None] < rng.integers(1, 7, 16)[:, None], jnp.float32)
  s = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32) * mask
  s = s.at[4:8].multiply(50.0)  # the filler group has the largest returns: it would set Z
  keep = np.flatnonzero(IN_BAND)
  normed = implicit_prm.prime_batch_norm(s, row_mask=IN_BAND)
  np.testing.assert_allclose(normed[keep], implicit_prm.prime_batch_norm(s[keep]), rtol=1e-6)
  assert np.all(np.asarray(normed)[IN_BAND == 0] == 0)
  assert not np.allclose(implicit_prm.prime_batch_norm(s)[keep], normed[keep])
  for variant in ("verl", "original", "paper"):
    adv, ret = advantages.prime_rloo_advantages(normed, ACC, mask, n=4, reference_impl=variant, row_mask=IN_BAND)
    want_a, want_r = advantages.prime_rloo_advantages(normed[keep], ACC[keep], mask[keep], n=4,
                                                      reference_impl=variant)
    np.testing.assert_allclose(adv[keep], want_a, atol=1e-5, err_msg=variant)
    np.testing.assert_allclose(ret[keep], want_r, atol=1e-5, err_msg=variant)
    assert np.all(np.asarray(adv)[IN_BAND == 0] == 0) and np.all(np.asarray(ret)[IN_BAND == 0] == 0)
  # The whitening estimators of the registry take the row mask too.
  x = advantages.AdvantageInputs(jnp.asarray(ACC), mask, row_mask=jnp.asarray(IN_BAND))
  for name in ("reinforce_pp", "reinforce_pp_baseline", "grpo", "rloo"):
    got = advantages.ESTIMATORS.get(name)(x, advantages.AdvantageParams(n=4))[0]
    sub = advantages.ESTIMATORS.get(name)(advantages.AdvantageInputs(jnp.asarray(ACC[keep]), mask[keep]),
                                          advantages.AdvantageParams(n=4))[0]
    np.testing.assert_allclose(got[keep], sub, atol=1e-5, err_msg=name)


def test_zero_float_noise_guard():
  scores = jnp.full((4, 5), 0.3)
  q = jnp.full((4, 5), 1e-6)  # |suffix sums| <= 5e-6: float noise
  assert np.all(np.asarray(implicit_prm.zero_float_noise(scores, q, tol=1e-4)) == 0)
  np.testing.assert_array_equal(implicit_prm.zero_float_noise(scores, q, tol=0.0), scores)
  q_big = q.at[3, 0].set(2e-4)  # one row above the tolerance: kept...
  np.testing.assert_array_equal(implicit_prm.zero_float_noise(scores, q_big, tol=1e-4), scores)
  # ... unless that row is masked out (an out-of-band group).
  assert np.all(np.asarray(implicit_prm.zero_float_noise(scores, q_big, tol=1e-4,
                                                         row_mask=jnp.array([1., 1, 1, 0]))) == 0)


def test_position_bins_and_weighted_corr():
  r = jnp.asarray([[1., 2, 3, 4, 0, 0, 0, 0], [1, 1, 2, 2, 3, 3, 4, 4]])
  m = jnp.asarray([[1., 1, 1, 1, 0, 0, 0, 0], [1] * 8])
  from jaxrl_dense.observe import prm_health
  np.testing.assert_allclose(prm_health.position_bin_means(r, m, jnp.ones(2)), [1, 2, 3, 4])
  np.testing.assert_allclose(prm_health.position_bin_means(r, m, jnp.array([1., 0])), [1, 2, 3, 4])
  assert prime.position_bin_means is prm_health.position_bin_means  # still importable from rl.prime
  x, y = jnp.array([1., 2, 3, 10]), jnp.array([2., 4, 6, -5])
  np.testing.assert_allclose(prime._weighted_corr(x, y, jnp.array([1., 1, 1, 0])), 1.0, rtol=1e-6)
  assert float(prime._weighted_corr(x, jnp.ones(4), jnp.ones(4))) == 0.0  # no variance: 0, finite


# --------------------------------------------------- mask mode = the in-band sub-batch alone
SAME = ("prm/loss", "prm/grad_norm", "actor/pg_loss", "actor/loss", "actor/grad_norm", "actor/entropy",
        "actor/clipfrac", "actor/ppo_kl", "entropy", "kl_ref", "adv/mean", "adv/std", "adv/max", "adv/min",
        "returns/mean", "prm/q_seq_mean", "prm/process_reward_mean", "adv/process_length_corr",
        "prm/implicit_reward_pos1", "prm/implicit_reward_pos4")


@pytest.mark.parametrize("algo", ["prime", "rloo", "grpo"])
def test_mask_mode_update_equals_the_in_band_sub_batch(algo):
  """Policy, PRM, advantages and the logged means of a mask-mode step on 4 groups (2 out of band)
  equal those of the same step on the 2 in-band groups alone (one PRM and one PPO mini-batch,
  micro-batches of one group: float32 summation order only), and differ from fill mode."""
  keep = np.flatnonzero(IN_BAND)
  full, sub = _batch(), _rows(_batch(), keep)
  out = {}
  for name, cfg, batch in (("mask", _cfg(algo=algo, filter_mode="mask"), full),
                           ("fill", _cfg(algo=algo, filter_mode="fill"), full),
                           ("sub", _cfg(algo=algo, filter_mode="mask", prompts_per_step=2), sub)):
    init_fn, update_fn = prime.make_prime(TINY, cfg, token_series=True)
    uses = algo == "prime"
    # PRM (= policy init) and reference differ, so the implicit rewards are not 0.
    state = init_fn(_params(0), _params(0) if uses else None, _params(1) if uses else None)
    state, m = update_fn(state, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(3))
    out[name] = (state, m)
  (sm, mm), (ss, ms), (sf, mf) = out["mask"], out["sub"], out["fill"]
  trees = lambda st: (st.policy.params,) + ((st.prm.params,) if st.prm is not None else ())
  for x, y in zip(jax.tree.leaves(trees(sm)), jax.tree.leaves(trees(ss))):
    np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5)
  adv_m, adv_s = np.asarray(mm["token_series"]["advantage"]), np.asarray(ms["token_series"]["advantage"])
  np.testing.assert_allclose(adv_m[keep], adv_s, atol=1e-5)
  assert np.all(adv_m[IN_BAND == 0] == 0)
  for k in SAME:
    if k in ms:
      np.testing.assert_allclose(float(mm[k]), float(ms[k]), atol=1e-5, rtol=1e-4, err_msg=k)
  assert float(mm["filter/filler_adv_share"]) == 0.0
  # fill trains on the filler: another update (PRIME: process advantages on the filler groups).
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(sf.policy.params), jax.tree.leaves(sm.policy.params)))
  if algo == "prime":
    assert diff > 1e-4 and float(mf["filter/filler_adv_share"]) > 0.2
  else:  # outcome-only: all-wrong / all-right groups have 0 advantage, only the token count differs
    assert float(mf["filter/filler_adv_share"]) == 0.0


def test_prm_trains_on_in_band_groups_only_in_fill_mode_too():
  """fill: the PRM update equals the PRM update on the in-band rows alone (the policy still
  trains on the filler); --prm_on_filler=true restores the veRL recipe's PRM on every row."""
  keep = np.flatnonzero(IN_BAND)
  res = {}
  for name, cfg, batch in (("fill", _cfg(), _batch()), ("sub", _cfg(prompts_per_step=2), _rows(_batch(), keep)),
                           ("all", _cfg(prm_on_filler=True), _batch())):
    init_fn, update_fn = prime.make_prime(TINY, cfg)
    state, m = update_fn(init_fn(_params(0), _params(0), _params(1)), jax.tree.map(jnp.asarray, batch),
                         jax.random.PRNGKey(3))
    res[name] = state.prm.params
  for x, y in zip(jax.tree.leaves(res["fill"]), jax.tree.leaves(res["sub"])):
    np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5)
  assert any(not np.allclose(x, y, atol=1e-4) for x, y in zip(jax.tree.leaves(res["fill"]),
                                                             jax.tree.leaves(res["all"])))


def test_all_filler_step_leaves_prm_and_policy_untouched_in_mask_mode():
  init_fn, update_fn = prime.make_prime(TINY, _cfg(filter_mode="mask"))
  state = init_fn(_params(0), _params(0), _params(1))
  before = jax.tree.map(np.array, (state.policy.params, state.prm.params))
  state, m = update_fn(state, jax.tree.map(jnp.asarray, _batch(in_band=np.zeros(16))), jax.random.PRNGKey(3))
  for x, y in zip(jax.tree.leaves((state.policy.params, state.prm.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(x), y)
  assert int(state.policy.step) == 0 and int(state.prm.step) == 0
  assert np.isfinite(float(m["actor/loss"])) and np.isfinite(float(m["prm/loss"]))


def test_process_on_filler_false_zeroes_the_filler_process_term():
  """fill with --process_on_filler=false: the all-wrong / all-right groups carry no process signal
  (their outcome leave-one-out is 0 and their process term is off, so their returns are 0 and
  the whitening gives every filler token the same value, −mean/std), and less of Σ|A| lands on
  them than with the process term on."""
  share = {}
  for on in (True, False):
    init_fn, update_fn = prime.make_prime(TINY, _cfg(process_on_filler=on), token_series=True)
    _, m = update_fn(init_fn(_params(0), _params(0), _params(1)), jax.tree.map(jnp.asarray, _batch()),
                     jax.random.PRNGKey(3))
    adv, ret = np.asarray(m["token_series"]["advantage"]), np.asarray(m["token_series"]["return"])
    filler = (IN_BAND == 0)[:, None] & (_batch().response_mask > 0)
    share[on] = float(m["filter/filler_adv_share"])
    if not on:
      assert np.all(ret[IN_BAND == 0] == 0)
      np.testing.assert_allclose(adv[filler], adv[filler][0], atol=1e-6)
      assert np.ptp(adv[(IN_BAND == 1)[:, None] & (_batch().response_mask > 0)]) > 0.5
  assert share[False] < share[True]


# ------------------------------------------------- step 1, PRM = reference: advantages exactly 0
@pytest.mark.parametrize("prm", ["full", "full_rounded", "lora"])
def test_prm_equal_to_reference_gives_rloo_zeros_on_an_all_wrong_batch(prm):
  """Step 1 of PRIME, PRM = reference, every group all wrong: the advantages are exactly RLOO's
  zeros. "full_rounded": a reference that differs from the PRM by float32 rounding (~1e-7
  relative), as two forward programs do; without the guard (--prm_noise_tol=0) that noise would
  be normalised to a full-size advantage."""
  acc = np.zeros(16, np.float32)
  batch = jax.tree.map(jnp.asarray, _batch(acc=acc, in_band=np.zeros(16)))
  kw = dict(prm_lora_rank=2) if prm == "lora" else {}

  def run(**more):
    cfg = _cfg(**kw, **more)
    init_fn, update_fn = prime.make_prime(TINY, cfg, token_series=True)
    if prm == "lora":
      base, _ = lora.freeze_base(_params(0), TINY)
      state = init_fn(_params(0), lora.init_adapters(TINY, cfg.prm_lora, jax.random.PRNGKey(2)), base)
    else:
      ref = _params(0)
      if prm == "full_rounded":
        noise = lambda x, k: x * (1 + 1e-7 * jax.random.normal(jax.random.PRNGKey(k), x.shape))
        ref = jax.tree.map(noise, ref, jax.tree.unflatten(jax.tree.structure(ref),
                                                          range(len(jax.tree.leaves(ref)))))
      state = init_fn(_params(0), _params(0), ref)
    return update_fn(state, batch, jax.random.PRNGKey(3))[1]

  m = run()
  assert np.all(np.asarray(m["token_series"]["advantage"]) == 0.0)
  init_r, upd_r = prime.make_prime(TINY, _cfg(algo="rloo"), token_series=True)
  rloo = upd_r(init_r(_params(0)), batch, jax.random.PRNGKey(3))[1]
  np.testing.assert_array_equal(m["token_series"]["advantage"], rloo["token_series"]["advantage"])
  if prm == "full_rounded":
    assert 0 < abs(float(m["prm/q_seq_mean"])) < 1e-4
    unguarded = run(prm_noise_tol=0.0)
    assert np.abs(np.asarray(unguarded["token_series"]["advantage"])).max() > 0.5


# --------------------------------------------------------------- resample: collect + trainer
class _LabelByText:
  """A deterministic fake verifier: prompts with an even gold are never solved; the others are
  solved by half of the response texts (crc32 parity), so some groups fall in the band."""

  def __call__(self, texts, golds, sources):
    return np.array([0.0 if int(g) % 2 == 0 else float(zlib.crc32(t.encode()) % 2)
                     for t, g in zip(texts, golds)], np.float32)

  def close(self):
    pass


def _resample_cfg(tmp_path, **kw):
  return config_lib.replace(
      config_lib.from_args([f"--flagfile={SMOKE}"]),
      model="random:hidden=16,layers=1,heads=2,kv_heads=1,mlp=32", filter_mode="resample",
      filter_truncated=False, resample_max_rounds=3, max_response_length=8, arith_num_eval=4,
      eval_batch_size=4, steps=4, logdir=str(tmp_path / "logs"), **kw)


def test_resample_run_resumes_exactly_with_a_non_empty_buffer(tmp_path):
  from jaxrl_dense import checkpoint as ckpt_lib
  from jaxrl_dense.rl.trainer import Trainer
  cfg = _resample_cfg(tmp_path)
  trainer = Trainer(cfg)
  trainer.verifier.close()
  trainer.verifier = _LabelByText()
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ck", fingerprint=config_lib.fingerprint(cfg), save_every=1,
                               keep_last=3)
  try:
    recs = []
    saved_buffer = None
    for step in (1, 2, 3, 4):
      recs.append(trainer.train_step())
      if step == 2 or (saved_buffer == [] and step == 3):
        ckpt.save(step, *trainer.checkpoint(recs), force=True)
        saved_buffer, saved_step = trainer.prompt_buffer.get_state(), step
    assert saved_buffer, "no step left surplus in-band prompts in the buffer"
    # Every issue-23 diagnostic is in each step's record, finite.
    diag = ("filter/pass_frac", "filter/fill_frac", "filter/resample_rounds", "filter/buffer_size",
            "filter/filler_adv_share", "adv/process_length_corr",
            *(f"prm/implicit_reward_pos{i}" for i in range(1, 5)))
    for r in recs:
      assert all(np.isfinite(r[k]) for k in diag), {k: r.get(k) for k in diag}
    assert max(r["filter/resample_rounds"] for r in recs) >= 2, [r["filter/resample_rounds"] for r in recs]
    for r in recs:  # every kept group is in band unless the round cap was hit
      assert r["filter/fill_frac"] == 0 or r["filter/resample_rounds"] == 3
    after = [jax.tree.map(np.asarray, (trainer.state.policy.params, trainer.state.prm.params)),
             trainer.prompt_buffer.get_state(), trainer.iterator.get_state()]
    tree, meta = ckpt.restore(saved_step, target=trainer.checkpoint()[0])
    trainer.restore(tree, meta)
    assert trainer.prompt_buffer.get_state() == saved_buffer
    again = [trainer.train_step() for _ in range(4 - saved_step)]
    for a, b in zip(again, recs[saved_step:]):
      for k, v in b.items():
        if not k.startswith("time/") and k != "tokens_per_s":
          np.testing.assert_allclose(a[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert trainer.prompt_buffer.get_state() == after[1] and trainer.iterator.get_state() == after[2]
    for x, y in zip(jax.tree.leaves(after[0]),
                    jax.tree.leaves((trainer.state.policy.params, trainer.state.prm.params))):
      np.testing.assert_array_equal(np.asarray(y), x)
  finally:
    ckpt.close()
    trainer.close()


def test_fill_warning_is_printed_once_above_25_percent(capsys):
  """Trainer._warn_fill: silent at <= 25% filler, one warning (naming the mode and the per-step
  metric) the first time a step is above, silent after that."""
  import types
  from jaxrl_dense.rl.trainer import Trainer
  for mode in ("fill", "mask"):
    fake = types.SimpleNamespace(_fill_warned=False, FILL_WARN_FRAC=Trainer.FILL_WARN_FRAC,
                                 cfg=types.SimpleNamespace(prime=types.SimpleNamespace(filter_protocol=mode)))
    Trainer._warn_fill(fake, 0.25, 1)
    assert capsys.readouterr().out == ""
    Trainer._warn_fill(fake, 0.5, 2)
    out = capsys.readouterr().out
    assert out.count("[filter] warning") == 1 and "step 2" in out and "50%" in out
    assert "filter/fill_frac" in out and ("--filter_mode=fill" in out) == (mode == "fill")
    Trainer._warn_fill(fake, 0.9, 3)
    assert capsys.readouterr().out == ""


def test_prompt_buffer_capacity_and_state():
  from jaxrl_dense.data.prompts import PromptRecord
  recs = [PromptRecord(({"role": "user", "content": f"q{i}"},), str(i), "arithmetic", f"a:{i}")
          for i in range(5)]
  buf = rollout.PromptBuffer(capacity=3)
  buf.add(recs[:2])
  buf.add(recs[2:])
  assert [r.uid for r in buf.records] == ["a:0", "a:1", "a:2"]
  other = rollout.PromptBuffer(capacity=3)
  other.set_state(buf.get_state())
  assert other.records == buf.records
  fresh = iter(recs[3:])
  got = rollout.first_round_records(buf, lambda k: [next(fresh) for _ in range(k)], 4)
  assert [r.uid for r in got] == ["a:0", "a:1", "a:2", "a:3"] and len(buf) == 0
