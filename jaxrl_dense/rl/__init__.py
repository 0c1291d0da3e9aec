"""Reusable, jittable RL step builders that experiments compose.

  `state`  TrainState (params, opt_state, step) pytree; make_optimizer (AdamW + grad clip).
  `steps`  make_scoring (old / ref / PRM log-probs in one jitted call), make_prm_update
           (implicit-PRM CE update, PRIME §5), make_policy_update (PPO-clip over epochs x
           mini-batches x micro-batches, normalised by the global token count, PRIME §7).
"""
from jaxrl_dense.rl.state import TrainState, init_train_state, make_optimizer
from jaxrl_dense.rl.steps import (PolicyLossSettings, make_policy_update, make_prm_update,
                                  make_scoring)

__all__ = ["TrainState", "init_train_state", "make_optimizer", "PolicyLossSettings",
           "make_policy_update", "make_prm_update", "make_scoring"]
