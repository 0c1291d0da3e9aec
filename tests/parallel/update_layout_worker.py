"""Worker for tests/parallel/test_update_layout.py: the trainer's real update at 7B widths, 2 layers.

The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=8. For each mesh it reads the
shipped 7B flag file (experiments/configs/eurus2_7b_prime.flags, Qwen2.5-Math-7B shapes) with
the architecture preset cut to 2 layers and P=384, R=640 tokens (no size equal to a model width), builds the one jitted update
exactly as the trainer does (`rl.plan.abstract_update`), compiles it from abstract inputs and
writes the partitioned HLO to OUTDIR/<mesh>.hlo, plus:

  control_prompts_<mesh>.hlo  the same update with the shared-prompt pass forced on (the
                              earlier layout: 2 prompts per micro-batch replicated over
                              8 devices);
  control_head_<mesh>.hlo     the same update with the LM head chunked as before (rows
                              and positions flattened into 1024-token chunks);
so the test shows that each of its checks catches the layout it guards against.

usage: tests/parallel/update_layout_worker.py OUTDIR MESH [MESH ...]
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl_dense.parallel import mesh as mesh_lib
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import plan as plan_lib
from jaxrl_dense.rl import steps

LAYERS = 2
ARGS = ["--max_prompt_length=384", "--max_response_length=640", "--length_bucket=0"]


def _flattened_head(hidden, w, tokens, attention_mask, *, return_entropy=False, chunk_size=None):
  """The control's LM head: B*(T-1) positions flattened, chunks of 1024 under lax.map."""
  import jax
  import jax.numpy as jnp
  b, t, d = hidden.shape
  n, c = b * (t - 1), 1024
  k = -(-n // c)
  h = jnp.pad(hidden[:, :-1].reshape(n, d), ((0, k * c - n), (0, 0))).reshape(k, c, d)
  tg = jnp.pad(tokens[:, 1:].reshape(n), (0, k * c - n)).reshape(k, c)

  def chunk(xs):
    z = jnp.einsum("cd,dv->cv", xs[0], w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    return jnp.take_along_axis(z, xs[1][:, None], axis=-1)[:, 0] - lse, lse

  lp, lse = jax.lax.map(jax.checkpoint(chunk), (h, tg))
  pad = lambda x: jnp.pad(x.reshape(-1)[:n].reshape(b, t - 1), ((0, 0), (1, 0)))
  return (pad(lp), pad(lse)) if return_entropy else pad(lp)


def compile_update(spec: str):
  cfg = config_lib.from_args([f"--flagfile={ROOT}/experiments/configs/eurus2_7b_prime.flags",
                              f"--mesh={spec}", "--model=", *ARGS])
  mesh = mesh_lib.make_mesh(spec)
  update_fn, args, mc, _ = plan_lib.abstract_update(cfg, mesh)
  with mesh_lib.use_mesh(mesh):
    compiled = update_fn.lower(*args).compile()
  return cfg, mc, compiled


def main(outdir, *meshes):
  plan_lib.ARCH_PRESETS["qwen2.5-math-7b"]["num_hidden_layers"] = LAYERS
  info = {}
  for spec in meshes:
    cfg, mc, compiled = compile_update(spec)
    with open(os.path.join(outdir, f"{spec}.hlo"), "w") as f:
      f.write(compiled.as_text())
    p = cfg.prime
    info[spec] = {"vocab": mc.vocab_size, "hidden": mc.hidden_size, "layers": mc.num_layers,
                  "heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                  "intermediate": mc.intermediate_size,
                  "prompt_len": p.rollout.max_prompt_length,
                  "response_len": p.rollout.max_response_length, "n": p.rollout.n,
                  "micro_batch_size": p.policy.micro_batch_size,
                  "prm_micro_batch_size": p.prm.prm_micro_batch_size,
                  "score_micro_batch_size": p.score_micro_batch_size,
                  "memory": {k: int(getattr(compiled.memory_analysis(), k)) for k in
                             ("argument_size_in_bytes", "temp_size_in_bytes")}}
    print(spec, "compiled", flush=True)
  # Control 1: the shared prompt pass forced on (2 prompts of a micro-batch cannot split over 8).
  split = steps._prompts_split_like_rows
  steps._prompts_split_like_rows = lambda rows, group_size: True
  _, _, compiled = compile_update(meshes[0])
  with open(os.path.join(outdir, f"control_prompts_{meshes[0]}.hlo"), "w") as f:
    f.write(compiled.as_text())
  steps._prompts_split_like_rows = split
  # Control 2: the LM head as it was before (rows and positions flattened, then cut
  # into chunks of 1024 tokens), which GSPMD computed D-split with the f32 logits all-reduced.
  steps.logprobs.logprobs_from_hidden = _flattened_head
  _, _, compiled = compile_update(meshes[0])
  with open(os.path.join(outdir, f"control_head_{meshes[0]}.hlo"), "w") as f:
    f.write(compiled.as_text())
  with open(os.path.join(outdir, "info.json"), "w") as f:
    json.dump(info, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])
