"""Discriminative PRMs (models/prm_head.py): loading, head parity, step gathering, refusals.

Parity (torch, test-only): a tiny random `Qwen2ForTokenClassification` / `LlamaForTokenClassification`
written by transformers, and a `Qwen2ForProcessRewardModel`-style directory (MLP head `score.0`,
`score.2`) checked against transformers' `Qwen2Model` + a torch `Sequential` head on the same
weights; left-padded batches, float32, atol 1e-4. The step gathering, the head formulas and the
refusals run without torch on directories written with `hf_io.write_hf_dir`.
"""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.models import convert, hf_io, prm_head
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.models.transformer import hidden_states, init_params

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ATOL = 1e-4

TINY = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                   tie_word_embeddings=False, max_position_embeddings=128)


def left_padded_batch(vocab, lengths=(9, 6, 3), total=9, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(len(lengths), total)).astype(np.int32)
  mask = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    mask[i, total - n:] = 1
    tokens[i, :total - n] = 0
  return tokens, mask


def trunk_state_dict(config=TINY, seed=0):
  """HF-named trunk tensors of random params (norms and biases randomized), no lm_head."""
  return dict(_trunk_state_dict(config, seed))


@functools.lru_cache(maxsize=None)
def _trunk_state_dict(config, seed):
  params = init_params(config, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  sd = convert.hf_state_dict_from_params(params, config)
  out = {}
  for k, v in sd.items():
    if k == "lm_head.weight":
      continue
    v = np.asarray(v, np.float32)
    if v.ndim == 1:
      v = (1.0 if "norm" in k else 0.0) + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
    else:
      v = v * 10.0  # init std 0.02 -> 0.2: O(1) logits
    out[k] = v
  return out


def head_state_dict(kind, hidden=TINY.hidden_size, labels=2, seed=1, bias=True):
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  if kind == "linear":
    sd = {"score.weight": r(labels, hidden)}
    if bias:
      sd["score.bias"] = r(labels)
    return sd
  return {"score.0.weight": r(hidden, hidden), "score.0.bias": r(hidden),
          "score.2.weight": r(labels, hidden), "score.2.bias": r(labels)}


def write_prm_dir(path, kind="mlp", arch=None, config=TINY, head=None, extra_config=None, drop=()):
  hf = config.to_hf_dict()
  hf["architectures"] = [arch or ("Qwen2ForProcessRewardModel" if kind == "mlp"
                                  else "Qwen2ForTokenClassification")]
  hf.update(extra_config or {})
  sd = trunk_state_dict(config)
  sd.update(head_state_dict(kind) if head is None else head)
  for k in drop:
    sd.pop(k)
  hf_io.write_hf_dir(path, hf, sd)
  return path


# ---------------------------------------------------------------------------------------------
# Head formulas and step gathering (no torch)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_token_logits_are_the_head_formula_on_hidden_states(tmp_path, kind):
  prm = prm_head.load_discriminative_prm(write_prm_dir(tmp_path / kind, kind), require_tokenizer=False)
  assert prm.head_kind == kind and prm.num_labels == 2 and prm.tokenizer is None
  assert "lm_head" not in prm.params
  tokens, mask = left_padded_batch(TINY.vocab_size)
  got = np.asarray(prm_head.prm_token_logits(prm, tokens, mask))
  assert got.shape == (3, 9, 2) and got.dtype == np.float32
  h = np.asarray(hidden_states(prm.params, prm.config, tokens, mask), np.float64)
  sd = head_state_dict(kind)
  if kind == "linear":
    want = h @ sd["score.weight"].T + sd["score.bias"]
  else:
    z = np.maximum(h @ sd["score.0.weight"].T + sd["score.0.bias"], 0.0)
    want = z @ sd["score.2.weight"].T + sd["score.2.bias"]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.abs(want).max() > 0.5  # the head is not trivially small


def test_step_logits_and_rewards_by_hand(tmp_path):
  prm = prm_head.load_discriminative_prm(write_prm_dir(tmp_path / "p"), require_tokenizer=False)
  tokens, mask = left_padded_batch(TINY.vocab_size)  # row 2: tokens 6..8 real, 0..5 padding
  positions = np.array([[2, 5, 8, -1],
                        [4, 8, 7, 3],             # row 1 is real from 3 on; step 2 masked off
                        [6, 3, 8, 9]], np.int32)  # row 2: 3 is padding, 9 is past T: no steps
  step_mask = np.array([[1, 1, 1, 1],
                        [1, 1, 0, 1],
                        [1, 1, 1, 1]], np.int32)
  token_logits = np.asarray(prm_head.prm_token_logits(prm, tokens, mask))  # [B, T, 2]
  valid = np.array([[1, 1, 1, 0],
                    [1, 1, 0, 1],
                    [1, 0, 1, 0]], bool)
  want = np.zeros((3, 4, 2), np.float32)
  for b in range(3):
    for s in range(4):
      if valid[b, s]:
        want[b, s] = token_logits[b, positions[b, s]]
  got = np.asarray(prm_head.prm_step_logits(prm, tokens, mask, positions, step_mask))
  np.testing.assert_allclose(got, want, atol=1e-5)
  p = np.exp(want) / np.exp(want).sum(-1, keepdims=True)
  want_r = np.where(valid, p[..., 1] - p[..., 0], 0.0)
  rewards = prm_head.prm_step_rewards(prm, tokens, mask, positions, step_mask)
  np.testing.assert_allclose(np.asarray(rewards), want_r, atol=1e-5)
  assert rewards.shape == (3, 4) and np.all(np.abs(want_r[valid]) > 0)
  # step_mask=None: only the positions decide; jitted by the caller gives the same.
  no_mask = np.asarray(prm_head.prm_step_rewards(prm, tokens, mask, positions))
  p17 = np.exp(token_logits[1, 7]) / np.exp(token_logits[1, 7]).sum()
  np.testing.assert_allclose(no_mask[1, 2], p17[1] - p17[0], atol=1e-5)
  np.testing.assert_allclose(np.delete(no_mask[1], 2), np.delete(want_r[1], 2), atol=1e-5)
  jitted = jax.jit(lambda params, head, t, m, pos, sm: prm_head.prm_step_rewards(
      prm._replace(params=params, head=head), t, m, pos, sm))
  np.testing.assert_allclose(np.asarray(jitted(prm.params, prm.head, tokens, mask, positions,
                                               step_mask)), want_r, atol=1e-5)


def test_step_positions_from_separator_by_hand():
  sep = 7
  tokens = np.array([[0, 0, 7, 3, 7, 5, 7, 7],    # left padding (a pad-id 7 would not count)
                     [3, 7, 4, 4, 4, 4, 4, 7],
                     [4, 4, 4, 4, 4, 4, 0, 0]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
  tokens[0, 0] = sep  # on padding: ignored
  pos, m = prm_head.step_positions_from_separator(tokens, mask, sep, max_steps=3)
  np.testing.assert_array_equal(np.asarray(pos), [[2, 4, 6], [1, 7, -1], [-1, -1, -1]])
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
  pos_j, _ = jax.jit(prm_head.step_positions_from_separator, static_argnums=(2, 3))(
      tokens, mask, sep, 5)
  np.testing.assert_array_equal(np.asarray(pos_j), [[2, 4, 6, 7, -1], [1, 7, -1, -1, -1],
                                                    [-1] * 5])


def test_step_rewards_refuses_non_binary_heads(tmp_path):
  d = write_prm_dir(tmp_path / "p3", "linear", head=head_state_dict("linear", labels=3))
  prm = prm_head.load_discriminative_prm(d, require_tokenizer=False)
  assert prm.num_labels == 3
  tokens, mask = left_padded_batch(TINY.vocab_size)
  assert prm_head.prm_step_logits(prm, tokens, mask, np.array([[8]] * 3, np.int32)).shape == (3, 1, 3)
  with pytest.raises(ValueError, match="num_labels=3"):
    prm_head.prm_step_rewards(prm, tokens, mask, np.array([[8]] * 3, np.int32))


def test_linear_head_without_bias_and_ignored_lm_head(tmp_path):
  head = head_state_dict("linear", bias=False)
  head["lm_head.weight"] = np.zeros((TINY.vocab_size, TINY.hidden_size), np.float32)
  prm = prm_head.load_discriminative_prm(write_prm_dir(tmp_path / "nb", "linear", head=head),
                                         require_tokenizer=False)
  np.testing.assert_array_equal(np.asarray(prm.head["bias"]), 0.0)
  assert "lm_head" not in prm.params


def test_bfloat16_load_keeps_float32_logits(tmp_path):
  d = write_prm_dir(tmp_path / "bf", "mlp")
  f32 = prm_head.load_discriminative_prm(d, require_tokenizer=False)
  bf16 = prm_head.load_discriminative_prm(d, dtype="bfloat16", require_tokenizer=False)
  assert bf16.head["hidden"]["kernel"].dtype == jnp.bfloat16
  tokens, mask = left_padded_batch(TINY.vocab_size)
  a = np.asarray(prm_head.prm_token_logits(f32, tokens, mask))
  b = prm_head.prm_token_logits(bf16, tokens, mask)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(b)[mask > 0], a[mask > 0], atol=0.15)


def test_tokenizer_is_loaded_when_present(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  d = write_prm_dir(tmp_path / "tok", "mlp")
  vocab = {"<pad>": 0, "<unk>": 1, "<extra_0>": 2, **{f"w{i}": i + 3 for i in range(20)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                       unk_token="<unk>").save_pretrained(str(d))
  prm = prm_head.load_discriminative_prm(d)
  assert prm.tokenizer is not None
  assert prm.tokenizer.convert_tokens_to_ids("<extra_0>") == 2


# ---------------------------------------------------------------------------------------------
# Refusals (no torch)


def test_refuses_a_causal_lm_directory(tmp_path):
  d = tmp_path / "lm"
  sd = trunk_state_dict()
  sd["lm_head.weight"] = np.ones((TINY.vocab_size, TINY.hidden_size), np.float32)
  hf_io.write_hf_dir(d, TINY.to_hf_dict(), sd)  # architectures: Qwen2ForCausalLM
  with pytest.raises(ValueError, match=r"model\.safetensors: no `score\.\*` head.*causal LM"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)


def test_refuses_unknown_architecture(tmp_path):
  d = write_prm_dir(tmp_path / "bert", "linear", arch="BertForTokenClassification")
  with pytest.raises(ValueError, match=r"config\.json: unsupported PRM architecture.*Bert"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)


def test_refuses_architecture_model_type_mismatch(tmp_path):
  d = write_prm_dir(tmp_path / "mm", "linear", arch="LlamaForTokenClassification")
  with pytest.raises(ValueError, match=r"config\.json: .*needs model_type='llama', got 'qwen2'"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)


@pytest.mark.parametrize("kind,name,shape", [
    ("linear", "score.weight", (2, TINY.hidden_size + 1)),
    ("mlp", "score.0.weight", (TINY.hidden_size, TINY.hidden_size - 4)),
    ("mlp", "score.2.weight", (2, TINY.hidden_size * 2)),
])
def test_refuses_head_shapes_that_do_not_fit_hidden_size(tmp_path, kind, name, shape):
  head = head_state_dict(kind)
  head[name] = np.zeros(shape, np.float32)
  d = write_prm_dir(tmp_path / "bad", kind, head=head)
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape .*"
                                       rf"hidden_size={TINY.hidden_size}"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)


def test_refuses_a_head_of_the_other_kind(tmp_path):
  d = write_prm_dir(tmp_path / "other", "linear", arch="Qwen2ForProcessRewardModel")
  with pytest.raises(ValueError, match=r"Qwen2ForProcessRewardModel head \(mlp.*missing"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)


def test_refuses_label_count_mismatch(tmp_path):
  d = write_prm_dir(tmp_path / "lab", "linear",
                    extra_config={"id2label": {"0": "a", "1": "b", "2": "c"}})
  with pytest.raises(ValueError, match=r"config\.json: declares 3 labels.*has 2 outputs"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)


def test_refuses_missing_tokenizer_when_required(tmp_path):
  d = write_prm_dir(tmp_path / "notok", "mlp")
  with pytest.raises(ValueError, match=r"notok' has no tokenizer files.*require_tokenizer=False"):
    prm_head.load_discriminative_prm(d)


def test_refuses_missing_trunk_tensor_and_missing_path(tmp_path):
  d = write_prm_dir(tmp_path / "trunk", "mlp", drop=("model.norm.weight",))
  with pytest.raises(ValueError, match=r"model\.safetensors: state dict lacks 1 tensor.*model\.norm"):
    prm_head.load_discriminative_prm(d, require_tokenizer=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prm_head.load_discriminative_prm(tmp_path / "nowhere", require_tokenizer=False)


# ---------------------------------------------------------------------------------------------
# Sharded like the policy (2 host devices in a subprocess)

_SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jaxrl_dense.parallel import mesh as mesh_lib, placement
    from jaxrl_dense.models import prm_head
    prm = prm_head.load_discriminative_prm(sys.argv[1], require_tokenizer=False)
    tokens = np.array(json.loads(sys.argv[2]), np.int32); mask = (tokens > 0).astype(np.int32)
    pos = np.array([[3, 7], [5, -1]], np.int32)
    ref = np.asarray(prm_head.prm_step_rewards(prm, tokens, mask, pos))
    out = {}
    for spec in ("fsdp:2", "tensor:2"):
      mesh = mesh_lib.make_mesh(spec)
      params = placement.shard_params(prm.params, prm.config, mesh)
      sharded = prm._replace(params=params, head=jax.device_put(prm.head, placement.replicated(mesh)))
      with mesh_lib.use_mesh(mesh):
        got = np.asarray(prm_head.prm_step_rewards(sharded, tokens, mask, pos))
      out[spec] = [float(np.abs(got - ref).max()), len(params["layers"]["mlp"]["up_proj"]["kernel"]
                                                        .sharding.device_set)]
    print(json.dumps(out))
""")


def test_sharded_params_give_the_same_step_rewards(tmp_path):
  d = write_prm_dir(tmp_path / "sh", "mlp")
  tokens = [[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT, str(d), json.dumps(tokens)],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  for spec, (err, ndev) in out.items():
    assert ndev == 2, spec
    assert err < 1e-5, (spec, err)


# ---------------------------------------------------------------------------------------------
# Parity with transformers (torch)


def _torch_inputs(torch, tokens, mask):
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  as_t = lambda a: torch.from_numpy(a.astype(np.int64))
  return dict(input_ids=as_t(tokens), attention_mask=as_t(mask), position_ids=as_t(positions))


def _randomize_(torch, model, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norms (ones) and biases (zeros): make them matter
        p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize("family,bias", [("qwen2", True), ("qwen2", False), ("llama", True)])
def test_token_classification_matches_transformers(tmp_path, family, bias):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  kw = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, initializer_range=0.2, num_labels=2, pad_token_id=0,
            token_classification_bias=bias, tie_word_embeddings=False)
  if family == "qwen2":
    cfg, cls = transformers.Qwen2Config(rope_theta=1e6, **kw), transformers.Qwen2ForTokenClassification
  else:
    cfg, cls = transformers.LlamaConfig(rope_theta=5e4, **kw), transformers.LlamaForTokenClassification
  torch.manual_seed(0)
  model = _randomize_(torch, cls(cfg).float())
  model.save_pretrained(str(tmp_path / "hf"))
  prm = prm_head.load_discriminative_prm(tmp_path / "hf", require_tokenizer=False)
  assert prm.head_kind == "linear" and prm.num_labels == 2
  assert ("score.bias" in hf_io.read_hf_state_dict(tmp_path / "hf")) == bias
  tokens, mask = left_padded_batch(97)
  with torch.no_grad():
    want = model(**_torch_inputs(torch, tokens, mask)).logits.float().numpy()
  got = np.asarray(prm_head.prm_token_logits(prm, tokens, mask))
  err = np.abs(got - want)[mask > 0].max()
  print(f"{family} bias={bias}: max |jax - transformers| = {err:.2e}")
  assert err < ATOL, err
  assert np.abs(want).max() > 0.5


def test_process_reward_model_mlp_head_matches_torch_reference(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                 max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
                                 initializer_range=0.2, pad_token_id=0, tie_word_embeddings=False)
  torch.manual_seed(0)
  trunk = _randomize_(torch, transformers.Qwen2Model(cfg).float())
  head = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 2))
  with torch.no_grad():
    for p in head.parameters():
      p.normal_(0.0, 0.3)
  sd = {f"model.{k}": v.detach().numpy() for k, v in trunk.state_dict().items()}
  sd.update({f"score.{k}": v.detach().numpy() for k, v in head.state_dict().items()})
  assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= set(sd)
  hf = json.loads(cfg.to_json_string())
  hf["architectures"] = ["Qwen2ForProcessRewardModel"]  # with the real checkpoint's extra fields:
  hf.update(auto_map={"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                      "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"},
            use_mrope=False, use_sliding_window=False, sliding_window=131072, max_window_layers=2)
  hf_io.write_hf_dir(tmp_path / "prm", hf, sd)
  prm = prm_head.load_discriminative_prm(tmp_path / "prm", require_tokenizer=False)
  assert prm.head_kind == "mlp" and prm.num_labels == 2
  tokens, mask = left_padded_batch(97)
  with torch.no_grad():
    h = trunk(**_torch_inputs(torch, tokens, mask)).last_hidden_state
    want = head(h).float().numpy()
  got = np.asarray(prm_head.prm_token_logits(prm, tokens, mask))
  err = np.abs(got - want)[mask > 0].max()
  print(f"Qwen2ForProcessRewardModel: max |jax - torch| = {err:.2e}")
  assert err < ATOL, err
  assert np.abs(want).max() > 0.5
  # Step rewards at the last token of each row against the torch softmax.
  pos = np.full((3, 1), 8, np.int32)
  p = torch.softmax(torch.from_numpy(want[:, 8]), -1).numpy()
  np.testing.assert_allclose(np.asarray(prm_head.prm_step_rewards(prm, tokens, mask, pos))[:, 0],
                             p[:, 1] - p[:, 0], atol=ATOL)
