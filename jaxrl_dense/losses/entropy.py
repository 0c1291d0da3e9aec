"""Token entropy from logits (veRL ``verl/utils/torch_functional.py`` ``entropy_from_logits``)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = chex.Array


def entropy_from_logits(logits: ArrayLike, *, temperature: float = 1.0) -> Array:
  """``H_t = logsumexp(z_t) − Σ_v softmax(z_t)_v z_{t,v}`` with ``z = logits / temperature``.

  Shapes: logits ``[B, T, V]`` -> ``[B, T]`` (float32). Aggregate with ``losses.aggregation``;
  the objective is ``pg_loss − entropy_coeff·H`` (veRL recipe: 0.001; PRIME-RL: 0).
  """
  chex.assert_rank(logits, 3, custom_message="`logits` must be [B, T, V]")
  if temperature <= 0:
    raise ValueError(f"`temperature` must be > 0, got {temperature}")
  z = jnp.asarray(logits, jnp.float32) / temperature
  p = jax.nn.softmax(z, axis=-1)
  return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)
