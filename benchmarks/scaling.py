"""Scaling benchmark: per-stage time on 1, 2, 4 and 8 simulated CPU devices, and a memory plan.

  python benchmarks/scaling.py --json /tmp/scaling.json            # CPU device sweep
  python benchmarks/scaling.py --memory-table                      # analytic budget table
  python benchmarks/scaling.py --plan                              # compiled per-device plan

Device sweep. Each device count runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must be set before JAX starts). The
child builds a small Llama-shaped model, a pure data-parallel mesh (data:N) and an FSDP mesh
(fsdp:N), and times three stages, each a single jitted SPMD program:

  forward     logits of a [B, T] batch
  logprobs    token_logprobs (chunked LM head)
  train_step  value_and_grad of a PPO-clip loss + AdamW update (params/opt state donated)

For every stage it reports the compile time, the median step time and the median *dispatch*
time (how long the Python call takes to return, before `block_until_ready`). Two host-side
costs are measured on their own: `shard_batch` (placing a host batch on the mesh) and
`call_overhead` (a jitted call that takes the whole sharded train state + batch as arguments
and does no work: argument handling, launch and return). On simulated devices all "devices"
share the same CPU cores, so step time measures total work, not speed-up. Note that the CPU
backend runs part of a multi-device program that has collectives on the calling thread, so on
CPU "dispatch" of the train step includes device work; `call_overhead` is the clean host cost.

No GPU/TPU numbers are produced unless a GPU is visible; the JSON says so.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time


DEVICE_COUNTS = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------
# Child: one device count
# ---------------------------------------------------------------------------------------------

def bench_config():
  from jaxrl_dense.models.config import ModelConfig
  return ModelConfig(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=384,
                     num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16, tie_word_embeddings=True,
                     max_position_embeddings=512)


def _time_stage(fn, args_fn, iters):
  """(compile_s, median step ms, median dispatch ms) of fn(*args_fn())."""
  import jax
  args = args_fn()
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  steps, dispatch = [], []
  for _ in range(iters):
    args = args_fn()
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    out = fn(*args)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    dispatch.append((t1 - t0) * 1e3)
    steps.append((t2 - t0) * 1e3)
  return compile_s, statistics.median(steps), statistics.median(dispatch), out


def child(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement, inspect
  from jaxrl_dense.models.logprobs import token_logprobs
  from jaxrl_dense.models.transformer import forward, init_params

  n = jax.device_count()
  config = bench_config()
  B, T = args.batch, args.seq
  rs = np.random.RandomState(0)
  host = {"tokens": rs.randint(0, config.vocab_size, (B, T)).astype(np.int32),
          "attention_mask": np.ones((B, T), np.int32),
          "advantages": rs.normal(size=(B, T)).astype(np.float32)}
  params_host = jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(0)))
  optimizer = optax.adamw(1e-4)
  fwd = jax.jit(lambda p, b: forward(p, config, b["tokens"], b["attention_mask"]))
  lpf = jax.jit(lambda p, b: token_logprobs(p, config, b["tokens"], b["attention_mask"]))

  def loss_fn(p, b, old):
    logp = token_logprobs(p, config, b["tokens"], b["attention_mask"])  # [B, T]
    ratio = jnp.exp(logp - old)
    pg = -jnp.minimum(ratio * b["advantages"], jnp.clip(ratio, 0.8, 1.2) * b["advantages"])
    return jnp.mean(pg)

  def train_step(p, o, b, grad_shardings=None):
    old = jax.lax.stop_gradient(token_logprobs(p, config, b["tokens"], b["attention_mask"]))
    loss, g = jax.value_and_grad(loss_fn)(p, b, old)
    g = placement.constrain(g, grad_shardings)  # reduce-scatter straight into the params' layout
    u, o = optimizer.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  results = {"devices": n}
  for layout in ("data", "fsdp"):
    mesh = mesh_lib.make_mesh(f"{layout}:{n}")
    params = placement.shard_params(params_host, config, mesh)
    opt = placement.sharded_opt_init(optimizer, params, mesh)
    ps = rules.param_shardings(params_host, config, mesh)
    osh = placement.opt_state_shardings(opt, params_host, mesh, param_sharding_tree=ps)
    step = jax.jit(functools.partial(train_step, grad_shardings=ps),
                   out_shardings=(ps, osh, placement.replicated(mesh)), donate_argnums=(0, 1))
    batch = placement.shard_batch(host, mesh)
    jax.block_until_ready(batch)
    put_ms = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(placement.shard_batch(host, mesh))
      put_ms.append((time.perf_counter() - t0) * 1e3)
    stages = {"shard_batch": {"median_ms": statistics.median(put_ms)}}
    for name, fn, args_fn in (("forward", fwd, lambda: (params, batch)),
                              ("logprobs", lpf, lambda: (params, batch))):
      c, s, d, _ = _time_stage(fn, args_fn, args.iters)
      stages[name] = {"compile_s": c, "median_ms": s, "dispatch_ms": d}
    state = {"p": params, "o": opt}

    def train_args():
      return (state["p"], state["o"], batch)

    def train_fn(p, o, b):
      out = step(p, o, b)
      state["p"], state["o"] = out[0], out[1]
      return out

    c, s, d, _ = _time_stage(train_fn, train_args, args.iters)
    stages["train_step"] = {"compile_s": c, "median_ms": s, "dispatch_ms": d}
    # Host-side cost of one step call with the whole sharded state as arguments: a jitted
    # program that does (almost) nothing, so the time is argument handling + launch + return.
    tiny = jax.jit(lambda p, o, b: b["advantages"][0, 0] + 0.0)
    c, s, d, _ = _time_stage(tiny, train_args, max(args.iters, 20))
    stages["call_overhead"] = {"compile_s": c, "median_ms": s, "dispatch_ms": d,
                               "num_arrays": len(jax.tree.leaves((state["p"], state["o"], batch))),
                               "num_shards": sum(len(x.addressable_shards) for x in
                                                 jax.tree.leaves((state["p"], state["o"], batch)))}
    per_dev = inspect.addressable_bytes(state["p"])
    stages["param_bytes_per_device"] = max(per_dev.values())
    results[layout] = stages
  print("RESULT " + json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Memory plan (docs/scaling.md)
# ---------------------------------------------------------------------------------------------

GIB = 1024 ** 3
MODELS = {  # Qwen2.5 shapes (config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B})
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                 num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
               num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
}
# HBM per chip (GiB as the runtime reports it) and the slice sizes (chips) we consider.
HARDWARE = {
    "TPU v5e (16 GiB/chip)": (16.0, (8, 16, 32, 64, 128, 256)),
    "TPU v5p (95 GiB/chip)": (95.0, (4, 8, 16, 32, 64)),
    "H100 (80 GB/GPU)": (80e9 / GIB, (8, 16, 32, 64)),
    "H200 (141 GB/GPU)": (141e9 / GIB, (8, 16, 32, 64)),
}
HEADROOM = 0.85          # plan for 85% of HBM (XLA scratch, fragmentation)
MIN_GEN_ROWS = 8         # a mesh must leave room for at least this many 4k KV-cache rows per chip


def param_count(name):
  import jax
  from jaxrl_dense.models.config import ModelConfig
  from jaxrl_dense.models.transformer import init_params
  cfg = ModelConfig(model_type="qwen2", attention_bias=True, **MODELS[name])
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
  return cfg, sum(int(x.size) for x in jax.tree.leaves(shapes))


def memory_plan(*, rollout_seqs=1024, seq_len=4096, micro_batch=1):
  """Bytes of every PRIME component (policy, PRM, reference, KV cache, activations) per model.

  Policy and PRM are trained: float32 params (4 B) + float32 grads (4 B) + AdamW mu, nu (8 B).
  The frozen reference (shared by the policy KL and the PRM's log-ratio) is bfloat16 (2 B).
  KV cache: bfloat16 k and v, [L, rows, S, K, hd] for `rollout_seqs` rows of `seq_len`.
  Training activations for a micro-batch b of `seq_len` tokens with per-layer remat: the
  float32 residual stream saved at every layer (L*b*T*D*4), the float32 attention scores and
  probabilities of the layer being recomputed (2*b*H*T*T*4; the model's attention is not
  flash-style) and two float32 LM-head chunks of 1024 tokens (2*1024*V*4).
  """
  rows = []
  for name in MODELS:
    cfg, n = param_count(name)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    b, t = micro_batch, seq_len
    comp = {
        "params": 4 * n, "grads": 4 * n, "adam": 8 * n,
        "prm": 16 * n, "reference": 2 * n,
        "kv_cache": kv_per_token * rollout_seqs * seq_len,
        "kv_per_seq": kv_per_token * seq_len,
        "activations": (cfg.num_layers * b * t * cfg.hidden_size * 4 + 2 * b * cfg.num_heads * t * t * 4
                        + 2 * 1024 * cfg.vocab_size * 4),
    }
    rows.append({"model": name, "params_count": n, "kv_bytes_per_token": kv_per_token,
                 "config": cfg, "bytes": comp})
  return rows


def recommend(row, hbm_gib, slices):
  """Smallest slice and, on it, the smallest FSDP degree (rest data-parallel) that fits.

  Policy + PRM + reference states are sharded over fsdp*tensor chips; the activations of one
  micro-batch live on each chip (tensor splits the heads); what is left holds the rollout KV
  cache (rows split over data*fsdp, kv heads over tensor). A mesh fits when at least
  MIN_GEN_ROWS 4k-token rows of KV cache fit per chip. Returns (chips, mesh, per-chip GiB of
  states + activations, KV rows per chip).
  """
  b = row["bytes"]
  cfg = row["config"]
  states = b["params"] + b["grads"] + b["adam"] + b["prm"] + b["reference"]
  budget = HEADROOM * hbm_gib * GIB
  for chips in slices:
    for tensor in (1, 2, 4):
      if cfg.num_kv_heads % tensor or cfg.num_heads % tensor or tensor > chips:
        continue
      fsdp = 1
      while fsdp * tensor <= chips:
        if cfg.hidden_size % fsdp == 0 and chips % (fsdp * tensor) == 0:
          used = states / (fsdp * tensor) + b["activations"] / tensor
          rows_fit = int((budget - used) // (b["kv_per_seq"] / tensor)) if budget > used else 0
          if rows_fit >= MIN_GEN_ROWS:
            data = chips // (fsdp * tensor)
            return chips, f"data:{data},fsdp:{fsdp},tensor:{tensor}", used / GIB, rows_fit
        fsdp *= 2
  return None


def memory_table_markdown(rollout_seqs=1024, seq_len=4096):
  rows = memory_plan(rollout_seqs=rollout_seqs, seq_len=seq_len)
  g = lambda x: f"{x / GIB:.1f}"
  out = []
  out.append("| model | params | policy params (fp32) | policy grads (fp32) | policy AdamW (fp32 mu, nu) "
             "| PRM (params + grads + AdamW) | reference (bf16) | KV cache per 4k-token row (bf16) "
             "| KV cache, 1024 rows x 4k | activations, 1 x 4k micro-batch |")
  out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    b = r["bytes"]
    out.append(f"| {r['model']} | {r['params_count'] / 1e9:.3f} B | {g(b['params'])} | {g(b['grads'])} | "
               f"{g(b['adam'])} | {g(b['prm'])} | {g(b['reference'])} | "
               f"{b['kv_per_seq'] / 2**20:.0f} MiB | {g(b['kv_cache'])} | {g(b['activations'])} |")
  out.append("")
  out.append("Sizes in GiB unless marked. Recommended slice and mesh: the smallest slice, and on it the "
             "smallest `fsdp` (the rest `data`), where policy + PRM + reference states / (fsdp x tensor) "
             f"+ activations fit in {int(HEADROOM * 100)}% of HBM with room for >= {MIN_GEN_ROWS} KV-cache "
             "rows of 4k tokens per chip. Cell: chips, mesh, per-chip states + activations, KV rows per "
             "chip that still fit (rollout generation batch per chip).")
  out.append("")
  hw = list(HARDWARE)
  out.append("| model | " + " | ".join(hw) + " |")
  out.append("| --- | " + " | ".join("---" for _ in hw) + " |")
  for r in rows:
    cells = []
    for h in hw:
      hbm, slices = HARDWARE[h]
      rec = recommend(r, hbm, slices)
      if rec is None:
        cells.append(f"does not fit in {slices[-1]} chips")
      else:
        chips, mesh, used, rows_fit = rec
        cells.append(f"{chips} chips `{mesh}`: {used:.1f} GiB, {rows_fit} rows")
    out.append(f"| {r['model']} | " + " | ".join(cells) + " |")
  return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Single-accelerator train step: tokens/s and MFU (run where a GPU/TPU is visible)
# ---------------------------------------------------------------------------------------------

TRAIN_SHAPES = {  # random-weight models of these shapes (no checkpoint needed)
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                       attention_bias=True),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True),
}
# Dense bf16 peak FLOP/s by device kind (vendor spec sheets); MFU is reported only for these.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
             "TPU v5p": 459e12, "TPU v5": 459e12, "A100": 312e12}


def train_flops_per_token(cfg, seq_len):
  """6 x (matmul params) + attention (12 x L x H x hd x T) per token (PaLM appendix B).

  Matmul params exclude the embedding lookup but include the LM head (tied or not).
  """
  d, hd = cfg.hidden_size, cfg.head_dim
  per_layer = (d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * cfg.intermediate_size)
  matmul = cfg.num_layers * per_layer + d * cfg.vocab_size
  return 6 * matmul + 12 * cfg.num_layers * cfg.num_heads * hd * seq_len


def train_bench(shape, batch, seq, iters, dtype="bfloat16", remat=True):
  """Times value_and_grad(PPO loss) + AdamW on one device; returns a dict with tokens/s, MFU."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jaxrl_dense.models.config import ModelConfig
  from jaxrl_dense.models.logprobs import token_logprobs
  from jaxrl_dense.models.transformer import init_params

  cfg = ModelConfig(**TRAIN_SHAPES[shape], param_dtype="float32", dtype=dtype, remat=remat,
                    max_position_embeddings=max(seq, 2048))
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  optimizer = optax.adamw(1e-6)
  opt = jax.jit(optimizer.init)(params)
  rs = np.random.RandomState(0)
  tokens = jnp.asarray(rs.randint(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  mask = jnp.ones((batch, seq), jnp.int32)
  adv = jnp.asarray(rs.normal(size=(batch, seq)), jnp.float32)
  old = jnp.zeros((batch, seq), jnp.float32) - 5.0

  def loss_fn(p):
    logp = token_logprobs(p, cfg, tokens, mask)  # [B, T]
    ratio = jnp.exp(logp - old)
    return jnp.mean(-jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = optimizer.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  t0 = time.perf_counter()
  params, opt, loss = step(params, opt)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    params, opt, loss = step(params, opt)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  tok_s = batch * seq / sec
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)
  achieved = train_flops_per_token(cfg, seq) * tok_s
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  return {"shape": shape, "params": n_params, "batch": batch, "seq": seq, "dtype": dtype, "remat": remat,
          "device": kind, "compile_s": compile_s, "step_s": sec, "tokens_per_s": tok_s,
          "model_tflops_per_s": achieved / 1e12, "mfu": (achieved / peak) if peak else None,
          "loss": float(loss)}


# ---------------------------------------------------------------------------------------------
# Compiled memory plan (parallel.plan): the RL step's programs (rl.programs) on simulated devices
# ---------------------------------------------------------------------------------------------

PLAN_SHAPES = {  # name -> (ModelConfig kwargs, rl_step_programs sizes)
    "tiny": (dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=10, tie_word_embeddings=False,
                  attention_bias=True),
             dict(batch_size=16, prompt_len=6, response_len=12, micro_batch_size=8,
                  mini_batch_size=16, num_samples=2)),
}
PLAN_MESHES = ("data:1", "data:8", "fsdp:8", "data:2,fsdp:2,tensor:2")


def plan_child(args):
  """In a process with 8 simulated devices: memory_plan of every program on every mesh."""
  import jax
  from jaxrl_dense.parallel import mesh as mesh_lib
  from jaxrl_dense.parallel import plan as plan_lib
  from jaxrl_dense.models.config import ModelConfig
  from jaxrl_dense.rl import programs as rl_programs
  cfg_kwargs, sizes = PLAN_SHAPES[args.plan_shape]
  cfg = ModelConfig(**cfg_kwargs)
  out = {"shape": args.plan_shape, "config": cfg_kwargs, "sizes": sizes, "plans": {}}
  for spec in args.plan_meshes.split(";"):
    mesh = mesh_lib.make_mesh(spec, devices=jax.devices()[:1] if spec == "data:1" else None)
    t0 = time.perf_counter()
    out["plans"][spec] = plan_lib.memory_plan(cfg, mesh, rl_programs.rl_step_programs(cfg, mesh, **sizes))
    out["plans"][spec]["compile_s"] = round(time.perf_counter() - t0, 1)
  print("RESULT " + json.dumps(out), flush=True)


def plan_markdown(result) -> str:
  """docs/scaling.md table: per-device bytes of every program on every mesh."""
  lines = ["| mesh | program | arguments | outputs | temporaries | aliased | peak |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for spec, plan in result["plans"].items():
    for name, p in plan["programs"].items():
      lines.append(f"| `{spec}` | {name} | {p['argument_bytes']:,} | {p['output_bytes']:,} | "
                   f"{p['temp_bytes']:,} | {p['alias_bytes']:,} | {p['peak_bytes']:,} |")
  return "\n".join(lines)


def run_plan(args):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--plan-child", "--plan-shape",
                         args.plan_shape, "--plan-meshes", args.plan_meshes],
                        env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"plan child failed:\n{proc.stderr[-3000:]}")
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])
  print(plan_markdown(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------

def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", default="", help="write the results here")
  ap.add_argument("--devices", default=",".join(map(str, DEVICE_COUNTS)), help="device counts")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--memory-table", action="store_true", help="print the docs/scaling.md memory table")
  ap.add_argument("--train-shapes", default="",
                  help="comma list of %s: time a bf16 policy train step on the default device "
                       "(tokens/s, MFU); use on a GPU/TPU" % ",".join(TRAIN_SHAPES))
  ap.add_argument("--train-batch", type=int, default=64)
  ap.add_argument("--train-seq", type=int, default=512)
  ap.add_argument("--plan", action="store_true",
                  help="compile the RL step's programs (generate, scoring, PRM and policy update, the whole update) "
                       "on 8 simulated devices and print their per-device memory (docs/scaling.md)")
  ap.add_argument("--plan-shape", default="tiny", choices=sorted(PLAN_SHAPES))
  ap.add_argument("--plan-meshes", default=";".join(PLAN_MESHES), help="';'-separated mesh specs")
  ap.add_argument("--plan-child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args)
    return
  if args.plan_child:
    plan_child(args)
    return
  if args.plan:
    run_plan(args)
    return
  if args.memory_table:
    print(memory_table_markdown())
    return
  if args.train_shapes:
    out = []
    for shape in args.train_shapes.split(","):
      if shape not in TRAIN_SHAPES:
        raise SystemExit(f"--train-shapes: unknown shape {shape!r}; choose from {sorted(TRAIN_SHAPES)}.")
      res = train_bench(shape, args.train_batch, args.train_seq, args.iters)
      print(json.dumps(res), flush=True)
      out.append(res)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"train": out}, f, indent=1)
    return
  counts = [int(c) for c in args.devices.split(",")]
  if any(c < 1 or args.batch % c for c in counts):
    raise SystemExit(f"--devices {args.devices}: each count must be >= 1 and divide --batch={args.batch}.")
  report = {"model": "llama d=128, L=4, V=1024, 8 heads (4 kv)", "batch": args.batch, "seq": args.seq,
            "platform": "cpu (simulated devices sharing this machine's cores)",
            "cpu_cores": os.cpu_count(), "runs": []}
  for n in counts:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
                           "--seq", str(args.seq), "--iters", str(args.iters)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f"child with {n} devices failed:\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    report["runs"].append(res)
    for layout in ("data", "fsdp"):
      st = res[layout]
      print(f"devices={n} {layout:4s} " + "  ".join(
          f"{k}: {v['median_ms']:.1f} ms" + (f" (dispatch {v['dispatch_ms']:.2f} ms)" if "dispatch_ms" in v else "")
          for k, v in st.items() if isinstance(v, dict)) + f"  param bytes/device {st['param_bytes_per_device']}",
          flush=True)
  try:
    import jax
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
  except Exception:  # noqa: BLE001
    gpus = []
  report["gpu"] = ("no GPU was available in this session: no GPU tokens/s or MFU numbers were measured"
                   if not gpus else f"{len(gpus)} GPU(s) visible; GPU timing not implemented in this script")
  print(report["gpu"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
