"""Prompt / sample filters applied between verification and the update.

Public API (stable names):
  accuracy_band_filter(acc, lengths=None, *, n, variant="verl"|"original", low=0.2, high=0.8,
                       max_response_length=None, filter_truncated=False, oversample_factor=1.0)
      -> FilterOutput(keep_mask [B], indices [K], prompt_pass [P])
  prompt_pass_flags(acc, *, n, low, high, lengths=None, truncation_length=None) -> [P]

Registry: ``get(name)``; registered: "accuracy_band".
Adding a filter (e.g. ``filters/prof.py``): write the module, then one ``REGISTRY.register`` line.
"""
from jaxrl_dense.filters.accuracy_band import FilterOutput, accuracy_band_filter, prompt_pass_flags
from jaxrl_dense.registry import Registry, UnknownNameError

REGISTRY = Registry("filter")
REGISTRY.register("accuracy_band", accuracy_band_filter)

get = REGISTRY.get
names = REGISTRY.names

__all__ = ["accuracy_band_filter", "prompt_pass_flags", "FilterOutput", "REGISTRY", "get", "names",
           "UnknownNameError"]

# PROF process-consistency filter (methods.md §1.4); returns keep [B] (bool), not FilterOutput.
from jaxrl_dense.filters.prof import prof_blend_rewards, prof_consistency, prof_filter  # noqa: E402

REGISTRY.register("prof", prof_filter)
__all__ += ["prof_consistency", "prof_filter", "prof_blend_rewards"]
