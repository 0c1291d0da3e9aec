"""The tier-1 methods are reachable by flag name where a trainer dispatches, and by import elsewhere."""
import warnings

import pytest

from jaxrl_dense import advantages, filters, losses, rewards
from jaxrl_dense.advantages import dual_level, prl, turn_level as adv_turn_level
from jaxrl_dense.filters import prof
from jaxrl_dense.losses import tgdpo
from jaxrl_dense.rewards import fine_grained, sar, turn_level


def test_turn_level_and_prl_estimators_are_registered_for_the_trainer():
  assert {"prl", "matchtir", "igpo"} <= set(advantages.ESTIMATORS.names())
  with pytest.raises(KeyError, match="known"):
    advantages.ESTIMATORS.get("dual_level")  # its flag name is "matchtir"


def test_method_functions_are_exported_by_their_packages():
  assert advantages.prl_advantages is prl.prl_advantages
  assert advantages.dual_level_advantages is dual_level.dual_level_advantages
  assert advantages.igpo_advantages is adv_turn_level.igpo_advantages
  assert filters.prof_filter is prof.prof_filter
  assert losses.tgdpo_loss is tgdpo.tgdpo_loss
  assert losses.dpo_loss_from_token_logps is tgdpo.dpo_loss_from_token_logps
  assert rewards.self_aligned_reward is sar.self_aligned_reward
  assert rewards.fine_grained_token_rewards is fine_grained.fine_grained_token_rewards


def test_igpo_advantages_old_home_is_a_deprecated_alias():
  with pytest.warns(DeprecationWarning, match="advantages.igpo_advantages"):
    old = turn_level.igpo_advantages
  assert old is advantages.igpo_advantages
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    from jaxrl_dense.advantages import igpo_advantages  # pylint: disable=import-outside-toplevel
  assert igpo_advantages is old
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    turn_level.nope  # pylint: disable=pointless-statement


def test_unused_registries_are_gone():
  for mod, name in [(advantages, "REGISTRY"), (advantages, "get"), (filters, "REGISTRY"),
                    (losses, "PREFERENCE_LOSSES"), (losses, "AGGREGATIONS"), (rewards, "EXTRA_REWARDS")]:
    assert not hasattr(mod, name), f"{mod.__name__}.{name}"
