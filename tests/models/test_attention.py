"""Every attention path that runs on CPU equals a float64 numpy reference (f32, atol 1e-5).

Cases cover left padding, right padding, packed segments, GQA, sliding windows, the logit
soft-cap, the shared-prefix log-sum-exp combine (values and gradients) and decode with a live
length shorter than the cache (XLA blocked loop and the Pallas GPU kernel in interpret mode).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # print_saved_residuals' list form

from jaxrl_dense.models import attention as attn

B, T, H, HKV, HD = 3, 11, 6, 2, 8


def _ref(q, k, v, allowed, softcap=None):
  """float64 numpy GQA attention; q [B,T,H,hd], k/v [B,S,Hkv,hd], allowed [B,T,S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # HF repeat_kv
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  s = np.where(np.asarray(allowed)[:, None], s, -1e30)  # fully masked rows: uniform, unused
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(seed, b=B, t=T, s=None, h=H, hkv=HKV, hd=HD):
  r = np.random.default_rng(seed)
  s = t if s is None else s
  return (r.normal(size=(b, t, h, hd)).astype(np.float32),
          r.normal(size=(b, s, hkv, hd)).astype(np.float32),
          r.normal(size=(b, s, hkv, hd)).astype(np.float32))


def _padded_mask():
  m = np.ones((B, T), np.int32)
  m[1, :4] = 0  # left padding
  m[2, :7] = 0
  m[0, -3:] = 0  # right padding
  return m


def _allowed_np(seg_q, seg_kv, qi, ki, causal, window):
  ok = (seg_q[:, :, None] == seg_kv[:, None, :]) & (seg_kv[:, None, :] != 0)
  if causal:
    ok &= ki[:, None, :] <= qi[:, :, None]
  if window is not None:
    ok &= qi[:, :, None] - ki[:, None, :] < window
  return ok


@pytest.mark.parametrize("impl", ["xla", "einsum", "auto"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("hkv", [1, 2, 6])
def test_attention_equals_reference_with_padding_and_gqa(impl, window, hkv):
  q, k, v = _qkv(0, hkv=hkv)
  m = _padded_mask()
  out = attn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=m,
                       kv_segment_ids=m, window=window, implementation=impl)
  idx = np.broadcast_to(np.arange(T), (B, T))
  ref = _ref(q, k, v, _allowed_np(m, m, idx, idx, True, window))
  valid = m.astype(bool)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # fully masked padding queries stay finite


def test_packed_segments_and_softcap():
  q, k, v = _qkv(1)
  seg = np.array([[1] * 5 + [2] * 6, [1] * 11, [1] * 3 + [2] * 3 + [3] * 3 + [0] * 2])
  idx = np.broadcast_to(np.arange(T), (B, T))
  ref = _ref(q, k, v, _allowed_np(seg, seg, idx, idx, True, None), softcap=2.0)
  out = attn.attention(jnp.asarray(q * 3), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg,
                       kv_segment_ids=seg, softcap=2.0)  # auto -> einsum (soft-cap)
  ref = _ref(q * 3, k, v, _allowed_np(seg, seg, idx, idx, True, None), softcap=2.0)
  valid = seg > 0
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5)
  with pytest.raises(ValueError, match="soft-cap"):
    attn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), softcap=2.0,
                   implementation="xla")


def test_lse_is_the_logsumexp_of_the_masked_scores():
  q, k, v = _qkv(2)
  m = _padded_mask()
  _, lse = attn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=m,
                          kv_segment_ids=m, return_lse=True)
  kk = np.repeat(k, H // HKV, axis=2).astype(np.float64)
  s = np.einsum("bthd,bshd->bths", q, kk) / np.sqrt(HD)
  idx = np.broadcast_to(np.arange(T), (B, T))
  ok = _allowed_np(m, m, idx, idx, True, None)[:, :, None]
  s = np.where(ok, s, -1e30)
  ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  valid = m.astype(bool)
  np.testing.assert_allclose(np.asarray(lse)[valid], ref[valid], atol=1e-5)


def _prefix_case(seed=3, g=2, n=3, p=7, r=5, window=None):
  rng = np.random.default_rng(seed)
  q, k, v = _qkv(seed, b=g * n, t=r)
  pk = rng.normal(size=(g, p, HKV, HD)).astype(np.float32)
  pv = rng.normal(size=(g, p, HKV, HD)).astype(np.float32)
  pmask = np.ones((g, p), np.int32)
  pmask[1, :3] = 0  # left-padded prompt
  rmask = np.ones((g * n, r), np.int32)
  rmask[1, 3:] = 0  # right-padded responses
  rmask[4, 1:] = 0
  # Reference: one attention over the concatenated rows [prompt ; response].
  fk = np.concatenate([np.repeat(pk, n, 0), k], axis=1)
  fv = np.concatenate([np.repeat(pv, n, 0), v], axis=1)
  seg_kv = np.concatenate([np.repeat(pmask, n, 0), rmask], axis=1)
  qi = np.broadcast_to(p + np.arange(r), (g * n, r))
  ki = np.broadcast_to(np.arange(p + r), (g * n, p + r))
  allowed = _allowed_np(rmask, seg_kv, qi, ki, True, window)
  return (q, k, v, pk, pv, pmask, rmask), _ref(q, fk, fv, allowed), (fk, fv, allowed)


@pytest.mark.parametrize("window", [None, 4])
def test_prefix_attention_lse_combine_equals_concatenated_rows(window):
  (q, k, v, pk, pv, pmask, rmask), ref, _ = _prefix_case(window=window)
  out = jax.jit(lambda *a: attn.prefix_attention(*a, q_segment_ids=rmask, prefix_segment_ids=pmask,
                                                 window=window))(q, k, v, pk, pv)
  valid = rmask.astype(bool)
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_prefix_attention_gradients_equal_concatenated_rows():
  (q, k, v, pk, pv, pmask, rmask), _, (fk, fv, allowed) = _prefix_case(seed=4)
  n = q.shape[0] // pk.shape[0]
  w = np.random.default_rng(5).normal(size=q.shape).astype(np.float32) * rmask[..., None, None]

  def combined(q, k, v, pk, pv):
    out = attn.prefix_attention(q, k, v, pk, pv, q_segment_ids=rmask, prefix_segment_ids=pmask)
    return jnp.sum(out * w)

  def concat(q, k, v, pk, pv):
    fk = jnp.concatenate([jnp.repeat(pk, n, 0), k], axis=1)
    fv = jnp.concatenate([jnp.repeat(pv, n, 0), v], axis=1)
    out, _ = attn._einsum_attention(q, fk, fv, jnp.asarray(allowed), HD ** -0.5, None)
    return jnp.sum(out * w)

  ga = jax.jit(jax.grad(combined, argnums=(0, 1, 2, 3, 4)))(q, k, v, pk, pv)
  gb = jax.jit(jax.grad(concat, argnums=(0, 1, 2, 3, 4)))(q, k, v, pk, pv)
  for a, b in zip(ga, gb):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _decode_case(seed, s=40, window=None):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, H, HD)).astype(np.float32)
  kc = rng.normal(size=(B, HKV, s, HD)).astype(np.float32)
  vc = rng.normal(size=(B, HKV, s, HD)).astype(np.float32)
  start = np.array([0, 3, 9], np.int32)  # left-padded prompts of different lengths
  length = 23  # live slots [start, 23) < cache length; slots >= 23 hold junk
  kc[:, :, length:] = 1e3  # junk the kernel must never read into the result
  vc[:, :, length:] = 1e3
  slots = np.arange(s)
  ok = (slots[None] >= start[:, None]) & (slots[None] < length)
  if window is not None:
    ok &= slots[None] > length - 1 - window
  allowed = ok[:, None, :]  # [B, 1, S]
  ref = _ref(q[:, None], kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3), allowed)[:, 0]
  return q, kc, vc, start, length, ref


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_xla_reads_live_length_and_equals_reference(chunk, window):
  q, kc, vc, start, length, ref = _decode_case(6, window=window)
  out = jax.jit(lambda *a: attn.decode_attention(*a, start=start, length=length, window=window,
                                                 implementation="xla", chunk=chunk))(q, kc, vc)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_decode_xla_softcap_and_per_row_length():
  q, kc, vc, start, _, _ = _decode_case(7)
  length = np.array([23, 30, 12], np.int32)
  kc[:, :, 23:30], vc[:, :, 23:30] = kc[:, :, :7], vc[:, :, :7]  # live in row 1: no junk
  slots = np.arange(kc.shape[2])
  ok = (slots[None] >= start[:, None]) & (slots[None] < length[:, None])
  ref = _ref(q[:, None], kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3), ok[:, None],
             softcap=1.5)[:, 0]
  out = attn.decode_attention(q, kc, vc, start=start, length=length, softcap=1.5, chunk=16)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_decode_pallas_kernel_in_interpret_mode():
  q, kc, vc, start, length, ref = _decode_case(8, s=32)
  out = attn.decode_attention(q, kc, vc, start=start, length=length, implementation="pallas")
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_environment_override_of_the_auto_choice(monkeypatch):
  q, k, v = _qkv(10)
  m = _padded_mask()
  idx = np.broadcast_to(np.arange(T), (B, T))
  ref = _ref(q, k, v, _allowed_np(m, m, idx, idx, True, None))
  monkeypatch.setenv("JAXRL_ATTENTION", "xla")  # jax.nn.dot_product_attention instead of einsum
  out = attn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=m,
                       kv_segment_ids=m)
  np.testing.assert_allclose(np.asarray(out)[m > 0], ref[m > 0], atol=1e-5)
  monkeypatch.setenv("JAXRL_DECODE_ATTENTION", "pallas")  # interpret mode on CPU
  qd, kc, vc, start, length, dref = _decode_case(11, s=32)
  np.testing.assert_allclose(np.asarray(attn.decode_attention(qd, kc, vc, start=start, length=length)),
                             dref, atol=1e-5)


def test_dispatch_by_platform_and_bad_inputs():
  q = jnp.zeros((2, 256, 8, 64), jnp.bfloat16)
  k = jnp.zeros((2, 256, 2, 64), jnp.bfloat16)
  assert attn.choose_implementation(q, k, platform="gpu") == "cudnn"
  assert attn.choose_implementation(q.astype(jnp.float32), k, platform="gpu") == "xla"
  assert attn.choose_implementation(q, k, platform="gpu", softcap=30.0) == "einsum"
  assert attn.choose_implementation(q, k, platform="tpu") == "splash"
  assert attn.choose_implementation(q, k, platform="cpu") == "einsum"
  assert attn.choose_implementation(q.astype(jnp.float32), k, platform="tpu", dense_mask=True) == "xla"
  assert attn.choose_implementation(q, k, platform="gpu", return_lse=True) == "einsum"
  kc = jnp.zeros((2, 2, 512, 64), jnp.bfloat16)
  assert attn.choose_decode_implementation(q[:, 0], kc, platform="gpu") == "pallas"
  assert attn.choose_decode_implementation(q[:, 0], kc, platform="cpu") == "xla"
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attn.attention(jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)))
  with pytest.raises(ValueError, match="window"):
    attn.attention(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)),
                   window=0)
  with pytest.raises(ValueError, match="implementation"):
    attn.decode_attention(jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 4, 8)), jnp.zeros((1, 2, 4, 8)),
                          start=0, length=1, implementation="cudnn")


# ------------------------------------------------------------------------------------------------
# Remat policies (ModelConfig.remat_policy): same gradients, different saved activations.
# ------------------------------------------------------------------------------------------------
def _lm_loss(config):
  from jaxrl_dense.models import transformer

  def loss(params, tokens, mask):
    logits = transformer.logits_from_hidden(
        params, config, transformer.hidden_states(params, config, tokens, mask))
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok_lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(tok_lp * mask[:, 1:]) / jnp.sum(mask[:, 1:])
  return loss


def test_remat_policies_give_identical_gradients():
  from jaxrl_dense.models import ModelConfig, init_params
  from jaxrl_dense.models.config import REMAT_POLICIES
  base = ModelConfig(model_type="qwen2", vocab_size=53, hidden_size=16, intermediate_size=24,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, attention_bias=True)
  params = init_params(base, jax.random.PRNGKey(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 9)), jnp.int32)
  mask = jnp.asarray(_padded_mask()[:2, :9])
  ref = jax.jit(jax.grad(_lm_loss(base)))(params, tokens, mask)  # no remat at all
  saved = {}
  for name in REMAT_POLICIES:
    cfg = base.replace(remat=True, remat_policy=name)
    grads = jax.jit(jax.grad(_lm_loss(cfg)))(params, tokens, mask)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=name)
    res = saved_residuals(_lm_loss(cfg), params, tokens, mask)
    saved[name] = sum(int(np.prod(shape.shape)) for shape, _ in res)
  # More saved names -> more residual floats; "full" keeps the least, no remat the most.
  assert saved["full"] < saved["save_qkv_proj"] < saved["save_dots_except_mlp"]
  assert saved["save_dots_except_mlp"] <= saved["save_dots_except_mlp_in"] <= saved["save_dots"]
  assert saved["save_dots"] < saved["none"]
  with pytest.raises(ValueError, match="remat_policy"):
    base.replace(remat_policy="everything")
