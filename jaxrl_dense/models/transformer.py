"""Decoder-only transformer for the Llama, Qwen2, Qwen3 and Gemma 3 families (Flax linen, functional API).

Architecture (Llama 2/3, SmolLM2, Qwen2/2.5): token embedding -> L x [RMSNorm -> GQA self-attention
with RoPE (q/k/v bias for Qwen2) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
LM head (tied to the embedding or not).

  h = x + o_proj(Attn(RoPE(q_proj(n1(x))), RoPE(k_proj(n1(x))), v_proj(n1(x))))
  y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))
  RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)

Layers are stacked with `nn.scan` (one compiled layer body, so compile time does not grow with
depth); their params carry a leading `[L]` axis (see `convert.py` for the full tree).

Public functions take a params pytree and a static `ModelConfig`:
  forward(params, config, tokens, attention_mask) -> float32 logits [B, T, V]
  hidden_states(params, config, tokens, attention_mask) -> final-normed hidden [B, T, D]
  init_cache / prefill / decode_step: the KV-cache API used by `jaxrl_dense.sampling`.

Attention goes through `attention.py` (one entry point per pass, the kernel chosen by platform:
cuDNN flash on GPU, splash on TPU, an einsum on CPU; decode reads only the live cache slots).
Training, scoring and prefill pass the [B, T] real-token mask, never a [B, T, T] one: the kernels
mask natively (lengths + causal + window, `attention.native_mask`); only the shared-prefix
continuations keep a dense mask.
`decode_step` is the only decode path: the same `_Layer` modules applied layer by layer over
slices of the stacked params, each layer's cache its own loop carry. `remat_policy(name)` maps
`ModelConfig.remat_policy` to a `jax.checkpoint` policy.

Positions come from the mask (`cumsum(mask) - 1`, clipped at 0), so left-padded batches give the
same logits on their valid tokens as unpadded ones.

Family options (all static `ModelConfig` fields, see config.py): q/k/v and o_proj biases
(Qwen2; Llama/Qwen3/Gemma 3 `attention_bias`), MLP biases (Llama `mlp_bias`), per-head q/k
RMSNorm before RoPE (Qwen3, Gemma 3), GeGLU (`gelu_pytorch_tanh`), Gemma's `(1 + w)` RMSNorm,
sqrt(d) embedding scaling, sandwich norms

  h = x + post_attention_norm(Attn(input_norm(x)))
  y = h + post_feedforward_norm(MLP(pre_feedforward_norm(h)))

query_pre_attn_scalar, and per-layer sliding-window attention with its
own RoPE base (Gemma 3 `layer_types`, `sliding_window`, `rope_local_base_freq`): a sliding layer
masks keys with q_pos - k_pos >= sliding_window (HF `kv_idx > q_idx - sliding_window`).

LoRA: params may carry a "lora" entry (see `lora.py`): per adapted linear layer `lora_a`
[.., in, r] and `lora_b` [.., r, out] (pre-scaled by alpha / r); such a layer computes
x W (+ bias) + (x lora_a) lora_b.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jaxrl_dense.parallel import rules as _rules
from jaxrl_dense.models import attention as _attention
from jaxrl_dense.models.config import ModelConfig

Params = dict[str, Any]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ModelConfig):
  return _DTYPES[config.dtype]


def param_dtype(config: ModelConfig):
  return _DTYPES[config.param_dtype]


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2] (float32), with HF `rope_scaling` applied.

  inv_freq_i = theta^(-2i / head_dim). Supported scalings: None/"default", "linear"
  (inv_freq / factor) and "llama3" (Llama 3.1 frequency-dependent smoothing).
  `local`: the sliding-window layers' table when the config gives them their own base
  (`rope_local_theta`, Gemma 3 `rope_local_base_freq`; unscaled, as in transformers).
  """
  dim = config.head_dim
  own_local = local and config.rope_local_theta is not None
  theta = config.rope_local_theta if own_local else config.rope_theta
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  scaling = None if own_local else config.rope_scaling_dict
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3).")


def rope_cos_sin(config: ModelConfig, positions: jax.Array,
                 local: bool = False) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [B, T, head_dim] (float32) for integer positions [B, T] (`local`: sliding layers)."""
  inv_freq = jnp.asarray(rope_inv_freq(config, local))  # [hd/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, hd]
  return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, hd]; cos/sin [B, T, hd]. HF `rotate_half` convention."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """positions [B, T] = cumsum(mask) - 1, clipped at 0 (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def sliding_window_mask(mask: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                        window: int) -> jax.Array:
  """mask [B, T, S] & (q_pos - k_pos < window): a sliding layer's mask.

  q_positions [B, T], k_positions [B, S] are token positions; transformers' overlay is
  `kv_idx > q_idx - sliding_window` (each query sees itself and the window - 1 keys before it).
  """
  return mask & ((q_positions[:, :, None] - k_positions[:, None, :]) < window)


def _window_mask(config: ModelConfig, mask, q_positions, k_positions):
  """The sliding layers' mask, or None when the config has no sliding layers."""
  if not config.has_sliding_layers:
    return None
  return sliding_window_mask(mask, q_positions, k_positions, int(config.sliding_window))


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
  """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 (as HF does).

  unit_offset (Gemma): y = (x / sqrt(mean(x^2) + eps)) * (1 + w), all in float32, then cast.
  """
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def _rms_norm(config: ModelConfig, name: str) -> RMSNorm:
  return RMSNorm(config.rms_norm_eps, compute_dtype(config), param_dtype(config),
                 config.rms_norm_unit_offset, name=name)


class _Dense(nn.Dense):
  """nn.Dense plus an optional LoRA update from the "lora" collection (see `lora.py`).

  y = x W (+ bias) + (x a) b with a = lora_a [in, r], b = lora_b [r, out] (b scaled by alpha / r);
  without "lora" variables this is exactly nn.Dense.
  """

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs)
    if self.has_variable("lora", "lora_a"):
      a = self.get_variable("lora", "lora_a").astype(self.dtype)  # [in, r]
      b = self.get_variable("lora", "lora_b").astype(self.dtype)  # [r, out]
      xa = jnp.einsum("...i,ir->...r", inputs.astype(self.dtype), a)  # [..., r]
      y = y + jnp.einsum("...r,ro->...o", xa, b).astype(y.dtype)
    return checkpoint_name(y, self.name)  # remat policies save projections by name


def _dense(features: int, name: str, config: ModelConfig, use_bias: bool = False) -> nn.Dense:
  return _Dense(features, use_bias=use_bias, dtype=compute_dtype(config),
                  param_dtype=param_dtype(config), kernel_init=nn.initializers.normal(0.02),
                  name=name)


class _Layer(nn.Module):
  """One pre-norm decoder block, used under `nn.scan`.

  `(carry, cos, sin, mask, cache_index) -> (carry, None)`. Without a cache the carry is the
  residual stream x [B, T, D]. With a cache it is (x, k_cache [L, B, Hkv, S, hd], v_cache,
  layer index): the layer writes its new keys/values at slot `cache_index` of its own cache row
  and attends to the new keys ("prefill") or to the whole cache row ("decode").

  In "full" mode the layer also takes this layer's slice of `prefix_kv` (keys/values
  [B, S0, Hkv, hd] of an already-processed prefix, scanned over layers; None for no prefix) and,
  with `emit_kv`, returns its own rotated keys/values [B, T, Hkv, hd] as the scan output.
  """
  config: ModelConfig
  mode: str = "full"
  emit_kv: bool = False

  @nn.compact
  def __call__(self, carry, cos, sin, mask, cache_index, prefix_kv=None, local=None,
               sliding=None):
    c = self.config
    if self.mode == "full":
      x = carry
    else:
      x, k_all, v_all, layer = carry
    if sliding is not None:  # this layer's RoPE table and mask: sliding-window or global
      cos_l, sin_l, window_mask = local
      cos = jnp.where(sliding, cos_l, cos)
      sin = jnp.where(sliding, sin_l, sin)
      if mask.ndim == 3:  # a dense mask: the sliding layers' own (a [B, T] mask: the window)
        mask = jnp.where(sliding, window_mask, mask)

    h = _rms_norm(c, "input_layernorm")(x)  # [B, T, D]
    x_attn, kv_out = _SelfAttention(c, self.mode, name="self_attn")(
        h, cos, sin, mask, cache_index, None if self.mode == "full" else (k_all, v_all, layer),
        prefix_kv, sliding)
    if c.post_norms:  # Gemma: norm the attention output before the residual add
      x_attn = _rms_norm(c, "post_attention_layernorm")(x_attn)
    x = _rules.with_logical_constraint(x + x_attn, ("batch", "length", "act_embed"))
    h = _rms_norm(c, "pre_feedforward_layernorm" if c.post_norms else "post_attention_layernorm")(x)
    y = _MLP(c, name="mlp")(h)  # [B, T, D]
    if c.post_norms:
      y = _rms_norm(c, "post_feedforward_layernorm")(y)
    x = x + y
    x = _rules.with_logical_constraint(x, ("batch", "length", "act_embed"))  # [B, T, D]
    if self.mode == "full":
      return x, (kv_out if self.emit_kv else None)
    k_all, v_all = kv_out
    return (x, k_all, v_all, layer + 1), None


class _SelfAttention(nn.Module):
  """GQA self-attention with RoPE; optionally writes to / reads from the stacked KV cache.

  Returns (output [B, T, D], kv): kv is the updated (k_all, v_all) cache with a cache, else this
  call's own keys/values (k, v) [B, T, Hkv, hd]. With `prefix_kv` (full mode) the queries attend
  to concat(prefix keys, own keys) along the key axis; `mask` then covers [B, T, S0 + T].
  A [B, T] `mask` (real tokens) is causal self-attention with native kernel masks
  (`attention(valid=...)`; the sliding layers' window by `lax.cond` on `sliding`); a dense
  [B, T, S] mask (shared prefix, decode) is passed as such.
  """
  config: ModelConfig
  mode: str = "full"

  @nn.compact
  def __call__(self, h, cos, sin, mask, cache_index, cache, prefix_kv=None, sliding=None):
    c = self.config
    b, t, _ = h.shape
    hd = c.head_dim
    q = _dense(c.num_heads * hd, "q_proj", c, c.attention_bias)(h).reshape(b, t, c.num_heads, hd)
    k = _dense(c.num_kv_heads * hd, "k_proj", c, c.attention_bias)(h).reshape(b, t, c.num_kv_heads, hd)
    v = _dense(c.num_kv_heads * hd, "v_proj", c, c.attention_bias)(h).reshape(b, t, c.num_kv_heads, hd)
    # Activation sharding (no-op without a context mesh): rows over (data, fsdp), heads over tensor.
    q = _rules.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    k = _rules.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
    v = _rules.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
    if c.qk_norm:  # Qwen3 / Gemma 3: RMSNorm over head_dim of every head, before RoPE
      q = _rms_norm(c, "q_norm")(q)
      k = _rms_norm(c, "k_norm")(k)
    q = _scale_query(q, c)
    q = _apply_rope(q, cos, sin)  # [B, T, H, hd]
    k = _apply_rope(k, cos, sin)  # [B, T, Hkv, hd]
    new_cache = (k, v)
    keys, values = k, v
    if prefix_kv is not None:
      keys = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)  # [B, S0 + T, Hkv, hd]
      values = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    if cache is not None:
      k_all, v_all, layer = cache  # [L, B, Hkv, S, hd]
      zero = jnp.zeros((), jnp.int32)
      start = (layer, zero, zero, cache_index, zero)
      kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd] cache layout
      k_all = lax.dynamic_update_slice(k_all, kt[None].astype(k_all.dtype), start)
      v_all = lax.dynamic_update_slice(v_all, vt[None].astype(v_all.dtype), start)
      k_all, v_all = _rules.constrain_kv_cache(k_all), _rules.constrain_kv_cache(v_all)
      new_cache = (k_all, v_all)
    if self.mode == "decode":  # one query per row; live cache slots [first mask slot, index]
      k_cache = lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)  # [B, Hkv, S, hd]
      v_cache = lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
      attn = _attention.decode_attention(
          q[:, 0], k_cache, v_cache, start=jnp.argmax(mask[:, 0, :], axis=-1),
          length=cache_index + 1)[:, None]  # [B, 1, H, hd]
    elif mask.ndim == 2:  # training / scoring / prefill: causal self-attention, native masks
      if prefix_kv is not None:
        raise ValueError("prefix_kv needs the dense [B, T, S0 + T] mask, got a [B, T] one.")
      run = lambda w: _attention.attention(q, keys, values, valid=mask, causal=True, window=w)
      if sliding is None:
        attn = run(None)
      else:  # static windows in both branches: the kernels keep their native masks
        attn = lax.cond(sliding, lambda: run(int(c.sliding_window)), lambda: run(None))
    else:  # continuations of a shared prefix: the dense [B, T, S0 + T] mask
      attn = _attention.attention(q, keys, values, mask=mask, causal=prefix_kv is None)
    attn = attn.reshape(b, t, c.num_heads * hd)  # [B, T, H*hd]
    attn = _rules.with_logical_constraint(attn, ("batch", "length", "heads"))
    return _dense(c.hidden_size, "o_proj", c, c.attention_out_bias)(attn), new_cache


def _scale_query(q: jax.Array, config: ModelConfig) -> jax.Array:
  """Rescales q so that the attention's default head_dim ** -0.5 becomes `config.attention_scale`.

  Only Gemma's query_pre_attn_scalar != head_dim changes anything (RoPE is linear, so scaling
  before it is the same as scaling the scores).
  """
  qpas = config.query_pre_attn_scalar
  if qpas is None or float(qpas) == float(config.head_dim):
    return q
  return q * jnp.asarray((config.head_dim / qpas) ** 0.5, q.dtype)


def _activation(config: ModelConfig):
  """The gate activation: silu (SwiGLU) or tanh-approximated gelu (GeGLU, `gelu_pytorch_tanh`)."""
  if config.hidden_act == "gelu_pytorch_tanh":
    return functools.partial(jax.nn.gelu, approximate=True)
  return nn.silu


class _MLP(nn.Module):
  """Gated MLP: down(act(gate(h)) * up(h)), act = silu (SwiGLU) or gelu-tanh (GeGLU)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h):
    c = self.config
    gate = _dense(c.intermediate_size, "gate_proj", c, c.mlp_bias)(h)  # [B, T, I]
    up = _dense(c.intermediate_size, "up_proj", c, c.mlp_bias)(h)  # [B, T, I]
    gate = _rules.with_logical_constraint(gate, ("batch", "length", "mlp"))
    up = _rules.with_logical_constraint(up, ("batch", "length", "mlp"))
    return _dense(c.hidden_size, "down_proj", c, c.mlp_bias)(_activation(c)(gate) * up)  # [B, T, D]


_PROJ_NAMES = {
    "save_dots_except_mlp": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "save_dots_except_mlp_in": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "save_qkv_proj": ("q_proj", "k_proj", "v_proj"),
}


def remat_policy(name: str):
  """`jax.checkpoint` policy of a rematerialised layer, by name (MaxText `get_remat_policy`).

  "full": save nothing, recompute the whole layer in the backward pass (None policy);
  "save_dots": save every matmul without batch dims (the projections, not the attention
  scores); "save_dots_except_mlp" / "save_dots_except_mlp_in" / "save_qkv_proj": save the
  named projection outputs (`checkpoint_name` in `_Dense`), recompute the rest. "none" means no
  remat at all and has no policy. Every policy gives the same gradients; they trade memory
  (activations kept per layer) for recompute FLOPs.
  """
  if name == "full":
    return None
  if name == "save_dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name in _PROJ_NAMES:
    return jax.checkpoint_policies.save_only_these_names(*_PROJ_NAMES[name])
  raise ValueError(f"remat policy {name!r} has no jax.checkpoint policy; expected one of "
                   f"full, save_dots, {', '.join(_PROJ_NAMES)}.")


class Transformer(nn.Module):
  """Embedding -> scanned decoder layers -> final RMSNorm. Returns hidden states, not logits.

  __call__(tokens [B, T], positions [B, T], mask, cache=None, cache_index=0,
           prefix_kv=None)
    -> (hidden [B, T, D] in the compute dtype, new (k, v) cache or None).

  `mask` is bool [B, T] (the real tokens: causal self-attention whose kernels take native masks,
  no [B, T, T] array; training, scoring, prefill) or a dense [B, T, S] (shared-prefix
  continuations, decode).
  Full mode only: `prefix_kv` = (k, v) [L, B, S0, Hkv, hd] of a prefix the tokens continue (mask
  then [B, T, S0 + T]); with `emit_kv` the second output is this call's (k, v) [L, B, T, Hkv, hd].
  `window_mask` (same shape as a dense `mask`; required with one when the config has sliding
  layers) is the mask of the sliding-window layers (`sliding_window_mask`); a [B, T] mask needs
  none (the window is `config.sliding_window` over positions).
  """
  config: ModelConfig
  mode: str = "full"
  emit_kv: bool = False

  @nn.compact
  def __call__(self, tokens, positions, mask, cache=None, cache_index=None, prefix_kv=None,
               window_mask=None):
    c = self.config
    dt = compute_dtype(c)
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=param_dtype(c),
                 embedding_init=nn.initializers.normal(0.02), name="embed_tokens")(tokens)
    if c.scale_embeddings:  # Gemma: x * sqrt(d), the scale rounded to the weights' dtype as in HF
      x = x * jnp.asarray(math.sqrt(c.hidden_size), param_dtype(c)).astype(x.dtype)
    # FSDP: the residual stream is split by rows, not by width (a no-op without a context mesh).
    x = _rules.with_logical_constraint(x, ("batch", "length", "act_embed"))  # [B, T, D]
    cos, sin = rope_cos_sin(c, positions)  # [B, T, hd]
    local, sliding = None, None
    if c.has_sliding_layers:
      if window_mask is None and mask.ndim == 3:
        raise ValueError("this config has sliding-window layers: pass window_mask "
                         "(see sliding_window_mask).")
      cos_l, sin_l = rope_cos_sin(c, positions, local=True)  # [B, T, hd]
      local = (cos_l, sin_l, window_mask)
      sliding = jnp.asarray(c.sliding_layers)  # [L] bool, scanned with the layers
    layer_cls = _Layer
    if c.remat and c.remat_policy != "none":
      layer_cls = nn.remat(_Layer, prevent_cse=False, policy=remat_policy(c.remat_policy))
    stack = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0,
                             nn.broadcast, 0),
                    length=c.num_layers)(c, self.mode, self.emit_kv, name="layers")
    if cache_index is None:
      cache_index = jnp.zeros((), jnp.int32)
    if cache is None:
      x, kv = stack(x, cos, sin, mask, cache_index, prefix_kv, local, sliding)  # kv: (k, v) [L, ...] or None
      new_cache = kv if self.emit_kv else None
    else:
      if prefix_kv is not None:
        raise ValueError("prefix_kv is only supported without a KV cache (full mode).")
      (x, k_all, v_all, _), _ = stack((x, cache.k, cache.v, jnp.zeros((), jnp.int32)),
                                      cos, sin, mask, cache_index, None, local, sliding)
      new_cache = KVCache(k_all, v_all)
    x = _rms_norm(c, "norm")(x)
    return x, new_cache


class KVCache(NamedTuple):
  """Preallocated key/value cache: k, v [L, B, Hkv, S, hd] (slots on axis 3)."""
  k: jax.Array
  v: jax.Array


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random params (normal(0.02) weights, unit norms) in `config.param_dtype`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  params = dict(Transformer(config).init(rng, tokens, tokens, mask, window_mask=mask)["params"])
  if not config.tie_word_embeddings:
    k = jax.random.fold_in(rng, 7)
    params["lm_head"] = {"kernel": (0.02 * jax.random.normal(
        k, (config.hidden_size, config.vocab_size), jnp.float32)).astype(param_dtype(config))}
  return params


def _trunk_params(params: Params) -> Params:
  return {k: v for k, v in params.items() if k not in ("lm_head", "lora")}


def _variables(params: Params) -> dict:
  """Flax variables of the trunk: {"params": ...} plus {"lora": ...} when adapters are attached."""
  out = {"params": _trunk_params(params)}
  if "lora" in params:
    out["lora"] = params["lora"]
  return out


def lm_head_weight(params: Params, config: ModelConfig) -> jax.Array:
  """The [D, V] output projection: the transposed embedding when tied, else lm_head/kernel."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def logits_from_hidden(params: Params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
  """float32 logits [..., V] = hidden [..., D] @ W_out [D, V] (compute dtype in, f32 accumulate).

  Under a mesh the logits are constrained vocabulary-parallel (rows over data x fsdp, V over
  tensor, like the [D, V] weight of the tensor-parallel rollout copy): each device computes its
  V / tensor columns from its own weight shard, and a caller that needs whole rows gathers the
  [rows, V] logits. Without it GSPMD met the sampler's whole-vocabulary constraint by
  all-gathering the [D, V] weight instead (hoisted out of the decode loop: the whole LM head on
  every device; tests/rl/test_plan_flags.py).
  """
  w = lm_head_weight(params, config).astype(compute_dtype(config))
  logits = jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
  if logits.ndim >= 2:
    logits = _rules.with_logical_constraint(
        logits, ("batch",) + ("length",) * (logits.ndim - 2) + ("vocab",))
  return logits


def _check_inputs(config: ModelConfig, tokens, attention_mask):
  chex.assert_rank(tokens, 2)
  chex.assert_equal_shape([tokens, attention_mask])
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")


@functools.partial(jax.jit, static_argnames=("config",))
def hidden_states(params: Params, config: ModelConfig, tokens: jax.Array,
                  attention_mask: jax.Array) -> jax.Array:
  """Final-normed hidden states [B, T, D] (compute dtype) for left- or right-padded tokens [B, T]."""
  _check_inputs(config, tokens, attention_mask)
  valid = attention_mask.astype(bool)  # [B, T]: causal over the real tokens, native masks
  positions = positions_from_mask(attention_mask)  # [B, T]
  hidden, _ = Transformer(config).apply(_variables(params), tokens, positions, valid)
  return hidden


def shared_prefix_hidden_states(params: Params, config: ModelConfig, prompt_tokens: jax.Array,
                                prompt_mask: jax.Array, response_tokens: jax.Array,
                                response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Hidden states of G prompts and of n continuations of each, running every prompt once.

  Equals `hidden_states` over the concatenated rows [prompt_g ; response_{g,i}] (same positions,
  same causal masking), but the prompt is computed once per group: its per-layer keys/values are
  broadcast to the group's n responses, which attend to them plus to their own causal prefix.
  Gradients through the shared prompt are the sum over the group (what the n separate rows give).
  For G prompts of length P and n responses of length R this costs G*P + G*n*R token passes
  instead of G*n*(P + R): in RL (GRPO/RLOO/PRIME groups, long prompts, short answers) the
  prompt usually dominates.

  Args:
    prompt_tokens / prompt_mask: [G, P], prompts LEFT-padded (the last column is a real token).
    response_tokens / response_mask: [G * n, R], rows g*n .. g*n + n - 1 continue prompt g;
      right-padded (mask 1 on real tokens).

  Returns:
    (prompt hidden [G, P, D], response hidden [G * n, R, D]), final-normed, compute dtype.
  """
  chex.assert_rank([prompt_tokens, prompt_mask, response_tokens, response_mask], 2)
  chex.assert_equal_shape([prompt_tokens, prompt_mask])
  chex.assert_equal_shape([response_tokens, response_mask])
  g, p = prompt_tokens.shape
  b, r = response_tokens.shape
  if g == 0 or b % g:
    raise ValueError(f"response rows ({b}) must be a positive multiple of the prompts ({g}).")
  n = b // g
  trunk = _variables(params)
  pvalid = prompt_mask.astype(bool)  # [G, P]
  ppos = positions_from_mask(prompt_mask)  # [G, P]
  prompt_hidden, (pk, pv) = Transformer(config, emit_kv=True).apply(
      trunk, prompt_tokens, ppos, pvalid)  # native masks; kv: [L, G, P, Hkv, hd]
  pk, pv = (jnp.repeat(x, n, axis=1) for x in (pk, pv))  # [L, G*n, P, Hkv, hd]
  rvalid = response_mask.astype(bool)  # [B, R]
  plen = jnp.repeat(jnp.sum(prompt_mask.astype(jnp.int32), axis=1), n)  # [B]
  rpos = jnp.maximum(plen[:, None] + jnp.cumsum(rvalid.astype(jnp.int32), axis=1) - 1, 0)  # [B, R]
  key_prompt = jnp.broadcast_to(jnp.repeat(pvalid, n, axis=0)[:, None, :], (b, r, p))  # [B, R, P]
  key_resp = jnp.tril(jnp.ones((r, r), bool))[None] & rvalid[:, None, :]  # [B, R, R]
  rmask = jnp.concatenate([key_prompt, key_resp], axis=2)  # [B, R, P + R]
  kpos = jnp.concatenate([jnp.repeat(ppos, n, axis=0), rpos], axis=1)  # [B, P + R]
  response_hidden, _ = Transformer(config).apply(trunk, response_tokens, rpos, rmask,
                                                 prefix_kv=(pk, pv),
                                                 window_mask=_window_mask(config, rmask, rpos, kpos))
  return prompt_hidden, response_hidden


@functools.partial(jax.jit, static_argnames=("config",))
def forward(params: Params, config: ModelConfig, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Causal LM logits.

  Args:
    params: params pytree (see `convert.py`).
    config: static architecture config.
    tokens: int [B, T] token ids (padding anywhere the mask is 0; prompts left-padded).
    attention_mask: [B, T], 1 on real tokens. Keys at masked positions are never attended;
      positions are cumsum(mask) - 1.

  Returns:
    float32 logits [B, T, V]; rows at masked positions are finite but meaningless.
  """
  return logits_from_hidden(params, config, hidden_states(params, config, tokens, attention_mask))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """Zeroed KV cache [L, B, Hkv, max_len, hd] (default dtype: the compute dtype)."""
  dtype = compute_dtype(config) if dtype is None else dtype
  shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def prefill(params: Params, config: ModelConfig, tokens: jax.Array, attention_mask: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
  """Runs the prompt tokens [B, T] through the model and writes cache slots [0, T).

  Returns (float32 logits of the last position [B, V], cache). Prompts must be left-padded so
  the last position is each row's last real token.
  """
  _check_inputs(config, tokens, attention_mask)
  valid = attention_mask.astype(bool)
  positions = positions_from_mask(attention_mask)
  hidden, cache = Transformer(config, mode="prefill").apply(  # native masks from `valid`
      _variables(params), tokens, positions, valid, cache, jnp.zeros((), jnp.int32))
  return logits_from_hidden(params, config, hidden[:, -1]), cache


def decode_step(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
                cache, key_mask: jax.Array, cache_index: jax.Array):
  """One decode step: the model's only decode path (the sampler's loop runs it too).

  The layers are the same `_Layer` modules as training and prefill, applied one by one over
  slices of the stacked params (no weight copy), each with its own cache: inside a
  `lax.while_loop` every layer's cache is its own loop carry and is updated in place. Attention
  is `attention.decode_attention`, which reads only the live slots [first key_mask slot,
  cache_index] (XLA blocked loop on CPU, the Pallas decode kernel on GPU).

  Args:
    tokens: int [B] tokens to feed (written at cache slot `cache_index`).
    positions: int [B] their RoPE positions.
    params: params pytree; its "layers" may be the per-layer list of `split_layers`.
    cache: KVCache [L, B, Hkv, S, hd], or the per-layer list [(k, v) [B, Hkv, S, hd]] * L of
      `split_cache` (returned in the same form).
    key_mask: bool [B, S], True on cache slots holding real tokens: one contiguous run per row
      (a left-padded prompt, then one slot per step); slots > cache_index are ignored.
    cache_index: int scalar slot of this step.

  Returns:
    (float32 logits [B, V], updated cache).
  """
  c = config
  stacked = isinstance(cache, KVCache)
  caches = split_cache(cache) if stacked else list(cache)
  if len(caches) != c.num_layers:
    raise ValueError(f"cache has {len(caches)} layers; config.num_layers={c.num_layers}.")
  s = caches[0][0].shape[2]
  mask = key_mask & (jnp.arange(s) <= cache_index)[None, :]  # [B, S]
  window = _decode_window_mask(c, mask, cache_index)  # [B, S] or None
  dt = compute_dtype(c)
  variables = _variables(params)
  x = params["embed_tokens"]["embedding"][tokens[:, None]].astype(dt)  # [B, 1, D] (nn.Embed's math)
  if c.scale_embeddings:  # as in Transformer
    x = x * jnp.asarray(math.sqrt(c.hidden_size), param_dtype(c)).astype(x.dtype)
  cos, sin = rope_cos_sin(c, positions[:, None])  # [B, 1, hd]
  local = None
  if window is not None:
    cos_l, sin_l = rope_cos_sin(c, positions[:, None], local=True)
    local = (cos_l, sin_l, window[:, None, :])
  layer_vars = {col: tree["layers"] for col, tree in variables.items() if "layers" in tree}
  layer_i = lambda tree, i: (tree[i] if isinstance(tree, (list, tuple))  # split_layers
                             else jax.tree_util.tree_map(lambda a: a[i], tree))
  layer = _Layer(c, mode="decode")
  zero = jnp.zeros((), jnp.int32)
  new_caches = []
  for i, (k_cache, v_cache) in enumerate(caches):
    vars_i = {col: layer_i(tree, i) for col, tree in layer_vars.items()}  # layer i's weights
    sliding = None if local is None else jnp.asarray(c.sliding_layers[i])
    (x, k1, v1, _), _ = layer.apply(vars_i, (x, k_cache[None], v_cache[None], zero), cos, sin,
                                    mask[:, None, :], cache_index, None, local, sliding)
    new_caches.append((k1[0], v1[0]))
  x = _rms_norm(c, "norm").apply({"params": params["norm"]}, x[:, 0])  # [B, D]
  logits = logits_from_hidden(params, c, x)
  if stacked:
    return logits, KVCache(jnp.stack([k for k, _ in new_caches]), jnp.stack([v for _, v in new_caches]))
  return logits, new_caches


def _decode_window_mask(config: ModelConfig, mask: jax.Array, cache_index) -> jax.Array:
  """Decode-step sliding mask [B, S]: slots with cache_index - slot < sliding_window (or None).

  Cache slots of a row's real tokens are consecutive (left-padded prompt, then one slot per
  step), so slot distance equals position distance, as in `sliding_window_mask`.
  """
  if not config.has_sliding_layers:
    return None
  s = mask.shape[-1]
  return mask & ((cache_index - jnp.arange(s)) < int(config.sliding_window))[None, :]


def split_layers(params: Params) -> Params:
  """params with the stacked [L, ...] layer weights (and LoRA adapters) as a list of L trees.

  What the sampler hands `decode_step` inside its decode loop: each layer's weights are then a
  loop-invariant buffer of their own, sliced once per rollout instead of once per step (XLA
  copies a slice of a stacked weight on every loop iteration). Same values, no concatenation.
  """
  split = lambda tree: [jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
                        for i in range(jax.tree_util.tree_leaves(tree)[0].shape[0])]
  out = dict(params, layers=split(params["layers"]))
  if "lora" in params and "layers" in params["lora"]:
    out["lora"] = dict(params["lora"], layers=split(params["lora"]["layers"]))
  return out


def split_cache(cache: KVCache) -> list:
  """[(k [B, Hkv, S, hd], v [B, Hkv, S, hd])] * L from a stacked KVCache."""
  return [(cache.k[i], cache.v[i]) for i in range(cache.k.shape[0])]
