"""Deprecated (one release): the former single sharding module, split into role modules.

Every former public name is forwarded, on first use, to its new home with a `DeprecationWarning`
that names it:

  `mesh`       AXES, BATCH_AXES, parse_mesh_spec, make_mesh, initialize_distributed,
               current_mesh, mesh_of, use_mesh, with_mesh, batch_divisor
  `rules`      LOGICAL_RULES, ACTIVATION_RULES, logical_axes, param_specs, param_shardings,
               logical_to_spec, with_logical_constraint, KV_CACHE_AXES, constrain_kv_cache,
               kv_cache_spec, kernel_axes, shard_kernel
  `placement`  replicated, batch_spec, batch_sharding, device_put, to_host, shard_batch,
               constrain, constrain_like_params, shard_params, opt_state_shardings,
               sharded_opt_init, tree_shardings (and the deprecated sharded_init, shard_opt_state)
  `inference`  INFERENCE_LAYOUTS, INFERENCE_TP_RULES, inference_shardings, inference_params,
               rollout_params, rollout_mesh_layout
  `inspect`    addressable_bytes, describe

A forwarded name is the new module's object itself (no copy is kept here), so patch the new
module (`jaxrl_dense.parallel.placement.shard_batch`, ...): setting a name on this module
changes nothing else.
"""
from __future__ import annotations

import importlib as _importlib
import warnings as _warnings

# new module (in jaxrl_dense.parallel) -> the former public names it now holds.
_HOMES = {
    "mesh": ("AXES", "BATCH_AXES", "PyTree", "parse_mesh_spec", "make_mesh",
             "initialize_distributed", "current_mesh", "mesh_of", "use_mesh", "with_mesh",
             "batch_divisor"),
    "rules": ("LOGICAL_RULES", "ACTIVATION_RULES", "KV_CACHE_AXES", "logical_axes", "param_specs",
              "param_shardings", "logical_to_spec", "with_logical_constraint",
              "constrain_kv_cache", "kv_cache_spec", "kernel_axes", "shard_kernel"),
    "placement": ("replicated", "batch_spec", "batch_sharding", "device_put", "to_host",
                  "shard_batch", "constrain", "constrain_like_params", "shard_params",
                  "sharded_init", "opt_state_shardings", "shard_opt_state", "sharded_opt_init",
                  "tree_shardings"),
    "inference": ("INFERENCE_TP_RULES", "INFERENCE_LAYOUTS", "inference_shardings",
                  "inference_params", "rollout_params", "rollout_mesh_layout"),
    "inspect": ("addressable_bytes", "describe"),
}

# former public name -> its new module's path.
MOVED_NAMES = {name: f"jaxrl_dense.parallel.{module}"
               for module, names in _HOMES.items() for name in names}

__all__ = sorted(MOVED_NAMES)


def __getattr__(name: str):
  """Forwards a former name to its new module (PEP 562), warning with the new path."""
  home = MOVED_NAMES.get(name)
  if home is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  _warnings.warn(f"{__name__}.{name} moved to {home}.{name}; the old path is removed in the next "
                 "release.", DeprecationWarning, stacklevel=2)
  return getattr(_importlib.import_module(home), name)


def __dir__():
  return sorted(set(globals()) | set(MOVED_NAMES))
