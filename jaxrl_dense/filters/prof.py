"""PROF: process consistency filter (arXiv 2509.03403).

PRM scores are not added to the reward (that gets hacked). Inside each group, correct responses are
ranked by how strongly the PRM supports them and incorrect ones by how weakly it supports them; the
most *inconsistent* are dropped while balancing the numbers of correct / incorrect samples. GRPO then
trains on the survivors.

Consistency score, code version (default, `variant="code"`):
  mu  = mean of all valid step scores v in the batch (batch-global; pass `batch_mean` to fix it)
  c_i = (1/H_i) sum_h 2 (v_{i,h} - mu)(2 o_i - 1)      (c_i = 0 if H_i = 0)
  c_i <- c_i - lambda * 1[H_i < min_steps or H_i > max_steps]
Paper version (`variant="paper"`):
  c_i = ((1/H_i) sum_h v_{i,h} - lambda * 1[H_i = 1 or H_i >= max_steps]) * (2 o_i - 1)
  (no centring, no factor 2, penalty inside the sign flip.)

Filter per group (remove k = n_remove): P, N = #correct, #incorrect; delta = P - N;
  k_pos = min(k, round((delta + k) / 2))   (round half to even)
  k_pos > 0: drop the min(k_pos, P) lowest-c correct samples, then min(k - dropped, N) lowest-c
             incorrect samples; else drop min(k, N) lowest-c incorrect samples.
Ties keep the original order (the earlier sample counts as lower). "Filter-Correct" variant
(`incorrect_mode="random"`): incorrect samples are removed uniformly at random.
Official code: amazon-science/PROF-GRPO (prof_grpo/prof_grpo_both/prof_ray_trainer.py).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["prof_consistency", "prof_filter", "prof_blend_rewards", "survivor_rows"]


def prof_consistency(step_values: ArrayLike, step_mask: ArrayLike, outcome: ArrayLike,
                     batch_mean: ArrayLike | None = None, len_penalty: float = 10.0,
                     min_steps: int = 2, max_steps: int = 30, variant: str = "code") -> Array:
  """PROF consistency score c `[B]` (see module docstring).

  Args:
    step_values: `[B, S]` PRM step scores in [0, 1].
    step_mask: `[B, S]` 1 on real steps.
    outcome: `[B]` 0/1 verifier result.
    batch_mean: optional scalar mu ("code" variant); default the batch mean of valid step scores.
    len_penalty: lambda (10). min_steps, max_steps: code thresholds (H < 2 or H > 30); the paper
      variant penalises H == 1 or H >= max_steps.
    variant: "code" or "paper".

  Returns:
    `[B]` float32 (stop-gradient).
  """
  v = jnp.asarray(step_values, jnp.float32)
  sm = ops.as_bool_mask(step_mask)
  o = jnp.asarray(outcome, jnp.float32)
  chex.assert_rank([v, sm], 2)
  chex.assert_equal_shape([v, sm])
  ops.check_row_arrays(v.shape[0], outcome=o)
  sign = 2.0 * o - 1.0  # [B]
  h = jnp.sum(sm, axis=1).astype(jnp.float32)  # [B]
  if variant == "code":
    mu = ops.masked_mean(v, sm) if batch_mean is None else jnp.asarray(batch_mean, jnp.float32)
    per = jnp.where(sm, 2.0 * (v - mu) * sign[:, None], 0.0)  # [B, S]
    c = jnp.where(h > 0, jnp.sum(per, axis=1) / jnp.maximum(h, 1.0), 0.0)
    c = c - len_penalty * ((h < min_steps) | (h > max_steps)).astype(jnp.float32)
  elif variant == "paper":
    mean_v = ops.masked_mean(v, sm, axis=1)  # [B]
    pen = len_penalty * ((h == 1) | (h >= max_steps)).astype(jnp.float32)
    c = (mean_v - pen) * sign
  else:
    raise ValueError(f"variant must be 'code' or 'paper', got {variant!r}.")
  return jax.lax.stop_gradient(c)


def _rank_within(score: Array, same: Array) -> Array:
  """rank_i = #{j : same[i, j] and (score_j < score_i or (score_j == score_i and j < i))}."""
  b = score.shape[0]
  idx = jnp.arange(b)
  lower = (score[None, :] < score[:, None]) | ((score[None, :] == score[:, None])
                                              & (idx[None, :] < idx[:, None]))  # [B, B]
  return jnp.sum(same & lower, axis=1)


def prof_filter(outcome: ArrayLike, consistency: ArrayLike, group_ids: ArrayLike, num_groups: int,
                n_remove: int = 4, incorrect_mode: str = "consistency",
                key: jax.Array | None = None) -> Array:
  """PROF balanced filter: which samples to keep.

  Args:
    outcome: `[B]` 0/1 (> 0.5 counts as correct).
    consistency: `[B]` scores c from `prof_consistency`.
    group_ids: int `[B]`; num_groups: static G.
    n_remove: k samples removed per group (absolute count; k >= n removes the whole group).
    incorrect_mode: "consistency" (PROF-both) or "random" (Filter-Correct; needs `key`).
    key: PRNG key for "random".

  Returns:
    `[B]` bool keep mask.
  """
  o = jnp.asarray(outcome, jnp.float32)
  c = jnp.asarray(consistency, jnp.float32)
  gid = jnp.asarray(group_ids)
  b = ops.check_row_arrays(None, outcome=o, consistency=c, group_ids=gid)
  if n_remove < 0:
    raise ValueError(f"n_remove must be >= 0, got {n_remove}.")
  correct = o > 0.5  # [B]
  cnt_pos = jax.ops.segment_sum(correct.astype(jnp.float32), gid, num_groups)  # [G]
  cnt_all = ops.group_count(gid, num_groups)  # [G]
  cnt_neg = cnt_all - cnt_pos
  k = jnp.float32(n_remove)
  delta = cnt_pos - cnt_neg
  k_pos = jnp.minimum(k, jnp.round((delta + k) / 2.0))  # [G]  half to even
  drop_pos = jnp.where(k_pos > 0, jnp.minimum(k_pos, cnt_pos), 0.0)
  drop_neg = jnp.minimum(k - drop_pos, cnt_neg)  # [G]
  if incorrect_mode == "consistency":
    neg_score = c
  elif incorrect_mode == "random":
    if key is None:
      raise ValueError("incorrect_mode='random' needs a PRNG `key`.")
    neg_score = jax.random.uniform(key, (b,))
  else:
    raise ValueError(f"incorrect_mode must be 'consistency' or 'random', got {incorrect_mode!r}.")
  same_group = gid[:, None] == gid[None, :]  # [B, B]
  same_pos = same_group & correct[:, None] & correct[None, :]
  same_neg = same_group & ~correct[:, None] & ~correct[None, :]
  rank_pos = _rank_within(c, same_pos)  # [B]
  rank_neg = _rank_within(neg_score, same_neg)  # [B]
  drop = jnp.where(correct, rank_pos < drop_pos[gid], rank_neg < drop_neg[gid])
  return ~drop


def prof_blend_rewards(outcome: ArrayLike, step_values: ArrayLike, step_mask: ArrayLike,
                       beta: float = 0.8) -> Array:
  """"Blend" baseline from the PROF paper: `o_i + beta * mean_h v_{i,h}`  (`[B]`)."""
  o = jnp.asarray(outcome, jnp.float32)
  v = jnp.asarray(step_values, jnp.float32)
  chex.assert_rank(v, 2)
  ops.check_row_arrays(v.shape[0], outcome=o)
  return jax.lax.stop_gradient(o + beta * ops.masked_mean(v, step_mask, axis=1))


def survivor_rows(keep, n: int, k: int):
  """Row indices [G·(n−k)] of the kept rows, group by group (each group keeps exactly n − k)."""
  g = keep.shape[0] // n
  order = jnp.argsort(jnp.logical_not(keep.reshape(g, n)), axis=1, stable=True)[:, :n - k]  # [G, n-k]
  return (order + (jnp.arange(g) * n)[:, None]).reshape(-1)
