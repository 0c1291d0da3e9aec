"""Continuous-batching rollout engine over a paged KV cache (vLLM / JetStream / Levanter style).

`generate` returns exactly what `sampling.generate` returns (`GenerationOutput`, rows
prompt-major, samples of a prompt contiguous), with the same sampling semantics (temperature,
top-k / top-p via `sampling_step.sample_step`, the EOS set, log-probs of the sampled and of the
untempered distribution), but schedules the work differently:

  * KV cache = a pool of pages (`page_table.PagePool`); a row holds only the pages its prompt and
    its tokens so far need, and gives them back when it finishes. Under a mesh the pool is split
    by rows (one block of pages and one PagePool per data x fsdp row shard; a prompt's samples
    share a shard) and by kv heads ("tensor"); pages are touched only inside `jax.shard_map`.
  * At most `max_slots` rows decode at once; waiting rows are admitted (FIFO) as others finish
    (JetStream's insert / generate loop). A decode call runs on the live rows only, compacted and
    padded to a power-of-two width, over a block table cut to the longest live row (power-of-two
    pages): finished rows cost nothing and a long tail runs at the width of the tail.
  * `steps_per_call` decode steps per jitted call (a `fori_loop`), so host scheduling and
    transfers are paid once per K tokens.
  * Each prompt is prefilled once at its real length (padded to a power-of-two bucket, chunks of
    at most `prefill_chunk` tokens for long prompts, prompts batched per bucket); its n samples
    reference the same prompt pages (refcounts) and copy only the partially filled last page
    (copy-on-write), Levanter's `clone` of a sequence.

  * `run_episodes`: multi-turn rows. A row stops in the decode loop at a stop candidate (runtime
    ids, like EOS), the host's step_fn decides (end / resume the turn / next turn), and the next
    turn's observation is prefilled into the row's own pages at its current length: the context
    is never prefilled again (`multiturn.rollout_turns_paused`).

Random keys: the token of row r at step s is drawn with `fold_in(fold_in(rng, r), s)`, so the
samples do not depend on the schedule (slots, K, page size, pool size). Greedy decoding
(temperature 0) gives the static sampler's tokens (the same math, up to float reduction order).

Admission reserves a row's worst-case pages (prompt + max_new - 1 positions) so a running row
never waits for a page and no preemption is needed; memory is bounded by `num_pages`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_dense.parallel import mesh as mesh_lib, rules
from jaxrl_dense.sampling import step as sampling_step
from jaxrl_dense.sampling.engine import paged_attention as pa
from jaxrl_dense.sampling.engine.page_table import NULL_PAGE, PagePool, Sequence, pages_for
from jaxrl_dense.models import transformer
from jaxrl_dense.models.config import ModelConfig

# Traces of each jitted program (tests use it to bound recompiles).
TRACE_COUNT = collections.Counter()
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


# ----------------------------------------------------------------------------------------------
# Pool layout under a mesh
# ----------------------------------------------------------------------------------------------
# Under a mesh with S = data x fsdp row shards the pool's page axis is S blocks of N pages, one
# per row shard, and its kv heads are split over "tensor" (where it divides both head counts):
# pool [Hkv, S * N, P, hd] with spec P("tensor", ("data", "fsdp"), None, None). A row lives on
# one shard: its block table holds page ids LOCAL to that shard's block (each block has its own
# null page 0), and decode / prefill rows are laid out shard-major (rows [s W/S, (s+1) W/S) on
# shard s), so page writes, paged attention and copy-on-write run per shard inside
# `jax.shard_map` and no device holds or reads another shard's pages: per device the pool is
# 1 / (S x tensor) of the whole. One device (or no mesh): S = 1, the pool is [Hkv, N, P, hd].
def row_shards(mesh) -> int:
  """S: the devices along the row axes (data x fsdp) of `mesh`; 1 without a mesh."""
  if mesh is None:
    return 1
  sizes = dict(mesh.shape)
  return int(np.prod([sizes.get(a, 1) for a in mesh_lib.BATCH_AXES]))


def _shard_axes(mesh, config: ModelConfig) -> dict:
  """Mesh axes per name: "rows" (and the pool's "pages") over data x fsdp, "heads" (query and
  kv heads) over tensor when it divides both head counts (whole query groups per shard)."""
  ax = rules.kernel_axes(mesh, batch=row_shards(mesh), num_heads=config.num_heads,
                            num_kv_heads=config.num_kv_heads)
  return {"rows": ax["batch"], "pages": ax["batch"], "heads": ax["heads"]}


def pool_spec(mesh, config: ModelConfig) -> jax.sharding.PartitionSpec:
  """PartitionSpec of each [Hkv, S * N, P, hd] pool array on `mesh`."""
  ax = _shard_axes(mesh, config)
  return jax.sharding.PartitionSpec(ax["heads"], ax["pages"], None, None)


def _per_row_shard(fn, in_names, out_names, config: ModelConfig):
  """`fn` run per (row shard, kv-head shard) with `jax.shard_map` over the context mesh.

  in_names / out_names: per argument (output), one name per dimension ("rows", "pages",
  "heads" or None); a name tuple applies to every leaf of a pytree argument (the pool). Without a
  context mesh, or on one device, returns `fn` itself (the single-device program is unchanged).
  """
  mesh = mesh_lib.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn
  ax = _shard_axes(mesh, config)
  spec = lambda names: jax.sharding.PartitionSpec(*[ax[n] if n else None for n in names])
  multi = isinstance(out_names[0], tuple)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(n) for n in in_names),
                       out_specs=tuple(spec(n) for n in out_names) if multi else spec(out_names),
                       check_vma=False)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static knobs of the continuous-batching engine.

  Attributes:
    page_size: P, token slots per KV page.
    max_slots: rows decoding at once (the largest decode width); None: every row (the static
      sampler's concurrency; finished rows still leave the decode batch). Under a mesh each of
      the S row shards (data x fsdp) takes ceil(max_slots / S) rows.
    num_pages: pages in the pool including the null page (under a mesh: all shards' pages,
      num_pages // S per shard, each with its own null page); None sizes each shard for its
      slots of the longest prompt plus their prompts' pages (about the static sampler's cache
      when max_slots >= rows; less when fewer slots).
    steps_per_call: K, decode steps per jitted call.
    prefill_chunk: longest prefill chunk (tokens); longer prompts are prefilled in chunks.
    min_prefill_bucket: shortest prefill length bucket (prompts are padded to powers of two).
    attention: "auto" (Pallas on TPU / GPU, XLA gather elsewhere), "xla" or "pallas".
    min_decode_width / min_table_tokens: smallest decode width and block-table span (tokens)
      buckets; widths and spans are powers of two from there (fewer compiled shapes).
  """
  page_size: int = 16
  max_slots: Optional[int] = None
  num_pages: Optional[int] = None
  steps_per_call: int = 8
  prefill_chunk: int = 512
  min_prefill_bucket: int = 16
  attention: str = "auto"
  min_decode_width: int = 8
  min_table_tokens: int = 64

  def __post_init__(self):
    for name in ("page_size", "max_slots", "steps_per_call", "prefill_chunk", "min_prefill_bucket",
                 "min_decode_width", "min_table_tokens"):
      if getattr(self, name) is not None and int(getattr(self, name)) < 1:
        raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.num_pages is not None and self.num_pages < 2:
      raise ValueError(f"EngineConfig.num_pages must be >= 2 (page 0 is the null page), got {self.num_pages}.")
    if self.attention not in ("auto", "xla", "pallas"):
      raise ValueError(f"EngineConfig.attention must be 'auto', 'xla' or 'pallas', got {self.attention!r}.")
    if self.prefill_chunk % self.page_size:
      raise ValueError(f"EngineConfig.prefill_chunk={self.prefill_chunk} must be a multiple of "
                       f"page_size={self.page_size}.")


@dataclasses.dataclass
class EngineStats:
  """What a run did: calls, pages, widths (for tests and benchmarks)."""
  num_pages: int = 0             # all row shards' pages (each shard: num_pages / row_shards)
  row_shards: int = 1            # S: one PagePool and one block of the device pool per shard
  peak_pages_in_use: int = 0     # sum over shards of each shard's peak
  peak_live_rows: int = 0
  prefill_calls: int = 0
  prefill_tokens: int = 0
  decode_calls: int = 0
  decode_row_steps: int = 0      # sum over decode calls of width * K (padded work)
  generated_tokens: int = 0
  page_copies: int = 0
  first_sample_calls: int = 0    # admissions' (and resumed turns') first-token draws (each reads to host)
  pages_in_use_at_end: int = -1  # 0 after every run (checked by `run` too)
  prefill_real_tokens: int = 0   # prefilled tokens without padding: prompts once, episodes' observations
  # `run_episodes` only: rows handed to the host's step_fn (a stop candidate, EOS or the turn's
  # budget), candidates that completed no stop string (the row resumed its turn), and turns
  # started by prefilling an observation into the row's own pages
  pauses: int = 0
  false_stops: int = 0
  resumed_turns: int = 0
  widths: list = dataclasses.field(default_factory=list)
  # (width, table pages) of each decode call: one compiled decode program per distinct pair,
  # both powers of two (min_decode_width .. max_slots, min_table_tokens / P .. the longest row)
  decode_shapes: list = dataclasses.field(default_factory=list)
  # (prompts, chunk tokens, table pages) of each prefill call: one compiled prefill program each
  prefill_shapes: list = dataclasses.field(default_factory=list)
  # live rows per shard of each decode call (the decode width per shard is their pow2 maximum)
  shard_live: list = dataclasses.field(default_factory=list)
  shard_rows: list = dataclasses.field(default_factory=list)  # rows admitted to each shard

  @property
  def host_syncs(self) -> int:
    """Device -> host round trips of the run: one per admission wave (its first tokens), one per
    wave of resumed episode turns (their first tokens) and one per decode call (every K decode
    steps), whatever the number of rows; prefill results stay on the device."""
    return self.first_sample_calls + self.decode_calls


def _pow2(x: int, lo: int = 1, hi: Optional[int] = None) -> int:
  b = max(lo, 1 << max(0, int(x) - 1).bit_length())
  return b if hi is None else min(b, hi)


# ----------------------------------------------------------------------------------------------
# Device programs
# ----------------------------------------------------------------------------------------------
# ModelConfig fields whose non-default values change the decoder math this engine implements
# (Llama / Qwen2: pre-norm, SwiGLU, q/k/v bias only); such models use engine="static".
_UNSUPPORTED_FEATURES = {"attention_out_bias": False, "mlp_bias": False, "qk_norm": False,
                         "hidden_act": "silu", "rms_norm_unit_offset": False,
                         "scale_embeddings": False, "post_norms": False,
                         "query_pre_attn_scalar": None, "final_logit_softcapping": None,
                         "sliding_window": None, "layer_types": None}


def _check_config(config: ModelConfig, params) -> None:
  """Raises for models whose math the engine does not implement (naming the field)."""
  if config.model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"the continuous engine supports model_type in {SUPPORTED_MODEL_TYPES}, "
                     f"got {config.model_type!r}; use engine='static'.")
  bad = {k: getattr(config, k) for k, v in _UNSUPPORTED_FEATURES.items()
         if getattr(config, k, v) != v}
  if bad:
    raise ValueError(f"the continuous engine does not implement {bad}; use engine='static'.")
  if isinstance(params, dict) and "lora" in params:
    raise ValueError("the continuous engine takes merged weights; merge the LoRA adapters first "
                     "or use engine='static'.")


@functools.partial(jax.jit, static_argnames=("config",))
def prepare_weights(params, config: ModelConfig) -> list:
  """Per-layer weights in (out, in) layout, q|k|v and gate|up fused, in the compute dtype.

  Read from the params pytree of `models.transformer` (layers stacked on a leading [L] axis);
  built once per run.
  """
  dt = transformer.compute_dtype(config)
  lay = params["layers"]
  sa, mlp = lay["self_attn"], lay["mlp"]
  tr = lambda x: jnp.swapaxes(x, 1, 2).astype(dt)  # [L, in, out] -> [L, out, in]
  qkv = jnp.concatenate([tr(sa[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")], axis=1)
  qkv_b = (jnp.concatenate([sa[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], axis=1).astype(dt)
           if config.attention_bias else None)
  gate_up = jnp.concatenate([tr(mlp["gate_proj"]["kernel"]), tr(mlp["up_proj"]["kernel"])], axis=1)
  o, down = tr(sa["o_proj"]["kernel"]), tr(mlp["down_proj"]["kernel"])
  ln1, ln2 = lay["input_layernorm"]["scale"], lay["post_attention_layernorm"]["scale"]
  return [dict(ln1=ln1[i], qkv=qkv[i], qkv_b=None if qkv_b is None else qkv_b[i], o=o[i], ln2=ln2[i],
               gate_up=gate_up[i], down=down[i]) for i in range(config.num_layers)]


def _rms(x, scale, eps, dt):
  """RMSNorm(x) = scale * x / sqrt(mean(x^2) + eps), normalised in float32."""
  xf = x.astype(jnp.float32)
  return scale.astype(dt) * (xf * lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(dt)


def _rope(x, cos, sin):
  """x [B, T, N, hd], cos/sin [B, T, hd]: x cos + rotate_half(x) sin (HF convention)."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None].astype(x.dtype) + rot * sin[:, :, None].astype(x.dtype)


def _linear(x, w_t):
  """x [..., in] @ w_t[out, in]^T -> [..., out]."""
  return lax.dot_general(x, w_t, (((x.ndim - 1,), (1,)), ((), ())))


def _forward(weights, params, config: ModelConfig, pool, tokens, positions, page_ids, offsets,
             block_table, attention: str):
  """Decoder over paged KV: tokens [B, T] at positions [B, T] -> final-normed hidden [B, T, D].

  Each layer writes its keys/values of the T tokens to (page_ids, offsets) [B, T] and then
  attends, per row, over the pages of `block_table` [B, pp] up to each query's position.
  pool: tuple of L (k_pages, v_pages) [Hkv, S * N, P, hd]; under a mesh B is S blocks of rows,
  block s holding shard-local page ids, and both steps run per shard (`_paged_layer`).
  Returns (hidden, new pool).
  """
  c = config
  dt = transformer.compute_dtype(c)
  b, t = tokens.shape
  hd, h, hkv = c.head_dim, c.num_heads, c.num_kv_heads
  x = params["embed_tokens"]["embedding"][tokens].astype(dt)  # [B, T, D]
  x = rules.with_logical_constraint(x, ("batch", "length", "act_embed"))
  cos, sin = transformer.rope_cos_sin(c, positions)  # [B, T, hd]
  new_pool = []
  tok_names, page_names = ("rows", None, "heads", None), ("heads", "pages", None, None)
  paged = _per_row_shard(functools.partial(_paged_layer, attention=attention),
                         (tok_names, tok_names, tok_names, page_names, page_names, ("rows", None),
                          ("rows", None), ("rows", None), ("rows", None)),
                         (("rows", None, "heads"), page_names, page_names), config)
  for w, (k_pages, v_pages) in zip(weights, pool):
    y = _rms(x, w["ln1"], c.rms_norm_eps, dt)
    qkv = _linear(y, w["qkv"])  # [B, T, (H + 2Hkv) hd]
    if w["qkv_b"] is not None:
      qkv = qkv + w["qkv_b"]
    q = _rope(qkv[..., : h * hd].reshape(b, t, h, hd), cos, sin)  # [B, T, H, hd]
    k = _rope(qkv[..., h * hd: (h + hkv) * hd].reshape(b, t, hkv, hd), cos, sin)  # [B, T, Hkv, hd]
    v = qkv[..., (h + hkv) * hd:].reshape(b, t, hkv, hd)
    attn, k_pages, v_pages = paged(q, k, v, k_pages, v_pages, page_ids, offsets, block_table,
                                   positions)
    new_pool.append((k_pages, v_pages))
    x = x + _linear(attn.astype(dt), w["o"])
    y = _rms(x, w["ln2"], c.rms_norm_eps, dt)
    gu = _linear(y, w["gate_up"])  # [B, T, 2I]
    x = x + _linear(jax.nn.silu(gu[..., : c.intermediate_size]) * gu[..., c.intermediate_size:], w["down"])
    x = rules.with_logical_constraint(x, ("batch", "length", "act_embed"))
  return _rms(x, params["norm"]["scale"], c.rms_norm_eps, dt), tuple(new_pool)


def _paged_layer(q, k, v, k_pages, v_pages, page_ids, offsets, block_table, positions, *,
                 attention):
  """One layer's page writes and paged attention on one shard's rows, pages and kv heads.

  q [B, T, H, hd], k / v [B, T, Hkv, hd], pages [Hkv, N, P, hd], page_ids / offsets /
  block_table / positions with this shard's local page ids. Returns (attn [B, T, H * hd],
  k_pages, v_pages).
  """
  k_pages = pa.write_pages(k_pages, k, page_ids, offsets)
  v_pages = pa.write_pages(v_pages, v, page_ids, offsets)
  attn = pa.paged_attention(q, k_pages, v_pages, block_table, positions, impl=attention,
                            per_shard=True)
  return attn, k_pages, v_pages


def _row_keys(rng, rows, steps, salt):
  """Key of (row, step): fold_in(fold_in(rng_t, row), step), [R] keys, where rng_t = rng when
  salt < 0 (every row of `run`) and fold_in(rng, salt) otherwise (an episode's turn, `run_episodes`)."""
  def one(r, s, t):
    base = lax.cond(t >= 0, lambda: jax.random.fold_in(rng, t), lambda: rng)
    return jax.random.fold_in(jax.random.fold_in(base, r), s)
  return jax.vmap(one)(rows, steps, salt)


def _sample_rows(logits, keys, temperature, top_p, *, greedy, top_k, use_top_p):
  """Per-row keys around `sampling_step.sample_step`: logits [R, V], keys [R] -> 3 x [R]."""
  one = lambda lg, k: sampling_step.sample_step(lg[None], k, temperature, top_p, greedy=greedy,
                                            top_k=top_k, use_top_p=use_top_p)
  tok, lp, raw = jax.vmap(one)(logits, keys)
  return tok[:, 0], lp[:, 0], raw[:, 0]


def init_pool(config: ModelConfig, num_pages: int, page_size: int, dtype=None) -> tuple:
  """Zeroed page pool: L x (k, v) [Hkv, num_pages, page_size, hd] (default: compute dtype).

  Under a context mesh (`mesh_lib.use_mesh`) num_pages = S x pages per row shard and the arrays
  are created in place with `pool_spec` (pages over data x fsdp, kv heads over tensor): no device
  ever holds the whole pool.
  """
  dtype = transformer.compute_dtype(config) if dtype is None else dtype
  shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
  make = lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                       for _ in range(config.num_layers))
  mesh = mesh_lib.current_mesh()
  if mesh is None or mesh.size == 1:
    return make()
  if num_pages % row_shards(mesh):
    raise ValueError(f"init_pool: num_pages={num_pages} is not a multiple of the "
                     f"{row_shards(mesh)} row shards (data x fsdp) of the mesh.")
  return jax.jit(make, out_shardings=pool_spec(mesh, config))()


@functools.partial(jax.jit, static_argnames=("config", "attention"), donate_argnames=("pool",))
def _prefill(weights, params, pool, tokens, start, n_valid, block_table, *, config, attention):
  """One prefill chunk of Bp prompts: tokens [Bp, C] at positions start + [0, C), the first
  n_valid [Bp] of them real. Writes their KV pages; returns (pool, logits [Bp, V] after the
  last real token)."""
  TRACE_COUNT["prefill"] += 1
  page_size = pool[0][0].shape[2]
  c = tokens.shape[1]
  positions = start[:, None] + jnp.arange(c, dtype=jnp.int32)[None]  # [Bp, C]
  valid = jnp.arange(c)[None] < n_valid[:, None]  # [Bp, C]
  page_ids = jnp.where(valid, jnp.take_along_axis(block_table, positions // page_size, axis=1,
                                                  mode="clip"), NULL_PAGE)
  offsets = jnp.where(valid, positions % page_size, 0)
  hidden, pool = _forward(weights, params, config, pool, tokens, positions, page_ids, offsets,
                          block_table, attention)
  last = jnp.take_along_axis(hidden, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
  return pool, transformer.logits_from_hidden(params, config, last)


@functools.partial(jax.jit, static_argnames=("greedy", "top_k", "use_top_p"))
def _sample_first(logits, rows, salt, rng, temperature, top_p, *, greedy, top_k, use_top_p):
  """Step-0 tokens of newly admitted (or resumed) rows from their contexts' logits [R, V]."""
  TRACE_COUNT["sample_first"] += 1
  keys = _row_keys(rng, rows, jnp.zeros_like(rows), salt)
  return _sample_rows(logits, keys, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("pool",))
def _copy_pages(pool, src, dst, *, config):
  """pool pages dst[i] <- src[i] in every layer (copy-on-write of shared partial pages).

  src / dst int32 [S * m]: block s holds shard s's local page ids (pads copy page 0 onto itself).
  """
  TRACE_COUNT["copy"] += 1
  copy = lambda pool, src, dst: tuple((k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src]))
                                      for k, v in pool)
  pages = ("heads", "pages", None, None)
  return _per_row_shard(copy, (pages, ("rows",), ("rows",)), pages, config)(pool, src, dst)


@functools.partial(jax.jit, static_argnames=(
    "config", "steps", "greedy", "top_k", "use_top_p", "pad_id", "attention"),
    donate_argnames=("pool",))
def _decode(weights, params, pool, block_table, tok, plen, step, live, rows, salt, max_new, eos, rng,
            temperature, top_p, *, config, steps, greedy, top_k, use_top_p, pad_id, attention):
  """K = `steps` decode steps of W rows.

  Row i at sample step s feeds its last token at position plen + s - 1 and samples token s.
  A row stops after an EOS id or its max_new-th token; stopped rows (and padding rows,
  live=False) write to the null page and emit nothing.

  Args: block_table [W, pp]; tok, plen, step, rows, salt, max_new int32 [W]; live bool [W];
    eos int32 [E] the ids that stop a row: EOS, and an episode's stop candidates (padded with -1).
  Returns: (pool, tokens [W, K], logprobs [W, K], raw logprobs [W, K], emitted bool [W, K]).
  """
  TRACE_COUNT["decode"] += 1
  page_size = pool[0][0].shape[2]
  span = block_table.shape[1] * page_size
  w = tok.shape[0]

  def body(i, carry):
    pool, tok, step, live, out = carry
    pos = jnp.minimum(plen + step - 1, span - 1)  # [W]
    page = jnp.where(live, jnp.take_along_axis(block_table, (pos // page_size)[:, None], axis=1)[:, 0],
                     NULL_PAGE)
    off = jnp.where(live, pos % page_size, 0)
    hidden, pool = _forward(weights, params, config, pool, tok[:, None], pos[:, None], page[:, None],
                            off[:, None], block_table, attention)
    logits = transformer.logits_from_hidden(params, config, hidden[:, 0])  # [W, V]
    logits = rules.with_logical_constraint(logits, ("batch", None))
    new, lp, raw = _sample_rows(logits, _row_keys(rng, rows, step, salt), temperature, top_p,
                                greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    new = jnp.where(live, new, pad_id)
    upd = lambda a, x: lax.dynamic_update_slice(a, x[:, None].astype(a.dtype), (0, i))
    out = (upd(out[0], new), upd(out[1], jnp.where(live, lp, 0.0)),
           upd(out[2], jnp.where(live, raw, 0.0)), upd(out[3], live))
    stop = jnp.any(new[:, None] == eos[None], axis=-1) | (step + 1 >= max_new)
    return pool, jnp.where(live, new, tok), step + live, live & ~stop, out

  out0 = (jnp.full((w, steps), pad_id, jnp.int32), jnp.zeros((w, steps), jnp.float32),
          jnp.zeros((w, steps), jnp.float32), jnp.zeros((w, steps), bool))
  pool, _, _, _, out = lax.fori_loop(0, steps, body, (pool, tok, step, live, out0))
  return (pool,) + out


# ----------------------------------------------------------------------------------------------
# Host scheduler
# ----------------------------------------------------------------------------------------------
def _resume_tokens(turn_tokens, turn_start: int, keep: int, observation) -> tuple:
  """What a paused row prefills to start its next turn, and where: its last kept token (sampled,
  never fed) and the observation ids, at position turn_start + keep - 1 (turn_start: the
  context length the turn was sampled after). Everything before stays in the row's pages."""
  ids = np.concatenate([np.asarray(turn_tokens[keep - 1:keep], np.int32),
                        np.asarray(observation, np.int32).reshape(-1)])
  return ids, turn_start + keep - 1


def _real_prompts(prompt_tokens, prompt_mask) -> list:
  """Left- (or any-) padded [B, Tp] prompts -> list of B int32 arrays of their real tokens."""
  t = sampling_step.host_value(prompt_tokens)
  m = sampling_step.host_value(prompt_mask).astype(bool)
  return [t[i][m[i]].astype(np.int32) for i in range(t.shape[0])]


def _default_num_pages(cfg: EngineConfig, lens, n: int, max_new: int) -> int:
  """Pool for min(max_slots, rows) rows of the longest prompt plus every prompt's own pages."""
  p = cfg.page_size
  rows = min(cfg.max_slots, len(lens) * n)
  per_row = pages_for(max(lens) + max_new - 1, p) + 1
  return 1 + rows * per_row + min(len(lens), rows) * pages_for(max(lens), p)


def run(params, config: ModelConfig, prompt_tokens, prompt_mask, rng: jax.Array, *,
        max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        eos_ids: Optional[Seq[int]] = None, num_samples: int = 1, pad_id: Optional[int] = None,
        max_new_per_row=None, engine: Optional[EngineConfig] = None, mesh=None, row_ids=None):
  """Continuous-batching generation; returns (sampling.GenerationOutput, EngineStats).

  Args are those of `sampling.generate` (prompts [B, Tp] with a mask; any padding side works
  here), plus:
    max_new_per_row: optional int [B * n] per-row limits <= max_new_tokens (rows stop there).
    row_ids: optional int [B * n] key ids of the rows (default 0 .. B * n - 1): row r draws token
      s with fold_in(fold_in(rng, row_ids[r]), s), so a subset of a batch can be re-sampled with
      the keys it had in the batch (`multiturn.rollout_turns` passes each episode's index).
    engine: EngineConfig (default EngineConfig()).
    mesh: device mesh (default: the mesh of `params`' shardings, if any). Rows are split over
      the S = data x fsdp row shards, each with its own block of the page pool (one host
      PagePool per shard, shard-local page ids; a prompt and its n samples on one shard), and
      the pool's kv heads over "tensor": per device the pool is 1 / (S x tensor) of the whole.
  The output has max_new_tokens columns whatever the per-row limits.
  """
  _check_config(config, params)
  mesh = mesh_lib.mesh_of(params) if mesh is None else mesh
  if mesh is not None and mesh.size > 1:
    with mesh_lib.use_mesh(mesh):
      return _run(params, config, prompt_tokens, prompt_mask, rng, max_new_tokens, temperature,
                  top_p, top_k, eos_ids, num_samples, pad_id, max_new_per_row, engine, row_ids=row_ids)
  return _run(params, config, prompt_tokens, prompt_mask, rng, max_new_tokens, temperature,
              top_p, top_k, eos_ids, num_samples, pad_id, max_new_per_row, engine, row_ids=row_ids)


RESUME = "resume"  # a step_fn's answer: the candidate completed no stop string; keep sampling the turn


class NextTurn(NamedTuple):
  """A step_fn's answer: the turn ends and the next one starts in the same row's pages.

  keep: the turn's first `keep` sampled tokens stay (>= 1; the rest are dropped, as text after a
    stop string is).
  observation: ids prefilled after them (the environment's answer; may be empty).
  max_new: the next turn's token budget (>= 1; within the row's reservation: its first turn's
    prompt + max_new positions bound the whole episode).
  salt: the next turn's key salt: its token s is drawn with fold_in(fold_in(fold_in(rng, salt),
    row_id), s).
  """
  keep: int
  observation: Seq[int]
  max_new: int
  salt: int


@dataclasses.dataclass(frozen=True)
class _Episode:
  step_fn: Callable
  stop_token_ids: tuple
  salt: int


def run_episodes(params, config: ModelConfig, prompt_tokens, prompt_mask, rng: jax.Array, *,
                 step_fn: Callable, stop_token_ids: Seq[int], max_new_tokens: int, salt: int = -1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 eos_ids: Optional[Seq[int]] = None, num_samples: int = 1, pad_id: Optional[int] = None,
                 max_new_per_row=None, row_ids=None, engine: Optional[EngineConfig] = None,
                 mesh=None) -> EngineStats:
  """Multi-turn episodes on the engine: a row pauses at a stop candidate, keeps its KV pages
  while the host acts, and resumes in place; returns the run's EngineStats.

  Each row runs its first turn as `run` would (the same keys when salt < 0; `row_ids`,
  `max_new_per_row` as there). A row stops sampling inside the jitted decode loop when it emits
  EOS, an id of `stop_token_ids` (runtime data, e.g. every token whose text holds the last
  character of a stop string: `multiturn.stop_candidates`) or its turn's budget; the host then
  calls `step_fn(row, tokens, logprobs)` with the turn's sampled ids and log-probs so far
  (numpy [k]) and gets back
    * None: the episode is over; the row's pages are freed;
    * RESUME: a candidate that completes no stop string; the row goes on sampling its turn, as if
      it had never stopped (same keys, nothing lost);
    * NextTurn(keep, observation, max_new, salt): the turn's first `keep` tokens stay; the last
      kept token and the observation ids are prefilled at the row's current length into its own
      pages (no re-prefill of the context: the prompt and earlier turns stay cached), and the
      next turn is sampled from the resulting logits.
  Pages: admission reserves prompt + max_new_per_row - 1 positions, as `run` does; every turn
  must fit in them (a NextTurn beyond raises), so no row waits for a page.
  Stats: `pauses`, `false_stops`, `resumed_turns`, `prefill_real_tokens`, `host_syncs`.
  """
  _check_config(config, params)
  if not callable(step_fn):
    raise TypeError(f"run_episodes: step_fn must be callable, got {type(step_fn).__name__}.")
  stops = tuple(sorted({int(t) for t in stop_token_ids}))
  if stops and (stops[0] < 0 or stops[-1] >= config.vocab_size):
    raise ValueError(f"run_episodes: stop_token_ids must lie in [0, {config.vocab_size}), got "
                     f"[{stops[0]}, {stops[-1]}].")
  episode = _Episode(step_fn, stops, int(salt))
  args = (params, config, prompt_tokens, prompt_mask, rng, max_new_tokens, temperature, top_p, top_k,
          eos_ids, num_samples, pad_id, max_new_per_row, engine)
  mesh = mesh_lib.mesh_of(params) if mesh is None else mesh
  if mesh is not None and mesh.size > 1:
    with mesh_lib.use_mesh(mesh):
      return _run(*args, row_ids=row_ids, episode=episode)[1]
  return _run(*args, row_ids=row_ids, episode=episode)[1]


def _run(params, config, prompt_tokens, prompt_mask, rng, max_new_tokens, temperature, top_p, top_k,
         eos_ids, num_samples, pad_id, max_new_per_row, engine, *, row_ids=None, episode=None):
  if engine is not None and not isinstance(engine, EngineConfig):
    raise TypeError(f"engine must be an EngineConfig or None, got {type(engine).__name__}.")
  cfg = engine or EngineConfig()
  sp = sampling_step.SamplingParams.of(config, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k, num_samples=num_samples,
                                      eos_ids=eos_ids, pad_id=pad_id)
  max_new, n = sp.max_new_tokens, sp.num_samples
  temperature, top_p, top_k = sp.temperature, sp.top_p, sp.top_k
  eos_ids, pad_id = sp.eos_ids, sp.pad_id
  prompts = _real_prompts(prompt_tokens, prompt_mask)
  if any(len(p) == 0 for p in prompts):
    raise ValueError(f"prompt_mask rows {[i for i, p in enumerate(prompts) if not len(p)]} have no tokens.")
  if any(p.min() < 0 or p.max() >= config.vocab_size for p in prompts):
    raise ValueError(f"prompt_tokens must lie in [0, {config.vocab_size}).")
  num_rows = len(prompts) * n
  limits = np.full((num_rows,), max_new, np.int32)
  if max_new_per_row is not None:
    limits = np.asarray(max_new_per_row, np.int32).reshape(-1)
    if limits.shape != (num_rows,) or limits.min() < 1 or limits.max() > max_new:
      raise ValueError(f"max_new_per_row must be [{num_rows}] ints in [1, {max_new}], got shape "
                       f"{limits.shape}, range [{limits.min()}, {limits.max()}].")
  key_ids = np.arange(num_rows, dtype=np.int32)
  if row_ids is not None:
    key_ids = np.asarray(row_ids, np.int32).reshape(-1)
    if key_ids.shape != (num_rows,):
      raise ValueError(f"row_ids must be [{num_rows}] ints (one per row), got shape {key_ids.shape}.")

  p_size, k_steps = cfg.page_size, cfg.steps_per_call
  if cfg.max_slots is None:
    cfg = dataclasses.replace(cfg, max_slots=num_rows)
  lens = [len(p) for p in prompts]
  # Row shards: one host PagePool per data x fsdp device group, max_slots / S rows each.
  n_shards = row_shards(mesh_lib.current_mesh())
  slots = -(-cfg.max_slots // n_shards)
  if cfg.num_pages:
    shard_pages = cfg.num_pages // n_shards
    if shard_pages < 2:
      raise ValueError(f"EngineConfig.num_pages={cfg.num_pages} gives {shard_pages} pages to each of "
                       f"the {n_shards} row shards (data x fsdp); each needs >= 2.")
  else:
    shard_pages = _default_num_pages(dataclasses.replace(cfg, max_slots=slots), lens, n, max_new)
  num_pages = n_shards * shard_pages
  pools = [PagePool(shard_pages) for _ in range(n_shards)]
  worst = max(pages_for(lens[r // n] + int(limits[r]) - 1, p_size) + 1 for r in range(num_rows))
  if worst > shard_pages - 1:
    raise ValueError(f"EngineConfig.num_pages={num_pages}: a row needs up to {worst} pages "
                     f"(page_size={p_size}) plus the null page of its row shard's "
                     f"{shard_pages} pages ({n_shards} row shards); raise num_pages.")
  max_pp = max(pages_for(lens[r // n] + int(limits[r]) - 1, p_size) for r in range(num_rows))
  stats = EngineStats(num_pages=num_pages, row_shards=n_shards, shard_rows=[0] * n_shards)

  greedy = temperature == 0.0
  samp = dict(greedy=greedy, top_k=top_k, use_top_p=(top_p < 1.0) and not greedy)
  temp_arr, top_p_arr = jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p)
  # ids that stop a row in the decode loop: EOS, and an episode's stop candidates
  stop_ids = eos_ids + (episode.stop_token_ids if episode is not None else ())
  stop_set = set(stop_ids)
  eos_arr = np.full((_pow2(len(stop_ids), lo=8),), -1, np.int32)  # a runtime input: no recompiles
  eos_arr[:len(stop_ids)] = stop_ids
  salt_of = np.full((num_rows,), -1 if episode is None else episode.salt, np.int32)  # per-row key salt
  weights = prepare_weights(params, config)
  pool = init_pool(config, num_pages, p_size)

  out_tok = np.full((num_rows, max_new), pad_id, np.int32)
  out_lp = np.zeros((num_rows, max_new), np.float32)
  out_raw = np.zeros((num_rows, max_new), np.float32)
  out_mask = np.zeros((num_rows, max_new), np.int32)

  pending = collections.deque(range(num_rows))
  pending_of = collections.Counter(r // n for r in range(num_rows))  # samples not yet admitted
  prompt_pages: dict = {}    # prompt -> its page ids (one reference held while samples wait)
  prompt_shard: dict = {}    # prompt -> the row shard holding its pages (all its samples go there)
  prompt_logits: dict = {}   # prompt -> device logits [V] after its last token
  live: list = []            # admitted, unfinished Sequences (<= max_slots)

  def prefill(jobs: list, min_pages: int = 1) -> list:
    """jobs: (ids, start, block_table) each: writes the KV of ids at positions start + [0, len)
    into the pages of block_table; returns each job's device logits [V] after its last id.
    Block tables are cut to a power of two >= min_pages pages."""
    nonlocal pool
    # Bucket each job: one chunk of pow2(len) tokens, or chunks of prefill_chunk tokens.
    plan, out = {}, [None] * len(jobs)
    for q, (ids, *_) in enumerate(jobs):
      c = min(_pow2(len(ids), cfg.min_prefill_bucket), cfg.prefill_chunk)
      plan.setdefault(c, []).append(q)
    for c, group in plan.items():
      n_chunks = max(pages_for(len(jobs[q][0]), c) for q in group)
      for j in range(n_chunks):
        # Shard-major rows: shard s's jobs in [s * bl, (s + 1) * bl).
        by_shard = [[q for q in group if len(jobs[q][0]) > j * c and jobs[q][3] == s]
                    for s in range(n_shards)]
        bl = _pow2(max(map(len, by_shard)))
        slot = {q: s * bl + i for s, qs in enumerate(by_shard) for i, q in enumerate(qs)}
        bp = n_shards * bl
        pp = _pow2(max(pages_for(jobs[q][1] + (j + 1) * c, p_size) for q in slot), lo=min_pages)
        toks = np.zeros((bp, c), np.int32)
        table = np.zeros((bp, pp), np.int32)
        start = np.zeros((bp,), np.int32)
        n_valid = np.zeros((bp,), np.int32)
        for q, i in slot.items():
          ids, s0, pages, _ = jobs[q]
          seg = ids[j * c:(j + 1) * c]
          toks[i, :len(seg)] = seg
          n_valid[i], start[i] = len(seg), s0 + j * c
          table[i, :min(len(pages), pp)] = pages[:pp]
        pool, logits = _prefill(weights, params, pool, toks, start, n_valid, table, config=config,
                                attention=cfg.attention)
        stats.prefill_calls += 1
        stats.prefill_tokens += bp * c
        stats.prefill_shapes.append((bp, c, pp))
        stats.prefill_real_tokens += int(n_valid.sum())
        for q, i in slot.items():
          if len(jobs[q][0]) <= (j + 1) * c:
            out[q] = logits[i]
    return out

  def admit():
    """Admits waiting rows while slots and pages allow; samples their first token.

    FIFO per row shard: a prompt's samples all go to the shard holding its pages, a new prompt
    to the open shard with the fewest rows (then the most available pages), and a shard that
    cannot take the next row meant for it takes no later row this wave (so long rows are not
    starved). With one shard this is plain FIFO.
    """
    nonlocal pool
    admitted, new_prompts = [], []
    budget = [pl.num_available for pl in pools]
    load = [0] * n_shards  # rows per shard: decoding + admitted this wave
    for s in live:
      load[s.shard] += 1
    closed = [False] * n_shards
    for r in pending:
      open_shards = [i for i in range(n_shards) if not closed[i] and load[i] < slots]
      if not open_shards:
        break
      p = r // n
      fresh = p not in prompt_shard
      need = (pages_for(lens[p] + int(limits[r]) - 1, p_size) - pages_for(lens[p], p_size)  # growth
              + (1 if lens[p] % p_size else 0)                   # copy of the shared last page
              + (pages_for(lens[p], p_size) if fresh else 0))    # the prompt's own pages
      if fresh:
        candidates = sorted(open_shards, key=lambda i: (load[i], -budget[i], i))
      else:
        candidates = [prompt_shard[p]] if prompt_shard[p] in open_shards else []
      for i in candidates:
        if need > budget[i]:
          closed[i] = True
          continue
        budget[i] -= need
        load[i] += 1
        if fresh:
          prompt_shard[p] = i
          new_prompts.append(p)
        admitted.append(r)
        break
    if not admitted:
      return
    taken = set(admitted)
    rest = [r for r in pending if r not in taken]
    pending.clear()
    pending.extend(rest)
    for p in new_prompts:
      prompt_pages[p] = pools[prompt_shard[p]].alloc(pages_for(lens[p], p_size))
    if new_prompts:
      jobs = [(prompts[p], 0, prompt_pages[p], prompt_shard[p]) for p in new_prompts]
      for p, lg in zip(new_prompts, prefill(jobs)):
        prompt_logits[p] = lg
    copies = [[] for _ in range(n_shards)]
    seqs = []
    for r in admitted:
      p = r // n
      shard = prompt_shard[p]
      pool_pages = pools[shard]
      shared = prompt_pages[p]
      pool_pages.incref(shared)
      pending_of[p] -= 1
      if pending_of[p] == 0:  # the prompt's own reference goes with its last sample
        pool_pages.decref(shared)
        del prompt_pages[p], prompt_shard[p]
      table = list(shared)
      if lens[p] % p_size:  # the partially filled last page is written by every sample
        table[-1], src = pool_pages.make_private(table[-1])
        if src is not None:
          copies[shard].append((src, table[-1]))
      seq = Sequence(row=r, prompt=p, prompt_len=lens[p], max_new=int(limits[r]), block_table=table,
                     shard=shard)
      seq.reserved = pages_for(lens[p] + seq.max_new - 1, p_size) - len(table)
      pool_pages.reserve(seq.reserved)
      stats.shard_rows[shard] += 1
      seqs.append(seq)
    if any(copies):
      m = _pow2(max(map(len, copies)))  # shard s's copies in [s * m, (s + 1) * m)
      src = np.zeros((n_shards * m,), np.int32)
      dst = np.zeros((n_shards * m,), np.int32)
      for i, cs in enumerate(copies):
        if cs:
          src[i * m:i * m + len(cs)], dst[i * m:i * m + len(cs)] = zip(*cs)
      pool = _copy_pages(pool, src, dst, config=config)
      stats.page_copies += sum(map(len, copies))
    # Step 0 of every admitted row, from its prompt's logits.
    first_tokens(seqs, [prompt_logits[s.prompt] for s in seqs])
    for p in [p for p in prompt_logits if pending_of[p] == 0]:
      del prompt_logits[p]
    drain()

  def first_tokens(seqs: list, logits: list):
    """Step 0 of rows starting a turn, from the logits [V] after their contexts (one host sync)."""
    m = _pow2(len(seqs))
    logits = jnp.stack(logits + [logits[0]] * (m - len(seqs)))
    rows, salt = np.zeros((m,), np.int32), np.full((m,), -1, np.int32)
    rows[:len(seqs)] = [key_ids[s.row] for s in seqs]
    salt[:len(seqs)] = [salt_of[s.row] for s in seqs]
    tok, lp, raw = (np.asarray(a) for a in _sample_first(logits, rows, salt, rng, temp_arr, top_p_arr,
                                                         **samp))
    stats.first_sample_calls += 1
    for i, s in enumerate(seqs):
      out_tok[s.row, 0], out_lp[s.row, 0], out_raw[s.row, 0], out_mask[s.row, 0] = tok[i], lp[i], raw[i], 1
      s.step, s.last_token = 1, int(tok[i])
      if int(tok[i]) in stop_set or s.max_new == 1:
        settle(s)
      else:
        live.append(s)

  resumed: list = []      # episode rows going on with their turn after a false stop
  next_turns: list = []   # (Sequence, NextTurn): episode rows whose observation is to be prefilled

  def settle(s):
    """A row stopped sampling (EOS, a stop candidate or its budget): `run` frees it; an episode
    asks its step_fn whether it ends, resumes its turn, or starts the next one in place."""
    if episode is None:
      s.release(pools[s.shard])
      return
    stats.pauses += 1
    act = episode.step_fn(s.row, out_tok[s.row, :s.step].copy(), out_lp[s.row, :s.step].copy())
    if act is None:
      stats.generated_tokens += s.step
      s.release(pools[s.shard])
    elif isinstance(act, str) and act == RESUME:
      if s.step >= s.max_new or s.last_token in eos_ids:
        raise RuntimeError(f"run_episodes: step_fn resumed row {s.row} after "
                           f"{'its budget' if s.step >= s.max_new else 'EOS'}; nothing is left to sample.")
      stats.false_stops += 1
      resumed.append(s)
    elif isinstance(act, NextTurn):
      if not 1 <= int(act.keep) <= s.step or int(act.max_new) < 1:
        raise ValueError(f"run_episodes: step_fn's NextTurn(keep={act.keep}, max_new={act.max_new}) "
                         f"for row {s.row}: keep must be in [1, {s.step}] and max_new >= 1.")
      stats.generated_tokens += int(act.keep)
      next_turns.append((s, act))
    else:
      raise TypeError(f"run_episodes: step_fn must return None, RESUME or a NextTurn, got {act!r}.")

  def start_turns(items: list):
    """Prefills each row's last kept token and observation at its current length into its own
    pages (more pages from its reservation as needed), then samples the next turns' first tokens."""
    jobs = []
    for s, act in items:
      ids, start = _resume_tokens(out_tok[s.row], s.prompt_len, int(act.keep), act.observation)
      s.prompt_len, s.max_new, s.step = start + len(ids), int(act.max_new), 0
      if pages_for(s.prompt_len + s.max_new - 1, p_size) > len(s.block_table) + s.reserved:
        raise ValueError(f"run_episodes: row {s.row}'s next turn (context {s.prompt_len} tokens, "
                         f"max_new {s.max_new}) exceeds the pages reserved at admission (prompt + "
                         f"max_new_per_row - 1 positions).")
      grow = pages_for(start + len(ids), p_size) - len(s.block_table)
      if grow > 0:
        s.block_table += pools[s.shard].alloc(grow, from_reserved=True)
        s.reserved -= grow
      salt_of[s.row] = int(act.salt)
      jobs.append((ids, start, s.block_table, s.shard))
    stats.resumed_turns += len(items)
    first_tokens([s for s, _ in items], prefill(jobs, pages_for(cfg.min_table_tokens, p_size)))

  def drain():
    """Puts paused episode rows back: false stops at once, next turns after their prefill."""
    while resumed or next_turns:
      live.extend(resumed)
      resumed.clear()
      if next_turns:
        items = list(next_turns)
        next_turns.clear()
        start_turns(items)

  def decode():
    nonlocal pool
    for s in live:  # pages for the next K steps, drawn from each row's reservation
      grow = pages_for(s.positions_needed(k_steps), p_size) - len(s.block_table)
      if grow > 0:
        s.block_table += pools[s.shard].alloc(grow, from_reserved=True)
        s.reserved -= grow
    # Shard-major rows: shard s's live rows in [s * wl, (s + 1) * wl), wl a power of two.
    by_shard = [[s for s in live if s.shard == i] for i in range(n_shards)]
    top = max(map(len, by_shard))
    wl = max(_pow2(top, lo=-(-cfg.min_decode_width // n_shards), hi=slots), top)
    w = n_shards * wl
    order = [(i * wl + j, s) for i, ss in enumerate(by_shard) for j, s in enumerate(ss)]
    pp = _pow2(max(len(s.block_table) for s in live), lo=pages_for(cfg.min_table_tokens, p_size),
               hi=max_pp)
    table = np.zeros((w, pp), np.int32)
    tok, plen, step, rows = (np.zeros((w,), np.int32) for _ in range(4))
    max_n = np.ones((w,), np.int32)
    alive = np.zeros((w,), bool)
    for i, s in order:
      table[i, :len(s.block_table)] = s.block_table
      tok[i], plen[i], step[i], rows[i], max_n[i], alive[i] = (
          s.last_token, s.prompt_len, s.step, key_ids[s.row], s.max_new, True)
    salt = np.full((w,), -1, np.int32)
    for i, s in order:
      salt[i] = salt_of[s.row]
    pool, t, lp, raw, emitted = _decode(
        weights, params, pool, table, tok, plen, step, alive, rows, salt, max_n, eos_arr, rng, temp_arr,
        top_p_arr, config=config, steps=k_steps, pad_id=pad_id, attention=cfg.attention, **samp)
    t, lp, raw, emitted = (np.asarray(a) for a in (t, lp, raw, emitted))
    stats.decode_calls += 1
    stats.decode_row_steps += w * k_steps
    stats.widths.append(w)
    stats.decode_shapes.append((w, pp))
    stats.shard_live.append(tuple(map(len, by_shard)))
    still = []
    for i, s in order:
      k = int(emitted[i].sum())
      cols = slice(s.step, s.step + k)
      out_tok[s.row, cols], out_lp[s.row, cols], out_raw[s.row, cols] = t[i, :k], lp[i, :k], raw[i, :k]
      out_mask[s.row, cols] = 1
      s.step += k
      if k:
        s.last_token = int(t[i, k - 1])
      finished = s.step >= s.max_new or (k and int(t[i, k - 1]) in stop_set) or k < k_steps
      if finished:
        settle(s)
      else:
        still.append(s)
    live[:] = still
    drain()

  while pending or live:
    admit()
    stats.peak_live_rows = max(stats.peak_live_rows, len(live))
    if live:
      decode()
    elif pending:
      raise RuntimeError("engine made no progress: no row fits the page pool "  # unreachable by `worst`
                         f"({[pl.num_available for pl in pools]} pages available per shard).")
  stats.pages_in_use_at_end = sum(pl.num_in_use for pl in pools)
  for pl in pools:
    pl.check_all_free()
  stats.peak_pages_in_use = sum(pl.peak_in_use for pl in pools)
  if episode is None:  # (episodes count the kept tokens of each turn)
    stats.generated_tokens = int(out_mask.sum())
  lengths = out_mask.sum(-1).astype(np.int32)
  out = sampling_step.GenerationOutput(jnp.asarray(out_tok), jnp.asarray(out_lp), jnp.asarray(out_mask),
                                  jnp.asarray(out_raw), jnp.asarray(lengths))
  return out, stats


def generate(params, config: ModelConfig, prompt_tokens, prompt_mask, rng: jax.Array, *,
             engine: Optional[EngineConfig] = None, **kwargs) -> sampling_step.GenerationOutput:
  """`run(...)[0]`: the `sampling.generate` signature on the continuous engine."""
  return run(params, config, prompt_tokens, prompt_mask, rng, engine=engine, **kwargs)[0]
