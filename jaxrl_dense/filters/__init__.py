"""Prompt / sample filters applied between verification and the update.

Public API (stable names):
  accuracy_band_filter(outcome, lengths=None, *, n, reference_impl="verl"|"original", low=0.2, high=0.8,
                       max_response_length=None, filter_truncated=False, oversample_factor=1.0)
      -> FilterOutput(keep_mask [B], indices [K], prompt_pass [P])
  prompt_pass_flags(outcome, *, n, low, high, lengths=None, truncation_length=None) -> [P]
  prof_consistency(...), prof_filter(...) -> keep [B], prof_blend_rewards(...)   (``filters/prof.py``)

Adding a filter: write ``filters/<name>.py`` and export its public names here.
"""
from jaxrl_dense.filters.accuracy_band import FilterOutput, accuracy_band_filter, prompt_pass_flags

__all__ = ["accuracy_band_filter", "prompt_pass_flags", "FilterOutput"]

# PROF process-consistency filter (arXiv 2509.03403); returns keep [B] (bool), not FilterOutput.
from jaxrl_dense.filters.prof import prof_blend_rewards, prof_consistency, prof_filter  # noqa: E402
__all__ += ["prof_consistency", "prof_filter", "prof_blend_rewards"]
