"""Paged KV cache on device: writing keys/values into pages and attending over a block table.

Layout (one array per layer, the layout of the Pallas kernels):
  k_pages, v_pages: [Hkv, N, P, hd]    N pages of P token slots; page 0 is the null page.
  block_table:      int32 [B, pp]      page ids of each row, position t -> (table[t // P], t % P).

Attention of query i at position q_i over a row's cache (grouped-query, HF `repeat_kv`):
  o_i = softmax_j( <q_i, k_j> / sqrt(hd) + mask_ij ) v_j,   keys j in [0, pp * P),
  mask_ij = 0 when j <= q_i else -inf (positions past the row's length are never read).

`paged_attention` dispatches: `impl="xla"` gathers a block of each row's pages at a time and
runs masked online-softmax attention over the blocks (any backend, the CPU path);
`impl="pallas"` calls `jax.experimental.pallas.ops.tpu.paged_attention` on TPU or
`jax.experimental.pallas.ops.gpu.paged_attention` on GPU (single-query decode only);
`impl="auto"` picks Pallas on TPU / GPU where the kernel's tiling applies (`pallas_applies`)
and XLA elsewhere. The GPU kernel is tested here through the Pallas interpreter on CPU; neither
kernel has run on hardware in this repository's tests.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_dense.parallel import rules as _rules

_MASK_VALUE = float(np.finfo(np.float32).min)


def write_pages(pages: jax.Array, new: jax.Array, page_ids: jax.Array, offsets: jax.Array) -> jax.Array:
  """Scatters token vectors into pages.

  Args:
    pages: [Hkv, N, P, hd] one layer's key (or value) pages.
    new: [B, T, Hkv, hd] vectors of B*T tokens.
    page_ids / offsets: int32 [B, T] destination page and slot of each token (padding tokens
      point at the null page 0, whose contents are never read).

  Returns:
    pages with pages[:, page_ids[b, t], offsets[b, t]] = new[b, t].
  """
  chex.assert_rank([pages, new], 4)
  chex.assert_equal_shape([page_ids, offsets])
  b, t, hkv, hd = new.shape
  upd = new.reshape(b * t, hkv, hd).transpose(1, 0, 2).astype(pages.dtype)  # [Hkv, B*T, hd]
  return pages.at[:, page_ids.reshape(-1), offsets.reshape(-1)].set(upd, mode="promise_in_bounds")


def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
  """[Hkv, N, P, hd] pages, [B, pp] table -> contiguous [B, Hkv, pp * P, hd] (position order)."""
  hkv, _, p, hd = pages.shape
  b, pp = block_table.shape
  g = pages[:, block_table]  # [Hkv, B, pp, P, hd]
  return g.transpose(1, 0, 2, 3, 4).reshape(b, hkv, pp * p, hd)


def attend_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
               q_positions: jax.Array, *, block_tokens: int = 32) -> jax.Array:
  """Causal GQA attention over paged keys/values (the XLA path), one block of pages at a time.

  Online softmax over blocks of `block_tokens // P` pages (flash-decoding): per block j
    s = q k_j^T / sqrt(hd) (masked),  m' = max(m, max s),  l' = l e^{m - m'} + sum e^{s - m'},
    acc' = acc e^{m - m'} + e^{s - m'} v_j,     output = acc / l.
  Only one block of gathered pages exists at a time (it stays in cache), instead of a
  [B, Hkv, pp * P, hd] copy of every row's keys and values per layer and step.

  Args:
    q: [B, T, H, hd] queries (RoPE applied).
    k_pages, v_pages: [Hkv, N, P, hd].
    block_table: int32 [B, pp].
    q_positions: int32 [B, T] position of each query; it attends to positions <= its own.
    block_tokens: tokens per block (rounded to whole pages).

  Returns:
    [B, T, H * hd] in q's dtype. Scores and softmax in float32 (as `models.transformer`).
  """
  b, t, h, hd = q.shape
  hkv, _, p, _ = k_pages.shape
  g = h // hkv
  blk = max(1, min(block_tokens // p, block_table.shape[1]))
  pad = -block_table.shape[1] % blk
  table = jnp.pad(block_table, ((0, 0), (0, pad)))  # padding: the null page, masked below
  n_blocks = table.shape[1] // blk
  # Head-major [Hkv, B, G*T, hd]: batch dims (Hkv, B) lead in both operands, no big transposes.
  qg = q.reshape(b, t, hkv, g, hd).transpose(2, 0, 3, 1, 4).reshape(hkv, b, g * t, hd)
  q_pos = jnp.tile(q_positions, (1, g))  # [B, G*T]: query row (g, t) has the position of t

  def body(j, carry):
    m, l, acc = carry
    tbl = lax.dynamic_slice_in_dim(table, j * blk, blk, axis=1)  # [B, blk]
    keys = k_pages[:, tbl].reshape(hkv, b, blk * p, hd).astype(q.dtype)  # [Hkv, B, blk*P, hd]
    values = v_pages[:, tbl].reshape(hkv, b, blk * p, hd).astype(q.dtype)
    s = jnp.einsum("kbqd,kbsd->kbqs", qg, keys, preferred_element_type=jnp.float32) * (hd ** -0.5)
    k_pos = j * blk * p + jnp.arange(blk * p)  # [blk*P]
    s = jnp.where((k_pos[None, None, :] <= q_pos[:, :, None])[None], s, _MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))  # [Hkv, B, G*T]
    corr = jnp.exp(m - m_new)
    e = jnp.exp(s - m_new[..., None])  # [Hkv, B, G*T, blk*P]
    pv = jnp.einsum("kbqs,kbsd->kbqd", e.astype(values.dtype), values,
                    preferred_element_type=jnp.float32)
    return m_new, l * corr + e.sum(-1), acc * corr[..., None] + pv

  init = (jnp.full((hkv, b, g * t), _MASK_VALUE, jnp.float32), jnp.zeros((hkv, b, g * t), jnp.float32),
          jnp.zeros((hkv, b, g * t, hd), jnp.float32))
  _, l, acc = lax.fori_loop(0, n_blocks, body, init)
  out = (acc / l[..., None]).astype(q.dtype)  # [Hkv, B, G*T, hd]
  return out.reshape(hkv, b, g, t, hd).transpose(1, 3, 0, 2, 4).reshape(b, t, h * hd)


def pallas_platform() -> str | None:
  """'tpu' or 'gpu' when the default backend has a Pallas paged-attention kernel, else None."""
  platform = jax.default_backend()
  return platform if platform in ("tpu", "gpu") else None


def pallas_applies(platform: str | None, head_dim: int) -> bool:
  """Whether `impl="auto"` takes the Pallas kernel: the TPU kernel tiles head_dim by 128 lanes,
  the GPU (Triton) kernel needs head_dim a multiple of 16 for its dots."""
  if platform == "tpu":
    return head_dim % 128 == 0
  if platform == "gpu":
    return head_dim % 16 == 0
  return False


def attend_pallas(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                  lengths: jax.Array, *, platform: str, interpret: bool = False) -> jax.Array:
  """Single-query decode attention with the Pallas paged-attention kernels.

  q [B, H, hd] (RoPE applied, unscaled), lengths int32 [B] (keys [0, length) are read).
  The kernels take no softmax scale, so q is scaled by 1/sqrt(hd) first. Returns [B, H * hd].
  `interpret=True` runs the GPU kernel in the Pallas interpreter (any backend; for tests).
  """
  b, h, hd = q.shape
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"attend_pallas: no Pallas paged-attention kernel for platform {platform!r}.")
  # Per shard (no partitioning rule for a pallas_call): rows and their block tables over
  # (data, fsdp), query groups and the pool's kv heads over tensor. Here the pool is shared by
  # all rows (replicated over the row axes); the engine splits its pool by rows too and calls
  # the kernel from inside its own shard_map (`paged_attention(..., per_shard=True)`).
  kernel = _rules.shard_kernel(
      functools.partial(_attend_pallas, platform=platform, interpret=interpret),
      (("batch", "heads", None), ("kv_heads", None, None, None), ("kv_heads", None, None, None),
       ("batch", None), ("batch",)), ("batch", "heads"),
      batch=b, num_heads=h, num_kv_heads=k_pages.shape[0])
  return kernel(q, k_pages, v_pages, block_table, lengths)


def _attend_pallas(q, k_pages, v_pages, block_table, lengths, *, platform, interpret):
  """`attend_pallas` on one shard's rows and heads."""
  b, h, hd = q.shape
  pp = block_table.shape[1]
  qs = q * jnp.asarray(hd ** -0.5, q.dtype)
  if platform == "tpu":
    from jax.experimental.pallas.ops.tpu import paged_attention as tpu_pa
    block = next(c for c in (8, 4, 2, 1) if pp % c == 0)
    out = tpu_pa.paged_attention(qs, k_pages.astype(q.dtype), v_pages.astype(q.dtype), lengths,
                                 block_table, pages_per_compute_block=block)
  else:  # "gpu"
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_pa
    block = next(c for c in (8, 4, 2, 1) if pp % c == 0)
    splits = next(c for c in (16, 8, 4, 2, 1) if (pp // block) % c == 0)
    out = gpu_pa.paged_attention(qs, k_pages.astype(q.dtype), v_pages.astype(q.dtype), block_table,
                                 lengths, pages_per_compute_block=block, k_splits=splits,
                                 interpret=interpret)
  return out.reshape(b, h * hd).astype(q.dtype)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                    q_positions: jax.Array, *, impl: str = "auto", per_shard: bool = False) -> jax.Array:
  """Dispatcher: q [B, T, H, hd] -> [B, T, H * hd] (see the module docstring for `impl`).

  Pallas applies only to single-query decode (T == 1); prefill chunks always take the XLA path.
  per_shard: the caller already runs per shard (inside `jax.shard_map`, the engine's
  row-sharded pool), so the Pallas kernel is called on these operands as they are.
  """
  if impl not in ("auto", "xla", "pallas"):
    raise ValueError(f"attention impl must be 'auto', 'xla' or 'pallas', got {impl!r}.")
  platform = pallas_platform()
  use_pallas = q.shape[1] == 1 and (
      impl == "pallas" or (impl == "auto" and pallas_applies(platform, q.shape[-1])))
  if use_pallas:
    if platform is None:
      raise ValueError(f"attention impl='pallas' needs a TPU or GPU backend, not {jax.default_backend()!r}.")
    call = functools.partial(_attend_pallas, interpret=False) if per_shard else attend_pallas
    out = call(q[:, 0], k_pages, v_pages, block_table, q_positions[:, 0] + 1, platform=platform)
    return out[:, None]
  # Decode reads blocks of 32 tokens (fastest on XLA:CPU); prefill chunks have many queries.
  return attend_xla(q, k_pages, v_pages, block_table, q_positions,
                    block_tokens=32 if q.shape[1] == 1 else 256)
