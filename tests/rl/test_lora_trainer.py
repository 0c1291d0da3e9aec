"""LoRA in the trainer: `--lora_rank` / `--prm_lora_rank` train adapters only,
one frozen base serves as the reference and as every adapted model's base, a LoRA run resumes
exactly, and `--export_dir` writes the merged policy as an HF directory."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import models
from jaxrl_dense.models import lora
from jaxrl_dense.rl import config as config_lib, prime
from tests.rl.test_update import _batch  # the same synthetic groups of 4 (TINY's vocabulary of 48)

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "prime_math.py"
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"
TINY = models.ModelConfig(model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=32,
                          num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,),
                          pad_token_id=0)


def _cfg(**kw):
  base = dict(n=4, prompts_per_step=2, micro_batch_size=4, prm_micro_batch_size=4,
              score_micro_batch_size=4, max_prompt_length=5, max_response_length=6,
              prm_update="after", lr=1e-2, prm_lr=1e-2)
  return config_lib.build(config_lib.PrimeConfig, {**base, **kw})


def _params():
  return models.init_params(TINY, jax.random.PRNGKey(0))


def test_config_flags_validate_and_fingerprint():
  cfg = _cfg(lora_rank=4, lora_alpha=8.0, lora_targets="q,v", prm_lora_rank=2)
  assert cfg.policy_lora == lora.LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
  assert cfg.prm_lora.rank == 2 and cfg.keeps_base
  assert _cfg().policy_lora is None and _cfg(algo="rloo", prm_lora_rank=2).prm_lora is None
  with pytest.raises(config_lib.ConfigError, match="lora_targets"):
    _cfg(lora_rank=4, lora_targets="q,attn")
  with pytest.raises(config_lib.ConfigError, match="prm_model"):
    config_lib.build(config_lib.RunConfig, {"prm_lora_rank": 4, "prm_model": "/some/other/model"})
  # rank 0 (off) leaves the LoRA settings out of the checkpoint fingerprint (older checkpoints
  # still resume); rank > 0 puts all three in.
  off = config_lib.fingerprint(config_lib.build(config_lib.RunConfig, {}))
  on = config_lib.fingerprint(config_lib.build(config_lib.RunConfig, {"lora_rank": 8}))
  assert not any("lora" in k for k in off)
  assert {"lora_rank", "lora_alpha", "lora_targets"} <= set(on) and "prm_lora_rank" not in on


def test_lora_step_trains_only_adapters_and_starts_at_the_full_model():
  """B = 0 at init: a LoRA policy + LoRA PRM step scores exactly what full fine-tuning scores at
  step 1 (same log-probs, implicit rewards with the reference taken from the shared base,
  advantages, PPO loss). After it, the base is bit-identical, the adapters moved, and AdamW holds
  adapter-shaped moments only."""
  full_cfg, lora_cfg = _cfg(), _cfg(lora_rank=4, prm_lora_rank=2, prm_lora_targets="q,v,gate,up,down")
  init_f, upd_f = prime.make_prime(TINY, full_cfg)
  _, m_full = upd_f(init_f(_params(), _params(), _params()), _batch(), jax.random.PRNGKey(3))

  init_l, upd_l = prime.make_prime(TINY, lora_cfg)
  base, _ = lora.freeze_base(_params(), TINY)
  pol_a = lora.init_adapters(TINY, lora_cfg.policy_lora, jax.random.PRNGKey(1))
  prm_a = lora.init_adapters(TINY, lora_cfg.prm_lora, jax.random.PRNGKey(2))
  state = init_l(pol_a, prm_a, base)
  base0 = jax.tree.map(np.array, base)
  a0 = jax.tree.map(np.array, (pol_a, prm_a))
  with pytest.raises(ValueError, match="adapters"):
    prime.model_params(state, "policy")  # adapters alone are not a model without the config
  state, m_lora = upd_l(state, _batch(), jax.random.PRNGKey(3))

  same = ("prm/loss", "entropy", "kl_ref", "adv/mean", "adv/std", "adv/max", "adv/min", "returns/mean",
          "prm_health/auroc", "prm_health/implicit_reward_mean", "prm/q_seq_mean", "actor/pg_loss",
          "actor/clipfrac", "actor/ppo_kl")
  for k in same:
    np.testing.assert_allclose(float(m_lora[k]), float(m_full[k]), atol=1e-5, rtol=1e-5, err_msg=k)
  assert float(m_lora["prm/grad_norm"]) > 0 and float(m_lora["actor/grad_norm"]) > 0
  # The frozen base is untouched (it is also pi_ref); only adapters moved.
  for x, y in zip(jax.tree.leaves(state.ref_params), jax.tree.leaves(base0)):
    np.testing.assert_array_equal(np.asarray(x), y)
  # Every B moved (with B = 0 the first gradient reaches B only: dL/dA = x^T dL/dy B^T = 0).
  new_leaves = jax.tree_util.tree_leaves_with_path((state.policy.params, state.prm.params))
  moved = {jax.tree_util.keystr(p): not np.array_equal(np.asarray(x), y)
           for (p, x), y in zip(new_leaves, jax.tree.leaves(a0))}
  assert all(v for k, v in moved.items() if "lora_b" in k), moved
  # AdamW state: moments of the adapters' shapes only (no base-sized buffer).
  n_adapt = lora.num_params(state.policy.params)
  n_opt = sum(x.size for x in jax.tree.leaves(state.policy.opt_state) if x.ndim > 0)
  assert n_opt == 2 * n_adapt, (n_opt, n_adapt)
  assert sum(x.size for x in jax.tree.leaves(state.policy.params)) < 0.25 * sum(x.size for x in jax.tree.leaves(base))
  # The model the sampler / evaluation use is the base with the adapters attached.
  attached = prime.model_params(state, "policy", lora_cfg)
  assert "lora" in attached and lora.num_params(attached["lora"]) == n_adapt
  np.testing.assert_array_equal(attached["embed_tokens"]["embedding"], state.ref_params["embed_tokens"]["embedding"])


def test_lora_update_on_a_mesh_keeps_the_adapter_layout():
  """The jitted update compiled on an fsdp mesh: adapters and their AdamW moments come out with the
  sharding of `rules.param_specs` (lora_a along the base kernel's input axis, lora_b along its
  output), read from the compiled program's output shardings.

  Compiled, not executed: XLA's CPU runtime can deadlock a multi-device program on simulated
  devices when the host is loaded (two concurrent all-gathers each wait for the other device;
  the rendezvous aborts the process after 40 s). Values on a mesh are covered by the sharded ==
  unsharded tests in tests/parallel/test_sharding.py; this test is about layout."""
  from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement
  if len(jax.devices()) < 2:  # re-run this test in a process with 2 simulated CPU devices
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                        f"{__file__}::test_lora_update_on_a_mesh_keeps_the_adapter_layout"],
                       capture_output=True, text=True, timeout=900, cwd=str(REPO), env=env)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    return
  mesh = mesh_lib.make_mesh(f"data:1,fsdp:2,tensor:1", devices=jax.devices()[:2])
  cfg = _cfg(lora_rank=4, prm_lora_rank=4)
  init_fn, update_fn = prime.make_prime(TINY, cfg, mesh=mesh)
  base = placement.shard_params(lora.freeze_base(_params(), TINY)[0], TINY, mesh)
  ad = lambda i: placement.shard_params(lora.init_adapters(TINY, cfg.policy_lora, jax.random.PRNGKey(i)),
                                       TINY, mesh)
  state = init_fn(ad(1), ad(2), base)
  compiled = update_fn.lower(state, placement.shard_batch(_batch(), mesh), jax.random.PRNGKey(3)).compile()
  out_state = compiled.output_shardings[0]
  for which in ("policy", "prm"):
    got = getattr(out_state, which)
    want = rules.param_shardings(getattr(state, which).params, TINY, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(getattr(state, which).params)
    assert any("lora_a" in jax.tree_util.keystr(p) for p, _ in leaves)
    for (path, x), s, w in zip(leaves, jax.tree.leaves(got.params), jax.tree.leaves(want)):
      assert s.is_equivalent_to(w, x.ndim), (which, jax.tree_util.keystr(path), s, w)
    # AdamW moments: they leave the update in the layout they came in (the donated state is
    # updated in place), and there are two split moments for each split adapter.
    opt_in = jax.tree.leaves(getattr(state, which).opt_state)
    opt_out = jax.tree.leaves(got.opt_state)
    assert len(opt_in) == len(opt_out)
    for x, s in zip(opt_in, opt_out):
      assert s.is_equivalent_to(x.sharding, x.ndim), (which, s, x.sharding)
    n_split = lambda xs: sum(not x.sharding.is_fully_replicated for x in xs)
    assert n_split(opt_in) == 2 * n_split([x for _, x in leaves]) > 0
  # Some adapter is actually split over fsdp (the tiny model's widths divide by 2).
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(out_state.policy.params))


def _metrics(logdir):
  rows = [json.loads(l) for l in open(os.path.join(logdir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "eval/pass@1" not in r}


@pytest.mark.slow
def test_lora_smoke_run_resumes_exactly_and_exports_merged(tmp_path):
  """prime_math with a LoRA policy and a LoRA PRM: 3 steps straight == 2 steps + resume; the
  checkpoint holds adapters only; --export_dir writes the merged policy, which loads back and
  gives the adapted model's log-probs."""
  # The smoke model solves nothing, so every group is out of the accuracy band; the PRM trains on
  # such groups only with --prm_on_filler (the veRL recipe).
  common = [f"--flagfile={SMOKE}", "--eval_data=", "--checkpoint_every=1", "--lora_rank=4",
            "--prm_lora_rank=4", "--lr=1e-2", "--prm_lr=1e-2", "--prm_on_filler=true"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = {"a": [*common, "--steps=3", f"--logdir={tmp_path}/a", f"--checkpoint_dir={tmp_path}/a/ck",
                f"--export_dir={tmp_path}/a/hf"],
          "b": [*common, "--steps=2", f"--logdir={tmp_path}/b", f"--checkpoint_dir={tmp_path}/b/ck"]}
  procs = {k: subprocess.Popen([sys.executable, str(SCRIPT), *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=str(REPO), env=env) for k, a in runs.items()}
  for p in procs.values():
    _, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-3000:]
  r = subprocess.run([sys.executable, str(SCRIPT), *common, "--steps=3", "--resume", f"--logdir={tmp_path}/b",
                      f"--checkpoint_dir={tmp_path}/b/ck"], capture_output=True, text=True, timeout=1200,
                     cwd=str(REPO), env=env)
  assert r.returncode == 0 and "restored step 2" in r.stdout, r.stderr[-3000:]
  ma, mb = _metrics(f"{tmp_path}/a"), _metrics(f"{tmp_path}/b")
  assert sorted(ma) == sorted(mb) == [1, 2, 3]
  for s in ma:
    for k, v in ma[s].items():
      if k.startswith("time") or k == "tokens_per_s":
        continue
      np.testing.assert_allclose(v, mb[s][k], rtol=1e-5, atol=1e-6, err_msg=f"step {s} {k}")
  assert ma[3]["actor/grad_norm"] > 0 and ma[3]["prm/grad_norm"] > 0
  # The checkpoint holds adapters (and their optimizer state), not the base.
  from jaxrl_dense import checkpoint as ckpt_lib
  ck = pathlib.Path(f"{tmp_path}/a/ck")
  last = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
  fp = json.load(open(ck / str(last) / "fingerprint" / "metadata"))
  assert fp["lora_rank"] == 4 and fp["prm_lora_rank"] == 4
  tree, _ = ckpt_lib.Checkpointer(str(ck), fingerprint=fp).restore()
  names = {jax.tree_util.keystr(p).split("'")[-2] for p, _ in jax.tree_util.tree_leaves_with_path(tree["policy"]["params"])}
  assert names == {"lora_a", "lora_b"}
  # The export is the merged policy: W + alpha/r A B, loadable as a plain HF model.
  from jaxrl_dense.models import loading
  params = loading.load_pretrained(f"{tmp_path}/a/hf").params
  from jaxrl_dense.rl import load  # the smoke model is random:...; rebuild the base it started from
  cfg = config_lib.from_args([*common, "--steps=3"])
  _, base_params, _ = load.load_model(cfg.model, cfg, seed=cfg.seed)
  adapters = jax.tree.map(jnp.asarray, tree["policy"]["params"])
  merged = lora.merge(base_params, adapters, cfg.prime.policy_lora)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
