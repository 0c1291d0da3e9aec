"""What a run will need, decided before (or without) loading it: the mesh it asks for, the dry-run
plan (sizes, steps, a per-device memory estimate), and the compiled memory plan of one RL step from
abstract inputs (no weights read). Every failure is a `ConfigError` naming the flag (field) at fault.
(What a run loads from disk: `rl.load`.)

  mesh_devices(cfg), check_mesh(cfg)  the devices --mesh asks for; --mesh / --rollout_mesh parse
  meshes(cfg, model_config)           a run's training and sampler meshes, batch rows checked
  plan(cfg) -> (text, problems)       memory per device, steps, sizes (for --dry_run)
  abstract_update(cfg, mesh)          the trainer's jitted update and abstract arguments for it
  aot_plan(cfg, devices)              compiled per-device bytes of generate and update (--aot)
  target_fit(peak, target)            whether a plan fits a PLAN_TARGETS accelerator
  plan_markdown(plan)                 an `aot_plan` as a markdown table
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from jaxrl_dense.rl.config import ConfigError, RunConfig
from jaxrl_dense.rl.load import (OUTPUT_DIRS, check_data_spec, check_limits,
                                 check_model_spec, check_output_dir, check_output_file,
                                 dtype_overrides, random_shape, resolve_path)

# Architecture presets (for --dry_run without the checkpoint on disk).
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


def mesh_devices(cfg: RunConfig) -> int:
  """Devices a mesh spec asks for (-1 or an unparsable size: this host's devices)."""
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


def check_mesh(cfg: RunConfig, num_devices: Optional[int] = None) -> None:
  """--mesh (and --rollout_mesh, over the same devices) parse for `num_devices` (default: this
  host's); a ConfigError names the flag."""
  from jaxrl_dense.parallel import mesh as mesh_lib
  import jax
  try:
    mesh_lib.parse_mesh_spec(cfg.mesh, num_devices or len(jax.devices()))
  except Exception as e:  # noqa: BLE001 - re-raised naming the flag
    raise ConfigError("mesh", cfg.mesh, str(e)) from None
  if cfg.rollout_mesh:  # the sampler's mesh: the same devices as --mesh
    try:
      mesh_lib.parse_mesh_spec(cfg.rollout_mesh, num_devices or mesh_devices(cfg))
    except Exception as e:  # noqa: BLE001 - re-raised naming the flag
      raise ConfigError("rollout_mesh", cfg.rollout_mesh, f"{e} (it spans --mesh={cfg.mesh}'s devices)") from None


def meshes(cfg: RunConfig, model_config, devices=None) -> tuple:
  """(training mesh, sampler mesh, rollout layout) of a run over `devices` (default: all): --mesh,
  and --rollout_mesh over the same devices with the layout of the policy's rollout copy on it
  (`inference.rollout_mesh_layout`; '' = the training mesh). Every batch a step shards must divide
  over data*fsdp of its mesh; a ConfigError names the flag whose rows do not."""
  from jaxrl_dense.parallel import mesh as mesh_lib, inference
  p, r = cfg.prime, cfg.prime.rollout
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=devices)
  div = mesh_lib.batch_divisor(mesh)
  for name, rows in (("prompts_per_step", r.rows), ("micro_batch_size", p.policy.micro_batch_size),
                     ("prm_micro_batch_size", p.prm.prm_micro_batch_size),
                     ("score_micro_batch_size", p.score_micro_batch_size),
                     ("generate_batch_size", r.generate_prompts * r.n)):
    if rows % div:
      raise ConfigError(name, rows, f"{rows} rows are not divisible by data*fsdp={div} of --mesh={cfg.mesh}")
  try:
    rollout_mesh, layout = inference.rollout_mesh_layout(model_config, mesh, cfg.rollout_mesh)
  except ValueError as e:
    raise ConfigError("rollout_mesh", cfg.rollout_mesh, str(e)) from None
  rdiv = mesh_lib.batch_divisor(rollout_mesh)
  if (r.generate_prompts * r.n) % rdiv:
    raise ConfigError("generate_batch_size", r.generate_prompts * r.n,
                      f"{r.generate_prompts * r.n} rows are not divisible by data*fsdp={rdiv} of "
                      f"--rollout_mesh={cfg.rollout_mesh}")
  return mesh, rollout_mesh, layout


def _plan_model_config(cfg: RunConfig, problems: list):
  """The policy's ModelConfig without loading weights (config.json / GGUF metadata / preset)."""
  from jaxrl_dense.models import ModelConfig
  spec = cfg.model
  if spec.startswith("random:"):
    shape = random_shape(spec)
    return ModelConfig(model_type="llama", vocab_size=49152, head_dim=shape["hidden_size"] // shape["num_heads"],
                       **shape, **dtype_overrides(cfg)), "random init"
  path = resolve_path(spec)
  try:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
      from jaxrl_dense.models import hf_io
      return ModelConfig.from_hf_dict(hf_io.read_hf_config(path), source=path, **dtype_overrides(cfg)), path
    if str(path).endswith(".gguf") and os.path.exists(path):
      if "smollm2" not in str(path).lower():
        raise ValueError("cannot plan a GGUF architecture without --arch")
      return ModelConfig.from_hf_dict(ARCH_PRESETS["smollm2-135m"], **dtype_overrides(cfg)), path
  except Exception as e:  # noqa: BLE001
    problems.append(f"--model={spec}: cannot read its config: {e}")
  if cfg.arch:
    if cfg.arch not in ARCH_PRESETS:
      problems.append(f"--arch={cfg.arch}: unknown preset; known: {sorted(ARCH_PRESETS)}")
      return None, None
    return ModelConfig.from_hf_dict(ARCH_PRESETS[cfg.arch], **dtype_overrides(cfg)), f"preset {cfg.arch}"
  return None, None


def plan(cfg: RunConfig):
  """(plan text, problems): the sizes and per-device memory estimate of a run, and every path
  problem (for --dry_run; nothing is loaded)."""
  import jax
  import numpy as np
  from jaxrl_dense import models
  from jaxrl_dense.parallel import mesh as mesh_lib
  problems = []
  for name in ("model", "ref_model", "prm_model"):
    try:
      check_model_spec(name, getattr(cfg, name))
    except ConfigError as e:
      problems.append(str(e))
  for name in ("train_data", "eval_data"):
    try:
      check_data_spec(name, getattr(cfg, name), cfg, allow_empty=(name == "eval_data"))
    except ConfigError as e:
      problems.append(str(e))
  for name, check in [(n, check_output_dir) for n in OUTPUT_DIRS] + [("plan_json", check_output_file)]:
    try:
      check(name, getattr(cfg, name))
    except ConfigError as e:
      problems.append(str(e))
  try:
    check_limits(cfg)
  except ConfigError as e:
    problems.append(str(e))
  p, r = cfg.prime, cfg.prime.rollout
  mc, source = _plan_model_config(cfg, problems)
  ndev = mesh_devices(cfg)
  sizes = mesh_lib.parse_mesh_spec(cfg.mesh, ndev)
  shard, dp = sizes["fsdp"] * sizes["tensor"], sizes["data"] * sizes["fsdp"]
  lines = [f"PRIME plan ({p.algo}, reference_impl={p.reference_impl}, prm_update={p.prm.prm_update})",
           f"  mesh {cfg.mesh}: {ndev} device(s) (this host has {len(jax.devices())} "
           f"{jax.devices()[0].platform} device(s))",
           f"  steps {cfg.steps}: {r.prompts_per_step * r.oversample} prompts sampled x n={r.n} = "
           f"{r.sampled_rows} responses, {r.rows} kept per step ({r.rows * cfg.steps} trained responses in total)",
           f"  policy: {r.rows // p.policy_mini} optimizer step(s)/RL step x {p.policy.epochs} epoch(s), "
           f"micro-batch {p.policy.micro_batch_size} ({max(p.policy.micro_batch_size // dp, 1)} per data "
           f"shard); lr {p.policy.lr}"]
  if p.uses_prm:
    lines.append(f"  PRM: {r.rows // p.prm_mini} optimizer step(s)/RL step, micro-batch "
                 f"{p.prm.prm_micro_batch_size}, lr {p.prm.prm_lr}, beta {p.prm.beta}")
  T = r.max_prompt_length + r.max_response_length
  lines.append(f"  sequence {r.max_prompt_length} prompt + {r.max_response_length} response = {T} tokens")
  if mc is not None:
    shapes = jax.eval_shape(lambda k: models.init_params(mc, k), jax.random.PRNGKey(0))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
    pbytes = 4  # float32 master weights (compute in --dtype)
    n_models = 3 if p.uses_prm else (2 if p.needs_ref else 1)
    n_trained = 2 if p.uses_prm else 1
    mom = 6 if p.moments_dtype == "bfloat16" else 8  # AdamW mu (moments_dtype) + nu (float32)
    state = n_params * (n_models * pbytes + n_trained * (pbytes + mom))  # params, grads, moments
    mb = max(p.policy.micro_batch_size // dp, 1)
    act = mb * T * mc.hidden_size * 4 * (mc.num_layers + 8)  # remat: one layer input per layer + work
    head = 2 * min(1024, mb * T) * mc.vocab_size * 4
    # one sampler call (--generate_batch_size prompts x n) on the sampler's mesh (--rollout_mesh)
    rs = mesh_lib.parse_mesh_spec(cfg.rollout_mesh, ndev) if cfg.rollout_mesh else sizes
    kv = (max(r.generate_prompts * r.n // (rs["data"] * rs["fsdp"]), 1) * T * mc.num_layers * 2
          * max(mc.num_kv_heads // rs["tensor"], 1) * mc.head_dim * (2 if cfg.dtype == "bfloat16" else 4))
    per_dev = state / shard + act + head
    lines.append(f"  model ({source}): {n_params / 1e6:.1f}M params, {mc.num_layers} layers, "
                 f"d={mc.hidden_size}, vocab {mc.vocab_size}")
    lines.append(f"  memory per device (estimate): states {state / shard / 2**30:.2f} GiB ({n_models} models, "
                 f"{n_trained} trained, sharded over fsdp*tensor={shard}) + activations {act / 2**30:.2f} GiB "
                 f"+ LM-head chunk {head / 2**30:.2f} GiB = {per_dev / 2**30:.2f} GiB; rollout KV cache "
                 f"{kv / 2**30:.2f} GiB per sampler call")
  else:
    problems.append("cannot build the model config (give a readable --model or --arch)")
  return "\n".join(lines), problems


# Accelerators a memory plan can be checked against. hbm_gib: device memory as the runtime
# reports it; reserve_gib: what runs outside JAX's pool (GPU: CUDA context, cuBLAS/cuDNN
# workspaces, NCCL buffers; TPU: the runtime's own reservation), a stated allowance, not a
# measurement; fraction: whether XLA_PYTHON_CLIENT_MEM_FRACTION applies (GPU) and JAX's default.
PLAN_TARGETS = {
    "h100": {"hbm_gib": 79.6, "reserve_gib": 4.0, "platform": "gpu", "default_fraction": 0.75},
    "h200": {"hbm_gib": 139.8, "reserve_gib": 4.0, "platform": "gpu", "default_fraction": 0.75},
    "v5e": {"hbm_gib": 15.75, "reserve_gib": 0.5, "platform": "tpu", "default_fraction": None},
    "v5p": {"hbm_gib": 95.74, "reserve_gib": 0.5, "platform": "tpu", "default_fraction": None},
}


def target_fit(peak_bytes: int, target: str, memory_fraction: float = 0.0) -> dict:
  """Whether a plan's per-device peak fits `target` (a PLAN_TARGETS name).

  GPU: JAX's pool is memory_fraction x HBM (JAX's default 0.75 when 0); it must hold the peak,
  and the rest must hold the reserve, so the plan fits when
      peak <= f x HBM   and   (1 - f) x HBM >= reserve,
  with `need_fraction` = peak / HBM rounded up to 0.01 and `max_fraction` = 1 - reserve / HBM.
  TPU: the peak must fit HBM - reserve.
  """
  if target not in PLAN_TARGETS:
    raise ConfigError("plan_target", target, f"expected one of {sorted(PLAN_TARGETS)}")
  t = PLAN_TARGETS[target]
  hbm = t["hbm_gib"] * 2**30
  peak_gib = peak_bytes / 2**30
  out = {"target": target, "hbm_gib": t["hbm_gib"], "reserve_gib": t["reserve_gib"],
         "peak_gib": round(peak_gib, 2)}
  if t["platform"] == "gpu":
    need = math.ceil(100 * peak_bytes / hbm) / 100
    max_f = math.floor(100 * (1 - t["reserve_gib"] / t["hbm_gib"])) / 100
    f = memory_fraction or t["default_fraction"]
    out.update(need_fraction=need, max_fraction=max_f, memory_fraction=f,
               pool_gib=round(f * t["hbm_gib"], 2), fits_budget=need <= max_f,
               fits=peak_bytes <= f * hbm and f <= max_f)
  else:
    out.update(budget_gib=round(t["hbm_gib"] - t["reserve_gib"], 2),
               fits=peak_gib <= t["hbm_gib"] - t["reserve_gib"])
    out["fits_budget"] = out["fits"]
  return out


def abstract_update(cfg: RunConfig, mesh) -> tuple:
  """The trainer's one jitted update (`rl.prime.make_prime`, as `Trainer` builds it, LoRA
  included) and abstract arguments for it on `mesh`: ShapeDtypeStructs carrying their
  shardings, no weights read. Returns (update_fn, (state, batch, key), model_config, source);
  `update_fn.lower(*args)` inside `mesh_lib.use_mesh(mesh)` gives the program that runs.
  """
  from jaxrl_dense.rl import programs as rl_programs
  problems: list = []
  mc, source = _plan_model_config(cfg, problems)
  if mc is None:
    raise ConfigError("model", cfg.model, "cannot build the model config for --aot "
                      "(give a readable --model or an --arch preset)")
  # The production build (as `Trainer` builds it): its state layout, decided from abstract shapes,
  # is the one the abstract state carries; the batch is the rollout's (`rollout_batch_shapes`).
  program = rl_programs.update_program(mc, cfg.prime, mesh)
  return program.fn, program.args, mc, source


# Settings that shape the programs `aot_plan` compiles (recorded in the plan as "flags", so a
# recorded plan can be checked against the flag file it claims to be of).
PLAN_FLAGS = ("arch", "dtype", "remat", "mesh", "rollout_mesh", "algo", "reference_impl", "prm_update",
              "n", "prompts_per_step", "generate_batch_size", "max_prompt_length",
              "max_response_length", "rollout_engine", "mini_batch_size", "micro_batch_size",
              "prm_mini_batch_size", "prm_micro_batch_size", "score_micro_batch_size",
              "recompute_old_logp", "moments_dtype", "lora_rank", "prm_lora_rank")


def aot_plan(cfg: RunConfig, devices=None) -> dict:
  """The compiled memory plan of one RL step (--dry_run --aot).

  Lowers and compiles, from abstract inputs (`jax.ShapeDtypeStruct`s with their shardings; no
  weights are read), the two programs a training step runs on `cfg.mesh`:

    generate   the rollout sampler (`sampling`'s jitted static sampler; one call of
               --generate_batch_size prompts x n samples, max_prompt_length + max_response_length
               tokens, the KV cache in --dtype) on the params exactly as `rl.rollout.collect`
               passes them: the rollout copy of the policy (`inference.rollout_params`: the
               compute dtype, the decode layout; on --rollout_mesh when set), made once per
               rollout;
    update     `rl.prime.make_prime`'s ONE jitted update (scoring, PRM update, advantages, PPO
               update; donated state), exactly as the trainer builds it (LoRA included).

  and reads per-device bytes from `compiled.memory_analysis()` (`sharding_plan.memory_stats`).
  While the sampler runs, the training state (policy / PRM params and AdamW states, the
  reference) stays resident; `generate_with_state_bytes` adds it, and `peak_bytes_per_device`
  is the larger of that and the update's peak.

  Returns {"mesh", "param_dtype", "compute_dtype", "model", "programs": {name: bytes dict},
  "resident_state_bytes", "generate_with_state_bytes", "peak_bytes_per_device", "lora": ...}.
  """
  from jaxrl_dense.parallel import plan as sharding_plan
  from jaxrl_dense.parallel import mesh as mesh_lib, inference
  from jaxrl_dense.rl import config as config_lib
  p, r = cfg.prime, cfg.prime.rollout
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=devices)
  update_fn, (state, batch, akey), mc, source = abstract_update(cfg, mesh)
  lora_any = p.policy_lora is not None or p.prm_lora is not None
  rows, P_, R_ = r.rows, r.max_prompt_length, r.max_response_length
  try:  # = Trainer.rollout_params: the sampler's mesh (--rollout_mesh) and the copy's layout on it
    rmesh, rlayout = inference.rollout_mesh_layout(mc, mesh, cfg.rollout_mesh)
  except ValueError as e:
    raise ConfigError("rollout_mesh", cfg.rollout_mesh, str(e)) from None
  from jaxrl_dense.rl import programs as rl_programs
  gen = rl_programs.generate_program(
      mc, rmesh, batch_size=r.generate_prompts * r.n, prompt_len=P_, response_len=R_,
      num_samples=r.n, rollout_layout="inference" if rlayout == "auto" else rlayout,
      rollout_dtype=None if mc.dtype == "float32" else mc.dtype)
  out = {"generate": sharding_plan.memory_stats(sharding_plan.compile_program(gen, rmesh))}
  with mesh_lib.use_mesh(mesh):
    out["update"] = sharding_plan.memory_stats(update_fn.lower(state, batch, akey).compile())
  resident = sharding_plan.per_device_bytes(state)
  # generate's params argument is the rollout copy (inference.rollout_params: compute dtype, decode
  # layout), held beside the resident training state while the rollout runs
  gen_total = out["generate"]["peak_bytes"] + resident
  return {"mesh": dict(mesh.shape), "rollout_mesh": dict(rmesh.shape), "rollout_layout": rlayout,
          "devices": int(mesh.size),
          "platform": mesh.devices.flat[0].platform, "param_dtype": "float32",
          "compute_dtype": mc.dtype, "model": source, "num_layers": mc.num_layers,
          "hidden_size": mc.hidden_size,
          "lora": {"policy": dataclasses.asdict(p.policy_lora) if p.policy_lora else None,
                   "prm": dataclasses.asdict(p.prm_lora) if p.prm_lora else None} if lora_any else None,
          "rows": rows, "sampled_rows": r.sampled_rows, "generate_rows": r.generate_prompts * r.n,
          "prompt_len": P_, "response_len": R_,
          "flags": {k: v for k, v in config_lib.flat(cfg).items() if k in PLAN_FLAGS},
          "programs": out, "resident_state_bytes": resident, "generate_with_state_bytes": gen_total,
          "peak_bytes_per_device": max(gen_total, out["update"]["peak_bytes"])}


def plan_markdown(plan: dict) -> str:
  """A markdown table of an `aot_plan` (GiB per device), as docs/scaling.md shows it."""
  gib = lambda b: f"{b / 2**30:.2f}"
  rows = ["| program | arguments | outputs | temporaries | aliased | peak |",
          "| --- | --- | --- | --- | --- | --- |"]
  for name, m in plan["programs"].items():
    rows.append(f"| {name} | {gib(m['argument_bytes'])} | {gib(m['output_bytes'])} | "
                f"{gib(m['temp_bytes'])} | {gib(m['alias_bytes'])} | {gib(m['peak_bytes'])} |")
  rows.append(f"| resident training state (policy + PRM params and AdamW, reference) | | | | | "
              f"{gib(plan['resident_state_bytes'])} |")
  rows.append(f"| generate + resident state | | | | | {gib(plan['generate_with_state_bytes'])} |")
  rows.append(f"| **peak per device** | | | | | **{gib(plan['peak_bytes_per_device'])}** |")
  return "\n".join(rows)
