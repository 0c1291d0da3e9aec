"""Where memory and communication go: the RL step's programs compiled on 8 simulated devices.

tests/parallel/layout_worker.py (a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8)
compiles generate, scoring, PRM update and policy update (the stages of the production update,
`rl.prime.make_stages`) and the whole update (`make_prime`'s update_fn) of a tiny Qwen2-shaped
model on the meshes data:8, fsdp:8 and data:2,fsdp:2,tensor:2 (and a 1-device baseline) with
`rl.programs.rl_step_programs` + `memory_plan`, runs the compiled programs on the same inputs
and hands back the memory plans, the partitioned HLO and the values. The checks read what XLA
compiled (per-device shapes, collectives, `memory_analysis()`), not what the code intends:

  * inputs: per-device argument bytes are the sharded sizes (batch 1/(data*fsdp), weights
    1/(fsdp*tensor) in the training layout);
  * KV cache and activations: per-device shapes hold 1/(data*fsdp) of the rows (and 1/tensor
    of the kv heads), and no full-batch activation or cache exists on any device;
  * FSDP: weights are all-gathered one layer at a time inside the layer scan, and no all-reduce
    of [rows, T, D] activations exists on fsdp:8 (tensor parallelism's all-reduces span the
    tensor axis only);
  * values equal the 1-device run (the whole update's params to UPDATE_TOL).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement, inference
from jaxrl_dense.parallel import plan as plan_lib
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.models.transformer import init_params

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE = "data:1"
MESHES = ["data:8", "fsdp:8", "data:2,fsdp:2,tensor:2"]
TRAIN_PROGRAMS = ("scoring", "prm_update", "policy_update")
TOL = 1e-5
UPDATE_TOL = 1e-4  # params after the whole update (test_whole_update_values_match_the_unsharded_run)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  out = tmp_path_factory.mktemp("layout")
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "layout_worker.py"), str(out), BASE,
                         *MESHES], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((out / "out.json").read_text())

  def hlo(spec, program):
    return (out / spec / (program + ".hlo")).read_text()

  return summary, hlo


def dims(summary):
  c, s = summary["config"], summary["sizes"]
  t = s["prompt_len"] + s["response_len"]
  return dict(D=c["hidden_size"], I=c["intermediate_size"], K=c["num_kv_heads"], hd=c["head_dim"],
              T=t, R1=s["response_len"] + 1, S=t, BN=s["batch_size"], MB=s["micro_batch_size"],
              L=c["num_layers"], widths=(c["hidden_size"], c["intermediate_size"],
                                         c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]))


def split(spec):
  sizes = mesh_lib.parse_mesh_spec(spec, 8 if spec != BASE else 1)
  return sizes["data"] * sizes["fsdp"], sizes["tensor"], sizes


# ---------------------------------------------------------------------------------------------
# 8 simulated devices
# ---------------------------------------------------------------------------------------------

def test_values_equal_the_unsharded_run(layout):
  summary, _ = layout
  res = summary["meshes"]
  base = res[BASE]
  assert len({tuple(r) for r in base["gen_tokens"]}) > 1            # real samples, not constants
  assert base["value_norms"]["policy_params"] > 0 and base["value_norms"]["score_old_logp"] > 0
  for spec in MESHES:
    assert res[spec]["gen_tokens"] == base["gen_tokens"], spec
    for what, diff in res[spec]["values_diff"].items():
      assert diff <= TOL, f"{spec}: {what} differs from the 1-device run by {diff}"


def test_whole_update_values_match_the_unsharded_run(layout):
  """The production update (`make_prime`'s update_fn, as the plan compiles it) on each mesh gives
  the 1-device run's metrics to TOL and its params to UPDATE_TOL: one AdamW step at lr 1e-3 moves
  a weight by about lr * g / |g|, so the device-order rounding of a near-zero gradient entry
  (after the PRM update, the re-scoring and PRIME's batch-normalised rewards) shows at ~lr / 20."""
  summary, _ = layout
  for spec in MESHES:
    diffs = summary["meshes"][spec]["update_values_diff"]
    assert diffs["metrics"] <= TOL, (spec, diffs)
    for what in ("policy_params", "prm_params"):
      assert diffs[what] <= UPDATE_TOL, f"{spec}: the update's {what} differ by {diffs[what]}"


def test_input_bytes_per_device_are_the_shards(layout):
  summary, _ = layout
  for spec in MESHES:
    rows, tensor, sizes = split(spec)
    weight_split = sizes["fsdp"] * tensor
    for name, stats in summary["meshes"][spec]["plan"]["programs"].items():
      # norm scales, biases of 2 KV heads, step counters: replicated, < 8 KiB in all for one
      # TrainState; the whole update's state holds two TrainStates and the reference (7 param trees, not 3)
      small = 8 * 1024 * (3 if name == "update" else 1)
      inputs = summary["meshes"][spec]["inputs"][name]
      per_dev = inputs["weights"]["per_device"] + inputs["batch"]["per_device"]
      # XLA's argument buffers are the shards the abstract inputs promise (it may drop an unused one).
      assert 0.97 * per_dev <= stats["argument_bytes"] <= per_dev + 64, (spec, name, stats, inputs)  # + key, scalars
      batch = inputs["batch"]
      assert batch["per_device"] * rows == batch["global"], (spec, name, batch)   # rows / (data x fsdp)
      w = inputs["weights"]
      if name == "generate":   # the rollout copy: replicated (it fits), so decoding moves no weights
        assert w["per_device"] == w["global"], (spec, w)
      else:                    # training layout: 1 / (fsdp x tensor)
        assert w["per_device"] <= w["global"] / weight_split + small, (spec, name, w)
        if weight_split > 1:
          assert w["per_device"] < 0.6 * w["global"], (spec, name, w)


def test_kv_cache_split_by_rows_and_kv_heads(layout):
  summary, hlo = layout
  d = dims(summary)
  full = ("f32", (d["BN"], d["K"], d["S"], d["hd"]))
  assert full in plan_lib.array_shapes(hlo(BASE, "generate"))       # the baseline's per-layer cache
  for spec in MESHES:
    rows, tensor, _ = split(spec)
    shapes = plan_lib.array_shapes(hlo(spec, "generate"))
    local = ("f32", (d["BN"] // rows, d["K"] // tensor, d["S"], d["hd"]))
    assert local in shapes, (spec, local)
    big = [s for s in shapes if len(s[1]) >= 3 and plan_lib.has_dims(s[1], (d["BN"], d["S"], d["hd"]))]
    assert not big, f"{spec}: a device holds all {d['BN']} rows of a cache: {big}"


def test_activations_split_by_rows(layout):
  summary, hlo = layout
  d = dims(summary)
  for name in TRAIN_PROGRAMS:
    assert ("f32", (d["MB"], d["T"], d["D"])) in plan_lib.array_shapes(hlo(BASE, name))
    for spec in MESHES:
      rows, tensor, _ = split(spec)
      # Known exception (XLA's SPMD partitioner warns "Involuntary full rematerialization"): with
      # the vocabulary split over tensor, the embedding lookup's gradient (a scatter-add into the
      # table) gathers the micro-batch's [MB, T, D] cotangent once per micro-batch.
      exclude = r"transpose\(jvp\(.*embed_tokens" if tensor > 1 else None
      shapes = plan_lib.array_shapes(hlo(spec, name), exclude=exclude)
      per_dev = d["MB"] // rows
      local = {("f32", (per_dev, d["T"], d["D"])), ("f32", (per_dev * d["T"], d["D"]))}
      if per_dev == 1:
        local.add(("f32", (d["T"], d["D"])))
      assert local & shapes, (spec, name, "no per-device residual stream of", per_dev, "rows")
      whole = [s for s in shapes if plan_lib.has_dims(s[1], (d["MB"], d["T"], d["D"]))
               or plan_lib.has_dims(s[1], (d["MB"], d["R1"], d["D"]))]
      assert not whole, f"{spec} {name}: full micro-batch activations on one device: {whole}"
      # Every [rows, T, D] / [rows, R+1, D] activation holds exactly this device's rows (the
      # chunking in rl.steps keeps them: without it data:8 shows [2, T, D] pieces).
      rows_seen = {s[1][0] for s in shapes
                   if len(s[1]) == 3 and s[1][1:] in ((d["T"], d["D"]), (d["R1"], d["D"]))}
      assert rows_seen == {per_dev}, (spec, name, rows_seen, per_dev)


def test_fsdp_gathers_weights_per_layer_and_never_all_reduces_activations(layout):
  summary, hlo = layout
  d = dims(summary)
  for name in TRAIN_PROGRAMS + ("generate", "update"):
    text = hlo("fsdp:8", name)
    bad = plan_lib.activation_all_reduces(text, seq_lens=(d["T"], d["R1"]), widths=d["widths"])
    assert not bad, f"fsdp:8 {name}: all-reduce of activations {[(c.shapes, c.group_size) for c in bad]}"
  for name in TRAIN_PROGRAMS:
    text = hlo("fsdp:8", name)
    bodies = plan_lib.while_bodies(text)
    gathers = plan_lib.collectives(text, ("all-gather",))
    mlp_sized = lambda colls: [c for c in colls if any(
        tuple(x for x in s if x != 1) in ((d["D"], d["I"]), (d["I"], d["D"])) for _, s in c.shapes)]
    mlp = mlp_sized(gathers)
    assert mlp and all(c.computation in bodies for c in mlp), \
        f"{name}: one layer's MLP weight is not all-gathered inside the layer scan"
    stacked = [c for c in gathers for _, s in c.shapes if plan_lib.has_dims(s, (d["L"], d["D"], d["I"]))]
    assert not stacked, f"{name}: all layers' weights gathered at once: {stacked}"
    if name != "scoring":   # the updates reduce each layer's weight gradient inside the backward scan
      reds = plan_lib.collectives(text, ("all-reduce", "reduce-scatter"))
      grads = mlp_sized(reds)
      assert grads and all(c.computation in bodies for c in grads), \
          f"{name}: one layer's MLP weight gradient is not reduced inside the layer scan"
      stacked = [c for c in reds for _, s in c.shapes if plan_lib.has_dims(s, (d["L"], d["D"], d["I"]))]
      assert not stacked, f"{name}: all layers' weight gradients reduced at once: {stacked}"
  # Control: the same scoring program traced without the mesh context (no activation
  # constraints) is what a review found: GSPMD follows the weights' fsdp split of the width and
  # all-reduces [rows, T, D] activations in every layer. The check above catches exactly that.
  control = plan_lib.activation_all_reduces(hlo("fsdp:8", "scoring_unconstrained"),
                                            seq_lens=(d["T"], d["R1"]), widths=d["widths"])
  assert control, "the control program shows no activation all-reduce: the check cannot fail"


def test_tensor_parallel_all_reduces_stay_on_the_tensor_axis(layout):
  summary, hlo = layout
  d = dims(summary)
  spec = "data:2,fsdp:2,tensor:2"
  for name in TRAIN_PROGRAMS:
    ars = plan_lib.activation_all_reduces(hlo(spec, name), seq_lens=(d["T"], d["R1"]), widths=d["widths"])
    assert ars, f"{name}: row-parallel o_proj / down_proj must all-reduce over the tensor axis"
    assert {c.group_size for c in ars} == {2}, [(c.shapes, c.group_size) for c in ars]


def test_data_parallel_moves_no_weights_forward(layout):
  summary, hlo = layout
  d = dims(summary)
  for name in ("generate", "scoring"):
    gathers = plan_lib.collectives(hlo("data:8", name), ("all-gather",))
    weights = [c for c in gathers for _, s in c.shapes if d["D"] in s and (d["I"] in s or 128 in s)]
    assert not weights, f"data:8 {name}: weights all-gathered although replicated: {weights}"


def test_memory_plan_per_device(layout):
  summary, _ = layout
  res = summary["meshes"]
  for spec in MESHES:
    plan = res[spec]["plan"]
    assert plan["mesh"] == split(spec)[2]
    assert plan["peak_bytes_per_device"] == max(p["peak_bytes"] for p in plan["programs"].values())
    for name, p in plan["programs"].items():
      assert p["peak_bytes"] == p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"] - p["alias_bytes"]
  # FSDP shrinks the updates' whole footprint (weights, moments, gradients, activations) ~1/8.
  for name in ("prm_update", "policy_update"):
    base = res[BASE]["plan"]["programs"][name]["peak_bytes"]
    assert res["fsdp:8"]["plan"]["programs"][name]["peak_bytes"] < 0.3 * base, name
    # data:8 replicates weights and moments (its arguments stay full size) and splits only the
    # activations, so its peak lies between FSDP's and the 1-device run's.
    d8, b1 = res["data:8"]["plan"]["programs"][name], res[BASE]["plan"]["programs"][name]
    assert d8["argument_bytes"] > 0.95 * b1["argument_bytes"], name
    assert d8["temp_bytes"] < 0.5 * b1["temp_bytes"], name
    assert res["fsdp:8"]["plan"]["programs"][name]["peak_bytes"] < d8["peak_bytes"] < base, name


# ---------------------------------------------------------------------------------------------
# In process (one device)
# ---------------------------------------------------------------------------------------------

TINY = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=10, tie_word_embeddings=False,
                   attention_bias=True)


def test_logical_to_spec():
  mesh = AbstractMesh((2, 2, 2), mesh_lib.AXES)
  assert rules.logical_to_spec(("batch", "length", "act_embed"), (8, 5, 64), mesh) == P(("data", "fsdp"), None, None)
  assert rules.logical_to_spec(("batch", "length", "heads", None), (2, 5, 4, 10), mesh) == P("data", None, "tensor", None)
  assert rules.logical_to_spec(("batch", "kv_heads"), (3, 3), mesh) == P(None, None)   # indivisible: whole
  fsdp = AbstractMesh((1, 8, 1), mesh_lib.AXES)
  assert rules.logical_to_spec(("batch", "mlp"), (16, 96), fsdp) == P("fsdp", None)
  assert rules.logical_to_spec(rules.KV_CACHE_AXES, (2, 16, 2, 18, 10), mesh) == \
      P(None, ("data", "fsdp"), "tensor", None, None)


def test_constraints_are_no_ops_without_a_mesh():
  x = np.ones((4, 3, 2), np.float32)
  assert mesh_lib.current_mesh() is None
  assert rules.with_logical_constraint(x, ("batch", "length", "act_embed")) is x
  with pytest.raises(ValueError, match="one name"):
    rules.with_logical_constraint(x, ("batch",))
  with pytest.raises(ValueError, match="expected \\[L, B, Hkv, S, hd\\]"):
    rules.constrain_kv_cache(x)


def test_inference_layouts():
  params = jax.eval_shape(lambda k: init_params(TINY, k), jax.random.PRNGKey(0))
  mesh = AbstractMesh((2, 2, 2), mesh_lib.AXES)
  total = plan_lib.global_bytes(params)
  shard, layout = inference.inference_shardings(params, TINY, mesh)
  assert layout == "replicated" and all(s.spec == P() for s in jax.tree.leaves(shard))
  _, layout = inference.inference_shardings(params, TINY, mesh, max_bytes=total // 2 + 4096)
  assert layout == "tensor"
  tp, _ = inference.inference_shardings(params, TINY, mesh, layout="tensor")
  assert tp["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, None, "tensor")   # width whole
  assert tp["layers"]["self_attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None)
  _, layout = inference.inference_shardings(params, TINY, mesh, max_bytes=total // 4 + 4096)
  assert layout == "train"
  _, layout = inference.inference_shardings(params, TINY, mesh, max_bytes=total // 2 + 4096, dtype="bfloat16")
  assert layout == "replicated"   # bf16 halves the copy: now it fits whole
  with pytest.raises(ValueError, match="more than max_bytes=10"):
    inference.inference_shardings(params, TINY, mesh, max_bytes=10)
  with pytest.raises(ValueError, match="layout='fast'"):
    inference.inference_shardings(params, TINY, mesh, layout="fast")


def test_inference_params_casts_once_on_one_device():
  params = init_params(TINY, jax.random.PRNGKey(0))
  mesh = mesh_lib.make_mesh("data:1")
  out = inference.inference_params(params, TINY, mesh, dtype="bfloat16")
  leaf = out["layers"]["mlp"]["up_proj"]["kernel"]
  assert leaf.dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(np.asarray(leaf, np.float32),
                             np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]), rtol=1e-2)


HLO_SNIPPET = """
%body.1 (p: (s32[], f32[2,64])) -> (s32[], f32[2,64]) {
  %ag = f32[64,96]{1,0} all-gather(f32[8,96]{1,0} %x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %ar = f32[1,18,64]{2,1,0} all-reduce(f32[1,18,64]{2,1,0} %y), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}
ENTRY %main (a: f32[2,64]) -> f32[2,64] {
  %w = (s32[], f32[2,64]) while((s32[], f32[2,64]) %t), condition=%cond.1, body=%body.1
  %ar2 = (f32[4,18,64]{2,1,0}, f32[3]{0}) all-reduce-start(f32[4,18,64]{2,1,0} %z, f32[3]{0} %u), replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0','axis_1'}, to_apply=%add
  ROOT %cp = f32[2,64]{1,0} collective-permute(f32[2,64]{1,0} %a), source_target_pairs={{0,1}}
}
"""


def test_hlo_collective_parser():
  cs = plan_lib.collectives(HLO_SNIPPET)
  assert [(c.kind, c.group_size, c.computation) for c in cs] == [
      ("all-gather", 8, "body.1"), ("all-reduce", 2, "body.1"), ("all-reduce", 4, "main"),
      ("collective-permute", 0, "main")]
  assert cs[0].shapes == (("f32", (64, 96)),) and cs[0].bytes == 64 * 96 * 4
  assert cs[2].shapes == (("f32", (4, 18, 64)), ("f32", (3,)))
  assert plan_lib.while_bodies(HLO_SNIPPET) == {"body.1"}
  found = plan_lib.activation_all_reduces(HLO_SNIPPET, seq_lens=(18,), widths=(64,))
  assert [c.group_size for c in found] == [2, 4]
  assert plan_lib.activation_all_reduces(HLO_SNIPPET, seq_lens=(18,), widths=(64,), min_group=3) == [found[1]]
  assert plan_lib.activation_all_reduces(HLO_SNIPPET, seq_lens=(18,), widths=(96,)) == []
  assert ("f32", (64, 96)) in plan_lib.array_shapes(HLO_SNIPPET)


def test_constrain_like_params():
  params = init_params(TINY, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda x: x * 0 + 1, params)
  assert placement.constrain_like_params(grads, params, TINY) is grads    # no mesh: untouched
  mesh = mesh_lib.make_mesh("data:1")
  shardings = rules.param_shardings(params, TINY, mesh)
  out = jax.jit(lambda g: placement.constrain_like_params(g, shardings))(grads)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), out,
                                          shardings)))
  with mesh_lib.use_mesh(mesh):   # params + config: shardings from the context mesh
    out2 = jax.jit(lambda g: placement.constrain_like_params(g, params, TINY))(grads)
  for a, b in zip(jax.tree.leaves(out2), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
