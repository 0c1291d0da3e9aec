"""Jitted KV-cache sampler for the Llama/Qwen2 decoders in `jaxrl_dense.models`.

`generate` prefills the (left-padded) prompts once, optionally shares each prompt's cache across
`num_samples` samples, then runs the whole decode loop on device in one `lax.while_loop`
(it stops as soon as every row has emitted an EOS id). At step s, for every row:

  z = logits / temperature,  z = top_k(z),  z = top_p(z),  x_s ~ softmax(z)
  logprobs[:, s]     = log softmax(z)[x_s]          (the distribution actually sampled from)
  raw_logprobs[:, s] = log softmax(logits)[x_s]     (untempered, unfiltered)

Greedy decoding (temperature == 0) takes argmax(logits) and reports the untempered log-prob in
both fields. `mask` is 1 up to and including the first EOS of each row and 0 after it (those
tokens are `pad_id`). Prompt lengths are padded on the left to a multiple of `prompt_bucket`,
so new prompts of a similar length reuse the compiled program; the batch size, max_new_tokens,
top_k, the EOS set and whether top-p/greedy is active are static.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement
from jaxrl_dense.models import transformer
from jaxrl_dense.models.config import ModelConfig
# Shared with the continuous engine (`jaxrl_dense.sampling.engine`), which imports that module, not this one.
from jaxrl_dense.sampling.step import GenerationOutput, filter_logits  # noqa: F401  (re-exported)
from jaxrl_dense.sampling.step import SamplingParams
from jaxrl_dense.sampling.step import host_value as _host_value
from jaxrl_dense.sampling.step import sample_step as _sample_step

# Number of times the jitted sampler has been traced (tests use it to detect recompiles).
TRACE_COUNT = {"generate": 0}


@functools.partial(jax.jit, static_argnames=(
    "config", "max_new_tokens", "top_k", "greedy", "use_top_p", "eos_ids", "num_samples", "pad_id"))
def _generate_jit(params, prompt_tokens, prompt_mask, rng, temperature, top_p, *, config: ModelConfig,
                  max_new_tokens: int, top_k: int, greedy: bool, use_top_p: bool,
                  eos_ids: tuple, num_samples: int, pad_id: int) -> GenerationOutput:
  TRACE_COUNT["generate"] += 1
  b, tp = prompt_tokens.shape
  n = num_samples
  s = tp + max_new_tokens
  # The prompts' cache holds only their Tp slots; each of the n samples of a prompt (rows
  # b*n .. b*n+n-1) then gets its copy inside the one full-length [L, B*n, K, S, hd] cache, so
  # the only buffer beside that cache is the prompts' [L, B, K, Tp, hd].
  cache = transformer.init_cache(config, b, tp)
  logits, cache = transformer.prefill(params, config, prompt_tokens, prompt_mask, cache)  # [B, V]
  valid = prompt_mask.astype(bool)  # [B, Tp]
  grow = lambda x: jnp.pad(jnp.repeat(x, n, axis=1) if n > 1 else x,
                           ((0, 0), (0, 0), (0, 0), (0, max_new_tokens), (0, 0)))
  cache = transformer.KVCache(grow(cache.k), grow(cache.v))  # [L, B*n, K, S, hd]
  if n > 1:
    logits = jnp.repeat(logits, n, axis=0)
    valid = jnp.repeat(valid, n, axis=0)
  # Under a mesh (generate(..., mesh=)): rows over data x fsdp, kv heads over tensor.
  cache = transformer.KVCache(*(rules.constrain_kv_cache(x) for x in cache))  # [L, BN, K, S, hd]
  logits = rules.with_logical_constraint(logits, ("batch", None))  # [BN, V]
  bn = b * n
  n_prompt = jnp.sum(valid, axis=-1).astype(jnp.int32)  # [BN]
  key_mask = jnp.concatenate([valid, jnp.ones((bn, max_new_tokens), bool)], axis=1)  # [BN, S]
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)  # [E]
  sample = functools.partial(_sample_step, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p,
                             select_dtype=transformer.compute_dtype(config))

  def emit(state, logits):
    step, rng, finished, out = state[0], state[1], state[2], state[3]
    rng, key = jax.random.split(rng)
    tok, lp, raw_lp = sample(logits, key)
    live = ~finished  # [BN]
    tok = jnp.where(live, tok, pad_id)
    col = lambda a, x: lax.dynamic_update_slice(a, x[:, None].astype(a.dtype), (0, step))
    out = (col(out[0], tok), col(out[1], jnp.where(live, lp, 0.0)),
           col(out[2], live.astype(jnp.int32)), col(out[3], jnp.where(live, raw_lp, 0.0)))
    finished = finished | jnp.any(tok[:, None] == eos[None, :], axis=-1)
    return tok, rng, finished, out

  out0 = (jnp.full((bn, max_new_tokens), pad_id, jnp.int32),
          jnp.zeros((bn, max_new_tokens), jnp.float32),
          jnp.zeros((bn, max_new_tokens), jnp.int32),
          jnp.zeros((bn, max_new_tokens), jnp.float32))
  finished0 = jnp.zeros((bn,), bool)

  def cond(carry):
    step, _, finished, _, _, _ = carry
    return (step < max_new_tokens - 1) & ~jnp.all(finished)

  def body(carry):
    step, rng, finished, out, logits, cache = carry
    tok, rng, finished, out = emit((step, rng, finished, out), logits)
    logits, cache = transformer.decode_step(layer_params, config, tok, n_prompt + step, cache,
                                            key_mask, tp + step)  # per-layer caches, in place
    cache = [tuple(rules.constrain_kv_cache(x) for x in kv) for kv in cache]  # [BN, K, S, hd]
    logits = rules.with_logical_constraint(logits, ("batch", None))
    return step + 1, rng, finished, out, logits, cache

  layer_params = transformer.split_layers(params)  # per-layer weights, sliced once per rollout
  carry = (jnp.zeros((), jnp.int32), rng, finished0, out0, logits, transformer.split_cache(cache))
  step, rng, finished, out, logits, _ = lax.while_loop(cond, body, carry)
  _, _, _, out = emit((step, rng, finished, out), logits)  # the last token needs no decode step
  tokens, lps, mask, raw = out
  return GenerationOutput(tokens, lps, mask, raw, jnp.sum(mask, axis=-1))


def _bucket(length: int, bucket: int) -> int:
  return max(bucket, -(-length // bucket) * bucket)


def generate(params, config: ModelConfig, prompt_tokens, prompt_mask, rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Optional[Sequence[int]] = None, num_samples: int = 1,
             prompt_bucket: int = 16, pad_id: Optional[int] = None,
             mesh: Optional[jax.sharding.Mesh] = None, engine="static") -> GenerationOutput:
  """Samples continuations of left-padded prompts with a preallocated KV cache.

  Args:
    params: params pytree of `config`.
    config: static ModelConfig.
    prompt_tokens: int [B, Tp] prompts, left-padded.
    prompt_mask: [B, Tp], 1 on real prompt tokens; every row needs >= 1 and its last column 1.
    rng: PRNG key (the same key reproduces the same samples).
    max_new_tokens: static number of decode steps (>= 1).
    temperature: 0 for greedy, else > 0.
    top_p: nucleus mass in (0, 1]; 1 disables.
    top_k: keep the k most likely tokens; 0 disables.
    eos_ids: ids that end a row (default: `config.eos_token_ids`); empty: never stop early.
    num_samples: n samples per prompt sharing one prefill; output rows are B * n, prompt-major.
    prompt_bucket: Tp is left-padded to a multiple of this, so shapes (and compiles) are reused.
    pad_id: token written after EOS (default: pad, else first EOS, else 0).
    mesh: the device mesh (default: the mesh of `params`' shardings, if they span several
      devices). The prompts, the KV cache and the outputs are then split by rows over
      data x fsdp (and the cache's kv heads over tensor): each device decodes its own rows.
      Pass params in the rollout layout (`inference.inference_params`, once per rollout) so the
      decode loop moves no weights.
    engine: "static" (this module's one-batch `while_loop`), "continuous" (the paged-KV
      continuous-batching engine, `jaxrl_dense.sampling.engine`, default `EngineConfig`) or an
      `engine.EngineConfig`. Same outputs; greedy tokens are identical, sampled rows use per-row
      keys (`fold_in(fold_in(rng, row), step)`) so they differ from the static ones.

  Returns:
    GenerationOutput (see its docstring).
  """
  sp = SamplingParams.of(config, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, num_samples=num_samples, eos_ids=eos_ids, pad_id=pad_id)
  max_new_tokens, temperature, top_p, top_k = sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k
  eos_ids, pad_id = sp.eos_ids, sp.pad_id

  if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                     "must both be [B, Tp].")
  if not isinstance(prompt_mask, jax.core.Tracer):
    m = _host_value(prompt_mask)
    if (m.sum(-1) == 0).any():
      raise ValueError(f"prompt_mask rows {np.flatnonzero(m.sum(-1) == 0).tolist()} have no tokens.")
    if not m[:, -1].all():
      raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 for every row.")
  if not isinstance(prompt_tokens, jax.core.Tracer):
    t = _host_value(prompt_tokens)
    if t.min() < 0 or t.max() >= config.vocab_size:
      raise ValueError(f"prompt_tokens must lie in [0, {config.vocab_size}); got [{t.min()}, {t.max()}].")

  if not (isinstance(engine, str) and engine == "static"):
    from jaxrl_dense.sampling import engine as engine_lib  # lazy: the engine is optional
    if isinstance(engine, str) and engine != "continuous":
      raise ValueError(f"engine must be 'static', 'continuous' or an EngineConfig, got {engine!r}.")
    return engine_lib.generate(
        params, config, prompt_tokens, prompt_mask, rng, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_ids,
        num_samples=num_samples, pad_id=pad_id, mesh=mesh,
        engine=None if isinstance(engine, str) else engine)
  b, tp = prompt_tokens.shape
  tp_bucket = _bucket(tp, int(prompt_bucket))
  tokens = jnp.asarray(prompt_tokens, jnp.int32)
  mask = jnp.asarray(prompt_mask, jnp.int32)
  if tp_bucket > tp:
    tokens = jnp.pad(tokens, ((0, 0), (tp_bucket - tp, 0)), constant_values=pad_id)
    mask = jnp.pad(mask, ((0, 0), (tp_bucket - tp, 0)))
  greedy = temperature == 0.0
  run = functools.partial(
      _generate_jit, config=config, max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy,
      use_top_p=(top_p < 1.0) and not greedy, eos_ids=eos_ids, num_samples=int(num_samples),
      pad_id=int(pad_id))
  scalars = (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p))
  mesh = mesh_lib.mesh_of(params) if mesh is None else mesh
  if mesh is None or mesh.size == 1:
    return run(params, tokens, mask, rng, *scalars)
  rows = jax.sharding.NamedSharding(mesh, rules.logical_to_spec(("batch", None), tokens.shape, mesh))
  tokens, mask = placement.device_put(tokens, rows), placement.device_put(mask, rows)
  with mesh_lib.use_mesh(mesh):  # traced under the mesh: the cache / activation constraints apply
    return run(params, tokens, mask, rng, *scalars)
