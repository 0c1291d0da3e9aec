"""Partition rules: the logical axis of each parameter and activation dimension, and its mesh axes.

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
program is traced under a mesh (`mesh.use_mesh(mesh)` around the first call or `.lower`, or
`jax.jit(mesh.with_mesh(fn, mesh))`) and are no-ops otherwise. That is what makes `fsdp` FSDP:
rows stay on their device and each layer's weights are all-gathered inside the layer scan,
instead of GSPMD splitting the activations' width like the weights' and all-reducing them.
Custom kernels run per shard through `shard_kernel` (`jax.shard_map` over the context mesh).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_dense.parallel.mesh import BATCH_AXES, PyTree, current_mesh

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
