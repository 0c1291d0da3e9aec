r"""Warm start for the tool-learning check: a tiny character-level model trained
by supervised learning on a MIXED policy over one-step 3-digit arithmetic, saved as an HF
directory that `experiments/prime_math.py --model=DIR` loads.

    python experiments/tool_warmstart.py --out=runs/tool_calc_tiny/warmstart   # the flag file's --model
    python experiments/tool_learning.py --out=runs/tool_calc_tiny --seeds=1,2,3  # grpo, matchtir, igpo

Task: `chain_arith` at depth 1 ("What is 347 + 589?", "What is 850 * 52?"; operands of "+" in
[1, 999], of "*" in [2, 99]), the generated source the flag file trains and evaluates on (train
and held-out splits disjoint by construction, `data.chain_arith`; the records carry the gold
calculator call MatchTIR matches). The prompt is exactly the trainer's: the record's messages with
the tool environment's instruction appended as the system message, through the chat template.

Demonstrations (the response region of a multi-turn row, as `rl.multiturn.rollout_turns` builds it):
  * tool episodes (a fraction --tool_demo_frac, 0.8): turn 0 `<tool>calculator: 347 + 589</tool>`,
    the environment's own observation (`\n<result>936</result>\n`, from `ToolEnv.step`, not
    trained), turn 1 `The answer is 936.<|im_end|>`;
  * direct answers: `The answer is N.<|im_end|>` with N the gold answer whose last two digits are
    redrawn (uniform, never the gold: a plausible but wrong number).
The loss is the mean next-token NLL over model tokens only (observations and the prompt are
context). The first response token (call or not) keeps its loss on every direct answer and on a
fraction w = p (1 - f) / (f (1 - p)) of the tool episodes, so the model is trained to call with
probability p = --p_tool (0.3) while 80% of the rows teach the copying a call needs (with 30% tool
rows a 2-layer model had not learned to copy the operands or the result after 400 steps: digit
losses stayed at log 10). So the start policy samples the call ~30% of the time, then copies the
operands and the result; greedy decoding never calls (p < 0.5) and scores ~0.

Two phases: --steps on the end of each prompt (the last --window tokens: the question and the chat
markers; RoPE attention is relative, so the copy it learns does not depend on what comes before),
4x cheaper, then --full_steps on the full prompts (the tool instruction as system message), which
the trainer sends (the first full step's loss is 2.1, back to 0.05 within 50 steps).

Outputs under --out: the model directory (`models.save_pretrained`: config.json, model.safetensors,
the character tokenizer) and warmstart.json (settings, loss curve, time).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("out", None, "Output model directory.", required=True)
flags.DEFINE_string("train_data", "chain_arith:train:depth=1,ops=+*,max_operand=999,max_mul_operand=99,"
                    "max_value=99999,shots=0,num_eval=200",
                    "Prompt source of the demonstrations (the flag file's --train_data).")
flags.DEFINE_float("p_tool", 0.3, "Probability of calling the calculator that the first response token is "
                   "trained to (the start policy's tool-call rate).")
flags.DEFINE_float("tool_demo_frac", 0.8, "Fraction of demonstrations that are tool episodes (more "
                   "copying to learn from); the first token's loss is kept on a subset so that its "
                   "target rate stays --p_tool.")
flags.DEFINE_integer("steps", 800, "Adam steps on the question window (phase 1).")
flags.DEFINE_integer("full_steps", 150, "Adam steps on the full prompts (phase 2).")
flags.DEFINE_integer("window", 48, "Phase 1: prompt tokens kept (the end of the prompt: the question).")
flags.DEFINE_integer("batch", 64, "Demonstrations per phase-1 step (phase 2: half).")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (warmup 50 steps, cosine decay to 10% over both phases).")
flags.DEFINE_string("shape", "hidden=96,layers=2,heads=6,kv_heads=3,mlp=256",
                    "Model shape (the keys of --model=random:...).")
flags.DEFINE_integer("max_turns", 3, "The flag file's --max_turns (part of the tool instruction).")
flags.DEFINE_integer("max_prompt_length", 448, "The flag file's --max_prompt_length.")
flags.DEFINE_integer("seed", 0, "Init / demonstration seed.")
flags.DEFINE_integer("limit", 0, "Use only the first N training problems (0 = all; for tests).")
FLAGS = flags.FLAGS


def demonstrations(records, tokenizer, env, tool_frac, p_tool, rng):
  """(response ids, loss mask) per record: a tool episode with probability tool_frac, else a direct
  (usually wrong) answer; see the module docstring. The first token (the decision to call) keeps
  its loss on every direct answer and on a fraction w of the tool episodes, w = p (1 - f) /
  (f (1 - p)), so its target probability of '<' is p_tool whatever tool_frac is."""
  w = p_tool * (1 - tool_frac) / (tool_frac * (1 - p_tool))
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
  out = []
  for rec in records:
    gold = int(rec.gold)
    if rng.random() < tool_frac:
      call = f"<tool>calculator: {rec.gold_calls[0]['arguments']['expression']}</tool>"
      env.reset(rec)
      obs = env.step(call).observation
      assert obs == f"\n<result>{gold}</result>\n", obs  # the environment's own observation
      ids = enc(call) + enc(obs) + enc(f"The answer is {gold}.") + [eos]
      mask = [1] * len(enc(call)) + [0] * len(enc(obs)) + [1] * (len(ids) - len(enc(call)) - len(enc(obs)))
      mask[0] = int(rng.random() < w)
    else:
      wrong = gold
      while wrong == gold:
        wrong = (gold // 100) * 100 + int(rng.integers(0, 100))
      ids = enc(f"The answer is {wrong}.") + [eos]
      mask = [1] * len(ids)
    out.append((ids, mask))
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from jaxrl_dense import envs, models
  from jaxrl_dense.data import batching, prompts
  from jaxrl_dense.models import tokenizer as tok_lib
  from jaxrl_dense.rl import config as config_lib
  from jaxrl_dense.rl import load

  t0 = time.time()
  tok = tok_lib.char_chat_tokenizer()
  cfg = config_lib.from_args([f"--model=random:{FLAGS.shape}", "--tokenizer=chars",
                              f"--train_data={FLAGS.train_data}", "--eval_data=", "--algo=grpo"])
  mc, params, _ = load.load_model(cfg.model, cfg, tok, seed=FLAGS.seed)
  make_env = envs.make_env("tool:calculator", max_turns=FLAGS.max_turns)
  records = [prompts.with_system_instruction(r, make_env().instruction)
             for r in prompts.load_prompts(FLAGS.train_data, limit=FLAGS.limit or None)]
  encoder = batching.PromptEncoder(tok, max_prompt_length=FLAGS.max_prompt_length, overflow="error")
  prompt_ids = encoder.encode_many([r.prompt_messages for r in records])
  rng = np.random.default_rng(FLAGS.seed)
  demos = demonstrations(records, tok, make_env(), FLAGS.tool_demo_frac, FLAGS.p_tool, rng)
  P = max(len(p) for p in prompt_ids)
  R = max(len(d[0]) for d in demos)
  T = -(-(P + R) // 16) * 16
  N = len(records)
  tokens = np.zeros((N, T), np.int32)
  attn = np.zeros((N, T), np.int32)
  loss_mask = np.zeros((N, T), np.float32)
  for i, (p, (ids, m)) in enumerate(zip(prompt_ids, demos)):
    s = P - len(p)  # prompts left-padded to P as the trainer does, responses right-padded
    tokens[i, s:P], attn[i, s:P] = p, 1
    tokens[i, P:P + len(ids)], attn[i, P:P + len(ids)], loss_mask[i, P:P + len(ids)] = ids, 1, m
  tool_frac = float(np.mean([len(m) != sum(m) for _, m in demos]))
  # Phase 1 sees only the end of each prompt (the question and the chat markers: RoPE attention is
  # relative, so the copy it learns is the same with the system message in front), 4x cheaper.
  W0 = P - FLAGS.window
  print(f"[warmstart] {N} demonstrations ({tool_frac:.3f} tool episodes, first-token target "
        f"p_tool={FLAGS.p_tool}), rows of {T} tokens (prompt <= {P}, response <= {R}), phase-1 "
        f"window {T - W0}; model {FLAGS.shape}", flush=True)

  total = FLAGS.steps + FLAGS.full_steps
  sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, min(50, total // 4), total, FLAGS.lr * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
  opt_state = opt.init(params)

  def loss_fn(p, tk, am, lm):
    logp = models.token_logprobs(p, mc, tk, am)
    return -(logp * lm).sum() / jnp.maximum(lm.sum(), 1.0)

  @jax.jit
  def step(p, s, tk, am, lm):
    loss, g = jax.value_and_grad(loss_fn)(p, tk, am, lm)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  curve = []
  for k in range(total):
    full = k >= FLAGS.steps
    idx = rng.integers(0, N, FLAGS.batch // 2 if full else FLAGS.batch)
    c0 = 0 if full else W0
    params, opt_state, loss = step(params, opt_state, tokens[idx, c0:], attn[idx, c0:], loss_mask[idx, c0:])
    if k % 50 == 0 or k == total - 1 or k == FLAGS.steps:
      curve.append((k, "full" if full else "window", float(loss)))
      print(f"[warmstart] step {k} ({'full' if full else 'window'}) loss {float(loss):.4f} "
            f"({time.time() - t0:.0f} s)", flush=True)
  models.save_pretrained(params, mc, tok, FLAGS.out)
  summary = {"train_data": FLAGS.train_data, "p_tool": FLAGS.p_tool, "tool_frac": tool_frac,
             "tool_demo_frac": FLAGS.tool_demo_frac, "steps": FLAGS.steps, "full_steps": FLAGS.full_steps,
             "window": FLAGS.window, "batch": FLAGS.batch, "lr": FLAGS.lr, "shape": FLAGS.shape,
             "seed": FLAGS.seed, "num_demos": N, "row_tokens": T, "loss_curve": curve,
             "seconds": round(time.time() - t0, 1)}
  with open(os.path.join(FLAGS.out, "warmstart.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"[warmstart] wrote {FLAGS.out} in {summary['seconds']} s")


if __name__ == "__main__":
  sys.exit(app.run(main))
