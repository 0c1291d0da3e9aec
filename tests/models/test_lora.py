"""LoRA adapters (models/lora.py): exact base at init, frozen base, merge, reference, sampler, sharding."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_dense import sampling
from jaxrl_dense.parallel import rules
from jaxrl_dense.models import ModelConfig, init_params, lora, token_logprobs, transformer

CONFIG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     tie_word_embeddings=False, eos_token_ids=(3,), pad_token_id=0)
ALL = lora.LoraConfig(rank=4, alpha=8.0, target_modules=("q", "k", "v", "o", "gate", "up", "down"))


@pytest.fixture(scope="module")
def base():
  p = init_params(CONFIG, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CONFIG.vocab_size, (3, 8)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  mask[2, :5] = 0
  tokens[mask == 0] = 0
  return jnp.asarray(tokens), jnp.asarray(mask)


def _random_b(adapters, seed=1, scale=0.3):
  """Adapters with nonzero B (as after some training)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = [scale * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "lora_b" else x
         for k, (path, x) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, out)


def test_config_normalises_and_validates():
  assert ALL.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
  assert ALL.scale == 2.0
  assert lora.LoraConfig(target_modules="q,v").target_modules == ("q_proj", "v_proj")
  with pytest.raises(ValueError, match="unknown module 'qkv'"):
    lora.LoraConfig(target_modules=("qkv",))
  with pytest.raises(ValueError, match="rank=0"):
    lora.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="alpha"):
    lora.LoraConfig(alpha=0.0)


def test_init_shapes_and_check(base):
  ad = lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(1))
  q = ad["layers"]["self_attn"]["q_proj"]
  assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 32)
  assert ad["layers"]["mlp"]["down_proj"]["lora_a"].shape == (2, 48, 4)
  assert not np.any(np.asarray(q["lora_b"])) and np.any(np.asarray(q["lora_a"]))
  # L * r * sum(in + out): q 32+32, k 32+16, v 32+16, o 32+32, gate/up 32+48, down 48+32
  assert lora.num_params(ad) == 2 * 4 * (64 + 48 + 48 + 64 + 80 + 80 + 80)
  lora.check_adapters(ad, CONFIG, ALL)
  with pytest.raises(ValueError, match="not in target_modules"):
    lora.check_adapters(ad, CONFIG, lora.LoraConfig(rank=4, target_modules=("q",)))
  with pytest.raises(ValueError, match="q_proj have shapes"):
    lora.check_adapters(ad, CONFIG, lora.LoraConfig(rank=2, target_modules=ALL.target_modules))


def test_zero_b_is_exactly_the_base(base):
  ad = lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(1))
  tokens, mask = _batch()
  np.testing.assert_array_equal(
      np.asarray(transformer.forward(lora.attach(base, ad, ALL), CONFIG, tokens, mask)),
      np.asarray(transformer.forward(base, CONFIG, tokens, mask)))


def test_gradients_reach_only_the_adapters(base):
  ad = lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(1))
  tokens, mask = _batch()

  @jax.jit
  def loss(b, a):
    lp = token_logprobs(lora.attach(b, a, ALL), CONFIG, tokens, mask)
    return -jnp.sum(lp * mask)

  g_base, g_ad = jax.grad(loss, argnums=(0, 1))(base, ad)
  assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(g_base))
  for mods in g_ad["layers"].values():
    for name, g in mods.items():
      assert np.any(np.asarray(g["lora_b"])), name  # dL/dB = (xA)^T dL/dy != 0
      assert not np.any(np.asarray(g["lora_a"])), name  # dL/dA = x^T dL/dy B^T = 0 while B = 0
  # One AdamW step: the optimizer state holds only adapter-shaped moments; the base is untouched.
  opt = optax.adamw(1e-2)
  state = opt.init(ad)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
  assert n_state == 2 * lora.num_params(ad) + 1  # mu, nu and the step count
  base_copy = copy.deepcopy(jax.device_get(base))
  updates, state = opt.update(g_ad, state, ad)
  ad2 = optax.apply_updates(ad, updates)
  assert loss(base, ad2) < loss(base, ad)
  for x, y in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(base_copy)):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_merged_weights_equal_adapter_forward(base):
  ad = _random_b(lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(2)))
  tokens, mask = _batch(1)
  applied = np.asarray(lora.forward(base, ad, CONFIG, ALL, tokens, mask))
  merged_params = lora.merge(base, ad, ALL)
  merged = np.asarray(transformer.forward(merged_params, CONFIG, tokens, mask))
  valid = np.asarray(mask).astype(bool)
  assert np.abs(applied - merged)[valid].max() <= 1e-5
  assert np.abs(applied - np.asarray(transformer.forward(base, CONFIG, tokens, mask)))[valid].max() > 1e-2
  # by hand for one matrix: W' = W + (alpha / r) A B
  a = np.asarray(ad["layers"]["mlp"]["up_proj"]["lora_a"][1], np.float64)
  b = np.asarray(ad["layers"]["mlp"]["up_proj"]["lora_b"][1], np.float64)
  w = np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"][1], np.float64)
  np.testing.assert_allclose(np.asarray(merged_params["layers"]["mlp"]["up_proj"]["kernel"][1]),
                             w + 2.0 * a @ b, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(transformer.forward(lora.merge_attached(lora.attach(base, ad, ALL)), CONFIG,
                                     tokens, mask)), merged, atol=1e-6)


def test_reference_from_base_equals_separate_copy(base):
  """pi_ref = the frozen base with adapters off; the same numbers as a separate reference copy."""
  reference_copy = jax.tree_util.tree_map(jnp.array, copy.deepcopy(jax.device_get(base)))
  frozen, cfg = lora.freeze_base(base, CONFIG)  # float32 compute: values unchanged
  ad = _random_b(lora.init_adapters(cfg, ALL, jax.random.PRNGKey(3)))
  tokens, mask = _batch(2)
  policy = lora.attach(frozen, ad, ALL)
  ref_from_base = token_logprobs(lora.detach(policy), cfg, tokens, mask)
  ref_copy = token_logprobs(reference_copy, CONFIG, tokens, mask)
  np.testing.assert_array_equal(np.asarray(ref_from_base), np.asarray(ref_copy))
  assert np.abs(np.asarray(token_logprobs(policy, cfg, tokens, mask) - ref_copy)).max() > 1e-3
  # bf16 compute: the frozen base is stored once, in the compute dtype.
  bf, bf_cfg = lora.freeze_base(base, CONFIG.replace(dtype="bfloat16"))
  assert bf_cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf)} == {jnp.dtype(jnp.bfloat16)}


def test_sampler_uses_adapters_without_recompiling(base):
  prompt, pmask = _batch(3)
  ad0 = lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(4))
  kw = dict(max_new_tokens=5, temperature=0.0, eos_ids=())
  out0 = sampling.generate(lora.attach(base, ad0, ALL), CONFIG, prompt, pmask, jax.random.PRNGKey(0), **kw)
  base_out = sampling.generate(base, CONFIG, prompt, pmask, jax.random.PRNGKey(0), **kw)
  np.testing.assert_array_equal(np.asarray(out0.tokens), np.asarray(base_out.tokens))  # B = 0
  traces = sampling.TRACE_COUNT["generate"]
  changed = 0
  for seed in range(3):  # new adapter values every "step": attached and merged, no new traces
    ad = _random_b(ad0, seed=10 + seed, scale=1.0)
    attached = sampling.generate(lora.attach(base, ad, ALL), CONFIG, prompt, pmask,
                                 jax.random.PRNGKey(0), **kw)
    merged = sampling.generate(lora.merge(base, ad, ALL), CONFIG, prompt, pmask,
                               jax.random.PRNGKey(0), **kw)
    np.testing.assert_array_equal(np.asarray(attached.tokens), np.asarray(merged.tokens))
    np.testing.assert_allclose(np.asarray(attached.logprobs), np.asarray(merged.logprobs), atol=1e-4)
    changed += int(np.any(np.asarray(attached.tokens) != np.asarray(base_out.tokens)))
  assert sampling.TRACE_COUNT["generate"] == traces
  assert changed >= 1  # the adapters do reach the sampler


def test_adapter_sharding_follows_the_base_matrix():
  mesh = jax.sharding.AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
  ad = jax.eval_shape(lambda: lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(0)))
  specs = rules.param_specs(ad, CONFIG, mesh)
  P = jax.sharding.PartitionSpec
  sa, mlp = specs["layers"]["self_attn"], specs["layers"]["mlp"]
  assert sa["q_proj"]["lora_a"] == P(None, "fsdp", None)  # [L, D, r]: D like the kernel's input
  assert sa["q_proj"]["lora_b"] == P(None, None, "tensor")  # [L, r, H*hd]: heads like its output
  assert sa["o_proj"]["lora_a"] == P(None, "tensor", None)
  assert sa["o_proj"]["lora_b"] == P(None, None, "fsdp")
  assert mlp["down_proj"]["lora_a"] == P(None, "tensor", None)
  assert mlp["gate_proj"]["lora_b"] == P(None, None, "tensor")
  # attached adapters and their optimizer moments match the same rules by path
  cfg64 = CONFIG.replace(vocab_size=64)  # the embedding needs a vocabulary tensor=2 divides
  attached = jax.eval_shape(lambda: lora.attach(init_params(cfg64, jax.random.PRNGKey(0)),
                                                lora.init_adapters(cfg64, ALL, jax.random.PRNGKey(0)), ALL))
  aspecs = rules.param_specs(attached, cfg64, mesh)
  assert aspecs["lora"]["layers"]["self_attn"]["k_proj"]["lora_b"] == P(None, None, "tensor")


def test_merge_and_save_writes_hf_dir(base, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ad = _random_b(lora.init_adapters(CONFIG, ALL, jax.random.PRNGKey(5)))
  lora.save_merged(base, ad, CONFIG, ALL, None, tmp_path)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  tokens, mask = _batch(4)
  positions = np.clip(np.cumsum(np.asarray(mask), 1) - 1, 0, None)
  with torch.no_grad():
    ref = back(input_ids=torch.from_numpy(np.asarray(tokens).astype(np.int64)),
               attention_mask=torch.from_numpy(np.asarray(mask).astype(np.int64)),
               position_ids=torch.from_numpy(positions)).logits.numpy()
  ours = np.asarray(transformer.forward(lora.attach(base, ad, ALL), CONFIG, tokens, mask))
  valid = np.asarray(mask).astype(bool)
  assert np.abs(ours - ref)[valid].max() <= 1e-4
  with pytest.raises(ValueError, match="merge them first"):
    from jaxrl_dense.models import loading
    loading.save_pretrained(lora.attach(base, ad, ALL), CONFIG, None, tmp_path / "bad")
