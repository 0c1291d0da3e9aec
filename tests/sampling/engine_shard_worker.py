"""Worker for tests/sampling/test_engine_sharding.py: the engine's row-sharded page pool on 8 CPU devices.

The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before this process imports
JAX. It records, per mesh (fsdp:8 and data:2,fsdp:2,tensor:2):

* runs: the engine on a heavy-tailed mix (greedy, n = 2, per-row limits 2..24) against the
  single-device engine: tokens, log-prob difference, per-shard rows and live widths, the
  distinct decode / prefill shapes and the programs traced (TRACE_COUNT) in a first and a
  second run, EngineStats' host syncs, and every device -> host array read counted at
  `jax.Array.__array__` (what the host actually pulled);
* programs: the decode, prefill and copy-on-write programs compiled from the engine's own
  jitted functions on a pool of 256 pages per row shard: the pool arguments' per-device
  bytes (from the compiled input shardings), how many ENTRY parameters of the partitioned HLO
  have the per-device pool shape, and every collective with its result size;
* the same programs for two CONTROL layouts, built by swapping the engine's layout helpers:
  "replicated" (the previous layout: pages replicated over data x fsdp, kv heads over tensor,
  plain GSPMD programs) and, on data:2,fsdp:2,tensor:2, "gspmd_pallas" (pages split by rows,
  the Pallas decode kernel, interpreted, called with no shard_map: XLA gathers its operands).
  The test shows its checks fail on them;
* the decode program with the per-shard Pallas kernel (interpreted) and, on
  data:2,fsdp:2,tensor:2, an engine run with it against the single-device XLA engine;
* on data:2,fsdp:2,tensor:2, multi-turn episodes with paused rows (`run_episodes`) against one
  device;
* rollout_copy: the engine on the trainer's --rollout_mesh copy (`inference.rollout_params` of
  the fsdp:8 params onto data:4,fsdp:1,tensor:2, tensor-parallel) against the single-device
  engine, with its weights' and its compiled decode program's pool bytes per device.

`--qwen7b` instead compiles the decode program with Qwen2.5-7B's KV geometry (4 kv heads of
128, pages of 16) for one 7B sampler call (64 prompts x 4 samples, 1024 + 3072 tokens) cut to
2 layers, on fsdp:8, and reports the pool's whole and per-device bytes (docs/scaling.md).

Usage: python tests/sampling/engine_shard_worker.py OUT.json [--qwen7b]
"""
from __future__ import annotations

import json
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement, inference, inspect
from jaxrl_dense.sampling.engine import EngineConfig
from jaxrl_dense.sampling.engine import engine as eng
from jaxrl_dense.sampling.engine import paged_attention as pa
from jaxrl_dense.models import ModelConfig, init_params

MESHES = ("fsdp:8", "data:2,fsdp:2,tensor:2")
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")
CFG = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                  tie_word_embeddings=False, eos_token_ids=(), pad_token_id=0)
ENGINE = EngineConfig(page_size=4, max_slots=16, steps_per_call=4, prefill_chunk=16,
                      min_prefill_bucket=8, min_decode_width=8, min_table_tokens=16)
LENGTHS = (21, 3, 9, 16, 5, 12, 7, 18)   # 8 prompts x n=2: 16 rows
LIMITS = (24, 3, 2, 5, 4, 24, 6, 2, 3, 5, 2, 4, 24, 3, 6, 2)  # heavy tail: 3 rows of 24
PALLAS_MESH = "data:2,fsdp:2,tensor:2"  # the Pallas control (and an engine run) on this mesh
ROLLOUT_MESH = "data:4,fsdp:1,tensor:2"  # --rollout_mesh: the tensor-parallel rollout copy's mesh
PAGES_PER_SHARD = 256  # compiled programs: a pool larger than any weight or activation here


# ----------------------------------------------------------------------------------------------
# Host reads
# ----------------------------------------------------------------------------------------------
class HostReads:
  """Counts device -> host array reads (`np.asarray(x)` on a jax.Array calls `__array__`)."""

  def __init__(self):
    self.count = 0
    self._cls = type(jnp.zeros(()))
    self._orig = self._cls.__array__

  def __enter__(self):
    orig = self._orig

    def counted(arr, *a, **k):
      self.count += 1
      return orig(arr, *a, **k)
    self._cls.__array__ = counted
    return self

  def __exit__(self, *exc):
    self._cls.__array__ = self._orig


# ----------------------------------------------------------------------------------------------
# Compiled programs
# ----------------------------------------------------------------------------------------------
def _dims(shape_str):
  return [int(d) for d in shape_str.split(",") if d]


def hlo_facts(text: str, local_shape) -> dict:
  """ENTRY parameters of the partitioned HLO with the per-device pool shape `local_shape` of the
  row-sharded layout, and every collective's result size."""
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  local = ",".join(map(str, local_shape))
  params = re.findall(r"=\s*\w+\[([\d,]*)\][^\n]*?\sparameter\(\d+\)", entry)
  colls = []
  for m in re.finditer(r"=\s*(\(?[^=\n]*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", text):
    shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
    colls.append({"op": m.group(2), "elements": max((math.prod(_dims(s)) for s in shapes), default=0),
                  "shapes": shapes[:4]})
  return {"entry_params_pool_shape": sum(p == local for p in params), "collectives": colls}


def _pool_bytes(pool, shardings):
  """(whole, per device) bytes of the pool leaves under the compiled input shardings."""
  leaves = jax.tree_util.tree_leaves(pool)
  shs = jax.tree_util.tree_leaves(shardings)
  assert len(leaves) == len(shs)
  whole = sum(x.size * x.dtype.itemsize for x in leaves)
  local = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shs))
  return whole, local, list(shs[0].shard_shape(leaves[0].shape))


def compile_programs(mesh, params, config, num_pages, local_shape, *, page_size=4, rows=16,
                     table_pages=4, chunk=16, steps=4, abstract=False, attention="xla",
                     programs=("decode", "prefill", "copy")) -> dict:
  """Compiles the engine's decode, prefill and copy programs on `mesh` as `_run` calls them
  (`rows` decode rows, shard-major), with a pool of `num_pages` pages in all, and reads their
  pool layout and collectives (`local_shape`: the row-sharded layout's per-device pool shape)."""
  with mesh_lib.use_mesh(mesh):
    s = eng.row_shards(mesh)
    if abstract:
      pool_sh = jax.sharding.NamedSharding(mesh, eng.pool_spec(mesh, config))
      shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
      arr = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=pool_sh)
      pool = tuple((arr, arr) for _ in range(config.num_layers))
      weights = jax.eval_shape(lambda p: eng.prepare_weights(p, config), params)
    else:
      pool = eng.init_pool(config, num_pages, page_size)
      weights = eng.prepare_weights(params, config)
    w = rows
    i32 = lambda *shape: np.zeros(shape, np.int32)
    out = {"row_shards": s}
    progs = {}
    progs["decode"] = (eng._decode.lower(
        weights, params, pool, i32(w, table_pages), i32(w), i32(w), i32(w), np.zeros((w,), bool),
        i32(w), np.full((w,), -1, np.int32), np.ones((w,), np.int32), np.full((8,), -1, np.int32),
        jax.random.PRNGKey(0),
        jnp.float32(1.0), jnp.float32(1.0), config=config, steps=steps, greedy=True, top_k=0,
        use_top_p=False, pad_id=0, attention=attention).compile(), 2)
    if "prefill" in programs:
      bp = max(s, 2)
      progs["prefill"] = (eng._prefill.lower(
          weights, params, pool, i32(bp, chunk), i32(bp), i32(bp), i32(bp, table_pages),
          config=config, attention=attention).compile(), 2)
    if "copy" in programs:
      progs["copy"] = (eng._copy_pages.lower(pool, i32(max(s, 2)), i32(max(s, 2)),
                                             config=config).compile(), 0)
    for name, (compiled, pos) in progs.items():
      whole, local, shard_shape = _pool_bytes(pool, compiled.input_shardings[0][pos])
      mem = compiled.memory_analysis()
      out[name] = {"pool_whole_bytes": int(whole), "pool_device_bytes": int(local),
                   "shard_shape": shard_shape, "expected_shard_shape": list(local_shape),
                   "argument_bytes": int(getattr(mem, "argument_size_in_bytes", -1)),
                   **hlo_facts(compiled.as_text(), local_shape)}
  return out


class PallasInterpret:
  """attention="pallas" on CPU: the engine's per-shard call runs the Pallas GPU paged-attention
  kernel in the Pallas interpreter (the program a GPU would compile, partitioned the same way)."""

  def __enter__(self):
    self.saved = (pa.pallas_platform, pa._attend_pallas)
    orig = pa._attend_pallas
    pa.pallas_platform = lambda: "gpu"
    pa._attend_pallas = lambda *a, **k: orig(*a, **{**k, "interpret": True})
    jax.clear_caches()
    return self

  def __exit__(self, *exc):
    pa.pallas_platform, pa._attend_pallas = self.saved
    jax.clear_caches()


class ControlLayout:
  """Swaps the engine's layout helpers for a control compile (restored on exit).

  "replicated": one row shard, pages replicated over data x fsdp (kv heads over tensor), plain
  GSPMD programs: the layout before the pool was split by rows.
  "gspmd": pages split by rows, but the page writes, attention and copies traced as plain
  GSPMD ops (no shard_map): with attention="pallas" the kernel is called on the row-sharded
  pool with no partitioning rule.
  """

  def __init__(self, kind):
    self.kind = kind
    self.saved = {n: getattr(eng, n) for n in ("row_shards", "_shard_axes", "_per_row_shard")}

  def __enter__(self):
    jax.clear_caches()
    eng._per_row_shard = lambda fn, in_names, out_names, config: fn
    if self.kind == "replicated":
      axes = self.saved["_shard_axes"]
      eng.row_shards = lambda mesh: 1
      eng._shard_axes = lambda mesh, config: {**axes(mesh, config), "pages": None}
    return self

  def __exit__(self, *exc):
    for n, f in self.saved.items():
      setattr(eng, n, f)
    jax.clear_caches()


# ----------------------------------------------------------------------------------------------
# Engine runs
# ----------------------------------------------------------------------------------------------
def _prompts():
  rng = np.random.default_rng(0)
  tp = max(LENGTHS)
  tokens = rng.integers(2, CFG.vocab_size, (len(LENGTHS), tp)).astype(np.int32)
  mask = np.zeros_like(tokens)
  for i, n in enumerate(LENGTHS):
    mask[i, tp - n:] = 1
  return tokens * mask, mask


def engine_run(params, mesh=None, attention="xla", rerun=True):
  tokens, mask = _prompts()
  engine = EngineConfig(**{**ENGINE.__dict__, "attention": attention})
  kw = dict(max_new_tokens=max(LIMITS), temperature=0.0, num_samples=2, engine=engine,
            max_new_per_row=np.asarray(LIMITS, np.int32))
  before = dict(eng.TRACE_COUNT)
  with HostReads() as reads:
    out, stats = eng.run(params, CFG, tokens, mask, jax.random.PRNGKey(0), mesh=mesh, **kw)
  traced = {k: eng.TRACE_COUNT[k] - before.get(k, 0) for k in ("decode", "prefill", "copy")}
  before = dict(eng.TRACE_COUNT)
  if rerun:
    eng.run(params, CFG, tokens, mask, jax.random.PRNGKey(1), mesh=mesh, **kw)  # same shapes
  retraced = {k: eng.TRACE_COUNT[k] - before.get(k, 0) for k in ("decode", "prefill", "copy")}
  return out, {
      "row_shards": stats.row_shards, "num_pages": stats.num_pages,
      "shard_rows": stats.shard_rows, "shard_live": [list(x) for x in stats.shard_live],
      "decode_shapes": sorted(set(stats.decode_shapes)),
      "prefill_shapes": sorted(set(stats.prefill_shapes)), "traced": traced,
      "retraced": retraced, "decode_calls": stats.decode_calls,
      "first_sample_calls": stats.first_sample_calls, "host_syncs": stats.host_syncs,
      "host_reads": reads.count, "pages_in_use_at_end": stats.pages_in_use_at_end,
      "widths": stats.widths}


def episodes_run(mesh) -> dict:
  """Paused-row multi-turn episodes (`run_episodes` through `multiturn.rollout_turns_paused`, the
  scripted stop-character environment of tests/rl/test_multiturn_engine.py) under `mesh` against one
  device: the rows of a turn keep their shard's pages while the host steps the environment."""
  from tests.rl import test_multiturn_engine as T  # pylint: disable=import-outside-toplevel
  from jaxrl_dense.models import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  chars = tok_lib.char_chat_tokenizer()
  params = init_params(T.CONFIG, jax.random.PRNGKey(1))
  pt, pm = T._prompts(chars, ["What is 3+4?", "Hi", "Go 12", "abc"])
  key = jax.random.PRNGKey(3)
  ref, _ = T._episodes(params, chars, pt, pm, key, paused=True)
  with mesh_lib.use_mesh(mesh):
    out, st = T._episodes(params, chars, pt, pm, key, paused=True)
  same = lambda f: bool(np.array_equal(getattr(out, f), getattr(ref, f)))
  return {"same_tokens": same("tokens"), "same_mask": same("mask"),
          "same_observation_mask": same("observation_mask"), "same_turn_ids": same("turn_ids"),
          "max_logprob_diff": float(np.abs(out.logp - ref.logp).max()),
          "num_turns": out.num_turns.tolist(), "shard_rows": list(st.shard_rows),
          "resumed_turns": st.resumed_turns, "pages_in_use_at_end": st.pages_in_use_at_end}


def rollout_copy_run(params, base):
  """The engine on the trainer's rollout copy with --rollout_mesh (inference.rollout_mesh_layout /
  rollout_params, as Trainer.rollout_params makes it): tensor-parallel weights on data:4 x
  tensor:2 over the same devices as the fsdp:8 training mesh, the pool split by rows and kv
  heads on that mesh."""
  train = mesh_lib.make_mesh("fsdp:8")
  rmesh, layout = inference.rollout_mesh_layout(CFG, train, ROLLOUT_MESH)
  copy = inference.rollout_params(placement.shard_params(params, CFG, train), CFG, rmesh, layout=layout)
  out, stats = engine_run(copy, rmesh, rerun=False)
  leaf = copy["layers"]["mlp"]["up_proj"]["kernel"]
  s = eng.row_shards(rmesh)
  with mesh_lib.use_mesh(rmesh):
    spec_ = eng.pool_spec(rmesh, CFG)
  local = list(jax.sharding.NamedSharding(rmesh, spec_).shard_shape(
      (CFG.num_kv_heads, s * PAGES_PER_SHARD, ENGINE.page_size, CFG.head_dim)))
  prog = compile_programs(rmesh, copy, CFG, s * PAGES_PER_SHARD, local, programs=("decode",))
  res = {
      "layout": layout, "mesh": dict(rmesh.shape), "row_shards": stats["row_shards"],
      "weight_spec": str(leaf.sharding.spec),
      "weight_device_bytes": int(max(inspect.addressable_bytes(copy).values())),
      "weight_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(copy))),
      "same_tokens": bool(np.array_equal(np.asarray(out.tokens), np.asarray(base.tokens))),
      "same_mask": bool(np.array_equal(np.asarray(out.mask), np.asarray(base.mask))),
      "max_logprob_diff": float(np.abs(np.asarray(out.logprobs) - np.asarray(base.logprobs)).max()),
      "pages_in_use_at_end": stats["pages_in_use_at_end"], "decode": prog["decode"]}
  print("rollout copy", json.dumps({k: v for k, v in res.items() if k != "decode"}), flush=True)
  return res


def main(out_path):
  assert jax.device_count() == 8
  params = jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim >= 2 else x,
                                  init_params(CFG, jax.random.PRNGKey(0)))
  base, base_stats = engine_run(params)
  base_stats["host_reads"] = None  # one device: np.asarray reads through the buffer protocol
  result = {"devices": jax.device_count(), "single": base_stats,
            "distinct_rows": len({tuple(r) for r in np.asarray(base.tokens).tolist()}),
            "engine": {k: getattr(ENGINE, k) for k in ENGINE.__dataclass_fields__},
            "limits": list(LIMITS), "lengths": list(LENGTHS), "runs": {}, "programs": {}}
  for spec in MESHES:
    mesh = mesh_lib.make_mesh(spec)
    sp = placement.shard_params(params, CFG, mesh)
    out, stats = engine_run(sp, mesh)
    stats["same_tokens"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(base.tokens)))
    stats["same_mask"] = bool(np.array_equal(np.asarray(out.mask), np.asarray(base.mask)))
    stats["max_logprob_diff"] = float(np.abs(np.asarray(out.logprobs) - np.asarray(base.logprobs)).max())
    s = eng.row_shards(mesh)
    total = s * PAGES_PER_SHARD
    with mesh_lib.use_mesh(mesh):
      spec_ = eng.pool_spec(mesh, CFG)
    local = list(jax.sharding.NamedSharding(mesh, spec_).shard_shape(
        (CFG.num_kv_heads, total, ENGINE.page_size, CFG.head_dim)))
    compile_ = lambda **k: compile_programs(mesh, sp, CFG, total, local, **k)
    progs = {"sharded": compile_()}
    with ControlLayout("replicated"):
      progs["replicated"] = compile_()
    with PallasInterpret():
      progs["sharded_pallas"] = compile_(attention="pallas", programs=("decode",))
      if spec == PALLAS_MESH:
        with ControlLayout("gspmd"):
          progs["gspmd_pallas"] = compile_(attention="pallas", programs=("decode",))
        # The engine end to end with the per-shard Pallas decode kernel (interpreted).
        out, _ = engine_run(sp, mesh, attention="pallas", rerun=False)
        stats["pallas_same_tokens"] = bool(np.array_equal(np.asarray(out.tokens),
                                                          np.asarray(base.tokens)))
        stats["pallas_max_logprob_diff"] = float(
            np.abs(np.asarray(out.logprobs) - np.asarray(base.logprobs)).max())
    if spec == PALLAS_MESH:
      result["episodes"] = episodes_run(mesh)
    result["programs"][spec] = progs
    result["runs"][spec] = stats
    print(spec, json.dumps({k: {n: (x["pool_device_bytes"], x["pool_whole_bytes"],
                                    x["entry_params_pool_shape"],
                                    max([c["elements"] for c in x["collectives"]] or [0]))
                                for n, x in v.items() if n != "row_shards"}
                            for k, v in progs.items()}), flush=True)
  result["rollout_copy"] = rollout_copy_run(params, base)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


def qwen7b(out_path):
  """Decode program with Qwen2.5-7B's KV geometry, 2 layers, one 7B sampler call's pool."""
  from jaxrl_dense.sampling.engine.engine import _default_num_pages
  cfg = ModelConfig(model_type="qwen2", vocab_size=1024, hidden_size=3584, intermediate_size=256,
                    num_layers=2, num_heads=28, num_kv_heads=4, head_dim=128, attention_bias=True,
                    tie_word_embeddings=False, eos_token_ids=(), pad_token_id=0, dtype="bfloat16")
  mesh = mesh_lib.make_mesh("fsdp:8")
  prompts, n, plen, new = 64, 4, 1024, 3072
  engine = EngineConfig(page_size=16, max_slots=prompts * n // 8)  # one shard's slots
  per_shard = _default_num_pages(engine, [plen] * (prompts // 8), n, new)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  shardings = rules.param_shardings(params, cfg, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                        shardings)
  total = 8 * per_shard
  with mesh_lib.use_mesh(mesh):
    spec = eng.pool_spec(mesh, cfg)
  local = list(jax.sharding.NamedSharding(mesh, spec).shard_shape((4, total, 16, 128)))
  res = compile_programs(mesh, params, cfg, total, local, page_size=16, rows=256,
                         table_pages=256, steps=8, abstract=True, programs=("decode",))["decode"]
  res = {k: v for k, v in res.items() if k != "collectives"} | {
      "pages_per_shard": per_shard, "row_shards": 8, "layers": 2, "config": "Qwen2.5-7B KV geometry",
      "max_collective_elements": max((c["elements"] for c in res["collectives"]), default=0)}
  print(json.dumps(res))
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  (qwen7b if "--qwen7b" in sys.argv[2:] else main)(sys.argv[1])
