"""Subprocess worker for tests/parallel/test_layout.py: compile the RL step's programs on 8 simulated devices.

The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before this process imports
jax. For each mesh (a 1-device baseline first) it builds the programs of one step with
`rl.programs.rl_step_programs` (generate, and the production update's stages scoring, PRM update,
policy update, and the whole update) from abstract inputs, compiles them with
`plan.memory_plan`, then runs the compiled executables on the same real inputs placed with the
programs' shardings. It writes, under OUTDIR:

  out.json               {"config", "sizes", "meshes": {spec: {"plan", "inputs", "values_diff",
                          "value_norms", "update_values_diff"}}}
  <mesh>/<program>.hlo   the partitioned HLO of each program (read by the test's HLO checks)
  fsdp:8/scoring_unconstrained.hlo   control: scoring traced outside the mesh context

usage: tests/parallel/layout_worker.py OUTDIR MESH [MESH ...]
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


import jax
import jax.numpy as jnp

from jaxrl_dense.parallel import mesh as mesh_lib, placement, inference
from jaxrl_dense.parallel import plan as plan_lib
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.rl import prime, programs as rl_programs
from jaxrl_dense.rl.batch import RolloutBatch
from jaxrl_dense.rl.state import TrainState
from jaxrl_dense.models.transformer import init_params

# Tiny Qwen2-shaped model; sizes chosen distinct so HLO shapes can be told apart:
# D=64, I=96, V=128, L=2, H=4 x hd 10, K=2 kv heads; P=6 prompt + R=12 response = T=18 tokens;
# 16 rows (8 prompts x 2 samples), micro-batches of 8 rows.
CONFIG = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=10,
                     tie_word_embeddings=False, attention_bias=True, eos_token_ids=())
SIZES = dict(batch_size=16, prompt_len=6, response_len=12, micro_batch_size=8, mini_batch_size=16,
             num_samples=2)
# The step's PrimeConfig: the sizes above, learning rates large enough that one step visibly
# moves the weights.
PRIME = rl_programs.step_config(**SIZES, lr=1e-3, prm_lr=1e-3)


def real_inputs(seed: int = 0):
  """Concrete params and a batch with left-padded prompts / right-padded responses."""
  rng = np.random.default_rng(seed)
  b, p, r = SIZES["batch_size"], SIZES["prompt_len"], SIZES["response_len"]
  params = [init_params(CONFIG, jax.random.PRNGKey(i)) for i in range(3)]
  plen = rng.integers(2, p + 1, size=b)
  rlen = rng.integers(1, r + 1, size=b)
  tokens = rng.integers(1, CONFIG.vocab_size, size=(b, p + r)).astype(np.int32)
  attn = np.zeros((b, p + r), np.int32)
  for i in range(b):
    attn[i, p - plen[i]:p] = 1
    attn[i, p:p + rlen[i]] = 1
  rmask = attn[:, p:].astype(np.float32)
  batch = {"tokens": np.where(attn > 0, tokens, 0).astype(np.int32), "attention_mask": attn,
           "response_mask": rmask,
           "acc": rng.integers(0, 2, size=b).astype(np.float32),
           "ref_logp": (-rng.uniform(0.5, 6.0, size=(b, r)) * rmask).astype(np.float32),
           "old_logp": (-rng.uniform(0.5, 6.0, size=(b, r)) * rmask).astype(np.float32),
           "advantages": (rng.normal(size=(b, r)) * rmask).astype(np.float32)}
  n_prompts = b // SIZES["num_samples"]
  prompts = {"tokens": batch["tokens"][:n_prompts, :p], "mask": attn[:n_prompts, :p]}
  return params, batch, prompts


def place(value, abstract_value):
  """`value` (a pytree of numpy / jax arrays) placed like the abstract argument (in its dtype)."""
  return jax.tree.map(lambda v, a: placement.device_put(np.asarray(v).astype(a.dtype), a.sharding), value,
                      abstract_value)


def rollout_batch(batch, abstract_batch):
  """The real batch as a RolloutBatch with the abstract batch's fields (the rollout's: the
  prompt / response split of tokens and masks, acc, sampler log-probs, in-band weights; and
  old_logp / ref_logp / advantages / returns where the stage receives them)."""
  p = SIZES["prompt_len"]
  tokens, attn = batch["tokens"], batch["attention_mask"]
  values = dict(prompt_tokens=tokens[:, :p], prompt_mask=attn[:, :p], response_tokens=tokens[:, p:],
                response_mask=batch["response_mask"], outcome=batch["acc"],
                sampler_logp=batch["old_logp"], in_band=np.ones_like(batch["acc"]),
                old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], prm_logp=batch["ref_logp"],
                advantages=batch["advantages"], returns=batch["advantages"])
  full = RolloutBatch(**{k: values[k] for k in RolloutBatch._fields if getattr(abstract_batch, k) is not None})
  return place(full, abstract_batch)


def main():
  outdir, specs = sys.argv[1], sys.argv[2:]
  os.makedirs(outdir, exist_ok=True)
  params, batch, prompts = real_inputs()
  results = {}
  base = None
  for spec in specs:
    t0 = time.time()
    devices = jax.devices()[:1] if spec == "data:1" else None
    mesh = mesh_lib.make_mesh(spec, devices=devices)
    programs = rl_programs.rl_step_programs(CONFIG, mesh, prime_config=PRIME, **SIZES)
    compiled = {}
    plan = plan_lib.memory_plan(CONFIG, mesh, programs, compiled=compiled)
    t_compile = time.time() - t0
    os.makedirs(os.path.join(outdir, spec), exist_ok=True)
    for name, exe in compiled.items():
      with open(os.path.join(outdir, spec, name + ".hlo"), "w") as f:
        f.write(exe.as_text())

    if spec == "fsdp:8":   # control: scoring traced WITHOUT the mesh context (no activation constraints)
      with open(os.path.join(outdir, spec, "scoring_unconstrained.hlo"), "w") as f:
        # The programs trace under their mesh (`mesh.with_mesh`); unwrap to the raw stage
        # and jit it without the context: GSPMD then follows the weights' layout alone.
        fn, args, kwargs = programs["scoring"]
        raw = fn.__wrapped__.__wrapped__
        control = plan_lib.Program(jax.jit(raw), args, kwargs)
        f.write(plan_lib.compile_program(control, None).as_text())
    inputs = {}
    for name, prog in programs.items():   # weights (params / state) first, then the batch
      batch_args = prog.args[1:3 if name == "generate" else 2]
      inputs[name] = {
          part: {"per_device": plan_lib.per_device_bytes(tree), "global": plan_lib.global_bytes(tree)}
          for part, tree in (("weights", prog.args[:1]), ("batch", batch_args))}
    gen_args = programs["generate"].args
    # The rollout copy, once, as the trainer makes it (inference.rollout_params): from the training layout.
    rollout = inference.rollout_params(placement.shard_params(params[0], CONFIG, mesh), CONFIG, mesh, dtype=CONFIG.dtype)
    assert all(x.sharding == a.sharding for x, a in zip(jax.tree.leaves(rollout),
                                                          jax.tree.leaves(gen_args[0])))
    key = jax.random.PRNGKey(7)
    outs = {}
    g = compiled["generate"](rollout, *place((prompts["tokens"], prompts["mask"]), gen_args[1:3]),
                             *place((key, np.float32(1.0), np.float32(1.0)), gen_args[3:6]))
    outs["gen_tokens"], outs["gen_logprobs"] = g.tokens, g.logprobs
    pol_opt, prm_opt = prime.optimizers(PRIME)
    sargs = programs["scoring"].args
    sc, entropy, _ = compiled["scoring"](
        place(prime.PrimeState(TrainState(params[0], None, None), None, params[1]), sargs[0]),
        rollout_batch(batch, sargs[1]))
    outs.update(score_old_logp=sc.old_logp, score_entropy=entropy, score_ref_logp=sc.ref_logp)
    pargs = programs["prm_update"].args
    state = place(prime.PrimeState(None, _train_state(params[2], prm_opt), None), pargs[0])
    st, pb, m = compiled["prm_update"](state, rollout_batch(batch, pargs[1]),
                                       place(jax.random.PRNGKey(0), pargs[2]))
    outs["prm_logp"], outs["prm_params"], outs["prm_loss"] = pb.prm_logp, st.params, m["prm/loss"]
    qargs = programs["policy_update"].args
    state = place(prime.PrimeState(_train_state(params[0], pol_opt), None, None), qargs[0])
    st, _, m = compiled["policy_update"](state, rollout_batch(batch, qargs[1]),
                                         place(jax.random.PRNGKey(3), qargs[2]))
    outs["policy_params"], outs["policy_loss"] = st.params, m["actor/loss"]
    uargs = programs["update"].args   # the whole production update (its state donated)
    state = place(prime.PrimeState(_train_state(params[0], pol_opt), _train_state(params[2], prm_opt),
                                   params[1]), uargs[0])
    st, m = compiled["update"](state, rollout_batch(batch, uargs[1]), place(jax.random.PRNGKey(3), uargs[2]))
    update_outs = {"policy_params": st.policy.params, "prm_params": st.prm.params,
                   "metrics": {k: m[k] for k in ("actor/loss", "prm/loss", "adv/mean", "kl_ref")}}
    to_host = lambda d: {k: [np.asarray(placement.to_host(x), np.float64) for x in jax.tree.leaves(v)]
                         for k, v in d.items()}
    host, update_host = to_host(outs), to_host(update_outs)
    if base is None:
      base = host, update_host
    diff = lambda h, b: {k: max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(h[k], b[k]))
                         for k in h}
    diffs, update_diffs = diff(host, base[0]), diff(update_host, base[1])
    norms = {k: float(sum(np.sum(np.abs(a)) for a in v)) for k, v in host.items()}
    results[spec] = {"plan": plan, "inputs": inputs, "values_diff": diffs, "value_norms": norms,
                     "update_values_diff": update_diffs,
                     "gen_tokens": np.asarray(host["gen_tokens"][0]).astype(int).tolist(),
                     "seconds": {"compile": round(t_compile, 1), "total": round(time.time() - t0, 1)}}
    print(spec, results[spec]["seconds"], flush=True)
  with open(os.path.join(outdir, "out.json"), "w") as f:
    json.dump({"config": json.loads(CONFIG.to_json()), "sizes": SIZES, "meshes": results}, f)


def _train_state(params, optimizer):
  """A TrainState of host arrays (placed by `place`)."""
  return jax.tree.map(np.asarray, TrainState(params=params, opt_state=optimizer.init(params),
                                             step=jnp.zeros((), jnp.int32)))


if __name__ == "__main__":
  main()
