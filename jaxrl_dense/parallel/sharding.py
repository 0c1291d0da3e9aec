"""Device meshes and partition rules: data parallelism, FSDP and tensor parallelism.

Everything here rides on JAX's own SPMD runtime (`jax.jit` + `NamedSharding`): a step
function is written once for one device and `jax.jit` partitions it across the mesh from the
shardings of its inputs (GSPMD). The same code runs single-process (one host, N devices) and
multi-controller (`jax.distributed.initialize()`, one process per host) — see docs/scaling.md.

Mesh axes (always all three, in this order; size 1 switches an axis off):

  data    pure data parallelism: params replicated, batch split.
  fsdp    fully-sharded data parallelism (ZeRO-3): the batch is split over ("data", "fsdp")
          and every large parameter (and its optimizer moments) is split along its model-width
          ("embed") dimension; XLA all-gathers each weight where it is used.
  tensor  Megatron-style tensor parallelism: attention heads (q/k/v columns, o rows), MLP
          hidden units (gate/up columns, down rows) and the vocabulary are split.

Logical axes. Each parameter dimension gets a logical name from its path in the params tree
and the model config; `LOGICAL_RULES` maps logical names to mesh axes:

  vocab     -> tensor         embedding rows / LM-head columns
  embed     -> fsdp           model width d (hidden_size)
  heads     -> tensor         query heads (num_heads * head_dim, or [num_heads, head_dim])
  kv_heads  -> tensor         key/value heads
  mlp       -> tensor         SwiGLU hidden units (intermediate_size)
  head_dim, layers, norm      replicated
  batch     -> (data, fsdp)   activations, rollout batches, KV cache rows

A mesh axis of size > 1 must divide the dimension it shards; otherwise `param_shardings`
raises a ValueError naming the parameter, the dimension (e.g. ``num_kv_heads=3``) and the axis.

Activations follow `ACTIVATION_RULES` (batch -> (data, fsdp), heads / kv_heads / mlp / vocab
-> tensor, the residual width whole) through `with_logical_constraint`, which the model calls
after the embedding and in every layer, and the sampler on its KV cache. They apply while a
program is traced under a mesh (`use_mesh(mesh)` around the first call or `.lower`, or
`jax.jit(with_mesh(fn, mesh))`) and are no-ops otherwise. That is what makes `fsdp` FSDP:
rows stay on their device and each layer's weights are all-gathered inside the layer scan,
instead of GSPMD splitting the activations' width like the weights' and all-reducing them.

Typical use:

  mesh = make_mesh("data:2,fsdp:2,tensor:2")
  params = shard_params(params, config, mesh)
  opt_state = sharded_opt_init(optimizer, params, mesh)  # moments laid out like their params
  batch = shard_batch(batch, mesh)                       # leading dim over (data, fsdp)
  step = jax.jit(with_mesh(train_step, mesh))            # activation constraints + GSPMD
  rollout_params = inference_params(params, config, mesh, max_bytes=...)  # once per rollout
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical dimension name -> mesh axis (None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "batch": BATCH_AXES,
    "length": None,
}

PyTree = Any


# ----------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """Parses ``"data:2,fsdp:4,tensor:1"`` into ``{"data": 2, "fsdp": 4, "tensor": 1}``.

  Missing axes default to 1; at most one axis may be ``-1`` ("the rest of the devices").
  The sizes must multiply to `num_devices`.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"mesh spec {spec!r}: expected a string like 'data:2,fsdp:4,tensor:1'.")
  sizes: dict[str, int] = {}
  for item in spec.split(","):
    item = item.strip()
    if not item:
      continue
    name, sep, value = item.partition(":")
    name = name.strip()
    if not sep:
      raise ValueError(f"mesh spec {spec!r}: entry {item!r} is not 'axis:size'.")
    if name not in AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {AXES}.")
    if name in sizes:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice.")
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} is {value!r}, not an integer.") from None
    if size == 0 or size < -1:
      raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} is {size}; use a positive size or -1.")
    sizes[name] = size
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}.")
  for a in AXES:
    sizes.setdefault(a, 1)
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(
          f"mesh spec {spec!r}: the fixed axes multiply to {known}, which does not divide the "
          f"{num_devices} devices, so axis {rest[0]!r}=-1 has no integer size.")
    sizes[rest[0]] = num_devices // known
  sizes = {a: sizes[a] for a in AXES}
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(
        f"mesh spec {spec!r}: axis sizes {sizes} multiply to {total}, but there are "
        f"{num_devices} devices; the product must equal the device count.")
  return {a: sizes[a] for a in AXES}


def make_mesh(spec: str = "data:1,fsdp:1,tensor:1", devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A `Mesh` with axes ("data", "fsdp", "tensor") from a spec string.

  Args:
    spec: ``"data:D,fsdp:F,tensor:T"``; omitted axes are 1, one axis may be -1.
      D * F * T must equal the number of devices.
    devices: devices to use (default: all of `jax.devices()`, i.e. every process's devices in
      a multi-process run). When None, JAX's topology-aware placement is used, which puts the
      innermost (tensor) axis on the fastest interconnect.

  Returns:
    `jax.sharding.Mesh` of shape (D, F, T), Auto axis types (GSPMD propagation).
  """
  devs = list(jax.devices() if devices is None else devices)
  if not devs:
    raise ValueError("make_mesh: `devices` is empty.")
  sizes = parse_mesh_spec(spec, len(devs))
  shape = tuple(sizes[a] for a in AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  if devices is None:
    return jax.make_mesh(shape, AXES, axis_types=axis_types)
  return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES, axis_types=axis_types)


def _tpu_vm_cluster() -> Optional[str]:
  """Name of JAX's TPU cluster environment if this is a Cloud TPU VM (GCE or GKE), else None.

  Uses JAX's own detection registry (private, so any failure means "not detected"); on a
  machine that is not a TPU VM it returns without any network query.
  """
  try:
    from jax._src import clusters  # JAX's auto-detection registry (private API)
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if "tpu" in env.__name__.lower() and not env.opt_in_only_method and env.is_env_present():
        return env.__name__
  except Exception:  # noqa: BLE001
    return None
  return None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Multi-controller start-up: call once per process, before any other JAX call.

  Order of precedence:
    1. explicit arguments;
    2. environment: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
       ``JAX_PROCESS_ID`` (and JAX's own ``JAX_LOCAL_DEVICE_IDS``);
    3. JAX's cluster auto-detection when a multi-process cluster is visible: a TPU pod slice
       (``TPU_WORKER_HOSTNAMES`` lists several hosts), SLURM (``SLURM_NTASKS`` > 1), Open MPI
       (``OMPI_COMM_WORLD_SIZE`` > 1), a Cloud TPU VM (JAX's own TPU detection, which asks the
       TPU metadata server), or ``JAXRL_DISTRIBUTED=1`` for any other environment JAX
       auto-detects; `jax.distributed.initialize()` then finds everything.
  Otherwise (one process) nothing is done. CPU collectives use gloo, so the same code runs
  multi-process on CPU hosts (and in tests).

  Returns:
    True if `jax.distributed.initialize` was called.
  """
  import os
  env = os.environ
  addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  nproc = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
  explicit = [v is not None for v in (addr, nproc, pid)]
  if any(explicit) and not all(explicit):
    raise ValueError(
        "initialize_distributed: give all of coordinator_address / JAX_COORDINATOR_ADDRESS "
        f"({addr!r}), num_processes / JAX_NUM_PROCESSES ({nproc!r}) and process_id / "
        f"JAX_PROCESS_ID ({pid!r}), or none of them (auto-detection).")
  cluster = (env.get("JAXRL_DISTRIBUTED", "") == "1"
             or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
             or int(env.get("SLURM_NTASKS", "1") or 1) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
             or _tpu_vm_cluster() is not None)
  if not all(explicit) and not cluster:
    return False
  if all(explicit):
    try:
      nproc, pid = int(nproc), int(pid)
    except ValueError:
      raise ValueError(f"initialize_distributed: JAX_NUM_PROCESSES={nproc!r} and "
                       f"JAX_PROCESS_ID={pid!r} must be integers.") from None
    if not 0 <= pid < nproc:
      raise ValueError(f"initialize_distributed: process_id={pid} is not in [0, num_processes={nproc}).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(explicit):
    jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
  else:
    jax.distributed.initialize()
  return True


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


def batch_divisor(mesh: Mesh) -> int:
  """The number the global batch size must be a multiple of (data * fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


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
# Activation sharding (logical-axis constraints inside the model, as MaxText does)
# ----------------------------------------------------------------------------------------

# Logical activation axis -> mesh axes. Activations are split along the batch over
# ("data", "fsdp") and along heads / MLP units / vocabulary over "tensor"; the model width of the
# residual stream ("act_embed") stays whole, so FSDP all-gathers weights per layer instead of
# all-reducing activations (the tensor axis alone all-reduces the row-parallel o_proj/down_proj
# outputs, Megatron style).
ACTIVATION_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
}

# Logical axes of the KV cache [L, B, Hkv, S, hd] (transformer.KVCache); a per-layer cache
# [B, Hkv, S, hd] uses the last four.
KV_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


def current_mesh() -> Optional[Any]:
  """The mesh of the enclosing `use_mesh` / `jax.set_mesh` / `with_mesh` context, else None.

  Returns the (abstract) mesh JAX traces under; only its axis names and sizes are used.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  return mesh


def mesh_of(tree: PyTree) -> Optional[Mesh]:
  """The mesh of the first array of `tree` placed with a multi-device `NamedSharding`, else None."""
  for x in jax.tree_util.tree_leaves(tree):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) and s.mesh.size > 1:
      return s.mesh
  return None


def use_mesh(mesh: Mesh):
  """Context manager that makes `mesh` the context mesh (`jax.set_mesh`), outside jit.

  Programs traced (first called, or `.lower`ed) inside it get the activation and KV-cache
  constraints of `with_logical_constraint`; outside any mesh context those are no-ops, so the
  single-device code path is unchanged. The mesh is part of JAX's trace-cache key, so the same
  function traced with and without a mesh (or with two meshes) is compiled separately.
  """
  return jax.set_mesh(mesh)


def with_mesh(fn: Callable, mesh: Optional[Mesh]) -> Callable:
  """`fn` traced under `mesh`'s abstract mesh, for `jax.jit(with_mesh(fn, mesh), ...)`.

  Equivalent to calling the jitted function inside `use_mesh(mesh)`, but carried by the
  function itself, so a step builder that knows its mesh gets the activation constraints
  whoever calls it. `mesh` None returns `fn` unchanged.
  """
  if mesh is None:
    return fn
  abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)

  wrapped.__name__ = getattr(fn, "__name__", "fn")
  wrapped.__doc__ = getattr(fn, "__doc__", None)
  wrapped.__wrapped__ = fn
  return wrapped


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Any,
                    rules: Optional[Mapping[str, Any]] = None) -> P:
  """PartitionSpec of an activation with logical axis `names`, for `mesh`.

  Each named dimension goes to its mesh axis (or axes) from `rules` (default
  `ACTIVATION_RULES`) when the axis size divides the dimension; for a tuple of axes (the batch:
  ("data", "fsdp")) the longest prefix whose product divides the dimension is used, so a batch
  of 2 on data:2,fsdp:2 is split over "data" only. A mesh axis is used at most once; size-1
  axes and axes the mesh lacks are dropped. Nothing here raises for indivisible sizes: an
  activation that cannot be split stays replicated along that dimension.
  """
  rules = ACTIVATION_RULES if rules is None else rules
  sizes = dict(mesh.shape)
  used: set = set()
  entries: list = []
  for name, dim in zip(names, shape):
    axes = rules.get(name) if name is not None else None
    if axes is None:
      entries.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    chosen: list = []
    prod = 1
    for a in axes:
      size = sizes.get(a, 1)
      if a in used or size == 1:
        continue
      if dim % (prod * size):
        break
      chosen.append(a)
      prod *= size
    used.update(chosen)
    entries.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
  return P(*entries)


def with_logical_constraint(x: jax.Array, names: Sequence[Optional[str]],
                            rules: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """Constrains activation `x` (inside jit) to the sharding its logical axis `names` imply.

  The MaxText `nn.with_logical_constraint` idea without Flax's global rule context: the mesh
  comes from the enclosing `use_mesh` / `with_mesh` context and the rules from `rules`
  (default `ACTIVATION_RULES`). Without a context mesh, or on a mesh of one device, `x` is
  returned untouched, so single-device programs are unchanged.

  Args:
    x: array of rank len(names), e.g. the residual stream [B, T, D] with
      ("batch", "length", "act_embed").
    names: one logical axis name (or None) per dimension of `x`.
  """
  if len(names) != np.ndim(x):
    raise ValueError(f"with_logical_constraint: {len(names)} axis names {tuple(names)} for an "
                     f"array of shape {np.shape(x)}; give one name (or None) per dimension.")
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(names, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_kv_cache(x: jax.Array) -> jax.Array:
  """Constrains a stacked [L, B, Hkv, S, hd] or per-layer [B, Hkv, S, hd] KV-cache array.

  Rows over ("data", "fsdp"), kv heads over "tensor" (where they divide); a no-op without a
  context mesh.
  """
  if x.ndim not in (4, 5):
    raise ValueError(f"constrain_kv_cache: expected [L, B, Hkv, S, hd] or [B, Hkv, S, hd], got "
                     f"shape {x.shape}.")
  return with_logical_constraint(x, KV_CACHE_AXES[5 - x.ndim:])


def kernel_axes(mesh: Any, *, batch: int, num_heads: int, num_kv_heads: int) -> dict[str, Any]:
  """Mesh axes a custom kernel's operands split over, per logical name, on `mesh`.

  "batch" (rows) goes over the longest prefix of ("data", "fsdp") whose size divides `batch`;
  "heads" and "kv_heads" go over "tensor" only when it divides BOTH head counts, so every shard
  holds whole query groups (query head h reads kv head h // (H / Hkv): shard i of the query
  heads then reads exactly shard i of the kv heads). Anything else is replicated (None).
  """
  t = dict(mesh.shape).get("tensor", 1)
  heads = "tensor" if t > 1 and num_heads % t == 0 and num_kv_heads % t == 0 else None
  return {"batch": logical_to_spec(("batch",), (batch,), mesh)[0],  # the activations' row rule
          "heads": heads, "kv_heads": heads}


def shard_kernel(fn: Callable, in_names: Sequence[Sequence[Optional[str]]],
                 out_names: Sequence[Optional[str]], *, batch: int, num_heads: int,
                 num_kv_heads: int) -> Callable:
  """`fn` run per shard (`jax.shard_map`) over the context mesh, for custom kernels.

  A `pallas_call` (or any custom call without a partitioning rule) traced on sharded operands
  makes XLA gather them whole onto every device: a decode kernel would then copy every layer's
  KV cache to every device each step. MaxText wraps its kernels in `shard_map`; so do we: each
  device calls the kernel on its own rows and heads (`kernel_axes`), with no collective, which
  is right for attention because rows and query groups are independent.

  Args:
    fn: the kernel call, positional array arguments only (bind the rest with functools.partial).
    in_names: per positional argument, one logical name per dimension ("batch", "heads",
      "kv_heads" or None = whole on every shard).
    out_names: the output's names (a single array).
    batch / num_heads / num_kv_heads: the global sizes that decide the split.

  Without a context mesh (`use_mesh` / `with_mesh`), or on one device, returns `fn` itself, so
  single-device programs are unchanged.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return fn
  axes = kernel_axes(mesh, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads)

  def spec(names):
    return P(*[axes.get(n) if n is not None else None for n in names])

  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(n) for n in in_names),
                       out_specs=spec(out_names), check_vma=False)


# ----------------------------------------------------------------------------------------
# Logical axes of parameters
# ----------------------------------------------------------------------------------------

def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_str(k) for k in path) or "<root>"


@dataclasses.dataclass(frozen=True)
class _Rule:
  pattern: str                  # regex searched in the lower-cased "/"-joined path
  kernel: tuple                 # logical axes of the flattened 2-D weight (in, out) layout
  dims: tuple                   # config attributes giving each logical axis' expected size


# Each rule names the logical axes of a 2-D Flax kernel (in_features, out_features) and the
# config sizes of those axes. Multi-dim layouts (DenseGeneral [d, H, hd], stacked layers
# [L, ...], torch-style (out, in)) are resolved by `_match_dims` from the leaf's shape.
_RULES: tuple[_Rule, ...] = (
    _Rule(r"(^|/)(q_proj|wq|query|q)(/|$)", ("embed", "heads"), ("hidden_size", "q_width")),
    _Rule(r"(^|/)(k_proj|wk|key|k)(/|$)", ("embed", "kv_heads"), ("hidden_size", "kv_width")),
    _Rule(r"(^|/)(v_proj|wv|value|v)(/|$)", ("embed", "kv_heads"), ("hidden_size", "kv_width")),
    _Rule(r"(^|/)(o_proj|wo|out|out_proj|o)(/|$)", ("heads", "embed"), ("q_width", "hidden_size")),
    _Rule(r"(^|/)(gate_proj|up_proj|w1|w3|wi|wi_0|wi_1|gate|up)(/|$)", ("embed", "mlp"),
          ("hidden_size", "intermediate_size")),
    _Rule(r"(^|/)(down_proj|w2|down)(/|$)", ("mlp", "embed"), ("intermediate_size", "hidden_size")),
    _Rule(r"(^|/)(lm_head|output|unembed)(/|$)", ("embed", "vocab"), ("hidden_size", "vocab_size")),
    _Rule(r"(embed_tokens|embedding|embed|wte|tok_emb)", ("vocab", "embed"), ("vocab_size", "hidden_size")),
)

_NORM_PATTERN = re.compile(r"(norm|ln_|layernorm|rmsnorm|(^|/)scale$)")


def _config_dims(config: Any) -> dict[str, int]:
  get = lambda n, d=None: getattr(config, n, d)
  hidden = int(get("hidden_size"))
  heads = int(get("num_heads"))
  kv = int(get("num_kv_heads", heads) or heads)
  head_dim = int(get("head_dim", None) or hidden // heads)
  return {
      "hidden_size": hidden,
      "num_heads": heads,
      "num_kv_heads": kv,
      "head_dim": head_dim,
      "q_width": heads * head_dim,
      "kv_width": kv * head_dim,
      "intermediate_size": int(get("intermediate_size")),
      "vocab_size": int(get("vocab_size")),
      "num_layers": int(get("num_layers", 0) or 0),
  }


# Logical axis -> (config attribute whose divisibility tensor/fsdp must respect).
_DIVISIBILITY_NAME = {
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "mlp": "intermediate_size",
    "vocab": "vocab_size",
    "embed": "hidden_size",
}


def _expand(axis: str, size_name: str, cfg: dict[str, int]) -> list[list[tuple[str, int]]]:
  """Alternative per-dimension layouts of one logical 2-D axis (flat or split heads)."""
  size = cfg[size_name]
  alts = [[(axis, size)]]
  if axis == "heads":
    alts.append([("heads", cfg["num_heads"]), ("head_dim", cfg["head_dim"])])
  elif axis == "kv_heads":
    alts.append([("kv_heads", cfg["num_kv_heads"]), ("head_dim", cfg["head_dim"])])
  return alts


def _match_dims(shape: tuple, rule: _Rule, cfg: dict[str, int], is_bias: bool) -> Optional[tuple]:
  """Logical names for each dim of `shape` under `rule`, or None if the shape doesn't fit.

  Tries the Flax (in, out) layout first, then torch's (out, in); for biases only the output
  axis; a single extra leading dim of size num_layers is a stacked-layers ("layers") dim.
  """
  (a_in, a_out), (n_in, n_out) = rule.kernel, rule.dims
  candidates: list[list[str]] = []
  if is_bias:
    for alt in _expand(a_out, n_out, cfg):
      candidates.append(alt)
  else:
    for first, second in ((0, 1), (1, 0)):   # (in, out) then (out, in)
      axes = [(a_in, n_in), (a_out, n_out)]
      order = [axes[first], axes[second]]
      for alt0 in _expand(*order[0], cfg):
        for alt1 in _expand(*order[1], cfg):
          candidates.append(alt0 + alt1)
  for cand in candidates:
    for lead in ((), ("layers",)):
      if len(shape) != len(cand) + len(lead):
        continue
      if lead and cfg["num_layers"] and shape[0] != cfg["num_layers"]:
        continue
      body = shape[len(lead):]
      if all(d == s for d, (_, s) in zip(body, cand)):
        return tuple(lead) + tuple(n for n, _ in cand)
  return None


def _lora_axes(parent: str, leaf: str, shape: tuple, cfg: dict[str, int]) -> tuple:
  """LoRA factors of the linear layer at `parent`: lora_a [.., in, r] takes the base kernel's
  input axis, lora_b [.., r, out] its output axis; the rank r (and a leading layers dim) stay
  replicated."""
  for rule in _RULES:
    if re.search(rule.pattern, parent):
      (a_in, a_out), (n_in, n_out) = rule.kernel, rule.dims
      axis, size, pos = (a_in, n_in, -2) if leaf == "lora_a" else (a_out, n_out, -1)
      if len(shape) >= 2 and shape[pos] == cfg[size]:
        names = [None] * len(shape)
        names[pos] = axis
        return tuple(names)
  return (None,) * len(shape)


def logical_axes(path: Union[str, Sequence[Any]], shape: Sequence[int], config: Any, *,
                 strict: bool = False) -> tuple:
  """Logical axis name (or None) of every dimension of the parameter at `path`.

  Matching is by path pattern (q_proj/k_proj/v_proj/o_proj, gate/up/down_proj, embed_tokens,
  lm_head, *norm*) and confirmed by shape against the config, so both Flax (in, out) and torch
  (out, in) layouts, split-head DenseGeneral kernels and stacked layer dims are recognised.
  Norm scales and unknown leaves are replicated (all None). With `strict`, a leaf whose path
  names a known weight (q_proj, embed_tokens, ...) but whose shape fits no layout of the config
  raises a ValueError (a params/config mismatch) instead of being replicated.
  """
  pstr = (path if isinstance(path, str) else _path_str(path)).lower()
  shape = tuple(int(s) for s in shape)
  cfg = _config_dims(config)
  leaf = pstr.rsplit("/", 1)[-1]
  is_bias = leaf in ("bias", "b")
  parent = pstr.rsplit("/", 1)[0] if "/" in pstr else ""
  if leaf in ("lora_a", "lora_b"):  # LoRA factors shard like their base matrix (models/lora.py)
    return _lora_axes(parent, leaf, shape, cfg)
  if _NORM_PATTERN.search(pstr) and not re.search(r"proj|embed|lm_head", parent):
    return (None,) * len(shape)
  matched = []
  for rule in _RULES:
    if re.search(rule.pattern, pstr):
      names = _match_dims(shape, rule, cfg, is_bias)
      if names is not None:
        return tuple(None if n in ("head_dim", "layers") else n for n in names)
      matched.append(rule)
  if strict and matched and len(shape) >= 1:
    r = matched[0]
    want = " or ".join(f"{n}={cfg[n]}" for n in r.dims)
    raise ValueError(
        f"Parameter {pstr} has shape {shape}, which does not fit the config: a "
        f"{'bias' if is_bias else 'weight'} named like this needs dimensions ({want}) "
        f"(optionally a leading num_layers dim). Is `config` the model these params belong to?")
  return (None,) * len(shape)


def _spec_for(path_s: str, shape: tuple, names: tuple, sizes: dict[str, int], cfg: dict[str, int],
              rules: Mapping[str, Any]) -> P:
  used: set = set()
  entries = []
  for dim, (n, s) in enumerate(zip(names, shape)):
    axis = rules.get(n) if n is not None else None
    if axis is None or isinstance(axis, tuple) or sizes.get(axis, 1) == 1 or axis in used:
      entries.append(None)
      continue
    if s % sizes[axis]:
      what = _DIVISIBILITY_NAME.get(n, n)
      raise ValueError(
          f"Cannot shard parameter {path_s} (shape {shape}) dimension {dim} ({n}, "
          f"{what}={cfg.get(what, s)}) over mesh axis '{axis}' of size {sizes[axis]}: "
          f"{sizes[axis]} does not divide {s}. Pick a '{axis}' size that divides {what}.")
    if n in ("heads", "kv_heads"):
      heads = cfg["num_heads" if n == "heads" else "num_kv_heads"]
      if heads % sizes[axis]:
        raise ValueError(
            f"Cannot shard parameter {path_s} over mesh axis '{axis}' of size {sizes[axis]}: "
            f"it does not divide {_DIVISIBILITY_NAME[n]}={heads} (whole heads per device).")
    used.add(axis)
    entries.append(axis)
  return P(*entries)


def param_specs(params: PyTree, config: Any, mesh: Mesh,
                rules: Optional[Mapping[str, Any]] = None, *, strict: bool = True) -> PyTree:
  """PartitionSpec of every parameter (same tree structure as `params`).

  `params` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`); `mesh` may
  be a `Mesh` or an `AbstractMesh` (only its axis sizes are read).
  Raises ValueError naming the parameter and dimension if an axis size does not divide it, and
  (with `strict`, the default) if a known weight's shape does not fit `config`.
  """
  rules = dict(LOGICAL_RULES if rules is None else rules)
  sizes = dict(mesh.shape)
  cfg = _config_dims(config)

  def spec(path, x):
    shape = tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)
    names = logical_axes(path, shape, config, strict=strict)
    return _spec_for(_path_str(path), shape, names, sizes, cfg, rules)

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: PyTree, config: Any, mesh: Mesh,
                    rules: Optional[Mapping[str, Any]] = None) -> PyTree:
  """`NamedSharding` of every parameter under the FSDP + tensor-parallel rules."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, config, mesh, rules),
                      is_leaf=lambda s: isinstance(s, P))


def shard_params(params: PyTree, config: Any, mesh: Mesh,
                 rules: Optional[Mapping[str, Any]] = None) -> PyTree:
  """Places `params` on `mesh` with `param_shardings` (works across processes too)."""
  shardings = param_shardings(params, config, mesh, rules)
  return jax.tree.map(_put, params, shardings)


def _deprecated(name: str, instead: str) -> None:
  import warnings  # pylint: disable=import-outside-toplevel
  warnings.warn(f"jaxrl_dense.sharding.{name} is deprecated (no caller in the library) and goes in "
                f"the next release; use {instead}", DeprecationWarning, stacklevel=3)


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


# ----------------------------------------------------------------------------------------
# Inference layout (the rollout)
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------

def kv_cache_spec(shape: Sequence[int], config: Any, mesh: Mesh) -> P:
  """PartitionSpec of one KV-cache array.

  Recognised layouts (B = batch, S = cache length, K = num_kv_heads, Dh = head_dim, L = layers):
  `[B, S, K, Dh]`, `[B, K, S, Dh]`, `[L, B, S, K, Dh]`, `[L, B, K, S, Dh]`. Batch goes over
  ("data", "fsdp") when divisible, kv heads over "tensor" when divisible; anything else
  (e.g. an integer cache index) is replicated.
  """
  cfg = _config_dims(config)
  sizes = dict(mesh.shape)
  shape = tuple(int(s) for s in shape)
  entries: list = [None] * len(shape)
  if len(shape) in (4, 5):
    off = len(shape) - 4
    k_dim = None
    if shape[-1] == cfg["head_dim"]:
      if shape[off + 2] == cfg["num_kv_heads"]:
        k_dim = off + 2
      elif shape[off + 1] == cfg["num_kv_heads"]:
        k_dim = off + 1
    if k_dim is not None:
      if shape[off] % (sizes["data"] * sizes["fsdp"]) == 0:
        entries[off] = BATCH_AXES
      if sizes["tensor"] > 1 and cfg["num_kv_heads"] % sizes["tensor"] == 0:
        entries[k_dim] = "tensor"
  return P(*entries)


# ----------------------------------------------------------------------------------------
# Introspection
# ----------------------------------------------------------------------------------------

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
