"""The policy-loss menu (GSPO, GSPO-token, CISPO beside PPO), rollout correction between the
sampler (mu), pi_old and pi_theta, and DAPO's overlong shaping: properties beyond the
golden parity cases (tests/test_golden.py): identity, masking and padding, micro-batch
invariance, the three-policy update in the one jitted program, and a bf16 trainer run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import losses, models, rewards
from jaxrl_dense.rl import RolloutBatch, config as config_lib, prime

LOSSES = ("ppo", "ppo_original", "gspo", "gspo_token", "cispo")
TINY = dict(model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1,
            num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,), pad_token_id=0)


def _arrays(b=6, t=7, seed=0, scale=0.3):
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[1, t], rng.integers(1, t + 1, b - 2)])
  m = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  old = rng.normal(-2.0, 0.5, (b, t)).astype(np.float32)
  lp = (old + rng.normal(0, scale, (b, t))).astype(np.float32)
  adv = rng.normal(size=(b, t)).astype(np.float32)
  return jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(m)


def _loss_and_grad(name, lp, old, adv, m, **kw):
  f = lambda x: losses.policy_loss(name, x, old, adv, m, **kw).loss
  return jax.value_and_grad(f)(lp)


# ----------------------------------------------------------------------------- the loss menu


@pytest.mark.parametrize("name", LOSSES)
def test_padding_holds_junk_without_effect(name):
  """Extra padded columns holding junk (huge, even inf log-probs, big advantages) change neither
  the loss nor the gradient on valid tokens, and give 0 gradient on padding."""
  lp, old, adv, m = _arrays()
  loss, g = _loss_and_grad(name, lp, old, adv, m)
  pad = lambda x, v: jnp.concatenate([x, jnp.full((x.shape[0], 3), v, x.dtype)], 1)
  loss2, g2 = _loss_and_grad(name, pad(lp, 50.0), pad(old, -jnp.inf), pad(adv, 1e6), pad(m, 0.0))
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_allclose(g2[:, :7], g, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g2[:, 7:]) == 0)
  assert np.all(np.asarray(g)[np.asarray(m) == 0] == 0)


def test_gspo_token_equals_gspo_with_sequence_advantages():
  """GSPO-token with an advantage constant along each row is GSPO (arXiv 2507.18071 Sec. 4.3): loss and
  gradient; with token-varying advantages they differ (only GSPO-token sees the token values)."""
  lp, old, _, m = _arrays(scale=1e-3)
  adv = jnp.broadcast_to(jnp.asarray(np.random.default_rng(1).normal(size=(6, 1)), jnp.float32), m.shape)
  for clip in ((3e-4, 4e-4), (0.2, 0.28)):
    kw = dict(clip_ratio_low=clip[0], clip_ratio_high=clip[1])
    a, ga = _loss_and_grad("gspo", lp, old, adv, m, **kw)
    b, gb = _loss_and_grad("gspo_token", lp, old, adv, m, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-9)
  _, _, tok_adv, _ = _arrays(scale=1e-3)
  _, ga = _loss_and_grad("gspo", lp, old, tok_adv, m, clip_ratio_low=0.2, clip_ratio_high=0.28)
  _, gb = _loss_and_grad("gspo_token", lp, old, tok_adv, m, clip_ratio_low=0.2, clip_ratio_high=0.28)
  assert not np.allclose(ga, gb)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
  """CISPO's weight is clipped, not its token: every valid token with A != 0 has a gradient
  (-sg(clip(rho)) A / count), where PPO drops the tokens past the clip."""
  lp, old, adv, m = _arrays(scale=1.0)
  _, g_c = _loss_and_grad("cispo", lp, old, adv, m, clip_ratio_low=10.0, clip_ratio_high=0.2)
  _, g_p = _loss_and_grad("ppo", lp, old, adv, m)
  valid = np.asarray(m) > 0
  assert np.all(np.asarray(g_c)[valid] != 0)
  assert np.sum(np.asarray(g_p)[valid] == 0) > 3
  rho = np.exp(np.asarray(lp - old))
  want = -np.clip(rho, 1 - 10.0, 1.2) * np.asarray(adv) * np.asarray(m) / np.asarray(m).sum()
  np.testing.assert_allclose(g_c, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", LOSSES)
def test_ratio_one_gives_the_policy_gradient(name):
  """At pi_theta = pi_old every loss's gradient is the REINFORCE one, -A m / count (token-mean)."""
  _, old, adv, m = _arrays()
  if name in ("gspo",):
    adv = jnp.broadcast_to(jnp.sum(adv * m, 1, keepdims=True) / jnp.sum(m, 1, keepdims=True), m.shape)
  _, g = _loss_and_grad(name, old, old, adv, m, loss_agg_mode="token-mean")
  np.testing.assert_allclose(g, -np.asarray(adv * m) / float(jnp.sum(m)), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------- rollout correction


@pytest.mark.parametrize("is_level", ("none", "token", "sequence"))
@pytest.mark.parametrize("rs_level", ("none", "token", "sequence", "geometric", "k3"))
def test_identical_sampler_and_old_policy_give_weight_one_and_keep_all(is_level, rs_level):
  _, old, _, m = _arrays()
  out = losses.rollout_correction(old, old, m, is_level=is_level, rs_level=rs_level, rs_low=0.999,
                                  rs_high=1.001)
  np.testing.assert_array_equal(out.weights, m)
  np.testing.assert_array_equal(out.keep, m)
  assert out.metrics["kl"] == 0 and out.metrics["chi2_token"] == 0
  if is_level != "none":
    assert out.metrics["is_mean"] == 1 and out.metrics["is_ess"] == pytest.approx(1.0)


def test_correction_weights_masks_and_metrics_by_hand():
  lp_old = jnp.log(jnp.asarray([[0.5, 0.5, 0.5], [0.2, 0.9, 0.0]], jnp.float32) + 1e-30)
  mu = jnp.log(jnp.asarray([[0.1, 0.5, 0.5], [0.35, 0.9, 0.3]], jnp.float32))
  m = jnp.asarray([[1, 1, 1], [1, 1, 0]], jnp.float32)
  r = np.array([[5.0, 1.0, 1.0], [0.2 / 0.35, 1.0, 0.0]])
  tok = losses.rollout_correction(lp_old, mu, m, is_level="token", is_threshold=2.0, rs_level="token")
  np.testing.assert_allclose(tok.weights, np.minimum(r, 2.0) * np.asarray(m), rtol=1e-6)
  np.testing.assert_array_equal(tok.keep, [[0, 1, 1], [1, 1, 0]])  # 5 > 2 leaves; 0.57 is inside
  assert tok.metrics["is_max"] == pytest.approx(5.0) and tok.metrics["is_frac_high"] == pytest.approx(0.2)
  assert tok.metrics["rs_masked_frac"] == pytest.approx(0.2) and tok.metrics["rs_seq_masked_frac"] == 0.5
  seq = losses.rollout_correction(lp_old, mu, m, is_level="sequence", is_threshold=2.0, rs_level="geometric",
                                  rs_low=0.5, rs_high=1.5)
  np.testing.assert_allclose(seq.weights, [[2, 2, 2], [r[1, 0], r[1, 0], 0]], rtol=1e-6)  # prod 5 -> 2
  # geometric means 5^(1/3) = 1.71 (rejected), 0.57^(1/2) = 0.76 (kept)
  np.testing.assert_array_equal(seq.keep, [[0, 0, 0], [1, 1, 0]])


def test_rejection_is_padding_invariant_and_bounds_are_checked():
  _, old, _, m = _arrays()
  mu = old + jnp.asarray(np.random.default_rng(3).normal(0, 0.3, old.shape), jnp.float32)
  pad = lambda x, v: jnp.concatenate([x, jnp.full((x.shape[0], 2), v, x.dtype)], 1)
  for level in ("token", "sequence", "geometric", "k3"):
    a = losses.rejection_mask(old - mu, m, level=level, low=0.7, high=1.4, k3_max=0.05)
    b = losses.rejection_mask(pad(old - mu, 99.0), pad(m, 0.0), level=level, low=0.7, high=1.4, k3_max=0.05)
    np.testing.assert_array_equal(b[:, :-2], a)
    assert 0 < float(jnp.sum(a)) < float(jnp.sum(m)), level  # this batch rejects some, keeps some
  with pytest.raises(ValueError, match="low <= high"):
    losses.rejection_mask(old - mu, m, level="token", low=2.0, high=1.0)
  with pytest.raises(ValueError, match="threshold must be > 0"):
    losses.is_weights(old - mu, m, threshold=0.0)


def test_overlong_penalty_piecewise():
  """DAPO eq. 13 at L_max = 10, L_cache = 4, factor 0.5: 0 up to 6 tokens, then linear to -0.5."""
  lengths = np.arange(11)
  mask = jnp.asarray((np.arange(10)[None] < lengths[:, None]).astype(np.float32))
  got = rewards.overlong_penalty(mask, max_length=10, buffer=4, factor=0.5)
  want = np.minimum(-(lengths - 6) / 4 * 0.5, 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="overlong buffer"):
    rewards.overlong_penalty(mask, max_length=10, buffer=11)


# -------------------------------------------------- the three policies in the one jitted update


def _cfg(**kw):
  base = dict(n=4, prompts_per_step=2, micro_batch_size=4, prm_micro_batch_size=4,
              score_micro_batch_size=4, max_prompt_length=5, max_response_length=6, lr=1e-2,
              prm_lr=1e-2, mini_batch_size=8, shuffle=False)
  return config_lib.build(config_lib.PrimeConfig, {**base, **kw})


def _batch(sampler_logp=None, seed=0):
  rng = np.random.default_rng(seed)
  b, p, r = 8, 5, 6
  lengths = rng.integers(1, r + 1, b)
  rm = (np.arange(r)[None] < lengths[:, None]).astype(np.float32)
  pm = np.ones((b // 4, p), np.int32)
  return RolloutBatch(
      prompt_tokens=jnp.asarray(np.repeat(rng.integers(2, 48, (b // 4, p)), 4, 0), jnp.int32),
      prompt_mask=jnp.asarray(np.repeat(pm, 4, 0)),
      response_tokens=jnp.asarray(rng.integers(2, 48, (b, r)) * rm, jnp.int32),
      response_mask=jnp.asarray(rm), outcome=jnp.asarray([1, 1, 0, 0, 1, 0, 1, 0], jnp.float32),
      sampler_logp=sampler_logp)


def _update(cfg, batch):
  mc = models.ModelConfig(**TINY)
  init_fn, update_fn = prime.make_prime(mc, cfg)
  p = lambda: models.init_params(mc, jax.random.PRNGKey(0))
  state, metrics = update_fn(init_fn(p(), p(), p()), batch, jax.random.PRNGKey(3))
  return state, {k: float(v) for k, v in metrics.items()}


def _old_logp(batch):
  """pi_old's response log-probs at T = 1 (the recomputation the update does)."""
  mc = models.ModelConfig(**TINY)
  seq = batch.sequences()
  lp = models.token_logprobs(models.init_params(mc, jax.random.PRNGKey(0)), mc, seq["tokens"],
                             seq["attention_mask"])
  return lp[:, -6:] * batch.response_mask


def _close(a, b, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("loss", ("gspo_token", "cispo"))
def test_decoupled_update_with_mu_equal_pi_old_is_the_plain_update(loss):
  """rollout_is=token + rollout_rs=token with mu = pi_old: weights 1, nothing rejected, so the
  update equals the update without correction; PRIME with a dense loss runs in the one program."""
  b0 = _batch()
  mu = _old_logp(b0)
  plain, _ = _update(_cfg(policy_loss=loss), b0)
  corr, m = _update(_cfg(policy_loss=loss, rollout_is="token", rollout_rs="token"), _batch(mu))
  _close(plain.policy.params, corr.policy.params)
  assert m["rollout_corr/is_mean"] == pytest.approx(1.0, abs=1e-5)
  assert m["rollout_corr/rs_masked_frac"] == 0.0
  assert all(np.isfinite(v) for k, v in m.items() if not k.startswith("prm_health/"))


def test_correction_changes_the_update_and_reports_the_mismatch():
  """A sampler off by ±0.5 nats per token: token TIS changes the update, rejection removes tokens,
  and the metrics say how far mu is from pi_old."""
  b0 = _batch()
  noise = jnp.asarray(np.random.default_rng(5).choice([-0.5, 0.5], (8, 6)), jnp.float32)
  mu = (_old_logp(b0) + noise) * b0.response_mask
  plain, _ = _update(_cfg(), _batch(mu))
  tis, m = _update(_cfg(rollout_is="token", rollout_rs="token", rollout_rs_low=0.5, rollout_rs_high=1.4), _batch(mu))
  d = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(plain.policy.params),
                                                          jax.tree.leaves(tis.policy.params)))
  assert d > 1e-4
  assert m["rollout_corr/max_abs_log_ratio"] == pytest.approx(0.5, abs=1e-4)
  assert 0.2 < m["rollout_corr/rs_masked_frac"] < 0.8  # exp(0.5) = 1.65 > 1.4 rejected; exp(-.5) = .61 kept
  assert m["rollout_corr/is_max"] == pytest.approx(np.exp(0.5), rel=1e-4)


@pytest.mark.parametrize("loss", ("gspo_token", "cispo"))
def test_micro_batching_does_not_change_the_corrected_update(loss):
  """Global-count normalisation: micro-batches of 4 or 8 give one update (IS weights and the
  rejection mask ride along with their rows)."""
  b0 = _batch()
  noise = jnp.asarray(np.random.default_rng(6).normal(0, 0.3, (8, 6)), jnp.float32)
  b = _batch((_old_logp(b0) + noise) * b0.response_mask)
  kw = dict(policy_loss=loss, rollout_is="sequence", rollout_rs="geometric", rollout_rs_low=0.8,
            rollout_rs_high=1.25)
  a, ma = _update(_cfg(micro_batch_size=4, **kw), b)
  c, mc = _update(_cfg(micro_batch_size=8, **kw), b)
  _close(a.policy.params, c.policy.params, atol=5e-6)
  assert ma["rollout_corr/rs_masked_frac"] == mc["rollout_corr/rs_masked_frac"]


def test_bypass_with_rejection_reads_only_the_sampler():
  """--recompute_old_logp=false (pi_old := mu) in bf16 is allowed with a rejection mask; the update
  uses mu as pi_old (identical mu and the recomputed log-probs give the plain update)."""
  cfg = config_lib.build(config_lib.RunConfig, dict(dtype="bfloat16", recompute_old_logp=False,
                                                    rollout_rs="geometric"))
  assert cfg.prime.policy.rollout_rs == "geometric"
  with pytest.raises(config_lib.ConfigError, match="recompute_old_logp"):
    config_lib.build(config_lib.RunConfig, dict(dtype="bfloat16", recompute_old_logp=False))
  b0 = _batch()
  plain, _ = _update(_cfg(), b0)
  byp, m = _update(_cfg(recompute_old_logp=False, rollout_rs="token"), _batch(_old_logp(b0)))
  _close(plain.policy.params, byp.policy.params)
  assert m["actor/rollout_rs_masked_frac"] == 0.0
  with pytest.raises(ValueError, match="sampler_logp"):
    _update(_cfg(recompute_old_logp=False, rollout_rs="token"), b0)


def test_overlong_shaping_enters_the_outcome():
  """--overlong_buffer adds DAPO's length penalty to the outcome reward: with every response at
  the cap the penalty is -f on every row, which leaves RLOO unchanged (a constant shift) but is
  logged; with mixed lengths the advantages change."""
  b = _batch()
  _, m0 = _update(_cfg(algo="rloo"), b)
  _, m1 = _update(_cfg(algo="rloo", overlong_buffer=3, overlong_penalty=1.0), b)
  lengths = np.asarray(b.response_mask.sum(1))
  want = np.minimum(-(lengths - 3) / 3, 0.0)
  assert m1["reward/overlong_mean"] == pytest.approx(want.mean(), abs=1e-6)
  assert m1["reward/overlong_frac"] == pytest.approx((want < 0).mean())
  assert m1["adv/max"] != pytest.approx(m0["adv/max"])


@pytest.mark.slow
def test_bf16_trainer_with_token_tis_and_gspo_token(tmp_path):
  """The trainer in bf16 compute with the sampler's log-probs corrected by token TIS and the
  GSPO-token loss under PRIME: two steps, finite metrics, a real (non-zero) mismatch reported."""
  from jaxrl_dense.rl.trainer import Trainer
  import pathlib
  smoke = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.flags"
  cfg = config_lib.replace(config_lib.from_args([f"--flagfile={smoke}"]), eval_data="", steps=2,
                           dtype="bfloat16", rollout_is="token", rollout_rs="token",
                           policy_loss="gspo_token", overlong_buffer=4)
  run = Trainer(cfg)
  try:
    for _ in range(2):
      m = run.train_step()
  finally:
    run.close()
  for k in ("rollout_corr/is_mean", "rollout_corr/is_ess", "rollout_corr/kl", "rollout_corr/rs_masked_frac",
            "reward/overlong_mean", "actor/pg_loss"):
    assert np.isfinite(m[k]), k
  assert m["rollout_corr/max_abs_log_ratio"] > 0  # bf16 sampler vs bf16 scorer: not bit-equal
