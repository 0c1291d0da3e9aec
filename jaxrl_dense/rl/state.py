"""Train state pytree and optimizer builder shared by the RL step builders."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_dense.parallel import placement


class TrainState(NamedTuple):
  """Parameters, optimizer state and optimizer-step counter of one trained model.

  A NamedTuple, hence a pytree: it can be donated to `jax.jit`, sharded leaf by leaf and
  checkpointed as `state._asdict()`.

  Attributes:
    params: nested dict of arrays (the models API's params pytree).
    opt_state: the optax state of `params`.
    step: int32 scalar, number of optimizer steps applied so far.
  """
  params: Any
  opt_state: Any
  step: jax.Array


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: Optional[float] = 1.0,
    warmup_steps: int = 0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """AdamW with global-norm gradient clipping (veRL's actor / PRM optimizer settings).

  `grad_clip` None or <= 0 disables clipping; `warmup_steps` > 0 ramps the learning rate linearly
  from 0 (the PRIME scripts use a constant schedule, i.e. 0). `mu_dtype` (e.g. jnp.bfloat16) stores
  the first moment in that dtype (optax); the second moment keeps the parameters' dtype. With
  float32 master parameters (rl.load.dtype_overrides) the gradients and states are float32.
  """
  if learning_rate < 0:
    raise ValueError(f"learning_rate={learning_rate} must be >= 0.")
  schedule = learning_rate
  if warmup_steps > 0:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps])
  chain = []
  if grad_clip is not None and grad_clip > 0:
    chain.append(optax.clip_by_global_norm(grad_clip))
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype))
  return optax.chain(*chain)


def init_train_state(params: Any, optimizer: optax.GradientTransformation,
                     shardings: Optional[TrainState] = None) -> TrainState:
  """The TrainState constructor (`rl.prime.make_prime`'s init_fn builds its states with it).

  `shardings` None: the optimizer state is jitted from the params (so it inherits their
  placement). `shardings` a TrainState of `NamedSharding`s (`rl.prime.state_shardings(...).policy`):
  the optimizer state is initialised straight into `shardings.opt_state` (no full copy on any
  device) and the step counter placed in `shardings.step`; `params` must already be placed.
  """
  if shardings is None:
    opt_state = jax.jit(optimizer.init)(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = placement.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(params=params, opt_state=opt_state, step=step)
