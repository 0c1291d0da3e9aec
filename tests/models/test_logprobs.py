"""token_logprobs: chunked head == naive log-softmax gather, padding never leaks, entropy, grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.models import ModelConfig, forward, init_params, token_logprobs
from jaxrl_dense.models.logprobs import logprobs_from_hidden

CONFIG = ModelConfig(model_type="qwen2", vocab_size=83, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                     tie_word_embeddings=False)


def _params(config=CONFIG, scale=8.0):
  params = init_params(config, jax.random.PRNGKey(0))
  # Sharper distributions than the N(0, 0.02) init, so errors would show.
  return jax.tree_util.tree_map(lambda x: x * scale if x.ndim >= 2 else x, params)


def _batch(seed=0):
  """Left-padded prompts + right-padded responses, as RL batches are."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (3, 11)).astype(np.int32)
  mask = np.ones((3, 11), np.int32)
  mask[1, :3] = 0  # left padding
  mask[2, :2] = 0
  mask[2, 9:] = 0  # right padding
  return tokens, mask


def _naive(params, config, tokens, mask):
  logits = forward(params, config, tokens, mask)  # [B, T, V]
  logp_all = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  lp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  ok = (mask[:, 1:] * mask[:, :-1]).astype(bool)
  lp = jnp.pad(jnp.where(ok, lp, 0.0), ((0, 0), (1, 0)))
  ent = jnp.pad(jnp.where(ok, ent, 0.0), ((0, 0), (1, 0)))
  return lp, ent


def test_equals_naive_log_softmax_gather():
  params = _params()
  tokens, mask = map(jnp.asarray, _batch())
  ref_lp, ref_ent = _naive(params, CONFIG, tokens, mask)
  assert float(jnp.min(ref_lp)) < -3.0  # non-trivial distributions
  for chunk_size in (None, 1, 7):  # one chunk, one token per chunk, a ragged last chunk
    lp, ent = token_logprobs(params, CONFIG, tokens, mask, return_entropy=True, chunk_size=chunk_size)
    assert lp.shape == ent.shape == tokens.shape and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(lp[:, 0]), 0.0)
  only_lp = token_logprobs(params, CONFIG, tokens, mask, chunk_size=7)
  np.testing.assert_array_equal(np.asarray(only_lp), np.asarray(lp))


def test_padding_never_leaks():
  params = _params()
  tokens, mask = _batch()
  other = tokens.copy()
  rng = np.random.default_rng(5)
  pad = mask == 0
  other[pad] = rng.integers(0, CONFIG.vocab_size, pad.sum())
  a, ea = token_logprobs(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask), return_entropy=True)
  b, eb = token_logprobs(params, CONFIG, jnp.asarray(other), jnp.asarray(mask), return_entropy=True)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ea), np.asarray(eb), atol=1e-6)
  # Padding and the first real token (no context) carry exactly 0.
  no_pred = np.concatenate([np.ones((3, 1), bool), (mask[:, 1:] * mask[:, :-1]) == 0], axis=1)
  assert np.all(np.asarray(a)[no_pred] == 0.0) and np.all(np.asarray(a)[~no_pred] < 0.0)
  # A left-padded row scores its tokens exactly as the same row unpadded.
  row = tokens[1:2, 3:]
  c = token_logprobs(params, CONFIG, jnp.asarray(row), jnp.ones_like(jnp.asarray(row)))
  np.testing.assert_allclose(np.asarray(a[1:2, 3:]), np.asarray(c), atol=1e-5)


def test_entropy_of_uniform_head_is_log_vocab():
  hidden = jnp.ones((2, 5, 4))
  w = jnp.zeros((4, 13))
  tokens = jnp.zeros((2, 5), jnp.int32)
  lp, ent = logprobs_from_hidden(hidden, w, tokens, jnp.ones((2, 5)), return_entropy=True, chunk_size=3)
  np.testing.assert_allclose(np.asarray(ent[:, 1:]), np.log(13.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lp[:, 1:]), -np.log(13.0), rtol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_grads_match_naive(remat):
  config = CONFIG.replace(remat=remat)
  params = _params()
  tokens, mask = map(jnp.asarray, _batch())
  weights = jnp.asarray(np.random.default_rng(2).normal(size=tokens.shape), jnp.float32)

  def loss(p):
    lp, ent = token_logprobs(p, config, tokens, mask, return_entropy=True, chunk_size=4)
    return jnp.sum(weights * lp * mask) + 0.1 * jnp.sum(ent * mask)

  def naive_loss(p):
    lp, ent = _naive(p, CONFIG, tokens, mask)
    return jnp.sum(weights * lp * mask) + 0.1 * jnp.sum(ent * mask)

  g = jax.jit(jax.grad(loss))(params)
  g_ref = jax.jit(jax.grad(naive_loss))(params)
  flat, flat_ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
  assert len(flat) == len(flat_ref)
  tol = 2e-4 if remat else 2e-5  # float32 reassociation only (remat reorders more), relative
  for x, y in zip(flat, flat_ref):
    err, scale = float(jnp.abs(x - y).max()), float(jnp.abs(y).max())
    assert err <= tol * scale + 1e-6, (err, scale)
  assert sum(float(jnp.abs(x).sum()) for x in flat) > 0.0


def test_bad_inputs_raise():
  params = _params()
  tokens, mask = map(jnp.asarray, _batch())
  with pytest.raises(ValueError, match="chunk_size"):
    token_logprobs(params, CONFIG, tokens, mask, chunk_size=0)
  with pytest.raises(AssertionError):
    token_logprobs(params, CONFIG, tokens, mask[:, :5])
  with pytest.raises(TypeError, match="integer"):
    token_logprobs(params, CONFIG, tokens.astype(jnp.float32), mask)
