"""Parity harness: every case of every ``tests/golden/*.json`` file against jaxrl_dense.

The golden files were produced by running the reference implementations (PRIME-RL/PRIME, the veRL
PRIME recipe, veRL core) on fixed inputs; see ``tests/golden/README.md``. One runner per file
family dispatches on the case's ``source`` (which reference, hence which variant), its ``inputs``
keys and its ``config`` — never on the case name — so new files of the same schema (more shapes,
seeds, group sizes) run unchanged. A case whose family, config key or expected key the harness
does not know fails the file. Where the reference raises, the function must raise a clear error.

Comparison: at each case's ``tolerance``. Token arrays ``[B, T]`` that jaxrl_dense zeroes on
padding by design (advantages, returns, q) are compared on valid positions, and our padding is
checked to be exactly 0; everything else is compared in full. Gradients use ``jax.grad``.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import advantages, filters, losses, rewards
from jaxrl_dense import ops
from jaxrl_dense.models import prm_head

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.json"))
CLEAR_ERRORS = (ValueError, NotImplementedError)


class NotUnderstood(Exception):
  """The harness does not know how to run this case."""


# ----------------------------------------------------------------------------- helpers


def reference_of(case) -> str:
  """'verl' (veRL PRIME recipe), 'original' (PRIME-RL/PRIME), 'core' (veRL core) or 'mixed'."""
  src = " ".join(case["source"])
  has_recipe = "verl-recipe" in src
  has_orig = "PRIME-RL/PRIME" in src
  has_core = "volcengine/verl" in src
  if has_recipe:
    return "verl"
  if has_orig and not has_core:
    return "original"
  if has_core and not has_orig:
    return "core"
  if has_orig and has_core:
    return "mixed"
  raise NotUnderstood(f"unknown source {case['source']}")


def check_config(case, allowed):
  unknown = set(case["config"]) - set(allowed)
  if unknown:
    raise NotUnderstood(f"config keys {sorted(unknown)} not understood")


def f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


def group_ids_of(index):
  """String group ids -> int32 ids in order of first appearance, and the number of groups."""
  seen: Dict[str, int] = {}
  ids = [seen.setdefault(k, len(seen)) for k in index]
  return jnp.asarray(ids, jnp.int32), len(seen)


def mask_of(inputs):
  m = np.asarray(inputs["response_mask"])
  if "valid_response_length" in inputs:
    np.testing.assert_array_equal(m.sum(-1), inputs["valid_response_length"],
                                  err_msg="golden response_mask / valid_response_length disagree")
  return jnp.asarray(m)


class Out(dict):
  """Outputs of a runner; ``masked`` maps output keys compared on valid positions to their mask."""

  def __init__(self, *a, masked=None, **k):
    super().__init__(*a, **k)
    self.masked = masked or {}


# ----------------------------------------------------------------------------- runners


def run_implicit_reward(case):
  check_config(case, {"beta", "lambda", "prime_use_gt", "prime_granularity", "prime_norm"})
  inp, cfg = case["inputs"], case["config"]
  variant = reference_of(case)
  if variant not in ("verl", "original"):
    raise NotUnderstood(f"reference {variant!r}")
  m = mask_of(inp)
  scores, q = rewards.implicit_token_rewards(
      f32(inp["rm_log_probs"]), f32(inp["ref_log_probs"]), m,
      beta=cfg.get("beta", 0.05), reference_impl=variant,
      granularity=cfg.get("prime_granularity", "token"), lam=cfg.get("lambda", 0.0),
      outcome=f32(inp["acc"]) if "acc" in inp else None, use_gt=cfg.get("prime_use_gt", False))
  normed = rewards.prime_norm(scores, cfg.get("prime_norm", "batch_norm"))
  return Out(q=q, token_level_score_raw=scores, token_level_score_batch_norm=normed,
             token_level_score_after_norm=normed, masked={"q": m})


def run_prm_loss(case):
  inp, cfg = case["inputs"], case["config"]
  m = jnp.asarray(inp["response_mask"])
  acc = f32(inp["acc"])
  if "Q_bc" in inp:
    check_config(case, {"beta", "bon_mode"})
    fn = lambda q: rewards.prm_detached_dpo_loss(q, m, acc, f32(inp["Q_bc"]), f32(inp["acc_bc"]),
                                                 beta=cfg["beta"], bon_mode=cfg["bon_mode"])
  elif "token_level_scores" in inp:
    check_config(case, {"n_samples"})
    s = f32(inp["token_level_scores"])
    return Out(dpo_acc=rewards.prm_pairwise_accuracy(s, m, acc, n=cfg["n_samples"]),
               dpo_abs_acc=rewards.prm_sign_accuracy(s, m, acc))
  else:
    check_config(case, {"beta"})
    fn = lambda q: rewards.prm_ce_loss(q, m, acc, beta=cfg["beta"])
  loss, grad = jax.value_and_grad(fn)(f32(inp["q"]))
  return Out(loss=loss, grad_q=grad)


def run_prime_rloo(case):
  check_config(case, {"beta", "prime_granularity", "prime_norm", "reward_dpo_coef", "reward_gt_coef",
                      "reward_model_gamma", "verifier_gamma"})
  inp, cfg = case["inputs"], case["config"]
  variant = reference_of(case)
  if variant not in ("verl", "original"):
    raise NotUnderstood(f"reference {variant!r}")
  m = mask_of(inp)
  out = Out()
  if "rm_log_probs" in inp:
    scores, _ = rewards.implicit_token_rewards(
        f32(inp["rm_log_probs"]), f32(inp["ref_log_probs"]), m, beta=cfg.get("beta", 0.05),
        reference_impl=variant, granularity=cfg.get("prime_granularity", "token"))
    scores = rewards.prime_norm(scores, cfg.get("prime_norm", "batch_norm"))
    out["rm_scores"] = scores
  else:
    scores = f32(inp["rm_scores"])
  kw = {}
  if variant == "verl":
    kw = dict(process_coef=cfg.get("reward_dpo_coef", 5.0), outcome_coef=cfg.get("reward_gt_coef", 5.0))
  else:
    kw = dict(process_gamma=cfg.get("reward_model_gamma", 1.0),
              outcome_gamma=cfg.get("verifier_gamma", 1.0))
  adv, ret = advantages.prime_rloo_advantages(scores, f32(inp["acc"]), m, n=int(inp["n_samples"]),
                                                 reference_impl=variant, **kw)
  out.update(advantages=adv, returns=ret)
  out.masked = {"advantages": m, "returns": m}
  return out


def _scores_and_groups(inp):
  # veRL core sums token rewards over the full row (the reference's own reduction).
  scores = jnp.sum(f32(inp["token_level_rewards"]), axis=-1)
  gid, g = group_ids_of(inp["index"])
  return scores, gid, g


def run_grpo(case):
  check_config(case, {"epsilon", "norm_adv_by_std_in_grpo"})
  inp, cfg = case["inputs"], case["config"]
  m = mask_of(inp)
  s, gid, g = _scores_and_groups(inp)
  name = "grpo" if cfg.get("norm_adv_by_std_in_grpo", True) else "dr_grpo"
  kw = {"eps": cfg["epsilon"]} if name == "grpo" and "epsilon" in cfg else {}
  adv, ret = getattr(advantages, f"{name}_advantages")(s, m, gid, g, **kw)
  return Out(advantages=adv, returns=ret, masked={"advantages": m, "returns": m})


def run_rloo(case):
  check_config(case, set())
  inp = case["inputs"]
  m = mask_of(inp)
  s, gid, g = _scores_and_groups(inp)
  adv, ret = advantages.rloo_advantages(s, m, gid, g)
  return Out(advantages=adv, returns=ret, masked={"advantages": m, "returns": m})


def run_reinforce_pp(case):
  check_config(case, {"gamma"})
  inp, cfg = case["inputs"], case["config"]
  m = mask_of(inp)
  if "gamma" in cfg:
    adv, ret = advantages.reinforce_pp_advantages(f32(inp["token_level_rewards"]), m, gamma=cfg["gamma"])
  elif "index" in inp:
    s, gid, g = _scores_and_groups(inp)
    adv, ret = advantages.reinforce_pp_baseline_advantages(s, m, gid, g)
  else:
    raise NotUnderstood("neither gamma (REINFORCE++) nor index (baseline)")
  return Out(advantages=adv, returns=ret, masked={"advantages": m, "returns": m})


def run_gae(case):
  check_config(case, {"gamma", "lam"})
  inp, cfg = case["inputs"], case["config"]
  variant = {"core": "verl", "original": "original"}.get(reference_of(case))
  if variant is None:
    raise NotUnderstood("GAE source")
  m = mask_of(inp)
  adv, ret = advantages.gae_advantages(f32(inp["token_level_rewards"]), f32(inp["values"]), m,
                                          gamma=cfg["gamma"], lam=cfg["lam"], reference_impl=variant)
  return Out(advantages=adv, returns=ret, masked={"advantages": m, "returns": m})


def run_ppo(case):
  inp, cfg = case["inputs"], case["config"]
  if "loss_mat" in inp:
    check_config(case, {"loss_agg_mode", "dp_size"})
    if cfg.get("dp_size", 1) != 1:
      raise NotUnderstood("dp_size != 1")
    mode = cfg["loss_agg_mode"]
    x, mk = f32(inp["loss_mat"]), jnp.asarray(inp["loss_mask"])
    out = Out(loss=losses.aggregate(x, mk, mode))
    for key in case["expected"]:
      hit = re.fullmatch(r"loss_with_scale_factor_(\d+(?:\.\d+)?)", key)
      if hit:
        out[key] = losses.aggregate(x, mk, mode, loss_scale_factor=float(hit.group(1)))
    return out
  m = jnp.asarray(inp["response_mask"])
  old, adv = f32(inp["old_log_prob"]), f32(inp["advantages"])
  if "cliprange" in cfg:
    check_config(case, {"cliprange"})
    fn = lambda lp: losses.prime_policy_loss(lp, old, adv, m, cliprange=cfg["cliprange"])
  else:
    check_config(case, {"clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c",
                        "loss_agg_mode"})
    low = cfg.get("clip_ratio_low", cfg.get("clip_ratio"))
    if low is None:
      raise NotUnderstood("no clip ratio in config")
    fn = lambda lp: losses.ppo_clip_loss(
        lp, old, adv, m, clip_ratio_low=low,
        clip_ratio_high=cfg.get("clip_ratio_high"), clip_ratio_c=cfg.get("clip_ratio_c", 3.0),
        loss_agg_mode=cfg.get("loss_agg_mode", "token-mean"))
  (loss, res), grad = jax.value_and_grad(lambda lp: (fn(lp).loss, fn(lp)), has_aux=True)(
      f32(inp["log_prob"]))
  return Out(pg_loss=loss, grad_log_prob=grad, **res.metrics)


def run_kl(case):
  inp, cfg = case["inputs"], case["config"]
  if "token_level_scores" in inp:
    check_config(case, {"kl_coef"})
    r = losses.kl_in_reward(f32(inp["token_level_scores"]), f32(inp["old_log_prob"]),
                            f32(inp["ref_log_prob"]), kl_coef=cfg["kl_coef"])
    return Out(token_level_rewards=r)
  check_config(case, {"kl_penalty"})
  est = losses.get_kl(cfg["kl_penalty"])     # raises for the '+' names, as the reference does
  lp, ref = f32(inp["logprob"]), f32(inp["ref_logprob"])
  out = Out(kl=est(lp, ref), grad_logprob_of_sum=jax.grad(lambda x: jnp.sum(est(x, ref)))(lp))
  if "response_mask" in inp:
    out["masked_token_mean"] = losses.aggregate(est(lp, ref), jnp.asarray(inp["response_mask"]),
                                                "token-mean")
  return out


def run_entropy(case):
  check_config(case, set())
  inp = case["inputs"]
  m = jnp.asarray(inp["response_mask"])
  h = losses.entropy_from_logits(f32(inp["logits"]))
  return Out(entropy=h,
             entropy_token_mean=losses.aggregate(h, m, "token-mean"),
             entropy_seq_mean_token_mean=losses.aggregate(h, m, "seq-mean-token-mean"),
             entropy_original=ops.masked_mean(h, m))


def run_filter(case):
  check_config(case, {"accuracy_lower_bound", "accuracy_upper_bound", "filter_truncate",
                      "filter_truncated", "max_response_length", "oversample_factor"})
  inp, cfg = case["inputs"], case["config"]
  variant = {"verl": "verl", "original": "original"}.get(reference_of(case))
  if variant is None:
    raise NotUnderstood("filter source")
  res = filters.accuracy_band_filter(
      f32(inp["acc"]), jnp.asarray(inp["valid_response_length"]), n=int(inp["n_samples"]),
      reference_impl=variant, low=cfg["accuracy_lower_bound"], high=cfg["accuracy_upper_bound"],
      max_response_length=cfg.get("max_response_length"),
      filter_truncated=bool(cfg.get("filter_truncate", cfg.get("filter_truncated", False))),
      oversample_factor=cfg.get("oversample_factor", 1.0))
  return Out(kept_response_indices=res.indices, keep_mask=res.keep_mask.astype(jnp.int32))


def _trl(case) -> bool:
  return any("huggingface/trl" in src for src in case["source"])


def run_policy_loss_menu(case):
  """veRL gspo/cispo and TRL's GSPO / GSPO-token / CISPO through ``losses.policy_loss``."""
  inp, cfg = case["inputs"], case["config"]
  check_config(case, {"loss", "clip_ratio_low", "clip_ratio_high", "loss_agg_mode", "trl_epsilon_high"})
  m = mask_of(inp)
  old, adv = f32(inp["old_log_prob"]), f32(inp["advantages"])
  options = {}
  if _trl(case):  # TRL clamps no log-ratio; its CISPO bound is the absolute max ratio eps_high
    options["log_ratio_clamp"] = None
    if "trl_epsilon_high" in cfg:
      assert cfg["clip_ratio_high"] == pytest.approx(cfg["trl_epsilon_high"] - 1.0)
  fn = lambda lp: losses.policy_loss(
      cfg["loss"], lp, old, adv, m, clip_ratio_low=cfg["clip_ratio_low"],
      clip_ratio_high=cfg["clip_ratio_high"], loss_agg_mode=cfg["loss_agg_mode"], **options)
  (loss, res), grad = jax.value_and_grad(lambda lp: (fn(lp).loss, fn(lp)), has_aux=True)(
      f32(inp["log_prob"]))
  return Out(pg_loss=loss, grad_log_prob=grad, pg_clipfrac=res.metrics["pg_clipfrac"],
             ppo_kl=res.metrics["ppo_kl"], masked={"grad_log_prob": m})


# veRL rollout_rs option -> our rejection level; its k1 bounds "L_U" are on -log r (= mu/pi_old),
# i.e. our [1/U, 1/L] on r = pi_old/mu.
_VERL_RS = {"token_k1": "token", "seq_sum_k1": "sequence", "seq_mean_k1": "geometric", "seq_mean_k3": "k3"}
_VERL_METRIC = {"rollout_is_mean": "is_mean", "rollout_is_max": "is_max", "rollout_is_min": "is_min",
                "rollout_is_eff_sample_size": "is_ess", "rollout_is_ratio_fraction_high": "is_frac_high",
                "rollout_is_ratio_fraction_low": "is_frac_low", "rollout_rs_masked_fraction": "rs_masked_frac",
                "rollout_rs_seq_masked_fraction": "rs_seq_masked_frac", "kl": "kl", "k3_kl": "k3_kl",
                "chi2_token": "chi2_token", "chi2_seq": "chi2_seq", "training_ppl": "training_ppl",
                "rollout_ppl": "rollout_ppl"}


def run_rollout_correction(case):
  """veRL's compute_rollout_correction_and_rejection_mask presets and TRL's vLLM IS ratio through
  ``losses.rollout_correction``."""
  inp, cfg = case["inputs"], case["config"]
  m = mask_of(inp)
  old, mu = f32(inp["old_log_prob"]), f32(inp["rollout_log_prob"])
  if "trl_mode" in cfg:
    check_config(case, {"trl_mode", "clip_min", "clip_max"})
    level, how = cfg["trl_mode"].split("_")
    lo, hi = cfg["clip_min"], cfg["clip_max"]
    if how == "truncate":
      out = losses.rollout_correction(old, mu, m, is_level=level, is_threshold=hi, is_low=lo)
      w = out.weights
    else:  # TRL "mask": the untruncated ratio, 0 where it leaves [clip_min, clip_max]
      out = losses.rollout_correction(old, mu, m, is_level=level, is_threshold=math.inf,
                                      rs_level=level, rs_low=lo or 0.0, rs_high=hi)
      w = out.weights * out.keep
    if level == "sequence":  # TRL keeps one ratio per row, [B, 1] (rows are right padded)
      return Out(importance_sampling_ratio=w[:, :1])
    return Out(importance_sampling_ratio=w, masked={"importance_sampling_ratio": m})
  check_config(case, {"rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs",
                      "rollout_rs_threshold", "preset"})
  if cfg["rollout_is_batch_normalize"]:
    raise NotUnderstood("rollout_is_batch_normalize")
  kw = dict(is_level=cfg["rollout_is"] or "none", is_threshold=cfg["rollout_is_threshold"])
  rs = cfg["rollout_rs"]
  if rs is not None:
    if rs not in _VERL_RS:
      raise NotUnderstood(f"rollout_rs {rs!r}")
    kw["rs_level"] = _VERL_RS[rs]
    if rs.endswith("k3"):
      kw["rs_k3_max"] = float(cfg["rollout_rs_threshold"])
    else:
      lo, hi = (float(x) for x in str(cfg["rollout_rs_threshold"]).split("_"))
      kw["rs_low"], kw["rs_high"] = 1.0 / hi, 1.0 / lo
  out = losses.rollout_correction(old, mu, m, **kw)
  weights = out.weights
  if kw["is_level"] == "none":  # veRL returns None; ours are the mask (weight 1, no IS)
    np.testing.assert_array_equal(np.asarray(weights), np.asarray(m, np.float32))
    weights = None
  res = Out(rollout_is_weights=weights, modified_response_mask=(out.keep * m),
            masked={"rollout_is_weights": m, "modified_response_mask": m})
  metrics = dict(out.metrics)
  # perplexities (veRL's training_ppl / rollout_ppl): exp of each row's mean negative log-prob,
  # averaged over rows
  mf = np.asarray(m, np.float32)
  for key, lp in (("training_ppl", old), ("rollout_ppl", mu)):
    row = -(np.asarray(lp) * mf).sum(-1) / np.maximum(mf.sum(-1), 1)
    metrics[key] = np.exp(row).mean()
  for key in case["expected"]:
    if key in _VERL_METRIC and key not in res:
      if _VERL_METRIC[key] not in metrics:
        raise NotUnderstood(f"metric {key!r} not produced")
      res[key] = metrics[_VERL_METRIC[key]]
  return res


def run_overlong(case):
  inp, cfg = case["inputs"], case["config"]
  check_config(case, {"max_resp_len", "overlong_buffer_len", "penalty_factor"})
  lengths = np.asarray(inp["valid_response_length"])
  cap = int(inp["max_resp_len"])
  assert cap == cfg["max_resp_len"]
  mask = (np.arange(cap)[None, :] < lengths[:, None]).astype(np.int32)
  return Out(overlong_reward=rewards.overlong_penalty(
      jnp.asarray(mask), max_length=cap, buffer=int(cfg["overlong_buffer_len"]),
      factor=float(cfg["penalty_factor"])))


def run_pure_credit(case):
  """PURE's turn_process_reward_logits_to_reward through rewards.step_rewards (disabled weighting
  = uniform weights = temperature infinity)."""
  inp, cfg = case["inputs"], case["config"]
  check_config(case, {"temperature", "disable_weighted_reward"})
  mask = jnp.asarray(inp["reward_mask"])
  r = prm_head.prm_logits_to_step_reward(f32(inp["logits"]))
  temp = math.inf if cfg["disable_weighted_reward"] else cfg["temperature"]
  pr = rewards.step_rewards.pure_weighted_rewards(r, mask, temperature=temp)
  return Out(process_reward=pr, outcome_reward=pr.sum(-1), masked={"process_reward": mask})


RUNNERS: Dict[str, Callable] = {
    "prime_implicit_reward": run_implicit_reward,
    "prime_prm_loss": run_prm_loss,
    "prime_rloo_advantage": run_prime_rloo,
    "grpo_advantage": run_grpo,
    "rloo_outcome_advantage": run_rloo,
    "reinforce_pp_advantage": run_reinforce_pp,
    "gae_advantage": run_gae,
    "ppo_policy_loss": run_ppo,
    "kl_penalty": run_kl,
    "entropy": run_entropy,
    "prompt_filter": run_filter,
    "policy_loss_menu": run_policy_loss_menu,
    "rollout_correction": run_rollout_correction,
    "overlong_penalty": run_overlong,
    "pure_credit": run_pure_credit,
}


# ----------------------------------------------------------------------------- comparison


def compare_case(case, out: Out):
  tol = case.get("tolerance", {})
  rtol, atol = tol.get("rtol", 1e-5), tol.get("atol", 1e-6)
  for key, exp in case["expected"].items():
    if key not in out:
      raise NotUnderstood(f"expected output {key!r} is not produced by the runner")
    if exp is None or out[key] is None:  # the reference returns None (e.g. no IS weights)
      assert exp is None and out[key] is None, f"{key}: expected {exp!r}, got {out[key]!r}"
      continue
    got = np.asarray(out[key])
    exp = np.asarray(exp)
    if exp.shape != got.shape:
      raise AssertionError(f"{key}: shape {got.shape} != expected {exp.shape}")
    if np.issubdtype(exp.dtype, np.integer) and np.issubdtype(got.dtype, np.integer):
      np.testing.assert_array_equal(got, exp, err_msg=key)
      continue
    if key in out.masked:
      valid = np.asarray(out.masked[key]) != 0
      np.testing.assert_allclose(got[valid], exp[valid].astype(np.float32), rtol=rtol, atol=atol,
                                 err_msg=f"{key} (valid positions)")
      assert np.all(got[~valid] == 0), f"{key}: jaxrl_dense output must be 0 on padding"
    else:
      np.testing.assert_allclose(got, exp.astype(np.float32), rtol=rtol, atol=atol, err_msg=key)


# The golden set, pinned: a file that goes missing or a case count that changes fails loudly
# instead of silently testing less.
GOLDEN_CASE_COUNTS = {
    "entropy.json": 1, "gae_advantage.json": 4, "grpo_advantage.json": 6, "kl_penalty.json": 14,
    "ppo_policy_loss.json": 13, "prime_implicit_reward.json": 7, "prime_prm_loss.json": 8,
    "prime_rloo_advantage.json": 8, "prompt_filter.json": 8, "reinforce_pp_advantage.json": 6,
    "rloo_outcome_advantage.json": 3, "policy_loss_menu.json": 23, "rollout_correction.json": 18,
    "overlong_penalty.json": 2, "pure_credit.json": 5,
}

# Where a reference raises, the error we raise and what its message must say. The reference's
# NotImplementedError stays a NotImplementedError; where the reference crashes at run time
# (RuntimeError from a bad slice assignment) we refuse up front with a ValueError that says why.
EXPECTED_RAISES = {
    ("kl_penalty", "pub_n4_kl_k1plus"): (NotImplementedError, r"'k1\+'.*not implemented"),
    ("kl_penalty", "pub_n4_kl_k3plus"): (NotImplementedError, r"'k3\+'.*not implemented"),
    ("kl_penalty", "pub_n4_kl_low_var_klplus"): (NotImplementedError, r"'low_var_kl\+'.*not implemented"),
    ("prime_implicit_reward", "pub_n4_recipe_whole_raises"): (ValueError, r"granularity='whole' is broken"),
}
_REFERENCE_ERROR_OF = {NotImplementedError: {"NotImplementedError"}, ValueError: {"RuntimeError", "ValueError"}}


def run_case(family: str, case) -> None:
  if family not in RUNNERS:
    raise NotUnderstood(f"unknown golden family {family!r}")
  runner = RUNNERS[family]
  exp = case["expected"]
  if isinstance(exp, dict) and "raises" in exp:
    key = (family, case["name"])
    if key not in EXPECTED_RAISES:
      raise NotUnderstood(f"raises case {key} has no pinned error (EXPECTED_RAISES)")
    err_type, pattern = EXPECTED_RAISES[key]
    assert exp["raises"] in _REFERENCE_ERROR_OF[err_type], (
        f"{key}: the reference raises {exp['raises']}, pinned as {err_type.__name__}")
    with pytest.raises(err_type, match=pattern):
      runner(case)
    return
  compare_case(case, runner(case))


# ----------------------------------------------------------------------------- tests


class _SummaryPlugin:
  """Prints, at the end of the session, how many cases of each golden file ran."""

  def __init__(self):
    self.lines = []

  def pytest_terminal_summary(self, terminalreporter):
    terminalreporter.section("golden parity")
    for line in self.lines:
      terminalreporter.write_line(line)


def _report(request, line: str):
  pm = request.config.pluginmanager
  plugin = pm.get_plugin("jaxrl_dense_golden_summary")
  if plugin is None:
    plugin = _SummaryPlugin()
    pm.register(plugin, "jaxrl_dense_golden_summary")
  plugin.lines.append(line)


def test_golden_files_and_case_counts_are_pinned():
  found = {p.name: len(json.loads(p.read_text())["cases"]) for p in GOLDEN_FILES}
  assert found == GOLDEN_CASE_COUNTS
  raises = {(json.loads(p.read_text()).get("file", p.stem), c["name"])
            for p in GOLDEN_FILES for c in json.loads(p.read_text())["cases"]
            if isinstance(c["expected"], dict) and "raises" in c["expected"]}
  assert raises == set(EXPECTED_RAISES)


def test_harness_checks_the_error_message():
  case = next(c for c in json.loads((GOLDEN_DIR / "kl_penalty.json").read_text())["cases"]
              if c["name"] == "pub_n4_kl_k1plus")
  real = EXPECTED_RAISES[("kl_penalty", case["name"])]
  try:
    EXPECTED_RAISES[("kl_penalty", case["name"])] = (NotImplementedError, "a message we never write")
    with pytest.raises(AssertionError):  # pytest.raises(match=...) failing
      run_case("kl_penalty", case)
  finally:
    EXPECTED_RAISES[("kl_penalty", case["name"])] = real


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_file(path, request):
  data = json.loads(path.read_text())
  family = data.get("file", path.stem)
  if family not in RUNNERS:
    pytest.fail(f"{path.name}: harness does not understand family {family!r}")
  failures, ran = [], 0
  for case in data["cases"]:
    try:
      run_case(family, case)
      ran += 1
    except NotUnderstood as e:
      failures.append(f"{case['name']}: NOT UNDERSTOOD: {e}")
    except Exception as e:  # collect every failing case of the file
      failures.append(f"{case['name']}: {type(e).__name__}: {e}")
  _report(request, f"[golden] {path.name}: {ran}/{len(data['cases'])} cases ran and matched")
  assert not failures, f"{path.name}: {len(failures)} failing case(s):\n" + "\n".join(failures)
  assert ran == len(data["cases"]) > 0


# ----------------------------------------------------------------------------- the harness itself


def _first_case(stem):
  return json.loads((GOLDEN_DIR / f"{stem}.json").read_text())["cases"][0]


def test_harness_rejects_unknown_config_key():
  case = _first_case("grpo_advantage")
  case["config"]["mystery_option"] = 1
  with pytest.raises(NotUnderstood, match="mystery_option"):
    run_case("grpo_advantage", case)


def test_harness_rejects_unknown_expected_key_and_family():
  case = _first_case("rloo_outcome_advantage")
  case["expected"]["mystery_output"] = 0.0
  with pytest.raises(NotUnderstood, match="mystery_output"):
    run_case("rloo_outcome_advantage", case)
  with pytest.raises(NotUnderstood, match="family"):
    run_case("no_such_family", case)


def test_harness_detects_a_wrong_value():
  case = _first_case("prime_rloo_advantage")
  adv = np.asarray(case["expected"]["advantages"])
  adv[0, 0] += 1e-3
  case["expected"]["advantages"] = adv.tolist()
  with pytest.raises(AssertionError):
    run_case("prime_rloo_advantage", case)
