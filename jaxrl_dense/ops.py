"""Shared masked primitives; every estimator in jaxrl_dense is built from these.

Conventions (enforced in every public function of ``rewards``, ``advantages``, ``losses``, ``filters``):

* Response arrays are batch-major ``[B, T]`` (B responses, T = padded response length) with a
  ``mask [B, T]``: 1 on generated tokens **including EOS**, 0 on padding (and on tool/environment
  tokens in multi-turn rollouts). Masks may be bool, int or float; they are only tested for != 0.
  ``L_b = Σ_t mask[b, t]`` is the valid length; responses are right-padded.
* Groups: the n samples of a prompt are contiguous rows (``B = P·n``). Functions that group take
  either a static ``n`` or ``group_ids int32[B]`` in ``[0, num_groups)`` with a static
  ``num_groups``; ``contiguous_group_ids(num_groups, n)`` builds the usual layout.
* Steps: ``step_ids int32[B, T]`` gives each token's step index (−1 on masked tokens) with a static
  maximum ``num_steps`` (S); ids outside ``[0, S)`` are ignored by the segment reductions.
* Turns (multi-turn rollouts): a turn is a maximal run of ``mask = 1`` (tool/environment tokens are
  0); ``turn_ids int32[B, T]`` is each token's 0-based turn (−1 elsewhere) with a static maximum
  ``num_turns`` (K), and ``turn_mask [B, K]`` marks the turns that exist. Turns are steps whose
  boundaries come from the mask, so the step reductions apply to them.
* Masked-out entries never enter a result, even when they hold NaN/inf (``jnp.where``, not ``x*m``).
* Outputs of rewards and advantages are 0 on padded positions.
* Rewards and advantages are returned under ``stop_gradient``; only losses carry gradients.
* Error checks that need values (e.g. "fewer than 2 valid tokens") run when the inputs are
  concrete (outside ``jit``); under ``jit`` the same inputs give NaN instead of raising.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = chex.Array

__all__ = [
    "check_token_arrays", "check_row_arrays", "is_concrete", "as_bool_mask",
    "contiguous_group_ids", "valid_lengths", "last_token_index", "place_at_last_token",
    "masked_sum", "masked_mean", "masked_var", "masked_whiten",
    "group_sum", "group_count", "group_mean_std", "grpo_normalize", "leave_one_out_baseline",
    "reverse_cumsum", "gae",
    "segment_sum", "segment_mean", "segment_min", "segment_max", "step_mask_from_ids",
    "broadcast_steps", "step_ids_from_ends", "step_ends_from_ids", "fixed_length_step_ids",
    "step_ids_from_delimiter",
    "turn_ids_from_mask", "turn_mask_from_ids", "broadcast_turns", "place_turn_rewards",
]


# ----------------------------------------------------------------------------- input checks


def check_token_arrays(**arrays: ArrayLike) -> Tuple[int, int]:
  """Asserts every named array is ``[B, T]`` with one common shape; returns ``(B, T)``."""
  names = list(arrays)
  for name in names:
    chex.assert_rank(arrays[name], 2, custom_message=f"`{name}` must be a [B, T] array")
  shapes = {name: tuple(jnp.shape(arrays[name])) for name in names}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"token arrays must share one [B, T] shape, got {shapes}")
  return shapes[names[0]]


def check_row_arrays(batch: Optional[int] = None, **arrays: ArrayLike) -> int:
  """Asserts every named array is ``[B]`` (and B == ``batch`` when given); returns B."""
  for name, x in arrays.items():
    chex.assert_rank(x, 1, custom_message=f"`{name}` must be a [B] array")
    if batch is None:
      batch = int(jnp.shape(x)[0])
    elif jnp.shape(x)[0] != batch:
      raise ValueError(f"`{name}` has {jnp.shape(x)[0]} rows, expected B = {batch}")
  return batch


try:
  _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - newer JAX without the public alias
  from jax._src.core import Tracer as _Tracer


def is_concrete(*xs) -> bool:
  """True when no argument is a JAX tracer (so value checks can raise eagerly)."""
  return not any(isinstance(x, _Tracer) for x in xs)


def as_bool_mask(mask: ArrayLike) -> Array:
  """Mask of any dtype -> bool (non-zero is valid)."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _float(x: ArrayLike) -> Array:
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


# ----------------------------------------------------------------------------- layout helpers


def contiguous_group_ids(num_groups: int, n: int) -> Array:
  """``group_ids int32[num_groups·n]`` for n contiguous samples per prompt: [0,0,..,1,1,..]."""
  if int(num_groups) < 1 or int(n) < 1:
    raise ValueError(f"num_groups and n must be >= 1, got num_groups={num_groups}, n={n}")
  return jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), n)


def valid_lengths(mask: ArrayLike) -> Array:
  """``L_b = Σ_t mask[b, t]`` as int32 ``[B]``."""
  chex.assert_rank(mask, 2, custom_message="`mask` must be [B, T]")
  return jnp.sum(as_bool_mask(mask), axis=-1, dtype=jnp.int32)


def last_token_index(mask: ArrayLike) -> Array:
  """Index of the last valid token per row (``L_b − 1`` for right padding); −1 for empty rows."""
  chex.assert_rank(mask, 2, custom_message="`mask` must be [B, T]")
  m = as_bool_mask(mask)
  t = jnp.arange(m.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(m, t[None, :], -1), axis=-1)


def place_at_last_token(v: ArrayLike, mask: ArrayLike) -> Array:
  """``out[b, t] = v[b]`` at the last valid token of row b, 0 elsewhere (all 0 if L_b = 0).

  Shapes: v [B], mask [B, T] -> [B, T]. For right-padded masks the position is L_b − 1, where
  PRIME and veRL put the outcome reward (veRL reward managers: index ``valid_response_length - 1``).
  """
  chex.assert_rank(mask, 2, custom_message="`mask` must be [B, T]")
  check_row_arrays(jnp.shape(mask)[0], v=v)
  last = last_token_index(mask)                                     # [B]
  t = jnp.arange(jnp.shape(mask)[1], dtype=jnp.int32)
  onehot = t[None, :] == last[:, None]                              # [B, T]
  return jnp.where(onehot, _float(v)[:, None], 0.0)


# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: ArrayLike, mask: ArrayLike, axis=None) -> Array:
  """``Σ x·m`` over ``axis`` (masked entries never enter, even NaN)."""
  return jnp.sum(jnp.where(as_bool_mask(mask), _float(x), 0.0), axis=axis)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis=None, *, eps: float = 0.0) -> Array:
  """``Σ x·m / (Σ m + eps)``; with ``eps = 0`` an empty mask gives 0 instead of NaN.

  veRL core uses ``eps = 1e-8`` (``verl/utils/torch_functional.py`` ``masked_mean``); PRIME-RL/PRIME
  uses none.
  """
  m = as_bool_mask(mask)
  s = masked_sum(x, m, axis=axis)
  n = jnp.sum(m, axis=axis, dtype=s.dtype)
  if eps:
    return s / (n + eps)
  return jnp.where(n > 0, s / jnp.where(n > 0, n, 1.0), 0.0)


def masked_var(x: ArrayLike, mask: ArrayLike, *, unbiased: bool = True, eps: float = 0.0) -> Array:
  """Masked variance over all entries (batch-global).

  ``μ = masked_mean(x)``, ``var = masked_mean((x − μ)²) · N/(N − 1)`` (Bessel when ``unbiased``),
  ``N = Σ m``; ``eps`` goes into the means' denominators as in veRL core
  (``verl/utils/torch_functional.py`` ``masked_var``).
  Raises ValueError for N = 0, or N = 1 when unbiased (when inputs are concrete).
  """
  m = as_bool_mask(mask)
  x = _float(x)
  chex.assert_equal_shape([x, m], custom_message="`x` and `mask` must have the same shape")
  n = jnp.sum(m, dtype=x.dtype)
  if is_concrete(n):
    nv = float(n)
    if nv == 0:
      raise ValueError("masked_var: `mask` has no valid entries (N = 0)")
    if unbiased and nv == 1:
      raise ValueError("masked_var: unbiased variance needs at least 2 valid entries, `mask` has 1")
  mean = masked_mean(x, m, eps=eps)
  var = masked_mean(jnp.square(x - mean), m, eps=eps)
  if unbiased:
    var = var * n / (n - 1.0)
  return var


def masked_whiten(x: ArrayLike, mask: ArrayLike, *, shift_mean: bool = True, eps: float = 1e-8,
                  mean_eps: float = 1e-8) -> Array:
  """Batch-global whitening over valid entries: ``(x − μ)/sqrt(var + eps)`` (+μ if not shift_mean).

  Statistics as ``masked_mean(eps=mean_eps)`` / unbiased ``masked_var``; veRL core:
  ``mean_eps = 1e-8``; PRIME-RL/PRIME: ``mean_eps = 0``. Output is 0 on masked entries.
  Shapes: x, mask [...] (same) -> [...].
  """
  m = as_bool_mask(mask)
  x = _float(x)
  mean = masked_mean(x, m, eps=mean_eps)
  var = masked_var(x, m, unbiased=True, eps=mean_eps)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m, out, 0.0)


# ----------------------------------------------------------------------------- group statistics


def _check_groups(v, group_ids, num_groups):
  chex.assert_rank(v, 1, custom_message="`v` must be a [B] array of per-sample values")
  check_row_arrays(jnp.shape(v)[0], group_ids=group_ids)
  if not jnp.issubdtype(jnp.asarray(group_ids).dtype, jnp.integer):
    raise ValueError(f"`group_ids` must be integer, got {jnp.asarray(group_ids).dtype}")
  if int(num_groups) < 1:
    raise ValueError(f"`num_groups` must be a static int >= 1, got {num_groups}")
  if is_concrete(group_ids):
    g = np.asarray(group_ids)
    if g.size and (g.min() < 0 or g.max() >= num_groups):
      raise ValueError(f"`group_ids` must lie in [0, num_groups={num_groups}), got "
                       f"[{g.min()}, {g.max()}]")


def group_sum(v: ArrayLike, group_ids: ArrayLike, num_groups: int) -> Array:
  """``[G]`` sums of v[B] per group."""
  _check_groups(v, group_ids, num_groups)
  return jax.ops.segment_sum(_float(v), group_ids, num_segments=num_groups)


def group_count(group_ids: ArrayLike, num_groups: int) -> Array:
  """``[G]`` number of samples per group (float32)."""
  ones = jnp.ones(jnp.shape(group_ids), jnp.float32)
  return group_sum(ones, group_ids, num_groups)


def group_mean_std(v: ArrayLike, group_ids: ArrayLike, num_groups: int, *,
                   unbiased: bool = True) -> Tuple[Array, Array]:
  """Per-sample group mean and std, ``([B], [B])``.

  veRL GRPO convention (``verl/trainer/ppo/core_algos.py`` ``compute_grpo_outcome_advantage``):
  std is the unbiased sample std; a singleton group gets mean 0 and std 1.
  """
  _check_groups(v, group_ids, num_groups)
  v = _float(v)
  cnt = group_count(group_ids, num_groups)                          # [G]
  mean_g = group_sum(v, group_ids, num_groups) / jnp.maximum(cnt, 1.0)
  sq = jax.ops.segment_sum(jnp.square(v - mean_g[group_ids]), group_ids, num_segments=num_groups)
  denom = cnt - 1.0 if unbiased else cnt
  std_g = jnp.sqrt(sq / jnp.maximum(denom, 1.0))
  single = cnt <= 1.0
  mean_g = jnp.where(single, 0.0, mean_g)
  std_g = jnp.where(single, 1.0, std_g)
  return mean_g[group_ids], std_g[group_ids]


def grpo_normalize(v: ArrayLike, group_ids: ArrayLike, num_groups: int, *, eps: float = 1e-6,
                   scale: bool = True) -> Array:
  """``(v − μ_g)/(σ_g + eps)`` if ``scale`` else ``v − μ_g`` (GRPO, arXiv 2402.03300)."""
  mean, std = group_mean_std(v, group_ids, num_groups)
  out = _float(v) - mean
  return out / (std + eps) if scale else out


def leave_one_out_baseline(v: ArrayLike, group_ids: ArrayLike, num_groups: int) -> Array:
  """``b_i = mean_{j ≠ i, j ∈ g(i)} v_j`` ([B]); 0 for singleton groups (veRL convention).

  RLOO (Kool et al. 2019; Ahmadian et al., arXiv 2402.14740): ``v_i − b_i``.
  """
  cnt = group_count(group_ids, num_groups)[group_ids]              # [B]
  tot = group_sum(v, group_ids, num_groups)[group_ids]              # [B]
  others = tot - _float(v)
  return jnp.where(cnt > 1.0, others / jnp.maximum(cnt - 1.0, 1.0), 0.0)


# ----------------------------------------------------------------------------- time scans


def _reverse_scan_bt(step, init, *xs):
  """Reverse scan over the time axis of ``[B, T]`` inputs; ``step(carry, *x_t) -> (carry, y_t)``."""
  xs_t = tuple(jnp.swapaxes(x, 0, 1) for x in xs)                  # [T, B]
  _, ys = jax.lax.scan(lambda c, x: step(c, *x), init, xs_t, reverse=True)
  return jnp.swapaxes(ys, 0, 1)                                     # [B, T]


def reverse_cumsum(x: ArrayLike, mask: Optional[ArrayLike] = None, gamma: float = 1.0) -> Array:
  """Discounted reverse cumulative sum ``G_t = x_t + γ·G_{t+1}`` along T.

  Without ``mask`` the scan runs over all T positions (PRIME-RL/PRIME's discounted returns).
  With ``mask``, masked entries contribute 0 and the output is 0 on them:
  ``G_t = m_t·(Σ_{s≥t} γ^{s−t} m_s x_s)``. Shapes: x [B, T] (mask [B, T]) -> [B, T].
  """
  x = _float(x)
  chex.assert_rank(x, 2, custom_message="`x` must be [B, T]")
  if mask is not None:
    check_token_arrays(x=x, mask=mask)
    m = as_bool_mask(mask)
    x = jnp.where(m, x, 0.0)
  g = jnp.asarray(gamma, x.dtype)

  def step(c, x_t):
    c = x_t + g * c
    return c, c

  out = _reverse_scan_bt(step, jnp.zeros(x.shape[:1], x.dtype), x)
  return out if mask is None else jnp.where(m, out, 0.0)


def gae(rewards: ArrayLike, values: ArrayLike, mask: ArrayLike, gamma: float = 1.0,
        lam: float = 1.0) -> Array:
  """Generalized advantage estimation (Schulman et al., arXiv 1506.02438), veRL core form.

  Backward over t with next value v′ (0 after the end) and λ-return g carried through padding:
  ``δ_t = r_t + γ v′ − V_t``, ``g_t = δ_t + γλ g``; padding keeps (v′, g) unchanged.
  Returns the raw (un-whitened) advantages ``[B, T]``, 0 on padding.
  """
  check_token_arrays(rewards=rewards, values=values, mask=mask)
  r, v = _float(rewards), _float(values)
  m = as_bool_mask(mask)
  dt = r.dtype

  def step(carry, r_t, v_t, m_t):
    nextv, lastg = carry
    delta = r_t + gamma * nextv - v_t
    g_new = delta + gamma * lam * lastg
    nextv = jnp.where(m_t, v_t, nextv)
    lastg = jnp.where(m_t, g_new, lastg)
    return (nextv, lastg), lastg

  zeros = jnp.zeros(r.shape[:1], dt)
  adv = _reverse_scan_bt(step, (zeros, zeros), r, v, m)
  return jnp.where(m, adv, 0.0)


# ----------------------------------------------------------------------------- steps / segments


def _flat_segments(x, step_ids, num_steps):
  chex.assert_rank(x, 2, custom_message="`x` must be [B, T]")
  check_token_arrays(x=x, step_ids=step_ids)
  if int(num_steps) < 1:
    raise ValueError(f"`num_steps` must be a static int >= 1, got {num_steps}")
  b = jnp.shape(x)[0]
  sid = jnp.asarray(step_ids)
  ok = (sid >= 0) & (sid < num_steps)
  flat = jnp.where(ok, jnp.arange(b, dtype=jnp.int32)[:, None] * num_steps + sid, b * num_steps)
  return flat.reshape(-1), ok, b


def _segment(op, x, step_ids, num_steps, fill):
  flat, ok, b = _flat_segments(x, step_ids, num_steps)
  x = jnp.where(ok, _float(x), fill).reshape(-1)
  out = op(x, flat, num_segments=b * num_steps + 1)[:-1]
  return out.reshape(b, num_steps)


def step_mask_from_ids(step_ids: ArrayLike, num_steps: int) -> Array:
  """``step_mask float32[B, S]``: 1 where step s of row b has at least one token."""
  cnt = _segment(jax.ops.segment_sum, jnp.ones(jnp.shape(step_ids), jnp.float32), step_ids,
                 num_steps, 0.0)
  return (cnt > 0).astype(jnp.float32)


def segment_sum(x: ArrayLike, step_ids: ArrayLike, num_steps: int) -> Array:
  """``out[b, s] = Σ_{t: step_ids[b,t]=s} x[b, t]``; ``[B, T] -> [B, S]``."""
  return _segment(jax.ops.segment_sum, x, step_ids, num_steps, 0.0)


def segment_mean(x: ArrayLike, step_ids: ArrayLike, num_steps: int) -> Array:
  """Mean of x over each step's tokens; 0 for empty steps. ``[B, T] -> [B, S]``."""
  s = segment_sum(x, step_ids, num_steps)
  c = _segment(jax.ops.segment_sum, jnp.ones(jnp.shape(x), jnp.float32), step_ids, num_steps, 0.0)
  return jnp.where(c > 0, s / jnp.maximum(c, 1.0), 0.0)


def segment_min(x: ArrayLike, step_ids: ArrayLike, num_steps: int) -> Array:
  """Min of x over each step's tokens; 0 for empty steps. ``[B, T] -> [B, S]``."""
  out = _segment(jax.ops.segment_min, x, step_ids, num_steps, jnp.inf)
  return jnp.where(step_mask_from_ids(step_ids, num_steps) > 0, out, 0.0)


def segment_max(x: ArrayLike, step_ids: ArrayLike, num_steps: int) -> Array:
  """Max of x over each step's tokens; 0 for empty steps. ``[B, T] -> [B, S]``."""
  out = _segment(jax.ops.segment_max, x, step_ids, num_steps, -jnp.inf)
  return jnp.where(step_mask_from_ids(step_ids, num_steps) > 0, out, 0.0)


def broadcast_steps(v: ArrayLike, step_ids: ArrayLike) -> Array:
  """Token value = value of its step: ``[B, S], [B, T] -> [B, T]``, 0 where step_ids < 0 or ≥ S."""
  chex.assert_rank(v, 2, custom_message="`v` must be [B, S]")
  chex.assert_rank(step_ids, 2, custom_message="`step_ids` must be [B, T]")
  if jnp.shape(v)[0] != jnp.shape(step_ids)[0]:
    raise ValueError(f"`v` {jnp.shape(v)} and `step_ids` {jnp.shape(step_ids)} differ in B")
  s = jnp.shape(v)[1]
  sid = jnp.asarray(step_ids)
  ok = (sid >= 0) & (sid < s)
  out = jnp.take_along_axis(_float(v), jnp.clip(sid, 0, s - 1), axis=1)
  return jnp.where(ok, out, 0.0)


def step_ids_from_ends(step_end: ArrayLike, mask: ArrayLike) -> Array:
  """Step ids from step-end markers: a token's id is the number of step ends before it.

  ``step_end bool[B, T]`` marks the last token of each step; ``-1`` on masked tokens.
  """
  check_token_arrays(step_end=step_end, mask=mask)
  m = as_bool_mask(mask)
  ends = as_bool_mask(step_end) & m
  before = jnp.cumsum(ends.astype(jnp.int32), axis=1) - ends.astype(jnp.int32)
  return jnp.where(m, before, -1).astype(jnp.int32)


def step_ends_from_ids(step_ids: ArrayLike) -> Array:
  """``bool[B, T]``: token t ends its step (valid and the next token has another id)."""
  chex.assert_rank(step_ids, 2, custom_message="`step_ids` must be [B, T]")
  sid = jnp.asarray(step_ids)
  nxt = jnp.concatenate([sid[:, 1:], jnp.full_like(sid[:, :1], -1)], axis=1)
  return (sid >= 0) & (nxt != sid)


def fixed_length_step_ids(mask: ArrayLike, step_len: int) -> Array:
  """Steps of ``step_len`` consecutive valid tokens: id = (index among valid tokens) // step_len."""
  chex.assert_rank(mask, 2, custom_message="`mask` must be [B, T]")
  if int(step_len) < 1:
    raise ValueError(f"`step_len` must be >= 1, got {step_len}")
  m = as_bool_mask(mask)
  pos = jnp.cumsum(m.astype(jnp.int32), axis=1) - 1
  return jnp.where(m, pos // step_len, -1).astype(jnp.int32)


def step_ids_from_delimiter(token_ids, mask, delim_ids: Sequence[int]) -> np.ndarray:
  """Host-side (numpy): a step ends at every token whose id is in ``delim_ids`` (e.g. "\\n\\n").

  The last valid token always ends the final step. Returns int32 ``[B, T]`` with −1 on padding.
  """
  tok = np.asarray(token_ids)
  m = np.asarray(mask) != 0
  if tok.ndim != 2 or tok.shape != m.shape:
    raise ValueError(f"`token_ids` {tok.shape} and `mask` {m.shape} must be the same [B, T] shape")
  ends = np.isin(tok, np.asarray(list(delim_ids))) & m
  before = np.cumsum(ends, axis=1) - ends
  return np.where(m, before, -1).astype(np.int32)


# ----------------------------------------------------------------------------- turns


def turn_ids_from_mask(mask: ArrayLike, num_turns: int) -> Array:
  """Turn index of every token: maximal runs of `mask = 1` are turns 0, 1, 2, ...

  turn_ids[b, t] = (number of run starts at positions <= t) - 1 if mask[b, t] else -1.
  Tokens of runs beyond `num_turns - 1` get -1 (they are dropped; size `num_turns` generously).

  Args:
    mask: `[B, T]` 0/1 (1 on assistant tokens, 0 on tool outputs and padding).
    num_turns: static K.

  Returns:
    int32 `[B, T]`.
  """
  mask = jnp.asarray(mask)
  chex.assert_rank(mask, 2)
  m = mask.astype(bool)  # [B, T]
  prev = jnp.pad(m[:, :-1], ((0, 0), (1, 0)))  # [B, T]
  starts = m & ~prev  # [B, T]
  ids = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1  # [B, T]
  return jnp.where(m & (ids < num_turns), ids, -1).astype(jnp.int32)


def turn_mask_from_ids(turn_ids: ArrayLike, num_turns: int) -> Array:
  """`turn_mask[b, k] = 1` iff some token has turn k  (`[B, T] -> [B, K]` float32)."""
  turn_ids = jnp.asarray(turn_ids)
  chex.assert_rank(turn_ids, 2)
  hit = turn_ids[:, :, None] == jnp.arange(num_turns)[None, None, :]  # [B, T, K]
  return jnp.any(hit, axis=1).astype(jnp.float32)


def broadcast_turns(v: ArrayLike, turn_ids: ArrayLike) -> Array:
  """Token value = value of its turn: `out[b, t] = v[b, turn_ids[b, t]]`, 0 where turn_ids < 0."""
  return broadcast_steps(v, turn_ids)


def place_turn_rewards(r_turn: ArrayLike, turn_ids: ArrayLike, mask: ArrayLike) -> Array:
  """Puts each turn's reward on the turn's last token: `[B, K] -> [B, T]` (stop-gradient)."""
  r_turn = jnp.asarray(r_turn, jnp.float32)
  turn_ids = jnp.asarray(turn_ids)
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_rank([r_turn, turn_ids, mask], 2)
  chex.assert_equal_shape([turn_ids, mask])
  end = step_ends_from_ids(turn_ids)  # [B, T]
  return jax.lax.stop_gradient(jnp.where(end, broadcast_turns(r_turn, turn_ids), 0.0) * mask)
