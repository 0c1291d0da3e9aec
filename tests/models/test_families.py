"""Qwen3, Llama with attention/MLP biases and Gemma 3 text against transformers (torch CPU).

Tiny random transformers models are saved with `save_pretrained`, loaded with our
`load_pretrained` and compared on left-padded batches (logits <= 1e-4); our `save_pretrained`
output is loaded back by transformers; the KV-cache paths (prefill + decode_step, and the
sampler's decode loop) equal full forwards; Gemma 3's sliding-window layers are checked on
sequences longer than the window (prefill, decode, shared-prefix passes and against
transformers' own cached greedy generation).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrl_dense import sampling  # noqa: E402
from jaxrl_dense.models import ModelConfig, loading, transformer  # noqa: E402

FAMILIES = {
    # head_dim 12 != hidden / heads = 8; no biases; untied.
    "qwen3": ("Qwen3Config", dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=1e4,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Qwen3 with attention_bias: q/k/v *and* o_proj biases; tied.
    "qwen3_bias_tied": ("Qwen3Config", dict(
        vocab_size=89, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True)),
    # Llama 3.x shapes with attention_bias (q/k/v/o) and mlp_bias (gate/up/down), llama3 rope.
    "llama_bias": ("LlamaConfig", dict(
        vocab_size=101, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=5e5,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Gemma 3: sliding (window 4) / global / sliding layers, local rope base 100, linear rope
    # scaling on the global layer, query_pre_attn_scalar != head_dim.
    "gemma3": ("Gemma3TextConfig", dict(
        vocab_size=103, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e4,
        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
        rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True)),
}
WINDOW = 4


def make_torch_model(name: str, seed: int = 0):
  cls_name, kw = FAMILIES[name]
  cfg = getattr(transformers, cls_name)(max_position_embeddings=128, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                                         **kw)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:  # norms and biases: make them matter
        base = 1.0 if ("norm" in pname and "gemma" not in name) else 0.0
        p.copy_(base + 0.3 * torch.randn_like(p))
  return model.eval()


_LOADED = {}


def _family(name, tmp_path_factory):
  """(name, torch model, our LoadedModel, path): saved with transformers, loaded once per session."""
  if name not in _LOADED:
    model = make_torch_model(name)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    _LOADED[name] = (name, model, loading.load_pretrained(path), path)
  return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return _family(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  return _family("gemma3", tmp_path_factory)


def left_padded_batch(vocab, seed=0, lengths=(11, 7, 3), total=11):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(len(lengths), total)).astype(np.int32)
  mask = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    mask[i, total - n:] = 1
  tokens[mask == 0] = 0
  return tokens, mask


from tests.models.test_loading import torch_logits  # noqa: E402  (transformers' logits, left padding)


def our_logits(params, config, tokens, mask):
  return np.asarray(transformer.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask)))


def max_valid_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


def test_config_fields_read_from_hf(family):
  name, model, loaded, _ = family
  c = loaded.config
  hf = model.config
  assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
      hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
  assert c.qk_norm == name.startswith(("qwen3", "gemma3"))
  assert c.attention_bias == c.attention_out_bias == bool(getattr(hf, "attention_bias", False))
  assert c.mlp_bias == (name == "llama_bias")
  if name == "gemma3":
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (c.sliding_window, c.rope_local_theta, c.query_pre_attn_scalar) == (WINDOW, 100.0, 24.0)
    assert c.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert c.hidden_act == "gelu_pytorch_tanh"
    assert c.scale_embeddings and c.post_norms and c.rms_norm_unit_offset


def test_logits_match_transformers_left_padded(family):
  name, model, loaded, _ = family
  tokens, mask = left_padded_batch(loaded.config.vocab_size)
  ref = torch_logits(model, tokens, mask)
  d = max_valid_diff(our_logits(loaded.params, loaded.config, tokens, mask), ref, mask)
  assert d <= 1e-4, (name, d)
  # Left padding changes nothing: the shortest row alone gives the same logits.
  alone = our_logits(loaded.params, loaded.config, tokens[2:, -3:], mask[2:, -3:])
  np.testing.assert_allclose(alone[0], ref[2, -3:], atol=1e-4)


def test_save_pretrained_loads_in_transformers(family, tmp_path):
  name, model, loaded, _ = family
  loading.save_pretrained(loaded.params, loaded.config, None, tmp_path)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert type(back) is type(model)
  for pname, p in model.state_dict().items():
    assert torch.equal(back.state_dict()[pname], p), pname
  tokens, mask = left_padded_batch(loaded.config.vocab_size, seed=1)
  assert max_valid_diff(torch_logits(back, tokens, mask), torch_logits(model, tokens, mask), mask) <= 1e-6
  again = loading.load_pretrained(tmp_path)
  assert again.config == loaded.config


def test_kv_cache_decode_equals_full_forward(family):
  """The sampler's prefill + KV-cache decode steps (`transformer.prefill` / `decode_step`) against
  cache-free full forwards, over 11 prompt + 6 generated tokens (> the Gemma window of 4)."""
  name, _, loaded, _ = family
  params, config = loaded.params, loaded.config
  prompt, pmask = left_padded_batch(config.vocab_size, seed=2)
  tp, n_new = prompt.shape[1], 6
  out = sampling.generate(params, config, prompt, pmask, jax.random.PRNGKey(0),
                          max_new_tokens=n_new, temperature=0.0, eos_ids=(), prompt_bucket=1)
  toks = np.asarray(out.tokens)
  seq = np.concatenate([prompt, toks], 1)
  smask = np.concatenate([pmask, np.ones_like(toks)], 1)
  ref = our_logits(params, config, seq, smask)[:, tp - 1: -1]  # [B, N, V] predicting each token
  np.testing.assert_array_equal(toks, ref.argmax(-1))  # greedy = argmax of the full forward
  lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(ref, axis=-1)), toks[..., None], -1)[..., 0]
  # step 0 checks the prefill logits, steps 1.. the decode steps
  np.testing.assert_allclose(np.asarray(out.logprobs), lp, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.raw_logprobs), lp, atol=1e-4)


def test_gemma3_sliding_window_matters_and_matches_hf_generate(tmp_path):
  model = make_torch_model("gemma3", seed=5)
  model.save_pretrained(tmp_path)
  loaded = loading.load_pretrained(tmp_path)
  tokens, mask = left_padded_batch(loaded.config.vocab_size, seed=4)
  ref = torch_logits(model, tokens, mask)
  ours = our_logits(loaded.params, loaded.config, tokens, mask)
  assert max_valid_diff(ours, ref, mask) <= 1e-4
  # Without the window (all layers global) the logits are far off: the window is exercised.
  no_window = loaded.config.replace(layer_types=None, sliding_window=None)
  assert max_valid_diff(our_logits(loaded.params, no_window, tokens, mask), ref, mask) > 1e-2
  # transformers' cached greedy generation (sliding-window cache) gives our greedy tokens.
  n_new = 7
  with torch.no_grad():
    hf_out = model.generate(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                            attention_mask=torch.from_numpy(mask.astype(np.int64)),
                            max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                            pad_token_id=0, top_k=None, top_p=None)
  ours_gen = sampling.generate(loaded.params, loaded.config, tokens, mask, jax.random.PRNGKey(0),
                               max_new_tokens=n_new, temperature=0.0, eos_ids=(), prompt_bucket=1)
  np.testing.assert_array_equal(np.asarray(ours_gen.tokens), hf_out[:, tokens.shape[1]:].numpy())


def test_gemma3_shared_prefix_matches_concatenated_rows(gemma3):
  """The shared-prompt pass (prompt keys reused by n continuations) keeps sliding windows right."""
  _, _, loaded, _ = gemma3
  params, config = loaded.params, loaded.config
  prompt, pmask = left_padded_batch(config.vocab_size, seed=6, lengths=(6, 3), total=6)
  n, r = 2, 5
  rng = np.random.default_rng(7)
  resp = rng.integers(3, config.vocab_size, size=(2 * n, r)).astype(np.int32)
  rmask = np.ones_like(resp)
  rmask[1, 3:] = 0  # right padding
  resp[rmask == 0] = 0
  _, rh = transformer.shared_prefix_hidden_states(params, config, jnp.asarray(prompt),
                                                  jnp.asarray(pmask), jnp.asarray(resp),
                                                  jnp.asarray(rmask))
  rows = np.concatenate([np.repeat(prompt, n, 0), resp], 1)
  rows_mask = np.concatenate([np.repeat(pmask, n, 0), rmask], 1)
  full = transformer.hidden_states(params, config, jnp.asarray(rows), jnp.asarray(rows_mask))
  valid = rmask.astype(bool)
  np.testing.assert_allclose(np.asarray(rh)[valid], np.asarray(full)[:, prompt.shape[1]:][valid],
                             atol=1e-5)


def test_sliding_window_mask_by_hand():
  mask = jnp.ones((1, 5, 5), bool) & jnp.tril(jnp.ones((5, 5), bool))[None]
  pos = jnp.arange(5)[None]
  got = np.asarray(transformer.sliding_window_mask(mask, pos, pos, 2))[0]
  want = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0],
                   [0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(got, want)


def test_unsupported_family_features_error(tmp_path):
  model = make_torch_model("gemma3")
  model.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, attn_logit_softcapping=50.0)))
  with pytest.raises(ValueError, match=r"config.json.*attn_logit_softcapping=50.0"):
    loading.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, final_logit_softcapping=30.0)))
  with pytest.raises(ValueError, match=r"config.json.*final_logit_softcapping=30.0"):
    loading.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_activation="relu")))
  with pytest.raises(ValueError, match=r"config.json.*hidden_act='relu'"):
    loading.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="layer_types has 2 entries; num_layers=3"):
    ModelConfig(model_type="gemma3_text", num_layers=3, num_heads=2, num_kv_heads=1,
                layer_types=("full_attention", "sliding_attention"), sliding_window=4)
  with pytest.raises(ValueError, match="sliding_window=None"):
    ModelConfig(model_type="gemma3_text", num_layers=1, num_heads=2, num_kv_heads=1,
                layer_types=("sliding_attention",))


# Hub config.json files as written by transformers 4 (rope_theta / rope_local_base_freq /
# sliding_window_pattern, no layer_types): parsed without transformers' help.
GEMMA3_1B_T4 = {
    "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
    "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
QWEN3_06B_T4 = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
    "bos_token_id": 151643, "eos_token_id": 151645}


def test_hub_configs_parse_like_transformers():
  c = ModelConfig.from_hf_dict(GEMMA3_1B_T4)
  ref = transformers.Gemma3TextConfig(**GEMMA3_1B_T4)
  assert list(c.layer_types) == list(ref.layer_types)
  assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
  assert c.rope_theta == ref.rope_parameters["full_attention"]["rope_theta"] == 1e6
  assert c.rope_local_theta == ref.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
  assert (c.sliding_window, c.head_dim, c.attention_scale) == (512, 256, 256 ** -0.5)
  assert c.tie_word_embeddings and c.eos_token_ids == (1, 106)
  back = ModelConfig.from_hf_dict(c.to_hf_dict())
  assert back == c
  q = ModelConfig.from_hf_dict(QWEN3_06B_T4)
  assert (q.model_type, q.head_dim, q.qk_norm, q.attention_bias, q.attention_out_bias) == (
      "qwen3", 128, True, False, False)
  assert ModelConfig.from_hf_dict(q.to_hf_dict()) == q
