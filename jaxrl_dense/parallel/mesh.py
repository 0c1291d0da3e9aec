"""Device meshes: the three axes, building a mesh, multi-process start-up, the context mesh.

Everything in `jaxrl_dense.parallel` rides on JAX's own SPMD runtime (`jax.jit` +
`NamedSharding`): a step function is written once for one device and `jax.jit` partitions it
across the mesh from the shardings of its inputs (GSPMD). The same code runs single-process (one
host, N devices) and multi-controller (`initialize_distributed()`, one process per host) — see
docs/scaling.md.

Mesh axes (always all three, in this order; size 1 switches an axis off):

  data    pure data parallelism: params replicated, batch split.
  fsdp    fully-sharded data parallelism (ZeRO-3): the batch is split over ("data", "fsdp")
          and every large parameter (and its optimizer moments) is split along its model-width
          ("embed") dimension; XLA all-gathers each weight where it is used.
  tensor  Megatron-style tensor parallelism: attention heads (q/k/v columns, o rows), MLP
          hidden units (gate/up columns, down rows) and the vocabulary are split.

The context mesh (`use_mesh(mesh)` around the first call or `.lower`, or
`jax.jit(with_mesh(fn, mesh))`) is what turns on the activation constraints of
`jaxrl_dense.parallel.rules`; outside it they are no-ops.

Sibling modules: `rules` (logical axes -> PartitionSpecs), `placement` (putting arrays on the
mesh), `inference` (the rollout's copy of the weights), `inspect` (bytes per device, layouts).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PyTree = Any


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


def batch_divisor(mesh: Mesh) -> int:
  """The number the global batch size must be a multiple of (data * fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


# ----------------------------------------------------------------------------------------
# Context mesh
# ----------------------------------------------------------------------------------------

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
