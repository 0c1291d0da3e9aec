"""Shared-prompt training (`group_size`): each prompt runs once per group; values and gradients
equal the row-by-row computation on padded RL batches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


# Tolerance of float32 gradients of the sharpened (x6) test model: eps32 (1.2e-7) times the
# conditioning of its saturated softmaxes (~1e3) = 1e-4. Measured on a 2-core EPYC: worst leaf
# 4e-5 (relative norm), worst SGD update 6e-5 of the largest update. Masking or prefix bugs show
# as O(1) relative errors, far above it.
F32_SHARP_TOL = 1e-4


def _close_grads(x, y, tol=F32_SHARP_TOL):
  """Leafwise ||x - y|| <= tol ||y||, or max|x - y| <= tol * max|y| over the whole tree (for
  leaves whose exact gradient is 0 and whose computed one is rounding noise, e.g. the key bias,
  which softmax's shift invariance makes irrelevant)."""
  scale = max(float(np.max(np.abs(np.asarray(c)))) for c in jax.tree.leaves(y))
  for a, c in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
    ok = np.linalg.norm(a - c) <= tol * np.linalg.norm(c) or np.abs(a - c).max() <= tol * scale
    assert ok, (np.linalg.norm(a - c) / np.linalg.norm(c), np.abs(a - c).max() / scale)


def _close_tree(x, y, tol, atol=0.0):
  """Leafwise ||x - y|| <= tol * ||y|| or max|x - y| <= atol (float32 sums in another order)."""
  for a, c in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
    ok = np.linalg.norm(a - c) <= tol * np.linalg.norm(c) or np.abs(a - c).max() <= atol
    assert ok, (np.abs(a - c).max(), np.linalg.norm(c))

from jaxrl_dense.models import ModelConfig, init_params
from jaxrl_dense.models import transformer
from jaxrl_dense.rl import state as state_lib
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import steps

CONFIG = ModelConfig(model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                     tie_word_embeddings=False)
G, N, P, R = 3, 4, 9, 6


def _params(config=CONFIG):
  params = init_params(config, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x, params)  # sharp, so errors show


def _batch(seed=0):
  """G left-padded prompts (different lengths), n right-padded responses each (with EOS cuts)."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, CONFIG.vocab_size, (G, P)).astype(np.int32)
  pmask = np.ones((G, P), np.int32)
  pmask[1, :3] = 0
  pmask[2, :5] = 0
  prompt = prompt * pmask  # pad id 0 on padding
  resp = rng.integers(1, CONFIG.vocab_size, (G * N, R)).astype(np.int32)
  lengths = rng.integers(1, R + 1, G * N)
  rmask = (np.arange(R)[None] < lengths[:, None]).astype(np.int32)
  resp = resp * rmask
  tokens = np.concatenate([np.repeat(prompt, N, 0), resp], axis=1)
  attn = np.concatenate([np.repeat(pmask, N, 0), rmask], axis=1)
  return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attn),
          "response_mask": jnp.asarray(rmask, jnp.float32),
          "acc": jnp.asarray(rng.integers(0, 2, G * N), jnp.float32),
          "advantages": jnp.asarray(rng.normal(size=(G * N, R)), jnp.float32) * rmask}


def test_hidden_states_match_full_rows():
  params, b = _params(), _batch()
  full = transformer.hidden_states(params, CONFIG, b["tokens"], b["attention_mask"])
  ph, rh = transformer.shared_prefix_hidden_states(
      params, CONFIG, b["tokens"][::N, :P], b["attention_mask"][::N, :P], b["tokens"][:, P:],
      b["attention_mask"][:, P:])
  assert ph.shape == (G, P, CONFIG.hidden_size) and rh.shape == (G * N, R, CONFIG.hidden_size)
  rm = np.asarray(b["attention_mask"][:, P:], bool)
  np.testing.assert_allclose(np.asarray(rh)[rm], np.asarray(full[:, P:])[rm], atol=2e-5, rtol=2e-5)
  pm = np.asarray(b["attention_mask"][::N, :P], bool)
  np.testing.assert_allclose(np.asarray(ph)[pm], np.asarray(full[::N, :P])[pm], atol=2e-5, rtol=2e-5)


def test_response_logprobs_and_grads_match():
  params, b = _params(), _batch(1)
  with_entropy = True

  def f(prm, g):
    lp, ent = steps._response_logprobs(prm, CONFIG, b["tokens"], b["attention_mask"], R, with_entropy, g)
    obj = jnp.sum(lp * b["advantages"])
    if with_entropy:
      obj = obj + 0.1 * jnp.sum(ent * b["response_mask"])
    return obj, (lp, ent)

  (v1, (lp1, e1)), g1 = jax.value_and_grad(f, has_aux=True)(params, 1)
  (vn, (lpn, en)), gn = jax.value_and_grad(f, has_aux=True)(params, N)
  np.testing.assert_allclose(lpn, lp1, atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(lp1)[np.asarray(b["response_mask"]) == 0] == 0)
  if with_entropy:
    np.testing.assert_allclose(en, e1, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(vn, v1, rtol=2e-5)
  _close_grads(gn, g1)


def _close_updates(new, ref, start, rtol):
  """Parameter updates (new - start vs ref - start) equal up to rtol of the largest update."""
  d_new = jax.tree.map(lambda a, s: np.asarray(a, np.float64) - np.asarray(s, np.float64), new, start)
  d_ref = jax.tree.map(lambda a, s: np.asarray(a, np.float64) - np.asarray(s, np.float64), ref, start)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(d_ref))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale), d_new, d_ref)


def test_policy_and_prm_updates_match_rowwise():
  # SGD, not Adam: parameters after an SGD step are linear in the gradients, so float32
  # summation-order differences stay at their own size. Adam divides by sqrt(v) + eps and turns
  # them into full-size steps on near-zero gradients (ill-conditioned by construction).
  # A small step size keeps 3-4 sequential steps close to linear in the gradients (a large one
  # lets the sharpened model amplify the rounding of step 1 in steps 2-4).
  params, b = _params(), _batch(2)
  opt = optax.sgd(1e-2)
  b = dict(b, old_logp=jnp.zeros_like(b["response_mask"]) - 1.0, ref_logp=jnp.zeros_like(b["response_mask"]) - 2.0)
  out = {}
  for g in (1, N):
    pol = jax.jit(steps.make_policy_update(CONFIG, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=4,
                                   micro_batch_size=4, epochs=2, shuffle=False, group_size=g), donate_argnums=(0,))
    fresh = lambda: jax.tree.map(jnp.copy, params)  # the updates donate their state
    st, m = pol(state_lib.TrainState(fresh(), opt.init(params), jnp.zeros((), jnp.int32)), b,
                jax.random.PRNGKey(0))
    prm = jax.jit(steps.make_prm_update(CONFIG, opt, beta=0.05, mini_batch_size=4, micro_batch_size=4,
                                group_size=g), donate_argnums=(0,))
    pst, prm_logp, pm = prm(state_lib.TrainState(fresh(), opt.init(params), jnp.zeros((), jnp.int32)), b)
    out[g] = (st.params, m, pst.params, prm_logp, pm)
  (p1, m1, q1, l1, n1), (pn, mn, qn, ln, nn_) = out[1], out[N]
  # float32 rounding of sums over the batch's tokens, relative to the largest update
  _close_updates(pn, p1, params, 2 * F32_SHARP_TOL)  # 4 SGD steps compound the gradient error
  _close_updates(qn, q1, params, 2 * F32_SHARP_TOL)
  np.testing.assert_allclose(ln, l1, atol=2e-5, rtol=2e-5)
  for k in m1:
    np.testing.assert_allclose(mn[k], m1[k], atol=1e-5, rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(nn_["prm/loss"], n1["prm/loss"], rtol=1e-5)


def test_group_shuffle_keeps_groups_and_matches_rowwise_on_group_perm():
  """With shuffle, group_size=n permutes whole groups; the update is a valid PPO step."""
  params, b = _params(), _batch(3)
  b = dict(b, old_logp=jnp.zeros_like(b["response_mask"]) - 1.0)
  opt = optax.sgd(1e-2)
  pol = jax.jit(steps.make_policy_update(CONFIG, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=12,
                                 micro_batch_size=4, shuffle=True, group_size=N), donate_argnums=(0,))
  st, m = pol(state_lib.TrainState(jax.tree.map(jnp.copy, params), opt.init(params),
                                   jnp.zeros((), jnp.int32)), b, jax.random.PRNGKey(5))
  # One mini-batch = all rows: the shuffled update equals the unshuffled one.
  pol0 = jax.jit(steps.make_policy_update(CONFIG, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=12,
                                  micro_batch_size=4, shuffle=False, group_size=1), donate_argnums=(0,))
  st0, _ = pol0(state_lib.TrainState(params, opt.init(params), jnp.zeros((), jnp.int32)), b,
                jax.random.PRNGKey(5))
  _close_tree(st.params, st0.params, 1e-5, atol=1e-6)


def test_bad_group_size_is_named():
  opt = optax.sgd(1e-2)
  with pytest.raises(ValueError, match="micro_batch_size=6 must be a multiple of group_size=4"):
    steps.make_policy_update(CONFIG, opt, config_lib.PolicyConfig(entropy_coeff=0.0), mini_batch_size=12,
                             micro_batch_size=6, group_size=4)
  with pytest.raises(ValueError, match="group_size=0"):
    steps.make_scoring(CONFIG, micro_batch_size=4, group_size=0)
  with pytest.raises(ValueError, match="multiple of the prompts"):
    params = _params()
    transformer.shared_prefix_hidden_states(params, CONFIG, jnp.ones((3, 4), jnp.int32),
                                            jnp.ones((3, 4), jnp.int32), jnp.ones((7, 2), jnp.int32),
                                            jnp.ones((7, 2), jnp.int32))
