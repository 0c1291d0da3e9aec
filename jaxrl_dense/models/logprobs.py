"""Exact per-token log-probabilities and entropies without the full [B, T, V] log-softmax.

  logp[b, t] = z[b, t-1, x[b, t]] - logsumexp_v z[b, t-1, v]          (t >= 1), logp[b, 0] = 0
  H[b, t]    = logsumexp_v z[b, t-1, v] - sum_v softmax(z[b, t-1])_v z[b, t-1, v]
  with z = h @ W_out the float32 logits of the hidden states h [B, T, D].

The LM head, logsumexp, gather and entropy are computed chunk by chunk over the flattened
B*(T-1) predicting positions (`lax.map` over chunks of `chunk_size` tokens), each chunk under
`jax.checkpoint`, so neither the forward nor the backward pass ever holds more than one chunk of
float32 logits. This is the memory hot spot of RL for LMs (V = 49k to 152k).

Peak memory of the head for B=64, T=1024, V=152,064 (Qwen2.5), default chunk_size=1024 tokens:
one chunk of float32 logits is 1024 * 152,064 * 4 B = 0.62 GB; with the softmax temporary of the
entropy and, in the backward pass, the recomputed logits plus their cotangent, the peak is about
2 chunks = 1.25 GB, against 64 * 1024 * 152,064 * 4 B = 39.9 GB for the naive float32
log-softmax (~80 GB with its gradient). The hidden states themselves, [B, T, D] in the compute
dtype, are the trunk's and are not counted.
"""
from __future__ import annotations

import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_dense.models import transformer
from jaxrl_dense.models.config import ModelConfig

DEFAULT_CHUNK_SIZE = 1024


def _head_stats(h: jax.Array, w: jax.Array, targets: jax.Array, with_entropy: bool):
  """h [C, D], w [D, V], targets [C] -> (logp [C], entropy [C]) from float32 logits [C, V]."""
  logits = jnp.einsum("cd,dv->cv", h, w, preferred_element_type=jnp.float32)  # [C, V]
  lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
  tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # [C]
  logp = tgt - lse  # [C]
  if with_entropy:
    probs = jnp.exp(logits - lse[:, None])  # [C, V]
    entropy = lse - jnp.sum(probs * logits, axis=-1)  # [C]
  else:
    entropy = jnp.zeros_like(logp)
  return logp, entropy


def logprobs_from_hidden(hidden: jax.Array, w_out: jax.Array, tokens: jax.Array,
                         attention_mask: jax.Array, *, return_entropy: bool = False,
                         chunk_size: Optional[int] = None):
  """Chunked log p(tokens[:, t] | tokens[:, :t]) from hidden states.

  Args:
    hidden: [B, T, D] final-normed hidden states (position t predicts token t+1).
    w_out: [D, V] output projection.
    tokens: int [B, T].
    attention_mask: [B, T], 1 on real tokens.
    return_entropy: also return the entropy of each predictive distribution.
    chunk_size: tokens per LM-head chunk (default 1024).

  Returns:
    logp [B, T] float32 (and entropy [B, T] float32), zero at t = 0 and wherever token t or
    token t-1 is padding (the first real token of a left-padded row has no prediction).
  """
  chex.assert_rank([hidden, tokens, attention_mask], [3, 2, 2])
  chex.assert_equal_shape([tokens, attention_mask])
  chex.assert_equal_shape_prefix([hidden, tokens], 2)
  chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
  if chunk <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  b, t, d = hidden.shape
  n = b * (t - 1)
  valid = attention_mask.astype(bool)
  pred_valid = valid[:, 1:] & valid[:, :-1]  # [B, T-1]
  if n == 0:
    zeros = jnp.zeros((b, t), jnp.float32)
    return (zeros, zeros) if return_entropy else zeros
  h = hidden[:, :-1].reshape(n, d)  # [N, D]
  targets = tokens[:, 1:].reshape(n).astype(jnp.int32)  # [N]
  chunk = min(chunk, n)
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)  # [K, C, D]
  targets = jnp.pad(targets, (0, pad)).reshape(num_chunks, chunk)  # [K, C]
  w = w_out.astype(hidden.dtype)

  body = jax.checkpoint(
      functools.partial(_head_stats, w=w, with_entropy=return_entropy), prevent_cse=False)
  logp, ent = lax.map(lambda xs: body(xs[0], targets=xs[1]), (h, targets))  # [K, C] each

  def finish(x):
    x = x.reshape(-1)[:n].reshape(b, t - 1)  # [B, T-1]
    x = jnp.where(pred_valid, x, 0.0)
    return jnp.pad(x, ((0, 0), (1, 0)))  # [B, T]

  if return_entropy:
    return finish(logp), finish(ent)
  return finish(logp)


@functools.partial(jax.jit, static_argnames=("config", "return_entropy", "chunk_size"))
def token_logprobs(params, config: ModelConfig, tokens: jax.Array, attention_mask: jax.Array, *,
                   return_entropy: bool = False, chunk_size: Optional[int] = None):
  """Per-token log-probs (and entropies) of `tokens` under the model, differentiable in params.

  out[:, 0] = 0 and out[:, t] = log p(tokens[:, t] | tokens[:, :t]); entropy[:, t] is the
  entropy of that same predictive distribution. Both are 0 where token t or t-1 is padding.
  See the module docstring for the chunking and its memory (B=64, T=1024, V=152k: ~1.25 GB for
  the head instead of 39.9 GB).

  Args:
    params: params pytree.
    config: static ModelConfig.
    tokens: int [B, T] (prompts left-padded, responses right-padded).
    attention_mask: [B, T], 1 on real tokens.
    return_entropy: also return entropy [B, T].
    chunk_size: tokens per LM-head chunk (static; default 1024).

  Returns:
    logp [B, T] float32, or (logp, entropy) when return_entropy.
  """
  hidden = transformer.hidden_states(params, config, tokens, attention_mask)  # [B, T, D]
  w = transformer.lm_head_weight(params, config).astype(transformer.compute_dtype(config))  # [D, V]
  return logprobs_from_hidden(hidden, w, tokens, attention_mask, return_entropy=return_entropy,
                              chunk_size=chunk_size)
