r"""Do the turn-level estimators learn to use a tool? MatchTIR / IGPO / outcome-only GRPO from one
warm start, several seeds, through `experiments/prime_math.py`.

    python experiments/tool_warmstart.py --out=runs/tool_calc_tiny/warmstart
    python experiments/tool_learning.py --out=runs/tool_calc_tiny --seeds=1,2,3 \
        --arms=grpo,matchtir,igpo
    python experiments/tool_learning.py --out=runs/tool_calc_tiny --summarize_only

Each (arm, seed) runs `prime_math.py --flagfile=experiments/configs/tool_calc_tiny.flags
--advantage=<arm> --seed=<seed> --logdir=<out>/<arm>/seed<seed>` (arm "grpo" = --advantage= unset,
the outcome-only control), one after the other; a run whose end-of-run eval report exists is
skipped. Extra trainer flags go after `--`.

Summary (`<out>/summary.json`, `<out>/summary.md`), seeds as the unit of replication:
  * held-out greedy pass@1 at step 0 and at the end (the trainer's eval reports), the gain
    end - start per seed, its mean and 95% Student-t interval (mean +- t_{0.975, k-1} s / sqrt(k));
  * the same for the held-out tool-call rate (fraction of eval problems whose greedy episode calls
    the calculator, read from the reports' episodes), and for the training rollouts' sampled
    accuracy and `env/tool_calls_per_row` (step 1, sampled from the warm start before any update
    -> the mean of the last 3 steps);
  * each turn-level arm minus GRPO, paired by seed (same data order), on the final pass@1.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("out", "runs/tool_calc_tiny", "Output folder: <out>/<arm>/seed<S>/ per run.")
flags.DEFINE_list("arms", ["grpo", "matchtir", "igpo"], "Arms: grpo (outcome-only) or an --advantage name.")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Trainer seeds (data order and sampling).")
flags.DEFINE_string("flagfile_run", os.path.join(_REPO, "experiments", "configs", "tool_calc_tiny.flags"),
                    "The trainer flag file.")
flags.DEFINE_bool("summarize_only", False, "Only summarise the runs found under --out.")
flags.DEFINE_integer("nice", 5, "Niceness of the trainer processes.")
FLAGS = flags.FLAGS
WINDOW = 3  # training-rollout means over the last WINDOW steps


def t_interval(values) -> dict:
  """Mean and 95% Student-t interval of the per-seed values (None bounds for fewer than 2)."""
  import numpy as np
  from scipy import stats
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  out = {"mean": float(v.mean()) if v.size else None, "n": int(v.size), "values": [float(x) for x in v]}
  if v.size >= 2:
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    out.update(lo=out["mean"] - half, hi=out["mean"] + half)
  else:
    out.update(lo=None, hi=None)
  return out


def eval_report(run_dir: str, which: str):
  files = sorted(glob.glob(os.path.join(run_dir, f"eval_step*_{which}.json")))
  return json.load(open(files[-1])) if files else None


def tool_rate(report: dict) -> float:
  """Fraction of problems whose (first) greedy episode calls a tool (a turn holding '</tool>')."""
  calls = [any("</tool>" in t for t in p["episodes"][0]["turns"]) for p in report["problems"]]
  return sum(calls) / len(calls)


def summarize_run(run_dir: str) -> dict | None:
  start, end = eval_report(run_dir, "start"), eval_report(run_dir, "end")
  if start is None or end is None:
    return None
  rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  steps = [r for r in rows if "step" in r and "outcome/acc_sampled" in r]
  steps = sorted({r["step"]: r for r in steps}.values(), key=lambda r: r["step"])
  mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
  return {"pass_start": start["summary"]["pass@1"], "pass_end": end["summary"]["pass@1"],
          "tool_start": tool_rate(start), "tool_end": tool_rate(end), "steps": len(steps),
          "num_eval": start["summary"]["num_problems"],
          "train_acc_first": steps[0]["outcome/acc_sampled"],
          "train_acc_last": mean(steps[-WINDOW:], "outcome/acc_sampled"),
          "train_tool_first": steps[0]["env/tool_calls_per_row"],
          "train_tool_last": mean(steps[-WINDOW:], "env/tool_calls_per_row"),
          "step_seconds": mean(steps[1:], "time/step") if len(steps) > 1 else None,
          "curve_acc": [r["outcome/acc_sampled"] for r in steps],
          "curve_tool": [r["env/tool_calls_per_row"] for r in steps]}


def summarize(out: str, arms, seeds) -> dict:
  runs = {a: {s: summarize_run(os.path.join(out, a, f"seed{s}")) for s in seeds} for a in arms}
  res = {"arms": {}, "paired_vs_grpo": {}, "runs": runs}
  for a in arms:
    done = {s: r for s, r in runs[a].items() if r}
    col = lambda k: [r[k] for r in done.values()]
    res["arms"][a] = {
        "seeds": sorted(done), "pass_start": t_interval(col("pass_start")), "pass_end": t_interval(col("pass_end")),
        "gain": t_interval([r["pass_end"] - r["pass_start"] for r in done.values()]),
        "tool_start": t_interval(col("tool_start")), "tool_end": t_interval(col("tool_end")),
        "train_acc_first": t_interval(col("train_acc_first")), "train_acc_last": t_interval(col("train_acc_last")),
        "train_tool_first": t_interval(col("train_tool_first")),
        "train_tool_last": t_interval(col("train_tool_last")),
        # per step, the mean over seeds of the training rollouts' sampled accuracy / calls per row
        "curve_acc": [sum(c) / len(c) for c in zip(*col("curve_acc"))] if done else [],
        "curve_tool": [sum(c) / len(c) for c in zip(*col("curve_tool"))] if done else []}
  if "grpo" in arms:
    for a in arms:
      if a == "grpo":
        continue
      both = [s for s in seeds if runs[a][s] and runs["grpo"][s]]
      res["paired_vs_grpo"][a] = {
          "seeds": both,
          "pass_end": t_interval([runs[a][s]["pass_end"] - runs["grpo"][s]["pass_end"] for s in both]),
          "tool_end": t_interval([runs[a][s]["tool_end"] - runs["grpo"][s]["tool_end"] for s in both])}
  return res


def _ci(c: dict, pct: bool = True, signed: bool = False) -> str:
  if c["mean"] is None:
    return "–"
  sign = "+" if signed else ""
  g = (lambda x: f"{100 * x:{sign}.1f}") if pct else (lambda x: f"{x:{sign}.3f}")
  f = g
  if c["lo"] is None:
    return g(c["mean"])
  return f"{g(c['mean'])} [{f(c['lo'])}, {f(c['hi'])}]"


def to_markdown(res: dict) -> str:
  lines = ["| arm | seeds | pass@1 start | pass@1 end | gain [95% t CI] | eval tool rate start -> end | "
           "train acc (sampled) step 1 -> last 3 | train tool calls/row step 1 -> last 3 |",
           "|---|---|---|---|---|---|---|---|"]
  for a, v in res["arms"].items():
    lines.append(f"| {a} | {len(v['seeds'])} | {_ci(v['pass_start'])} | {_ci(v['pass_end'])} | {_ci(v['gain'], signed=True)} | "
                 f"{_ci(v['tool_start'])} -> {_ci(v['tool_end'])} | {_ci(v['train_acc_first'])} -> "
                 f"{_ci(v['train_acc_last'])} | {_ci(v['train_tool_first'], False)} -> "
                 f"{_ci(v['train_tool_last'], False)} |")
  if res["paired_vs_grpo"]:
    lines += ["", "| arm - grpo (paired by seed) | seeds | final pass@1 [95% t CI] | final eval tool rate |",
              "|---|---|---|---|"]
    for a, v in res["paired_vs_grpo"].items():
      lines.append(f"| {a} | {len(v['seeds'])} | {_ci(v['pass_end'], signed=True)} | {_ci(v['tool_end'], signed=True)} |")
  lines += ["", "Training rollouts per step (mean over seeds; sampled accuracy / tool calls per row):", ""]
  for a, v in res["arms"].items():
    lines.append(f"- {a}: acc " + " ".join(f"{x:.2f}" for x in v["curve_acc"]) + "; calls "
                 + " ".join(f"{x:.2f}" for x in v["curve_tool"]))
  lines += ["", "Per run (pass@1 start -> end, eval tool rate start -> end, steps, s/step):", ""]
  for a, rs in res["runs"].items():
    for s, r in rs.items():
      if r:
        lines.append(f"- {a} seed {s}: {r['pass_start']:.3f} -> {r['pass_end']:.3f}, tool {r['tool_start']:.3f} -> "
                     f"{r['tool_end']:.3f}, {r['steps']} steps, {r['step_seconds'] or float('nan'):.1f} s/step")
  return "\n".join(lines) + "\n"


def main(argv):
  extra = list(argv[1:])
  if not FLAGS.summarize_only:
    for s in FLAGS.seeds:  # seed-major: a stopped batch still holds paired seeds
      for a in FLAGS.arms:
        run_dir = os.path.join(FLAGS.out, a, f"seed{s}")
        if summarize_run(run_dir) is not None:
          continue
        cmd = ["nice", "-n", str(FLAGS.nice), sys.executable, os.path.join(_REPO, "experiments", "prime_math.py"),
               f"--flagfile={FLAGS.flagfile_run}", f"--advantage={'' if a == 'grpo' else a}", f"--seed={s}",
               f"--logdir={run_dir}", *extra]
        os.makedirs(run_dir, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(run_dir, "stdout.log"), "w") as log:
          rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO)
        print(f"[tool_learning] {a} seed {s}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  res = summarize(FLAGS.out, FLAGS.arms, FLAGS.seeds)
  with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
    json.dump(res, f, indent=1)
  md = to_markdown(res)
  with open(os.path.join(FLAGS.out, "summary.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)
