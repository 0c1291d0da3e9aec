r"""Held-out AUROC of a trained implicit PRM, from a finished (or stopped) run's checkpoint.

    python experiments/prm_auroc.py --flagfile=experiments/configs/chain_smollm2.flags \
        --algo=prime --seed=0 --checkpoint_dir=runs/compare_chain/prime/seed0/ckpt \
        --report=runs/compare_chain/prime/seed0/eval_step00024_end.json [--out=auroc.json]

Restores the PRM of the run's latest checkpoint (the same flags the run used: its fingerprint is
checked, as `--resume` checks it), scores the greedy held-out responses of an evaluation report
(`eval_step*.json`, written by prime_math) with r = beta * sum_t log pi_prm / pi_ref
(`eval.prm.heldout_prm_auroc`), and reports the AUROC of r against the verifier's label
(`prm_health.auroc`). New runs log this at every evaluation as `eval/prm_auroc` (`--eval_prm`);
this tool measures it for runs made before that existed, or at any checkpoint.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from jaxrl_dense import cli  # noqa: E402
from jaxrl_dense.rl import config as config_lib  # noqa: E402

config_lib.define_flags(config_lib.RunConfig)
flags.DEFINE_string("report", "", "An eval_step*.json report of the run (its greedy responses).")
flags.DEFINE_string("out", "", "Also write the result as JSON here.")
FLAGS = flags.FLAGS


def heldout_auroc(cfg: config_lib.RunConfig, report_path: str) -> dict:
  """{"auroc", "step", "num", "positives", "report"} for the run's latest checkpoint."""
  from jaxrl_dense.eval import prm as eval_prm
  from jaxrl_dense.rl import load, prime
  from jaxrl_dense.rl.trainer import Trainer
  if not cfg.prime.uses_prm:
    raise config_lib.ConfigError("algo", cfg.prime.algo, "has no PRM to score")
  with open(report_path) as f:
    report = json.load(f)
  ckpt = load.open_checkpointer(cfg, read_only=True)  # a mismatched run is refused before loading
  trainer = Trainer(cfg)
  try:
    trainer.resume(ckpt)
    ckpt.close()
    by_uid = {r.uid: r for r in trainer.eval_records}
    problems = report["problems"]
    missing = [p["uid"] for p in problems if p["uid"] not in by_uid]
    if missing:
      raise config_lib.ConfigError("report", report_path, f"problems {missing[:3]} are not in --eval_data")
    held = eval_prm.heldout_prm_auroc(  # as the trainer's eval/prm_auroc
        prime.model_params(trainer.state, "prm", cfg.prime), trainer.state.ref_params,
        trainer.model_config, trainer.tokenizer, [by_uid[p["uid"]] for p in problems], problems,
        beta=cfg.prime.prm.beta,
        max_new_tokens=cfg.eval_max_response_length or cfg.prime.rollout.max_response_length,
        batch_size=cfg.prime.score_micro_batch_size, encoder=trainer.encoder)
    labels = held.scores > 0.5
    return {"auroc": held.auroc, "step": trainer.step, "num": int(labels.size),
            "positives": int(labels.sum()), "report": report_path}
  finally:
    trainer.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  from jaxrl_dense import checkpoint as ckpt_lib
  try:
    cfg = config_lib.from_flags(config_lib.RunConfig)
    if not cfg.checkpoint_dir or not os.path.isdir(cfg.checkpoint_dir):
      raise config_lib.ConfigError("checkpoint_dir", cfg.checkpoint_dir, "must be the run's checkpoint directory")
    if not FLAGS.report or not os.path.isfile(FLAGS.report):
      raise config_lib.ConfigError("report", FLAGS.report, "must be an eval_step*.json report of the run")
    res = heldout_auroc(cfg, FLAGS.report)
  except config_lib.ConfigError as e:
    print(f"prm_auroc.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (ckpt_lib.CheckpointMismatchError, ckpt_lib.CheckpointReadError) as e:  # other flags than the run's
    print(f"prm_auroc.py: error: {e}", file=sys.stderr)
    sys.exit(4)
  print(json.dumps(res))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
