"""The Pallas kernels run per shard on a mesh, on 8 simulated CPU devices.

A `pallas_call` has no partitioning rule: called on sharded operands, XLA gathers them whole
onto every device (for the decode kernel: every layer's KV cache, every step). The kernels are
therefore wrapped in `jax.shard_map` by `rules.shard_kernel`. tests/parallel/kernel_shard_worker.py runs
the Pallas GPU decode kernel, the engine's Pallas GPU paged attention and TPU splash attention
(all three in the Pallas interpreter) under four meshes and reports values, where each
pallas_call sits, the partitioned program's collectives and the arguments' per-device bytes.
The same facts of the unwrapped kernels show the checks fail without the wrapper.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh

from jaxrl_dense.parallel import mesh as mesh_lib, rules

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERNELS = ("decode", "paged", "splash")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
  out = tmp_path_factory.mktemp("kernels") / "out.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             # cheaper XLA:CPU backend; the SPMD partitioning the tests read is unchanged
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "kernel_shard_worker.py"), str(out)],
                        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


def _split(axes, name, sizes):
  a = axes[name]
  return math.prod(sizes[x] for x in ([a] if isinstance(a, str) else (a or [])))


def test_kernel_axes_split_rows_and_whole_query_groups():
  ax = rules.kernel_axes(AbstractMesh((2, 2, 2), mesh_lib.AXES), batch=8, num_heads=8, num_kv_heads=4)
  assert ax == {"batch": ("data", "fsdp"), "heads": "tensor", "kv_heads": "tensor"}
  # 6 rows on data:2,fsdp:2 -> only data divides; kv heads 2 on tensor:4 -> heads stay whole
  # (splitting query heads alone would pair shard i's queries with another shard's keys).
  ax = rules.kernel_axes(AbstractMesh((2, 2, 4), mesh_lib.AXES), batch=6, num_heads=8, num_kv_heads=2)
  assert ax == {"batch": "data", "heads": None, "kv_heads": None}
  ax = rules.kernel_axes(AbstractMesh((1, 8, 1), mesh_lib.AXES), batch=3, num_heads=8, num_kv_heads=8)
  assert ax == {"batch": None, "heads": None, "kv_heads": None}


def test_shard_kernel_is_the_function_itself_without_a_mesh():
  f = lambda x: x
  assert rules.shard_kernel(f, (("batch",),), ("batch",), batch=2, num_heads=1, num_kv_heads=1) is f


@pytest.mark.slow
def test_pallas_kernels_run_per_shard_on_8_devices(summary):
  assert summary["devices"] == 8
  b, h, hd = summary["shapes"]["decode_q"]
  _, t, _, hd2 = summary["shapes"]["splash_q"]
  hkv = summary["shapes"]["num_kv_heads"]
  assert set(summary["results"]) == {"data:2,fsdp:2,tensor:2", "fsdp:8", "data:4,tensor:2",
                                     "fsdp:2,tensor:4"}
  for spec, res in summary["results"].items():
    sizes = mesh_lib.parse_mesh_spec(spec, 8)
    rows, heads = _split(res["axes"], "batch", sizes), _split(res["axes"], "heads", sizes)
    assert rows * heads == 8, (spec, res["axes"])  # every mesh here splits all 8 ways
    local = {"decode": [[b // rows, h // heads, hd], [b // rows, hkv // heads, 64, hd]],
             "paged": [[b // rows, h // heads, hd], [hkv // heads, 33, 16, hd]],
             "splash": [[b // rows, t, h // heads, hd2], [b // rows, t, hkv // heads, hd2]]}
    for kernel in KERNELS:
      r = res[kernel]
      assert r["max_abs_diff"] <= 1e-5, (spec, kernel, r["max_abs_diff"])
      assert r["sites"] and all(s["in_shard_map"] for s in r["sites"]), (spec, kernel)
      for shape in local[kernel]:   # the kernel sees its shard's rows and query groups
        assert all(shape in s["shard_inputs"] for s in r["sites"]), (spec, kernel, shape, r["sites"])
      assert sum(r["collectives"].values()) == 0, (spec, kernel, r["collectives"])
      assert r["argument_bytes"] == r["expected_argument_bytes"], (spec, kernel)
      # Counterfactual: the bare kernel on the same sharded operands is gathered whole.
      bare = res[kernel + "_unwrapped"]
      assert not any(s["in_shard_map"] for s in bare["sites"])
      assert bare["collectives"]["all-gather"] > 0, (spec, kernel, bare["collectives"])
