r"""Does the implicit PRM learn step credit? First-wrong-step location on chained arithmetic.

    python experiments/prm_step_credit.py --flagfile=experiments/configs/chain_smollm2.flags \
        --algo=prime --seed=0 --checkpoint_dir=runs/compare_chain/prime/seed0/ckpt \
        --out=runs/compare_chain/prime/seed0/step_credit.json
    python experiments/prm_step_credit.py --flagfile=experiments/configs/chain_smollm2.flags \
        --out=step_credit_initial.json        # no --checkpoint_dir: the initial PRM (= reference)

A ProcessBench-style measurement (Zheng et al., arXiv 2412.06559) on solutions with exact step
labels. For each of `--num_problems` held-out problems of the chain_arith eval split
(`--step_data`, default the run's `--eval_data`), `chain_arith.step_credit_solutions` writes the
correct solution and two corrupted ones whose first wrong step k is known (one equation's result
changed; later steps "propagated" from the wrong value or left "inconsistent"). Each is scored
after the run's prompt by the PRM and the reference (`eval.prm.implicit_prm_rewards`,
token rewards beta * (log pi_prm - log pi_ref), PRIME Eq. 3), the token rewards are summed (or
min-ed) per step through the tokenizer's character offsets (`prm_health.step_ids_from_offsets`,
exact: the same token ids; `eval.prm.implicit_prm_step_rewards`), and `prm_health.first_error_metrics` reports:

* f1 / error_acc / correct_acc: the predicted first wrong step is the first step whose score is
  below a threshold, chosen for the best F1 (`prm_health.choose_threshold`) on a separate
  calibration set (`--calib_problems` further held-out problems, other corruptions);
  ProcessBench's F1 is the harmonic mean of the accuracy on erroneous solutions (exact step) and
  on correct ones (no step flagged);
* argmin_acc: the lowest-scoring step is the first wrong one (no threshold);
* step_auroc: steps before the first error (every step of a correct solution) vs the first
  wrong step; later steps are left out.

Without `--checkpoint_dir` the PRM is the run's initial PRM, which PRIME initialises from the
reference: every implicit reward is then exactly 0 and the metrics are at chance (printed and
recorded as such). With it, the run's latest checkpoint is restored exactly as
`experiments/prm_auroc.py` does (the flags must be the run's: its fingerprint is checked).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from jaxrl_dense.rl import config as config_lib  # noqa: E402

config_lib.define_flags(config_lib.RunConfig)
flags.DEFINE_string("step_data", "", "A chain_arith eval source ('chain_arith:eval[:k=v,...]') whose "
                    "held-out problems are corrupted; default: --eval_data.")
flags.DEFINE_integer("num_problems", 200, "Held-out problems scored (3 solutions each: correct, "
                     "propagated, inconsistent).")
flags.DEFINE_integer("calib_problems", 200, "Further held-out problems (after those scored) on "
                     "which the step-score threshold is chosen.")
flags.DEFINE_integer("corrupt_seed", 0, "Seed of the corruptions (problem i uses [seed, i]).")
flags.DEFINE_integer("num_examples", 3, "Problems whose scored solutions are written in the report.")
flags.DEFINE_string("out", "", "Write the JSON report here.")
FLAGS = flags.FLAGS

PREDICTION = ("first step whose score (sum or min of beta*(log pi_prm - log pi_ref) over its "
              "tokens) is below a threshold chosen for the best F1 on the calibration problems; "
              "argmin_acc: the lowest-scoring step, no threshold")


def _portable(spec: str) -> str:
  """A model spec without its directories when it is a path (the report holds no absolute path)."""
  return os.path.basename(os.path.normpath(spec)) if os.path.sep in spec else spec


def _solutions(task_problems, start: int, count: int, seed: int) -> list:
  from jaxrl_dense.data import chain_arith
  return [sol for i in range(start, start + count)
          for sol in chain_arith.step_credit_solutions(task_problems[i], [seed, i])]


def _score(trainer, task, sols) -> tuple:
  """(sequence rewards [M], token step ids [M, R], token rewards [M, R]) of the M solutions,
  problem-major (a problem's solutions share its prompt)."""
  from jaxrl_dense.eval import prm as eval_prm
  from jaxrl_dense.data import chain_arith
  from jaxrl_dense.rl import prime
  cfg = trainer.cfg
  k = len(chain_arith.CORRUPTION_MODES) + 1
  groups = [sols[i:i + k] for i in range(0, len(sols), k)]
  return eval_prm.implicit_prm_step_rewards(
      prime.model_params(trainer.state, "prm", cfg.prime), trainer.state.ref_params,
      trainer.model_config, trainer.tokenizer,
      [chain_arith.to_record(g[0].problem, task, "eval", cfg.system_prompt or None) for g in groups],
      [[s.text for s in g] for g in groups], [[s.step_spans for s in g] for g in groups],
      beta=cfg.prime.prm.beta, batch_size=cfg.prime.score_micro_batch_size, encoder=trainer.encoder)


def step_credit(cfg: config_lib.RunConfig, *, step_data: str = "", num_problems: int = 200,
                calib_problems: int = 200, corrupt_seed: int = 0, num_examples: int = 3) -> dict:
  """The step-credit report (see the module docstring) of the run's PRM (latest checkpoint when
  cfg.checkpoint_dir is set, else the initial PRM)."""
  import numpy as np
  from jaxrl_dense.observe import prm_health
  from jaxrl_dense.data import chain_arith
  from jaxrl_dense.rl import load
  from jaxrl_dense.rl.trainer import Trainer
  p = cfg.prime
  if not (p.uses_prm and p.needs_ref):
    raise config_lib.ConfigError("algo", p.algo, "has no implicit PRM (PRM + reference) to score")
  spec = step_data or cfg.eval_data
  name = "step_data" if step_data else "eval_data"
  if not chain_arith.is_source(spec):
    raise config_lib.ConfigError(name, spec, "must be a chain_arith source (e.g. chain_arith:eval): "
                                 "its written solutions give the step labels")
  try:
    task, split = chain_arith.parse_source(spec)
  except ValueError as e:
    raise config_lib.ConfigError(name, spec, str(e)) from None
  if split != "eval":
    raise config_lib.ConfigError(name, spec, "must name the held-out split, chain_arith:eval[:...]")
  if num_problems < 1 or calib_problems < 1:
    raise config_lib.ConfigError("num_problems" if num_problems < 1 else "calib_problems",
                                 min(num_problems, calib_problems), "must be >= 1")
  problems = chain_arith.make_problem_splits(task)[1]
  if num_problems + calib_problems > len(problems):
    raise config_lib.ConfigError("num_problems", num_problems,
                                 f"plus --calib_problems={calib_problems} is more than the "
                                 f"{len(problems)} held-out problems of {spec} (raise its num_eval)")
  test = _solutions(problems, 0, num_problems, corrupt_seed)
  calib = _solutions(problems, num_problems, calib_problems, corrupt_seed)

  # The run's checkpoint, opened as the run wrote it (config and --train_data content
  # fingerprint): a mismatch is refused before any model loads.
  ckpt = load.open_checkpointer(cfg, read_only=True)
  trainer = Trainer(cfg)
  try:
    source = "initial"
    if ckpt is not None:
      trainer.resume(ckpt)
      ckpt.close()
      source = "checkpoint"
    is_ref = trainer.prm_is_reference()
    r_t, ids_t, q_t = _score(trainer, task, test)
    _, ids_c, q_c = _score(trainer, task, calib)
  finally:
    trainer.close()

  num_steps = max(s.num_steps for s in test + calib)
  k_t = np.array([s.first_error for s in test])
  k_c = np.array([s.first_error for s in calib])
  modes = np.array([s.mode for s in test])
  all_zero = not np.any(q_t) and not np.any(q_c)

  def floats(d):
    return {key: (int(v) if key.startswith("num_") else float(v)) for key, v in d.items()}

  reductions, examples_scores = {}, None
  for reduce in prm_health.STEP_REDUCTIONS:
    sc_t = np.asarray(prm_health.step_scores(q_t, ids_t, num_steps, reduce=reduce))  # [M, S]
    sc_c = np.asarray(prm_health.step_scores(q_c, ids_c, num_steps, reduce=reduce))
    tau = prm_health.choose_threshold(sc_c, k_c)
    by_mode = {}
    for mode in chain_arith.CORRUPTION_MODES:
      rows = (modes == mode) | (modes == chain_arith.CORRECT)
      by_mode[mode] = floats(prm_health.first_error_metrics(sc_t[rows], k_t[rows], threshold=tau))
    reductions[reduce] = {
        "threshold": tau,
        "calib": floats(prm_health.first_error_metrics(sc_c, k_c, threshold=tau)),
        "test": floats(prm_health.first_error_metrics(sc_t, k_t, threshold=tau)),
        "test_by_mode": by_mode,
    }
    if reduce == "sum":
      examples_scores = sc_t
  correct = modes == chain_arith.CORRECT
  solution_auroc = {mode: float(prm_health.auroc(r_t[rows], correct[rows]))
                    for mode in chain_arith.CORRUPTION_MODES
                    for rows in [(modes == mode) | correct]}
  k = len(chain_arith.CORRUPTION_MODES) + 1
  examples = [{"mode": s.mode, "first_error": s.first_error, "steps": list(s.steps),
               "step_scores_sum": [round(float(v), 6) for v in examples_scores[i, :s.num_steps]],
               "sequence_reward": float(r_t[i])}
              for i, s in enumerate(test[:num_examples * k])]
  hist = {str(v): int(c) for v, c in zip(*np.unique(k_t, return_counts=True))}
  note = ("the PRM equals the reference: every implicit reward is exactly 0, every step score is "
          "0, so every metric is at its constant-score value (step AUROC 0.5; F1 0: one "
          "threshold flags nothing, the other flags step 0 everywhere) - compare with 'chance'"
          if is_ref or all_zero else "")
  return {
      "prm": source,
      "prm_is_reference": bool(is_ref),
      "all_rewards_zero": bool(all_zero),
      "note": note,
      "step": int(trainer.step),
      "model": _portable(cfg.model),
      "algo": p.algo,
      "beta": float(p.prm.beta),
      "step_data": spec,
      "task": task.to_json(),
      "num_problems": num_problems,
      "calib_problems": calib_problems,
      "corrupt_seed": corrupt_seed,
      "num_solutions": {m: int(np.sum(modes == m)) for m in (chain_arith.CORRECT,) + chain_arith.CORRUPTION_MODES},
      "first_error_counts": hist,
      "steps": "one per equation 'a op b = c.' then the answer sentence; the first wrong step is "
               "always an equation",
      "prediction": PREDICTION,
      "reductions": reductions,
      "solution_auroc": solution_auroc,
      "chance": prm_health.chance_metrics([s.num_steps for s in test], k_t),
      "examples": examples,
  }


def summary(res: dict) -> str:
  lines = [f"PRM: {res['prm']} (step {res['step']}, model {res['model']}, beta {res['beta']}), "
           f"{res['num_problems']} problems x 3 solutions {res['num_solutions']}, "
           f"calibration {res['calib_problems']} problems"]
  if res["note"]:
    lines.append("NOTE: " + res["note"])
  ch = res["chance"]
  lines.append(f"chance: f1={ch['f1']:.3f} error_acc={ch['error_acc']:.3f} "
               f"correct_acc={ch['correct_acc']:.3f} argmin_acc={ch['argmin_acc']:.3f} step_auroc=0.5")
  for reduce, d in res["reductions"].items():
    t = d["test"]
    lines.append(f"{reduce:>3}: threshold={d['threshold']:.4g} f1={t['f1']:.3f} "
                 f"error_acc={t['error_acc']:.3f} correct_acc={t['correct_acc']:.3f} "
                 f"argmin_acc={t['argmin_acc']:.3f} step_auroc={t['step_auroc']:.3f} | " +
                 " ".join(f"{m}: f1={v['f1']:.3f} step_auroc={v['step_auroc']:.3f}"
                          for m, v in d["test_by_mode"].items()))
  lines.append("solution AUROC (correct vs corrupted, sequence reward): " +
               " ".join(f"{m}={v:.3f}" for m, v in res["solution_auroc"].items()))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  from jaxrl_dense import checkpoint as ckpt_lib
  try:
    cfg = config_lib.from_flags(config_lib.RunConfig)
    if cfg.checkpoint_dir and not os.path.isdir(cfg.checkpoint_dir):
      raise config_lib.ConfigError("checkpoint_dir", cfg.checkpoint_dir,
                                   "must be the run's checkpoint directory (omit it for the initial PRM)")
    res = step_credit(cfg, step_data=FLAGS.step_data, num_problems=FLAGS.num_problems,
                      calib_problems=FLAGS.calib_problems, corrupt_seed=FLAGS.corrupt_seed,
                      num_examples=FLAGS.num_examples)
  except config_lib.ConfigError as e:
    print(f"prm_step_credit.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (ckpt_lib.CheckpointMismatchError, ckpt_lib.CheckpointReadError) as e:  # not the run's
    print(f"prm_step_credit.py: error: {e}", file=sys.stderr)
    sys.exit(4)
  print(summary(res))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)
