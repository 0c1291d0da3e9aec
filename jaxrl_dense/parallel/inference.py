"""The inference (rollout) layout: the sampler's copy of the weights, resharded once per rollout.

`rollout_params(params, config, mesh, ...)` (what the trainer calls) casts the matrices to the
compute dtype and places the copy in the decode layout `inference_shardings` picks: replicated
where it fits, tensor-parallel otherwise, the training layout as the fallback
(`INFERENCE_LAYOUTS`). `rollout_mesh_layout` gives the mesh and layout of a separate rollout mesh
(the trainer's --rollout_mesh).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_dense.parallel.mesh import PyTree, make_mesh
from jaxrl_dense.parallel.rules import LOGICAL_RULES, param_specs

# Parameter rules of the tensor-parallel inference layout: heads / MLP units / vocabulary over
# "tensor", the model width whole (no per-step FSDP all-gathers in the decode loop).
INFERENCE_TP_RULES: dict[str, Any] = {**LOGICAL_RULES, "embed": None}

INFERENCE_LAYOUTS = ("replicated", "tensor", "train")


def _shard_bytes(x: Any, spec: P, sizes: Mapping[str, int], dtype: Any = None) -> int:
  """Bytes of one device's shard of `x` (array or ShapeDtypeStruct) under `spec`."""
  shape = tuple(getattr(x, "shape", np.shape(x)))
  itemsize = jnp.dtype(dtype if dtype is not None else x.dtype).itemsize
  n = 1
  for i, d in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    n *= d // math.prod(sizes.get(a, 1) for a in axes)
  return n * itemsize


def _cast_dtype(x: Any, dtype: Any) -> Any:
  if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.dtype(x.dtype)
  return jnp.dtype(dtype)


def inference_shardings(params: PyTree, config: Any, mesh: Mesh, *,
                        max_bytes: Optional[int] = None, dtype: Any = None,
                        layout: str = "auto") -> tuple[PyTree, str]:
  """Shardings of the rollout's copy of the weights, and the layout chosen.

  Layouts (Tunix `tunix/rl/reshard.py` moves trainer weights to the sampler's layout once per
  rollout in the same way):
    "replicated": every device holds all weights; decoding needs no weight communication.
    "tensor":     heads / MLP units / vocabulary split over "tensor" (Megatron), the model
                  width whole: one all-reduce of [B, D] per row-parallel matmul per step.
    "train":      the training (FSDP + tensor) layout: every decode step all-gathers every
                  weight; the fallback when nothing else fits.
  `layout="auto"` takes the first that needs at most `max_bytes` per device (None: no limit,
  so "replicated"), counting every floating leaf in `dtype` (None: its own dtype).

  Returns:
    (tree of NamedSharding like `params`, layout name).
  """
  if layout not in INFERENCE_LAYOUTS + ("auto",):
    raise ValueError(f"inference_shardings: layout={layout!r}; expected 'auto' or one of "
                     f"{INFERENCE_LAYOUTS}.")
  sizes = dict(mesh.shape)
  is_p = lambda s: isinstance(s, P)
  candidates = {
      "replicated": jax.tree.map(lambda x: P(), params),
      "tensor": param_specs(params, config, mesh, INFERENCE_TP_RULES),
      "train": param_specs(params, config, mesh),
  }

  def per_device(specs):
    return sum(_shard_bytes(x, s, sizes, _cast_dtype(x, dtype))
               for x, s in zip(jax.tree_util.tree_leaves(params),
                               jax.tree_util.tree_leaves(specs, is_leaf=is_p)))

  if layout == "auto":
    order = [name for name in INFERENCE_LAYOUTS
             if max_bytes is None or per_device(candidates[name]) <= max_bytes]
    if not order:
      need = per_device(candidates["train"])
      raise ValueError(
          f"inference_shardings: the weights need {need} bytes per device even in the training "
          f"layout on mesh {sizes}, more than max_bytes={max_bytes}.")
    layout = order[0]
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), candidates[layout], is_leaf=is_p)
  return shardings, layout


def inference_params(params: PyTree, config: Any, mesh: Mesh, *, max_bytes: Optional[int] = None,
                     dtype: Any = None, layout: str = "auto") -> PyTree:
  """The rollout's copy of `params`: resharded (and optionally cast) once per rollout.

  Call it once before `sampling.generate` (which then decodes without moving weights) and drop
  the result after the rollout; the training params are not touched. One jitted
  identity-with-`out_shardings` does the move, so XLA all-gathers each weight once (the FSDP ->
  replicated / tensor-parallel reshard) instead of once per decode step; `dtype` (e.g.
  "bfloat16") casts floating leaves on the way, halving the copy of float32 master weights.

  Args:
    params: the (training-layout) params.
    config: their ModelConfig.
    mesh: the mesh the sampler runs on.
    max_bytes: per-device budget for the weights (e.g. HBM minus the KV cache); see
      `inference_shardings` for how the layout is chosen.
    dtype: cast floating leaves to this dtype (None: keep).
    layout: "auto", "replicated", "tensor" or "train".
  """
  shardings, _ = inference_shardings(params, config, mesh, max_bytes=max_bytes, dtype=dtype,
                                     layout=layout)
  if dtype is not None:
    params = _cast_floating(params, jnp.dtype(dtype).name)  # in the source layout: no communication
  return jax.device_put(params, shardings)


def rollout_params(params: PyTree, config: Any, mesh: Mesh, *, dtype: Any = None,
                   max_bytes: Optional[int] = None, layout: str = "auto") -> PyTree:
  """The rollout's weights as the trainer, the memory plan and the layout test make them: the
  policy cast to its compute `dtype` (None or float32: kept) and placed in the decode layout of
  `inference_params` (layout "auto": replicated where it fits in `max_bytes`, tensor-parallel
  otherwise). Only matrices are cast (vectors, i.e. norm scales and biases, stay as they are:
  Gemma's (1 + w) norm reads its scale in float32), so the copy changes no sampled value: every
  matmul casts its weights to the compute dtype anyway. LoRA-attached params (a "lora" subtree)
  are returned as they are: their adapters are applied at run time in the training layout.

  `mesh` may be another mesh over the same devices than the params' (the trainer's
  --rollout_mesh): the copy then moves onto it, e.g. `layout="tensor"` on data:2,tensor:4 holds
  1/4 of the weights per device (`rollout_mesh_layout`)."""
  if isinstance(params, dict) and "lora" in params:
    return params
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    params = _cast_matrices(params, jnp.dtype(dtype).name)  # in the source layout: no communication
  return inference_params(params, config, mesh, max_bytes=max_bytes, layout=layout)


def rollout_mesh_layout(config: Any, train_mesh: Mesh, spec: str = "") -> tuple[Mesh, str]:
  """(mesh, layout) of the rollout copy: `spec` '' -> the training mesh and layout "auto"
  (replicated); else `make_mesh(spec)` over the training mesh's devices and layout "tensor"
  (weights split over its tensor axis only, rows over data x fsdp). The tensor size must divide
  the heads, the kv heads (each device keeps whole kv heads of the cache), the MLP width and the
  vocabulary."""
  if not spec:
    return train_mesh, "auto"
  mesh = make_mesh(spec, devices=list(train_mesh.devices.flat))
  t = mesh.shape["tensor"]
  sizes = {"heads": config.num_heads, "kv heads": config.num_kv_heads,
           "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
  bad = [f"{k}={v}" for k, v in sizes.items() if v % t]
  if bad:
    raise ValueError(f"rollout mesh {spec!r}: tensor={t} does not divide the model's "
                     f"{', '.join(bad)}.")
  return mesh, "tensor"


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast_matrices(tree: PyTree, dtype: str) -> PyTree:
  return jax.tree.map(lambda x: x.astype(dtype) if (jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2)
                      else x, tree)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast_floating(tree: PyTree, dtype: str) -> PyTree:
  return jax.tree.map(lambda x: x.astype(_cast_dtype(x, dtype)), tree)
