"""Decoder-only transformer for the Llama and Qwen2 families (Flax linen, functional API).

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

Positions come from the mask (`cumsum(mask) - 1`, clipped at 0), so left-padded batches give the
same logits on their valid tokens as unpadded ones.
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

from jaxrl_dense.models.config import ModelConfig

Params = dict[str, Any]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_MASK_VALUE = float(np.finfo(np.float32).min)


def compute_dtype(config: ModelConfig):
  return _DTYPES[config.dtype]


def param_dtype(config: ModelConfig):
  return _DTYPES[config.param_dtype]


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2] (float32), with HF `rope_scaling` applied.

  inv_freq_i = theta^(-2i / head_dim). Supported scalings: None/"default", "linear"
  (inv_freq / factor) and "llama3" (Llama 3.1 frequency-dependent smoothing).
  """
  dim = config.head_dim
  inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling_dict
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


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [B, T, head_dim] (float32) for integer positions [B, T]."""
  inv_freq = jnp.asarray(rope_inv_freq(config))  # [hd/2]
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


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
  """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 (as HF does)."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def _dense(features: int, name: str, config: ModelConfig, use_bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=compute_dtype(config),
                  param_dtype=param_dtype(config), kernel_init=nn.initializers.normal(0.02),
                  name=name)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query softmax attention.

  q [B, T, H, hd]; k, v [B, Hkv, S, hd] (the cache layout: no transposes in decode);
  mask [B, T, S] bool (True = may attend).
  Query head h reads kv head h // (H / Hkv) (HF `repeat_kv`). Scores and softmax in float32;
  fully masked rows (left-padding queries) give a uniform average instead of NaN.
  Returns [B, T, H * hd] in q's dtype.
  """
  b, t, h, hd = q.shape
  hkv = k.shape[1]
  qg = q.reshape(b, t, hkv, h // hkv, hd)  # [B, T, Hkv, G, hd]
  scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)  # [B,Hkv,G,T,S]
  scores = scores * (hd ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v)  # [B, T, Hkv, G, hd]
  return out.reshape(b, t, h * hd)


class _Layer(nn.Module):
  """One pre-norm decoder block, used under `nn.scan`.

  `(carry, cos, sin, mask, cache_index) -> (carry, None)`. Without a cache the carry is the
  residual stream x [B, T, D]. With a cache it is (x, k_cache [L, B, Hkv, S, hd], v_cache,
  layer index): the layer writes its new keys/values at slot `cache_index` of its own cache row
  and attends to the new keys ("prefill") or to the whole cache row ("decode").

  In "full" mode the layer also takes this layer's slice of `prefix_kv` (keys/values
  [B, Hkv, S0, hd] of an already-processed prefix, scanned over layers; None for no prefix) and,
  with `emit_kv`, returns its own rotated keys/values [B, Hkv, T, hd] as the scan output.
  """
  config: ModelConfig
  mode: str = "full"
  emit_kv: bool = False

  @nn.compact
  def __call__(self, carry, cos, sin, mask, cache_index, prefix_kv=None):
    c = self.config
    dt = compute_dtype(c)
    if self.mode == "full":
      x = carry
    else:
      x, k_all, v_all, layer = carry

    h = RMSNorm(c.rms_norm_eps, dt, param_dtype(c), name="input_layernorm")(x)  # [B, T, D]
    x_attn, kv_out = _SelfAttention(c, self.mode, name="self_attn")(
        h, cos, sin, mask, cache_index, None if self.mode == "full" else (k_all, v_all, layer),
        prefix_kv)
    x = x + x_attn
    h = RMSNorm(c.rms_norm_eps, dt, param_dtype(c), name="post_attention_layernorm")(x)
    x = x + _MLP(c, name="mlp")(h)
    if self.mode == "full":
      return x, (kv_out if self.emit_kv else None)
    k_all, v_all = kv_out
    return (x, k_all, v_all, layer + 1), None


class _SelfAttention(nn.Module):
  """GQA self-attention with RoPE; optionally writes to / reads from the stacked KV cache.

  Returns (output [B, T, D], kv): kv is the updated (k_all, v_all) cache with a cache, else this
  call's own keys/values (k, v) [B, Hkv, T, hd]. With `prefix_kv` (full mode) the queries attend
  to concat(prefix keys, own keys) along the key axis; `mask` then covers [B, T, S0 + T].
  """
  config: ModelConfig
  mode: str = "full"

  @nn.compact
  def __call__(self, h, cos, sin, mask, cache_index, cache, prefix_kv=None):
    c = self.config
    dt = compute_dtype(c)
    b, t, _ = h.shape
    hd = c.head_dim
    q = _dense(c.num_heads * hd, "q_proj", c, c.attention_bias)(h).reshape(b, t, c.num_heads, hd)
    k = _dense(c.num_kv_heads * hd, "k_proj", c, c.attention_bias)(h).reshape(b, t, c.num_kv_heads, hd)
    v = _dense(c.num_kv_heads * hd, "v_proj", c, c.attention_bias)(h).reshape(b, t, c.num_kv_heads, hd)
    q = _apply_rope(q, cos, sin)  # [B, T, H, hd]
    k = _apply_rope(k, cos, sin).transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
    v = v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
    new_cache = (k, v)
    keys, values = k, v
    if prefix_kv is not None:
      keys = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=2)  # [B, Hkv, S0 + T, hd]
      values = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=2)
    if cache is not None:
      k_all, v_all, layer = cache  # [L, B, Hkv, S, hd]
      zero = jnp.zeros((), jnp.int32)
      start = (layer, zero, zero, cache_index, zero)
      k_all = lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
      v_all = lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
      new_cache = (k_all, v_all)
      if self.mode == "decode":
        keys = lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)  # [B, Hkv, S, hd]
        values = lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
    attn = _attend(q, keys, values, mask)  # [B, T, H*hd]
    return _dense(c.hidden_size, "o_proj", c)(attn), new_cache


class _MLP(nn.Module):
  """SwiGLU: down(silu(gate(h)) * up(h))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h):
    c = self.config
    gate = _dense(c.intermediate_size, "gate_proj", c)(h)  # [B, T, I]
    up = _dense(c.intermediate_size, "up_proj", c)(h)  # [B, T, I]
    return _dense(c.hidden_size, "down_proj", c)(nn.silu(gate) * up)  # [B, T, D]


class Transformer(nn.Module):
  """Embedding -> scanned decoder layers -> final RMSNorm. Returns hidden states, not logits.

  __call__(tokens [B, T], positions [B, T], mask [B, T, S], cache=None, cache_index=0,
           prefix_kv=None)
    -> (hidden [B, T, D] in the compute dtype, new (k, v) cache or None).

  Full mode only: `prefix_kv` = (k, v) [L, B, Hkv, S0, hd] of a prefix the tokens continue (mask
  then [B, T, S0 + T]); with `emit_kv` the second output is this call's (k, v) [L, B, Hkv, T, hd].
  """
  config: ModelConfig
  mode: str = "full"
  emit_kv: bool = False

  @nn.compact
  def __call__(self, tokens, positions, mask, cache=None, cache_index=None, prefix_kv=None):
    c = self.config
    dt = compute_dtype(c)
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=param_dtype(c),
                 embedding_init=nn.initializers.normal(0.02), name="embed_tokens")(tokens)
    cos, sin = rope_cos_sin(c, positions)  # [B, T, hd]
    layer_cls = _Layer
    if c.remat:
      layer_cls = nn.remat(_Layer, prevent_cse=False)
    stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                    length=c.num_layers)(c, self.mode, self.emit_kv, name="layers")
    if cache_index is None:
      cache_index = jnp.zeros((), jnp.int32)
    if cache is None:
      x, kv = stack(x, cos, sin, mask, cache_index, prefix_kv)  # kv: (k, v) [L, ...] or None
      new_cache = kv if self.emit_kv else None
    else:
      if prefix_kv is not None:
        raise ValueError("prefix_kv is only supported without a KV cache (full mode).")
      (x, k_all, v_all, _), _ = stack((x, cache.k, cache.v, jnp.zeros((), jnp.int32)),
                                      cos, sin, mask, cache_index, None)
      new_cache = KVCache(k_all, v_all)
    x = RMSNorm(c.rms_norm_eps, dt, param_dtype(c), name="norm")(x)
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
  params = dict(Transformer(config).init(rng, tokens, tokens, mask)["params"])
  if not config.tie_word_embeddings:
    k = jax.random.fold_in(rng, 7)
    params["lm_head"] = {"kernel": (0.02 * jax.random.normal(
        k, (config.hidden_size, config.vocab_size), jnp.float32)).astype(param_dtype(config))}
  return params


def _trunk_params(params: Params) -> Params:
  return {k: v for k, v in params.items() if k != "lm_head"}


def lm_head_weight(params: Params, config: ModelConfig) -> jax.Array:
  """The [D, V] output projection: the transposed embedding when tied, else lm_head/kernel."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def logits_from_hidden(params: Params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
  """float32 logits [..., V] = hidden [..., D] @ W_out [D, V] (compute dtype in, f32 accumulate)."""
  w = lm_head_weight(params, config).astype(compute_dtype(config))
  return jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)


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
  valid = attention_mask.astype(bool)  # [B, T]
  positions = positions_from_mask(attention_mask)  # [B, T]
  t = tokens.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))  # [T, T]
  mask = causal[None] & valid[:, None, :]  # [B, T, T]
  hidden, _ = Transformer(config).apply({"params": _trunk_params(params)}, tokens, positions, mask)
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
  trunk = {"params": _trunk_params(params)}
  pvalid = prompt_mask.astype(bool)  # [G, P]
  ppos = positions_from_mask(prompt_mask)  # [G, P]
  pmask = jnp.tril(jnp.ones((p, p), bool))[None] & pvalid[:, None, :]  # [G, P, P]
  prompt_hidden, (pk, pv) = Transformer(config, emit_kv=True).apply(
      trunk, prompt_tokens, ppos, pmask)  # kv: [L, G, Hkv, P, hd]
  pk, pv = (jnp.repeat(x, n, axis=1) for x in (pk, pv))  # [L, G*n, Hkv, P, hd]
  rvalid = response_mask.astype(bool)  # [B, R]
  plen = jnp.repeat(jnp.sum(prompt_mask.astype(jnp.int32), axis=1), n)  # [B]
  rpos = jnp.maximum(plen[:, None] + jnp.cumsum(rvalid.astype(jnp.int32), axis=1) - 1, 0)  # [B, R]
  key_prompt = jnp.broadcast_to(jnp.repeat(pvalid, n, axis=0)[:, None, :], (b, r, p))  # [B, R, P]
  key_resp = jnp.tril(jnp.ones((r, r), bool))[None] & rvalid[:, None, :]  # [B, R, R]
  rmask = jnp.concatenate([key_prompt, key_resp], axis=2)  # [B, R, P + R]
  response_hidden, _ = Transformer(config).apply(trunk, response_tokens, rpos, rmask,
                                                 prefix_kv=(pk, pv))
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
  t = tokens.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]  # [B, T, T]
  hidden, cache = Transformer(config, mode="prefill").apply(
      {"params": _trunk_params(params)}, tokens, positions, mask, cache, jnp.zeros((), jnp.int32))
  return logits_from_hidden(params, config, hidden[:, -1]), cache


def decode_step(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
                cache: KVCache, key_mask: jax.Array, cache_index: jax.Array) -> tuple[jax.Array, KVCache]:
  """One decode step.

  Args:
    tokens: int [B] tokens to feed (written at cache slot `cache_index`).
    positions: int [B] their RoPE positions.
    cache: KVCache [L, B, Hkv, S, hd].
    key_mask: bool [B, S], True on cache slots holding real tokens (slots > cache_index are
      ignored regardless).
    cache_index: int scalar slot of this step.

  Returns:
    (float32 logits [B, V], updated cache).
  """
  s = cache.k.shape[3]
  mask = key_mask & (jnp.arange(s) <= cache_index)[None, :]  # [B, S]
  hidden, cache = Transformer(config, mode="decode").apply(
      {"params": _trunk_params(params)}, tokens[:, None], positions[:, None], mask[:, None, :],
      cache, cache_index)
  return logits_from_hidden(params, config, hidden[:, 0]), cache



# ----------------------------------------------------------------------------------------------
# Fast decode path for the sampler: layers unrolled, weights pre-split and pre-transposed.
# ----------------------------------------------------------------------------------------------
def _rms(x: jax.Array, scale: jax.Array, eps: float, dt) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale.astype(dt) * y.astype(dt)


def _linear_t(x: jax.Array, w_t: jax.Array) -> jax.Array:
  """x [B, in] @ w_t [out, in]^T -> [B, out] (the PyTorch layout; faster on XLA:CPU for small B)."""
  return lax.dot_general(x, w_t, (((1,), (1,)), ((), ())))


def decode_weights(params: Params, config: ModelConfig) -> list:
  """Per-layer decode weights: fused qkv [(H+2Hkv)*hd, D] and gate|up [2I, D] in (out, in) layout.

  One copy of the trunk weights in the compute dtype; build it once per `generate` call, outside
  the decode loop (then no per-step weight slicing, and the (out, in) dots run ~25% faster on
  XLA:CPU at decode batch sizes).
  """
  dt = compute_dtype(config)
  lay = params["layers"]
  sa, mlp = lay["self_attn"], lay["mlp"]
  tr = lambda x: jnp.swapaxes(x, 1, 2).astype(dt)  # [L, in, out] -> [L, out, in]
  qkv = jnp.concatenate([tr(sa["q_proj"]["kernel"]), tr(sa["k_proj"]["kernel"]),
                         tr(sa["v_proj"]["kernel"])], axis=1)  # [L, (H+2Hkv)*hd, D]
  qkv_b = (jnp.concatenate([sa["q_proj"]["bias"], sa["k_proj"]["bias"], sa["v_proj"]["bias"]],
                           axis=1).astype(dt) if config.attention_bias else None)
  gate_up = jnp.concatenate([tr(mlp["gate_proj"]["kernel"]), tr(mlp["up_proj"]["kernel"])], axis=1)
  o, down = tr(sa["o_proj"]["kernel"]), tr(mlp["down_proj"]["kernel"])
  ln1, ln2 = lay["input_layernorm"]["scale"], lay["post_attention_layernorm"]["scale"]
  return [dict(ln1=ln1[i], qkv=qkv[i], qkv_b=None if qkv_b is None else qkv_b[i], o=o[i],
               ln2=ln2[i], gate_up=gate_up[i], down=down[i]) for i in range(config.num_layers)]


def split_cache(cache: KVCache) -> list:
  """[(k [B, Hkv, S, hd], v [B, Hkv, S, hd])] * L from a stacked KVCache."""
  return [(cache.k[i], cache.v[i]) for i in range(cache.k.shape[0])]


def decode_step_fast(params: Params, weights: list, config: ModelConfig, tokens: jax.Array,
                     positions: jax.Array, caches: list, key_mask: jax.Array,
                     cache_index: jax.Array) -> tuple[jax.Array, list]:
  """`decode_step` with unrolled layers over `decode_weights` and per-layer caches (`split_cache`).

  Same math as `decode_step`; inside a `lax.while_loop` each layer's cache is its own loop carry
  and is updated in place. Returns (float32 logits [B, V], updated per-layer caches).
  """
  c = config
  dt = compute_dtype(c)
  b = tokens.shape[0]
  hd, h, hkv = c.head_dim, c.num_heads, c.num_kv_heads
  s = caches[0][0].shape[2]
  mask = (key_mask & (jnp.arange(s) <= cache_index)[None, :])[:, None, :]  # [B, 1, S]
  x = params["embed_tokens"]["embedding"][tokens].astype(dt)  # [B, D]
  cos, sin = rope_cos_sin(c, positions[:, None])  # [B, 1, hd]
  new_caches = []
  for w, (k_cache, v_cache) in zip(weights, caches):
    y = _rms(x, w["ln1"], c.rms_norm_eps, dt)  # [B, D]
    qkv = _linear_t(y, w["qkv"])  # [B, (H+2Hkv)*hd]
    if w["qkv_b"] is not None:
      qkv = qkv + w["qkv_b"]
    q = qkv[:, : h * hd].reshape(b, 1, h, hd)
    k = qkv[:, h * hd: (h + hkv) * hd].reshape(b, 1, hkv, hd)
    v = qkv[:, (h + hkv) * hd:].reshape(b, hkv, 1, hd)
    q = _apply_rope(q, cos, sin)  # [B, 1, H, hd]
    k = _apply_rope(k, cos, sin).reshape(b, hkv, 1, hd)
    zero = jnp.zeros((), jnp.int32)
    k_cache = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (zero, zero, cache_index, zero))
    v_cache = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (zero, zero, cache_index, zero))
    new_caches.append((k_cache, v_cache))
    attn = _attend(q, k_cache.astype(dt), v_cache.astype(dt), mask)[:, 0]  # [B, H*hd]
    x = x + _linear_t(attn, w["o"])
    y = _rms(x, w["ln2"], c.rms_norm_eps, dt)
    gu = _linear_t(y, w["gate_up"])  # [B, 2I]
    x = x + _linear_t(nn.silu(gu[:, : c.intermediate_size]) * gu[:, c.intermediate_size:], w["down"])
  x = _rms(x, params["norm"]["scale"], c.rms_norm_eps, dt)
  return logits_from_hidden(params, c, x), new_caches
