"""rl.prime: the one-program PRIME update, its advantage stage (computed over the PROF
survivors only), the estimator calling convention, --share_prompt as a speed-only setting,
sampler / scorer log-prob parity and the architecture snippet."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import advantages, models, ops, sampling
from jaxrl_dense.rl import RolloutBatch, config as config_lib, prime, steps

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = dict(model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1,
            num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,), pad_token_id=0)


def _cfg(**kw):
  base = dict(n=4, prompts_per_step=2, micro_batch_size=4, prm_micro_batch_size=4,
              score_micro_batch_size=4, max_prompt_length=5, max_response_length=6)
  return config_lib.build(config_lib.PrimeConfig, {**base, **kw})


# ------------------------------------------------------------------------ PROF survivors (5a)
def test_prof_dropped_rows_leave_the_leave_one_out():
  """acc [1, 1, 0, 0], PROF keeps rows 0 and 2, c_o = 5, no process reward: the survivors' RLOO
  is over the two of them (+5 / −5), not over four rows with the dropped ones as reward 0."""
  cfg = _cfg(filter="prof", prof_remove=2, process_coef=0.0, outcome_coef=5.0)
  acc = jnp.array([1., 1., 0., 0., 1., 0., 0., 0.])
  mask = jnp.asarray((np.arange(6)[None] < np.array([3, 6, 2, 4, 5, 1, 6, 6])[:, None]), jnp.float32)
  logp = -jnp.ones((8, 6))
  keep = jnp.array([True, False, True, False, False, True, True, False])
  out, _ = prime.make_advantage_fn(cfg)(
      RolloutBatch(None, None, None, mask, acc, old_logp=logp, ref_logp=logp, prm_logp=logp, keep=keep))
  adv, ret = out.advantages, out.returns
  ret, adv, m = np.asarray(ret), np.asarray(adv), np.asarray(mask, bool)
  np.testing.assert_allclose(ret[0][m[0]], 5.0, atol=1e-5)
  np.testing.assert_allclose(ret[2][m[2]], -5.0, atol=1e-5)
  np.testing.assert_allclose(ret[5][m[5]], 5.0 * (0 - 0), atol=1e-5)  # group 2 survivors: 0, 0
  assert np.all(ret[~np.asarray(keep)] == 0) and np.all(adv[~np.asarray(keep)] == 0)
  # The survivors' advantages equal the estimator on the survivor rows alone (groups of n − k).
  rows = np.array([0, 2, 5, 6])
  want, _ = advantages.prime_rloo_advantages(None, acc[rows], mask[rows], n=2, process_coef=0.0,
                                             outcome_coef=5.0)
  np.testing.assert_allclose(adv[rows], np.asarray(want), atol=1e-5)


def test_survivor_rows_keep_group_order():
  keep = jnp.array([False, True, True, False, True, False, False, True])
  from jaxrl_dense.filters import prof
  assert prof.survivor_rows(keep, 4, 2).tolist() == [1, 2, 4, 7]
  assert prime.survivor_rows is prof.survivor_rows  # still importable from rl.prime


# ---------------------------------------------------------------- one estimator calling convention
def test_estimator_adapters_equal_the_raw_functions():
  rng = np.random.default_rng(0)
  acc = jnp.asarray(rng.integers(0, 2, 8), jnp.float32)
  mask = jnp.asarray(np.arange(5)[None] < rng.integers(1, 6, 8)[:, None], jnp.float32)
  old, ref, proc = (jnp.asarray(rng.normal(size=(8, 5)), jnp.float32) * mask for _ in range(3))
  step_ids = ops.fixed_length_step_ids(mask, 2)
  x = advantages.AdvantageInputs(acc, mask, proc, old, ref, step_ids)
  hp = advantages.AdvantageParams(n=4, gamma=0.9, prl_eta=3.0)
  gid, g = ops.contiguous_group_ids(2, 4), 2
  want = {
      "prime_rloo": advantages.prime_rloo_advantages(proc, acc, mask, n=4),
      "grpo": advantages.grpo_advantages(acc, mask, gid, g),
      "dr_grpo": advantages.dr_grpo_advantages(acc, mask, gid, g),
      "rloo": advantages.rloo_advantages(acc, mask, gid, g),
      "reinforce_pp": advantages.reinforce_pp_advantages(ops.place_at_last_token(acc, mask), mask, gamma=0.9),
      "reinforce_pp_baseline": advantages.reinforce_pp_baseline_advantages(acc, mask, gid, g),
      "prl": advantages.prl_advantages(acc, old, ref, mask, gid, g, step_ids, eta=3.0),
  }
  # Turn-level estimators: two turns where a row's tokens straddle a masked tool output at t = 2.
  tmask = mask * (np.arange(5) != 2)
  tids = ops.turn_ids_from_mask(tmask, 2)
  turn_r = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  xt = advantages.AdvantageInputs(acc, tmask, turn_rewards=turn_r, turn_ids=tids)
  tm = ops.turn_mask_from_ids(tids, 2)
  want_turn = {
      "matchtir": advantages.dual_level_advantages(turn_r, tm, tids, tmask, gid, g),
      "igpo": advantages.igpo_advantages(turn_r, tm, tids, tmask, gid, g, variant="code"),
  }
  assert set(advantages.ESTIMATORS.names()) == set(want) | set(want_turn)
  for name, (a, r) in {**want, **want_turn}.items():
    got_a, got_r = advantages.ESTIMATORS.get(name)(xt if name in want_turn else x, hp)
    np.testing.assert_allclose(got_a, a, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got_r, r, atol=1e-6, err_msg=name)
  # Every algo / override of the config maps to a registered estimator.
  for algo in config_lib.ALGOS:
    assert _cfg(algo=algo).estimator in advantages.ESTIMATORS
  for adv in config_lib.ADVANTAGE_OVERRIDES[1:]:
    env = {"env": "tool:calculator"} if adv in ("matchtir", "igpo") else {}  # turn rewards need turns
    assert _cfg(algo="grpo", advantage=adv, **env).estimator in advantages.ESTIMATORS


# ------------------------------------------------------------------------ the snippet (item 4)
def test_architecture_snippet_runs():
  text = (REPO / "docs" / "architecture.md").read_text()
  snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "make_prime" in b)
  assert len(snippet.strip().splitlines()) <= 25
  env = {}
  exec(compile(snippet, "architecture.md", "exec"), env)  # pylint: disable=exec-used
  m = env["metrics"]
  for k in ("prm/loss", "actor/pg_loss", "actor/loss", "kl_ref", "entropy", "adv/std"):
    assert np.isfinite(float(m[k])), k
  for k in ("prm_health/auroc", "prm_health/return_outcome_corr", "prm_health/implicit_reward_mean"):
    assert k in m, k  # PRM health rides along in the one jitted update
  assert int(env["state"].policy.step) == 1 and int(env["state"].prm.step) == 1


# ----------------------------------------------------------- --share_prompt: speed only (5f)
def _batch(b=8, p=5, r=6, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, r + 1, b)
  rm = (np.arange(r)[None] < lengths[:, None]).astype(np.float32)
  pm = np.ones((b // 4, p), np.int32)
  pm[1, :2] = 0
  return RolloutBatch(
      prompt_tokens=jnp.asarray(np.repeat(rng.integers(2, 48, (b // 4, p)) * pm, 4, 0), jnp.int32),
      prompt_mask=jnp.asarray(np.repeat(pm, 4, 0)),
      response_tokens=jnp.asarray(rng.integers(2, 48, (b, r)) * rm, jnp.int32),
      response_mask=jnp.asarray(rm), outcome=jnp.asarray([1, 1, 0, 0, 1, 0, 1, 1], jnp.float32))


def test_share_prompt_changes_speed_only():
  """Same update (params, PRM, metrics) with and without --share_prompt, with a shuffled PPO of two
  mini-batches (the shuffle used to permute groups with it and rows without it)."""
  mc = models.ModelConfig(**TINY)
  out = {}
  for share in (True, False):
    cfg = _cfg(share_prompt=share, mini_batch_size=4, lr=1e-2, prm_lr=1e-2)
    assert cfg.prompt_group == (4 if share else 1) and cfg.shuffle_group == 4
    init_fn, update_fn = prime.make_prime(mc, cfg)
    p = lambda: models.init_params(mc, jax.random.PRNGKey(0))
    state, metrics = update_fn(init_fn(p(), p(), p()), _batch(), jax.random.PRNGKey(3))
    out[share] = (state.policy.params, state.prm.params, metrics)
  (a, pa, ma), (b, pb, mb) = out[True], out[False]
  for x, y in zip(jax.tree.leaves((a, pa)), jax.tree.leaves((b, pb))):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], atol=2e-5, rtol=1e-4, err_msg=k)


# ------------------------------------------------------- sampler vs scorer log-probs (5d)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_and_scorer_logprobs(dtype):
  """The scorer (full forward, tempered logits as veRL) reproduces the sampler's log-probs in f32
  for group size 1 and n and temperature 1 / 0.7; in bf16 they differ, which is why
  --recompute_old_logp=false is refused there (config test)."""
  mc = models.ModelConfig(**{**TINY, "num_layers": 2, "param_dtype": dtype, "dtype": dtype})
  params = jax.tree.map(lambda x: x * 4.0, models.init_params(mc, jax.random.PRNGKey(0)))
  prompts = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 2, 48)
  pmask = jnp.ones_like(prompts).at[1, :2].set(0)
  worst = 0.0
  for temperature in (1.0, 0.7):
    gen = sampling.generate(params, mc, prompts, pmask, jax.random.PRNGKey(2), max_new_tokens=6,
                            num_samples=4, temperature=temperature)
    seq = {"tokens": jnp.concatenate([jnp.repeat(prompts, 4, 0), gen.tokens], 1),
           "attention_mask": jnp.concatenate([jnp.repeat(pmask, 4, 0), gen.mask], 1),
           "response_mask": gen.mask.astype(jnp.float32)}
    for group in (1, 4):
      score = jax.jit(steps.make_scoring(mc, micro_batch_size=4, with_ref=False, with_prm=False,
                                 group_size=group, policy_temperature=temperature))
      lp = score(params, None, None, seq)["old_logp"]
      diff = float(jnp.max(jnp.abs(lp - gen.logprobs) * gen.mask))
      worst = max(worst, diff)
      if dtype == "float32":
        assert diff < 1e-4, (temperature, group, diff)
  if dtype == "bfloat16":
    assert worst > 1e-3  # measured 0.04-0.1 on this model: not the policy's log-probs


def test_rollout_batch_checks_name_the_field():
  b = _batch()
  assert b.check(4) is b and b.num_rows == 8
  with pytest.raises(ValueError, match="RolloutBatch.outcome"):
    b._replace(outcome=jnp.zeros((7,))).check(4)
  with pytest.raises(ValueError, match="RolloutBatch.sampler_logp"):
    b._replace(sampler_logp=jnp.zeros((8, 5))).check(4)
  with pytest.raises(ValueError, match="groups of n=3"):
    b.check(3)
  seq = b.sequences()
  assert seq["tokens"].shape == (8, 11) and seq["attention_mask"].shape == (8, 11)
  np.testing.assert_array_equal(seq["attention_mask"][:, 5:], b.response_mask)


# ------------------------------------------------ no padding waste: trimmed batches
def _pad(batch, extra_p, extra_r):
  """The same rows with `extra_p` more left-padding prompt columns and `extra_r` more right-padding
  response columns (what a batch padded to the flag file's maxima looks like)."""
  lp = lambda x: jnp.pad(x, ((0, 0), (extra_p, 0)))
  rp = lambda x: jnp.pad(x, ((0, 0), (0, extra_r)))
  return batch._replace(prompt_tokens=lp(batch.prompt_tokens), prompt_mask=lp(batch.prompt_mask),
                        response_tokens=rp(batch.response_tokens), response_mask=rp(batch.response_mask))


@pytest.mark.parametrize("algo", ["prime", "grpo"])
def test_trimmed_batch_gives_the_padded_batch_update(algo):
  """trim_batch cuts only padding: the PRIME / GRPO update of the trimmed batch equals that of the
  same rows padded by 7 prompt and 9 response columns (params and every metric within 1e-5)."""
  from jaxrl_dense.rl.batch import trim_batch
  mc = models.ModelConfig(**TINY)
  cfg = _cfg(algo=algo, mini_batch_size=4, lr=1e-2, prm_lr=1e-2)
  padded = _pad(_batch(), 7, 9)
  trimmed = trim_batch(jax.tree.map(np.asarray, padded), bucket=1)
  b = _batch()
  longest_r = int(np.asarray(b.response_mask).sum(1).max())
  assert trimmed.prompt_tokens.shape == (8, 5) and trimmed.response_tokens.shape == (8, longest_r)
  assert trim_batch(jax.tree.map(np.asarray, padded), bucket=4).prompt_tokens.shape == (8, 8)
  out = []
  for batch in (padded, trimmed):
    init_fn, update_fn = prime.make_prime(mc, cfg)
    p = lambda: models.init_params(mc, jax.random.PRNGKey(0))
    state, m = update_fn(init_fn(p(), p() if algo == "prime" else None, p() if cfg.needs_ref else None),
                         jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(3))
    out.append((state, m))
  (sa, ma), (sb, mb) = out
  for x, y in zip(jax.tree.leaves((sa.policy.params, sa.prm)), jax.tree.leaves((sb.policy.params, sb.prm))):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], atol=1e-5, rtol=1e-5, err_msg=k)


# ------------------------------------------------------------ the update's layout at build time
def test_layout_is_decided_at_build_time_and_the_state_is_placed_into_it():
  """make_prime decides the state's shardings from abstract shapes (no params seen), init_fn
  places unplaced params into them, and the ONE jitted update keeps that layout; a params tree of
  another structure is named. The PRM and policy passes share one shape."""
  from jaxrl_dense.parallel import mesh as mesh_lib, placement  # pylint: disable=import-outside-toplevel
  mc = models.ModelConfig(**TINY)
  cfg = _cfg(mini_batch_size=8)
  mesh = mesh_lib.make_mesh("data:1,fsdp:1,tensor:1")
  built = prime.make_prime(mc, cfg, mesh=mesh)
  init_fn, update_fn = built  # unpacks as the pair
  lay = built.state_shardings
  shapes = prime.abstract_state(mc, cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(lay, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  p = lambda: models.init_params(mc, jax.random.PRNGKey(0))
  state = init_fn(p(), p(), p())
  placed = jax.tree.map(lambda x: x.sharding, state)
  assert jax.tree.leaves(placed) == jax.tree.leaves(lay, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  new, metrics = update_fn(state, placement.shard_batch(_batch(), mesh), jax.random.PRNGKey(3))
  assert jax.tree.map(lambda x: x.sharding, new) == placed
  assert int(new.policy.step) == 1 and np.isfinite(float(metrics["actor/loss"]))
  bad = p()
  bad.pop(next(iter(bad)))
  with pytest.raises(ValueError, match="policy_params do not have the structure"):
    init_fn(bad, p(), p())
  # One pass shape: (state, batch, key) -> (state, batch, metrics).
  opt = prime.optimizers(cfg)[0]
  st = lambda: prime.init_train_state(p(), opt)
  b = _batch()._replace(ref_logp=jnp.zeros((8, 6)), old_logp=jnp.zeros((8, 6)), advantages=jnp.ones((8, 6)))
  for pass_ in (jax.jit(steps.make_prm_update(mc, opt, beta=0.05, mini_batch_size=8, micro_batch_size=4),
                        donate_argnums=(0,)),
                jax.jit(steps.make_policy_update(mc, opt, cfg.policy, mini_batch_size=8, micro_batch_size=4),
                        donate_argnums=(0,))):
    s2, b2, m2 = pass_(st(), b, jax.random.PRNGKey(0))
    assert isinstance(b2, RolloutBatch) and int(s2.step) == 1 and m2


def test_pass_builders_return_pure_functions_and_warn_on_jit_options():
  """The builders are optax-style: a pure function (nothing jitted; make_prime jits the update
  once). The former jit= / mesh= / *_sharding= options still jit, with a DeprecationWarning."""
  mc = models.ModelConfig(**TINY)
  opt = prime.optimizers(_cfg())[0]
  for build in (lambda **kw: steps.make_prm_update(mc, opt, beta=0.05, mini_batch_size=8, micro_batch_size=4, **kw),
                lambda **kw: steps.make_policy_update(mc, opt, _cfg().policy, mini_batch_size=8,
                                                      micro_batch_size=4, **kw)):
    assert not hasattr(build(), "lower")
    with pytest.warns(DeprecationWarning, match="jit="):
      assert hasattr(build(jit=True), "lower")
    with pytest.warns(DeprecationWarning, match="jit="):
      assert not hasattr(build(jit=False), "lower")

