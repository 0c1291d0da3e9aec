"""Continuous-batching rollout engine with a paged KV cache (see `engine.py`).

Modules: `page_table` (host page pool, refcounts, copy-on-write), `paged_attention` (device
page writes and paged attention: XLA gather path, Pallas kernels on TPU / GPU), `engine`
(scheduler, prefill, K-step decode; `generate` returns `sampling.GenerationOutput`).
"""
from jaxrl_dense.engine import paged_attention, page_table
from jaxrl_dense.engine.engine import EngineConfig, EngineStats, generate, init_pool, run
from jaxrl_dense.engine.page_table import NULL_PAGE, PagePool, pages_for

__all__ = ["EngineConfig", "EngineStats", "generate", "run", "init_pool", "PagePool", "NULL_PAGE",
           "pages_for", "paged_attention", "page_table"]
