r"""Seconds per RL step: jaxrl_dense GRPO and PRIME steps vs TRL's GRPOTrainer.

Same model (SmolLM2-135M-Instruct, float32), same prompts (the shipped arithmetic task, 3-shot
chat prompts), same batch (8 prompts x 4 samples, 64 new tokens, temperature 1, no KL). Each
measured step is a full RL step: sampling, verification, (PRIME: reference scoring + implicit-PRM
update), advantages, one policy optimizer step. The first `--warmup` steps (compilation) are
not timed.

    python benchmarks/rl_step.py --json /tmp/rl_step.json                  # full setting
    python benchmarks/rl_step.py --prompts=2 --n=4 --new_tokens=16 --steps=1 --json /tmp/small.json

TRL is an optional, benchmark-only dependency:   pip install trl
Without it the TRL row is reported as skipped. TRL trains an HF float32 directory, written once
from the GGUF with `jaxrl_dense.models.loading.gguf_to_hf_dir` into --hf_dir.

Output: a table (seconds per step, ratios: TRL / ours GRPO, ours PRIME / ours GRPO) and, with
--json, the same numbers plus the per-stage timings of our steps.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("prime_math", REPO / "experiments" / "prime_math.py")
prime_math = importlib.util.module_from_spec(_spec)
sys.modules["prime_math"] = prime_math
_spec.loader.exec_module(prime_math)  # defines the experiment's absl flags too (unused here)

flags.DEFINE_string("json", "", "Write the results to this JSON file.")
flags.DEFINE_string("bench_model", "smollm2", "Model spec for our steps (see prime_math --model).")
flags.DEFINE_integer("prompts", 8, "Prompts per step.")
flags.DEFINE_integer("samples", 4, "Samples per prompt.")
flags.DEFINE_integer("new_tokens", 64, "New tokens per sample.")
flags.DEFINE_integer("bench_steps", 3, "Timed steps per system.")
flags.DEFINE_integer("warmup", 1, "Untimed warm-up steps (compilation).")
flags.DEFINE_list("systems", ["grpo", "prime", "trl"], "Which of grpo, prime, trl to run.")
flags.DEFINE_string("hf_dir", "", "HF float32 copy of the model for TRL (default: a cache dir).")
flags.DEFINE_bool("bench_remat", False, "Per-layer remat in our steps.")
FLAGS = flags.FLAGS


def _our_config(algo: str) -> "prime_math.RunConfig":
  tok_spec = "chars" if FLAGS.bench_model.startswith("random:") else "smollm2"
  rows = FLAGS.prompts * FLAGS.samples
  return prime_math.RunConfig(
      model=FLAGS.bench_model, tokenizer=tok_spec, algo=algo, prime_variant="verl", prm_update="after",
      n=FLAGS.samples, prompts_per_step=FLAGS.prompts, oversample=1, filter=False,
      max_prompt_length=160 if tok_spec == "smollm2" else 64, arith_shots=3 if tok_spec == "smollm2" else 0,
      max_response_length=FLAGS.new_tokens, micro_batch_size=min(8, rows),
      prm_micro_batch_size=min(8, rows), score_micro_batch_size=min(16, rows), lr=1e-6, prm_lr=1e-6,
      recompute_old_logp=False, remat=FLAGS.bench_remat, eval_data="", steps=10**6, progress=False,
      seed=0)


def bench_ours(algo: str) -> dict:
  cfg = _our_config(algo)
  prime_math.validate(cfg)
  run = prime_math.Run(cfg)
  try:
    for _ in range(FLAGS.warmup):
      run.train_step()
    recs = [run.train_step() for _ in range(FLAGS.bench_steps)]
  finally:
    run.verifier.close()
  per_step = [r["time/step"] for r in recs]
  stages = {k[5:]: statistics.mean(r[k] for r in recs) for k in recs[0] if k.startswith("time/") and k != "time/step"}
  return {"seconds_per_step": statistics.mean(per_step), "steps": per_step, "stages": stages}


def bench_trl() -> dict:
  try:
    import trl  # noqa: F401
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  except ImportError as e:
    return {"skipped": f"TRL not installed ({e}); run `pip install trl` to include it"}
  from jaxrl_dense.data import arithmetic
  from jaxrl_dense.models import loading
  from jaxrl_dense.verifiers import math as vmath

  hf_dir = pathlib.Path(FLAGS.hf_dir or pathlib.Path(tempfile.gettempdir()) / "jaxrl_dense_smollm2_hf")
  if not (hf_dir / "config.json").exists():
    loading.gguf_to_hf_dir(loading.smollm2_gguf_path(), hf_dir)
  train, _ = arithmetic.make_splits(arithmetic.ArithmeticTask())
  total = (FLAGS.warmup + FLAGS.bench_steps) * FLAGS.prompts
  recs = train[:total]
  ds = Dataset.from_list([{"prompt": [dict(m) for m in r.prompt_messages], "gold": r.gold} for r in recs])

  def reward(completions, gold, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [vmath.score(t, g) for t, g in zip(texts, gold)]

  times = []

  class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t = time.time()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.time() - self.t)

  rows = FLAGS.prompts * FLAGS.samples
  args = trl.GRPOConfig(
      output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows, num_generations=FLAGS.samples,
      max_completion_length=FLAGS.new_tokens, beta=0.0, learning_rate=1e-6, temperature=1.0,
      max_steps=FLAGS.warmup + FLAGS.bench_steps, logging_steps=1, save_strategy="no", report_to=[],
      use_cpu=True, bf16=False, fp16=False, shuffle_dataset=False, seed=0)
  model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype="float32")
  tok = AutoTokenizer.from_pretrained(str(hf_dir))
  trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                            processing_class=tok, callbacks=[Timer()])
  trainer.train()
  timed = times[FLAGS.warmup:]
  return {"seconds_per_step": statistics.mean(timed), "steps": timed, "trl_version": trl.__version__}


def main(argv):
  del argv
  import jax
  results = {"setting": {"model": FLAGS.bench_model, "prompts": FLAGS.prompts, "samples": FLAGS.samples,
                         "new_tokens": FLAGS.new_tokens, "timed_steps": FLAGS.bench_steps,
                         "warmup": FLAGS.warmup, "device": str(jax.devices()[0]),
                         "cpu_count": os.cpu_count()}}
  for system in FLAGS.systems:
    if system not in ("grpo", "prime", "trl"):
      raise app.UsageError(f"--systems: unknown system {system!r}; expected grpo, prime, trl")
    print(f"[bench] {system} ...", flush=True)
    results[system] = bench_trl() if system == "trl" else bench_ours(system)
    print(f"[bench] {system}: {results[system]}", flush=True)
  sec = {s: results[s].get("seconds_per_step") for s in FLAGS.systems}
  ratios = {}
  if sec.get("trl") and sec.get("grpo"):
    ratios["trl_over_ours_grpo"] = sec["trl"] / sec["grpo"]
  if sec.get("prime") and sec.get("grpo"):
    ratios["ours_prime_over_ours_grpo"] = sec["prime"] / sec["grpo"]
  results["ratios"] = ratios
  print(f"\n{'system':<22}{'s/step':>10}")
  for s in FLAGS.systems:
    v = sec.get(s)
    print(f"{s:<22}{(f'{v:.2f}' if v else results[s].get('skipped', '-')):>10}")
  for k, v in ratios.items():
    print(f"{k:<22}{v:>10.2f}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
