"""Worker for tests/parallel/test_kernel_sharding.py: the Pallas kernels on 8 simulated CPU devices.

The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before this process imports
JAX. For each mesh and each kernel (the Pallas GPU decode kernel, the engine's Pallas GPU paged
attention, TPU splash attention; all in the Pallas interpreter on CPU) it records:

* max |sharded - single-device reference| (the reference is the XLA / einsum path, no mesh);
* where every pallas_call sits in the traced program: inside a shard_map or not, and the shape
  of its first operand (per-shard rows and heads);
* the collectives in the compiled, partitioned HLO (a kernel run per shard needs none);
* the same facts for the kernel traced WITHOUT the shard_map wrapper (the counterfactual the
  wrapper exists for), so the test shows its checks can fail.

Usage: python tests/parallel/kernel_shard_worker.py OUT.json
"""
from __future__ import annotations

import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_dense.parallel import mesh as mesh_lib, rules
from jaxrl_dense.sampling.engine import paged_attention as pa
from jaxrl_dense.models import attention as attn

MESHES = ["data:2,fsdp:2,tensor:2", "fsdp:8", "data:4,tensor:2", "fsdp:2,tensor:4"]
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def pallas_sites(jaxpr, shard_inputs=None, out=None):
  """One entry per pallas_call in a jaxpr: whether it runs inside a shard_map and, if so, the
  per-shard shapes of that shard_map's operands (its body's inputs)."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "pallas_call":
      out.append({"in_shard_map": shard_inputs is not None, "shard_inputs": shard_inputs})
    for sub in jex_core.jaxprs_in_params(eqn.params):
      inner = ([list(v.aval.shape) for v in sub.invars] if name == "shard_map" else shard_inputs)
      pallas_sites(sub, inner, out)
  return out


def collectives(compiled_text: str) -> dict:
  return {c: len(re.findall(rf"\b{c}(-start)?\(", compiled_text)) for c in COLLECTIVES}


def place(mesh, x, names, axes):
  return jax.device_put(x, NamedSharding(mesh, P(*[axes.get(n) if n else None for n in names])))


def facts(mesh, fn, args):
  """Traced pallas sites, compiled collectives and arguments' per-device bytes of jit(fn)."""
  jitted = jax.jit(fn)
  sizes = dict(mesh.shape)
  expected = 0  # the arguments' bytes on one device, from their shardings' specs
  for x in args:
    split = 1
    for entry in x.sharding.spec:
      for a in ((entry,) if isinstance(entry, str) else (entry or ())):
        split *= sizes[a]
    expected += x.nbytes // split
  with mesh_lib.use_mesh(mesh):
    closed = jax.make_jaxpr(fn)(*args)
    compiled = jitted.lower(*args).compile()
    out = jitted(*args)
  mem = compiled.memory_analysis()
  return {"sites": pallas_sites(closed.jaxpr), "collectives": collectives(compiled.as_text()),
          "argument_bytes": int(getattr(mem, "argument_size_in_bytes", -1)),
          "expected_argument_bytes": int(expected)}, out


def main(out_path):
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  results = {}
  # Decode: B=8 rows, H=8 query heads, Hkv=4 kv heads, hd=16, cache of 64 slots.
  b, h, hkv, hd, s = 8, 8, 4, 16, 64
  q, kc, vc = f32(b, h, hd), f32(b, hkv, s, hd), f32(b, hkv, s, hd)
  start = jnp.asarray(rng.integers(0, 8, size=b), jnp.int32)
  length = jnp.asarray(rng.integers(20, s + 1, size=b), jnp.int32)
  ref_dec = attn.decode_attention(q, kc, vc, start=start, length=length, implementation="xla")
  # Paged: a pool of 1 + B * 4 pages of 16 slots, each row owning 4 shuffled pages.
  n_pages, p, pp = 1 + b * 4, 16, 4
  table = jnp.asarray(1 + rng.permutation(b * pp).reshape(b, pp), jnp.int32)
  kp, vp = f32(hkv, n_pages, p, hd), f32(hkv, n_pages, p, hd)
  lens = jnp.asarray(rng.integers(10, pp * p + 1, size=b), jnp.int32)
  ref_paged = pa.attend_xla(q[:, None], kp, vp, table, (lens - 1)[:, None])[:, 0]
  # Splash: B=8 rows of T=S=128 (its block size), H=8, Hkv=4, hd=128, right padding.
  t, hd2 = 128, 128
  q2, k2, v2 = f32(b, t, h, hd2), f32(b, t, hkv, hd2), f32(b, t, hkv, hd2)
  seg = jnp.asarray(np.arange(t)[None] < rng.integers(64, t + 1, size=(b, 1)), jnp.int32)
  ref_splash = attn.attention(q2, k2, v2, q_segment_ids=seg, kv_segment_ids=seg,
                              implementation="einsum")
  valid = np.asarray(seg, bool)[:, :, None, None]

  for spec in MESHES:
    mesh = mesh_lib.make_mesh(spec)
    res = {}
    ax = rules.kernel_axes(mesh, batch=b, num_heads=h, num_kv_heads=hkv)
    res["axes"] = {k: v if not isinstance(v, tuple) else list(v) for k, v in ax.items()}
    # -- Pallas GPU decode (interpreter) --
    args = (place(mesh, q, ("batch", "heads", None), ax),
            place(mesh, kc, ("batch", "kv_heads", None, None), ax),
            place(mesh, vc, ("batch", "kv_heads", None, None), ax),
            place(mesh, start, ("batch",), ax), place(mesh, length, ("batch",), ax))
    dec = lambda q_, k_, v_, s_, l_: attn.decode_attention(q_, k_, v_, start=s_, length=l_,
                                                           implementation="pallas")
    res["decode"], out = facts(mesh, dec, args)
    res["decode"]["max_abs_diff"] = float(jnp.max(jnp.abs(out - ref_dec)))
    raw = functools.partial(attn._decode_pallas, scale=hd ** -0.5)  # no shard_map
    res["decode_unwrapped"], _ = facts(mesh, raw, args)
    # -- engine paged attention, Pallas GPU kernel (interpreter) --
    args = (place(mesh, q, ("batch", "heads", None), ax),
            place(mesh, kp, ("kv_heads", None, None, None), ax),
            place(mesh, vp, ("kv_heads", None, None, None), ax),
            place(mesh, table, ("batch", None), ax), place(mesh, lens, ("batch",), ax))
    paged = functools.partial(pa.attend_pallas, platform="gpu", interpret=True)
    res["paged"], out = facts(mesh, paged, args)
    res["paged"]["max_abs_diff"] = float(jnp.max(jnp.abs(out - ref_paged)))
    raw = functools.partial(pa._attend_pallas, platform="gpu", interpret=True)
    res["paged_unwrapped"], _ = facts(mesh, raw, args)
    # -- TPU splash attention (interpreter) --
    args = (place(mesh, q2, ("batch", None, "heads", None), ax),
            place(mesh, k2, ("batch", None, "kv_heads", None), ax),
            place(mesh, v2, ("batch", None, "kv_heads", None), ax),
            place(mesh, seg, ("batch", None), ax))
    spl = lambda q_, k_, v_, s_: attn.attention(q_, k_, v_, q_segment_ids=s_, kv_segment_ids=s_,
                                                implementation="splash")
    res["splash"], out = facts(mesh, spl, args)
    res["splash"]["max_abs_diff"] = float(jnp.max(jnp.where(valid, jnp.abs(out - ref_splash), 0)))
    raw = functools.partial(attn._splash_attention, causal=True, window=None, softcap=None,
                            scale=hd2 ** -0.5)
    res["splash_unwrapped"], _ = facts(mesh, lambda q_, k_, v_, s_: raw(q_, k_, v_, s_, s_), args)
    results[spec] = res
    print(spec, {k: (v.get("max_abs_diff"), v["collectives"]) for k, v in res.items() if k != "axes"},
          flush=True)

  with open(out_path, "w") as f:
    json.dump({"devices": jax.device_count(), "results": results,
               "shapes": {"decode_q": [b, h, hd], "splash_q": [b, t, h, hd2], "num_kv_heads": hkv}},
              f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
