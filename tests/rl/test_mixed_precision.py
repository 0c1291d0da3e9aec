"""Mixed precision: float32 master parameters, gradients, accumulation and
AdamW states, compute in bfloat16. At PRIME's lr 5e-7, ten AdamW steps must move >= 99% of the
weights and track an all-float32 run; with bfloat16 parameters the same steps round away."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import models
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import load, state as state_lib, steps

TINY = dict(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
            num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,), pad_token_id=0)
B, P, R = 8, 4, 6


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.permutation(np.arange(B * (P + R)) % TINY["vocab_size"]).reshape(B, P + R)  # every id
  return {"tokens": jnp.asarray(tokens, jnp.int32), "attention_mask": jnp.ones((B, P + R), jnp.int32),
          "response_mask": jnp.ones((B, R), jnp.float32),
          "advantages": jnp.asarray(rng.normal(size=(B, R)), jnp.float32)}


def _ten_steps(param_dtype, dtype, mu_dtype=None):
  mc = models.ModelConfig(**TINY, param_dtype=param_dtype, dtype=dtype)
  p0 = models.init_params(models.ModelConfig(**TINY), jax.random.PRNGKey(0))  # same f32 init
  p0 = jax.tree.map(lambda x: x.astype(param_dtype), p0)
  batch = _batch()
  batch["old_logp"] = jax.lax.stop_gradient(
      steps.response_logprobs(p0, mc, batch["tokens"], batch["attention_mask"], R, False)[0])
  opt = state_lib.make_optimizer(5e-7, weight_decay=0.01, grad_clip=1.0, mu_dtype=mu_dtype)
  update = jax.jit(steps.make_policy_update(mc, opt, config_lib.PolicyConfig(entropy_coeff=0.0),
                                    mini_batch_size=B, micro_batch_size=4, shuffle=False), donate_argnums=(0,))
  st = state_lib.init_train_state(jax.tree.map(jnp.copy, p0), opt)
  for i in range(10):
    st, _ = update(st, batch, jax.random.PRNGKey(i))
  flat = lambda t: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])
  return flat(p0), flat(st.params), st


def test_bf16_compute_with_f32_master_weights_trains_at_small_lr():
  p0, p_f32, _ = _ten_steps("float32", "float32")
  q0, p_mix, st = _ten_steps("float32", "bfloat16")
  np.testing.assert_array_equal(p0, q0)
  d32, dmix = p_f32 - p0, p_mix - q0
  assert np.mean(dmix != 0) >= 0.99, np.mean(dmix != 0)
  assert np.mean(d32 != 0) >= 0.99
  cos = float(d32 @ dmix / (np.linalg.norm(d32) * np.linalg.norm(dmix)))
  assert cos > 0.9, cos  # the bf16-compute run tracks the all-f32 run
  assert abs(np.linalg.norm(dmix) / np.linalg.norm(d32) - 1) < 0.2
  for x in jax.tree.leaves((st.params, st.opt_state)):
    assert x.dtype in (jnp.float32, jnp.int32), x.dtype  # master weights and AdamW states in f32
  # bfloat16 parameters: the same steps are below half an ulp of most weights and vanish.
  b0, p_bf16, _ = _ten_steps("bfloat16", "bfloat16")
  assert np.mean((p_bf16 - b0) != 0) < 0.5


def test_bf16_first_moment_option_and_run_config():
  _, _, st = _ten_steps("float32", "bfloat16", mu_dtype=jnp.bfloat16)
  dtypes = {x.dtype for x in jax.tree.leaves(st.opt_state) if x.ndim}
  assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # mu bf16, nu f32
  cfg = config_lib.replace(config_lib.RunConfig(), dtype="bfloat16", moments_dtype="bfloat16")
  assert load.dtype_overrides(cfg)["param_dtype"] == "float32"
  assert load.dtype_overrides(cfg)["dtype"] == "bfloat16"
