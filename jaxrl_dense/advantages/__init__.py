"""Advantage estimators. Every function returns ``(advantages [B, T], returns [B, T])``,
stop-gradient and 0 on padding, and names the reward density it accepts in its signature:
``token_rewards [B, T]`` (token density) or ``scores [B]`` (sequence density).

Public API (stable names):
  prime_rloo_advantages(token_rewards, acc, mask, *, n, variant="verl"|"original"|"paper",
                        process_coef, outcome_coef, process_gamma, outcome_gamma, whiten)
  leave_one_out_token_rewards(rewards, reward_mask, *, n), paper_process_baseline(...)
  grpo_advantages(scores, mask, group_ids, num_groups, *, eps=1e-6, scale_by_std=True)
  dr_grpo_advantages(scores, mask, group_ids, num_groups)
  rloo_advantages(scores, mask, group_ids, num_groups)
  reinforce_pp_advantages(token_rewards, mask, *, gamma)
  reinforce_pp_baseline_advantages(scores, mask, group_ids, num_groups)
  gae_advantages(token_rewards, values, mask, *, gamma, lam, variant="verl"|"original")

Registry: ``get(name)`` returns the function, ``density(name)`` its reward density
("token", "sequence" or "token+sequence"), ``names()`` the known names. Registered:
"prime_rloo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae".

Adding a method: write ``advantages/<name>.py`` with a pure function, then one line below:
``REGISTRY.register("<name>", <module>.<fn>, density="token")``.
"""
from jaxrl_dense.advantages.gae import gae_advantages
from jaxrl_dense.advantages.outcome import (
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from jaxrl_dense.advantages.prime import (
    leave_one_out_token_rewards,
    paper_process_baseline,
    prime_rloo_advantages,
)
from jaxrl_dense.registry import Registry, UnknownNameError

REGISTRY = Registry("advantage estimator")
REGISTRY.register("prime_rloo", prime_rloo_advantages, density="token+sequence")
REGISTRY.register("grpo", grpo_advantages, density="sequence")
REGISTRY.register("dr_grpo", dr_grpo_advantages, density="sequence")
REGISTRY.register("rloo", rloo_advantages, density="sequence")
REGISTRY.register("reinforce_pp", reinforce_pp_advantages, density="token")
REGISTRY.register("reinforce_pp_baseline", reinforce_pp_baseline_advantages, density="sequence")
REGISTRY.register("gae", gae_advantages, density="token")

get = REGISTRY.get
names = REGISTRY.names


def density(name: str) -> str:
  """Reward density accepted by the registered estimator ``name``."""
  return REGISTRY.info(name)["density"]


__all__ = [
    "prime_rloo_advantages", "leave_one_out_token_rewards", "paper_process_baseline",
    "grpo_advantages", "dr_grpo_advantages", "rloo_advantages", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "gae_advantages",
    "REGISTRY", "get", "names", "density", "UnknownNameError",
]

# Tier-1 dense-reward methods (methods.md §1.6–§1.8); same (advantages, returns) contract.
from jaxrl_dense.advantages.dual_level import dual_level_advantages  # noqa: E402
from jaxrl_dense.advantages.prl import prl_advantages  # noqa: E402
from jaxrl_dense.rewards.turn_level import igpo_advantages  # noqa: E402

REGISTRY.register("prl", prl_advantages, density="sequence")
REGISTRY.register("dual_level", dual_level_advantages, density="turn")
REGISTRY.register("igpo", igpo_advantages, density="turn")
__all__ += ["prl_advantages", "dual_level_advantages", "igpo_advantages"]
