"""The tier-1 methods are reachable by flag name from the core registries."""
import pytest

from jaxrl_dense import advantages, filters, losses, rewards
from jaxrl_dense.advantages import dual_level, prl
from jaxrl_dense.filters import prof
from jaxrl_dense.losses import tgdpo
from jaxrl_dense.rewards import fine_grained, sar, turn_level


def test_registered_names_resolve_to_the_functions():
  assert advantages.get("prl") is prl.prl_advantages
  assert advantages.get("dual_level") is dual_level.dual_level_advantages
  assert advantages.get("igpo") is turn_level.igpo_advantages
  assert advantages.density("dual_level") == "turn"
  assert filters.get("prof") is prof.prof_filter
  assert losses.get_preference_loss("tgdpo") is tgdpo.tgdpo_loss
  assert losses.get_preference_loss("dpo") is tgdpo.dpo_loss_from_token_logps
  assert rewards.get_extra_reward("sar") is sar.self_aligned_reward
  assert rewards.get_extra_reward("fine_grained") is fine_grained.fine_grained_token_rewards
  with pytest.raises(KeyError, match="known"):
    rewards.get_extra_reward("nope")
