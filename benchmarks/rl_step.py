r"""Seconds per RL step: jaxrl_dense GRPO and PRIME steps vs TRL's GRPOTrainer.

Same model (SmolLM2-135M-Instruct, float32), same prompts (the shipped arithmetic task, 3-shot
chat prompts; TRL gets exactly the prompt records our seeded iterator draws, and the script checks
that TRL's chat-template tokens equal ours), same batch (8 prompts x 4 samples, at most 64 new
tokens, temperature 1, no KL), same verifier (our `jaxrl_dense.verifiers` process pool, same
time limit). Each measured step is a full RL step: sampling, verification, (PRIME: reference
scoring + implicit-PRM update), advantages, one policy optimizer step over micro-batches of 8
rows. The first `--warmup` steps (compilation) are not timed. TRL's step is timed from the
Trainer's on_step_begin to on_step_end (generation, reward, advantages, 4 accumulated micro-batches,
AdamW step), excluding its logging.

TRL is an optional, benchmark-only dependency. Install it in a venv that reuses this project's
torch / transformers (TRL 1.16.0 runs with transformers 5.24 + torch 2.13 and pip changes neither):

    python -m venv --system-site-packages .venv-trl && .venv-trl/bin/pip install trl==1.16.0

    .venv-trl/bin/python benchmarks/rl_step.py --json /tmp/rl_step.json       # full setting
    .venv-trl/bin/python benchmarks/rl_step.py --prompts=2 --samples=4 --new_tokens=16 \
        --bench_steps=1 --warmup=1 --json /tmp/small.json                     # smoke test

Without TRL (e.g. the system python) the TRL row is reported as skipped. TRL trains an HF float32
directory, written once from the GGUF with `jaxrl_dense.models.loading.gguf_to_hf_dir` into
--hf_dir. Run it on an otherwise idle machine: with other processes on the cores, torch's
multi-threaded CPU kernels slow down far more than XLA's (HF generate was ~10x slower with 2
threads than with 1 on 2 busy cores); --torch_threads sets torch's thread count.

Known differences from our steps (same work otherwise):
  * TRL pads prompts to the longest prompt of the batch and completions to the longest completion,
    and generation stops once every row has emitted EOS (<|im_end|>); our policy update always runs
    on the fixed [B, max_prompt_length + new_tokens] = [B, 160 + 64] shape (our sampler also stops
    early). The table's `resp tok` column is the mean response length of each system.
  * Both compute per-token entropies in the loss forward (reported as a metric; coefficient 0).
  * Ours runs each prompt once per group of 4 in the update (--share_prompt, same gradients);
    TRL runs the 32 full rows.
  * Loss: TRL loss_type="dapo" = token-mean over all 32 rows of the step, clip 0.2, no dual clip;
    ours: verl token-mean, clip 0.2 plus dual clip c = 3. Advantages: group-normalised (mean/std)
    in both. Old log-probs: TRL detaches the current ones (on-policy, num_iterations = 1), ours
    reuses the sampler's; neither runs an extra scoring forward for GRPO.
  * Optimizer: torch AdamW (TrainingArguments' default `optim`, recorded in the JSON) vs optax
    adamw; same lr, weight decay, grad-norm clip 1.0. TRL's lr decays linearly (irrelevant here).

Our steps are `jaxrl_dense.rl.trainer.Trainer.train_step` (the library; this file does not import
the experiment script): `rl.rollout.collect` then the one jitted `rl.prime.make_prime` update, so
our "update" column is that whole program (scoring, PRM update, advantages, PPO update).

Output: a table (seconds per step, generation+verification vs policy-update seconds, mean
response tokens, accuracy; ratios: TRL / ours GRPO, ours PRIME / ours GRPO) and, with --json, the
same numbers plus the per-stage timings of our steps.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import app, flags

from jaxrl_dense.rl import config as config_lib  # noqa: E402
from jaxrl_dense.rl import load, rollout  # noqa: E402

flags.DEFINE_string("json", "", "Write the results to this JSON file.")
flags.DEFINE_string("bench_model", "smollm2", "Model spec for our steps (see prime_math --model).")
flags.DEFINE_integer("prompts", 8, "Prompts per step.")
flags.DEFINE_integer("samples", 4, "Samples per prompt.")
flags.DEFINE_integer("new_tokens", 64, "New tokens per sample.")
flags.DEFINE_integer("bench_steps", 3, "Timed steps per system.")
flags.DEFINE_integer("warmup", 1, "Untimed warm-up steps (compilation).")
flags.DEFINE_list("systems", ["grpo", "prime", "trl"], "Which of grpo, prime, trl to run.")
flags.DEFINE_string("hf_dir", "", "HF float32 copy of the model for TRL (default: a cache dir).")
flags.DEFINE_bool("bench_remat", False, "Per-layer remat in our steps (and activation checkpointing in TRL).")
flags.DEFINE_bool("bench_share_prompt", True, "Our steps run each prompt once per group "
                  "(prime_math --share_prompt); false = every row's full sequence (ablation).")
flags.DEFINE_integer("bench_length_bucket", 0, "Our steps trim each batch to its longest prompt and "
                     "response, rounded up to this many tokens (prime_math --length_bucket; 0 = the "
                     "fixed [B, 160 + new_tokens] shape).")
flags.DEFINE_enum("bench_rollout_engine", "static", ["static", "continuous"],
                  "Our sampler (prime_math --rollout_engine).")
flags.DEFINE_integer("torch_threads", 0, "torch CPU threads for TRL (0 = torch's default, one per core).")
FLAGS = flags.FLAGS


def _our_config(algo: str) -> config_lib.RunConfig:
  tok_spec = "chars" if FLAGS.bench_model.startswith("random:") else "smollm2"
  rows = FLAGS.prompts * FLAGS.samples
  return config_lib.build(config_lib.RunConfig, dict(
      model=FLAGS.bench_model, tokenizer=tok_spec, algo=algo, reference_impl="verl", prm_update="after",
      n=FLAGS.samples, prompts_per_step=FLAGS.prompts, oversample=1, filter="none",
      max_prompt_length=160 if tok_spec == "smollm2" else 64, arith_shots=3 if tok_spec == "smollm2" else 0,
      max_response_length=FLAGS.new_tokens, micro_batch_size=min(8, rows),
      prm_micro_batch_size=min(8, rows), score_micro_batch_size=min(16, rows), lr=1e-6, prm_lr=1e-6,
      entropy_coeff=0.0, recompute_old_logp=False, remat=FLAGS.bench_remat,
      share_prompt=FLAGS.bench_share_prompt, length_bucket=FLAGS.bench_length_bucket,
      rollout_engine=FLAGS.bench_rollout_engine, eval_data="", steps=10**6, progress=False, seed=0))


def bench_ours(algo: str) -> dict:
  from jaxrl_dense.rl.trainer import Trainer
  cfg = _our_config(algo)
  load.check_inputs(cfg)
  run = Trainer(cfg)
  try:
    for _ in range(FLAGS.warmup):
      run.train_step()
    recs = [run.train_step() for _ in range(FLAGS.bench_steps)]
  finally:
    run.close()
  per_step = [r["time/step"] for r in recs]
  stages = {k[5:]: statistics.mean(r[k] for r in recs) for k in recs[0] if k.startswith("time/") and k != "time/step"}
  return {"seconds_per_step": statistics.mean(per_step), "steps": per_step, "stages": stages,
          "mean_completion_tokens": statistics.mean(r["response/length_mean"] for r in recs),
          "accuracy": statistics.mean(r["outcome/acc"] for r in recs)}


def _trl_prompt_records(cfg: config_lib.RunConfig, num_steps: int) -> list:
  """The prompt records our steps draw (same data, same seeded iterator), `num_steps` batches."""
  from jaxrl_dense.data import iterator
  train, _ = load.load_records(cfg)
  it = iterator.PromptIterator(train, seed=cfg.seed)
  return [r for _ in range(num_steps) for r in it.next_batch(cfg.prime.rollout.prompts_per_step)]


def _check_same_prompt_tokens(cfg: config_lib.RunConfig, hf_tokenizer, messages) -> int:
  """Raises unless TRL's chat-template tokenization equals ours; returns the prompt length."""
  from jaxrl_dense.data import batching
  ours = batching.PromptEncoder(load.load_tokenizer(cfg.tokenizer),
                                max_prompt_length=cfg.prime.rollout.max_prompt_length).encode(messages)
  theirs = hf_tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                            tokenize=True)
  if not isinstance(theirs, list):  # transformers 5 returns a BatchEncoding
    theirs = theirs["input_ids"]
  if list(theirs) != list(ours):
    raise RuntimeError(f"TRL's prompt tokens differ from ours ({len(theirs)} vs {len(ours)} tokens); "
                       f"the comparison would not be like for like")
  return len(ours)


def bench_trl() -> dict:
  """TRL GRPOTrainer doing the work of one of our GRPO steps per optimizer step.

  One `trainer.train()` step = one RL step: `prompts * samples` completions generated in one
  `generate` call (generation_batch_size = rows), rewarded by our verifier pool, group-normalised
  advantages, then `rows / micro` micro-batches of `micro = min(8, rows)` rows (as ours) accumulated
  into one AdamW step. No KL (beta=0: no reference model), no vLLM, float32 on CPU, no gradient
  checkpointing (unless --bench_remat, as ours), num_iterations=1 (old log-probs = detached current
  ones, no extra forward; ours reuses the sampler's log-probs).
  """
  try:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  except ImportError as e:
    return {"skipped": f"TRL not importable ({e}); see the install line in this file's docstring"}
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  if FLAGS.bench_model != "smollm2":
    return {"skipped": f"TRL runs only with --bench_model=smollm2 (got {FLAGS.bench_model!r})"}
  from jaxrl_dense.models import loading

  cfg = _our_config("grpo")
  pol = cfg.prime.policy
  rows = FLAGS.prompts * FLAGS.samples
  micro = pol.micro_batch_size
  if rows % micro:
    raise app.UsageError(f"--prompts * --samples = {rows} must be a multiple of the micro-batch {micro}")
  hf_dir = pathlib.Path(FLAGS.hf_dir or pathlib.Path(tempfile.gettempdir()) / "jaxrl_dense_smollm2_hf")
  if not (hf_dir / "config.json").exists():
    print(f"[bench] writing the float32 HF copy of the GGUF to {hf_dir}", flush=True)
    loading.gguf_to_hf_dir(loading.smollm2_gguf_path(), hf_dir)
  tok = AutoTokenizer.from_pretrained(str(hf_dir))
  num_steps = FLAGS.warmup + FLAGS.bench_steps
  recs = _trl_prompt_records(cfg, num_steps)
  prompt_len = _check_same_prompt_tokens(cfg, tok, recs[0].prompt_messages)
  ds = Dataset.from_list([{"prompt": [dict(m) for m in r.prompt_messages], "gold": r.gold,
                           "source": r.data_source} for r in recs])

  verifier = rollout.Verifier(cfg.prime.rollout.verify_timeout, cfg.verify_workers)  # ours: same pool, same limit
  accs = []

  def math_verifier(completions, gold, source, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    acc = verifier(texts, gold, source)
    accs.append(float(acc.mean()))
    return [float(a) for a in acc]

  step_times, gen_times, comp_lens = [], [], []

  class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      step_times.append(time.perf_counter() - self.t)

  class TimedGRPOTrainer(trl.GRPOTrainer):
    """Times sampling + reward + advantages (TRL does them together, once per RL step)."""

    def _generate_and_score_completions(self, inputs):
      t = time.perf_counter()
      out = super()._generate_and_score_completions(inputs)
      gen_times.append(time.perf_counter() - t)
      comp_lens.append(float(out["completion_mask"].sum(1).float().mean()))
      return out

  args = trl.GRPOConfig(
      output_dir=tempfile.mkdtemp(prefix="rl_step_trl_"),
      per_device_train_batch_size=micro, gradient_accumulation_steps=rows // micro,  # 1 optimizer step
      num_generations=FLAGS.samples, max_completion_length=FLAGS.new_tokens, temperature=1.0,
      top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=pol.clip_range[0], loss_type="dapo",
      scale_rewards="group", learning_rate=pol.lr, weight_decay=pol.weight_decay,
      max_grad_norm=pol.grad_clip, activation_checkpointing=FLAGS.bench_remat, use_vllm=False,
      max_steps=num_steps, logging_strategy="no", save_strategy="no", report_to="none",
      disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, shuffle_dataset=False,
      dataloader_num_workers=0, seed=cfg.seed)
  model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
  trainer = TimedGRPOTrainer(model=model, reward_funcs=math_verifier, args=args, train_dataset=ds,
                             processing_class=tok, callbacks=[Timer()])
  ckpt = trainer.model.is_activation_checkpointing
  if ckpt != FLAGS.bench_remat:
    raise RuntimeError(f"TRL activation checkpointing is {ckpt}, expected {FLAGS.bench_remat} (--bench_remat)")
  try:
    trainer.train()
  finally:
    verifier.close()
  if len(step_times) != num_steps or len(gen_times) != num_steps:
    raise RuntimeError(f"TRL ran {len(step_times)} optimizer steps and {len(gen_times)} generations, "
                       f"expected {num_steps} of each (one generation per RL step)")
  timed = step_times[FLAGS.warmup:]
  gen = gen_times[FLAGS.warmup:]
  return {"seconds_per_step": statistics.mean(timed), "steps": timed,
          "stages": {"generate_verify_advantage": statistics.mean(gen),
                     "policy_update": statistics.mean(t - g for t, g in zip(timed, gen))},
          "mean_completion_tokens": statistics.mean(comp_lens[FLAGS.warmup:]),
          "accuracy": statistics.mean(accs[FLAGS.warmup:]), "prompt_tokens": prompt_len,
          "trl_version": trl.__version__, "torch_version": torch.__version__,
          "torch_threads": torch.get_num_threads(), "optim": str(args.optim),
          "activation_checkpointing": ckpt}


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
  for system in FLAGS.systems:
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
  results["settings"] = {"prompts": FLAGS.prompts, "samples": FLAGS.samples,
                         "new_tokens": FLAGS.new_tokens, "share_prompt": FLAGS.bench_share_prompt,
                         "remat": FLAGS.bench_remat, "length_bucket": FLAGS.bench_length_bucket,
                         "rollout_engine": FLAGS.bench_rollout_engine, "cpu_count": os.cpu_count()}
  print(f"\n{'system':<10}{'s/step':>10}{'gen+verify':>12}{'update':>10}{'resp tok':>10}{'acc':>7}")
  for s in FLAGS.systems:
    r = results[s]
    if "skipped" in r:
      print(f"{s:<10}{'skipped':>10}  ({r['skipped']})")
      continue
    st = r["stages"]
    gen = st.get("generate_verify_advantage", st.get("generate", 0.0) + st.get("verify", 0.0))
    upd = st.get("policy_update", st.get("update", 0.0))  # TRL's update / our whole jitted update
    print(f"{s:<10}{r['seconds_per_step']:>10.2f}{gen:>12.2f}{upd:>10.2f}"
          f"{r['mean_completion_tokens']:>10.1f}{r['accuracy']:>7.2f}")
  for k, v in ratios.items():
    print(f"{k:<26}{v:>6.2f}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
