"""`RolloutBatch`: the typed pytree a rollout hands to an RL update.

Grouping convention (every estimator and filter of the library uses it): B = G·n rows, the n
responses of prompt g are the contiguous rows g·n .. g·n + n − 1, so group ids are
`ops.contiguous_group_ids(G, n)` and a group's prompt is `prompt_tokens[g·n]`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import _deprecation


_ROW_FIELDS = ("outcome", "in_band", "keep", "weights")  # [B]; the other response fields are [B, R]


class RolloutBatch(NamedTuple):
  """One step's rows (a NamedTuple, hence a pytree; None fields are empty subtrees).

  prompt_tokens: int32 [B, P] left-padded prompts (each repeated for its n responses).
  prompt_mask: int32 [B, P] 1 on real prompt tokens.
  response_tokens: int32 [B, R] right-padded responses.
  response_mask: float32 [B, R] 1 up to and including the first EOS.
  outcome: float32 [B] verifier outcome labels (formerly `acc`, a deprecated alias for one release).
  sampler_logp: float32 [B, R] the sampler's log-probs of its tokens (the behaviour policy μ: the
    distribution actually sampled, temperature / top-p / top-k and the sampler's precision
    included), or None. The update uses them as π_old in bypass mode (--recompute_old_logp=false)
    and for the rollout correction between μ and the recomputed π_old (--rollout_is/--rollout_rs).
  ref_logp, prm_logp: float32 [B, R] precomputed reference / PRM log-probs, or None (the update
    scores them).
  query_free_prompt_tokens, query_free_prompt_mask: int32 [B, P] the prompts with the user's last
    message emptied (Self-Aligned Reward's answer-only context, arXiv 2509.05489), or None.
  in_band: float32 [B] 1 on the rows of groups that passed the accuracy band (every group without
    the band filter), 0 on out-of-band (filler) groups; None = all 1. Constant within a group. The
    PRM trains on in-band rows only; with --filter_mode=mask|resample the advantage and the policy
    update give the other rows weight 0 (`rl.prime.make_prime`).
  process_rewards: float32 [B, R] token rewards from an external step-scoring PRM
    (--process_reward: served step scores, credited and placed on these response tokens by
    `rl.external_reward`), or None.
  observation_mask: float32 [B, R] 1 on environment observation tokens of a multi-turn rollout
    (--env; `rl.multiturn`): attended as context, never trained (response_mask is 0 there, so
    the losses, the implicit PRM's rewards and the advantages skip them), or None (single turn).
  turn_ids: int32 [B, R] turn index of each model token (-1 on observations and padding), or None.
  turn_rewards: float32 [B, K] turn-level rewards (--advantage=matchtir: MatchTIR's matched-call
    rewards, the answer turn's outcome), K = --max_turns, or None.

  Filled in by the update's passes (`rl.prime.make_prime`, each `batch._replace(...)`; None from
  the rollout), the way purejaxrl's `Transition` carries values and advantages to the loss:
  old_logp: float32 [B, R] π_old of the response tokens (recomputed, or μ in bypass mode).
  advantages, returns: float32 [B, R] the estimator's output (zero outside the trained rows).
  keep: bool [B] PROF's surviving responses (--filter=prof), or None (every row).
  weights: float32 [B] the policy's row weights (0 = an out-of-band filler row with
    --filter_mode=mask|resample), or None (every row 1).
  rollout_is_weights: float32 [B, R] truncated importance weights min(π_old/μ, C) multiplying each
    token's policy loss (--rollout_is), or None.
  rollout_rs_keep: float32 [B, R] the rejection mask (--rollout_rs): rejected tokens leave the
    policy loss and its count, or None.
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  response_tokens: jax.Array
  response_mask: jax.Array
  outcome: jax.Array
  sampler_logp: Optional[jax.Array] = None
  ref_logp: Optional[jax.Array] = None
  prm_logp: Optional[jax.Array] = None
  query_free_prompt_tokens: Optional[jax.Array] = None
  query_free_prompt_mask: Optional[jax.Array] = None
  in_band: Optional[jax.Array] = None
  process_rewards: Optional[jax.Array] = None
  observation_mask: Optional[jax.Array] = None
  turn_ids: Optional[jax.Array] = None
  turn_rewards: Optional[jax.Array] = None
  old_logp: Optional[jax.Array] = None
  advantages: Optional[jax.Array] = None
  returns: Optional[jax.Array] = None
  keep: Optional[jax.Array] = None
  weights: Optional[jax.Array] = None
  rollout_is_weights: Optional[jax.Array] = None
  rollout_rs_keep: Optional[jax.Array] = None

  acc = _deprecation.renamed_attribute("outcome")

  @property
  def num_rows(self) -> int:
    return self.response_mask.shape[0]

  def check(self, n: int) -> "RolloutBatch":
    """Shape / rank checks (static); returns self. Raises naming the bad field."""
    chex.assert_rank([self.prompt_tokens, self.prompt_mask, self.response_tokens, self.response_mask,
                      self.outcome], [2, 2, 2, 2, 1])
    b, p = self.prompt_tokens.shape
    r = self.response_tokens.shape[1]
    for name in self._fields:
      x = getattr(self, name)
      if x is None:
        continue
      if name == "turn_rewards":
        if x.ndim != 2 or x.shape[0] != b:
          raise ValueError(f"RolloutBatch.turn_rewards has shape {tuple(x.shape)}, expected ({b}, K)")
        continue
      want = (b, p) if "prompt" in name else (b,) if name in _ROW_FIELDS else (b, r)
      if tuple(x.shape) != want:
        raise ValueError(f"RolloutBatch.{name} has shape {tuple(x.shape)}, expected {want}")
    if b % n:
      raise ValueError(f"RolloutBatch: {b} rows are not contiguous groups of n={n}")
    return self

  def sequences(self, prompt: str = "prompt") -> dict:
    """{"tokens", "attention_mask" [B, P + R], "response_mask" [B, R]}: the step builders' layout
    (prompt = "query_free" uses the query-free prompts)."""
    tok = self.prompt_tokens if prompt == "prompt" else self.query_free_prompt_tokens
    pm = self.prompt_mask if prompt == "prompt" else self.query_free_prompt_mask
    rmask = self.response_mask.astype(jnp.float32)
    attend = rmask if self.observation_mask is None else rmask + self.observation_mask.astype(jnp.float32)
    return {"tokens": jnp.concatenate([tok, self.response_tokens], axis=1).astype(jnp.int32),
            "attention_mask": jnp.concatenate([pm, attend.astype(pm.dtype)], axis=1).astype(jnp.int32),
            "response_mask": rmask}

  def query_free(self) -> "RolloutBatch":
    """The batch with its prompts replaced by the query-free prompts (Self-Aligned Reward)."""
    if self.query_free_prompt_tokens is None:
      raise ValueError("RolloutBatch.query_free_prompt_tokens is None (--extra_reward=sar needs them)")
    return self._replace(prompt_tokens=self.query_free_prompt_tokens,
                         prompt_mask=self.query_free_prompt_mask)

  def policy_mask(self) -> jax.Array:
    """float32 [B, R] the tokens of the policy loss and its count: response_mask × keep × weights ×
    rollout_rs_keep (each factor that is set)."""
    m = self.response_mask.astype(jnp.float32)
    if self.keep is not None:
      m = m * self.keep[:, None].astype(jnp.float32)
    if self.weights is not None:
      m = m * self.weights[:, None]
    if self.rollout_rs_keep is not None:
      m = m * self.rollout_rs_keep
    return m

  def response_lengths(self):
    """[B] the response region's extent per row: model tokens plus any observation tokens."""
    m = np.asarray(self.response_mask) > 0
    if self.observation_mask is not None:
      m = m | (np.asarray(self.observation_mask) > 0)
    return m.sum(axis=1)


def trim_batch(batch: RolloutBatch, bucket: int) -> RolloutBatch:
  """The batch without its all-padding columns, rounded to a length bucket (host-side numpy).

  Prompts (left-padded) keep their last P columns, P = the longest real prompt of the batch
  (query-free prompts included) rounded up to a multiple of `bucket`; responses (right-padded)
  keep their first R columns, R = the longest response rounded up likewise; neither exceeds its
  padded width. Only padding is cut and positions come from the masks, so every log-prob, loss
  and gradient equals the padded batch's up to float reduction order (tested within 1e-5), while
  the jitted update compiles once per (P, R) bucket: a small bounded set of shapes.
  """
  if bucket < 1:
    raise ValueError(f"trim_batch: bucket must be >= 1, got {bucket}")
  pw, rw = batch.prompt_tokens.shape[1], batch.response_tokens.shape[1]
  up = lambda x, cap: min(cap, max(bucket, -(-int(x) // bucket) * bucket))
  longest_p = max(int(np.max(np.sum(np.asarray(m) > 0, axis=1)))
                  for m in (batch.prompt_mask, batch.query_free_prompt_mask) if m is not None)
  p = up(longest_p, pw)
  r = up(np.max(batch.response_lengths()), rw)  # observations of a multi-turn row included
  cut = lambda x, kind: None if x is None else (np.asarray(x)[:, pw - p:] if kind == "p" else np.asarray(x)[:, :r])
  return batch._replace(
      prompt_tokens=cut(batch.prompt_tokens, "p"), prompt_mask=cut(batch.prompt_mask, "p"),
      response_tokens=cut(batch.response_tokens, "r"), response_mask=cut(batch.response_mask, "r"),
      sampler_logp=cut(batch.sampler_logp, "r"), ref_logp=cut(batch.ref_logp, "r"), prm_logp=cut(batch.prm_logp, "r"),
      query_free_prompt_tokens=cut(batch.query_free_prompt_tokens, "p"),
      query_free_prompt_mask=cut(batch.query_free_prompt_mask, "p"),
      process_rewards=cut(batch.process_rewards, "r"), observation_mask=cut(batch.observation_mask, "r"),
      turn_ids=cut(batch.turn_ids, "r"), old_logp=cut(batch.old_logp, "r"),
      advantages=cut(batch.advantages, "r"), returns=cut(batch.returns, "r"),
      rollout_is_weights=cut(batch.rollout_is_weights, "r"), rollout_rs_keep=cut(batch.rollout_rs_keep, "r"))


# RolloutBatch(acc=...): the former name of `outcome`, for one release (DeprecationWarning).
RolloutBatch.__new__ = staticmethod(_deprecation.renamed_kwargs(acc="outcome")(RolloutBatch.__new__))
