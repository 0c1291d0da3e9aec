"""One-command accelerator benchmark: rollout, train step, whole PRIME/GRPO steps, engine, decode bandwidth.

  python benchmarks/device.py --json docs/results/device_<gpu>.json   # one GPU, <= ~8 min
  python benchmarks/device.py --smoke --json /tmp/device.json         # CPU, tiny shapes, < 60 s

Sections (random weights of the named shapes: nothing is downloaded), each figure printed next
to its goal:
  (a) rollout tokens/s, the trainer's rollout (float32 masters -> the bf16 rollout copy,
      `inference.rollout_params` as `Trainer.rollout_params` makes it, timed -> `sampling.generate`)
      vs transformers `generate` (bf16; SmolLM2-135M and Qwen2-0.5B shapes; batch 64 and 256;
      64-token prompts, 256 new tokens, EOS ignored). Goal: ours >= 20x transformers at batch 256.
  (b) train-step tokens/s and MFU, ours (f32 master weights, bf16 compute, AdamW, remat policy
      `--remat_policy`) vs transformers (fp32 weights, bf16 autocast, fused AdamW) on the
      Qwen2-0.5B shape at sequence 1024. MFU = 6 N_matmul + 6 L T H hd (causal attention) FLOPs
      per token over the device's bf16 peak. Goal: ours >= 45% MFU.
  (c) the whole RL step, as the trainer runs it, for PRIME and GRPO (SmolLM2 shape, 16 prompts x
      4 samples): float32 master weights -> the rollout copy (`inference.rollout_params`, bf16,
      decode layout) -> n samples per prompt (`sampling.generate`) -> the one jitted update
      (`rl.prime.make_prime`: scoring, PRM update for PRIME, advantages, PPO). Reports each part,
      the full-step ratio (goal: PRIME / GRPO <= 1.25) and the updates' ratio alone (PRIME does
      about 11 forward-equivalents to GRPO's 5 there, so that one is >= 2 by construction).
  (d) decode bytes/s against the device's HBM peak: bytes a decode step must read (bf16 weights
      + the live KV slots) x steps / decode time, from the batch-256 rollout of (a).
      Goal: >= 50% of peak.
  (e) the continuous-batching engine vs the static sampler on a heavy-tailed workload (90% of
      rows stop within 64 tokens, 10% run to 1,024) and a uniform one
      (`benchmarks/generation.py`'s planted model). Goal: engine >= 2x static on heavy-tailed
      (the flag files switch to the engine once this holds on the device).
MFU is reported twice: against the data-sheet peak and against the bf16 matmul this run measures
(the roofline section, or the train section's own when run alone), which is what the hardware
delivers to JAX.
JSON sections (`--sections`, default all): roofline, rollout, train, full_step (alias step, rl:
prime_s, grpo_s, ratio = PRIME / GRPO whole step, update_ratio), engine (heavy-tailed engine_s,
static_s, speedup, engine_tok_s, static_tok_s; both workloads in rows); `check_schema` lists
what is missing or not a finite positive number in "schema_problems".
Peaks come from a table of device kinds (`--peak_tflops` / `--peak_hbm_tbs` override) and the
run also measures a bf16 matmul and a device copy, so the roofline figures can be read both ways.
The transformers peer shares the GPU: XLA_PYTHON_CLIENT_PREALLOCATE=false is set before jax
is imported, and ours runs first in each section. Every section catches its own failure and
records the error in the JSON, so one missing piece (no torch, a kernel that does not compile)
does not lose the others.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxrl_dense import sampling  # noqa: E402
from jaxrl_dense.models import ModelConfig, init_params, token_logprobs  # noqa: E402

SHAPES = {
    "smollm2_135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, tie_word_embeddings=True),
    "qwen2_0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                       intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                       head_dim=64, tie_word_embeddings=True, attention_bias=True,
                       rope_theta=1e6),
    "tiny": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                 attention_bias=True),
}
# bf16 dense TFLOP/s and HBM TB/s (vendor data sheets, SXM parts).
PEAKS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35), "A100": (312.0, 2.04), "L4": (121.0, 0.3),
         "TPU v5e": (197.0, 0.82), "TPU v5p": (459.0, 2.76), "TPU v4": (275.0, 1.2)}
GOALS = {"rollout_ratio_b256": 20.0, "decode_hbm_frac": 0.5, "train_mfu": 0.45,
         "prime_over_grpo_full_step": 1.25, "engine_speedup_heavy_tailed": 2.0}


def _peaks(args):
  kind = jax.devices()[0].device_kind
  tf, hbm = next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), (None, None))
  return kind, args.peak_tflops or tf, args.peak_hbm_tbs or hbm


def _timed(fn, repeats: int):
  """(first call s, best of `repeats` later calls s); fn must block until done."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return first, best


def _config(shape: str, **kw) -> ModelConfig:
  return ModelConfig(**SHAPES[shape], **kw)


def _hf_model(cfg: ModelConfig, device: str, dtype):
  import torch
  import transformers
  hf = cfg.to_hf_dict()
  cls = getattr(transformers, hf["architectures"][0])
  conf = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
  torch.manual_seed(0)
  return cls(conf).to(device=device, dtype=dtype).eval()


def _torch_device():
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def _prompts(batch: int, tp: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (batch, tp)).astype(np.int32)
  mask = np.ones((batch, tp), np.int32)
  lens = rng.integers(tp // 2, tp + 1, batch)
  for i, n in enumerate(lens):  # left-padded, varied lengths
    mask[i, : tp - n] = 0
    tokens[i, : tp - n] = 0
  return tokens, mask


def _param_count(cfg: ModelConfig) -> dict:
  d, hd, h, hkv, i, v, l = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                            cfg.intermediate_size, cfg.vocab_size, cfg.num_layers)
  layer = d * (h + 2 * hkv) * hd + h * hd * d + 3 * d * i
  return {"layer_matmul": l * layer, "head": d * v, "embed": d * v,
          "total": l * layer + d * v * (1 if cfg.tie_word_embeddings else 2)}


# ------------------------------------------------------------------------------------------------
# (a) rollout and (d) decode bandwidth
# ------------------------------------------------------------------------------------------------
def _mesh():
  """The one-device mesh the benchmark's trainer paths run on (`Trainer.mesh` of --mesh=data:1)."""
  from jaxrl_dense.parallel import mesh as mesh_lib
  return mesh_lib.make_mesh("data:1", devices=jax.devices()[:1])


def rollout(args, shape: str, batch: int, peaks) -> dict:
  """The trainer's rollout: float32 master weights -> the rollout copy (`inference.rollout_params`,
  bf16, decode layout; as `Trainer.rollout_params`, timed) -> `sampling.generate` on it."""
  from jaxrl_dense.parallel import placement, inference
  cfg = _config(shape, param_dtype="float32", dtype="bfloat16", eos_token_ids=(), pad_token_id=0)
  masters = init_params(cfg, jax.random.PRNGKey(0))
  mesh = _mesh()
  masters = jax.device_put(masters, placement.replicated(mesh))
  jax.block_until_ready(inference.rollout_params(masters, cfg, mesh, dtype=cfg.dtype))  # compiles the cast
  t0 = time.perf_counter()
  params = inference.rollout_params(masters, cfg, mesh, dtype=cfg.dtype)
  jax.block_until_ready(params)
  copy_s = time.perf_counter() - t0
  del masters
  tokens, mask = _prompts(batch, args.prompt_len, cfg.vocab_size)
  new = args.new_tokens
  row = {"shape": shape, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": new,
         "weights": "rollout copy of float32 masters (inference.rollout_params, bfloat16)",
         "rollout_copy_s": copy_s}

  def ours():
    out = sampling.generate(params, cfg, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=new,
                            temperature=1.0, eos_ids=(), prompt_bucket=args.prompt_len)
    out.tokens.block_until_ready()

  first, best = _timed(ours, args.repeats)
  row.update(ours_first_call_s=first, ours_s=best, ours_tok_s=batch * new / best)
  # (d) bytes one decode step must read: bf16 weights once + the live K/V slots of every row.
  pc = _param_count(cfg)
  weight_bytes = 2 * pc["total"]
  kv_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16
  live = args.prompt_len + np.arange(new)  # slots live at each step
  total_bytes = new * weight_bytes + batch * kv_slot * float(live.sum())
  row.update(decode_bytes=total_bytes, decode_bytes_s=total_bytes / best)
  if peaks[2]:
    row["decode_hbm_frac"] = row["decode_bytes_s"] / (peaks[2] * 1e12)
  del params
  if not args.no_peer:
    try:
      import torch
      dev = _torch_device()
      model = _hf_model(cfg, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
      t = torch.tensor(tokens, dtype=torch.long, device=dev)
      m = torch.tensor(mask, dtype=torch.long, device=dev)

      def peer():
        with torch.no_grad():
          out = model.generate(input_ids=t, attention_mask=m, do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0)
        if dev == "cuda":
          torch.cuda.synchronize()
        assert out.shape[1] - t.shape[1] == new

      _, pbest = _timed(peer, max(1, args.repeats - 1))
      row.update(peer_s=pbest, peer_tok_s=batch * new / pbest, ratio=row["ours_tok_s"] * pbest / (batch * new))
      del model
      if dev == "cuda":
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - recorded, the other figures still count
      row["peer_error"] = f"{type(e).__name__}: {e}"
  return row


# ------------------------------------------------------------------------------------------------
# (b) train step
# ------------------------------------------------------------------------------------------------
def train(args, peaks, measured_tflops=None) -> dict:
  shape, b, t = args.train_shape, args.train_batch, args.train_seq
  cfg = _config(shape, param_dtype="float32", dtype="bfloat16", remat=args.remat_policy != "none",
                remat_policy=args.remat_policy)
  params = init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.adamw(1e-5)
  state = (params, opt.init(params))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)), jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)

  def loss_fn(p):
    lp = token_logprobs(p, cfg, tokens, mask)  # [B, T]
    return -jnp.sum(lp) / (b * (t - 1))

  @jax.jit
  def step(state):
    p, o = state
    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, o = opt.update(g, o, p)
    return (optax.apply_updates(p, upd), o), loss

  box = [state]

  def ours():
    box[0], loss = step(box[0])
    loss.block_until_ready()

  first, best = _timed(ours, args.repeats)
  pc = _param_count(cfg)
  flops_tok = 6 * (pc["layer_matmul"] + pc["head"]) + 6 * cfg.num_layers * t * cfg.num_heads * cfg.head_dim
  row = {"shape": shape, "batch": b, "seq": t, "remat_policy": args.remat_policy,
         "flops_per_token": flops_tok, "ours_first_call_s": first, "ours_s": best,
         "ours_tok_s": b * t / best}
  if peaks[1]:
    row["ours_mfu"] = row["ours_tok_s"] * flops_tok / (peaks[1] * 1e12)
  if not measured_tflops:  # --sections train alone: measure the matmul peak in this run too
    measured_tflops = roofline(args)["matmul_tflops"]
  row["measured_peak_tflops"] = measured_tflops
  row["ours_mfu_measured_peak"] = row["ours_tok_s"] * flops_tok / (measured_tflops * 1e12)
  box.clear()
  del state, params
  if not args.no_peer:
    try:
      import torch
      dev = _torch_device()
      model = _hf_model(cfg, dev, torch.float32).train()
      popt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev == "cuda")
      x = torch.tensor(np.asarray(tokens), dtype=torch.long, device=dev)

      def peer():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
          out = model(input_ids=x, labels=x)
        out.loss.backward()
        popt.step()
        popt.zero_grad(set_to_none=True)
        if dev == "cuda":
          torch.cuda.synchronize()

      _, pbest = _timed(peer, max(1, args.repeats - 1))
      row.update(peer_s=pbest, peer_tok_s=b * t / pbest)
      if peaks[1]:
        row["peer_mfu"] = row["peer_tok_s"] * flops_tok / (peaks[1] * 1e12)
      if measured_tflops:
        row["peer_mfu_measured_peak"] = row["peer_tok_s"] * flops_tok / (measured_tflops * 1e12)
      del model, popt
      if dev == "cuda":
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
      row["peer_error"] = f"{type(e).__name__}: {e}"
  return row


# ------------------------------------------------------------------------------------------------
# (c) the whole RL step: rollout copy + sampling + the one jitted update, PRIME vs GRPO
# ------------------------------------------------------------------------------------------------
def full_step(args) -> dict:
  from jaxrl_dense.parallel import mesh as mesh_lib, placement, inference
  from jaxrl_dense.rl import RolloutBatch
  from jaxrl_dense.rl import config as rl_config
  from jaxrl_dense.rl import prime as prime_lib
  shape, g, n, p_len, r_len = args.rl_shape, args.rl_prompts, args.rl_n, args.rl_prompt_len, args.rl_response_len
  cfg_m = _config(shape, param_dtype="float32", dtype=args.rl_dtype, remat=args.rl_remat,
                  eos_token_ids=(), pad_token_id=0)
  mesh = mesh_lib.make_mesh("data:1", devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  ptok, pmask = _prompts(g, p_len, cfg_m.vocab_size)
  base = init_params(cfg_m, jax.random.PRNGKey(0))  # policy, PRM and reference start equal
  out = {"shape": shape, "prompts": g, "n": n, "prompt_len": p_len, "response_len": r_len,
         "dtype": args.rl_dtype, "parts": "rollout_copy + generate + update"}
  acc = jnp.asarray(rng.integers(0, 2, g * n), jnp.float32)
  for algo in ("grpo", "prime"):
    micro = args.rl_micro
    cfg = rl_config.PrimeConfig(
        algo=algo, score_micro_batch_size=micro,
        rollout=rl_config.RolloutConfig(n=n, prompts_per_step=g, max_prompt_length=p_len,
                                        max_response_length=r_len),
        policy=rl_config.PolicyConfig(micro_batch_size=micro),
        prm=rl_config.PRMConfig(prm_micro_batch_size=micro, prm_update=args.rl_prm_update))
    init_fn, update_fn = prime_lib.make_prime(cfg_m, cfg)
    fresh = lambda: jax.tree.map(jnp.copy, base)  # noqa: E731  (the state is donated)
    state = [init_fn(fresh(), fresh() if cfg.uses_prm else None, fresh() if cfg.needs_ref else None)]
    # On the rollout's (one-device) mesh, as the update's outputs will be: one compile.
    state[0] = jax.device_put(state[0], placement.replicated(mesh))

    def step(key):
      t0 = time.perf_counter()
      copy = inference.rollout_params(prime_lib.model_params(state[0], "policy", cfg), cfg_m, mesh,
                                     dtype=cfg_m.dtype)
      jax.block_until_ready(copy)
      t1 = time.perf_counter()
      gen = sampling.generate(copy, cfg_m, ptok, pmask, key, max_new_tokens=r_len, temperature=1.0,
                              eos_ids=(), num_samples=n, prompt_bucket=p_len)
      gen.tokens.block_until_ready()
      del copy
      t2 = time.perf_counter()
      batch = RolloutBatch(
          prompt_tokens=jnp.asarray(np.repeat(ptok, n, 0)), prompt_mask=jnp.asarray(np.repeat(pmask, n, 0)),
          response_tokens=gen.tokens, response_mask=gen.mask.astype(jnp.float32), outcome=acc,
          sampler_logp=gen.logprobs)
      state[0], metrics = update_fn(state[0], batch, jax.random.fold_in(key, 1))
      jax.block_until_ready(metrics)
      return t1 - t0, t2 - t1, time.perf_counter() - t2

    first = sum(step(jax.random.PRNGKey(0)))
    runs = [step(jax.random.PRNGKey(r + 1)) for r in range(max(1, args.repeats))]
    best = min(runs, key=sum)
    out[f"{algo}_first_call_s"] = first
    out.update({f"{algo}_{k}_s": v for k, v in zip(("rollout_copy", "generate", "update"), best)})
    out[f"{algo}_step_s"] = sum(best)
    state.clear()
  out["prime_over_grpo_full_step"] = out["prime_step_s"] / out["grpo_step_s"]
  out["prime_over_grpo_update"] = out["prime_update_s"] / out["grpo_update_s"]
  # The schema the README cites (check_schema): the whole steps and their ratio.
  out.update(prime_s=out["prime_step_s"], grpo_s=out["grpo_step_s"],
             ratio=out["prime_over_grpo_full_step"], update_ratio=out["prime_over_grpo_update"],
             tokens_per_step=g * n * r_len)
  return out


# ------------------------------------------------------------------------------------------------
# (e) continuous engine vs static sampler
# ------------------------------------------------------------------------------------------------
def engine(args) -> dict:
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generation.py")
  spec = importlib.util.spec_from_file_location("generation_bench", path)
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  ns = argparse.Namespace(
      batch=args.engine_batch, long_len=args.engine_long_len, short_max=args.engine_short_max,
      uniform_len=args.engine_uniform_len, vocab=args.engine_vocab, hidden=args.engine_hidden,
      layers=args.engine_layers, page_size=args.engine_page_size,
      steps_per_call=args.engine_steps_per_call, repeats=max(1, args.repeats))
  res = gen.engine_vs_static(ns)
  rows = {r["workload"]: r for r in res["rows"]}
  h = rows["heavy_tailed"]
  # The schema the README cites (check_schema): the heavy-tailed workload's figures on top.
  return {"model": res["model"], "workload": "heavy_tailed", "batch": h["batch"],
          "useful_tokens": h["useful_tokens"], "engine_s": h["engine_s"], "static_s": h["static_s"],
          "speedup": h["speedup"], "engine_tok_s": h["engine_tok_s"], "static_tok_s": h["static_tok_s"],
          "rows": res["rows"], "speedup_heavy_tailed": h["speedup"],
          "speedup_uniform": rows["uniform"]["speedup"]}


# ------------------------------------------------------------------------------------------------
# Measured roofline
# ------------------------------------------------------------------------------------------------
def roofline(args) -> dict:
  n = args.matmul_size
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  _, best = _timed(lambda: mm(a).block_until_ready(), 3)
  x = jnp.ones((args.copy_mb * 2 ** 20 // 4,), jnp.float32)
  cp = jax.jit(lambda y: y * 2.0)
  _, cbest = _timed(lambda: cp(x).block_until_ready(), 3)
  return {"matmul_n": n, "matmul_tflops": 2 * n ** 3 / best / 1e12,
          "copy_bytes": 2 * x.nbytes, "copy_tbs": 2 * x.nbytes / cbest / 1e12}


# The JSON's schema (docs/results/device_<gpu>.json; the --smoke test asserts it): per section,
# the keys that must hold finite positive numbers.
SCHEMA = {
    "roofline": ("matmul_tflops", "copy_tbs"),
    "train": ("ours_tok_s", "measured_peak_tflops", "ours_mfu_measured_peak"),
    "full_step": ("prime_s", "grpo_s", "ratio", "update_ratio"),
    "engine": ("engine_s", "static_s", "speedup", "engine_tok_s", "static_tok_s"),
}
ROLLOUT_SCHEMA = ("rollout_copy_s", "ours_s", "ours_tok_s", "decode_bytes_s")


def check_schema(result: dict, sections=None) -> list:
  """Problems with `result` against SCHEMA (missing section or key, a value that is not a
  finite positive number); [] when it holds. `sections`: the ones that ran (default: all)."""
  import math
  names = set(SCHEMA) | {"rollout"} if sections is None else set(sections)
  bad = []

  def need(where, d, keys):
    for k in keys:
      v = d.get(k)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        bad.append(f"{where}.{k} = {v!r}")

  for name in sorted(names & set(SCHEMA)):
    sec = result.get(name)
    if not isinstance(sec, dict) or "error" in sec:
      bad.append(f"{name}: {'missing' if sec is None else sec.get('error', sec)}")
    else:
      need(name, sec, SCHEMA[name])
  if "rollout" in names:
    rows = result.get("rollout")
    if not isinstance(rows, list) or not rows:
      bad.append(f"rollout: {rows!r:.200}")
    else:
      for i, r in enumerate(rows):
        need(f"rollout[{i}]", r, ROLLOUT_SCHEMA)
  return bad


def _section(name, fn, result):
  t0 = time.perf_counter()
  try:
    result[name] = fn()
  except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
    result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
  result.setdefault("section_s", {})[name] = time.perf_counter() - t0
  print(f"[{name}] {time.perf_counter() - t0:.1f}s {json.dumps(result[name], default=str)[:600]}",
        flush=True)


def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def summary(result: dict) -> list:
  """Lines 'figure: value (goal)' for the console."""
  lines = []
  for r in result.get("rollout", []) if isinstance(result.get("rollout"), list) else []:
    goal = f"goal >= {GOALS['rollout_ratio_b256']:.0f}x at batch 256" if r["batch"] >= 256 else ""
    lines.append(f"rollout {r['shape']} b={r['batch']}: ours {r['ours_tok_s']:.0f} tok/s, "
                 f"transformers {_fmt(r.get('peer_tok_s'), '.0f')} tok/s, ratio "
                 f"{_fmt(r.get('ratio'))}x {goal}".rstrip())
    lines.append(f"decode {r['shape']} b={r['batch']}: {r['decode_bytes_s'] / 1e12:.3f} TB/s = "
                 f"{_fmt(r.get('decode_hbm_frac'), '.1%')} of HBM peak "
                 f"(goal >= {GOALS['decode_hbm_frac']:.0%})")
  t = result.get("train", {})
  if "ours_tok_s" in t:
    lines.append(f"train {t['shape']} b={t['batch']} T={t['seq']}: ours {t['ours_tok_s']:.0f} tok/s "
                 f"MFU {_fmt(t.get('ours_mfu'), '.1%')} (goal >= {GOALS['train_mfu']:.0%}); "
                 f"transformers {_fmt(t.get('peer_tok_s'), '.0f')} tok/s MFU {_fmt(t.get('peer_mfu'), '.1%')}")
  f = result.get("full_step", {})
  if "prime_over_grpo_full_step" in f:
    lines.append(f"whole RL step (rollout copy + generate + update): PRIME {f['prime_step_s']:.2f}s / "
                 f"GRPO {f['grpo_step_s']:.2f}s = {f['prime_over_grpo_full_step']:.2f} "
                 f"(goal <= {GOALS['prime_over_grpo_full_step']}); updates alone "
                 f"{f['prime_over_grpo_update']:.2f}")
  e = result.get("engine", {})
  if "speedup_heavy_tailed" in e:
    lines.append(f"engine vs static: heavy-tailed {e['speedup_heavy_tailed']:.2f}x (goal >= "
                 f"{GOALS['engine_speedup_heavy_tailed']:.0f}x), uniform {e['speedup_uniform']:.2f}x")
  if "ours_mfu_measured_peak" in t:
    lines.append(f"train MFU against the measured matmul peak: ours {t['ours_mfu_measured_peak']:.1%}, "
                 f"transformers {_fmt(t.get('peer_mfu_measured_peak'), '.1%')}")
  rf = result.get("roofline", {})
  if "matmul_tflops" in rf:
    lines.append(f"measured: bf16 matmul {rf['matmul_tflops']:.1f} TFLOP/s, copy {rf['copy_tbs']:.3f} TB/s; "
                 f"table peak {_fmt(result.get('peak_tflops'), '.0f')} TFLOP/s, "
                 f"{_fmt(result.get('peak_hbm_tbs'))} TB/s")
  for k, v in result.items():
    if isinstance(v, dict) and "error" in v:
      lines.append(f"{k}: FAILED {v['error']}")
  if result.get("schema_problems"):
    lines.append(f"schema problems: {'; '.join(result['schema_problems'])}")
  return lines


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI)")
  ap.add_argument("--json", default=None)
  ap.add_argument("--sections", default="roofline,rollout,train,full_step,engine",
                  help="comma-separated; 'step' and 'rl' name full_step")
  ap.add_argument("--rollout_shapes", default="smollm2_135m,qwen2_0.5b")
  ap.add_argument("--batches", default="64,256")
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--train_shape", default="qwen2_0.5b")
  ap.add_argument("--train_batch", type=int, default=16)
  ap.add_argument("--train_seq", type=int, default=1024)
  ap.add_argument("--remat_policy", default="save_dots_except_mlp")
  ap.add_argument("--rl_shape", default="smollm2_135m")
  ap.add_argument("--rl_prompts", type=int, default=16)
  ap.add_argument("--rl_n", type=int, default=4)
  ap.add_argument("--rl_prompt_len", type=int, default=256)
  ap.add_argument("--rl_response_len", type=int, default=512)
  ap.add_argument("--rl_micro", type=int, default=16)
  ap.add_argument("--rl_dtype", default="bfloat16")
  ap.add_argument("--rl_remat", type=int, default=1, help="remat the layers in (c) (1/0)")
  ap.add_argument("--rl_prm_update", default="before", choices=("before", "after"))
  ap.add_argument("--engine_batch", type=int, default=64)
  ap.add_argument("--engine_long_len", type=int, default=1024)
  ap.add_argument("--engine_short_max", type=int, default=64)
  ap.add_argument("--engine_uniform_len", type=int, default=256)
  ap.add_argument("--engine_vocab", type=int, default=2048)
  ap.add_argument("--engine_hidden", type=int, default=256)
  ap.add_argument("--engine_layers", type=int, default=4)
  ap.add_argument("--engine_page_size", type=int, default=16)
  ap.add_argument("--engine_steps_per_call", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=1, help="timed calls after the first (compile) call")
  ap.add_argument("--matmul_size", type=int, default=8192)
  ap.add_argument("--copy_mb", type=int, default=1024)
  ap.add_argument("--peak_tflops", type=float, default=None)
  ap.add_argument("--peak_hbm_tbs", type=float, default=None)
  ap.add_argument("--no_peer", action="store_true", help="skip transformers")
  args = ap.parse_args(argv)
  if args.smoke:  # CPU-sized everything
    args.rollout_shapes, args.batches, args.prompt_len, args.new_tokens = "tiny", "2", 8, 6
    args.train_shape, args.train_batch, args.train_seq = "tiny", 2, 16
    args.rl_shape, args.rl_prompts, args.rl_n, args.rl_prompt_len, args.rl_response_len = "tiny", 2, 2, 8, 8
    args.rl_micro, args.rl_dtype, args.rl_remat, args.repeats = 4, "float32", 0, 1
    args.rl_prm_update, args.remat_policy = "after", "none"  # fewer programs to compile
    args.matmul_size, args.copy_mb = 128, 4
    args.engine_batch, args.engine_long_len, args.engine_short_max = 10, 40, 8
    args.engine_uniform_len, args.engine_vocab, args.engine_hidden = 16, 128, 32
    args.engine_layers, args.engine_page_size, args.engine_steps_per_call = 1, 8, 8
  kind, tf, hbm = _peaks(args)
  result = {"benchmark": "device", "smoke": args.smoke, "backend": jax.default_backend(),
            "device_kind": kind, "device_count": jax.device_count(), "peak_tflops": tf,
            "peak_hbm_tbs": hbm, "jax": jax.__version__, "host": platform.node(),
            "args": vars(args), "goals": GOALS}
  aliases = {"step": "full_step", "rl": "full_step"}  # earlier names (device_check.sh: --sections rl)
  sections = [aliases.get(x.strip(), x.strip()) for x in args.sections.split(",") if x.strip()]
  unknown = set(sections) - {"roofline", "rollout", "train", "full_step", "engine"}
  if unknown:
    ap.error(f"--sections: unknown {sorted(unknown)}; known roofline, rollout, train, full_step "
             "(step, rl), engine")
  peaks = (kind, tf, hbm)
  if "roofline" in sections:
    _section("roofline", lambda: roofline(args), result)
  if "rollout" in sections:
    def all_rollouts():
      return [rollout(args, s, int(b), peaks) for s in args.rollout_shapes.split(",")
              for b in args.batches.split(",")]
    _section("rollout", all_rollouts, result)
  if "train" in sections:
    measured = result.get("roofline", {}).get("matmul_tflops")
    _section("train", lambda: train(args, peaks, measured), result)
  if "full_step" in sections:
    _section("full_step", lambda: full_step(args), result)
  if "engine" in sections:
    _section("engine", lambda: engine(args), result)
  result["sections"] = sections
  result["schema_problems"] = check_schema(result, sections)
  result["summary"] = summary(result)
  print("\n".join(result["summary"]), flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  main()
