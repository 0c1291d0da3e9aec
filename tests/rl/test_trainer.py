"""rl.trainer on the main job's path (the Trainer that experiments/prime_math.py runs): for prm_update before / after x old log-probs
recomputed / reused, with a PPO mini-batch smaller than the step's rows, an eval and an Orbax
checkpoint between steps: steps after the first never recompile, and restoring the checkpoint of
step 2 and re-running step 3 reproduces step 3 exactly (metrics and parameters)."""
import pathlib

import jax
import numpy as np
import pytest

from jaxrl_dense import checkpoint as ckpt_lib
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"


def _comparable(rec):
  return {k: v for k, v in rec.items() if not k.startswith("time/") and k != "tokens_per_s"}


@pytest.mark.slow  # one compilation of the whole loop per case (~20 s idle, minutes on a busy CPU)
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "sampler_logp"])
@pytest.mark.parametrize("prm_update", ["before", "after"])
def test_no_recompile_and_exact_resume(prm_update, recompute, tmp_path):
  cfg = config_lib.replace(
      config_lib.from_args([f"--flagfile={SMOKE}"]),
      model="random:hidden=16,layers=1,heads=2,kv_heads=1,mlp=32", prm_update=prm_update,
      recompute_old_logp=recompute, mini_batch_size=8, max_response_length=8, arith_num_eval=4,
      eval_batch_size=4, steps=3, logdir=str(tmp_path / "logs"))
  assert cfg.prime.policy_mini < cfg.prime.rollout.rows
  trainer = Trainer(cfg)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ck", fingerprint=config_lib.fingerprint(cfg), save_every=1,
                               keep_last=3)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  try:
    trainer.evaluate("_start")
    recs = [trainer.train_step()]
    trainer.evaluate()
    ckpt.save(1, *trainer.checkpoint(recs), force=True)
    first = len(compiles)
    for step in (2, 3):
      recs.append(trainer.train_step())
      if step == 2:
        trainer.evaluate()
        ckpt.save(2, *trainer.checkpoint(recs), force=True)
    assert len(compiles) == first, f"{len(compiles) - first} compilations after step 1"
    params3 = jax.tree.map(np.asarray, trainer.state.policy.params)
    prm3 = jax.tree.map(np.asarray, trainer.state.prm.params)
    tree, meta = ckpt.restore(2, target=trainer.checkpoint()[0])
    history = trainer.restore(tree, meta)
    assert trainer.step == 2 and len(history) == 2
    again = trainer.train_step()
    assert _comparable(again).keys() == _comparable(recs[2]).keys()
    for k, v in _comparable(recs[2]).items():
      np.testing.assert_allclose(again[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    for x, y in zip(jax.tree.leaves((params3, prm3)),
                    jax.tree.leaves((trainer.state.policy.params, trainer.state.prm.params))):
      np.testing.assert_array_equal(np.asarray(y), x)
  finally:
    jax.monitoring.clear_event_listeners()
    ckpt.close()
    trainer.close()
