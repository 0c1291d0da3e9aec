"""Deprecated: `jaxrl_dense.rl.setup` was split into `rl.load` (input checks, loading models,
tokenizer and records, fingerprints, the compilation cache) and `rl.plan` (mesh checks, the
dry-run and compiled memory plans). Every former name still resolves here, with a
DeprecationWarning naming its new home, for one release; it is the new module's own object, so
setting an attribute on `rl.load` / `rl.plan` is seen through this path too.
"""
from __future__ import annotations

import importlib
import warnings

_HOMES = ("jaxrl_dense.rl.load", "jaxrl_dense.rl.plan")


def __getattr__(name: str):
  for home in _HOMES:
    module = importlib.import_module(home)
    if hasattr(module, name) and not name.startswith("__"):
      warnings.warn(f"jaxrl_dense.rl.setup.{name} moved to {home}.{name}; the old path is removed "
                    "in the next release.", DeprecationWarning, stacklevel=2)
      return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
