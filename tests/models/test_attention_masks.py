"""Attention without dense masks and the compile-time kernel fallback.

(a) `attention.native_mask` (compaction + lengths + causal + window) reproduces the dense allowed
    mask exactly: the dense mask is rebuilt from the native arguments by a numpy reference of
    `jax.nn.dot_product_attention`'s documented semantics and compared, entry by entry.
(b) the XLA twin of the native cuDNN call (`implementation="xla"` with the native arguments)
    equals the dense-mask path (values and gradients, 1e-5, on the real tokens).
(c) dispatch: splash on TPU without a dense mask, cuDNN on GPU; the model's common case hands the
    kernel no mask and no bias (a spy on `jax.nn.dot_product_attention`).
Fallback: a kernel that fails to compile (cuDNN on CPU; a kernel rejecting at trace time) runs
the XLA path with exactly one warning per process and kernel/error type.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.models import attention as attn
from jaxrl_dense.models import transformer
from jaxrl_dense.models.config import ModelConfig

B, T, H, HKV, HD = 4, 12, 4, 2, 8


def _valid():
  m = np.ones((B, T), bool)
  m[0, :5] = False  # left-padded prompt, full response
  m[1, :3] = False  # left-padded prompt and right-padded response (the RL layout)
  m[1, -4:] = False
  m[2, -6:] = False  # right padding only
  m[3, [0, 1, 6, 7, 10]] = False  # holes (left padding + gaps)
  return m


def _qkv(seed, dtype=np.float32, t=T, hd=HD):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(B, t, H, hd)), dtype),
          jnp.asarray(r.normal(size=(B, t, HKV, hd)), dtype),
          jnp.asarray(r.normal(size=(B, t, HKV, hd)), dtype))


def _dense_from_native(nm):
  """numpy: the mask `jax.nn.dot_product_attention` applies for these native arguments, in the
  compacted frame (q/kv lengths, top-left causal, (left, right) window), mapped back to tokens."""
  order, inverse, lengths = (np.asarray(x) for x in (nm.order, nm.inverse, nm.lengths))
  i = np.arange(order.shape[1])[:, None]
  j = np.arange(order.shape[1])[None, :]
  ok = (i < lengths[:, None, None]) & (j < lengths[:, None, None])  # [B, T, T] compacted
  if nm.is_causal:
    ok &= j <= i
  if nm.local_window_size is not None:
    left, right = nm.local_window_size
    ok &= (j >= i - left) & (j <= i + right)
  rows = np.arange(order.shape[0])[:, None, None]
  return ok[rows, inverse[:, :, None], inverse[:, None, :]]  # [B, T, T] token order


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_native_arguments_reproduce_the_dense_mask(causal, window):
  m = _valid()
  nm = attn.native_mask(jnp.asarray(m), causal=causal, window=window)
  order, inverse = np.asarray(nm.order), np.asarray(nm.inverse)
  rows = np.arange(B)[:, None]
  np.testing.assert_array_equal(order[rows, inverse], np.broadcast_to(np.arange(T), (B, T)))
  np.testing.assert_array_equal(np.asarray(nm.lengths), m.sum(1))
  assert all(m[b, order[b, :m[b].sum()]].all() for b in range(B))  # real tokens first
  rank = np.maximum(np.cumsum(m, 1) - 1, 0)
  dense = np.asarray(attn.allowed_mask(jnp.asarray(m, jnp.int32), jnp.asarray(m, jnp.int32),
                                       jnp.asarray(rank), jnp.asarray(rank), causal=causal,
                                       window=window))
  np.testing.assert_array_equal(_dense_from_native(nm), dense)
  # Contiguous rows (0-2): the raw token index gives the same mask (the old model's masks).
  idx = jnp.broadcast_to(jnp.arange(T), (B, T))
  raw = np.asarray(attn.allowed_mask(jnp.asarray(m, jnp.int32), jnp.asarray(m, jnp.int32), idx, idx,
                                     causal=causal, window=window))
  np.testing.assert_array_equal(_dense_from_native(nm)[:3], raw[:3])
  # Control: lengths without the compaction are wrong for left padding.
  uncompacted = nm._replace(order=jnp.asarray(np.broadcast_to(np.arange(T), (B, T))),
                            inverse=jnp.asarray(np.broadcast_to(np.arange(T), (B, T))))
  assert not np.array_equal(_dense_from_native(uncompacted)[0], dense[0])


@pytest.mark.parametrize("window", [None, 3])
def test_native_xla_twin_equals_the_dense_path_values_and_grads(window):
  q, k, v = _qkv(0)
  m = _valid()
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, HD)), jnp.float32)
  real = jnp.asarray(m)[:, :, None, None]

  def loss(q, k, v, native):
    if native:
      out = attn.attention(q, k, v, valid=jnp.asarray(m), window=window, implementation="xla")
    else:  # the dense path: segment ids + rank indices -> a [B, 1, T, S] mask
      rank = jnp.asarray(np.maximum(np.cumsum(m, 1) - 1, 0))
      out = attn.attention(q, k, v, q_segment_ids=jnp.asarray(m), kv_segment_ids=jnp.asarray(m),
                           q_index=rank, kv_index=rank, window=window, implementation="xla")
    return jnp.sum(jnp.where(real, out * w, 0)), out

  (l_n, out_n), g_n = jax.jit(jax.value_and_grad(lambda *a: loss(*a, True), (0, 1, 2),
                                                 has_aux=True))(q, k, v)
  (l_d, out_d), g_d = jax.jit(jax.value_and_grad(lambda *a: loss(*a, False), (0, 1, 2),
                                                 has_aux=True))(q, k, v)
  np.testing.assert_allclose(np.asarray(out_n)[m], np.asarray(out_d)[m], atol=1e-5)
  assert np.isfinite(np.asarray(out_n)).all() and not np.asarray(out_n)[~m].any()
  np.testing.assert_allclose(float(l_n), float(l_d), atol=1e-4)
  for a, b in zip(g_n, g_d):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert float(jnp.abs(g_n[1]).max()) > 0.1  # the gradients are not trivially zero
  # ... and both equal the einsum (CPU default) on the real tokens.
  ein = attn.attention(q, k, v, valid=jnp.asarray(m), window=window, implementation="einsum")
  np.testing.assert_allclose(np.asarray(ein)[m], np.asarray(out_n)[m], atol=1e-5)


def test_dispatch_selects_splash_and_cudnn_without_a_dense_mask():
  q = jnp.zeros((2, 256, 8, 64), jnp.bfloat16)
  k = jnp.zeros((2, 256, 2, 64), jnp.bfloat16)
  assert attn.choose_implementation(q, k, platform="tpu", dense_mask=False) == "splash"
  assert attn.choose_implementation(q, k, platform="tpu", dense_mask=True) == "xla"
  assert attn.choose_implementation(q, k, platform="gpu", dense_mask=False) == "cudnn"
  assert attn.choose_implementation(q, k, platform="gpu", window=4) == "cudnn"
  with pytest.raises(ValueError, match="valid= or segment ids"):
    attn.attention(q, k, k, valid=jnp.ones((2, 256), bool), q_segment_ids=jnp.ones((2, 256)))


@pytest.fixture
def fresh_verdicts(monkeypatch):
  """Empty probe caches, the platform seen as a GPU, no environment override."""
  monkeypatch.setattr(attn, "_KERNEL_VERDICTS", {})
  monkeypatch.setattr(attn, "_WARNED", set())
  monkeypatch.setattr(attn, "_platform", lambda: "gpu")
  monkeypatch.delenv("JAXRL_ATTENTION", raising=False)


def _spy(monkeypatch, reject_cudnn=False):
  """Records every jax.nn.dot_product_attention call; runs cuDNN requests as XLA (CPU)."""
  calls = []
  real = jax.nn.dot_product_attention

  def spy(query, key, value, bias=None, mask=None, **kw):
    calls.append(dict(kw, bias=bias, mask=mask, q_shape=query.shape))
    if kw.get("implementation") == "cudnn":
      if reject_cudnn:
        raise ValueError("cuDNN rejects this shape (forced by the test)")
      kw = dict(kw, implementation="xla")
    return real(query, key, value, bias=bias, mask=mask, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  return calls


TINY = dict(model_type="qwen2", vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", tie_word_embeddings=True)


@pytest.mark.parametrize("sliding", [False, True])
def test_model_hands_cudnn_no_mask_and_no_bias(monkeypatch, sliding):
  extra = dict(sliding_window=3, layer_types=("sliding_attention", "full_attention"),
               rope_local_theta=10000.0) if sliding else {}
  config = ModelConfig(**TINY, **extra)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 53, size=(B, 13)), jnp.int32)
  m = np.ones((B, 13), bool)
  m[0, :4] = False  # left-padded prompt
  m[1, :2] = False  # left-padded prompt, right-padded response
  m[1, -3:] = False
  m[2, -5:] = False
  ref = transformer.hidden_states(params, config, tokens, jnp.asarray(m))  # CPU: the einsum
  monkeypatch.setattr(attn, "_KERNEL_VERDICTS", {})
  monkeypatch.setattr(attn, "_platform", lambda: "gpu")
  monkeypatch.delenv("JAXRL_ATTENTION", raising=False)
  calls = _spy(monkeypatch)
  out = jax.jit(lambda p, t, mk: transformer.hidden_states.__wrapped__(p, config, t, mk))(
      params, tokens, jnp.asarray(m))  # a fresh trace (not hidden_states' cached one)
  assert calls and all(c["implementation"] == "cudnn" for c in calls)  # probe + the model
  for c in calls:
    assert c["mask"] is None and c["bias"] is None  # no [B, 1, T, S] array reaches cuDNN
    assert c["is_causal"] and c["query_seq_lengths"] is not None
  windows = {c["local_window_size"] for c in calls}
  assert windows == ({(2, 0), None} if sliding else {None})
  ok = m[:, :, None]
  np.testing.assert_allclose(np.where(ok, np.asarray(out, np.float32), 0),
                             np.where(ok, np.asarray(ref, np.float32), 0), atol=0.1)


def test_cudnn_compile_failure_falls_back_with_one_warning(fresh_verdicts, caplog):
  """On CPU the real cuDNN call cannot compile: "auto" (seen as a GPU) must run XLA instead."""
  m = jnp.asarray(_valid())
  q, k, v = _qkv(2, jnp.bfloat16)
  xla = attn.attention(q, k, v, valid=m, implementation="xla")
  with caplog.at_level(logging.WARNING, logger=attn.__name__):
    out = attn.attention(q, k, v, valid=m)  # auto -> cudnn -> probe fails -> xla
    out2 = jax.jit(lambda q, k, v: attn.attention(q, k, v, valid=m))(q, k, v)  # cached verdict
    q3, k3, v3 = _qkv(3, jnp.bfloat16, t=T + 4)  # another signature, same reason: no new warning
    attn.attention(q3, k3, v3, valid=jnp.ones((B, T + 4), bool))
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(xla, np.float32))
  np.testing.assert_array_equal(np.asarray(out2, np.float32), np.asarray(xla, np.float32))
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "cudnn" in warnings[0].getMessage()
  assert len(attn._KERNEL_VERDICTS) == 2 and all(attn._KERNEL_VERDICTS.values())
  with pytest.raises(Exception):  # an explicit implementation is not second-guessed
    attn.attention(q, k, v, valid=m, implementation="cudnn")


def test_trace_time_rejection_falls_back_values_and_grads(fresh_verdicts, monkeypatch, caplog):
  calls = _spy(monkeypatch, reject_cudnn=True)
  m = jnp.asarray(_valid())
  q, k, v = _qkv(4, jnp.bfloat16)
  f = lambda impl: jax.grad(lambda q, k, v: jnp.sum(attn.attention(
      q, k, v, valid=m, window=3, implementation=impl).astype(jnp.float32) ** 2), (0, 1, 2))
  with caplog.at_level(logging.WARNING, logger=attn.__name__):
    g_auto = f("auto")(q, k, v)
    g_auto2 = f("auto")(q, k, v)
  g_xla = f("xla")(q, k, v)
  for a, a2, b in zip(g_auto, g_auto2, g_xla):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_array_equal(np.asarray(a2, np.float32), np.asarray(b, np.float32))
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "cuDNN rejects this shape" in warnings[0].getMessage()
  assert sum(c["implementation"] == "cudnn" for c in calls) == 1  # probed once, then cached
  # Control: with a kernel that compiles, "auto" keeps it (no warning, no fallback).
  monkeypatch.setattr(attn, "_KERNEL_VERDICTS", {})
  monkeypatch.setattr(attn, "_WARNED", set())
  calls = _spy(monkeypatch, reject_cudnn=False)
  caplog.clear()
  attn.attention(q, k, v, valid=m, window=3)
  assert [c["implementation"] for c in calls] == ["cudnn", "cudnn"]  # the probe, then the call
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]
