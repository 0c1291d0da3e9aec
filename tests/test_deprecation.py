"""Tests for jaxrl_dense._deprecation (renamed keywords and attributes, kept one release)."""
import dataclasses
import warnings
from typing import NamedTuple

import pytest

from jaxrl_dense import _deprecation


@_deprecation.renamed_kwargs(variant="reference_impl")
def _f(x, *, reference_impl="verl"):
  return x, reference_impl


def test_renamed_kwargs_accepts_the_old_name_with_a_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _f(1, reference_impl="original") == (1, "original")  # the new name: silent
    assert _f(1) == (1, "verl")
  with pytest.warns(DeprecationWarning, match="'variant' is renamed 'reference_impl'"):
    assert _f(1, variant="original") == (1, "original")
  with pytest.raises(TypeError, match="both"):
    _f(1, variant="original", reference_impl="verl")
  assert _f.__name__ == "_f" and _f.renamed_kwargs == {"variant": "reference_impl"}


def test_renamed_attribute_reads_the_new_field_with_a_warning():
  class B(NamedTuple):
    outcome: int
    acc = _deprecation.renamed_attribute("outcome")

  @dataclasses.dataclass(frozen=True)
  class C:
    outcome: int = 1
    acc = _deprecation.renamed_attribute("outcome")

  assert B._fields == ("outcome",) and [f.name for f in dataclasses.fields(C)] == ["outcome"]
  with pytest.warns(DeprecationWarning, match=r"B\.acc is renamed B\.outcome"):
    assert B(3).acc == 3
  with pytest.warns(DeprecationWarning, match=r"C\.acc is renamed C\.outcome"):
    assert C(2).acc == 2


def test_the_library_keeps_its_renamed_keywords():
  """Every renamed public keyword of this release still works (one call each would compile; the
  decorator's map is the contract)."""
  from jaxrl_dense import advantages, filters, rewards
  from jaxrl_dense.rl import steps
  for fn in (advantages.prime_rloo_advantages, advantages.gae_advantages,
             rewards.implicit_token_rewards, filters.accuracy_band_filter, steps.make_policy_update):
    assert fn.renamed_kwargs.get("variant") == "reference_impl", fn.__name__
  with pytest.warns(DeprecationWarning):
    hp = advantages.AdvantageParams(n=2, variant="original")
  assert hp.reference_impl == "original"
  with pytest.warns(DeprecationWarning):
    assert hp.variant == "original"


def test_rollout_batch_keeps_acc_for_one_release():
  import numpy as np
  from jaxrl_dense.rl.batch import RolloutBatch
  z = np.zeros((2, 3), np.float32)
  with pytest.warns(DeprecationWarning, match="'acc' is renamed 'outcome'"):
    b = RolloutBatch(z, z, z, z, acc=np.ones(2, np.float32))
  assert RolloutBatch._fields[4] == "outcome" and b.outcome.tolist() == [1.0, 1.0]
  with pytest.warns(DeprecationWarning, match=r"RolloutBatch\.acc is renamed RolloutBatch\.outcome"):
    assert b.acc is b.outcome
