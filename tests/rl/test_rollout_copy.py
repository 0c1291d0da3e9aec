"""The rollout samples from a compute-dtype copy of the policy in the decode layout:
the trainer hands `rollout.collect` the copy made by `inference.rollout_params` (bf16
matrices with --dtype=bfloat16, not the float32 masters), the samples are the ones the masters
give, and the memory plan compiles the sampler on the same copy."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense.parallel import mesh as mesh_lib, inference
from jaxrl_dense.models import config as mc_lib
from jaxrl_dense.models import transformer
from jaxrl_dense.rl import config as config_lib

SMOKE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.flags"


def test_rollout_params_cast_matrices_only_and_place_them():
  mc = mc_lib.ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
  params = transformer.init_params(mc, jax.random.PRNGKey(0))
  mesh = mesh_lib.make_mesh("data:1")
  copy = inference.rollout_params(params, mc, mesh, dtype="bfloat16")
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(copy)):
    assert y.dtype == (jnp.bfloat16 if x.ndim >= 2 else x.dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x.astype(y.dtype), np.float32))
  same = inference.rollout_params(params, mc, mesh, dtype="float32")
  assert all(y.dtype == x.dtype for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(same)))
  assert isinstance(inference.rollout_params({"lora": {}, "base": 1}, mc, mesh, dtype="bfloat16"), dict)


def test_trainer_samples_from_the_bf16_copy_and_gets_the_masters_samples():
  from jaxrl_dense.rl import rollout
  from jaxrl_dense.rl.trainer import Trainer
  cfg = config_lib.replace(config_lib.from_args([f"--flagfile={SMOKE}"]), eval_data="", steps=1,
                           dtype="bfloat16")
  run = Trainer(cfg)
  seen = {}
  real = rollout.collect

  def spy(*a, **k):
    seen["args"], seen["kwargs"] = a, k
    return real(*a, **k)

  rollout.collect = spy
  try:
    masters = run.policy_params()
    dtypes = {x.dtype for x in jax.tree.leaves(run.rollout_params()) if x.ndim >= 2}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(masters)} == {jnp.dtype(jnp.float32)}
    # collect as the trainer calls it, then the same call on the float32 masters
    records = rollout.first_round_records(run.prompt_buffer, run.iterator.next_batch,
                                          cfg.prime.rollout.prompts_per_step * cfg.prime.rollout.oversample)
    key = jax.random.PRNGKey(11)
    a, _ = real(run.rollout_params(), run.model_config, run.tokenizer, run.encoder, records, key,
                cfg.prime, run.verifier, next_records=run.iterator.next_batch)
    b, _ = real(masters, run.model_config, run.tokenizer, run.encoder, records, key, cfg.prime,
                run.verifier, next_records=run.iterator.next_batch)
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    # same values in every matmul; XLA may fuse the casts differently (1 float32 ulp seen)
    np.testing.assert_allclose(a.sampler_logp, b.sampler_logp, rtol=1e-6, atol=1e-6)
    made = []   # the copy is made once per rollout (one train step here)
    real_copy = inference.rollout_params
    inference.rollout_params = lambda *a, **k: made.append(1) or real_copy(*a, **k)
    try:
      run.train_step()
    finally:
      inference.rollout_params = real_copy
    assert len(made) == 1, len(made)
    assert {x.dtype for x in jax.tree.leaves(seen["args"][0]) if x.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
  finally:
    rollout.collect = real
    run.close()
