"""Introspection: bytes held per device, and the layout of every parameter (for logs and docs)."""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxrl_dense.parallel.mesh import PyTree
from jaxrl_dense.parallel.rules import _path_str, logical_axes, param_specs

def addressable_bytes(tree: PyTree) -> dict:
  """Bytes held per device by the arrays of `tree` (this process's devices only).

  Returns {device_id: bytes}; measured from `addressable_shards`, so it shows what FSDP /
  tensor parallelism actually saves.
  """
  out: dict = {}
  for x in jax.tree_util.tree_leaves(tree):
    if not isinstance(x, jax.Array):
      continue
    for shard in x.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def describe(params: PyTree, config: Any, mesh: Mesh) -> str:
  """One line per parameter: path, shape, logical axes, PartitionSpec (for logs and docs)."""
  specs = param_specs(params, config, mesh)
  lines = []
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    lines.append(f"{_path_str(path)} {tuple(x.shape)} {logical_axes(path, x.shape, config)} {s}")
  return "\n".join(lines)
