"""Old import paths of moved modules and names, kept for one release as deprecated aliases.

`import jaxrl_dense.sharding` (or `from jaxrl_dense import sharding`) still works: a finder on
`sys.meta_path` answers the old names in `MOVED`, warns with a `DeprecationWarning` that names the
new path, and binds the old name to the new module object itself (`sys.modules[old] is
sys.modules[new]`), so attributes read, set or monkeypatched through either path are the same.
No file is left at an old path, so git follows each move as a rename.

A public name that moved out of a module that stays keeps its old home through that module's
`__getattr__ = moved_names(__name__, {old name: new dotted path})`: reading it warns the same way
and returns the object from its new home, imported only then.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable, Dict

# old module path -> new module path (README, Changelog).
MOVED = {
    "jaxrl_dense.sampling_step": "jaxrl_dense.sampling.step",
    "jaxrl_dense.engine": "jaxrl_dense.sampling.engine",
    "jaxrl_dense.engine.engine": "jaxrl_dense.sampling.engine.engine",
    "jaxrl_dense.engine.page_table": "jaxrl_dense.sampling.engine.page_table",
    "jaxrl_dense.engine.paged_attention": "jaxrl_dense.sampling.engine.paged_attention",
    "jaxrl_dense.sharding": "jaxrl_dense.parallel.sharding",
    "jaxrl_dense.sharding_plan": "jaxrl_dense.parallel.plan",
    "jaxrl_dense.metrics": "jaxrl_dense.observe.metrics",
    "jaxrl_dense.wandb_sink": "jaxrl_dense.observe.wandb_sink",
    "jaxrl_dense.viz": "jaxrl_dense.observe.viz",
    "jaxrl_dense.prm_health": "jaxrl_dense.observe.prm_health",
    "jaxrl_dense.evaluation": "jaxrl_dense.eval.loop",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds the old names only; every other import falls through to the next finder."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname not in MOVED:
      return None
    return importlib.util.spec_from_loader(fullname, self)

  def create_module(self, spec):
    return None  # a placeholder; exec_module swaps in the real module

  def exec_module(self, module):
    old = module.__name__
    warnings.warn(f"{old} moved to {MOVED[old]}; the old path is removed in the next release.",
                  DeprecationWarning, stacklevel=2)
    # The import system returns whatever sys.modules holds under `old` once this returns.
    sys.modules[old] = importlib.import_module(MOVED[old])


def install() -> None:
  """Puts the finder first on `sys.meta_path` (once)."""
  if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())


def moved_names(module: str, moved: Dict[str, str]) -> Callable[[str], object]:
  """A module `__getattr__` for the names in `moved` ({old name: "package.module.new_name"}): each
  read warns with a DeprecationWarning naming the new home and returns the object found there."""

  def __getattr__(name: str) -> object:
    if name not in moved:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, _, new_name = moved[name].rpartition(".")
    warnings.warn(f"{module}.{name} moved to {moved[name]}; the old name is a deprecated alias for one release",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new_module), new_name)

  return __getattr__
