"""The sampler's per-step math (`sampling._sample_step`) against the previous implementation.

Where the math is identical (greedy, full-vocabulary draws with temperature and top-p) tokens and
log-probs equal the old path's on the same keys (float32). With top-k the draw runs over the k
kept logits, so the tokens on a key differ: there the log-probs are checked against the old
filtered log-softmax and the empirical frequencies against the old path's probabilities.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.sampling import _sample_step, filter_logits


def _old_sample_step(logits, key, temperature, top_p, *, greedy, top_k, use_top_p):
  """The implementation before the rewrite: two [B, V] log-softmaxes and a [B, V] draw."""
  raw = jax.nn.log_softmax(logits, axis=-1)
  if greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0]
    return tok, lp, lp
  z = filter_logits(logits / temperature, top_k, top_p, use_top_p)
  tok = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
  lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tok[:, None], axis=-1)[:, 0]
  raw_lp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0]
  return tok, lp, raw_lp


def _logits(b=16, v=211, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, v)) * 2.5, jnp.float32)


@pytest.mark.parametrize("temperature,top_p,greedy", [
    (1.0, 1.0, True), (1.0, 1.0, False), (0.7, 1.0, False), (1.3, 0.8, False), (1.0, 0.5, False)])
def test_identical_math_gives_identical_samples(temperature, top_p, greedy):
  logits = _logits()
  kw = dict(greedy=greedy, top_k=0, use_top_p=top_p < 1.0)
  args = (jnp.float32(temperature), jnp.float32(top_p))
  new_fn = jax.jit(lambda lg, k: _sample_step(lg, k, *args, **kw))
  old_fn = jax.jit(lambda lg, k: _old_sample_step(lg, k, *args, **kw))
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    new, old = new_fn(logits, key), old_fn(logits, key)
    np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(old[0]))
    np.testing.assert_allclose(np.asarray(new[1]), np.asarray(old[1]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new[2]), np.asarray(old[2]), atol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_top_k_keeps_the_distribution(top_p):
  v, k, temperature, draws = 9, 4, 0.8, 40_000
  logits = _logits(b=1, v=v, seed=3)
  kw = dict(greedy=False, top_k=k, use_top_p=top_p < 1.0)
  z_old = filter_logits(logits / temperature, k, top_p, top_p < 1.0)
  old_lp = np.asarray(jax.nn.log_softmax(z_old, axis=-1))[0]  # [V], -inf outside the kept set
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  step = jax.jit(jax.vmap(lambda key: _sample_step(logits, key, jnp.float32(temperature),
                                                   jnp.float32(top_p), **kw)))
  tok, lp, raw_lp = (np.asarray(x)[:, 0] for x in step(keys))
  assert np.isfinite(old_lp[tok]).all()  # never outside the old kept set
  np.testing.assert_allclose(lp, old_lp[tok], atol=1e-5)  # the reported log-prob is the old one
  raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))[0]
  np.testing.assert_allclose(raw_lp, raw[tok], atol=1e-5)
  freq = np.bincount(tok, minlength=v) / draws
  p = np.exp(old_lp)
  sigma = np.sqrt(p * (1 - p) / draws) + 1e-9
  assert np.all(np.abs(freq - p) < 5 * sigma + 1e-4), (freq, p)


def test_bfloat16_selection_picks_the_same_top_k():
  rng = np.random.default_rng(5)  # values 0.1 apart: distinct and in the same order in bf16
  logits = jnp.asarray(np.stack([rng.permutation(300) for _ in range(8)]) * 0.1 - 15.0, jnp.float32)
  kw = dict(greedy=False, top_k=20, use_top_p=True)
  key = jax.random.PRNGKey(9)
  a = _sample_step(logits, key, jnp.float32(0.9), jnp.float32(0.9), **kw)
  b = _sample_step(logits, key, jnp.float32(0.9), jnp.float32(0.9), select_dtype=jnp.bfloat16, **kw)
  for x, y in zip(a, b):  # bf16 only ranks; the kept values and the log-probs stay float32
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert b[1].dtype == jnp.float32
