"""What the two samplers share: the output type, the logit filters, the per-token sampling step and
the host-side view of an input. The static sampler (`jaxrl_dense.sampling`) and the continuous
engine (`jaxrl_dense.sampling.engine`) both import this module; neither imports the other for it.

At step s, for every row (`sample_step`):

  z = logits / temperature,  z = top_k(z),  z = top_p(z),  x_s ~ softmax(z)
  logprobs[:, s]     = log softmax(z)[x_s]          (the distribution actually sampled from)
  raw_logprobs[:, s] = log softmax(logits)[x_s]     (untempered, unfiltered)

top-p follows Holtzman et al. 2020 (arXiv 1904.09751) with Hugging Face's tie and first-token rules.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_dense.parallel import placement

__all__ = ["GenerationOutput", "SamplingParams", "filter_logits", "sample_step", "host_value"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What a sampler is asked to sample, validated once for both samplers (`sampling.generate` and
  the engine's `run` / `run_episodes`): bad values raise ValueError naming the argument before
  any work. Build it with `SamplingParams.of(config, ...)`, which fills the stop ids and the pad
  id from the model config (pad: the config's, else the first EOS, else 0).

  Attributes: max_new_tokens >= 1; temperature >= 0 (0 = greedy); top_p in (0, 1]; top_k in
  [0, vocab_size] (0 = off); num_samples >= 1 rows per prompt; eos_ids; pad_id.
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  num_samples: int = 1
  eos_ids: tuple = ()
  pad_id: int = 0

  @classmethod
  def of(cls, config, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
         top_k: int = 0, num_samples: int = 1, eos_ids: Optional[Sequence[int]] = None,
         pad_id: Optional[int] = None) -> "SamplingParams":
    if int(max_new_tokens) < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {int(max_new_tokens)}.")
    if int(num_samples) < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if float(temperature) < 0:
      raise ValueError(f"temperature must be >= 0, got {float(temperature)}.")
    if not 0.0 < float(top_p) <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {float(top_p)}.")
    if int(top_k) < 0 or int(top_k) > config.vocab_size:
      raise ValueError(f"top_k must be in [0, vocab_size={config.vocab_size}], got {int(top_k)}.")
    eos = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
    if pad_id is None:
      pad_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return cls(int(max_new_tokens), float(temperature), float(top_p), int(top_k), int(num_samples),
               eos, int(pad_id))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


class GenerationOutput(NamedTuple):
  """Sampled continuations; rows are prompt-major (`B * num_samples`, samples of a prompt contiguous).

  tokens: int32 [B*n, max_new_tokens] (pad_id after EOS).
  logprobs: float32 [B*n, max_new_tokens] log-probs under the sampling distribution used.
  mask: int32 [B*n, max_new_tokens] 1 up to and including EOS.
  raw_logprobs: float32 [B*n, max_new_tokens] untempered, unfiltered log-probs.
  lengths: int32 [B*n] number of generated tokens (= mask.sum(-1)).
  """
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  raw_logprobs: jax.Array
  lengths: jax.Array


def filter_logits(logits: jax.Array, top_k: int = 0, top_p=1.0, use_top_p: bool = False) -> jax.Array:
  """Sets the logits [B, V] of tokens outside the top-k / top-p (nucleus) set to -inf.

  top-k keeps the k largest logits (k static; 0 disables). top-p keeps the smallest prefix of
  tokens sorted by decreasing probability whose mass reaches p: token i stays when the mass of
  the tokens ranked above it is < p (so the most likely token always stays; HF semantics).
  Ties at the threshold are all kept.
  """
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k > 0:
    vals = lax.top_k(logits, top_k)[0]  # [B, k] descending
    logits = jnp.where(logits < vals[:, -1:], neg_inf, logits)
  if use_top_p:
    if top_k <= 0:
      vals = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    probs = jax.nn.softmax(vals, axis=-1)  # [B, k or V]
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # [B, k or V]
    keep = mass_above < top_p
    keep = keep.at[:, 0].set(True)
    num_keep = jnp.sum(keep, axis=-1)  # [B]
    threshold = jnp.take_along_axis(vals, (num_keep - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


def _top_p_sorted(z: jax.Array, top_p) -> jax.Array:
  """Nucleus filter of logits z [B, K] sorted in decreasing order (HF semantics, as `filter_logits`)."""
  probs = jax.nn.softmax(z, axis=-1)  # [B, K]
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  keep = keep.at[:, 0].set(True)
  num_keep = jnp.sum(keep, axis=-1)  # [B]
  threshold = jnp.take_along_axis(z, (num_keep - 1)[:, None], axis=-1)  # [B, 1]
  return jnp.where(z < threshold, -jnp.inf, z)


def sample_step(logits, key, temperature, top_p, *, greedy, top_k, use_top_p, select_dtype=None):
  """logits [B, V] float32 -> (token [B], logprob used [B], untempered logprob [B]).

  No [B, V] log-softmax is materialised: log-probs are `logit[tok] - logsumexp(logits)`, one
  reduction over the vocabulary for the raw log-prob and, only when the sampled distribution
  differs (temperature != 1 or top-p without top-k), one more for it.
  With top-k the rest of the step lives in [B, k]: `lax.top_k` (on logits cast to
  `select_dtype`, e.g. bfloat16 when the model computes in bfloat16; the kept values themselves
  stay float32), then temperature, top-p on the already sorted k values (no vocabulary sort),
  the categorical draw over k and its log-prob. Without top-k the draw is the full-vocabulary
  `jax.random.categorical` of `filter_logits(logits / temperature)`, token for token the
  previous implementation's on the same key. With top-k the distribution is the same (the draw
  uses k Gumbel variates instead of V, so the tokens on a given key differ); exact ties at the
  k-th value keep k tokens here, all tied ones in `filter_logits`.
  """
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B] the untempered normaliser
  pick = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=-1)[:, 0]
  if greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    lp = pick(logits, tok) - lse
    return tok, lp, lp
  if top_k > 0:
    sel = logits if select_dtype is None else logits.astype(select_dtype)
    idx = lax.top_k(sel, top_k)[1]  # [B, k] descending
    z = jnp.take_along_axis(logits, idx, axis=-1) / temperature  # [B, k] float32
    if use_top_p:
      z = _top_p_sorted(z, top_p)
    j = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)  # [B]
    tok = pick(idx, j).astype(jnp.int32)
    lp = pick(z, j) - jax.nn.logsumexp(z, axis=-1)
    return tok, lp, pick(logits, tok) - lse
  z = logits / temperature
  if use_top_p:
    z = filter_logits(z, 0, top_p, True)  # full sort: only without top-k
  tok = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)  # [B]
  raw_lp = pick(logits, tok) - lse
  if not use_top_p and isinstance(temperature, (int, float)) and temperature == 1.0:
    return tok, raw_lp, raw_lp
  lp = pick(z, tok) - jax.nn.logsumexp(z, axis=-1)
  return tok, lp, raw_lp


def host_value(x) -> np.ndarray:
  """The whole of `x` as numpy for the host-side input checks.

  A global array whose shards live on other processes too (a multi-process run) is all-gathered
  (`placement.to_host`, a collective every process reaches, since every process calls `generate`
  with the same global prompts), so each process checks the same full value and a bad input
  raises the same error everywhere instead of stopping one process while the others wait.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return placement.to_host(x)
  return np.asarray(x)
