"""Sampling: the static jitted sampler, the continuous-batching engine and what both share.

Modules:
  `step`    what both samplers share: `GenerationOutput`, the logit filters, `sample_step`
            (temperature, top-k, top-p) and the host-side view of an input.
  `static`  `generate`: one batch, a preallocated KV cache, the decode loop in one `lax.while_loop`;
            `engine="continuous"` hands the same call to the engine.
  `engine/` the continuous-batching engine: paged KV cache, scheduler, multi-turn episodes.
  `multiturn` multi-turn episodes on either sampler: the policy acts, an environment answers
            (`rollout_turns`, `rollout_turns_paused`); the trainer and the eval both use it.

`static` and `engine` both import `step`; the engine never imports `static` (no import circle).
`jaxrl_dense.sampling.generate` is the entry point the trainer, the rollout and the eval call
(tests replace it there).
"""
from jaxrl_dense.sampling.static import TRACE_COUNT, generate
from jaxrl_dense.sampling.static import _bucket, _generate_jit  # noqa: F401  (the former module's privates)
from jaxrl_dense.sampling.step import GenerationOutput, SamplingParams, filter_logits, host_value, sample_step
from jaxrl_dense.sampling.step import host_value as _host_value  # noqa: F401  (former private names)
from jaxrl_dense.sampling.step import sample_step as _sample_step  # noqa: F401

__all__ = ["generate", "GenerationOutput", "SamplingParams", "filter_logits", "sample_step", "host_value", "TRACE_COUNT"]
