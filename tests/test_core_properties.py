"""Property tests of the dense-reward core: jit/vmap equality, padding invariance, whitening,
(sum, count) micro-batch invariance, within-group permutation invariance, edge-case errors, and
hand-computed values for the functions the golden files do not cover."""
from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import advantages, filters, losses, ops, rewards
from jaxrl_dense.registry import Registry, UnknownNameError

P, N, T = 3, 4, 6
B = P * N
LENGTHS = np.array([6, 3, 5, 1, 4, 6, 2, 4, 5, 5, 6, 3])
ACC = np.array([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0], np.float32)


def _mask(lengths=LENGTHS, t=T):
  return jnp.asarray((np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32))


MASK = _mask()
GIDS = ops.contiguous_group_ids(P, N)


def _rand(seed, shape=(B, T), scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


LP, REF, OLD, ADV = _rand(1, scale=0.5) - 2.0, _rand(2, scale=0.5) - 2.0, _rand(3, scale=0.5) - 2.0, _rand(4)
TOK_R = jnp.where(MASK > 0, _rand(5), 0.0)
VALUES = _rand(6)
SCORES = _rand(7, (B,))
LOGITS = _rand(8, (B, T, 5))
STEP_IDS = ops.fixed_length_step_ids(MASK, 2)
S = 3


# ----------------------------------------------------------------------------- function table
# name -> (fn of arrays only, tuple of array args). Static options are bound with partial/lambda.

FUNCS = {
    "implicit_rewards_verl": (lambda a, b, m: rewards.implicit_token_rewards(a, b, m), (LP, REF, MASK)),
    "implicit_rewards_verl_lambda": (
        lambda a, b, m, acc: rewards.implicit_token_rewards(a, b, m, lam=0.5, outcome=acc, use_gt=True),
        (LP, REF, MASK, ACC)),
    "implicit_rewards_original_whole": (
        lambda a, b, m: rewards.implicit_token_rewards(a, b, m, reference_impl="original", granularity="whole"),
        (LP, REF, MASK)),
    "implicit_rewards_paper": (
        lambda a, b, m: rewards.implicit_token_rewards(a, b, m, reference_impl="paper"), (LP, REF, MASK)),
    "prime_batch_norm": (rewards.prime_batch_norm, (TOK_R,)),
    "prm_ce_loss": (lambda q, m, acc: rewards.prm_ce_loss(q, m, acc), (LP - REF, MASK, ACC)),
    "prm_ce_loss_grad": (jax.grad(lambda q, m, acc: rewards.prm_ce_loss(q, m, acc)), (LP - REF, MASK, ACC)),
    "prm_detached_dpo_bon_rm": (
        lambda q, m, acc: rewards.prm_detached_dpo_loss(
            q, m, acc, rewards.group_matrix(ops.masked_sum(q, m, axis=1), N),
            rewards.group_matrix(acc, N), bon_mode="bon_rm"), (LP - REF, MASK, ACC)),
    "prm_metrics": (lambda s, m, acc: rewards.prm_metrics(s, m, acc, n=N), (TOK_R, MASK, ACC)),
    "step_rewards": (lambda a, b, m, sid: rewards.implicit_step_rewards(a, b, m, sid, S), (LP, REF, MASK, STEP_IDS)),
    "prime_rloo_verl": (lambda r, acc, m: advantages.prime_rloo_advantages(r, acc, m, n=N), (TOK_R, ACC, MASK)),
    "prime_rloo_original": (
        lambda r, acc, m: advantages.prime_rloo_advantages(r, acc, m, n=N, reference_impl="original",
                                                           process_gamma=0.9), (TOK_R, ACC, MASK)),
    "prime_rloo_paper": (
        lambda r, acc, m: advantages.prime_rloo_advantages(r, acc, m, n=N, reference_impl="paper"), (TOK_R, ACC, MASK)),
    "grpo": (lambda s, m, g: advantages.grpo_advantages(s, m, g, P), (SCORES, MASK, GIDS)),
    "dr_grpo": (lambda s, m, g: advantages.dr_grpo_advantages(s, m, g, P), (SCORES, MASK, GIDS)),
    "rloo": (lambda s, m, g: advantages.rloo_advantages(s, m, g, P), (SCORES, MASK, GIDS)),
    "reinforce_pp": (lambda r, m: advantages.reinforce_pp_advantages(r, m, gamma=0.99), (TOK_R, MASK)),
    "reinforce_pp_baseline": (
        lambda s, m, g: advantages.reinforce_pp_baseline_advantages(s, m, g, P), (SCORES, MASK, GIDS)),
    "gae_verl": (lambda r, v, m: advantages.gae_advantages(r, v, m, gamma=0.99, lam=0.95), (TOK_R, VALUES, MASK)),
    "gae_original": (
        lambda r, v, m: advantages.gae_advantages(r, v, m, gamma=0.99, lam=0.95, reference_impl="original"),
        (TOK_R, VALUES, MASK)),
    "ppo_clip_loss": (
        lambda lp, o, a, m: losses.ppo_clip_loss(lp, o, a, m, clip_ratio_high=0.28,
                                                 loss_agg_mode="seq-mean-token-mean"), (LP, OLD, ADV, MASK)),
    "ppo_clip_grad": (jax.grad(lambda lp, o, a, m: losses.ppo_clip_loss(lp, o, a, m).loss), (LP, OLD, ADV, MASK)),
    "prime_policy_loss": (lambda lp, o, a, m: losses.prime_policy_loss(lp, o, a, m), (LP, OLD, ADV, MASK)),
    "agg_token_mean": (losses.token_mean, (ADV, MASK)),
    "agg_seq_mean_token_sum": (losses.seq_mean_token_sum, (ADV, MASK)),
    "agg_seq_mean_token_mean": (losses.seq_mean_token_mean, (ADV, MASK)),
    "agg_seq_mean_token_sum_norm": (losses.seq_mean_token_sum_norm, (ADV, MASK)),
    "kl_k1": (losses.get_kl("k1"), (LP, REF)),
    "kl_abs": (losses.get_kl("abs"), (LP, REF)),
    "kl_k2": (losses.get_kl("k2"), (LP, REF)),
    "kl_k3": (losses.get_kl("k3"), (LP, REF)),
    "kl_in_reward": (lambda s, o, r, m: losses.kl_in_reward(s, o, r, kl_coef=0.01, mask=m), (TOK_R, OLD, REF, MASK)),
    "entropy": (losses.entropy_from_logits, (LOGITS,)),
    "filter_verl": (
        lambda acc, L: filters.accuracy_band_filter(acc, L, n=N, max_response_length=T,
                                                    filter_truncated=True, oversample_factor=2.0),
        (ACC, jnp.asarray(LENGTHS))),
    "filter_original": (
        lambda acc, L: filters.accuracy_band_filter(acc, L, n=N, reference_impl="original"), (ACC, jnp.asarray(LENGTHS))),
    "masked_whiten": (ops.masked_whiten, (ADV, MASK)),
    "reverse_cumsum": (lambda x, m: ops.reverse_cumsum(x, m, gamma=0.9), (ADV, MASK)),
    "segment_min": (lambda x, sid: ops.segment_min(x, sid, S), (ADV, STEP_IDS)),
    "broadcast_steps": (ops.broadcast_steps, (ADV[:, :S], STEP_IDS)),
    "place_at_last_token": (ops.place_at_last_token, (SCORES, MASK)),
    "dpo_loss": (lambda w, l: rewards.dpo_loss(w, l), (SCORES, SCORES[::-1])),
    "nca_loss": (lambda w, l: rewards.nca_loss(w, l), (SCORES, SCORES[::-1])),
    "kto_loss": (lambda w, l: rewards.kto_loss(w, l), (SCORES, SCORES[::-1])),
    "implicit_ce_loss": (lambda z, y: rewards.implicit_ce_loss(z, y), (SCORES, ACC)),
}


def _perturbed(args):
  """A second input set: the first array scaled/shifted (integer inputs are kept identical)."""
  x = jnp.asarray(args[0])
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = x * 0.5 + 0.1
  return (x,) + tuple(args[1:])


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_jit_and_vmap_equal_eager(name):
  """Same answer eagerly, under jax.jit, and under jax.vmap over a leading axis of two inputs."""
  fn, args = FUNCS[name]
  eager = fn(*args)
  jitted = jax.jit(fn)
  chex.assert_trees_all_close(jitted(*args), eager, rtol=1e-5, atol=1e-5)
  args2 = _perturbed(args)
  stacked = tuple(jnp.stack([a, b]) for a, b in zip(args, args2))
  got = jax.jit(jax.vmap(fn))(*stacked)
  want = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), jitted(*args), jitted(*args2))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- padding invariance


def _junk_padding(x, mask, value):
  return jnp.where(mask > 0, x, value)


def _pad_columns(x, extra, value=0.0):
  return jnp.concatenate([x, jnp.full((x.shape[0], extra), value, x.dtype)], axis=1)


PAD_CASES = {
    # name -> fn(token_array, mask) returning token arrays / scalars that must not see padding.
    "implicit_rewards_verl": lambda x, m: rewards.implicit_token_rewards(x, REF_P(m), m).scores,
    "implicit_rewards_original": lambda x, m: rewards.implicit_token_rewards(x, REF_P(m), m, reference_impl="original").scores,
    "batch_norm_of_rewards": lambda x, m: rewards.prime_batch_norm(rewards.implicit_token_rewards(x, REF_P(m), m).scores),
    "prm_ce_loss": lambda x, m: rewards.prm_ce_loss(x, m, ACC),
    "prm_ce_grad": lambda x, m: jnp.where(m > 0, jax.grad(lambda q: rewards.prm_ce_loss(q, m, ACC))(x), 0.0),
    "prime_rloo_verl": lambda x, m: advantages.prime_rloo_advantages(x, ACC, m, n=N),
    "prime_rloo_original": lambda x, m: advantages.prime_rloo_advantages(x, ACC, m, n=N, reference_impl="original"),
    "reinforce_pp": lambda x, m: advantages.reinforce_pp_advantages(x, m, gamma=0.9),
    "gae_verl_rewards": lambda x, m: advantages.gae_advantages(x, _pad_like(VALUES, m), m, gamma=0.9, lam=0.8),
    "gae_verl_values": lambda x, m: advantages.gae_advantages(_pad_like(TOK_R, m), x, m, gamma=0.9, lam=0.8),
    "ppo_loss": lambda x, m: losses.ppo_clip_loss(x, _pad_like(OLD, m), _pad_like(ADV, m), m).loss,
    "ppo_grad_valid": lambda x, m: jnp.where(
        m > 0, jax.grad(lambda lp: losses.ppo_clip_loss(lp, _pad_like(OLD, m), _pad_like(ADV, m), m).loss)(x), 0.0),
    "agg_token_mean": lambda x, m: losses.aggregate(x, m, "token-mean"),
    "agg_seq_mean_token_sum": lambda x, m: losses.aggregate(x, m, "seq-mean-token-sum"),
    "agg_seq_mean_token_mean": lambda x, m: losses.aggregate(x, m, "seq-mean-token-mean"),
    "kl_token_mean": lambda x, m: losses.aggregate(losses.kl_k3(x, _pad_like(REF, m)), m, "token-mean"),
    "whiten": lambda x, m: ops.masked_whiten(x, m),
}


def REF_P(m):
  return _pad_like(REF, m)


def _pad_like(x, m):
  """x padded with junk columns to m's width (for the extra-columns test)."""
  extra = m.shape[1] - x.shape[1]
  return x if extra == 0 else _pad_columns(x, extra, 7.0)


def _valid_view(out, m):
  """Outputs restricted to valid positions (token arrays) or unchanged (scalars)."""
  def f(o):
    o = jnp.asarray(o)
    if o.ndim == 2 and o.shape == m.shape:
      return jnp.where(m > 0, o, 0.0)[:, :T]
    return o
  return jax.tree_util.tree_map(f, out)


def _assert_close_f32(got, want, n_summed: int):
  """Equal up to float32 rounding of a computation that sums up to `n_summed` terms.

  Padding changes where XLA splits a reduction, so results may differ by the rounding of
  a length-n sum: about n * eps32 relative to the largest term (Higham, "Accuracy and Stability of
  Numerical Algorithms", Sec. 4.2). Whitening and cumulative sums then carry that absolute error to
  elements near zero, so the tolerance is absolute at the scale of the output, plus relative.
  """
  tol = 4 * n_summed * float(jnp.finfo(jnp.float32).eps)  # 72 terms -> 3.4e-5
  def check(g, w):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-6)
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale)
  jax.tree_util.tree_map(check, got, want)


@pytest.mark.parametrize("name", sorted(PAD_CASES))
def test_padding_values_never_change_valid_outputs(name):
  fn = jax.jit(PAD_CASES[name])
  x = jnp.where(MASK > 0, LP, 0.0)
  base = _valid_view(fn(x, MASK), MASK)
  for junk in (5.0, -3.0, 1e3):
    _assert_close_f32(_valid_view(fn(_junk_padding(x, MASK, junk), MASK), MASK), base, B * T)
  # Extra padding columns (T -> T + 3) leave valid outputs unchanged too.
  wide_mask = _pad_columns(MASK, 3, 0).astype(MASK.dtype)
  _assert_close_f32(_valid_view(fn(_pad_columns(x, 3, 9.0), wide_mask), wide_mask), base, B * (T + 3))


def test_nan_on_padding_never_reaches_masked_statistics():
  x = jnp.where(MASK > 0, ADV, jnp.nan)
  assert np.isfinite(float(ops.masked_mean(x, MASK)))
  assert np.isfinite(float(ops.masked_var(x, MASK)))
  assert np.all(np.isfinite(np.asarray(ops.masked_whiten(x, MASK))))
  for mode in losses.aggregation.MODES:
    assert np.isfinite(float(losses.aggregate(x, MASK, mode)))
  assert np.all(np.isfinite(np.asarray(rewards.prm_ce_loss(x, MASK, ACC))))


def test_padding_outputs_are_zero():
  for name in ("prime_rloo_verl", "prime_rloo_original", "grpo", "rloo", "reinforce_pp", "gae_verl",
               "gae_original", "implicit_rewards_verl", "implicit_rewards_paper"):
    fn, args = FUNCS[name]
    for out in fn(*args):
      assert np.all(np.asarray(out)[np.asarray(MASK) == 0] == 0), name


# ----------------------------------------------------------------------------- whitening


@pytest.mark.parametrize("mean_eps", [1e-8, 0.0])
def test_whitening_has_zero_mean_unit_variance_on_valid_tokens(mean_eps):
  w = np.asarray(ops.masked_whiten(ADV * 3.0 + 2.0, MASK, mean_eps=mean_eps))
  v = w[np.asarray(MASK) > 0]
  np.testing.assert_allclose(v.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(v.var(ddof=1), 1.0, rtol=1e-4)
  adv, _ = advantages.prime_rloo_advantages(TOK_R, ACC, MASK, n=N)
  v = np.asarray(adv)[np.asarray(MASK) > 0]
  np.testing.assert_allclose([v.mean(), v.var(ddof=1)], [0.0, 1.0], atol=1e-4)


def test_whiten_shift_mean_false_keeps_the_mean():
  x = ADV * 3.0 + 2.0
  w = np.asarray(ops.masked_whiten(x, MASK, shift_mean=False))[np.asarray(MASK) > 0]
  np.testing.assert_allclose(w.mean(), float(ops.masked_mean(x, MASK)), rtol=1e-5)


def test_masked_var_needs_two_valid_entries():
  one = jnp.zeros((2, 3)).at[0, 0].set(1)
  with pytest.raises(ValueError, match="at least 2"):
    ops.masked_var(ADV[:2, :3], one)
  with pytest.raises(ValueError, match="no valid"):
    ops.masked_var(ADV[:2, :3], jnp.zeros((2, 3)))
  # Under jit the same input cannot raise; it gives NaN instead of a silent finite number.
  assert np.isnan(float(jax.jit(ops.masked_var)(ADV[:2, :3], one)))


# ----------------------------------------------------------------------------- (sum, count)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_sum_count_aggregation_is_invariant_to_micro_batching(mode):
  x = ADV
  full = losses.aggregate(x, MASK, mode)
  splits = [(0, 2), (2, 7), (7, B)]
  terms = [losses.aggregate_terms(x[a:b], MASK[a:b], mode) for a, b in splits]
  got = losses.combine(mode, [s for s, _ in terms], [c for _, c in terms])
  np.testing.assert_allclose(got, full, rtol=1e-6)
  if mode != "seq-mean-token-sum-norm":  # the other modes count additively across micro-batches
    np.testing.assert_allclose(sum(s for s, _ in terms) / sum(c for _, c in terms), full, rtol=1e-6)


def test_ppo_sum_count_gives_micro_batch_invariant_gradients():
  def full_loss(lp):
    return losses.ppo_clip_loss(lp, OLD, ADV, MASK).loss

  def micro_loss(lp):
    outs = [losses.ppo_clip_loss(lp[a:b], OLD[a:b], ADV[a:b], MASK[a:b]) for a, b in [(0, 5), (5, B)]]
    return sum(o.loss_sum for o in outs) / sum(o.count for o in outs)

  np.testing.assert_allclose(micro_loss(LP), full_loss(LP), rtol=1e-6)
  chex.assert_trees_all_close(jax.jit(jax.grad(micro_loss))(LP), jax.jit(jax.grad(full_loss))(LP),
                              rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- permutations


def _within_group_permutation(seed):
  rng = np.random.default_rng(seed)
  return np.concatenate([g * N + rng.permutation(N) for g in range(P)])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_commute_with_within_group_permutation(name):
  perm = _within_group_permutation(0)
  fn = getattr(advantages, f"{name}_advantages")
  adv, _ = fn(SCORES, MASK, GIDS, P)
  adv_p, _ = fn(SCORES[perm], MASK[perm], GIDS, P)
  _assert_close_f32(adv_p, np.asarray(adv)[perm], B * T)


@pytest.mark.parametrize("variant", ["verl", "original", "paper"])
def test_prime_rloo_commutes_with_within_group_permutation(variant):
  perm = _within_group_permutation(1)
  adv, ret = advantages.prime_rloo_advantages(TOK_R, ACC, MASK, n=N, reference_impl=variant)
  adv_p, ret_p = advantages.prime_rloo_advantages(TOK_R[perm], ACC[perm], MASK[perm], n=N, reference_impl=variant)
  _assert_close_f32(adv_p, np.asarray(adv)[perm], B * T)
  _assert_close_f32(ret_p, np.asarray(ret)[perm], B * T)


def test_group_ids_need_not_be_contiguous():
  perm = np.random.default_rng(3).permutation(B)
  adv, _ = advantages.grpo_advantages(SCORES, MASK, GIDS, P)
  adv_p, _ = advantages.grpo_advantages(SCORES[perm], MASK[perm], GIDS[perm], P)
  _assert_close_f32(adv_p, np.asarray(adv)[perm], B * T)


# ----------------------------------------------------------------------------- edge cases / errors


def test_rloo_group_of_size_one_raises():
  with pytest.raises(ValueError, match="n >= 2"):
    advantages.prime_rloo_advantages(TOK_R, ACC, MASK, n=1)
  with pytest.raises(ValueError, match="n >= 2"):
    advantages.leave_one_out_token_rewards(TOK_R, MASK, n=1)
  with pytest.raises(ValueError, match="contiguous groups"):
    advantages.prime_rloo_advantages(TOK_R, ACC, MASK, n=5)


def test_empty_rows_are_rejected():
  m = MASK.at[3].set(0)
  with pytest.raises(ValueError, match=r"rows \[3\]"):
    advantages.prime_rloo_advantages(TOK_R, ACC, m, n=N)
  with pytest.raises(ValueError, match=r"rows \[3\]"):
    rewards.implicit_token_rewards(LP, REF, m)


def test_bad_shapes_raise_errors_naming_the_input():
  with pytest.raises(ValueError, match="ref_logp"):
    rewards.implicit_token_rewards(LP, REF[:, :3], MASK)
  with pytest.raises(AssertionError, match="mask"):
    losses.ppo_clip_loss(LP, OLD, ADV, MASK[0])
  with pytest.raises(ValueError, match="outcome"):
    rewards.prm_ce_loss(LP, MASK, ACC[:5])
  with pytest.raises(ValueError, match="group_ids"):
    advantages.grpo_advantages(SCORES, MASK, GIDS + 5, P)
  with pytest.raises(ValueError, match="reference_impl"):
    advantages.prime_rloo_advantages(TOK_R, ACC, MASK, n=N, reference_impl="nope")


def test_registries_list_known_names_on_unknown():
  with pytest.raises(UnknownNameError, match="known: .*grpo.*prime_rloo"):
    advantages.ESTIMATORS.get("ppo_magic")
  with pytest.raises(KeyError):
    losses.get_kl("k9")
  with pytest.raises(ValueError, match="token-mean"):
    losses.aggregate(ADV, MASK, "mean-of-means")
  with pytest.raises(NotImplementedError, match="straight-through"):
    losses.get_kl("k3+")
  assert losses.get_policy_loss("ppo") is losses.ppo_terms


def test_registry_register_decorator_and_duplicates():
  reg = Registry("thing")

  @reg.register("a", density="token")
  def a(x):
    return x

  assert reg.get("a") is a and reg.info("a") == {"density": "token"} and "a" in reg
  reg.register("a", a)  # same function again is fine
  with pytest.raises(ValueError, match="already registered"):
    reg.register("a", lambda x: x)
  with pytest.raises(UnknownNameError, match="unknown thing 'b'; known: a"):
    reg.get("b")


# ----------------------------------------------------------------------------- hand-computed values


def _np_reverse_cumsum(x, m, gamma):
  out = np.zeros_like(x)
  for i in range(x.shape[0]):
    c = 0.0
    for t in reversed(range(x.shape[1])):
      c = (x[i, t] if m[i, t] else 0.0) + gamma * c
      out[i, t] = c if m[i, t] else 0.0
  return out


def test_reverse_cumsum_matches_loop():
  x, m = np.asarray(ADV), np.asarray(MASK)
  np.testing.assert_allclose(ops.reverse_cumsum(ADV, MASK, gamma=0.9), _np_reverse_cumsum(x, m, 0.9),
                             rtol=1e-5, atol=1e-6)


def test_segment_ops_match_loops():
  x, sid = np.asarray(ADV), np.asarray(STEP_IDS)
  want_sum = np.zeros((B, S)); want_min = np.zeros((B, S)); seen = np.zeros((B, S), bool)
  for i in range(B):
    for t in range(T):
      s = sid[i, t]
      if 0 <= s < S:
        want_sum[i, s] += x[i, t]
        want_min[i, s] = x[i, t] if not seen[i, s] else min(want_min[i, s], x[i, t])
        seen[i, s] = True
  np.testing.assert_allclose(ops.segment_sum(ADV, STEP_IDS, S), want_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ops.segment_min(ADV, STEP_IDS, S), want_min, rtol=1e-6)
  np.testing.assert_array_equal(ops.step_mask_from_ids(STEP_IDS, S), seen.astype(np.float32))
  b = np.asarray(ops.broadcast_steps(ops.segment_sum(ADV, STEP_IDS, S), STEP_IDS))
  np.testing.assert_allclose(b[0, :2], [want_sum[0, 0]] * 2, rtol=1e-5)


def test_step_id_converters_round_trip():
  ends = ops.step_ends_from_ids(STEP_IDS)
  np.testing.assert_array_equal(ops.step_ids_from_ends(ends, MASK), STEP_IDS)
  tok = np.array([[5, 9, 5, 5, 9, 0]])
  np.testing.assert_array_equal(ops.step_ids_from_delimiter(tok, np.array([[1, 1, 1, 1, 1, 0]]), [9]),
                                [[0, 0, 1, 1, 1, -1]])


def test_gae_matches_textbook_on_full_rows():
  r, v = np.asarray(TOK_R), np.asarray(VALUES)
  full = jnp.ones((B, T), jnp.int32)
  got = ops.gae(TOK_R, VALUES, full, 0.9, 0.8)
  want = np.zeros_like(r)
  for i in range(B):
    g = 0.0
    for t in reversed(range(T)):
      nv = v[i, t + 1] if t + 1 < T else 0.0
      g = r[i, t] + 0.9 * nv - v[i, t] + 0.9 * 0.8 * g
      want[i, t] = g
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_group_stats_and_leave_one_out():
  s = np.asarray(SCORES).reshape(P, N)
  mean, std = ops.group_mean_std(SCORES, GIDS, P)
  np.testing.assert_allclose(np.asarray(mean).reshape(P, N), np.repeat(s.mean(1, keepdims=True), N, 1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(std).reshape(P, N), np.repeat(s.std(1, ddof=1, keepdims=True), N, 1), rtol=1e-5)
  loo = np.asarray(ops.leave_one_out_baseline(SCORES, GIDS, P)).reshape(P, N)
  np.testing.assert_allclose(loo, (s.sum(1, keepdims=True) - s) / (N - 1), rtol=1e-5)
  mean1, std1 = ops.group_mean_std(jnp.array([3.0, 1.0, 2.0]), jnp.array([0, 1, 1]), 2)
  np.testing.assert_allclose(mean1, [0.0, 1.5, 1.5]); np.testing.assert_allclose(std1[0], 1.0)


def test_prime_outcome_only_equals_textbook_rloo():
  # Outcome only, per-token constant = RLOO of acc broadcast before the last token (γ = 1).
  _, ret = advantages.prime_rloo_advantages(None, ACC, MASK, n=N, outcome_coef=1.0, whiten=False)
  a = ACC.reshape(P, N)
  rloo = (a - (a.sum(1, keepdims=True) - a) / (N - 1)).reshape(-1)
  np.testing.assert_allclose(np.asarray(ret), np.where(np.asarray(MASK) > 0, rloo[:, None], 0.0), atol=1e-6)


def test_paper_and_code_process_baselines_differ_by_the_documented_term():
  m = np.asarray(MASK) > 0
  code = np.asarray(advantages.leave_one_out_token_rewards(TOK_R, MASK, n=N))
  paper = np.asarray(advantages.paper_process_baseline(TOK_R, MASK, n=N))
  r = np.asarray(TOK_R)
  mu = (r * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(code - paper, np.where(m, (r - mu[:, None]) / (N - 1), 0.0), atol=1e-5)


def test_batch_norm_makes_max_abs_process_return_one():
  s = rewards.prime_batch_norm(TOK_R * 7.0)
  c = np.asarray(ops.reverse_cumsum(s))
  np.testing.assert_allclose(np.abs(c).max(), 1.0, rtol=1e-5)
  # β cancels: verl and paper variants differ only by the dropped last token after batch-norm.
  v = rewards.implicit_token_rewards(LP, REF, MASK, beta=0.05).scores
  o = rewards.implicit_token_rewards(LP, REF, MASK, reference_impl="original").scores
  last = np.asarray(ops.place_at_last_token(jnp.ones(B), MASK)) > 0
  np.testing.assert_allclose(np.asarray(v)[~last], 0.05 * np.asarray(o)[~last], rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(v)[last] == 0)


def test_sequence_objectives_hand_values():
  zw, zl = jnp.array([1.0, -2.0]), jnp.array([0.5, 1.0])
  sig = lambda x: 1 / (1 + np.exp(-x))
  beta = 0.5
  np.testing.assert_allclose(rewards.dpo_loss(zw, zl, beta=beta),
                             np.mean(-np.log(sig(beta * (np.array([1.0, -2.0]) - [0.5, 1.0])))), rtol=1e-6)
  np.testing.assert_allclose(rewards.implicit_ce_loss(zw, jnp.array([1.0, 0.0]), beta=beta),
                             np.mean([-np.log(sig(0.5)), -np.log(1 - sig(-1.0))]), rtol=1e-6)
  w, l = np.array([1.0, -2.0]), np.array([0.5, 1.0])
  nca = -np.log(sig(beta * w)) - 0.5 * np.log(sig(-beta * w)) - 0.5 * np.log(sig(-beta * l))
  np.testing.assert_allclose(rewards.nca_loss(zw, zl, beta=beta), nca.mean(), rtol=1e-6)
  kl_w, kl_l = max(w.mean(), 0), max(l.mean(), 0)
  kto = np.concatenate([1 - sig(beta * (w - kl_l)), 1 - sig(beta * (kl_w - l))]).mean()
  np.testing.assert_allclose(rewards.kto_loss(zw, zl, beta=beta), kto, rtol=1e-6)
  kto_u = np.concatenate([2.0 * (1 - sig(beta * (w - 0.3))), 1 - sig(beta * (0.3 - l))]).mean()
  np.testing.assert_allclose(rewards.kto_loss(zw, zl, beta=beta, kl_ref=jnp.array(0.3), w_desirable=2.0),
                             kto_u, rtol=1e-6)
  z = rewards.sequence_logratio(LP, REF, MASK)
  np.testing.assert_allclose(z, (np.asarray(LP - REF) * np.asarray(MASK)).sum(1), rtol=1e-5)


def test_step_rewards_single_accumulative_and_scoring():
  r, sm = rewards.implicit_step_rewards(LP, REF, MASK, STEP_IDS, S, beta=2.0)
  acc_r, _ = rewards.implicit_step_rewards(LP, REF, MASK, STEP_IDS, S, beta=2.0, mode="accumulative")
  q = np.asarray((LP - REF) * MASK)
  np.testing.assert_allclose(np.asarray(r)[0], 2.0 * q[0].reshape(3, 2).sum(1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(acc_r)[0], np.cumsum(np.asarray(r)[0]), rtol=1e-5)
  np.testing.assert_allclose(rewards.aggregate_step_scores(r, sm, "sum"), 2.0 * q.sum(1), rtol=1e-5, atol=1e-6)
  mins = rewards.aggregate_step_scores(r, sm, "min")
  row3 = np.asarray(r)[3][np.asarray(sm)[3] > 0]            # L = 1: one step
  np.testing.assert_allclose(mins[3], row3.min(), rtol=1e-6)


def test_prm_pairwise_accuracy_hand_example():
  # One group of 3: scores 3 > 2 > 1; accs 1, 0, 1. Pairs (0,1): Δa=1, ΔS>0 ok; (0,2): Δa=0 (w=0);
  # (1,2): Δa=-1, ΔS=1>0 -> disagree. acc = 1/2. Second group: all accs equal -> 0.5.
  s = jnp.array([[3.0], [2.0], [1.0], [1.0], [2.0], [3.0]])
  m = jnp.ones((6, 1))
  acc = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(rewards.prm_pairwise_accuracy(s, m, acc, n=3), 0.5)
  np.testing.assert_allclose(rewards.prm_sign_accuracy(s, m, jnp.array([1.0, 0, 1, 0, 1, 1])), 4 / 6)


def test_accuracy_band_filter_hand_groups():
  acc = jnp.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1], jnp.float32)   # means 0, .25, .5, 1
  lengths = jnp.array([2, 2, 2, 2, 2, 2, 2, 9, 2, 2, 2, 2, 2, 2, 2, 2])
  out = filters.accuracy_band_filter(acc, lengths, n=4, reference_impl="original")
  np.testing.assert_array_equal(out.prompt_pass, [False, True, True, False])
  out = filters.accuracy_band_filter(acc, lengths, n=4, reference_impl="original", max_response_length=9,
                                     filter_truncated=True)
  np.testing.assert_array_equal(out.prompt_pass, [False, False, True, False])
  out = filters.accuracy_band_filter(acc, lengths, n=4, reference_impl="verl", oversample_factor=2.0)
  np.testing.assert_array_equal(out.indices, [4, 5, 6, 7, 8, 9, 10, 11])
  # Soft filter: when only one prompt passes, failing prompts (in original order) fill the batch.
  out = filters.accuracy_band_filter(acc, lengths, n=4, reference_impl="verl", oversample_factor=2.0,
                                     max_response_length=10, filter_truncated=True)
  np.testing.assert_array_equal(out.indices, [8, 9, 10, 11, 0, 1, 2, 3])
  assert int(out.keep_mask.sum()) == 8


# ----------------------------------------------------------------------------- sharding

_SHARDING_SCRIPT = r"""
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as PS
from jaxrl_dense import advantages, losses, ops, rewards
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as jaxrl_dense.parallel.mesh.make_mesh
rng = np.random.default_rng(0)
P, N, T = 4, 4, 8
B = P * N
lengths = rng.integers(1, T + 1, size=B)
mask = jnp.asarray((np.arange(T)[None] < lengths[:, None]).astype(np.int32))
lp, ref, old, adv = (jnp.asarray(rng.normal(size=(B, T)).astype(np.float32)) for _ in range(4))
acc = jnp.asarray(rng.integers(0, 2, size=B).astype(np.float32))

def step(lp, ref, old, mask, acc):
  scores = rewards.prime_batch_norm(rewards.implicit_token_rewards(lp, ref, mask).scores)
  a, r = advantages.prime_rloo_advantages(scores, acc, mask, n=N)
  g, _ = advantages.grpo_advantages(acc, mask, ops.contiguous_group_ids(P, N), P)
  loss, grad = jax.value_and_grad(lambda x: losses.ppo_clip_loss(x, old, a, mask).loss)(lp)
  ce = rewards.prm_ce_loss(lp - ref, mask, acc)
  return a, r, g, loss, grad, ce

args = (lp, ref, old, mask, acc)
want = jax.jit(step)(*args)
row = NamedSharding(mesh, PS("data"))
sharded = tuple(jax.device_put(x, row) for x in args)
got = jax.jit(step)(*sharded)
assert len(got[0].sharding.device_set) == 8
for w, g in zip(want, got):
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)
print("SHARDING_OK")
"""


@pytest.mark.slow
def test_results_are_unchanged_when_the_batch_is_sharded_over_8_devices():
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "SHARDING_OK" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- chex variants


class HandValuesWithAndWithoutJitTest(chex.TestCase):
  """rlax-style: hand-computed numpy values, checked with and without jit (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_grpo_matches_numpy(self):
    s = np.asarray(SCORES).reshape(P, N)
    want = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-6)
    adv, _ = self.variant(lambda x, m, g: advantages.grpo_advantages(x, m, g, P))(SCORES, MASK, GIDS)
    np.testing.assert_allclose(np.asarray(adv)[:, 0], want.reshape(-1), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_prime_rloo_outcome_only_is_textbook_rloo(self):
    fn = lambda acc, m: advantages.prime_rloo_advantages(None, acc, m, n=N, outcome_coef=1.0,
                                                         whiten=False)
    _, ret = self.variant(fn)(ACC, MASK)
    a = ACC.reshape(P, N)
    rloo = (a - (a.sum(1, keepdims=True) - a) / (N - 1)).reshape(-1)
    np.testing.assert_allclose(np.asarray(ret), np.where(np.asarray(MASK) > 0, rloo[:, None], 0.0),
                               atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_verl_token_rewards_match_numpy(self):
    s, _ = self.variant(lambda a, b, m: rewards.implicit_token_rewards(a, b, m, beta=0.05))(LP, REF, MASK)
    want = 0.05 * (np.asarray(LP) - np.asarray(REF))
    t = np.arange(T)[None, :]
    want = np.where(t < LENGTHS[:, None] - 1, want, 0.0)
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-5, atol=1e-7)
