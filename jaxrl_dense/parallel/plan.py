"""Compiled memory plans and HLO inspection: where memory and communication go on a mesh.

A program's memory and collectives are read from what XLA compiled for the mesh, not computed
by hand: each program is lowered from abstract inputs (`jax.ShapeDtypeStruct`s carrying their
shardings; no weights needed) inside the mesh context (so the model's activation constraints
apply, see `rules.with_logical_constraint`), compiled, and then

  `compiled.memory_analysis()`   per-device bytes of arguments, outputs, temporaries (XLA's
                                 buffer assignment: activations, KV cache, gathered weights)
  `compiled.as_text()`           the partitioned HLO: per-device shapes and every collective
                                 (all-gather / all-reduce / reduce-scatter / all-to-all /
                                 collective-permute) with its operand shapes and group size.

Per device, peak_bytes = argument_bytes + output_bytes + temp_bytes - alias_bytes (outputs that
reuse a donated argument's buffer are counted once). On simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) this gives the layout and sizes of a
real N-accelerator run; the temporaries of the CPU compiler are close to, not equal to, a GPU's
or TPU's (different fusion and scheduling).

Typical use (the programs of one RL step for a model shape and mesh; `rl.programs` builds them
from the production update, this module knows nothing of RL or of the models):

  mesh = sharding.make_mesh("fsdp:8")
  programs = rl.programs.rl_step_programs(config, mesh, batch_size=..., prompt_len=..., ...)
  report = plan.memory_plan(config, mesh, programs)
  report["programs"]["update"]["peak_bytes"], report["peak_bytes_per_device"]

Deprecated (one release): `rl_step_programs`, `rl_batch_shapes`, `abstract_params` and
`abstract_train_state` moved to `jaxrl_dense.rl.programs`; the old names here still resolve there,
warning.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_dense.parallel import mesh as mesh_lib, placement

PyTree = Any


class Program(NamedTuple):
  """One jitted program and abstract arguments to compile it with.

  fn: a `jax.jit`-wrapped function (anything with `.lower`).
  args: positional arguments: `jax.ShapeDtypeStruct`s with `sharding=` for arrays, None or
    Python values for the rest.
  kwargs: keyword arguments (static arguments of `fn` go here).
  """
  fn: Callable
  args: tuple
  kwargs: Mapping[str, Any] = {}


MEMORY_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes")

# Names that moved to the RL layer (one release): old name -> new module.
_MOVED = {name: "jaxrl_dense.rl.programs" for name in
          ("rl_step_programs", "rl_batch_shapes", "abstract_params", "abstract_train_state")}


def __getattr__(name: str):
  """The moved names (`_MOVED`), resolved in their new module with a DeprecationWarning."""
  if name in _MOVED:
    warnings.warn(f"jaxrl_dense.parallel.plan.{name} moved to {_MOVED[name]}.{name}; the old name "
                  "is removed in the next release.", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Abstract inputs
# ----------------------------------------------------------------------------------------------

def abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def abstract_batch(mesh: Mesh, shapes: Mapping[str, tuple]) -> dict:
  """{name: ShapeDtypeStruct} with rows over ("data", "fsdp") from {name: (shape, dtype)}."""
  out = {}
  for name, (shape, dtype) in shapes.items():
    spec = placement.batch_spec(len(shape)) if len(shape) else P()
    out[name] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))
  return out


# ----------------------------------------------------------------------------------------------
# Compile and measure
# ----------------------------------------------------------------------------------------------

def compile_program(program: Program, mesh: Optional[Mesh]) -> Any:
  """Lowers (inside the mesh context, so activation constraints apply) and compiles `program`."""
  fn, args, kwargs = program
  if mesh is None:
    return fn.lower(*args, **dict(kwargs)).compile()
  with mesh_lib.use_mesh(mesh):
    return fn.lower(*args, **dict(kwargs)).compile()


def memory_stats(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled program from `compiled.memory_analysis()` (MEMORY_KEYS)."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("memory_stats: this backend's compiled program has no memory_analysis().")
  arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
          "peak_bytes": arg + out + temp - alias}


def memory_plan(config: Any, mesh: Mesh, programs: Mapping[str, Program], *,
                compiled: Optional[dict] = None) -> dict:
  """Compiles every program for `mesh` and reports per-device memory.

  Args:
    config: the ModelConfig (its dtypes are reported).
    mesh: the mesh (real or simulated devices).
    programs: {name: Program}; e.g. `rl.programs.rl_step_programs(...)`.
    compiled: optional dict that receives {name: compiled executable} (for HLO checks or to run
      the compiled programs on real inputs without compiling again).

  Returns:
    {"mesh": {axis: size}, "param_dtype", "compute_dtype",
     "programs": {name: {"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                         "peak_bytes"}},
     "peak_bytes_per_device": max over programs of peak_bytes}
  """
  out = {}
  for name, program in programs.items():
    exe = compile_program(program, mesh)
    if compiled is not None:
      compiled[name] = exe
    out[name] = memory_stats(exe)
  return {"mesh": dict(mesh.shape), "param_dtype": getattr(config, "param_dtype", None),
          "compute_dtype": getattr(config, "dtype", None), "programs": out,
          "peak_bytes_per_device": max((p["peak_bytes"] for p in out.values()), default=0)}


def per_device_bytes(tree: PyTree) -> int:
  """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def global_bytes(tree: PyTree) -> int:
  """Bytes of the global (unsharded) arrays of a tree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------------------------
# HLO inspection
# ----------------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) +
                    r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a partitioned HLO module.

  kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or "collective-permute".
  shapes: the per-device result shapes, ((dtype, dims), ...) (several for a tuple result).
  group_size: devices per replica group (0 if not stated, e.g. a collective-permute).
  computation: the HLO computation holding it (a while body for ops inside a scan).
  name: the instruction name.
  """
  kind: str
  shapes: tuple
  group_size: int
  computation: str
  name: str

  @property
  def bytes(self) -> int:
    return sum(math.prod(d) * _BYTES[t] for t, d in self.shapes)


def hlo_text(compiled_or_text: Any) -> str:
  return compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len([t for t in m.group(1).split(",") if t])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:
    sizes = {k.strip().strip("'"): int(v) for k, v in
             (kv.split("=") for kv in m.group(1).split(",") if "=" in kv)}
    names = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
    return math.prod(sizes.get(a, 1) for a in names)
  return 0


def collectives(compiled_or_text: Any, kinds: Sequence[str] = COLLECTIVES) -> list[Collective]:
  """Every collective of a compiled (partitioned) module, in program order."""
  out = []
  comp = ""
  for line in hlo_text(compiled_or_text).splitlines():
    c = _COMP.match(line)
    if c:
      comp = c.group(1)
      continue
    m = _INSTR.match(line)
    if not m or m.group(3) not in kinds:
      continue
    shapes = tuple((t, tuple(int(d) for d in dims.split(",") if d))
                   for t, dims in _SHAPE.findall(m.group(2)))
    out.append(Collective(m.group(3), shapes, _group_size(line), comp, m.group(1)))
  return out


def array_shapes(compiled_or_text: Any, exclude: Optional[str] = None) -> set:
  """Every (dtype, dims) that appears as an instruction result in the module (per device).

  `parameter` instructions are skipped (inside a fusion, loop or call they repeat a value
  computed elsewhere; in the entry computation they are the program's arguments, see
  `memory_stats`). `exclude`: a regex; instructions whose line matches it (e.g. their
  `op_name` metadata) are skipped too.
  """
  out = set()
  skip = re.compile(exclude) if exclude else None
  for line in hlo_text(compiled_or_text).splitlines():
    if "=" not in line or _COMP.match(line) or (skip is not None and skip.search(line)):
      continue
    if re.search(r"=\s*\S+\s+parameter\(", line):
      continue
    result = line.split("=", 1)[1].strip()
    head = result.split("(", 1)[0] if not result.startswith("(") else result.split(")", 1)[0]
    for t, dims in _SHAPE.findall(head):
      out.add((t, tuple(int(d) for d in dims.split(",") if d)))
  return out


def while_bodies(compiled_or_text: Any) -> set:
  """Names of the computations that are `while` loop bodies (the scans of the program)."""
  return set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo_text(compiled_or_text)))


def has_dims(dims: Sequence[int], required: Sequence[int]) -> bool:
  """Whether `dims` contains every size of `required` (as a multiset)."""
  rest = list(dims)
  for r in required:
    if r not in rest:
      return False
    rest.remove(r)
  return True


def activation_all_reduces(compiled_or_text: Any, *, seq_lens: Sequence[int], widths: Sequence[int],
                           min_group: int = 2) -> list[Collective]:
  """All-reduces of activation-like operands: a result with a sequence length and a width.

  An all-reduce whose result has a dimension in `seq_lens` (the token lengths of the program's
  activations, e.g. T and R + 1) and a dimension in `widths` (the model width D, and the q / kv
  projection and MLP widths) over a group of at least `min_group` devices sums partial
  activations, as tensor parallelism over that width does. FSDP must show none (weights are
  gathered instead); tensor parallelism shows them over groups of the tensor axis's size.
  """
  found = []
  for c in collectives(compiled_or_text, ("all-reduce",)):
    if c.group_size and c.group_size < min_group:
      continue
    for _, dims in c.shapes:
      if any(w in dims for w in widths) and any(t in dims for t in seq_lens):
        found.append(c)
        break
  return found
