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


class RolloutBatch(NamedTuple):
  """One step's rows (a NamedTuple, hence a pytree; None fields are empty subtrees).

  prompt_tokens: int32 [B, P] left-padded prompts (each repeated for its n responses).
  prompt_mask: int32 [B, P] 1 on real prompt tokens.
  response_tokens: int32 [B, R] right-padded responses.
  response_mask: float32 [B, R] 1 up to and including the first EOS.
  acc: float32 [B] verifier outcome labels.
  old_logp: float32 [B, R] behaviour log-probs from the sampler (used only when the update does
    not recompute them), or None.
  ref_logp, prm_logp: float32 [B, R] precomputed reference / PRM log-probs, or None (the update
    scores them).
  query_free_prompt_tokens, query_free_prompt_mask: int32 [B, P] the prompts with the user's last
    message emptied (Self-Aligned Reward's answer-only context, methods.md §1.9), or None.
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  response_tokens: jax.Array
  response_mask: jax.Array
  acc: jax.Array
  old_logp: Optional[jax.Array] = None
  ref_logp: Optional[jax.Array] = None
  prm_logp: Optional[jax.Array] = None
  query_free_prompt_tokens: Optional[jax.Array] = None
  query_free_prompt_mask: Optional[jax.Array] = None

  @property
  def num_rows(self) -> int:
    return self.response_mask.shape[0]

  def check(self, n: int) -> "RolloutBatch":
    """Shape / rank checks (static); returns self. Raises naming the bad field."""
    chex.assert_rank([self.prompt_tokens, self.prompt_mask, self.response_tokens, self.response_mask,
                      self.acc], [2, 2, 2, 2, 1])
    b, p = self.prompt_tokens.shape
    r = self.response_tokens.shape[1]
    for name in self._fields:
      x = getattr(self, name)
      if x is None:
        continue
      want = (b, p) if "prompt" in name else (b,) if name == "acc" else (b, r)
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
    return {"tokens": jnp.concatenate([tok, self.response_tokens], axis=1).astype(jnp.int32),
            "attention_mask": jnp.concatenate([pm, rmask.astype(pm.dtype)], axis=1).astype(jnp.int32),
            "response_mask": rmask}
