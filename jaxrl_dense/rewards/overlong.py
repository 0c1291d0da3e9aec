"""DAPO overlong reward shaping (Yu et al., DAPO, arXiv 2503.14476, eq. 13; veRL DAPO reward manager).

A soft length penalty on the last ``L_cache`` tokens before the response cap ``L_max``:

    R_len(y) = 0                               |y| <= L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache · f   L_max − L_cache < |y| <= L_max
             = −f                              |y| > L_max   (a truncated response has |y| = L_max)

(``f`` = penalty factor, 1 in the paper; veRL: ``min(−(|y| − (L_max − L_cache)) / L_cache · f, 0)``).
It is an extra outcome reward: ``R = R_verifier + R_len`` enters the advantage estimator (PRIME's
RLOO outcome term, GRPO, ...) beside the implicit PRM's process rewards; the accuracy-band filter
still reads the verifier's label only.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_dense import ops

Array = jax.Array


def overlong_penalty(mask: chex.Array, *, max_length: int, buffer: int, factor: float = 1.0) -> Array:
  """R_len [B] of responses whose lengths are ``Σ_t mask`` ([B, T]); see the module docstring.

  ``max_length`` = L_max (the response cap), ``buffer`` = L_cache in [1, L_max], ``factor`` >= 0."""
  chex.assert_rank(mask, 2)
  if not 1 <= buffer <= max_length:
    raise ValueError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer}")
  if not factor >= 0:
    raise ValueError(f"overlong penalty factor must be >= 0, got {factor}")
  length = ops.valid_lengths(mask).astype(jnp.float32)  # [B]
  exceed = length - (max_length - buffer)
  return jax.lax.stop_gradient(jnp.minimum(-exceed / buffer * factor, 0.0))
