"""Placement: shardings of batches, parameters and optimizer states; putting arrays on the mesh.

Typical use:

  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  params = placement.shard_params(params, config, mesh)
  opt_state = placement.sharded_opt_init(optimizer, params, mesh)  # moments laid out like params
  batch = placement.shard_batch(batch, mesh)                       # leading dim over (data, fsdp)
  step = jax.jit(mesh_lib.with_mesh(train_step, mesh))             # activation constraints + GSPMD

with `from jaxrl_dense.parallel import mesh as mesh_lib, placement`. Every function here works
across processes: `device_put` and `to_host` build and read global arrays from each process's
addressable shards.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_dense.parallel.mesh import BATCH_AXES, PyTree, batch_divisor, current_mesh
from jaxrl_dense.parallel.rules import _key_str, _path_str, param_shardings, param_specs


# ----------------------------------------------------------------------------------------
# Simple shardings
# ----------------------------------------------------------------------------------------

def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding (scalars, small tables, RNG keys)."""
  return NamedSharding(mesh, P())


def batch_spec(ndim: int) -> P:
  """PartitionSpec with dim 0 over ("data", "fsdp") and the rest replicated."""
  if ndim < 1:
    raise ValueError(f"batch_spec: ndim={ndim}; a batch array has at least one dimension.")
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding for activations / rollout batches `[B, ...]`: B over ("data", "fsdp").

  B must be divisible by data * fsdp (checked in `shard_batch`).
  """
  return NamedSharding(mesh, batch_spec(ndim))


def device_put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`jax.device_put` that also works when `sharding` spans other processes' devices.

  In a multi-process run every process must pass the same global value (as after a seeded
  init or a checkpoint read); each process materialises only its addressable shards.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


_put = device_put


def to_host(x: PyTree) -> PyTree:
  """Global arrays -> numpy on EVERY process (works when shards live on other processes).

  Single-process this is `np.asarray`; multi-process, arrays that are not fully addressable are
  gathered with `multihost_utils.process_allgather` (a collective: all processes must call it).
  """
  from jax.experimental import multihost_utils

  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(get, x)


def shard_batch(batch: PyTree, mesh: Mesh, *, process_local: bool = False) -> PyTree:
  """Places every array of `batch` (leading dim B) with `batch_sharding`.

  Args:
    batch: pytree of arrays `[B, ...]` (tokens, masks, advantages, ...). Scalars are replicated.
    mesh: the mesh.
    process_local: if True, each process passes only its own rows (`B / process_count` of them,
      as a data loader per host produces) and the global array is assembled with
      `jax.make_array_from_process_local_data`. If False, every process passes the full batch.
  """
  div = batch_divisor(mesh)

  def put(path, x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    if x.ndim == 0:
      return _put(x, replicated(mesh))
    sharding = batch_sharding(mesh, x.ndim)
    if process_local:
      global_b = x.shape[0] * jax.process_count()
      if global_b % div:
        raise ValueError(
            f"shard_batch: {_path_str(path)} has {x.shape[0]} local rows x {jax.process_count()} "
            f"processes = {global_b}, not divisible by data*fsdp={div}.")
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    if x.shape[0] % div:
      raise ValueError(
          f"shard_batch: {_path_str(path)} has batch dimension {x.shape[0]} (shape {x.shape}), "
          f"not divisible by data*fsdp={div} of mesh {dict(mesh.shape)}.")
    return _put(x, sharding)

  return jax.tree_util.tree_map_with_path(put, batch)


def constrain(tree: PyTree, shardings: Optional[PyTree]) -> PyTree:
  """`with_sharding_constraint` leaf by leaf (inside jit); `shardings` None is a no-op.

  Use it on gradients (`constrain(grads, param_shardings)`) so that XLA reduce-scatters them
  straight into the parameters' FSDP layout instead of choosing another layout and resharding
  (which shows up as "Involuntary full rematerialization" warnings).
  """
  if shardings is None:
    return tree
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def constrain_like_params(grads: PyTree, params_or_shardings: PyTree, config: Any = None,
                          mesh: Optional[Mesh] = None) -> PyTree:
  """Constrains a gradient tree (inside jit) to its parameters' shardings.

  `params_or_shardings` is either a tree of `Sharding`s (e.g. `param_shardings(...)`, or the
  params part of `tree_shardings(state, ...)`) or the params themselves, whose shardings are
  then computed from `config` and `mesh` (default: the context mesh, `current_mesh()`). With no
  mesh this is a no-op. Where gradients are summed over the batch (`value_and_grad` over
  batch-sharded activations, then the micro-batch accumulation) this makes XLA reduce-scatter
  each weight gradient straight into the FSDP layout (1/fsdp of it per device) instead of
  all-reducing a full copy onto every device.
  """
  leaves = jax.tree_util.tree_leaves(params_or_shardings,
                                     is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if leaves and all(isinstance(s, jax.sharding.Sharding) for s in leaves):
    shardings = params_or_shardings
  else:
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is None or config is None:
      return grads
    specs = param_specs(params_or_shardings, config, mesh, strict=False)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
  return constrain(grads, shardings)


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------

def shard_params(params: PyTree, config: Any, mesh: Mesh,
                 rules: Optional[Mapping[str, Any]] = None) -> PyTree:
  """Places `params` on `mesh` with `param_shardings` (works across processes too)."""
  shardings = param_shardings(params, config, mesh, rules)
  return jax.tree.map(_put, params, shardings)


def _deprecated(name: str, instead: str) -> None:
  import warnings  # pylint: disable=import-outside-toplevel
  warnings.warn(f"jaxrl_dense.parallel.placement.{name} is deprecated (no caller in the library) "
                f"and goes in the next release; use {instead}", DeprecationWarning, stacklevel=3)


def sharded_init(init_fn: Callable[..., PyTree], *args, config: Any, mesh: Mesh,
                 rules: Optional[Mapping[str, Any]] = None) -> PyTree:
  """Deprecated (no caller; one release): `jax.jit(init_fn, out_shardings=param_shardings(
  jax.eval_shape(init_fn, *args), config, mesh))(*args)`. The RL state is built by
  `rl.prime.make_prime`'s init_fn into the layout `rl.prime.state_shardings` decides.
  """
  _deprecated("sharded_init", "jax.jit(init_fn, out_shardings=param_shardings(...)) or "
              "rl.prime.make_prime's init_fn")
  shapes = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(shapes, config, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(*args)


# ----------------------------------------------------------------------------------------
# Optimizer states
# ----------------------------------------------------------------------------------------

def opt_state_shardings(opt_state: PyTree, params: PyTree, mesh: Mesh,
                        param_sharding_tree: Optional[PyTree] = None,
                        config: Any = None) -> PyTree:
  """Shardings for an optax state: params-shaped leaves follow their parameter's sharding.

  A leaf of the optimizer state whose path ends with a parameter's path and has the same shape
  (Adam's mu/nu, momentum traces, ...) gets that parameter's sharding; everything else
  (step counts, scalars, schedules) is replicated.

  Args:
    opt_state: the optax state (arrays or ShapeDtypeStructs, e.g. `jax.eval_shape(opt.init, p)`).
    params: the params tree (used for paths and shapes).
    mesh: the mesh.
    param_sharding_tree: shardings of `params`; if None they are read from `params` (which must
      then be placed arrays) or computed from `config`.
  """
  if param_sharding_tree is None:
    if config is not None:
      param_sharding_tree = param_shardings(params, config, mesh)
    else:
      param_sharding_tree = jax.tree.map(lambda x: x.sharding, params)
  by_path: dict[tuple, tuple] = {}
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree_util.tree_leaves(param_sharding_tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  for (path, x), s in zip(flat_p, flat_s):
    by_path[tuple(_key_str(k) for k in path)] = (tuple(x.shape), s)
  rep = replicated(mesh)

  def pick(path, x):
    keys = tuple(_key_str(k) for k in path)
    shape = tuple(getattr(x, "shape", ()))
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def shard_opt_state(opt_state: PyTree, params: PyTree, mesh: Mesh, config: Any = None) -> PyTree:
  """Deprecated (no caller; one release): use `sharded_opt_init` (initialises straight into the
  layout) or `rl.state.init_train_state(params, optimizer, shardings)`."""
  _deprecated("shard_opt_state", "sharded_opt_init or rl.state.init_train_state(..., shardings)")
  shardings = opt_state_shardings(opt_state, params, mesh, config=config)
  return jax.tree.map(_put, opt_state, shardings)


def sharded_opt_init(optimizer: Any, params: PyTree, mesh: Mesh) -> PyTree:
  """`optimizer.init(params)` jitted straight into the sharded layout of `params`."""
  shapes = jax.eval_shape(optimizer.init, params)
  shardings = opt_state_shardings(shapes, params, mesh)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


def tree_shardings(tree: PyTree, config: Any, mesh: Mesh,
                   rules: Optional[Mapping[str, Any]] = None) -> PyTree:
  """Shardings for ANY pytree holding parameters: params, optax states, `TrainState`s, dicts of them.

  Every leaf is matched by its full path (e.g. ``opt_state/1/0/mu/layers/self_attn/q_proj/kernel``
  or ``params/embed_tokens/embedding``) and shape with the same rules as `param_shardings`; leaves
  that match no rule (step counters, scalars, norm scales) are replicated. This is what the step
  builders in `jaxrl_dense.rl.steps` take as `state_sharding`.
  """
  specs = param_specs(tree, config, mesh, rules, strict=False)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
