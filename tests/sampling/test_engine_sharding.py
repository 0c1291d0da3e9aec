"""The engine's page pool is split by rows and kv heads, on 8 CPU devices.

Under a mesh with S = data x fsdp row shards the continuous engine keeps one host PagePool per
shard and one block of the device pool per shard ([Hkv, S * N, P, hd], pages over data x fsdp,
kv heads over tensor); a prompt and its n samples live on one shard, block tables hold
shard-local page ids, and page writes, paged attention and copy-on-write run per shard inside
`jax.shard_map`. tests/sampling/engine_shard_worker.py runs the engine on fsdp:8 and
data:2,fsdp:2,tensor:2 against one device and compiles its decode / prefill / copy programs
with the row-sharded layout and with two control layouts (the previous replicated pool; pages
split by rows with the Pallas decode kernel, interpreted, outside any shard_map), and runs it
on the trainer's tensor-parallel rollout copy (--rollout_mesh=data:4,fsdp:1,tensor:2). Each
pool check below is shown to fail on a control.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxrl_dense.parallel import mesh as mesh_lib
from jaxrl_dense.sampling.engine import engine as eng
from jaxrl_dense.sampling.engine.page_table import pages_for
from jaxrl_dense.models import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MESHES = ("fsdp:8", "data:2,fsdp:2,tensor:2")
PROGRAMS = ("decode", "prefill", "copy")
CFG = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
  out = tmp_path_factory.mktemp("engine_pool") / "out.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "engine_shard_worker.py"), str(out)],
                        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


def test_pool_spec_splits_pages_over_row_axes_and_kv_heads_over_tensor():
  m = AbstractMesh((2, 2, 2), mesh_lib.AXES)
  assert eng.row_shards(m) == 4 and eng.row_shards(None) == 1
  assert eng.pool_spec(m, CFG) == P("tensor", ("data", "fsdp"), None, None)
  assert eng.pool_spec(AbstractMesh((1, 8, 1), mesh_lib.AXES), CFG) == P(None, "fsdp", None, None)
  # 2 kv heads cannot split 4 ways: heads stay whole, pages still split by rows.
  assert eng.pool_spec(AbstractMesh((2, 1, 4), mesh_lib.AXES), CFG) == P(None, "data", None, None)


def test_7b_call_pool_per_device_figures():
  """The README's 7B figures (one --generate_batch_size=64 call: 64 prompts x 4 samples of
  1024 + 3072 tokens, pages of 16, Qwen2.5-Math-7B's 4 kv heads of 128, 28 layers, bf16): the
  engine's default pool per row shard on fsdp:8 is 59.7 GiB in all and 7.5 GiB per device under
  `pool_spec` (the compiled programs' 1/8 is checked above on the tiny model; the replicated
  layout, the control, kept the whole pool on each device)."""
  from jaxrl_dense.sampling.engine import EngineConfig
  from jaxrl_dense.rl import plan as plan_lib
  mc = ModelConfig.from_hf_dict(plan_lib.ARCH_PRESETS["qwen2.5-math-7b"])
  assert (mc.num_kv_heads, mc.head_dim, mc.num_layers) == (4, 128, 28)
  prompts, n, plen, new, s = 64, 4, 1024, 3072, 8
  per_shard = eng._default_num_pages(EngineConfig(page_size=16, max_slots=prompts * n // s),
                                     [plen] * (prompts // s), n, new)
  shape = (mc.num_kv_heads, s * per_shard, 16, mc.head_dim)
  mesh = AbstractMesh((1, 8, 1), mesh_lib.AXES)
  local = jax.sharding.NamedSharding(mesh, eng.pool_spec(mesh, mc)).shard_shape(shape)
  layer = 2 * 2   # k and v, bfloat16
  whole, device = (layer * mc.num_layers * math.prod(x) / 2**30 for x in (shape, local))
  assert round(whole, 1) == 59.7 and round(device, 1) == 7.5, (whole, device)
  assert device * 8 == whole


def _pool_check(prog, k):
  """Per-device pool = whole / k, and the partitioned HLO's ENTRY holds the 2L pool arrays in
  the row-sharded per-device shape."""
  return (prog["pool_device_bytes"] * k == prog["pool_whole_bytes"]
          and prog["entry_params_pool_shape"] == 2 * CFG.num_layers)


def _pool_sized_collectives(prog):
  """Collectives moving at least one per-device pool array's elements."""
  size = math.prod(prog["expected_shard_shape"])
  return [c for c in prog["collectives"] if c["elements"] >= size]


@pytest.mark.slow
def test_sharded_engine_equals_one_device(summary):
  assert summary["devices"] == 8 and summary["distinct_rows"] > 4
  for spec in MESHES:
    run = summary["runs"][spec]
    sizes = mesh_lib.parse_mesh_spec(spec, 8)
    s = sizes["data"] * sizes["fsdp"]
    assert run["same_tokens"] and run["same_mask"], spec   # greedy: exact tokens
    assert run["max_logprob_diff"] < 1e-4, (spec, run["max_logprob_diff"])
    assert run["row_shards"] == s and run["num_pages"] % s == 0
    assert run["pages_in_use_at_end"] == 0
    # A prompt's 2 samples share a shard; 8 prompts spread evenly over the shards.
    assert sum(run["shard_rows"]) == len(summary["limits"])
    assert all(r % 2 == 0 for r in run["shard_rows"]) and max(run["shard_rows"]) - min(run["shard_rows"]) <= 2
    # The decode width is S x the per-shard width (a power of two over the fullest shard).
    for width, live in zip(run["widths"], run["shard_live"]):
      assert len(live) == s and width % s == 0 and width // s >= max(live)


@pytest.mark.slow
def test_pool_is_one_kth_per_device_with_no_pool_collectives(summary):
  for spec in MESHES:
    progs = summary["programs"][spec]
    for name in PROGRAMS:
      prog = progs["sharded"][name]
      assert _pool_check(prog, 8), (spec, name, prog["pool_device_bytes"], prog["pool_whole_bytes"])
      assert not _pool_sized_collectives(prog), (spec, name, _pool_sized_collectives(prog))
      # Control: the previous layout (pages replicated over data x fsdp) fails the memory check.
      ctl = progs["replicated"][name]
      assert ctl["pool_whole_bytes"] == prog["pool_whole_bytes"] and not _pool_check(ctl, 8), (spec, name)
    # The Pallas decode kernel (interpreted, as a GPU compiles it) inside the engine's shard_map
    # reads only its shard's pages ...
    prog = progs["sharded_pallas"]["decode"]
    assert _pool_check(prog, 8) and not _pool_sized_collectives(prog), (spec, _pool_sized_collectives(prog))
  # ... Control: the same kernel on the row-sharded pool without the shard_map gathers it. (On
  # fsdp:8 GSPMD instead partitions the interpreted kernel's page gathers, with global ids.)
  ctl = summary["programs"]["data:2,fsdp:2,tensor:2"]["gspmd_pallas"]["decode"]
  assert any(c["op"] in ("all-gather", "all-to-all") for c in _pool_sized_collectives(ctl))
  run = summary["runs"]["data:2,fsdp:2,tensor:2"]   # and the engine with it equals one device
  assert run["pallas_same_tokens"] and run["pallas_max_logprob_diff"] < 1e-4, run


@pytest.mark.slow
def test_engine_on_the_tensor_parallel_rollout_copy_equals_one_device(summary):
  """--rollout_mesh=data:4,fsdp:1,tensor:2 over fsdp:8's devices: the engine on the trainer's
  rollout copy (tensor-parallel weights, pool split by rows and kv heads on that mesh) gives the
  single-device engine's greedy tokens, with 1/2 of the weights and 1/8 of the pool per device."""
  r = summary["rollout_copy"]
  assert r["layout"] == "tensor" and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert r["weight_spec"].endswith("(None, None, 'tensor')"), r["weight_spec"]   # MLP units split
  assert r["weight_device_bytes"] < 0.55 * r["weight_bytes"], r
  assert r["row_shards"] == 4 and r["pages_in_use_at_end"] == 0
  assert r["same_tokens"] and r["same_mask"] and r["max_logprob_diff"] < 1e-4, r
  assert _pool_check(r["decode"], 8) and not _pool_sized_collectives(r["decode"]), r["decode"]


def _pow2_range(lo, hi):
  return {1 << i for i in range(max(lo, 1).bit_length() - 1, hi.bit_length()) if lo <= 1 << i <= hi}


@pytest.mark.slow
def test_compiles_bucketed_and_host_round_trips_bounded(summary):
  """A heavy-tailed length mix: decode programs <= (pow2 widths per shard) x (pow2 spans + the
  cap), prefill programs <= chunk buckets x pow2 prompts per shard x pow2 spans; a second run
  compiles nothing; one host round trip per K decode steps plus one per admission wave."""
  e = summary["engine"]
  k, p = e["steps_per_call"], e["page_size"]
  limits, lengths = summary["limits"], summary["lengths"]
  rows = len(limits)
  max_pp = max(pages_for(lengths[r // 2] + limits[r] - 1, p) for r in range(rows))
  for name in ("single",) + MESHES:
    run = summary["single"] if name == "single" else summary["runs"][name]
    s = run["row_shards"]
    slots = -(-e["max_slots"] // s)
    widths = {s * w for w in _pow2_range(-(-e["min_decode_width"] // s), slots)}
    spans = _pow2_range(pages_for(e["min_table_tokens"], p), max_pp) | {max_pp}
    decode = {tuple(x) for x in run["decode_shapes"]}
    assert all(w in widths and pp in spans for w, pp in decode), (name, decode)
    assert run["traced"]["decode"] == len(decode) <= len(widths) * len(spans), (name, run["traced"])
    chunks = _pow2_range(e["min_prefill_bucket"], e["prefill_chunk"])
    prefill = {tuple(x) for x in run["prefill_shapes"]}
    bps = {s * b for b in _pow2_range(1, len(lengths))}
    pps = _pow2_range(1, pages_for(max(lengths), p) * 2)
    assert all(b in bps and c in chunks and pp in pps for b, c, pp in prefill), (name, prefill)
    assert run["traced"]["prefill"] == len(prefill) <= len(chunks) * len(bps) * len(pps)
    assert run["traced"]["copy"] <= 1 and not any(run["retraced"].values()), (name, run["retraced"])
    # Host round trips: every decode call runs K steps; all 16 rows fit one admission wave.
    assert run["first_sample_calls"] == 1
    assert run["decode_calls"] == -(-(max(limits) - 1) // k), (name, run["decode_calls"])
    assert run["host_syncs"] == run["decode_calls"] + run["first_sample_calls"]
    if run["host_reads"] is not None:  # measured: 4 arrays per decode call, 3 per admission wave
      assert run["host_reads"] == 4 * run["decode_calls"] + 3 * run["first_sample_calls"], name


@pytest.mark.slow
def test_paused_episodes_on_a_mesh_equal_one_device(summary):
  """Multi-turn episodes whose rows pause at stop strings, keep their pages on their row shard
  while the host steps the environment, and resume in place (data:2,fsdp:2,tensor:2) give the
  single-device episodes token by token."""
  ep = summary["episodes"]
  assert ep["same_tokens"] and ep["same_mask"] and ep["same_observation_mask"] and ep["same_turn_ids"]
  assert ep["max_logprob_diff"] < 1e-4
  assert max(ep["num_turns"]) >= 3 and ep["resumed_turns"] > 0
  assert sum(1 for r in ep["shard_rows"] if r) == 4  # 4 prompts on the 4 row shards
  assert ep["pages_in_use_at_end"] == 0
