"""The 7B flag file's memory settings against its compiled plan (issue 25 item 6).

`experiments/configs/eurus2_7b_prime.flags` sets --plan_target=h100 and the --memory_fraction it
runs with; `docs/results/plan_eurus2_7b.json` is its `--dry_run --aot` plan (compiled on 8
simulated XLA:CPU devices; recompiling the 28-layer programs takes minutes, so the test reads the
recorded plan and checks that it is of this flag file: the settings that shape the programs,
`rl.setup.PLAN_FLAGS`, are recorded in it). The fraction written must be at least what the plan
needs (`rl.setup.target_fit`) and leave the stated reserve; a control shows the check failing.

The sampler's layout the plan counts (--rollout_mesh: the bf16 rollout copy tensor-parallel on
data:2 x tensor:4) is compiled at the 7B widths cut to 2 layers on 8 simulated devices, and
the copy samples the same tokens as the replicated one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = os.path.join(ROOT, "experiments", "configs", "eurus2_7b_prime.flags")
PLAN = os.path.join(ROOT, "docs", "results", "plan_eurus2_7b.json")
GIB = 2**30


def problems(cfg, plan) -> list:
  """Why `cfg`'s memory settings do not match its recorded `plan` ([] when they do)."""
  out = []
  flat = config_lib.flat(cfg)
  recorded = plan.get("flags", {})
  for k in setup.PLAN_FLAGS:
    if recorded.get(k) != flat[k]:
      out.append(f"plan is not of this flag file: --{k}={flat[k]!r}, plan has {recorded.get(k)!r}")
  if cfg.plan_target != "h100":
    out.append(f"--plan_target={cfg.plan_target!r}, expected h100")
  fit = setup.target_fit(plan["peak_bytes_per_device"], "h100", cfg.memory_fraction)
  if not cfg.memory_fraction:
    out.append("--memory_fraction is not set")
  if cfg.memory_fraction < fit["need_fraction"]:
    out.append(f"--memory_fraction={cfg.memory_fraction} < the {fit['need_fraction']} the plan needs")
  if cfg.memory_fraction > fit["max_fraction"]:
    out.append(f"--memory_fraction={cfg.memory_fraction} leaves less than the reserve")
  if not fit["fits"]:
    out.append(f"does not fit: {fit}")
  if plan["peak_bytes_per_device"] > 75 * GIB:
    out.append(f"peak {plan['peak_bytes_per_device'] / GIB:.2f} GiB > 75 GiB")
  return out


def test_7b_flag_file_sets_the_fraction_its_recorded_plan_needs():
  cfg = config_lib.from_args([f"--flagfile={FLAGS}"])
  plan = json.load(open(PLAN))
  assert problems(cfg, plan) == []
  # The recorded plan is self-consistent: the peak is the larger of (sampler + resident state)
  # and the update; every program fits the budget as compiled.
  progs = plan["programs"]
  for m in progs.values():
    assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
  assert plan["generate_with_state_bytes"] == progs["generate"]["peak_bytes"] + plan["resident_state_bytes"]
  assert plan["peak_bytes_per_device"] == max(plan["generate_with_state_bytes"], progs["update"]["peak_bytes"])
  assert plan["rollout_mesh"] == {"data": 2, "fsdp": 1, "tensor": 4} and plan["rollout_layout"] == "tensor"
  assert plan["num_layers"] == 28 and plan["devices"] == 8


def test_fraction_check_fails_on_its_controls():
  cfg = config_lib.from_args([f"--flagfile={FLAGS}"])
  plan = json.load(open(PLAN))
  need = setup.target_fit(plan["peak_bytes_per_device"], "h100")["need_fraction"]
  low = config_lib.replace(cfg, memory_fraction=round(need - 0.01, 2))
  assert any("< the" in p for p in problems(low, plan)), problems(low, plan)
  assert any("not set" in p for p in problems(config_lib.replace(cfg, memory_fraction=0.0), plan))
  assert any("reserve" in p for p in problems(config_lib.replace(cfg, memory_fraction=0.97), plan))
  # A plan of other settings (the replicated rollout copy: no --rollout_mesh) is refused.
  other = config_lib.replace(cfg, rollout_mesh="")
  assert any("--rollout_mesh" in p for p in problems(other, plan)), problems(other, plan)
  # The plan before --rollout_mesh (91.89 GiB per device as compiled) fits no fraction.
  big = dict(plan, peak_bytes_per_device=int(91.89 * GIB))
  assert any("does not fit" in p for p in problems(cfg, big))


def test_rollout_mesh_is_checked_naming_the_flag():
  cfg = config_lib.from_args([f"--flagfile={FLAGS}", "--rollout_mesh=data:3,tensor:4"])
  with pytest.raises(config_lib.ConfigError, match="--rollout_mesh="):
    setup.check_mesh(cfg, 8)
  setup.check_mesh(config_lib.from_args([f"--flagfile={FLAGS}"]), 8)


_WORKER = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxrl_dense import sampling, sharding, sharding_plan as sp
    from jaxrl_dense.models import ModelConfig, init_params
    from jaxrl_dense.rl import config as config_lib, setup
    cfg = config_lib.from_args(["--flagfile=" + sys.argv[1]])
    out = {}
    # 1. The 7B sampler cut to 2 layers: its weights per device on the flag file's rollout mesh.
    mc = dataclasses.replace(setup._plan_model_config(cfg, [])[0], num_layers=2)
    train = sharding.make_mesh(cfg.mesh)
    for name, spec in (("replicated", ""), ("rollout_mesh", cfg.rollout_mesh)):
      mesh, layout = sharding.rollout_mesh_layout(mc, train, spec)
      gen = sp.rl_step_programs(mc, mesh, batch_size=64, prompt_len=32, response_len=32,
                                micro_batch_size=8, num_samples=4,
                                rollout_layout="inference" if layout == "auto" else layout,
                                rollout_dtype="bfloat16")["generate"]
      out[name] = sp.memory_stats(sp.compile_program(gen, mesh))
    out["bf16_weight_bytes"] = sum(x.size * 2 for x in jax.tree.leaves(
        jax.eval_shape(lambda k: init_params(mc, k), jax.random.PRNGKey(0))))
    # 2. A tiny model: the copy on data:4 x tensor:2 samples what the replicated copy samples.
    tiny = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
    masters = sharding.shard_params(init_params(tiny, jax.random.PRNGKey(0)), tiny, train)
    tokens = np.random.RandomState(0).randint(1, 96, (8, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    res = {}
    for name, spec in (("replicated", ""), ("tensor", "data:4,fsdp:1,tensor:2")):
      mesh, layout = sharding.rollout_mesh_layout(tiny, train, spec)
      copy = sharding.rollout_params(masters, tiny, mesh, layout=layout)
      out[name + "_mesh"] = dict(sharding.mesh_of(copy).shape)
      g = sampling.generate(copy, tiny, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=8,
                            temperature=1.0, num_samples=2)
      res[name] = (np.asarray(g.tokens), np.asarray(g.logprobs))
    out["same_tokens"] = bool((res["replicated"][0] == res["tensor"][0]).all())
    out["logp_max_diff"] = float(np.abs(res["replicated"][1] - res["tensor"][1]).max())
    try:  # a tensor size that does not divide the kv heads is refused before any work
      sharding.rollout_mesh_layout(tiny, train, "data:2,tensor:4")
    except ValueError as e:
      out["refused"] = str(e)
    print("RESULT " + json.dumps(out))
""")


def test_rollout_mesh_copy_is_tensor_parallel_and_samples_the_same():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _WORKER, FLAGS], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  w = out["bf16_weight_bytes"]
  rep, tp = out["replicated"]["argument_bytes"], out["rollout_mesh"]["argument_bytes"]
  # Replicated: every device holds the whole bf16 copy; data:2 x tensor:4: a quarter of it
  # (norm scales are replicated: < 0.1% here).
  assert w <= rep < 1.01 * w, (rep, w)
  assert w / 4 <= tp < 1.01 * w / 4, (tp, w)
  assert out["tensor_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert out["replicated_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert out["same_tokens"] and out["logp_max_diff"] < 1e-4, out
  assert "tensor=4 does not divide" in out["refused"] and "kv heads=2" in out["refused"]
