"""Where the trainer's real update sends data on 8 devices, at 7B widths.

tests/parallel/update_layout_worker.py compiles the one jitted update (`rl.plan.abstract_update`, as the
trainer builds it) from the shipped 7B flag file (Qwen2.5-Math-7B: D=3584, V=152064, 28 heads,
4 kv heads, I=18944), cut to 2 layers and P=384 / R=640 tokens, on 8 simulated CPU devices, and
writes the partitioned HLO. Every collective of the shipped mesh (fsdp:8) is classified:

  allowed  weight-shaped operands (no sequence dimension): the per-layer weight all-gathers and
           the gradient reductions (XLA:CPU writes a reduce-scatter as all-reduce + slice);
           token-sized batch arrays [rows, T] (no model width); scalars and vectors (metrics,
           norms); the embedding lookup's re-layout (op_name `embed_tokens`, once per pass).
  refused  anything else: an operand with a sequence length and a model width (D, I, V, the q /
           kv widths): activations or logits crossing devices.

Controls (the same compile with the earlier layouts): the shared prompt pass forced on
with 2 prompts per micro-batch (replicated over 8 devices: activation all-gathers/all-reduces per
layer) and the LM head flattened into 1024-token chunks (f32 [1024, V] logits all-reduced).
Each check is shown failing on its control.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from jaxrl_dense.parallel import plan as sp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MAIN, TENSOR = "fsdp:8", "data:2,fsdp:2,tensor:2"
_LINE = re.compile(r"^\s*%?\S+\s*=\s*(.*?)\s(all-gather|all-reduce|all-to-all|reduce-scatter|"
                   r"collective-permute)(-start)?\(")
_OP = re.compile(r'op_name="([^"]*)"')

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  d = tmp_path_factory.mktemp("update_layout")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             # cheaper XLA:CPU backend; the SPMD partitioning the tests read is unchanged
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "update_layout_worker.py"), str(d),
                         MAIN, TENSOR], env=env, capture_output=True, text=True, timeout=1800,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return d


def _collectives(path):
  """[(kind, [(dtype, dims)], op_name)] of every collective in a partitioned HLO file."""
  found = []
  for line in open(path):
    m = _LINE.match(line)
    if m:
      shapes = [(t, tuple(int(x) for x in dims.split(",") if x))
                for t, dims in sp._SHAPE.findall(m.group(1))]
      op = _OP.search(line)
      found.append((m.group(2), shapes, op.group(1) if op else ""))
  return found


def _sizes(info):
  d, v, i = info["hidden"], info["vocab"], info["intermediate"]
  p, r = info["prompt_len"], info["response_len"]
  widths = {d, v, i, info["heads"] * info["head_dim"], info["kv_heads"] * info["head_dim"]}
  return widths, {p + r, p, r, r + 1}, v


def refused(colls, info):
  """Collectives carrying activations or logits (a sequence length and a full model width)."""
  widths, seqs, _ = _sizes(info)
  return [c for c in colls if any(set(dims) & seqs and set(dims) & widths for _, dims in c[1])]


def logit_sized(colls, info):
  """Collectives with a vocabulary-sized dimension that are not the [D, V] / [V, D] head or
  embedding weight (or its tensor shard): f32 logits crossing devices."""
  d, v = info["hidden"], info["vocab"]
  vs = {v, v // 2, v // 4, v // 8}
  weight = lambda dims: len(dims) == 2 and set(dims) & vs and (d in dims or any(
      x in dims for x in (d // 2, d // 4, d // 8)))
  return [c for c in colls if any(set(dims) & vs and not weight(dims) for _, dims in c[1])]


def unclassified(colls, info):
  """What the allowed list does not cover, on the fsdp-only mesh."""
  widths, seqs, _ = _sizes(info)
  rest = []
  for kind, shapes, op in colls:
    if "embed_tokens" in op:          # the embedding lookup's re-layout, once per forward pass
      continue
    ok = True
    for _, dims in shapes:
      weight_like = len(dims) <= 2 and not set(dims) & seqs
      token_like = not set(dims) & widths and not any(x in dims for x in (info["hidden"] // 8,))
      if not (weight_like or token_like or len(dims) == 0):
        ok = False
    if not ok:
      rest.append((kind, shapes, op))
  return rest


def test_update_on_fsdp8_moves_only_weights_and_token_arrays(out):
  info = json.loads((out / "info.json").read_text())[MAIN]
  assert (info["vocab"], info["hidden"], info["layers"]) == (152064, 3584, 2)
  # 8 rows per policy micro-batch at n=4: 2 prompts, which cannot split over 8 devices, so the
  # rows run whole (each device its own row) instead of sharing a replicated prompt pass.
  assert info["micro_batch_size"] // info["n"] < 8
  colls = _collectives(out / f"{MAIN}.hlo")
  assert len(colls) > 50   # the weight gathers of 2 layers x 6 passes are there
  assert refused(colls, info) == []
  assert logit_sized(colls, info) == []
  assert unclassified(colls, info) == []
  kinds = {k for k, _, _ in colls}
  assert "all-gather" in kinds   # FSDP: weights gathered per layer
  # the embedding re-layout is the only activation-shaped collective, and it is per pass
  emb = [c for c in colls if "embed_tokens" in c[2]]
  assert len(emb) <= 12, emb


def test_update_on_a_tensor_mesh_sends_no_logits(out):
  info = json.loads((out / "info.json").read_text())[TENSOR]
  colls = _collectives(out / f"{TENSOR}.hlo")
  assert logit_sized(colls, info) == []
  # Tensor parallelism all-reduces activations only at the projections (Megatron: the
  # row-parallel o_proj / down_proj outputs, and in the backward pass the input gradients of the
  # column-parallel q/k/v and gate/up) and at the vocabulary-parallel embedding lookup.
  act = [c for c in refused(colls, info) if c[0] == "all-reduce"]
  assert act and all(("_proj" in c[2] or "embed_tokens" in c[2]) for c in act), \
      [c for c in act if "_proj" not in c[2]][:3]
  assert all(c[0] == "all-reduce" or "embed_tokens" in c[2] for c in refused(colls, info))


def test_controls_fail_the_checks(out):
  info = json.loads((out / "info.json").read_text())[MAIN]
  prompts = _collectives(out / f"control_prompts_{MAIN}.hlo")
  bad = refused(prompts, info)
  assert len(bad) >= 10, bad[:3]   # replicated prompt pass: activation gathers/reduces per layer
  head = _collectives(out / f"control_head_{MAIN}.hlo")
  lg = logit_sized(head, info)
  assert any(k == "all-reduce" and (1024, info["vocab"]) in [d for _, d in s] for k, s, _ in lg), lg
