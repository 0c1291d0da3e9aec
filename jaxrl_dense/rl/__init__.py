"""The RL algorithm of jaxrl_dense: configuration, rollout batch, PRIME update, trainer.

  `config`   frozen validated configs (RunConfig > PrimeConfig > Rollout/Filter/PRM/PolicyConfig);
             absl flags generated from the fields; `fingerprint`; `ConfigError` names the field.
  `batch`    RolloutBatch: the typed pytree of one step's rows (contiguous groups of n).
  `rollout`  collect(): sample a group batch, decode, verify, select groups (accuracy band).
  `steps`    make_logprobs, make_prm_update (any PRM loss), make_policy_update (PPO-clip over epochs
             x mini-batches x micro-batches, global token-count normaliser), each on a
             RolloutBatch and returning a pure function; response_logprobs; make_scoring
             (deprecated).
  `prime`    make_prime(model_config, cfg, mesh) -> (init_fn, update_fn): ONE jitted update
             (scoring, PRM update, implicit rewards, advantages, PPO, KL / entropy metrics), its
             state layout decided at build time (`.state_shardings`); make_stages: its pure stages.
  `programs` the step's programs as they run (sampler, each stage, the whole update) from abstract
             inputs, for `parallel.plan`'s compiled memory plans and the layout tests.
  `trainer`  Trainer: models + data + verifier of a run; train_step, evaluate, checkpoint/restore.
  `state`    TrainState (params, opt_state, step) pytree; init_train_state (its one constructor);
             make_optimizer (AdamW + grad clip).
"""
from jaxrl_dense.rl.batch import RolloutBatch
from jaxrl_dense.rl.state import TrainState, init_train_state, make_optimizer
from jaxrl_dense.rl.steps import (make_logprobs, make_policy_update, make_prm_update, make_scoring,
                                  response_logprobs)

__all__ = ["RolloutBatch", "TrainState", "init_train_state", "make_optimizer",
           "make_logprobs", "make_policy_update", "make_prm_update", "make_scoring",
           "response_logprobs"]
