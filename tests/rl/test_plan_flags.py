"""The 7B flag file's memory settings against its compiled plan.

`experiments/configs/eurus2_7b_prime.flags` sets --plan_target=h100 and the --memory_fraction it
runs with; `docs/results/plan_eurus2_7b.json` is its `--dry_run --aot` plan (compiled on 8
simulated XLA:CPU devices; recompiling the 28-layer programs takes minutes, so the test reads the
recorded plan and checks that it is of this flag file: the settings that shape the programs,
`rl.plan.PLAN_FLAGS`, are recorded in it). The fraction written must be at least what the plan
needs (`rl.plan.target_fit`) and leave the stated reserve; a control shows the check failing.

The sampler the plan counts (--rollout_mesh: the bf16 rollout copy tensor-parallel on
data:2 x tensor:4), and the replicated copy on the training mesh fsdp:8, are compiled at the 7B
widths cut to 2 layers on 8 simulated devices: a device holds 1/4 (1/1) of the
weights, the weights never move (every collective is on an allowed list: tensor-axis all-reduces
of [rows, D] activations, the vocabulary-parallel logits' all-gather, the loop's scalar), and
each device's KV cache is 1/8 of the whole. Controls: the replicated copy for the 1/4, the LM
head's logits left unconstrained (GSPMD then all-gathers the [D, V] weight), the cache's rows
left whole. On a tiny model the copy samples the replicated copy's tokens, and the Pallas GPU
decode kernel (interpreted) in the sampler on the tensor-parallel copy samples the XLA path's
tokens with every pallas_call inside a shard_map on one shard's rows and kv heads (control:
the bare kernel).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = os.path.join(ROOT, "experiments", "configs", "eurus2_7b_prime.flags")
PLAN = os.path.join(ROOT, "docs", "results", "plan_eurus2_7b.json")
GIB = 2**30


def problems(cfg, plan) -> list:
  """Why `cfg`'s memory settings do not match its recorded `plan` ([] when they do)."""
  out = []
  flat = config_lib.flat(cfg)
  recorded = plan.get("flags", {})
  for k in plan_lib.PLAN_FLAGS:
    if recorded.get(k) != flat[k]:
      out.append(f"plan is not of this flag file: --{k}={flat[k]!r}, plan has {recorded.get(k)!r}")
  if cfg.plan_target != "h100":
    out.append(f"--plan_target={cfg.plan_target!r}, expected h100")
  fit = plan_lib.target_fit(plan["peak_bytes_per_device"], "h100", cfg.memory_fraction)
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
  need = plan_lib.target_fit(plan["peak_bytes_per_device"], "h100")["need_fraction"]
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
    plan_lib.check_mesh(cfg, 8)
  plan_lib.check_mesh(config_lib.from_args([f"--flagfile={FLAGS}"]), 8)


_WORKER = textwrap.dedent("""
    import dataclasses, functools, json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.extend import core as jex_core
    from jaxrl_dense import sampling
    from jaxrl_dense.sampling import static as sampling_static
    from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement, inference
    from jaxrl_dense.parallel import plan as sp
    from jaxrl_dense.models import ModelConfig, attention, init_params, transformer
    from jaxrl_dense.rl import config as config_lib, plan as plan_lib, programs as rl_programs
    cfg = config_lib.from_args(["--flagfile=" + sys.argv[1]])
    out = {}

    def facts(compiled):
      text = compiled.as_text()
      loops = sp.while_bodies(text)
      return {**sp.memory_stats(compiled),
              "shapes": sorted([t, list(d)] for t, d in sp.array_shapes(text)),
              "collectives": [[c.kind, [list(d) for _, d in c.shapes], c.group_size,
                               c.computation in loops] for c in sp.collectives(text)]}

    # 1. The 7B sampler cut to 2 layers (16 prompts x 4 samples, 32 + 48 tokens): weights per
    # device, the KV cache's per-device shapes and every collective, on the training mesh
    # (replicated copy) and on the flag file's rollout mesh (tensor-parallel copy).
    mc = dataclasses.replace(plan_lib._plan_model_config(cfg, [])[0], num_layers=2)
    train = mesh_lib.make_mesh(cfg.mesh)
    sizes = dict(batch_size=64, prompt_len=32, response_len=48, micro_batch_size=8, num_samples=4)
    out["sizes"] = sizes
    out["model"] = {k: getattr(mc, k) for k in ("hidden_size", "intermediate_size", "vocab_size",
                                                "num_heads", "num_kv_heads", "head_dim")}

    def compile_gen(spec):
      mesh, layout = inference.rollout_mesh_layout(mc, train, spec)
      gen = rl_programs.generate_program(
          mc, mesh, rollout_layout="inference" if layout == "auto" else layout, rollout_dtype="bfloat16",
          **{k: v for k, v in sizes.items() if k != "micro_batch_size"})
      jax.clear_caches()
      return facts(sp.compile_program(gen, mesh)) | {"mesh": dict(mesh.shape)}

    for name, spec in (("replicated", ""), ("rollout_mesh", cfg.rollout_mesh)):
      out[name] = compile_gen(spec)
    # Controls, the same compile with one piece of the layout removed:
    # (a) the KV cache constrained with its rows whole (kv heads still over tensor);
    real_cache = rules.constrain_kv_cache
    rules.constrain_kv_cache = lambda x: rules.with_logical_constraint(
        x, (None, None, "kv_heads", None, None)[5 - x.ndim:])
    try:
      out["control_cache"] = compile_gen(cfg.rollout_mesh)
    finally:
      rules.constrain_kv_cache = real_cache
    # (b) the LM head's logits left unconstrained (before they were vocabulary-parallel).
    real_head = transformer.logits_from_hidden
    def whole_vocab_head(params, config, hidden):
      w = transformer.lm_head_weight(params, config).astype(transformer.compute_dtype(config))
      return jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
    transformer.logits_from_hidden = whole_vocab_head
    try:
      out["control_head"] = compile_gen(cfg.rollout_mesh)
    finally:
      transformer.logits_from_hidden = real_head
    jax.clear_caches()
    out["bf16_weight_bytes"] = sum(x.size * 2 for x in jax.tree.leaves(
        jax.eval_shape(lambda k: init_params(mc, k), jax.random.PRNGKey(0))))

    # 2. A tiny model: the copy on data:4 x tensor:2 samples what the replicated copy samples.
    tiny = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
    masters = placement.shard_params(init_params(tiny, jax.random.PRNGKey(0)), tiny, train)
    tokens = np.random.RandomState(0).randint(1, 96, (8, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    res = {}
    for name, spec in (("replicated", ""), ("tensor", "data:4,fsdp:1,tensor:2")):
      mesh, layout = inference.rollout_mesh_layout(tiny, train, spec)
      copy = inference.rollout_params(masters, tiny, mesh, layout=layout)
      out[name + "_mesh"] = dict(mesh_lib.mesh_of(copy).shape)
      g = sampling.generate(copy, tiny, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=16,
                            temperature=1.0, num_samples=2)
      res[name] = (np.asarray(g.tokens), np.asarray(g.logprobs))
    out["same_tokens"] = bool((res["replicated"][0] == res["tensor"][0]).all())
    out["logp_max_diff"] = float(np.abs(res["replicated"][1] - res["tensor"][1]).max())

    # 3. The Pallas GPU decode kernel (interpreted) in the sampler on that tensor-parallel copy:
    # the tokens of the XLA decode path (2.), and every pallas_call inside a shard_map whose
    # operands are one shard's rows and kv heads (16 prompt slots + 16 new: a 32-slot cache).
    def pallas_sites(jaxpr, shard_inputs=None, acc=None):
      acc = [] if acc is None else acc
      for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
          acc.append(shard_inputs)
        for sub in jex_core.jaxprs_in_params(eqn.params):
          inner = ([list(v.aval.shape) for v in sub.invars] if eqn.primitive.name == "shard_map"
                   else shard_inputs)
          pallas_sites(sub, inner, acc)
      return acc

    calls = []
    real_gen = sampling_static._generate_jit
    def spy(*a, **k):
      calls.append((a, k))
      return real_gen(*a, **k)

    mesh, layout = inference.rollout_mesh_layout(tiny, train, "data:4,fsdp:1,tensor:2")
    copy = inference.rollout_params(masters, tiny, mesh, layout=layout)
    os.environ["JAXRL_DECODE_ATTENTION"] = "pallas"
    jax.clear_caches()
    sampling_static._generate_jit = spy  # the static sampler looks it up in its own module
    try:
      g = sampling.generate(copy, tiny, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=16,
                            temperature=1.0, num_samples=2)
      a, k = calls[-1]
      with mesh_lib.use_mesh(mesh):
        psites = pallas_sites(jax.make_jaxpr(functools.partial(real_gen, **k))(*a).jaxpr)
        real_shard = rules.shard_kernel   # control: the bare kernel on the same operands
        rules.shard_kernel = lambda fn, *a_, **k_: fn
        jax.clear_caches()
        try:
          bare_sites = pallas_sites(jax.make_jaxpr(functools.partial(real_gen, **k))(*a).jaxpr)
        finally:
          rules.shard_kernel = real_shard
    finally:
      sampling_static._generate_jit = real_gen
      del os.environ["JAXRL_DECODE_ATTENTION"]
    jax.clear_caches()
    xt, xl = res["tensor"]   # the XLA decode path on the same copy, same key (above)
    pt, pl = np.asarray(g.tokens), np.asarray(g.logprobs)
    out["pallas"] = {"same_tokens": bool((xt == pt).all()), "distinct_rows": len({tuple(r) for r in xt}),
                     "logp_max_diff": float(np.abs(xl - pl).max()),
                     "sites": psites, "bare_sites": bare_sites,
                     "rows": int(tokens.shape[0] * 2), "heads": tiny.num_heads,
                     "kv_heads": tiny.num_kv_heads, "head_dim": tiny.head_dim}
    try:  # a tensor size that does not divide the kv heads is refused before any work
      inference.rollout_mesh_layout(tiny, train, "data:2,tensor:4")
    except ValueError as e:
      out["refused"] = str(e)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def worker():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAXRL_DECODE_ATTENTION", None)
  proc = subprocess.run([sys.executable, "-c", _WORKER, FLAGS], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split("RESULT ", 1)[1])


def weights_per_device_problems(out, name, split):
  """The sampler's arguments on `name` are not 1/split of the bf16 weights (norm scales are
  replicated: < 0.1% here; prompts and keys are a few KiB)."""
  w, got = out["bf16_weight_bytes"], out[name]["argument_bytes"]
  return [] if w / split <= got < 1.01 * w / split else [f"{name}: {got} bytes, expected {w / split:.0f}"]


def kv_cache_problems(out, name, rows_split, kv_split):
  """Per-device KV cache of the compiled sampler is not 1/8 of the whole: the per-layer cache
  [B*n / rows_split, K / kv_split, S, hd] must exist and no cache-shaped array ([.., rows, K', T,
  hd], T the prompt or the full length) may hold more than 1/8 of the whole cache's rows x kv
  heads (B*n x K)."""
  s, m = out["sizes"], out["model"]
  bn, k, hd = s["batch_size"], m["num_kv_heads"], m["head_dim"]
  lengths = (s["prompt_len"], s["prompt_len"] + s["response_len"])
  shapes = [(t, tuple(d)) for t, d in out[name]["shapes"]]
  full = lengths[1]
  local = (bn // rows_split, k // kv_split, full, hd)
  problems = []
  if not any(d == local for _, d in shapes):
    problems.append(f"{name}: no per-layer cache of the per-device shape {local}")
  for t, d in shapes:
    if len(d) in (4, 5) and d[-1] == hd and d[-2] in lengths and d[-4] * d[-3] > bn * k // 8:
      problems.append(f"{name}: {t}{list(d)} holds {d[-4] * d[-3]} of {bn * k} cache rows x kv heads")
  return problems


def collective_problems(out, name):
  """Collectives of the compiled sampler outside the allowed list. Allowed (rows r per device,
  D the width, V the vocabulary, t the tensor size):
    * all-reduce over t devices of [r, (T,) D] activations: the row-parallel o_proj / down_proj
      outputs and the vocabulary-parallel embedding lookup (Megatron);
    * all-gather over t devices of f32 logits [r, V] (or [prompts, n, V]): the vocabulary-parallel
      LM head's output, once per step and once after the prompt pass;
    * all-reduce of a scalar: the loop's all-rows-finished test.
  Everything else is refused, in particular any collective with a weight shape (D with the MLP
  width, the vocabulary or a projection width): on the rollout copy the weights never move."""
  m = out["model"]
  d, v = m["hidden_size"], m["vocab_size"]
  t = out[name]["mesh"]["tensor"]
  bad = []
  for kind, shapes, group, _ in out[name]["collectives"]:
    ok = all(
        (len(x) == 0)
        or (kind == "all-reduce" and group == t > 1 and x[-1] == d and len(x) in (2, 3)
            and v not in x and m["intermediate_size"] not in x)
        or (kind == "all-gather" and group == t > 1 and x[-1] == v and d not in x and len(x) in (2, 3))
        for x in shapes)
    if not ok:
      bad.append((kind, shapes, group))
  return bad


def test_rollout_mesh_copy_holds_a_quarter_of_the_weights_which_never_move(worker):
  out = worker
  # Replicated: every device holds the whole bf16 copy; data:2 x tensor:4: a quarter of it.
  assert weights_per_device_problems(out, "replicated", 1) == []
  assert weights_per_device_problems(out, "rollout_mesh", 4) == []
  assert out["rollout_mesh"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
  assert out["replicated"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # ... and the decode loop moves no weights: only the allowed collectives are there, and the
  # allowed ones are (2 row-parallel projections x 2 layers + the embedding, the logits gather).
  assert collective_problems(out, "replicated") == []
  assert collective_problems(out, "rollout_mesh") == []
  in_loop = [(k, s) for k, s, _, loop in out["rollout_mesh"]["collectives"] if loop]
  assert sum(k == "all-gather" for k, _ in in_loop) >= 1, in_loop
  assert sum(k == "all-reduce" and len(s[0]) >= 2 for k, s in in_loop) >= 5, in_loop
  # Controls: the replicated copy is not a quarter per device; with the LM head's logits
  # unconstrained GSPMD all-gathers the vocabulary-split [D, V] weight instead of the logits
  # (the whole head on every device, hoisted out of the decode loop).
  assert weights_per_device_problems(out, "replicated", 4)
  m = out["model"]
  bad = collective_problems(out, "control_head")
  assert any(k == "all-gather" and [m["hidden_size"], m["vocab_size"]] in s for k, s, _ in bad), bad
  # The copy's per-device share shows in the temporaries too: the gathered head costs >= its
  # bf16 size there.
  head = m["hidden_size"] * m["vocab_size"] * 2
  assert out["control_head"]["temp_bytes"] - out["rollout_mesh"]["temp_bytes"] >= head


def test_sampler_kv_cache_is_an_eighth_per_device_on_both_meshes(worker):
  out = worker
  assert kv_cache_problems(out, "replicated", 8, 1) == []     # fsdp:8: rows / 8, kv heads whole
  assert kv_cache_problems(out, "rollout_mesh", 2, 4) == []   # data:2 x tensor:4: rows / 2, heads / 4
  # The prompt pass fills a cache of the prompts' rows at their 32 slots only (16 prompts over
  # data:2); each sample's full-length rows are made from it, no prompt row exists at full length.
  s, m = out["sizes"], out["model"]
  prompt_rows = s["batch_size"] // s["num_samples"] // 2
  dims = [tuple(d) for _, d in out["rollout_mesh"]["shapes"]]
  assert any(d[-4:] == (prompt_rows, 1, s["prompt_len"], m["head_dim"]) for d in dims)
  full = s["prompt_len"] + s["response_len"]
  assert not any(d[-4:] == (prompt_rows, 1, full, m["head_dim"]) for d in dims)
  # Control: the same compile with the cache's rows left whole (kv heads still over tensor).
  bad = kv_cache_problems(out, "control_cache", 2, 4)
  assert any("holds 64 of 256" in b for b in bad), bad


def test_rollout_mesh_copy_samples_the_replicated_copys_tokens(worker):
  out = worker
  assert out["tensor_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert out["replicated_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert out["same_tokens"] and out["logp_max_diff"] < 1e-4, out
  assert "tensor=4 does not divide" in out["refused"] and "kv heads=2" in out["refused"]


def test_pallas_decode_in_the_sampler_runs_per_shard_on_the_tensor_parallel_copy(worker):
  p = worker["pallas"]
  assert p["distinct_rows"] > 1
  assert p["same_tokens"] and p["logp_max_diff"] < 1e-4, p
  # One pallas_call per layer, each inside a shard_map over rows (data:4) and kv heads
  # (tensor:2): q [rows / 4, H / 2, hd], cache [rows / 4, K / 2, S, hd].
  rows, h, k, hd = p["rows"] // 4, p["heads"] // 2, p["kv_heads"] // 2, p["head_dim"]
  assert len(p["sites"]) >= 2
  for site in p["sites"]:
    assert site is not None, p["sites"]
    assert site[0] == [rows, h, hd] and site[1][:2] == [rows, k] and site[1][3] == hd, site
  # Control: the bare kernel (no shard_map) on the same sharded operands.
  assert p["bare_sites"] and all(s is None for s in p["bare_sites"])
