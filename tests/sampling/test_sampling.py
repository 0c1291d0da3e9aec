"""The jitted KV-cache sampler against full forwards without a cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import sampling
from jaxrl_dense.models import ModelConfig, forward, init_params, token_logprobs
from jaxrl_dense.sampling import filter_logits, generate

CONFIG = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                     tie_word_embeddings=False, eos_token_ids=(3,), pad_token_id=0)
N = 6  # max_new_tokens everywhere (one compile per sampler setting)


@pytest.fixture(scope="module")
def params():
  p = init_params(CONFIG, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim >= 2 else x, p)  # peaky-ish


def _prompts(seed=0, tp=7):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CONFIG.vocab_size, (3, tp)).astype(np.int32)
  mask = np.ones((3, tp), np.int32)
  mask[1, :2] = 0
  mask[2, : tp - 2] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def _full_logits(params, prompt, pmask, gen, gmask):
  """Logits predicting each generated token, from one cache-free forward: [B, N, V]."""
  tokens = np.concatenate([prompt, gen], axis=1)
  mask = np.concatenate([pmask, gmask], axis=1)
  logits = forward(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask))
  tp = prompt.shape[1]
  return np.asarray(logits[:, tp - 1: tp - 1 + gen.shape[1]]), tokens, mask


def test_greedy_equals_step_by_step_forward(params):
  prompt, pmask = _prompts()
  out = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(0), max_new_tokens=N,
                 temperature=0.0, eos_ids=())
  assert out.tokens.shape == out.logprobs.shape == out.mask.shape == (3, N)
  # Step by step without a cache, on a fixed-size buffer (future slots masked out).
  buf = np.concatenate([prompt, np.zeros((3, N), np.int32)], axis=1)
  bmask = np.concatenate([pmask, np.zeros((3, N), np.int32)], axis=1)
  tp = prompt.shape[1]
  for s in range(N):
    logits = forward(params, CONFIG, jnp.asarray(buf), jnp.asarray(bmask))
    buf[:, tp + s] = np.asarray(jnp.argmax(logits[:, tp + s - 1], axis=-1))
    bmask[:, tp + s] = 1
  np.testing.assert_array_equal(np.asarray(out.tokens), buf[:, tp:])
  np.testing.assert_array_equal(np.asarray(out.mask), 1)
  # Reported log-probs are the model's (untempered) log-probs of those tokens.
  ref = token_logprobs(params, CONFIG, jnp.asarray(buf), jnp.asarray(bmask))[:, tp:]
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.raw_logprobs), np.asarray(ref), atol=1e-5)


def test_eos_stops_each_row_independently(params):
  prompt, pmask = _prompts()
  free = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(0), max_new_tokens=N,
                  temperature=0.0, eos_ids=())
  free_tokens = np.asarray(free.tokens)
  eos = int(free_tokens[0, 2])  # row 0 stops at step 2; other rows wherever eos first appears
  out = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(0), max_new_tokens=N,
                 temperature=0.0, eos_ids=(eos, 96))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for r in range(3):
    hits = np.flatnonzero(np.isin(free_tokens[r], (eos, 96)))
    stop = hits[0] + 1 if hits.size else N  # generated length incl. EOS
    np.testing.assert_array_equal(mask[r], np.arange(N) < stop)
    np.testing.assert_array_equal(tokens[r, :stop], free_tokens[r, :stop])
    np.testing.assert_array_equal(tokens[r, stop:], CONFIG.pad_token_id)
    assert int(out.lengths[r]) == stop
    assert np.all(np.asarray(out.logprobs)[r, stop:] == 0.0)
  assert mask[0].sum() == 3


def test_sampling_reproducible_and_logprobs_exact(params):
  prompt, pmask = _prompts()
  kw = dict(max_new_tokens=N, temperature=1.0, eos_ids=())
  a = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(1), **kw)
  b = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(1), **kw)
  c = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(2), **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  # At temperature 1 without filters the sampling distribution is the model's: cache == no cache.
  _, tokens, mask = _full_logits(params, prompt, pmask, np.asarray(a.tokens), np.asarray(a.mask))
  ref = token_logprobs(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask))[:, prompt.shape[1]:]
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.raw_logprobs), np.asarray(ref), atol=1e-5)


def test_no_recompile_for_new_contents_in_bucket(params):
  kw = dict(max_new_tokens=N, temperature=1.0, eos_ids=())
  generate(params, CONFIG, *_prompts(0), jax.random.PRNGKey(0), **kw)
  traces = sampling.TRACE_COUNT["generate"]
  for seed, tp in ((3, 7), (4, 9), (5, 16)):  # new tokens, masks, prompt lengths <= 16, rng
    out = generate(params, CONFIG, *_prompts(seed, tp), jax.random.PRNGKey(seed), **kw)
    out.tokens.block_until_ready()
  assert sampling.TRACE_COUNT["generate"] == traces


def test_top_k_never_leaves_the_top_k(params):
  prompt, pmask = _prompts()
  k, temp = 3, 1.5
  out = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(7), max_new_tokens=N,
                 temperature=temp, top_k=k, eos_ids=())
  gen = np.asarray(out.tokens)
  logits, _, _ = _full_logits(params, prompt, pmask, gen, np.asarray(out.mask))
  chosen = np.take_along_axis(logits, gen[..., None], axis=-1)
  rank = (logits > chosen + 1e-5).sum(-1)  # tokens strictly better than the sampled one
  assert rank.max() < k
  # Log-prob under the renormalised top-k of logits / temp.
  z = logits / temp
  kth = np.sort(z, axis=-1)[..., -k][..., None]
  zf = np.where(z >= kth, z, -np.inf)
  ref = np.take_along_axis(zf, gen[..., None], -1)[..., 0] - np.log(np.exp(zf - zf.max(-1, keepdims=True)).sum(-1)) - zf.max(-1)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-4)
  assert np.all(np.asarray(out.logprobs) >= np.asarray(out.raw_logprobs) - 1e-5)


def test_top_p_never_leaves_the_nucleus(params):
  prompt, pmask = _prompts()
  p = 0.5
  out = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(8), max_new_tokens=N,
                 temperature=1.0, top_p=p, eos_ids=())
  gen = np.asarray(out.tokens)
  logits, _, _ = _full_logits(params, prompt, pmask, gen, np.asarray(out.mask))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen = np.take_along_axis(probs, gen[..., None], axis=-1)
  mass_above = np.where(probs > chosen * (1 + 1e-5), probs, 0.0).sum(-1)
  assert mass_above.max() < p + 1e-4
  assert np.all(np.asarray(out.logprobs) >= np.asarray(out.raw_logprobs) - 1e-5)


def test_filter_logits_by_hand():
  logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.25, 0.15], [0.7, 0.1, 0.1, 0.1]]))
  keep = lambda z: np.isfinite(np.asarray(z))
  np.testing.assert_array_equal(keep(filter_logits(logits, top_k=2)), [[0, 1, 1, 0], [1, 1, 1, 1]])
  # mass above 0.25 is 0.5 < 0.6 -> kept; above 0.15 is 0.75 -> dropped. Row 2: only 0.7.
  np.testing.assert_array_equal(keep(filter_logits(logits, top_p=0.6, use_top_p=True)),
                                [[0, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(keep(filter_logits(logits, top_k=1, top_p=0.9, use_top_p=True)),
                                [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_num_samples_share_the_prompt(params):
  prompt, pmask = _prompts()
  out = generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(3), max_new_tokens=N,
                 temperature=1.0, eos_ids=(), num_samples=2)
  assert out.tokens.shape == (6, N)
  rep_prompt, rep_mask = np.repeat(prompt, 2, axis=0), np.repeat(pmask, 2, axis=0)
  tokens = np.concatenate([rep_prompt, np.asarray(out.tokens)], axis=1)
  mask = np.concatenate([rep_mask, np.asarray(out.mask)], axis=1)
  ref = token_logprobs(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask))[:, prompt.shape[1]:]
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=1e-5)
  assert not np.array_equal(np.asarray(out.tokens[0]), np.asarray(out.tokens[1]))


def test_bad_inputs_raise(params):
  prompt, pmask = _prompts()
  right = np.ones_like(pmask)
  right[0, -2:] = 0
  with pytest.raises(ValueError, match="left-padded"):
    generate(params, CONFIG, prompt, right, jax.random.PRNGKey(0), max_new_tokens=N)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(0), max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    generate(params, CONFIG, prompt, pmask, jax.random.PRNGKey(0), max_new_tokens=N, top_p=0.0)
  with pytest.raises(ValueError, match="prompt_tokens"):
    generate(params, CONFIG, prompt + 200, pmask, jax.random.PRNGKey(0), max_new_tokens=N)


@pytest.mark.parametrize("bad, msg", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"), (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_k=10**6), "top_k must be in"),
    (dict(num_samples=0), "num_samples must be >= 1")])
def test_both_samplers_validate_through_one_sampling_params(bad, msg):
  """The static sampler and the engine refuse the same bad settings with the same message
  (`sampling.SamplingParams.of`), before any work."""
  from jaxrl_dense.sampling import engine as engine_lib
  cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(2,))
  kw = dict(max_new_tokens=4) | bad
  with pytest.raises(ValueError, match=msg):
    sampling.SamplingParams.of(cfg, **kw)
  tokens, mask = np.ones((1, 4), np.int32), np.ones((1, 4), np.int32)
  for gen in (sampling.generate, engine_lib.generate):
    with pytest.raises(ValueError, match=msg):
      gen(None, cfg, tokens, mask, jax.random.PRNGKey(0), **kw)
  sp = sampling.SamplingParams.of(cfg, max_new_tokens=4, temperature=0.0)
  assert sp.greedy and sp.eos_ids == (2,) and sp.pad_id == 2  # pad: the first EOS without a pad id
