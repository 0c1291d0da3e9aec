"""Exact per-token log-probabilities and entropies without the full [B, T, V] log-softmax.

  logp[b, t] = z[b, t-1, x[b, t]] - logsumexp_v z[b, t-1, v]          (t >= 1), logp[b, 0] = 0
  H[b, t]    = logsumexp_v z[b, t-1, v] - sum_v softmax(z[b, t-1])_v z[b, t-1, v]
  with z = h @ W_out the float32 logits of the hidden states h [B, T, D].

The LM head, logsumexp, gather and entropy are computed chunk by chunk over the B*(T-1)
predicting positions (`lax.map` over chunks of about `chunk_size` tokens: a slice of positions
of every row, so rows keep their devices under a mesh), each chunk under
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

from jaxrl_dense.parallel import mesh as _mesh_lib, rules as _rules
from jaxrl_dense.models import transformer
from jaxrl_dense.models.config import ModelConfig

DEFAULT_CHUNK_SIZE = 1024


def _head_stats(h: jax.Array, w: jax.Array, targets: jax.Array, with_entropy: bool,
                vocab_split: bool):
  """h [B, C, D], w [D, V], targets [B, C] -> (logp [B, C], entropy [B, C]) from float32 logits.

  Under a mesh the chunk's rows stay on the batch axes and its logits are split over the
  vocabulary where "tensor" divides V (`vocab_split`): then the target logit is a masked sum over
  the vocabulary (a local reduction plus an all-reduce of [B, C] scalars) instead of a gather
  along a split axis.
  """
  logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)  # [B, C, V]
  logits = _rules.with_logical_constraint(logits, ("batch", None, "vocab"))
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
  if vocab_split:
    hit = lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None]
    tgt = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)  # [B, C]
  else:
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, C]
  logp = tgt - lse
  if with_entropy:
    probs = jnp.exp(logits - lse[..., None])  # [B, C, V]
    entropy = lse - jnp.sum(probs * logits, axis=-1)  # [B, C]
  else:
    entropy = jnp.zeros_like(logp)
  return logp, entropy


def logprobs_from_hidden(hidden: jax.Array, w_out: jax.Array, tokens: jax.Array,
                         attention_mask: jax.Array, *, return_entropy: bool = False,
                         chunk_size: Optional[int] = None):
  """Chunked log p(tokens[:, t] | tokens[:, :t]) from hidden states.

  Chunks run along the sequence, all rows at once: chunk k holds positions [k*c, (k+1)*c) of
  every row, c = max(1, chunk_size // B), so a chunk has about `chunk_size` tokens and, under a
  mesh, keeps the rows' batch sharding: each device computes the head for its own rows (the
  weight is gathered over fsdp like every layer's, split over the vocabulary on "tensor"), and no
  float32 logits cross devices.

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
  valid = attention_mask.astype(bool)
  pred_valid = valid[:, 1:] & valid[:, :-1]  # [B, T-1]
  if b == 0 or t <= 1:
    zeros = jnp.zeros((b, t), jnp.float32)
    return (zeros, zeros) if return_entropy else zeros
  c = min(max(1, chunk // b), t - 1)  # positions per row in a chunk
  num_chunks = -(-(t - 1) // c)
  pad = num_chunks * c - (t - 1)
  h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))  # [B, K*c, D]
  h = h.reshape(b, num_chunks, c, d).transpose(1, 0, 2, 3)  # [K, B, c, D]
  h = _rules.with_logical_constraint(h, (None, "batch", None, "act_embed"))
  targets = jnp.pad(tokens[:, 1:].astype(jnp.int32), ((0, 0), (0, pad)))
  targets = targets.reshape(b, num_chunks, c).transpose(1, 0, 2)  # [K, B, c]
  targets = _rules.with_logical_constraint(targets, (None, "batch", None))
  w = _rules.with_logical_constraint(w_out.astype(hidden.dtype), ("act_embed", "vocab"))
  mesh = _mesh_lib.current_mesh()
  vocab_split = (mesh is not None and _rules.logical_to_spec(
      ("vocab",), (w.shape[1],), mesh)[0] is not None)

  body = jax.checkpoint(
      functools.partial(_head_stats, w=w, with_entropy=return_entropy, vocab_split=vocab_split),
      prevent_cse=False)
  logp, ent = lax.map(lambda xs: body(xs[0], targets=xs[1]), (h, targets))  # [K, B, c] each

  def finish(x):
    x = x.transpose(1, 0, 2).reshape(b, num_chunks * c)[:, :t - 1]  # [B, T-1]
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
