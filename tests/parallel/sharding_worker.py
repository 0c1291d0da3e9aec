"""Subprocess worker for tests/parallel/test_sharding.py and tests/parallel/test_multiprocess.py.

Runs with simulated CPU devices (the parent sets XLA_FLAGS=--xla_force_host_platform_device_count=N
before this process imports jax), computes the same tiny-model workload on several meshes and
writes the results as JSON. Modes:

  equivalence OUT            8 devices: forward logits, token_logprobs, greedy generate, one PRM
                             update and one PPO policy step on meshes data x fsdp x tensor =
                             1x1x1, 8x1x1, 2x4x1, 2x2x2, 1x4x2; max |diff| vs 1x1x1, plus per-device
                             parameter / optimizer bytes measured from addressable shards.
  single OUT                 8 devices, one process: the multi-process workload on mesh 2x2x2.
  multi OUT --process-id I --num-processes 2 --port P --ckpt-dir D
                             one of 2 processes x 4 devices (jax.distributed + gloo): same
                             workload, then an Orbax save / restore across both processes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

MESHES = ("data:1,fsdp:1,tensor:1", "data:8,fsdp:1,tensor:1", "data:2,fsdp:4,tensor:1",
          "data:2,fsdp:2,tensor:2", "data:1,fsdp:4,tensor:2")
MULTI_MESH = "data:2,fsdp:2,tensor:2"

B, P_LEN, R_LEN = 8, 8, 8   # rows, prompt length, response length
NEW_TOKENS = 6
BETA = 0.05
LR = 1e-4


def tiny_config():
  from jaxrl_dense.models.config import ModelConfig
  # Every sharded dimension divides 8: vocab 128, hidden 32, heads 4, kv heads 2, mlp 64.
  return ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                     attention_bias=True, max_position_embeddings=64, eos_token_ids=(1,),
                     pad_token_id=0)


def host_data():
  """Deterministic numpy batch (identical in every process)."""
  rs = np.random.RandomState(0)
  tokens = rs.randint(2, 128, size=(B, P_LEN + R_LEN)).astype(np.int32)  # [B, P+R]
  attn = np.ones((B, P_LEN + R_LEN), np.int32)
  for i in range(B):                      # left-padded prompts of different lengths
    pad = i % 4
    tokens[i, :pad] = 0
    attn[i, :pad] = 0
  rmask = np.ones((B, R_LEN), np.float32)  # right-padded responses
  for i in range(B):
    cut = R_LEN - (i % 3)
    rmask[i, cut:] = 0
    attn[i, P_LEN + cut:] = 0
    tokens[i, P_LEN + cut:] = 0
  return {
      "tokens": tokens,
      "attention_mask": attn,
      "response_mask": rmask,
      "acc": (np.arange(B) % 2).astype(np.float32),                       # [B]
      "advantages": rs.normal(size=(B, R_LEN)).astype(np.float32),          # [B, R]
      "logp_shift": (0.1 * rs.normal(size=(B, R_LEN))).astype(np.float32),  # old = current + shift
  }


def build_fns(config, grad_shardings=None):
  """Jittable pure functions of the workload; `grad_shardings` pins gradients to the params' layout."""
  import jax
  from jaxrl_dense.parallel import placement
  import jax.numpy as jnp
  import optax
  from jaxrl_dense.models.transformer import forward
  from jaxrl_dense.models.logprobs import token_logprobs

  # eps = 1 keeps the step linear in the gradients: with Adam's usual eps, one step from zero
  # moments is lr * g / (|g| + 1e-8) ~ lr * sign(g), so float32 noise on near-zero gradients
  # (sharded sums run in another order) becomes a full +-lr step and parameters compared after
  # it are ill-conditioned. The Adam moments, whose sharding the test checks, are still there.
  optimizer = optax.adamw(LR, eps=1.0, weight_decay=0.01)

  def response_logp(params, batch):
    lp = token_logprobs(params, config, batch["tokens"], batch["attention_mask"])  # [B, P+R]
    return lp[:, -R_LEN:]  # [B, R]

  def prm_loss(prm_params, ref_params, batch):
    """CE on sigmoid(beta * sum_t m_t (log pi_prm - log pi_ref)) (veRL recipe `compute_ce_dpo_loss_rm`)."""
    m = batch["response_mask"]
    q = response_logp(prm_params, batch) - jax.lax.stop_gradient(response_logp(ref_params, batch))
    z = BETA * jnp.sum(q * m, axis=-1)  # [B]
    acc = batch["acc"]
    return -jnp.mean(acc * jax.nn.log_sigmoid(z) + (1 - acc) * jax.nn.log_sigmoid(-z))

  def ppo_loss(params, batch, old_logp):
    """Token-mean PPO-clip loss (eps 0.2)."""
    m = batch["response_mask"]
    logp = response_logp(params, batch)  # [B, R]
    ratio = jnp.exp(logp - old_logp)
    adv = batch["advantages"]
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)  # [B, R]
    return jnp.sum(pg * m) / jnp.maximum(jnp.sum(m), 1.0)

  def prm_step(prm_params, opt_state, ref_params, batch):
    loss, grads = jax.value_and_grad(prm_loss)(prm_params, ref_params, batch)
    grads = placement.constrain(grads, grad_shardings)
    updates, opt_state = optimizer.update(grads, opt_state, prm_params)
    return optax.apply_updates(prm_params, updates), opt_state, loss, updates

  def policy_step(params, opt_state, batch):
    old_logp = jax.lax.stop_gradient(response_logp(params, batch)) + batch["logp_shift"]
    loss, grads = jax.value_and_grad(ppo_loss)(params, batch, old_logp)
    grads = placement.constrain(grads, grad_shardings)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, updates

  return optimizer, forward, token_logprobs, prm_step, policy_step


def run_workload(mesh, config, params_host, prm_host, data, *, with_generate=True):
  """Everything on one mesh; returns (host numpy results, sharding facts, (new params, opt state)).

  forward, token_logprobs, the PRM step and the policy step are one jitted program (one XLA
  compile per mesh keeps the test fast); greedy generate is its own jitted call.
  """
  import jax
  import jax.numpy as jnp
  from jaxrl_dense.parallel import rules, placement, inspect

  ps = rules.param_shardings(params_host, config, mesh)
  optimizer, forward, token_logprobs, prm_step, policy_step = build_fns(config, ps)
  params = placement.shard_params(params_host, config, mesh)
  prm = placement.shard_params(prm_host, config, mesh)
  batch = placement.shard_batch(data, mesh)
  pol_opt = placement.sharded_opt_init(optimizer, params, mesh)
  prm_opt = placement.sharded_opt_init(optimizer, prm, mesh)
  opt_sh = placement.opt_state_shardings(prm_opt, params_host, mesh, param_sharding_tree=ps)
  rep = placement.replicated(mesh)
  flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])

  def workload(params, pol_opt, prm, prm_opt, batch):
    logits = forward(params, config, batch["tokens"], batch["attention_mask"])  # [B, T, V]
    logp = token_logprobs(params, config, batch["tokens"], batch["attention_mask"])  # [B, T]
    new_prm, new_prm_opt, prm_loss, prm_updates = prm_step(prm, prm_opt, params, batch)
    new_params, new_pol_opt, pol_loss, pol_updates = policy_step(params, pol_opt, batch)
    # The optimizer steps in units of the learning rate: O(|g|) per element (eps = 1), so a wrong
    # gradient shows at its own size and float32 noise stays at its own size too.
    report = {"logits": logits, "logprobs": logp, "prm_loss": prm_loss,
              "prm_step": flat(prm_updates) / LR,
              "policy_loss": pol_loss, "policy_step": flat(pol_updates) / LR}
    return report, (new_params, new_pol_opt), (new_prm, new_prm_opt)

  fn = jax.jit(workload, out_shardings=(rep, (ps, opt_sh), (ps, opt_sh)))
  t0 = time.perf_counter()
  report, (new_params, new_pol_opt), (new_prm, new_prm_opt) = fn(params, pol_opt, prm, prm_opt, batch)
  # `report` is fully replicated: every process reads its own copy.
  out = {k: np.asarray(v.addressable_data(0)) for k, v in report.items()}

  if with_generate:
    from jaxrl_dense.sampling import generate
    prompt = placement.shard_batch({"t": data["tokens"][:, :P_LEN], "m": data["attention_mask"][:, :P_LEN]}, mesh)
    gen = generate(params, config, prompt["t"], prompt["m"], jax.random.PRNGKey(0),
                   max_new_tokens=NEW_TOKENS, temperature=0.0, eos_ids=config.eos_token_ids)
    out["gen_tokens"] = np.asarray(gen.tokens)
    out["gen_logprobs"] = np.asarray(gen.logprobs)
  out["_seconds"] = time.perf_counter() - t0

  # Sharding facts: the outputs kept the FSDP/TP layout, bytes per device from the shards.
  facts = {
      "params_keep_sharding": all(
          a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(new_params), jax.tree.leaves(ps))),
      "param_bytes_total": int(sum(x.nbytes for x in jax.tree.leaves(params_host))),
      "param_bytes_per_device": {str(k): v for k, v in inspect.addressable_bytes(params).items()},
      "opt_bytes_total": int(sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(prm_opt))),
      "opt_bytes_per_device": {str(k): v for k, v in inspect.addressable_bytes(new_prm_opt).items()},
      # What the PartitionSpecs promise: each leaf's bytes / product of the mesh axes it uses.
      "expected_param_bytes_per_device": int(sum(
          x.nbytes // int(np.prod([mesh.shape[a] for e in s.spec if e is not None
                                   for a in (e if isinstance(e, tuple) else (e,))]))
          for x, s in zip(jax.tree.leaves(params_host), jax.tree.leaves(ps)))),
      "replicated_param_bytes": int(sum(
          x.nbytes for x, s in zip(jax.tree.leaves(params_host), jax.tree.leaves(ps))
          if s.is_fully_replicated)),
      "specs": {jax.tree_util.keystr(p): str(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(ps)[0]},
  }
  return out, facts, (new_params, new_pol_opt)


def init_host(config):
  import jax
  from jaxrl_dense.models.transformer import init_params
  init = jax.jit(init_params, static_argnums=0)
  with jax.default_device(jax.local_devices()[0]):
    params = jax.tree.map(np.asarray, init(config, jax.random.PRNGKey(0)))
    prm = jax.tree.map(np.asarray, init(config, jax.random.PRNGKey(1)))
  return params, prm


def mode_equivalence(args):
  import jax
  from jaxrl_dense.parallel import mesh as mesh_lib, placement
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config()
  params, prm = init_host(config)
  data = host_data()
  results, facts = {}, {}
  base = None
  meshes = args.meshes.split(";") if args.meshes else MESHES
  if meshes[0] != MESHES[0]:
    meshes = [MESHES[0]] + list(meshes)   # the 1x1x1 reference always comes first
  for spec in meshes:
    devices = jax.devices()[:1] if spec == MESHES[0] else None
    mesh = mesh_lib.make_mesh(spec, devices=devices)
    out, fact, _ = run_workload(mesh, config, params, prm, data)
    if base is None:
      base = out
    diffs = {k: float(np.max(np.abs(out[k].astype(np.float64) - base[k].astype(np.float64))))
             for k in out if not k.startswith("_")}
    results[spec] = {"max_abs_diff": diffs, "seconds": out["_seconds"]}
    facts[spec] = fact
  # Error messages that need a real multi-device mesh.
  errors = {}
  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  for name, fn in [("batch", lambda: placement.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)),
                   ("mesh", lambda: mesh_lib.make_mesh("data:3,fsdp:1,tensor:1")),
                   ("params", lambda: placement.shard_params(params, config, mesh_lib.make_mesh("tensor:8")))]:
    try:
      fn()
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)
  summary = {
      "results": results, "facts": facts, "errors": errors,
      "base_values": {"prm_loss": float(base["prm_loss"]), "policy_loss": float(base["policy_loss"]),
                      "gen_tokens": base["gen_tokens"].tolist(),
                      "logits_absmax": float(np.abs(base["logits"]).max())},
  }
  with open(args.out, "w") as f:
    json.dump(summary, f)


def mode_single_or_multi(args):
  import jax
  from jaxrl_dense.parallel import mesh as mesh_lib, placement
  if args.mode == "multi":
    # Through the environment, as a launcher would set it (mesh.initialize_distributed).
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
                      JAX_NUM_PROCESSES=str(args.num_processes), JAX_PROCESS_ID=str(args.process_id))
    assert mesh_lib.initialize_distributed()
  assert jax.device_count() == 8, (jax.device_count(), jax.local_device_count())
  config = tiny_config()
  params, prm = init_host(config)
  data = host_data()
  mesh = mesh_lib.make_mesh(MULTI_MESH)
  out, fact, (new_params, new_opt) = run_workload(mesh, config, params, prm, data, with_generate=False)
  summary = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}
  summary["process_count"] = jax.process_count()
  summary["local_devices"] = jax.local_device_count()
  summary["param_bytes_per_device"] = fact["param_bytes_per_device"]
  # The sampler's host-side prompt checks see the whole global batch in every process: prompt
  # row 5 (on process 1's devices in the 2-process run) has no token; it must raise everywhere.
  from jaxrl_dense.sampling import generate
  bad_mask = data["attention_mask"][:, :P_LEN].copy()
  bad_mask[5] = 0
  bad = placement.shard_batch({"t": data["tokens"][:, :P_LEN], "m": bad_mask}, mesh)
  try:
    generate(new_params, config, bad["t"], bad["m"], jax.random.PRNGKey(0), max_new_tokens=2)
    summary["sampler_bad_prompt_error"] = None
  except ValueError as e:
    summary["sampler_bad_prompt_error"] = str(e)

  if args.mode == "multi" and args.ckpt_dir:
    import orbax.checkpoint as ocp
    state = {"params": new_params, "opt_state": new_opt}
    path = os.path.join(os.path.abspath(args.ckpt_dir), "step_1")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckptr.restore(path, abstract)
    same = jax.tree.map(
        lambda a, b: bool(jax.jit(lambda x, y: (x == y).all(), out_shardings=placement.replicated(mesh))(a, b)
                          .addressable_data(0)), state, restored)
    summary["ckpt_equal"] = all(jax.tree.leaves(same))
    summary["ckpt_sharding_kept"] = all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    summary["ckpt_local_shards"] = len(jax.tree.leaves(restored)[0].addressable_shards)
    ckptr.close()

  if args.mode == "single" or jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump(summary, f)
  if args.mode == "multi":
    jax.distributed.shutdown()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("mode", choices=["equivalence", "single", "multi"])
  ap.add_argument("out")
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--ckpt-dir", default="")
  ap.add_argument("--meshes", default="", help="';'-separated mesh specs (equivalence mode)")
  args = ap.parse_args()
  if args.mode == "equivalence":
    mode_equivalence(args)
  else:
    mode_single_or_multi(args)


if __name__ == "__main__":
  main()
