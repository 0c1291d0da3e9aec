"""rl.config: frozen validated configs, the flags generated from them, the fingerprint, and the
input checks that run before any model loads."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "prime_math.py"
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"

# The flags prime_math had before the config moved into the library (flag files, tests and
# experiments/compare.py call it with them): every one must still exist, with its meaning.
FORMER_FLAGS = (
    "model ref_model prm_model tokenizer dtype remat arch train_data eval_data arith_ops "
    "arith_max_digits arith_shots arith_num_eval verify_timeout verify_workers system_prompt algo "
    "prime_variant prm_update beta process_coef outcome_coef gamma n prompts_per_step oversample "
    "filter acc_low acc_high filter_truncated prof_remove step_len advantage prl_eta extra_reward lr "
    "weight_decay grad_clip prm_lr prm_weight_decay prm_grad_clip clip_low clip_high clip_c loss_agg "
    "entropy_coeff kl_coef kl_type mini_batch_size micro_batch_size prm_mini_batch_size "
    "prm_micro_batch_size score_micro_batch_size epochs recompute_old_logp shuffle share_prompt "
    "max_prompt_length max_response_length temperature top_p top_k mesh steps seed logdir "
    "checkpoint_dir checkpoint_every checkpoint_keep resume eval_every eval_size eval_batch_size "
    "eval_max_response_length eval_at_start dry_run progress").split()

FLOATS = config_lib.float_fields()


def test_every_former_flag_is_a_field_and_the_flag_files_parse():
  names = [f.name for _, f in config_lib.iter_fields(config_lib.RunConfig)]
  assert len(names) == len(set(names)), "field names must be unique (they are the flag names)"
  accepted = set(names) | set(config_lib.renamed_settings())  # a renamed flag keeps its former name
  assert set(FORMER_FLAGS) <= accepted, sorted(set(FORMER_FLAGS) - accepted)
  for path in (REPO / "experiments" / "configs").glob("*.flags"):
    cfg = config_lib.from_args([f"--flagfile={path}"])
    assert isinstance(cfg, config_lib.RunConfig)
  cfg = config_lib.from_args([f"--flagfile={SMOKE}", "--n=2", "--lr=0.5", "--nofilter"])
  assert (cfg.prime.rollout.n, cfg.prime.policy.lr, cfg.prime.filter.filter) == (2, 0.5, "none")


def test_float_fields_are_all_covered():
  names = {name for name, _ in FLOATS}
  assert {"gamma", "clip_c", "verify_timeout", "top_p", "temperature", "beta", "lr", "prm_lr",
          "entropy_coeff", "kl_coef", "process_coef", "outcome_coef", "acc_low", "acc_high",
          "prl_eta"} <= names
  assert all(bad for _, bad in FLOATS), "every float field needs a range"


@pytest.mark.parametrize("name,bad", FLOATS, ids=[n for n, _ in FLOATS])
def test_every_float_field_rejects_nan_inf_and_out_of_range(name, bad):
  base = config_lib.RunConfig()
  for value in (math.nan, math.inf, -math.inf, *bad):
    with pytest.raises(ConfigError, match=f"--{name}=") as e:
      config_lib.replace(base, **{name: value})
    assert e.value.field == name
  default = config_lib.flat(base)[name]
  assert config_lib.flat(config_lib.replace(base, **{name: default}))[name] == default


def test_frozen_and_named_errors():
  cfg = config_lib.RunConfig()
  with pytest.raises(Exception):
    cfg.prime.policy.lr = 1.0  # frozen
  for kw, flag in ((dict(n=0), "n"), (dict(top_p=1.5), "top_p"), (dict(clip_low=1.0), "clip_low"),
                   (dict(loss_agg="sum"), "loss_agg"), (dict(acc_low=0.9), "acc_low"),
                   (dict(arith_ops="+,/"), "arith_ops"), (dict(prm_loss="nope"), "prm_loss"),
                   (dict(micro_batch_size=5, prompts_per_step=4), "micro_batch_size"),
                   (dict(unknown_flag=1), "unknown_flag")):
    with pytest.raises(ConfigError, match=f"--{flag}="):
      config_lib.replace(cfg, **kw)


def test_recompute_old_logp_false_is_refused_unless_sampler_equals_scorer():
  base = config_lib.RunConfig()
  config_lib.replace(base, recompute_old_logp=False)  # f32, T = 1, no top-p / top-k: allowed
  for kw in (dict(dtype="bfloat16"), dict(temperature=0.7), dict(top_p=0.9), dict(top_k=5)):
    with pytest.raises(ConfigError, match="--recompute_old_logp="):
      config_lib.replace(base, recompute_old_logp=False, **kw)


def test_fingerprint_is_the_config_minus_the_runtime_only_fields():
  cfg = config_lib.RunConfig()
  fp = config_lib.fingerprint(cfg)
  names = {f.name for _, f in config_lib.iter_fields(config_lib.RunConfig)}
  assert config_lib.RUNTIME_ONLY <= names
  # Settings added after checkpoints existed are left out while off, so those checkpoints resume.
  off = {"lora_rank", "lora_alpha", "lora_targets", "prm_lora_rank", "prm_lora_alpha",
         "prm_lora_targets", "generate_batch_size", "filter_mode", "resample_max_rounds",
         "process_on_filler", "prm_on_filler", "prm_noise_tol", "policy_loss", "rollout_is",
         "rollout_is_threshold", "rollout_rs", "rollout_rs_low", "rollout_rs_high", "rollout_rs_k3_max", "overlong_buffer",
         "overlong_penalty", "process_reward", "prm_step_separator", "step_split", "step_placement", "step_credit",
         "step_credit_temperature", "reward_timeout_s", "reward_retries", "reward_on_error"}
  assert set(fp) == names - config_lib.RUNTIME_ONLY - off
  # -1 / '' mean the loss's default: the fingerprint holds the resolved values, so a checkpoint
  # written with the former explicit 0.2 / 0.2 / token-mean resumes.
  assert (fp["clip_low"], fp["clip_high"], fp["loss_agg"]) == (0.2, 0.2, "token-mean")
  assert config_lib.fingerprint(config_lib.replace(cfg, clip_low=0.2, clip_high=0.2, loss_agg="token-mean")) == fp
  on = config_lib.replace(cfg, lora_rank=4, prm_lora_rank=4, generate_batch_size=32,
                          filter_mode="resample", process_on_filler=False, prm_on_filler=True,
                          prm_noise_tol=1e-3, policy_loss="gspo_token", rollout_is="token",
                          rollout_rs="geometric", overlong_buffer=16)
  external = {"process_reward", "prm_step_separator", "step_split", "step_placement", "step_credit", "step_credit_temperature",
              "reward_timeout_s", "reward_retries", "reward_on_error"}
  assert set(config_lib.fingerprint(on)) == names - config_lib.RUNTIME_ONLY - {"rollout_rs_k3_max"} - external
  k3 = set(config_lib.fingerprint(config_lib.replace(on, rollout_rs="k3")))
  assert k3 == names - config_lib.RUNTIME_ONLY - {"rollout_rs_low", "rollout_rs_high"} - external
  with pytest.raises(config_lib.ConfigError, match="generate_batch_size"):
    config_lib.replace(cfg, generate_batch_size=48)  # does not divide the 256 sampled prompts
  json.dumps(fp)  # serialisable
  for k in ("share_prompt", "mesh", "logdir", "micro_batch_size", "eval_every"):
    changed = config_lib.replace(cfg, **{k: {"share_prompt": False, "mesh": "data:2",
                                             "logdir": "/x", "micro_batch_size": 4, "eval_every": 3}[k]})
    assert config_lib.fingerprint(changed) == fp, k
  for k, v in (("beta", 0.1), ("shuffle", False), ("temperature", 0.9), ("prm_loss", "dpo"),
               ("filter", "none"), ("verify_timeout", 5.0)):
    assert config_lib.fingerprint(config_lib.replace(cfg, **{k: v})) != fp, k


def test_defaults_follow_the_verl_recipe_or_are_listed():
  p = config_lib.PrimeConfig()
  assert p.policy.entropy_coeff == 0.001  # veRL PRIME recipe (5h)
  # Deliberate difference (documented in the field's help and docs/algorithms.md): one PRM
  # optimizer step per RL step by default; the recipe's 4 mini-batches are set per config.
  assert p.prm.prm_mini_batch_size == 0
  eurus = config_lib.from_args([f"--flagfile={REPO / 'experiments' / 'configs' / 'eurus2_7b_prime.flags'}"])
  assert eurus.prime.rollout.rows // eurus.prime.prm_mini == 4


def _run(args, tmp_path, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(SCRIPT), f"--flagfile={SMOKE}", *args,
                         f"--checkpoint_dir={tmp_path}/ck"], capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO), env=env)


def test_malformed_inputs_exit_2_naming_the_flag_before_any_model_loads(tmp_path):
  good = {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}}
  bad_jsonl = tmp_path / "train.jsonl"
  bad_jsonl.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
  no_weights = tmp_path / "model"
  no_weights.mkdir()
  (no_weights / "config.json").write_text("{}")
  for args, flag in (([f"--train_data={bad_jsonl}"], "--train_data="),
                     ([f"--model={no_weights}"], "--model="),
                     (["--top_p=nan"], "--top_p="), (["--gamma=1.5"], "--gamma="),
                     (["--rollout_is=token", "--rollout_is_threshold=nan"], "--rollout_is_threshold="),
                     (["--rollout_rs=token", "--rollout_rs_low=3"], "--rollout_rs_low="),
                     (["--rollout_is=token", "--rollout_is_threshold=0"], "--rollout_is_threshold=")):
    r = _run(args, tmp_path)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert flag in r.stderr, (args, r.stderr[-2000:])
    assert "[setup]" not in r.stdout  # nothing was loaded or built
    assert not (tmp_path / "ck").exists()
  assert "line 2" in _run([f"--train_data={bad_jsonl}"], tmp_path).stderr


def test_flag_parse_errors_prm_only_flags_and_output_files_exit_2(tmp_path):
  """absl's parse errors exit 2 (not absl's 1) with absl's message; a PRM-only
  flag typed with an --algo without the PRM is refused; an output directory that is a file is
  refused before any model loads."""
  afile = tmp_path / "afile"
  afile.write_text("x")
  for args, needle in ((["--n=abc"], "flag --n=abc"), (["--bogus_flag"], "bogus_flag"),
                       (["--algo=grpo", "--prm_lr=5"], "--prm_lr=5.0: applies to --algo=prime only"),
                       ([f"--export_dir={afile}"], "--export_dir=")):
    r = _run(args, tmp_path)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert needle in r.stderr, (args, r.stderr[-2000:])
    assert "[setup]" not in r.stdout and not (tmp_path / "ck").exists()


def test_prm_only_settings_typed_vs_from_a_flag_file():
  from jaxrl_dense import cli
  smoke = config_lib.from_args([f"--flagfile={SMOKE}"])
  grpo = config_lib.replace(smoke, algo="grpo")
  # The smoke flag file sets --prm_lr=1e-3 (default 1e-6): under grpo it is ignored, with a note.
  assert config_lib.ignored_settings(grpo) == ["prm_lr"]
  assert config_lib.ignored_settings(smoke) == []
  config_lib.check_applicable(grpo, cli.command_line_flags(["p", f"--flagfile={SMOKE}", "--algo=grpo"]))
  for argv, name in ((["p", "--algo=grpo", "--prm_lr=5"], "prm_lr"),
                     (["p", "--prm_update", "after"], "prm_update"),
                     (["p", "--noeval_prm"], "eval_prm"), (["p", "-beta=0.1"], "beta")):
    given = cli.command_line_flags(argv)
    assert name in given
    with pytest.raises(ConfigError, match=f"--{name}=.*applies to --algo=prime only") as e:
      config_lib.check_applicable(grpo, given)
    assert e.value.field == name
    config_lib.check_applicable(smoke, given)  # PRIME reads them
  assert cli.command_line_flags(["p", "--n=2", "--", "--beta=1"]) == {"n"}
  assert config_lib.PRM_ONLY <= set(config_lib.flat(smoke))  # every name is a real setting
  # --reference_impl is read by every algo (the policy loss's clipping): never refused
  config_lib.check_applicable(grpo, cli.command_line_flags(["p", "--reference_impl=original"]))


def test_a_renamed_flag_keeps_its_former_name_for_one_release():
  """--prime_variant (the former name of --reference_impl) still sets it, with a
  DeprecationWarning; both names with different values are refused naming the new flag; the
  config API (replace / build, the attribute) accepts the old name too."""
  assert config_lib.renamed_settings() == {"prime_variant": "reference_impl"}
  with pytest.warns(DeprecationWarning, match="--prime_variant is renamed --reference_impl"):
    cfg = config_lib.from_args(["--prime_variant=original"])
  assert cfg.prime.reference_impl == "original"
  assert config_lib.from_args(["--reference_impl=original"]) == cfg
  with pytest.warns(DeprecationWarning):
    assert config_lib.from_args(["--prime_variant=original", "--reference_impl=original"]) == cfg
  with pytest.raises(config_lib.ConfigError, match="--reference_impl='verl': conflicts with --prime_variant"):
    config_lib.from_args(["--prime_variant=original", "--reference_impl=verl"])
  with pytest.raises(config_lib.ConfigError, match="reference_impl"):
    config_lib.from_args(["--prime_variant=other"])
  with pytest.warns(DeprecationWarning):
    assert config_lib.replace(config_lib.RunConfig(), prime_variant="original") == cfg
  with pytest.warns(DeprecationWarning):
    assert cfg.prime.prime_variant == "original"
  assert "prime_variant" not in config_lib.flat(cfg) and "prime_variant" not in config_lib.fingerprint(cfg)
