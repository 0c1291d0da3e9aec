"""Attention for every pass of the decoder: one entry point per pass, the kernel picked by platform.

  attention(q, k, v, ...)          training, scoring and prefill: q [B, T, H, hd], k/v [B, S, Hkv, hd]
  prefix_attention(q, k, v, pk, pv, ...)
                                   n continuations per prompt attend to the prompt's keys (once per
                                   prompt, no copy per sample) and to their own causal prefix; the two
                                   partial softmaxes are combined by log-sum-exp
  decode_attention(q, k_cache, v_cache, ...)
                                   one query per row against the KV cache [B, Hkv, S, hd], reading
                                   only the live slots

Every pass computes, per query head h (kv head h // (H / Hkv), as HF `repeat_kv`):

  s_ij = (q_i . k_j) / sqrt(hd)               (float32 accumulation)
  s_ij = c * tanh(s_ij / c)                   (logit soft-cap c, Gemma 2; optional)
  o_i  = sum_j softmax_j(s_ij | allowed(i, j)) v_j
  allowed(i, j) = seg_q[i] == seg_kv[j] != 0                      (padding has segment 0)
                  and (not causal or idx_kv[j] <= idx_q[i])
                  and (window is None or idx_q[i] - idx_kv[j] < window)   (HF sliding window)

with `idx` the token's index in the row (default arange) and segment ids 1/0 for a padded batch
(1..n for packed rows). Queries with no allowed key (padding) give a finite average of the values
(their outputs are never read). Log-sum-exp combine (FlashAttention-2 sec. 3.1.1; MaxText
`attention_op.py`): with o_a, L_a = logsumexp_j s_ij over key set a,

  o = sum_a exp(L_a - L) o_a,   L = logsumexp_a L_a,

which equals one softmax over the union of the key sets.

Masks without a dense array (`valid=`): causal self-attention over rows whose real tokens are
marked by a bool `valid` [B, T] (left-padded prompts, right-padded responses, any holes) is
handed to the kernels as native masks, never as a [B, T, S] array: `native_mask` compacts each
row (its real tokens first, in order: a permutation gathered in and out, its transpose a gather
too), after which the mask is exactly

  allowed(i', j') = i' < n_b and j' < n_b and j' <= i' (causal) and i' - j' < window

on the compacted indices i', j' (n_b = the row's real-token count) = `jax.nn.dot_product_attention`'s
`query_seq_lengths = key_value_seq_lengths = n`, `is_causal`, `local_window_size=(window - 1, 0)`:
cuDNN runs its PADDING_CAUSAL (+ sliding-window) mask, with no bias and no bias gradient. Compacted
index = the token's rank among the row's real tokens = the model's position (cumsum(valid) - 1),
so the window counts real tokens (what `transformer.sliding_window_mask` does with positions; the
raw index distance wherever a row's real tokens are contiguous). Splash takes `valid` as its
segment ids (rows compacted first when there is a window). What still needs a dense mask: an
explicit `mask=` argument (the shared-prefix rows, whose causal diagonal is offset per row by the
prompt length: JAX's causal mask is top-left aligned and its cuDNN backward drops the log-sum-exp
cotangent, so neither one call nor a two-pass combine expresses it), packed segment ids
(`q_segment_ids`/`kv_segment_ids` with ids > 1; splash takes them natively) and non-default
indices. Those keep `allowed_mask`: on GPU a [B, 1, T, S] cuDNN bias (with its gradient).

Kernels (`implementation="auto"` picks the first that applies):
  GPU  training/scoring/prefill: cuDNN flash attention through `jax.nn.dot_product_attention`
       (bf16/fp16, head_dim % 8 == 0 and <= 128, no soft-cap, static window); decode: the Pallas
       (Triton) decode kernel `jax.experimental.pallas.ops.gpu.decode_attention` with the live
       slot range [start, length) per row, split over k blocks (flash decoding).
  TPU  splash attention (Pallas, `jax.experimental.pallas.ops.tpu.splash_attention`) with segment
       ids, causal/local static masks and the soft-cap (sequence lengths multiples of 128; no
       dense `mask`).
  else XLA: on CPU an einsum with float32 scores (also wherever the log-sum-exp or the soft-cap
       is needed), elsewhere `jax.nn.dot_product_attention(implementation="xla")`; decode runs a `lax.fori_loop` over blocks of
       `chunk` cache slots bounded by the longest live length (online softmax), so a step reads
       O(live) slots, not O(S).
Every path that runs on CPU is tested equal to an einsum reference (tests/models/test_attention.py).
The GPU/TPU kernels are only reached on those platforms; explicit `implementation=` names force a
path (Pallas decode runs in interpret mode off-GPU, splash off-TPU, for tests). Every Pallas
kernel runs per shard inside `jax.shard_map` (`rules.shard_kernel`: rows over data x fsdp,
query groups over tensor) when the program is traced under a mesh: a pallas_call has no
partitioning rule, so on sharded operands XLA would otherwise replicate them.

Fallback: a kernel can fail where the wrapper's trace-time checks do not look (cuDNN rejecting a
shape, dtype or version when XLA compiles its custom call). "auto" therefore compiles the chosen
cuDNN / splash call (forward and backward, on abstract shapes: `jax.jit(...).lower(...).compile()`)
once per shape signature and caches the verdict (`_KERNEL_VERDICTS`); a failure runs the XLA path
(same native masks) instead and logs ONE warning per (kernel, error type) per process. On a
machine where a kernel has not been validated, the environment variables JAXRL_ATTENTION /
JAXRL_DECODE_ATTENTION (an implementation name, e.g. "xla") replace the "auto" choice (no probe).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_dense.parallel import rules as _rules

MASK_VALUE = float(np.finfo(np.float32).min)
# Escape hatches for kernels not yet run on a given machine: JAXRL_ATTENTION / JAXRL_DECODE_ATTENTION
# = an implementation name replaces what "auto" would pick (e.g. "xla"), read at trace time.
_ENV_FULL, _ENV_DECODE = "JAXRL_ATTENTION", "JAXRL_DECODE_ATTENTION"
IMPLEMENTATIONS = ("auto", "xla", "einsum", "cudnn", "splash")
DECODE_IMPLEMENTATIONS = ("auto", "xla", "pallas")

Window = Optional[Union[int, jax.Array]]


def _platform() -> str:
  return jax.default_backend()


def _check_qkv(q, k, v):
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q {q.shape} and k {k.shape} must share batch and head_dim.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}).")


def _check_window(window):
  if isinstance(window, (int, np.integer)) and window < 1:
    raise ValueError(f"window must be >= 1 (or None), got {window}.")


def allowed_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, *, causal: bool,
                 window: Window = None) -> jax.Array:
  """bool [B, T, S]: which keys each query may attend (see the module docstring)."""
  ok = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    ok &= kv_index[:, None, :] <= q_index[:, :, None]
  if window is not None:
    ok &= q_index[:, :, None] - kv_index[:, None, :] < window
  return ok


def _defaults(q, k, q_segment_ids, kv_segment_ids, q_index, kv_index):
  b, t = q.shape[:2]
  s = k.shape[1]
  qs = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  ks = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
  qi = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if q_index is None else q_index
  ki = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if kv_index is None else kv_index
  chex.assert_shape([qs, qi], (b, t))
  chex.assert_shape([ks, ki], (b, s))
  return qs, ks, qi, ki


class NativeMask(NamedTuple):
  """What the kernels get instead of a dense mask for causal self-attention over `valid` tokens.

  order [B, T] int32: compacted slot c holds token order[b, c] (the real tokens first, in order).
  inverse [B, T] int32: token t sits at compacted slot inverse[b, t] (the inverse permutation;
    for a real token, its rank among the row's real tokens).
  lengths [B] int32: real tokens per row (`query_seq_lengths` = `key_value_seq_lengths`).
  is_causal: `is_causal`; local_window_size: (window - 1, 0) (causal; (window - 1, T) if not)
    or None (`local_window_size`).
  """
  order: jax.Array
  inverse: jax.Array
  lengths: jax.Array
  is_causal: bool
  local_window_size: Optional[tuple[int, int]]


def native_mask(valid: jax.Array, *, causal: bool = True, window: Optional[int] = None) -> NativeMask:
  """The native-mask arguments of self-attention over the True tokens of `valid` [B, T].

  On the compacted rows (real tokens first) the mask is allowed(i', j') = i' < n and j' < n and
  (not causal or j' <= i') and (window is None or i' - j' < window): exactly
  `allowed_mask(valid, valid, rank, rank, causal, window)` in the original order, rank =
  cumsum(valid) - 1 (tested in tests/models/test_attention.py).
  """
  chex.assert_rank(valid, 2)
  if window is not None and not isinstance(window, (int, np.integer)):
    raise ValueError(f"native masks need a static int window, got {type(window).__name__}.")
  _check_window(window)
  valid = valid.astype(bool)
  real = valid.astype(jnp.int32)
  lengths = jnp.sum(real, axis=1)  # [B]
  inverse = jnp.where(valid, jnp.cumsum(real, axis=1) - 1,
                      lengths[:, None] + jnp.cumsum(1 - real, axis=1) - 1)  # [B, T]
  order = jnp.argsort(inverse, axis=1).astype(jnp.int32)  # [B, T]
  # Non-causal: the window only bounds keys behind the query (as `allowed_mask`); cuDNN takes no
  # right window without its causal mask, so "auto" then falls back to XLA (probe).
  local = None if window is None else (int(window) - 1, 0 if causal else valid.shape[1])
  return NativeMask(order, inverse.astype(jnp.int32), lengths.astype(jnp.int32), bool(causal), local)


@jax.custom_vjp
def _permute(x, order, inverse):
  """x[b, order[b, c]] along axis 1 (a row permutation; `inverse` undoes it, also in the VJP)."""
  return jnp.take_along_axis(x, order[:, :, None, None], axis=1)


def _permute_fwd(x, order, inverse):
  return _permute(x, order, inverse), (order, inverse)


def _permute_bwd(res, g):
  order, inverse = res
  return jnp.take_along_axis(g, inverse[:, :, None, None], axis=1), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _native_attention(q, k, v, order, inverse, lengths, *, is_causal, local_window_size, scale,
                      implementation):
  """`jax.nn.dot_product_attention` on compacted rows with lengths/causal/window: no mask array."""
  qc = _permute(q, order, inverse)  # [B, T, H, hd] real tokens first
  kc = _permute(k.astype(q.dtype), order, inverse)  # [B, S, Hkv, hd]
  vc = _permute(v.astype(q.dtype), order, inverse)
  out = jax.nn.dot_product_attention(
      qc, kc, vc, scale=scale, is_causal=is_causal, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, local_window_size=local_window_size,
      implementation=implementation)  # [B, T, H, hd]
  out = _permute(out.astype(q.dtype), inverse, order)  # back to token order
  real = jnp.arange(q.shape[1])[None, :] < lengths[:, None]  # [B, T] compacted real slots
  real = jnp.take_along_axis(real, inverse, axis=1)  # = valid
  # Padding queries (no allowed key) are zeroed: a kernel may leave them NaN, and their keys /
  # values would poison the next layer's real rows through 0 * NaN.
  return jnp.where(real[:, :, None, None], out, 0).astype(q.dtype)


# Compile verdicts of "auto"'s kernel probes: (kernel, signature) -> None (compiles) or the error.
_KERNEL_VERDICTS: dict = {}
_WARNED: set = set()
_LOG = logging.getLogger(__name__)


def _kernel_compiles(name: str, fn, args, static_key) -> bool:
  """Whether `fn(*args)` (forward and backward) compiles; once per signature, cached.

  `fn` closes over static values only (listed in `static_key`); the probe lowers and compiles
  `value_and_grad` of its float32 sum on abstract shapes, so a kernel rejected when XLA compiles
  its custom call (not only at trace time) is caught before the real program uses it. A failure
  logs one warning per (kernel, error type) per process.
  """
  sig = (name, tuple((tuple(a.shape), str(a.dtype)) for a in args), static_key)
  if sig not in _KERNEL_VERDICTS:
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    loss = lambda q, k, v, *rest: jnp.sum(fn(q, k, v, *rest).astype(jnp.float32))
    try:
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*abstract).compile()
      _KERNEL_VERDICTS[sig] = None
    except Exception as e:  # any lowering / compile error: the XLA path is always available
      _KERNEL_VERDICTS[sig] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      reason = (name, type(e).__name__)
      if reason not in _WARNED:
        _WARNED.add(reason)
        _LOG.warning("attention: the %s kernel does not compile for q %s %s, k %s (%s); using the "
                     "XLA path instead (warned once per kernel and error type; JAXRL_ATTENTION=xla "
                     "silences this).", name, args[0].shape, args[0].dtype, args[1].shape,
                     _KERNEL_VERDICTS[sig])
  return _KERNEL_VERDICTS[sig] is None


def _softcap(scores, softcap):
  return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _einsum_attention(q, k, v, allowed, scale, softcap):
  """float32-score reference kernel. q [B,T,H,hd], k/v [B,S,Hkv,hd], allowed [B,T,S].

  Returns (out [B, T, H, hd] in q's dtype, lse [B, T, H] float32). Differentiable in both outputs.
  """
  b, t, h, hd = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, hd)  # [B, T, Hkv, G, hd]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  scores = _softcap(scores, softcap)  # [B, Hkv, G, T, S]
  scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
  lse = jax.nn.logsumexp(scores, axis=-1)  # [B, Hkv, G, T]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # = exp(scores - lse)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, Hkv, G, hd]
  return out.reshape(b, t, h, hd).astype(q.dtype), lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, window, softcap, scale):
  """Pallas TPU splash attention (MaxText `attention_op.py` tpu_flash_attention), per batch row.

  Segment ids are passed as given: padding (0) attends padding, so no row is fully masked (a
  splash requirement); those rows are never read. Static causal / local masks skip blocks.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU only
  b, t, h, hd = q.shape
  s = k.shape[1]
  if window is not None:
    head_mask = splash.LocalMask((t, s), window_size=(int(window) - 1, 0 if causal else None),
                                 offset=0)
  elif causal:
    head_mask = splash.CausalMask((t, s))
  else:
    head_mask = splash.FullMask((t, s))
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([head_mask] * h), head_shards=1, q_seq_shards=1,
      attn_logits_soft_cap=softcap, interpret=_platform() != "tpu")  # interpreter off-TPU (tests)
  qt = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, hd]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, hd]
  seg = splash.SegmentIds(q=q_segment_ids.astype(jnp.int32), kv=kv_segment_ids.astype(jnp.int32))
  out = jax.vmap(kernel)(qt, kt, vt, segment_ids=seg)  # [B, H, T, hd]
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def choose_implementation(q, k, *, softcap=None, window: Window = None, return_lse: bool = False,
                          default_index: bool = True, dense_mask: bool = False,
                          platform: Optional[str] = None) -> str:
  """The kernel `attention(..., implementation="auto")` uses for these shapes on `platform`.

  A dense `mask` rules out splash (its masks are static block masks plus segment ids).
  """
  platform = platform or _platform()
  static_window = window is None or isinstance(window, (int, np.integer))
  hd = q.shape[-1]
  if return_lse or not static_window or not default_index:
    return "einsum"
  if platform in ("gpu", "cuda", "rocm"):
    if (q.dtype in (jnp.bfloat16, jnp.float16) and hd % 8 == 0 and hd <= 128 and softcap is None):
      return "cudnn"
    return "einsum" if softcap is not None else "xla"
  if platform == "tpu" and not dense_mask and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0:
    return "splash"
  if platform == "cpu":  # the einsum: the same float32 math (and rounding) as before the kernels
    return "einsum"
  return "einsum" if softcap is not None else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              valid: Optional[jax.Array] = None,
              q_segment_ids: Optional[jax.Array] = None, kv_segment_ids: Optional[jax.Array] = None,
              q_index: Optional[jax.Array] = None, kv_index: Optional[jax.Array] = None,
              mask: Optional[jax.Array] = None, causal: bool = True, window: Window = None,
              softcap: Optional[float] = None, scale: Optional[float] = None,
              implementation: str = "auto", return_lse: bool = False):
  """Grouped-query attention for training, scoring and prefill (see the module docstring).

  Args:
    q: [B, T, H, hd]; k, v: [B, S, Hkv, hd] (H a multiple of Hkv).
    valid: optional bool [B, T]: self-attention (S == T) over the rows' True tokens, indices =
      their ranks among the real tokens (= positions cumsum(valid) - 1). Without `mask` the kernels
      get native masks (`native_mask`: lengths + causal + window), no [B, T, S] array. Excludes
      the segment ids and indices below.
    q_segment_ids / kv_segment_ids: int or bool [B, T] / [B, S]; 0 = padding (default all 1);
      ids 1..n pack several sequences in a row. Dense mask except on splash.
    q_index / kv_index: int [B, T] / [B, S] token indices for the causal and window tests
      (default arange: queries and keys are the same row). Non-default indices use the einsum.
    mask: optional bool [B, T, S] (True = may attend), and-ed with the rest (how the shared-prefix
      rows pass their masks): the one case that always builds the dense mask (a [B, 1, T, S]
      cuDNN bias on GPU; never splash).
    causal: keys after the query are masked.
    window: sliding window (query sees keys with idx_q - idx_kv < window); int, traced scalar or
      None. A traced window uses the einsum kernel.
    softcap: logit soft-cap c (s -> c tanh(s / c)), or None.
    scale: score scale (default 1 / sqrt(hd)).
    implementation: "auto" | "xla" | "einsum" | "cudnn" | "splash". "auto" compiles a chosen
      cuDNN / splash kernel once per signature and falls back to "xla" (one warning) if it fails.
    return_lse: also return the float32 log-sum-exp [B, T, H] of the masked scores
      (differentiable; einsum kernel).

  Returns:
    out [B, T, H, hd] in q's dtype (and lse [B, T, H] with `return_lse`).
  """
  _check_qkv(q, k, v)
  _check_window(window)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS}.")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if valid is not None:
    if any(x is not None for x in (q_segment_ids, kv_segment_ids, q_index, kv_index)):
      raise ValueError("attention: pass either valid= or segment ids / indices, not both.")
    if q.shape[1] != k.shape[1]:
      raise ValueError(f"valid= is self-attention: q length {q.shape[1]} != k length {k.shape[1]}.")
    chex.assert_shape(valid, q.shape[:2])
    valid = valid.astype(bool)
    real = valid.astype(jnp.int32)
    rank = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)  # [B, T] = the model's positions
    q_segment_ids = kv_segment_ids = real
    q_index = kv_index = rank
  default_index = (q_index is None and kv_index is None) or valid is not None
  static_window = window is None or isinstance(window, (int, np.integer))
  native = valid is not None and mask is None and static_window  # lengths/causal/window kernels
  auto = implementation == "auto"
  probe = auto and not os.environ.get(_ENV_FULL)  # "auto"'s own choices are compiled first
  if auto:
    implementation = os.environ.get(_ENV_FULL) or choose_implementation(
        q, k, softcap=softcap, window=window, return_lse=return_lse, default_index=default_index,
        dense_mask=mask is not None)
    if return_lse:
      implementation = "einsum"
  if return_lse and implementation != "einsum":
    raise ValueError(f"return_lse needs implementation='einsum' (or 'auto'), got {implementation!r}.")
  if softcap is not None and implementation in ("xla", "cudnn"):
    raise ValueError(f"implementation={implementation!r} has no logit soft-cap; use 'einsum'.")
  qs, ks, qi, ki = _defaults(q, k, q_segment_ids, kv_segment_ids, q_index, kv_index)
  nm = native_mask(valid, causal=causal, window=window) if native else None

  if implementation == "splash":
    if not default_index or mask is not None:
      raise ValueError("splash attention needs segment ids only: no dense mask, default indices.")
    if nm is not None and window is not None:  # the window counts real tokens: compact the rows
      run = functools.partial(_splash_native, causal=causal, window=window, softcap=softcap,
                              scale=scale)
      args = (q, k, v, nm.order, nm.inverse, nm.lengths)
    else:
      run = functools.partial(_splash_sharded, causal=causal, window=window, softcap=softcap,
                              scale=scale)
      args = (q, k, v, qs, ks)
    if not probe or _kernel_compiles(
        "splash", run, args, (causal, window, softcap, scale, nm is not None)):
      return run(*args)
    implementation = "xla" if softcap is None else "einsum"  # XLA has no soft-cap
  if implementation == "cudnn" and nm is not None:
    run = functools.partial(_native_attention, is_causal=nm.is_causal,
                            local_window_size=nm.local_window_size, scale=scale,
                            implementation="cudnn")
    args = (q, k, v, nm.order, nm.inverse, nm.lengths)
    if not probe or _kernel_compiles(
        "cudnn", run, args, (nm.is_causal, nm.local_window_size, scale)):
      return run(*args)
    implementation = "xla"
  if implementation == "xla" and nm is not None:  # the XLA twin of the native cuDNN call
    return _native_attention(q, k, v, nm.order, nm.inverse, nm.lengths, is_causal=nm.is_causal,
                             local_window_size=nm.local_window_size, scale=scale,
                             implementation="xla")

  allowed = allowed_mask(qs, ks, qi, ki, causal=causal, window=window)  # [B, T, S]
  if mask is not None:
    chex.assert_shape(mask, allowed.shape)
    allowed &= mask.astype(bool)
  if implementation == "einsum":
    out, lse = _einsum_attention(q, k, v, allowed, scale, softcap)
    return (out, lse) if return_lse else out
  if implementation == "cudnn":
    # Raw-index causal is implied by rank-causal (ranks keep the order); a raw-index window is
    # not (it is stricter across holes), so with `valid` the window stays in `allowed` only.
    run = functools.partial(_cudnn_dense, scale=scale,
                            is_causal=causal and default_index and q.shape[1] == k.shape[1],
                            window=None if window is None or valid is not None else int(window))
    if not probe or _kernel_compiles(
        "cudnn", run, (q, k, v, allowed), ("dense", causal, window, scale)):
      return run(q, k, v, allowed)
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                      mask=allowed[:, None], scale=scale,
                                      implementation="xla").astype(q.dtype)


def _cudnn_dense(q, k, v, allowed, *, scale, is_causal, window):
  """cuDNN with a dense mask (a [B, 1, T, S] bias inside cuDNN, with its gradient)."""
  # Causal and window are already in `allowed`; is_causal / local_window_size let cuDNN skip
  # the masked blocks.
  local = None if window is None else (window - 1, 0)
  out = jax.nn.dot_product_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None], scale=scale,
      is_causal=is_causal, local_window_size=local, implementation="cudnn").astype(q.dtype)
  # Queries with no allowed key (padding) can come out NaN from the mask-as-bias; their
  # keys/values would then poison the next layer's valid rows through 0 * NaN. Zero them.
  return jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)


def _splash_sharded(q, k, v, qs, ks, *, causal, window, softcap, scale):
  """Splash per shard (as the Pallas decode kernel below): rows over data x fsdp, heads over tensor."""
  kernel = _rules.shard_kernel(
      functools.partial(_splash_attention, causal=causal, window=window, softcap=softcap,
                        scale=scale),
      (("batch", None, "heads", None), ("batch", None, "kv_heads", None),
       ("batch", None, "kv_heads", None), ("batch", None), ("batch", None)),
      ("batch", None, "heads", None),
      batch=q.shape[0], num_heads=q.shape[2], num_kv_heads=k.shape[2])
  return kernel(q, k, v, qs, ks)


def _splash_native(q, k, v, order, inverse, lengths, *, causal, window, softcap, scale):
  """Splash on compacted rows (real tokens first; segment ids 1 on the first `lengths` slots)."""
  seg = (jnp.arange(q.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)  # [B, T]
  out = _splash_sharded(_permute(q, order, inverse), _permute(k, order, inverse),
                        _permute(v, order, inverse), seg, seg, causal=causal, window=window,
                        softcap=softcap, scale=scale)
  out = _permute(out, inverse, order)
  return jnp.where(jnp.take_along_axis(seg, inverse, axis=1)[:, :, None, None] > 0, out, 0)


def combine_lse(outs, lses) -> tuple[jax.Array, jax.Array]:
  """Merges partial attentions over disjoint key sets: o = sum_a exp(L_a - L) o_a, L = lse_a L_a.

  outs: [B, T, H, hd] each; lses: float32 [B, T, H] each. Returns (out in outs[0]'s dtype, L).
  """
  lse = functools.reduce(jnp.logaddexp, lses)  # [B, T, H]
  out = sum(jnp.exp(l - lse)[..., None] * o.astype(jnp.float32) for o, l in zip(outs, lses))
  return out.astype(outs[0].dtype), lse


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, prefix_k: jax.Array,
                     prefix_v: jax.Array, *, q_segment_ids: jax.Array,
                     prefix_segment_ids: jax.Array, window: Window = None,
                     softcap: Optional[float] = None, scale: Optional[float] = None,
                     implementation: str = "auto") -> jax.Array:
  """Continuations attending to a shared prefix and to their own causal prefix.

  Row b * n + i (i < n) of q/k/v continues prefix b. Equals `attention` over the concatenated
  rows [prefix_b ; own_{b,i}] (own indices P + t), but the prefix keys are read once per prefix:
  the prefix pass groups the n rows of a prefix into one [n * T] query block, then the two
  passes are merged by log-sum-exp.

  Args:
    q: [B*n, T, H, hd]; k, v: [B*n, T, Hkv, hd] the continuations' own keys/values.
    prefix_k, prefix_v: [B, P, Hkv, hd] the prefixes' keys/values (left-padded prefixes end at
      column P - 1, so a continuation token t sits at index P + t).
    q_segment_ids: [B*n, T] 1 on real continuation tokens (0 = padding).
    prefix_segment_ids: [B, P] 1 on real prefix tokens.
    window / softcap / scale / implementation: as in `attention`; implementation "auto" runs the
      einsum kernel for the prefix pass (the combine needs its log-sum-exp).

  Returns:
    [B*n, T, H, hd] in q's dtype.
  """
  _check_qkv(q, k, v)
  chex.assert_rank([prefix_k, prefix_v], 4)
  bn, t, h, hd = q.shape
  b, p = prefix_k.shape[:2]
  if b == 0 or bn % b:
    raise ValueError(f"continuation rows ({bn}) must be a positive multiple of the prefixes ({b}).")
  n = bn // b
  if implementation not in ("auto", "einsum"):
    raise ValueError(f"prefix_attention combines by log-sum-exp: implementation must be 'auto' or "
                     f"'einsum', got {implementation!r}.")
  qseg = q_segment_ids.astype(jnp.int32)
  own, own_lse = attention(q, k, v, q_segment_ids=qseg, kv_segment_ids=qseg, causal=True,
                           window=window, softcap=softcap, scale=scale, implementation="einsum",
                           return_lse=True)
  qg = q.reshape(b, n * t, h, hd)  # the n continuations of a prefix form one query block
  q_index = jnp.broadcast_to(p + jnp.tile(jnp.arange(t, dtype=jnp.int32), n), (b, n * t))
  pre, pre_lse = attention(
      qg, prefix_k.astype(q.dtype), prefix_v.astype(q.dtype),
      q_segment_ids=jnp.minimum(qseg, 1).reshape(b, n * t),
      kv_segment_ids=jnp.minimum(prefix_segment_ids.astype(jnp.int32), 1),
      q_index=q_index, kv_index=jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)),
      causal=False, window=window, softcap=softcap, scale=scale, implementation="einsum",
      return_lse=True)
  out, _ = combine_lse([own, pre.reshape(bn, t, h, hd)], [own_lse, pre_lse.reshape(bn, t, h)])
  return out


# ------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------
def _pallas_splits(s: int) -> Optional[int]:
  """k splits of the Pallas decode grid: S / splits a power of two in [16, 256] (Triton blocks)."""
  part = s & -s  # largest power of two dividing S
  part = min(part, 256)
  return s // part if part >= 16 else None


def choose_decode_implementation(q, k_cache, *, softcap=None, platform: Optional[str] = None) -> str:
  """The kernel `decode_attention(..., implementation="auto")` uses."""
  platform = platform or _platform()
  if (platform in ("gpu", "cuda") and softcap is None and _pallas_splits(k_cache.shape[2])
      and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)):
    return "pallas"
  return "xla"


def _decode_pallas(q, k_cache, v_cache, start, length, scale):
  """Pallas (Triton) flash-decoding kernel on the cache layout [B, Hkv, S, hd] (no transpose)."""
  from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode
  b, h, hd = q.shape
  hkv, s = k_cache.shape[1], k_cache.shape[2]
  splits = _pallas_splits(s)
  if splits is None:
    raise ValueError(f"Pallas decode needs a cache length with 16..128-slot blocks, got {s}.")
  kernel = functools.partial(
      pallas_decode.decode_attn_unbatched, sm_scale=scale, block_h=16, block_k=min(128, s // splits),
      k_splits=splits, num_warps=None, num_stages=2, grid=None,
      interpret=_platform() not in ("gpu", "cuda"), debug=False, return_residuals=False,
      normalize_output=True)
  qg = q.reshape(b, hkv, h // hkv, hd)
  st = jnp.broadcast_to(start[:, None], (b, hkv)).astype(jnp.int32)
  ln = jnp.broadcast_to(length[:, None], (b, hkv)).astype(jnp.int32)
  out = jax.vmap(jax.vmap(kernel))(qg, k_cache.astype(q.dtype), v_cache.astype(q.dtype), st, ln)
  return out.reshape(b, h, hd).astype(q.dtype)


def _decode_xla(q, k_cache, v_cache, start, length, scale, softcap, chunk):
  """Online-softmax loop over `chunk`-slot blocks of the cache, up to the longest live length."""
  b, h, hd = q.shape
  hkv, s = k_cache.shape[1], k_cache.shape[2]
  g = h // hkv
  qg = q.reshape(b, hkv, g, hd)  # [B, Hkv, G, hd]
  chunk = min(chunk, s)

  def block(carry, lo):
    m, l, acc = carry  # [B, Hkv, G], [B, Hkv, G], [B, Hkv, G, hd] float32
    i0 = jnp.minimum(lo, s - chunk)  # dynamic_slice clamps; keep slot ids honest
    kc = lax.dynamic_slice_in_dim(k_cache, i0, chunk, axis=2).astype(q.dtype)  # [B, Hkv, C, hd]
    vc = lax.dynamic_slice_in_dim(v_cache, i0, chunk, axis=2).astype(q.dtype)
    slots = i0 + jnp.arange(chunk, dtype=jnp.int32)  # [C]
    ok = ((slots[None] >= lo) & (slots[None] >= start[:, None])
          & (slots[None] < length[:, None]))  # [B, C]
    sc = jnp.einsum("bkgd,bkcd->bkgc", qg, kc, preferred_element_type=jnp.float32) * scale
    sc = jnp.where(ok[:, None, None], _softcap(sc, softcap), MASK_VALUE)  # [B, Hkv, G, C]
    m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
    p = jnp.where(ok[:, None, None], jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgc,bkcd->bkgd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
    return (m_new, l, acc * corr[..., None] + pv)

  init = (jnp.full((b, hkv, g), MASK_VALUE, jnp.float32), jnp.zeros((b, hkv, g), jnp.float32),
          jnp.zeros((b, hkv, g, hd), jnp.float32))
  if chunk == s:
    m, l, acc = block(init, jnp.zeros((), jnp.int32))
  else:
    n_blocks = (jnp.max(length) + chunk - 1) // chunk
    m, l, acc = lax.fori_loop(0, n_blocks, lambda j, c: block(c, j * chunk), init)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out.reshape(b, h, hd).astype(q.dtype)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, start: jax.Array,
                     length: jax.Array, window: Window = None, softcap: Optional[float] = None,
                     scale: Optional[float] = None, implementation: str = "auto",
                     chunk: int = 256) -> jax.Array:
  """One query token per row against a KV cache, reading only the live slots.

  Row b attends to cache slots [start_b, length_b) (contiguous: left-padded prompt then generated
  tokens), further limited to the last `window` slots (slot distance = token distance there).

  Args:
    q: [B, H, hd] (the new token's queries).
    k_cache, v_cache: [B, Hkv, S, hd] (one layer's cache, any dtype; cast to q's).
    start: int [B] first live slot; length: int [B] or scalar, one past the last live slot
      (the query's own slot is length - 1).
    window / softcap / scale: as in `attention`.
    implementation: "auto" | "xla" (blocked loop over `chunk` slots, up to max(length)) |
      "pallas" (GPU kernel; interpret mode elsewhere).

  Returns:
    [B, H, hd] in q's dtype.
  """
  chex.assert_rank(q, 3)
  chex.assert_rank([k_cache, v_cache], 4)
  chex.assert_equal_shape([k_cache, v_cache])
  _check_window(window)
  if implementation not in DECODE_IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {DECODE_IMPLEMENTATIONS}.")
  b, h, hd = q.shape
  if k_cache.shape[0] != b or k_cache.shape[3] != hd or h % k_cache.shape[1]:
    raise ValueError(f"q {q.shape} does not match the cache {k_cache.shape} ([B, Hkv, S, hd]).")
  scale = hd ** -0.5 if scale is None else float(scale)
  length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (b,))
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))
  if window is not None:
    start = jnp.maximum(start, length - window)
  if implementation == "auto":
    implementation = (os.environ.get(_ENV_DECODE)
                      or choose_decode_implementation(q, k_cache, softcap=softcap))
  if implementation == "pallas":
    if softcap is not None:
      raise ValueError("the Pallas decode kernel has no logit soft-cap; use implementation='xla'.")
    # Per shard: rows over (data, fsdp), query groups over tensor (a pallas_call has no
    # partitioning rule; on sharded operands XLA would gather the whole cache to every device).
    kernel = _rules.shard_kernel(
        functools.partial(_decode_pallas, scale=scale),
        (("batch", "heads", None), ("batch", "kv_heads", None, None),
         ("batch", "kv_heads", None, None), ("batch",), ("batch",)), ("batch", "heads", None),
        batch=b, num_heads=h, num_kv_heads=k_cache.shape[1])
    return kernel(q, k_cache, v_cache, start, length)
  return _decode_xla(q, k_cache, v_cache, start, length, scale, softcap, int(chunk))
