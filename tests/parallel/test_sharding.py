"""Tests of jaxrl_dense.parallel's mesh, rules, placement and inspect modules (and the deprecated
`parallel.sharding` facade that forwards their former names).

In-process tests check mesh parsing, the partition rules on real model trees (built with
`jax.eval_shape`, nothing allocated) and the error messages. The sharded == unsharded checks need
8 devices: they run tests/parallel/sharding_worker.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 so this process keeps its single CPU device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.models.transformer import init_params

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-5

QWEN_05B = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                       tie_word_embeddings=True, attention_bias=True)
QWEN_7B = ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                      tie_word_embeddings=False, attention_bias=True)


def abstract_mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), mesh_lib.AXES)


def shapes(config):
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))


def spec_of(specs, *keys):
  for k in keys:
    specs = specs[k]
  return specs


# ---------------------------------------------------------------------------------------------
# Mesh parsing
# ---------------------------------------------------------------------------------------------

def test_parse_mesh_spec_sizes_and_rest():
  assert mesh_lib.parse_mesh_spec("data:2,fsdp:4,tensor:1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert mesh_lib.parse_mesh_spec("fsdp:-1,tensor:2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert mesh_lib.parse_mesh_spec(" tensor:2 , data:-1 ", 16) == {"data": 8, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize("spec, n, words", [
    ("data:3,fsdp:1,tensor:1", 8, ["multiply to 3", "8 devices"]),
    ("data:2,fsdp:2", 8, ["multiply to 4", "8 devices"]),
    ("model:8", 8, ["unknown axis 'model'"]),
    ("data:x", 8, ["not an integer"]),
    ("data:0", 8, ["positive size"]),
    ("data:-1,fsdp:-1", 8, ["only one axis may be -1"]),
    ("data:3,fsdp:-1", 8, ["does not divide"]),
    ("data:2,data:4", 8, ["given twice"]),
    ("data2", 8, ["not 'axis:size'"]),
    ("", 8, ["expected a string"]),
])
def test_parse_mesh_spec_errors(spec, n, words):
  with pytest.raises(ValueError) as e:
    mesh_lib.parse_mesh_spec(spec, n)
  for w in words:
    assert w in str(e.value), str(e.value)


def test_make_mesh_one_device():
  mesh = mesh_lib.make_mesh("data:1,fsdp:1,tensor:1")
  assert mesh.axis_names == mesh_lib.AXES and mesh.devices.shape == (1, 1, 1)
  mesh = mesh_lib.make_mesh("data:-1", devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="multiply to 2"):
    mesh_lib.make_mesh("data:2")


# ---------------------------------------------------------------------------------------------
# Partition rules on real trees
# ---------------------------------------------------------------------------------------------

def test_rules_on_qwen_7b_tree():
  specs = rules.param_specs(shapes(QWEN_7B), QWEN_7B, abstract_mesh(data=2, fsdp=8, tensor=4))
  assert spec_of(specs, "embed_tokens", "embedding") == P("tensor", "fsdp")          # [V, D]
  assert spec_of(specs, "lm_head", "kernel") == P("fsdp", "tensor")                  # [D, V]
  attn = spec_of(specs, "layers", "self_attn")                                        # leading [L]
  assert attn["q_proj"]["kernel"] == P(None, "fsdp", "tensor")                       # [L, D, H*hd]
  assert attn["k_proj"]["kernel"] == P(None, "fsdp", "tensor")                       # [L, D, K*hd]
  assert attn["v_proj"]["bias"] == P(None, "tensor")                                 # [L, K*hd]
  assert attn["o_proj"]["kernel"] == P(None, "tensor", "fsdp")                       # [L, H*hd, D]
  mlp = spec_of(specs, "layers", "mlp")
  assert mlp["gate_proj"]["kernel"] == P(None, "fsdp", "tensor")                    # [L, D, I]
  assert mlp["up_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert mlp["down_proj"]["kernel"] == P(None, "tensor", "fsdp")                     # [L, I, D]
  assert spec_of(specs, "layers", "input_layernorm", "scale") == P(None, None)       # norms replicated
  assert spec_of(specs, "norm", "scale") == P(None)


def test_rules_on_torch_layout_and_split_heads():
  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)
  mesh = abstract_mesh(fsdp=2, tensor=2)
  # torch (out, in) layout; a DenseGeneral [D, H, hd] kernel; an unknown leaf.
  tree = {"model": {"q_proj": {"weight": np.zeros((32, 16))},
                    "k_proj": {"kernel": np.zeros((16, 2, 8))},
                    "mystery": np.zeros((5, 7))}}
  specs = rules.param_specs(tree, cfg, mesh)
  assert specs["model"]["q_proj"]["weight"] == P("tensor", "fsdp")
  assert specs["model"]["k_proj"]["kernel"] == P("fsdp", "tensor", None)
  assert specs["model"]["mystery"] == P(None, None)


def test_params_config_mismatch_is_an_error():
  params = shapes(QWEN_05B)
  with pytest.raises(ValueError, match="does not fit the config"):
    rules.param_specs(params, QWEN_05B.replace(num_kv_heads=1), abstract_mesh())
  # Non-strict (optimizer states, arbitrary trees): the odd leaf is replicated instead.
  specs = rules.param_specs(params, QWEN_05B.replace(num_kv_heads=1), abstract_mesh(), strict=False)
  assert specs["layers"]["self_attn"]["k_proj"]["kernel"] == P(None, None, None)


def test_pure_data_parallel_replicates_params():
  specs = rules.param_specs(shapes(QWEN_05B), QWEN_05B, abstract_mesh(data=8))
  assert all(s == P(*([None] * len(s))) for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)))


@pytest.mark.parametrize("mesh, words", [
    (abstract_mesh(tensor=4), ["num_kv_heads=2", "'tensor' of size 4"]),    # 14 heads, kv 2
    (abstract_mesh(fsdp=3), ["hidden_size=896", "'fsdp' of size 3"]),
    (abstract_mesh(fsdp=2, tensor=7), ["'tensor' of size 7"]),
])
def test_indivisible_dimension_errors_name_the_dimension(mesh, words):
  with pytest.raises(ValueError) as e:
    rules.param_specs(shapes(QWEN_05B), QWEN_05B, mesh)
  for w in words:
    assert w in str(e.value), str(e.value)


def test_kv_heads_must_divide_tensor():
  cfg = QWEN_05B.replace(num_heads=16, num_kv_heads=2, head_dim=56)   # heads divide 4, kv heads not
  with pytest.raises(ValueError, match="num_kv_heads=2"):
    rules.param_specs(shapes(cfg), cfg, abstract_mesh(tensor=4))


def test_opt_state_follows_params():
  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4, tie_word_embeddings=False)
  params = shapes(cfg)
  mesh = abstract_mesh(data=2, fsdp=2, tensor=2)
  pspecs = rules.param_specs(params, cfg, mesh)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = jax.eval_shape(opt.init, params)
  ospecs = rules.param_specs(state, cfg, mesh, strict=False)   # the path rules read through optax states
  adam = ospecs[1][0]
  for moment in (adam.mu, adam.nu):
    assert jax.tree.leaves(moment, is_leaf=lambda s: isinstance(s, P)) == \
        jax.tree.leaves(pspecs, is_leaf=lambda s: isinstance(s, P))
  assert adam.count == P()


def test_batch_and_kv_cache_specs():
  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4)
  mesh = abstract_mesh(data=2, fsdp=2, tensor=2)
  assert placement.batch_spec(3) == P(("data", "fsdp"), None, None)
  assert rules.kv_cache_spec((2, 8, 32, 2, 4), cfg, mesh) == P(None, ("data", "fsdp"), None, "tensor", None)
  assert rules.kv_cache_spec((8, 2, 32, 4), cfg, mesh) == P(("data", "fsdp"), "tensor", None, None)
  assert rules.kv_cache_spec((3, 2, 32, 4), cfg, mesh) == P(None, "tensor", None, None)  # 3 rows: no split
  with pytest.raises(ValueError, match="ndim=0"):
    placement.batch_spec(0)


def test_shard_batch_one_device():
  mesh = mesh_lib.make_mesh("data:1")
  out = placement.shard_batch({"x": np.ones((3, 2)), "n": np.float32(2)}, mesh)
  np.testing.assert_array_equal(np.asarray(out["x"]), np.ones((3, 2)))
  assert out["x"].sharding.spec == P(("data", "fsdp"), None) and out["n"].sharding.spec == P()


# ---------------------------------------------------------------------------------------------
# 8 simulated devices (subprocess)
# ---------------------------------------------------------------------------------------------

def run_worker(tmp_path, *args, timeout=900):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      # Tiny programs: cheaper XLA compiles, same numerics across meshes.
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), *args[:1], str(out),
                         *args[1:]], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


def check_equivalence(summary, meshes):
  assert list(summary["results"]) == meshes
  for spec, res in summary["results"].items():
    for what, diff in res["max_abs_diff"].items():
      assert diff <= TOL, f"{spec}: {what} differs from the 1x1x1 mesh by {diff}"
    assert "gen_tokens" in res["max_abs_diff"] and "policy_step" in res["max_abs_diff"]
  errors = summary["errors"]   # errors that need a multi-device mesh
  assert "batch dimension 6" in errors["batch"] and "data*fsdp=4" in errors["batch"]
  assert "multiply to 3" in errors["mesh"] and "8 devices" in errors["mesh"]
  assert "num_kv_heads=2" in errors["params"] and "'tensor' of size 8" in errors["params"]
  # The reference numbers are real (not all zeros): a loss and distinct generated tokens.
  base = summary["base_values"]
  assert 0.1 < base["prm_loss"] < 2.0 and np.isfinite(base["policy_loss"])
  assert len({tuple(r) for r in base["gen_tokens"]}) > 1
  for spec, fact in summary["facts"].items():
    sizes = mesh_lib.parse_mesh_spec(spec, 1 if spec == meshes[0] else 8)
    shards = sizes["fsdp"] * sizes["tensor"]
    total = fact["param_bytes_total"]
    expected = fact["expected_param_bytes_per_device"]   # from the specs: bytes / used mesh axes
    per_dev = list(fact["param_bytes_per_device"].values())
    assert fact["params_keep_sharding"], spec
    assert len(per_dev) == (1 if spec == meshes[0] else 8)
    for b in per_dev:
      assert b == expected, (spec, b, expected)   # measured from the arrays' addressable shards
      assert b <= 1.1 * total / shards, (spec, b, total / shards)   # ~ total / (fsdp * tensor)
    for b in fact["opt_bytes_per_device"].values():                   # Adam moments shard too
      assert b <= 1.1 * fact["opt_bytes_total"] / shards + 64, (spec, b)


def test_sharded_equals_unsharded_fast(tmp_path):
  """1x1x1 vs 2x2x2 (data, FSDP and tensor parallelism at once)."""
  meshes = ["data:1,fsdp:1,tensor:1", "data:2,fsdp:2,tensor:2"]
  summary = run_worker(tmp_path, "equivalence", "--meshes", ";".join(meshes[1:]))
  check_equivalence(summary, meshes)


@pytest.mark.slow
def test_sharded_equals_unsharded_all_meshes(tmp_path):
  """The full matrix: 1x1x1, 8x1x1, 2x4x1, 2x2x2, 1x4x2 (~75 s of CPU, mostly XLA compiles)."""
  meshes = ["data:1,fsdp:1,tensor:1", "data:8,fsdp:1,tensor:1", "data:2,fsdp:4,tensor:1",
            "data:2,fsdp:2,tensor:2", "data:1,fsdp:4,tensor:2"]
  summary = run_worker(tmp_path, "equivalence")
  check_equivalence(summary, meshes)


# ---------------------------------------------------------------------------------------------
# jax.distributed start-up (the multi-process run itself is tests/parallel/test_multiprocess.py)
# ---------------------------------------------------------------------------------------------

_DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAXRL_DISTRIBUTED")


def test_initialize_distributed_single_process_is_a_no_op(monkeypatch):
  for v in _DIST_VARS:
    monkeypatch.delenv(v, raising=False)
  assert mesh_lib.initialize_distributed() is False
  assert mesh_lib._tpu_vm_cluster() is None              # this machine is not a Cloud TPU VM
  monkeypatch.setenv("SLURM_NTASKS", "1")          # a one-task SLURM job is still one process
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert mesh_lib.initialize_distributed() is False


@pytest.mark.parametrize("env, words", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, ["JAX_NUM_PROCESSES (None)", "or none of them"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, ["must be integers"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, ["not in [0, num_processes=2)"]),
])
def test_initialize_distributed_bad_environment(monkeypatch, env, words):
  for v in _DIST_VARS:
    monkeypatch.delenv(v, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError) as e:
    mesh_lib.initialize_distributed()
  for w in words:
    assert w in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------
# The former single module: role modules and the deprecated facade
# ----------------------------------------------------------------------------------------

# Every public name of the former `parallel/sharding.py`, by the module that holds it now.
_FORMER_NAMES = {
    "mesh": ("AXES", "BATCH_AXES", "PyTree", "parse_mesh_spec", "make_mesh",
             "initialize_distributed", "current_mesh", "mesh_of", "use_mesh", "with_mesh",
             "batch_divisor"),
    "rules": ("LOGICAL_RULES", "ACTIVATION_RULES", "KV_CACHE_AXES", "logical_axes", "param_specs",
              "param_shardings", "logical_to_spec", "with_logical_constraint",
              "constrain_kv_cache", "kv_cache_spec", "kernel_axes", "shard_kernel"),
    "placement": ("replicated", "batch_spec", "batch_sharding", "device_put", "to_host",
                  "shard_batch", "constrain", "constrain_like_params", "shard_params",
                  "sharded_init", "opt_state_shardings", "shard_opt_state", "sharded_opt_init",
                  "tree_shardings"),
    "inference": ("INFERENCE_TP_RULES", "INFERENCE_LAYOUTS", "inference_shardings",
                  "inference_params", "rollout_params", "rollout_mesh_layout"),
    "inspect": ("addressable_bytes", "describe"),
}
_LAYERS = ("mesh", "rules", "placement", "inference", "inspect")


def test_former_names_are_forwarded_with_a_warning_and_are_the_same_objects():
  """`parallel.sharding` (and the older `jaxrl_dense.sharding`) still answers every former name for
  one release: it warns with the new path and returns the new module's object itself."""
  import importlib
  import warnings
  from jaxrl_dense.parallel import sharding as facade
  for module, names in _FORMER_NAMES.items():
    new = importlib.import_module(f"jaxrl_dense.parallel.{module}")
    for name in names:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = getattr(facade, name)
      assert obj is getattr(new, name), name
      msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
      assert any(f"jaxrl_dense.parallel.{module}.{name}" in m for m in msgs), (name, msgs)
  assert sorted(facade.__all__) == sorted(n for ns in _FORMER_NAMES.values() for n in ns)
  with pytest.warns(DeprecationWarning, match="jaxrl_dense.parallel.mesh.make_mesh"):
    from jaxrl_dense.parallel.sharding import make_mesh  # noqa: F401  (the from-import form)
  with pytest.warns(DeprecationWarning):
    older = importlib.import_module("jaxrl_dense.sharding")  # the module path moved before
    assert older.shard_params is placement.shard_params
  with pytest.raises(AttributeError):
    facade.no_such_name  # pylint: disable=pointless-statement


def test_patching_the_new_module_is_what_the_facade_returns(monkeypatch):
  """The facade keeps no copy: a patch of the new module is what the old name reads."""
  from jaxrl_dense.parallel import sharding as facade
  patched = lambda *a, **k: "patched"
  monkeypatch.setattr(placement, "shard_batch", patched)
  with pytest.warns(DeprecationWarning):
    assert facade.shard_batch is patched


def test_role_modules_import_only_the_ones_before_them():
  """mesh <- rules <- placement <- inference (and inspect): no module imports a later one, so
  there is no import cycle among them and the facade imports none of them at import time."""
  import ast
  parallel = os.path.join(ROOT, "jaxrl_dense", "parallel")
  for i, module in enumerate(_LAYERS + ("sharding",)):
    with open(os.path.join(parallel, module + ".py")) as f:
      tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxrl_dense.parallel"):
        rest = node.module[len("jaxrl_dense.parallel"):].lstrip(".")
        imported |= {rest} if rest else {a.name for a in node.names}
    allowed = set(_LAYERS[:i]) if module != "inspect" else {"mesh", "rules"}
    if module == "sharding":
      allowed = set()
    assert imported <= allowed, (module, imported - allowed)
