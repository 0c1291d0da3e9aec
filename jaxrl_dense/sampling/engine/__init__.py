"""Continuous-batching rollout engine with a paged KV cache (see `engine.py`).

Modules: `page_table` (host page pool, refcounts, copy-on-write), `paged_attention` (device
page writes and paged attention: XLA gather path, Pallas kernels on TPU / GPU), `engine`
(scheduler, prefill, K-step decode; `generate` returns `sampling.GenerationOutput`;
`run_episodes`: multi-turn rows that pause at a stop and resume in their own pages).
"""
from jaxrl_dense.sampling.engine import paged_attention, page_table
from jaxrl_dense.sampling.engine.engine import (RESUME, EngineConfig, EngineStats, NextTurn, generate, init_pool,
                                                run, run_episodes)
from jaxrl_dense.sampling.engine.page_table import NULL_PAGE, PagePool, pages_for

__all__ = ["EngineConfig", "EngineStats", "generate", "run", "run_episodes", "NextTurn", "RESUME", "init_pool", "PagePool", "NULL_PAGE",
           "pages_for", "paged_attention", "page_table"]
