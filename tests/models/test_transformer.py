"""Logits parity of jaxrl_dense.models.transformer with transformers' PyTorch Llama/Qwen2.

Tiny random configs are built here (GQA, q/k/v bias, tied and untied embeddings, odd head counts,
odd vocabulary, Llama 3.1 rope scaling); the torch state dict is converted with our converter.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.models import (ModelConfig, forward, hf_state_dict_from_params, init_params,
                                params_from_hf_state_dict)
from jaxrl_dense.models import transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_COMMON = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, max_position_embeddings=64,
               rms_norm_eps=1e-5)
CASES = {
    # GQA 5 query heads over 1 kv head, untied, odd vocab, Llama 3.1 "llama3" rope scaling.
    "llama_gqa_untied_llama3rope": ("llama", dict(
        vocab_size=101, num_attention_heads=5, num_key_value_heads=1, head_dim=8, rope_theta=500.0,
        tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8})),
    # Qwen2: q/k/v bias, GQA 6 -> 2, tied embeddings, odd vocab.
    "qwen2_bias_tied": ("qwen2", dict(
        vocab_size=89, num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6,
        tie_word_embeddings=True, rms_norm_eps=1e-6)),
    # Llama multi-head (kv heads = heads = 3, odd), tied, head_dim != hidden/heads.
    "llama_mha_tied": ("llama", dict(
        vocab_size=77, hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=24,
        rope_theta=1e5,
        tie_word_embeddings=True)),
}


def _torch_model(name):
  kind, kw = CASES[name]
  kw = {**_COMMON, **kw}
  cls_cfg, cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if kind == "llama" else
                  (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
  torch.manual_seed(0)
  model = cls(cls_cfg(**kw)).eval()
  with torch.no_grad():  # larger weights than the default init, so logits are O(1)
    for p in model.parameters():
      p.normal_(0.0, 0.15)
  config = ModelConfig.from_hf_dict(model.config.to_dict())
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, config, state


def _left_padded_batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (3, 13))
  mask = np.ones((3, 13), np.int64)
  mask[1, :4] = 0
  mask[2, :10] = 0
  return tokens, mask


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name):
  model, config, state = _torch_model(name)
  params = params_from_hf_state_dict(state, config)
  tokens, mask = _left_padded_batch(config.vocab_size)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions)).logits.numpy()
  ours = np.asarray(forward(params, config, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  valid = mask.astype(bool)
  assert np.abs(ref[valid]).max() > 0.5  # the test is not trivially satisfied by tiny logits
  np.testing.assert_array_less(np.abs(ours - ref)[valid].max(), 1e-4)
  assert np.isfinite(ours).all()  # fully masked (padding) query rows stay finite


def test_converter_roundtrip_is_exact():
  _, config, state = _torch_model("qwen2_bias_tied")
  back = hf_state_dict_from_params(params_from_hf_state_dict(state, config), config)
  assert set(back) == set(state) - {"lm_head.weight"}  # tied checkpoints drop lm_head
  for k, v in back.items():
    assert v.shape == state[k].shape and np.array_equal(v, state[k]), k
  _, config_u, state_u = _torch_model("llama_gqa_untied_llama3rope")
  back_u = hf_state_dict_from_params(params_from_hf_state_dict(state_u, config_u), config_u)
  assert set(back_u) == set(state_u)
  np.testing.assert_array_equal(back_u["lm_head.weight"], state_u["lm_head.weight"])


def test_converter_errors_name_the_tensor():
  _, config, state = _torch_model("qwen2_bias_tied")
  missing = dict(state)
  del missing["model.layers.1.self_attn.k_proj.bias"]
  with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.bias"):
    params_from_hf_state_dict(missing, config)
  bad = dict(state)
  bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight.*shape"):
    params_from_hf_state_dict(bad, config)
  extra = dict(state)
  extra["model.layers.0.self_attn.q_norm.weight"] = np.zeros((8,), np.float32)
  with pytest.raises(ValueError, match="q_norm"):
    params_from_hf_state_dict(extra, config)


def test_left_padding_does_not_change_valid_logits():
  config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8)
  params = init_params(config, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  seq = rng.integers(0, 61, (1, 7))
  padded = np.concatenate([rng.integers(0, 61, (1, 5)), seq], axis=1)
  mask = np.concatenate([np.zeros((1, 5), np.int32), np.ones((1, 7), np.int32)], axis=1)
  a = forward(params, config, jnp.asarray(seq, jnp.int32), jnp.ones((1, 7), jnp.int32))
  b = forward(params, config, jnp.asarray(padded, jnp.int32), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(b[:, 5:]), np.asarray(a), atol=1e-5)


def test_bfloat16_params_and_compute():
  _, config, state = _torch_model("qwen2_bias_tied")
  tokens, mask = _left_padded_batch(config.vocab_size)
  ref = np.asarray(forward(params_from_hf_state_dict(state, config), config,
                           jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))
  cfg16 = config.replace(param_dtype="bfloat16", dtype="bfloat16")
  params16 = params_from_hf_state_dict(state, cfg16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params16))
  out = np.asarray(forward(params16, cfg16, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))
  assert out.dtype == np.float32
  valid = mask.astype(bool)
  err = np.abs(out - ref)[valid]
  assert err.max() < 0.1 * np.abs(ref[valid]).max(), err.max()


def test_rope_scaling_and_config_errors():
  cfg = ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, rope_scaling=(("factor", 2.0), ("rope_type", "yarn")))
  with pytest.raises(ValueError, match="yarn"):
    transformer.rope_inv_freq(cfg)
  lin = cfg.replace(rope_scaling=(("factor", 4.0), ("rope_type", "linear")))
  np.testing.assert_allclose(transformer.rope_inv_freq(lin),
                             transformer.rope_inv_freq(cfg.replace(rope_scaling=None)) / 4.0)
  with pytest.raises(ValueError, match="model_type"):
    ModelConfig(model_type="gpt2")
