"""Tier-1 method flags of experiments/prime_math.py (rl.config fields): --filter=band|prof|none,
--advantage=, --extra_reward=NAME[:WEIGHT] (arXiv 2509.03403, 2601.10201, 2509.05489).

Fast: flag parsing / validation and the pure pieces of the library (advantage function, PROF keep
mask, SAR reward, the empty-query record) on tiny numpy inputs; no model, no training loop.
"""
import numpy as np
import pytest

from jaxrl_dense import advantages, ops
from jaxrl_dense.advantages import prl as prl_lib
from jaxrl_dense.filters import prof as prof_lib
from jaxrl_dense.rewards import sar as sar_lib
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import prime, rollout
from jaxrl_dense.rl.batch import RolloutBatch
from jaxrl_dense.rl.config import ConfigError


def _cfg(**kw):
  base = dict(n=3, prompts_per_step=2, oversample=1, micro_batch_size=2, prm_micro_batch_size=2,
              score_micro_batch_size=2, max_response_length=6)
  base.update(kw)
  return config_lib.build(config_lib.PrimeConfig, base)


def _adv(cfg, acc, mask, prm_logp, ref_logp, old_logp=None, extra=None, keep=None):
  """prime.make_advantage_fn on a RolloutBatch of these arrays -> (advantages, returns, stats)
  (old_logp defaults to prm_logp)."""
  batch = RolloutBatch(None, None, None, mask, acc, ref_logp=ref_logp, prm_logp=prm_logp, keep=keep,
                       old_logp=prm_logp if old_logp is None else old_logp)
  out, stats = prime.make_advantage_fn(cfg)(batch, extra=extra)
  return out.advantages, out.returns, stats


# ---- --filter: the former boolean forms keep working ------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    ([], "band"), (["--filter"], "band"), (["--nofilter"], "none"), (["--filter=true"], "band"),
    (["--filter=false"], "none"), (["--filter=prof"], "prof"), (["--filter=none"], "none"),
    (["--filter=band"], "band")])
def test_filter_flag_parses_old_and_new_forms(argv, expected):
  assert config_lib.from_args(argv).prime.filter.filter == expected


def test_config_accepts_the_former_bool_and_fingerprints_every_method_setting():
  assert _cfg(filter=True).filter.filter == "band" and _cfg(filter=False).filter.filter == "none"
  fp = config_lib.fingerprint(config_lib.RunConfig())
  for k in ("filter", "advantage", "extra_reward", "prl_eta", "step_len", "prof_remove", "prm_loss"):
    assert k in fp
  run = lambda **kw: config_lib.replace(config_lib.RunConfig(), **kw)
  assert config_lib.fingerprint(run(algo="grpo", advantage="prl"))["advantage"] == "prl"
  assert config_lib.fingerprint(run(extra_reward="sar:0.2"))["extra_reward"] == "sar:0.2"


def test_select_groups_filter_modes():
  cfg = _cfg(n=2, prompts_per_step=2, oversample=2, max_response_length=8)
  acc = np.array([0, 0, 1, 0, 1, 1, 0, 1], np.float32)  # group means 0, .5, 1, .5
  lengths = np.full(8, 3)
  rows, ok = rollout.select_groups(acc, lengths, cfg)
  assert ok.tolist() == [False, True, False, True] and rows.tolist() == [2, 3, 6, 7]
  for mode in ("none", "prof"):
    kw = dict(filter=mode, n=4, prof_remove=2) if mode == "prof" else dict(filter=mode, n=2)
    c = _cfg(prompts_per_step=2, oversample=2, max_response_length=8, **kw)
    n = c.rollout.n
    rows, ok = rollout.select_groups(np.tile(acc, n // 2), np.full(4 * n, 3), c)
    assert ok.all() and rows.tolist() == list(range(2 * n))


# ---- validation: bad values raise FlagError naming the flag ---------------------------------
@pytest.mark.parametrize("kw,flag", [
    (dict(filter="bogus"), "--filter"),
    (dict(filter="prof", algo="grpo"), "--filter"),
    (dict(filter="prof", prof_remove=3), "--prof_remove"),
    (dict(filter="prof", prof_remove=-1), "--prof_remove"),
    (dict(algo="grpo", advantage="nope"), "--advantage"),
    (dict(algo="prime", advantage="prl"), "--advantage"),
    (dict(algo="grpo", advantage="prl", prl_eta=-1.0), "--prl_eta"),
    (dict(algo="grpo", advantage="prl", step_len=0), "--step_len"),
    (dict(extra_reward="foo:0.2"), "--extra_reward"),
    (dict(extra_reward="sar:abc"), "--extra_reward"),
    (dict(extra_reward="sar:inf"), "--extra_reward"),
])
def test_bad_method_flags_raise_config_error(kw, flag):
  with pytest.raises(ConfigError, match=flag):
    _cfg(**kw)


@pytest.mark.parametrize("kw", [dict(), dict(filter="prof"), dict(filter="none"),
                                dict(algo="grpo", advantage="prl"), dict(algo="rloo", advantage="grpo"),
                                dict(extra_reward="sar:0.2"), dict(extra_reward="sar")])
def test_good_method_flags_validate(kw):
  _cfg(**kw)


def test_parse_extra_reward():
  assert config_lib.parse_extra_reward("") == ("", 0.0)
  assert config_lib.parse_extra_reward("sar") == ("sar", 0.2)
  assert config_lib.parse_extra_reward("sar:0.5") == ("sar", 0.5)
  assert config_lib.parse_extra_reward("sar:-1") == ("sar", -1.0)


def test_prl_needs_the_reference():
  assert not _cfg(algo="grpo").needs_ref
  assert _cfg(algo="grpo", advantage="prl").needs_ref
  assert _cfg(algo="prime").needs_ref


# ---- the advantage function ----------------------------------------------------------------
def _inputs(seed=0, g=2, n=3, r=5):
  rng = np.random.default_rng(seed)
  b = g * n
  acc = np.array([1, 0, 1, 0, 0, 1], np.float32)[:b]
  lengths = np.array([5, 3, 4, 1, 5, 2])[:b]
  mask = (np.arange(r)[None, :] < lengths[:, None]).astype(np.float32)
  old = (rng.normal(size=(b, r)) - 1.0).astype(np.float32) * mask
  ref = (rng.normal(size=(b, r)) - 1.0).astype(np.float32) * mask
  return acc, mask, old, ref


def _grpo_ref(scores, mask, n, eps=1e-6):
  s = scores.reshape(-1, n).astype(np.float64)
  a = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + eps)
  return a.reshape(-1)[:, None] * mask


def test_default_advantage_unchanged_by_new_arguments():
  acc, mask, old, ref = _inputs()
  cfg = _cfg(algo="grpo")
  adv, _, _ = _adv(cfg, acc, mask, old, ref)
  np.testing.assert_allclose(np.asarray(adv), _grpo_ref(acc, mask, 3), atol=1e-5)


def test_advantage_prl_matches_the_formula():
  acc, mask, old, ref = _inputs()
  cfg = _cfg(algo="grpo", advantage="prl", prl_eta=2.0, step_len=2)
  adv, ret, stats = _adv(cfg, acc, mask, old, ref, old_logp=old)
  # Hand formula: A = GRPO(acc) - D_{e(t)} / eta, D = suffix sum of (old - ref), steps of 2 tokens.
  d = (old - ref) * mask
  suffix = np.cumsum(d[:, ::-1], axis=1)[:, ::-1]
  want = _grpo_ref(acc, mask, 3).copy()
  for i in range(acc.shape[0]):
    L = int(mask[i].sum())
    for t in range(L):
      end = min((t // 2) * 2 + 1, L - 1)
      want[i, t] -= suffix[i, end] / 2.0
  np.testing.assert_allclose(np.asarray(adv), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want, atol=1e-5)
  # eta = 0 disables the process term: plain GRPO.
  adv0, _, _ = _adv(config_lib.replace(cfg, prl_eta=0.0), acc, mask, old, ref, old_logp=old)
  np.testing.assert_allclose(np.asarray(adv0), _grpo_ref(acc, mask, 3), atol=1e-5)
  # And the library function gives the same values.
  lib, _ = prl_lib.prl_advantages(acc, old, ref, mask, ops.contiguous_group_ids(2, 3), 2,
                                  ops.fixed_length_step_ids(mask, 2), eta=2.0)
  np.testing.assert_allclose(np.asarray(adv), np.asarray(lib), atol=1e-6)


def test_prl_without_old_logp_is_an_error():
  acc, mask, old, ref = _inputs()
  with pytest.raises(ValueError, match="old_logp"):
    advantages.ESTIMATORS.get("prl")(advantages.AdvantageInputs(acc, mask, ref_logp=ref),
                                     advantages.AdvantageParams(n=3))


def test_extra_reward_sar_is_added_to_the_outcome():
  acc, mask, old, ref = _inputs()
  extra = np.array([0.5, -0.25, 0.1, 0.9, -1.0, 0.0], np.float32)
  for algo in ("grpo", "rloo"):
    cfg = _cfg(algo=algo, extra_reward="sar:0.2")
    adv, _, stats = _adv(cfg, acc, mask, old, ref, extra=extra)
    base, _, _ = _adv(_cfg(algo=algo), acc + 0.2 * extra, mask, old, ref)
    np.testing.assert_allclose(np.asarray(adv), np.asarray(base), atol=1e-6)
    assert float(stats["extra/sar_mean"]) == pytest.approx(extra.mean(), abs=1e-6)
    assert float(stats["extra/reward_mean"]) == pytest.approx((acc + 0.2 * extra).mean(), abs=1e-6)
  # PRIME: the combined reward is the outcome term of the RLOO, the PRM metrics keep acc.
  cfg = _cfg(algo="prime", extra_reward="sar:0.5")
  adv, _, stats = _adv(cfg, acc, mask, old, ref, extra=extra)
  base, _, base_stats = _adv(_cfg(algo="prime"), acc + 0.5 * extra, mask, old, ref)
  np.testing.assert_allclose(np.asarray(adv), np.asarray(base), atol=1e-6)
  plain, _, plain_stats = _adv(_cfg(algo="prime"), acc, mask, old, ref)
  assert not np.allclose(np.asarray(adv), np.asarray(plain))
  for k, v in plain_stats.items():
    if k.startswith("prm/"):
      np.testing.assert_allclose(np.asarray(stats[k]), np.asarray(v), atol=1e-6)


def test_sar_reward_and_empty_query():
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  qa = np.log(np.array([[0.5, 0.5, 1.0], [0.9, 0.9, 0.9]], np.float32))
  a = np.log(np.array([[0.25, 0.25, 1.0], [0.9, 0.9, 0.9]], np.float32))
  r = np.asarray(sar_lib.self_aligned_reward(qa, a, mask))
  # ppl(a|q) = 2, ppl(a) = 4 -> (4 - 2) / 4 = 0.5; equal perplexities -> 0.
  np.testing.assert_allclose(r, [0.5, 0.0], atol=1e-6)
  from jaxrl_dense.data.prompts import PromptRecord
  rec = PromptRecord(prompt_messages=({"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}),
                     gold="2", data_source="arithmetic", uid="a:0")
  e = rollout.empty_query(rec)
  assert e.prompt_messages == ({"role": "system", "content": "S"}, {"role": "user", "content": ""})
  assert e.gold == "2" and rec.prompt_messages[-1]["content"] == "1+1?"


# ---- PROF keep mask ---------------------------------------------------------------------------
def test_prof_fn_matches_library_on_implicit_prm_step_scores():
  acc, mask, prm, ref = _inputs(seed=3)
  cfg = _cfg(filter="prof", beta=0.5, step_len=2, prof_remove=1)
  keep = np.asarray(prime.prof_keep(acc, mask, prm, ref, beta=cfg.prm.beta, n=cfg.rollout.n,
                                    k=cfg.prof_k, step_len=cfg.step_len))
  # Hand-built step values: sigmoid of the cumulative beta * log-ratio at each 2-token step end.
  q = np.cumsum(0.5 * (prm - ref) * mask, axis=1)
  v = np.zeros((6, 3), np.float32)
  sm = np.zeros((6, 3), np.float32)
  for i in range(6):
    L = int(mask[i].sum())
    for h in range((L + 1) // 2):
      v[i, h] = 1.0 / (1.0 + np.exp(-q[i, min(2 * h + 1, L - 1)]))
      sm[i, h] = 1.0
  c = prof_lib.prof_consistency(v, sm, acc)
  want = np.asarray(prof_lib.prof_filter(acc, c, ops.contiguous_group_ids(2, 3), 2, n_remove=1))
  np.testing.assert_array_equal(keep, want)
  assert keep.dtype == bool and keep.reshape(2, 3).sum(1).tolist() == [2, 2]  # k = 1 of n = 3 removed


def test_prof_fn_drops_the_least_consistent_correct_response():
  # One group of 4: 3 correct, 1 wrong; P - N = 2, k = 2 -> k_pos = 2 correct dropped, those the
  # PRM supports least (lowest log-ratio).
  mask = np.ones((4, 2), np.float32)
  acc = np.array([1, 1, 1, 0], np.float32)
  ref = np.zeros((4, 2), np.float32)
  prm = np.array([[1.0, 1.0], [-2.0, -2.0], [0.5, 0.5], [0.0, 0.0]], np.float32)
  cfg = _cfg(n=4, prompts_per_step=1, filter="prof", beta=1.0, step_len=1, micro_batch_size=4,
             prm_micro_batch_size=4, score_micro_batch_size=4)
  assert cfg.prof_k == 2  # prof_remove=0 -> k = n // 2
  keep = np.asarray(prime.prof_keep(acc, mask, prm, ref, beta=1.0, n=4, k=cfg.prof_k, step_len=1))
  assert keep.tolist() == [True, False, False, True]
