r"""PRIME vs outcome-only RL (RLOO, GRPO) over several seeds, with bootstrap confidence intervals.

    python experiments/compare.py --run_flagfile=experiments/configs/chain_smollm2.flags \
        --methods=prime,rloo --seeds=0,1,2 --steps=24 --out=runs/compare_chain

Runs `experiments/prime_math.py` once per (method, seed) as a subprocess, with the same flag
file and only `--algo`, `--seed`, `--steps`, `--logdir`, `--checkpoint_dir` (and `--resume`)
changed, then summarises what the runs wrote: `<out>/<method>/seed<S>/metrics.jsonl` (one line
per step; eval lines carry `eval/pass@1`) or, failing that, its `eval_step*.json` reports.

Resumable run by run. A run is finished when its `done.json` records the requested `--steps`;
finished runs are skipped. An unfinished run whose checkpoint directory exists is continued with
`--resume` (prime_math restores the last checkpoint and truncates metrics.jsonl to it), so a
comparison can be stopped at any time (Ctrl-C, `--run_timeout`, `--max_runs`) and started
again with the same command; raising `--steps` later continues finished runs from their final
checkpoint. Runs go seed-major (seed 0 of every method, then seed 1, ...), so a stopped
comparison still holds paired seeds. The summary is rewritten after every run.

Equal budgets. Every method runs the same flag file, so each step samples the same
`prompts_per_step * oversample` prompts x `n` responses (PRIME's accuracy-band filter then
keeps `prompts_per_step` groups; `--filter` applies to the baselines too, unless the flag file
says otherwise) with the same `max_response_length`. The budget is therefore defined as
**sampled responses per step x max_response_length** (identical across methods by construction;
compare.py refuses per-method overrides of those flags), and the summary also reports the sampled
response tokens actually generated (sum over steps of `response/length_mean` x sampled rows),
which differ with response lengths.

Outputs in `--out`: `summary.json`, `summary.md` (tables) and `curves.png` (held-out pass@1 per
step: each seed's curve thin, the mean over seeds bold, the 95% bootstrap CI over seeds as a band).

Statistics (seeds are the unit of replication; CIs are percentile bootstraps over seeds):
  * per method: held-out pass@1 at the start and the end, and the gain (end - start), with the
    mean and 95% CI over seeds;
  * PRIME - RLOO: the final pass@1 difference paired by seed (same data order and initial eval),
    mean and 95% CI of the per-seed differences;
  * steps to reach RLOO's final accuracy: for each seed, the first eval step at which the method's
    held-out pass@1 >= RLOO's final pass@1 of that seed (needs `--eval_every` > 0 for a curve;
    "not reached" otherwise), and the ratio to RLOO's own first step at that accuracy (the
    paper's "sample efficiency");
  * PRM health: any logged metric whose name contains "auroc" (e.g. the implicit PRM's held-out
    AUROC against the outcome), last value per seed, mean and CI.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from jaxrl_dense import cli  # noqa: E402

METHODS = ("prime", "rloo", "grpo", "reinforce_pp")
# Flags compare.py sets itself, or that would break the equal budget if changed per run.
_RESERVED = ("algo", "seed", "steps", "logdir", "checkpoint_dir", "resume", "dry_run")
_BUDGET = ("prompts_per_step", "oversample", "n", "max_response_length")
EVAL_KEY = "eval/pass@1"

FLAGS = flags.FLAGS
flags.DEFINE_string("run_flagfile", "", "prime_math flag file shared by every run (required).")
flags.DEFINE_list("methods", ["prime", "rloo", "grpo"],
                  f"--algo values to compare, from {METHODS}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (integers); every method runs every seed.")
flags.DEFINE_integer("steps", 0, "RL steps per run (0 = the flag file's --steps).")
flags.DEFINE_string("out", "runs/compare", "Output directory (one sub-directory per run).")
flags.DEFINE_list("extra_flags", [], "More prime_math flags for every run, e.g. "
                  "--extra_flags=--eval_every=4,--checkpoint_every=4 (not algo/seed/steps/logdir/"
                  "checkpoint_dir/resume, nor the budget flags prompts_per_step/oversample/n/"
                  "max_response_length, which belong in the flag file).")
flags.DEFINE_integer("max_runs", 0, "Start at most this many unfinished runs now (0 = all).")
flags.DEFINE_float("run_timeout", 0.0, "Stop a run after this many seconds (it is resumed next "
                   "time from its last checkpoint); 0 = no limit.")
flags.DEFINE_bool("summarize_only", False, "Do not train; summarise the runs found in --out.")
flags.DEFINE_integer("bootstrap", 10000, "Bootstrap resamples for the confidence intervals.")
flags.DEFINE_float("ci", 0.95, "Confidence level of the intervals.")
flags.DEFINE_string("baseline", "rloo", "The method PRIME is compared against (paired by seed).")
flags.DEFINE_string("trainer", os.path.join(_REPO, "experiments", "prime_math.py"),
                    "Training script run per (method, seed) (tests use a stand-in).")
flags.DEFINE_bool("plot", True, "Write curves.png (needs matplotlib).")
flags.DEFINE_bool("share_start_eval", True, "Runs without a step-0 eval (--extra_flags="
                  "--eval_at_start=false) take it from the runs that have one: greedy decoding of "
                  "the same initial model, identical for every method and seed (shared only when "
                  "all measured values agree).")


class CompareError(ValueError):
  """Invalid comparison settings; the message names the flag."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], *, num_resamples: int = 10000, ci: float = 0.95,
                 seed: int = 0) -> dict:
  """Mean and percentile-bootstrap CI of the mean (Efron & Tibshirani 1993, ch. 13).

  Resamples the n values with replacement `num_resamples` times; the interval is the
  ((1 - ci)/2, (1 + ci)/2) quantiles of the resampled means. Deterministic in `seed`.
  n = 1 gives a zero-width interval at the value (no spread can be estimated; `n` says so);
  n = 0 gives NaNs. Non-finite values raise.

  Returns {"n", "mean", "lo", "hi", "std", "t_lo", "t_hi"} (std: sample standard deviation,
  ddof=1; t_lo / t_hi: the Student-t interval mean -/+ t_{n-1} std / sqrt(n), NaN at n < 2 or
  without scipy). With few seeds (n <= 5) the percentile bootstrap is too narrow (it cannot see
  more spread than the n values show); read the t interval next to it.
  """
  x = np.asarray([float(v) for v in values], np.float64)
  if not 0 < ci < 1:
    raise ValueError(f"bootstrap_ci: ci must be in (0, 1), got {ci}")
  if num_resamples < 1:
    raise ValueError(f"bootstrap_ci: num_resamples must be >= 1, got {num_resamples}")
  if not np.isfinite(x).all():
    raise ValueError(f"bootstrap_ci: values must be finite, got {x.tolist()}")
  n = x.size
  nan = math.nan
  if n == 0:
    return {"n": 0, "mean": nan, "lo": nan, "hi": nan, "std": nan, "t_lo": nan, "t_hi": nan}
  mean = float(x.mean())
  if n == 1:
    return {"n": 1, "mean": mean, "lo": mean, "hi": mean, "std": nan, "t_lo": nan, "t_hi": nan}
  std = float(x.std(ddof=1))
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(num_resamples, n))  # [R, n]
  means = x[idx].mean(axis=1)  # [R]
  lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
  try:
    from scipy import stats
    half = float(stats.t.ppf((1 + ci) / 2, n - 1)) * std / math.sqrt(n)
  except ImportError:
    half = nan
  return {"n": int(n), "mean": mean, "lo": float(lo), "hi": float(hi), "std": std,
          "t_lo": mean - half, "t_hi": mean + half}


def paired_differences(a: dict, b: dict) -> dict:
  """{seed: a[seed] - b[seed]} over the seeds present (and not None) in both."""
  return {s: float(a[s]) - float(b[s]) for s in sorted(a, key=str)
          if s in b and a[s] is not None and b[s] is not None}


def steps_to_reach(curve: Sequence[Sequence[float]], target: float) -> Optional[int]:
  """The first step of `curve` ([(step, acc), ...] sorted by step) with acc >= target, or None."""
  for step, acc in curve:
    if acc >= target - 1e-12:
      return int(step)
  return None


# --------------------------------------------------------------------------------------------
# Flag files and runs
# --------------------------------------------------------------------------------------------
def extra_flag_names(args: Sequence[str]) -> list:
  """The flag names of `--extra_flags` entries ('--name=value', '--flag', '--noflag')."""
  names = []
  for a in args:
    if not a.startswith("--"):
      raise CompareError(f"--extra_flags: expected '--name=value', got {a!r}")
    body = a[2:].split("=", 1)[0]
    names.append(body[2:] if "=" not in a and body.startswith("no") else body)
  return names


def run_config(flagfile: str, extra: Sequence[str]):
  """The RunConfig every run starts from: the flag file and --extra_flags read by the trainer's
  own parser (`rl.config.from_args`), so a bad value fails here, naming the flag, before any run."""
  from absl import flags as absl_flags
  from jaxrl_dense.rl import config as config_lib
  try:
    return config_lib.from_args([f"--flagfile={flagfile}", *extra])
  except config_lib.ConfigError as e:
    raise CompareError(f"--run_flagfile={flagfile} / --extra_flags: {e}") from None
  except absl_flags.Error as e:
    raise CompareError(f"--run_flagfile={flagfile} / --extra_flags: {e}") from None


@dataclasses.dataclass(frozen=True)
class RunSpec:
  method: str
  seed: int
  dir: str

  @property
  def ckpt_dir(self) -> str:
    return os.path.join(self.dir, "ckpt")

  @property
  def name(self) -> str:
    return f"{self.method}/seed{self.seed}"


def run_specs(out: str, methods: Sequence[str], seeds: Sequence[int]) -> list:
  """Seed-major order: every method of seed 0, then seed 1, ..."""
  return [RunSpec(m, s, os.path.join(out, m, f"seed{s}")) for s in seeds for m in methods]


def run_status(spec: RunSpec, steps: int) -> str:
  """"done" (done.json records `steps`), "resume" (a checkpoint directory exists) or "new"."""
  done = os.path.join(spec.dir, "done.json")
  if os.path.exists(done):
    try:
      with open(done) as f:
        if int(json.load(f).get("steps", -1)) == steps:
          return "done"
    except (json.JSONDecodeError, ValueError, OSError):
      pass
  if os.path.isdir(spec.ckpt_dir) and os.listdir(spec.ckpt_dir):
    return "resume"
  return "new"


def run_command(spec: RunSpec, *, python: str, trainer: str, flagfile: str, steps: int,
                extra: Sequence[str], resume: bool) -> list:
  if spec.method != "prime":  # prime_math refuses PRM-only flags typed for a run without the PRM
    from jaxrl_dense.rl.config import PRM_ONLY
    extra = [a for a in extra if a[2:].split("=", 1)[0] not in PRM_ONLY]
  cmd = [python, trainer, f"--flagfile={flagfile}", *extra, f"--algo={spec.method}",
         f"--seed={spec.seed}", f"--steps={steps}", f"--logdir={spec.dir}",
         f"--checkpoint_dir={spec.ckpt_dir}", "--progress=false"]
  if resume:
    cmd.append("--resume")
  return cmd


def execute(spec: RunSpec, cmd: list, timeout: float) -> tuple:
  """Runs `cmd` (its own process group), output appended to <dir>/train.log.
  Returns (return code or None on timeout, seconds)."""
  os.makedirs(spec.dir, exist_ok=True)
  t0 = time.time()
  with open(os.path.join(spec.dir, "train.log"), "a") as log:
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO,
                            start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      rc = None
    except KeyboardInterrupt:
      os.killpg(proc.pid, signal.SIGTERM)
      proc.wait()
      raise
  return rc, time.time() - t0


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------
def read_metrics(run_dir: str) -> list:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: ignore it
          continue
  return out


def eval_curve(run_dir: str, records: Optional[list] = None, key: str = EVAL_KEY) -> list:
  """[(step, held-out pass@1)] sorted by step (the last value logged for a step wins), from
  metrics.jsonl, else from the eval_step*.json reports."""
  records = read_metrics(run_dir) if records is None else records
  by_step: dict = {}
  for r in records:
    if key in r and r[key] is not None and math.isfinite(float(r[key])):
      by_step[int(r.get("step", 0))] = float(r[key])
  if not by_step:
    for p in sorted(glob.glob(os.path.join(run_dir, "eval_step*.json"))):
      try:
        with open(p) as f:
          rep = json.load(f)
      except (json.JSONDecodeError, OSError):
        continue
      # evaluation.write_report layout ({"step", "summary": {"accuracy", ...}}) or a flat one.
      val = rep.get(key, rep.get("summary", {}).get("accuracy"))
      if val is not None and "step" in rep:
        by_step[int(rep["step"])] = float(val)
  return sorted(by_step.items())


def sampled_tokens(records: list, sampled_rows: int) -> float:
  """Sum over training steps of the sampled response tokens: `response/sampled_tokens` when
  logged, else response/length_mean (over every sampled response) x sampled rows."""
  total = 0.0
  for r in records:
    if "outcome/acc" not in r:  # not a training-step line
      continue
    if "response/sampled_tokens" in r:
      total += float(r["response/sampled_tokens"])
    elif "response/length_mean" in r:
      total += float(r["response/length_mean"]) * sampled_rows
  return total


def auroc_series(records: list) -> dict:
  """{metric name: [(step, value)]} for every logged metric whose name contains 'auroc'."""
  out: dict = {}
  for r in records:
    for k, v in r.items():
      if "auroc" in k.lower() and isinstance(v, (int, float)) and math.isfinite(float(v)):
        out.setdefault(k, []).append((int(r.get("step", 0)), float(v)))
  return out


def summarize_run(spec: RunSpec, sampled_rows: int, steps: int) -> dict:
  records = read_metrics(spec.dir)
  curve = eval_curve(spec.dir, records)
  train_steps = [int(r["step"]) for r in records if "outcome/acc" in r]
  start = curve[0][1] if curve and curve[0][0] == 0 else None
  final = curve[-1][1] if curve and curve[-1][0] == steps else None
  done = os.path.exists(os.path.join(spec.dir, "done.json"))
  wall = None
  if done:
    with open(os.path.join(spec.dir, "done.json")) as f:
      wall = json.load(f).get("wall_s")
  return {
      "method": spec.method, "seed": spec.seed, "dir": spec.dir, "status": run_status(spec, steps),
      "steps_done": max(train_steps) if train_steps else 0, "curve": curve,
      "start": start, "final": final,
      "gain": (final - start) if start is not None and final is not None else None,
      "sampled_tokens": sampled_tokens(records, sampled_rows),
      "auroc": auroc_series(records), "wall_s": wall,
  }


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def summarize(runs: list, *, methods: Sequence[str], seeds: Sequence[int], steps: int,
              budget: dict, baseline: str = "rloo", num_resamples: int = 10000,
              ci: float = 0.95, config: Optional[dict] = None) -> dict:
  """The summary dict (see the module docstring) of per-run summaries (`summarize_run`)."""
  boot = lambda v: bootstrap_ci(v, num_resamples=num_resamples, ci=ci)
  by = {(r["method"], r["seed"]): r for r in runs}
  out = {"config": dict(config or {}), "steps": steps, "seeds": list(seeds),
         "methods": list(methods), "budget": budget, "ci": ci, "bootstrap": num_resamples,
         "runs": [{k: v for k, v in r.items()} for r in runs], "per_method": {}}
  for m in methods:
    rs = [by[(m, s)] for s in seeds if (m, s) in by]
    fin = [r for r in rs if r["final"] is not None]
    out["per_method"][m] = {
        "runs_finished": len(fin), "runs": len(rs),
        "start": boot([r["start"] for r in fin if r["start"] is not None]),
        "final": boot([r["final"] for r in fin]),
        "gain": boot([r["gain"] for r in fin if r["gain"] is not None]),
        "sampled_tokens_mean": float(np.mean([r["sampled_tokens"] for r in fin])) if fin else None,
    }
  # Paired differences and steps-to-reach against the baseline.
  base_final = {s: by[(baseline, s)]["final"] for s in seeds if (baseline, s) in by}
  base_curve = {s: by[(baseline, s)]["curve"] for s in seeds if (baseline, s) in by}
  out["paired"] = {}
  out["steps_to_baseline_final"] = {}
  for m in methods:
    if m == baseline:
      continue
    fin = {s: by[(m, s)]["final"] for s in seeds if (m, s) in by}
    gains = {s: by[(m, s)]["gain"] for s in seeds if (m, s) in by}
    base_gain = {s: by[(baseline, s)]["gain"] for s in seeds if (baseline, s) in by}
    d = paired_differences(fin, base_final)
    dg = paired_differences(gains, base_gain)
    out["paired"][f"{m} - {baseline}"] = {"final": {**boot(list(d.values())), "per_seed": d},
                                          "gain": {**boot(list(dg.values())), "per_seed": dg}}
  for m in methods:
    per_seed = {}
    for s in seeds:
      if (m, s) not in by or base_final.get(s) is None:
        continue
      target = base_final[s]
      reached = steps_to_reach(by[(m, s)]["curve"], target)
      base_reached = steps_to_reach(base_curve[s], target)
      per_seed[s] = {"target": target, "step": reached, "baseline_step": base_reached,
                     "efficiency": (base_reached / reached) if reached and base_reached else None}
    reached = [v["step"] for v in per_seed.values() if v["step"] is not None]
    eff = [v["efficiency"] for v in per_seed.values() if v["efficiency"] is not None]
    out["steps_to_baseline_final"][m] = {
        "per_seed": per_seed, "reached": len(reached), "seeds": len(per_seed),
        "steps": boot(reached), "efficiency": boot(eff)}
  # PRM health (whatever AUROC metrics the runs log).
  out["auroc"] = {}
  for m in methods:
    keys = sorted({k for s in seeds if (m, s) in by for k in by[(m, s)]["auroc"]})
    for k in keys:
      last = {s: by[(m, s)]["auroc"][k][-1][1] for s in seeds
              if (m, s) in by and by[(m, s)]["auroc"].get(k)}
      first = {s: by[(m, s)]["auroc"][k][0][1] for s in seeds
               if (m, s) in by and by[(m, s)]["auroc"].get(k)}
      out["auroc"].setdefault(m, {})[k] = {"last": boot(list(last.values())),
                                           "first": boot(list(first.values())),
                                           "per_seed_last": last}
  return out


def _fmt_ci(c: dict, pct: bool = True, signed: bool = False, t: bool = False) -> str:
  """'mean [lo, hi] (n=N)' (pct: x100 with 1 decimal; else 3 significant digits); with t, the
  Student-t interval follows as 't [lo, hi]'."""
  if not c or c.get("n", 0) == 0 or c["mean"] is None or math.isnan(c["mean"]):
    return "–"
  f = 100.0 if pct else 1.0
  sign = "+" if signed else ""
  spec = f"{sign}.1f" if pct else f"{sign}.3g"
  unit = " pt" if pct and signed else ("%" if pct else "")
  body = f"{c['mean'] * f:{spec}}{unit}"
  if c["n"] > 1:
    body += f" [{c['lo'] * f:{spec}}, {c['hi'] * f:{spec}}]"
    if t and not math.isnan(c.get("t_lo", math.nan)):
      body += f"; t [{c['t_lo'] * f:{spec}}, {c['t_hi'] * f:{spec}}]"
  return body + f" (n={c['n']})"


def to_markdown(s: dict, plot: Optional[str] = None) -> str:
  pc = int(round(s["ci"] * 100))
  b = s["budget"]
  lines = [f"## PRIME vs outcome-only RL: {len(s['seeds'])} seeds x {len(s['methods'])} methods, "
           f"{s['steps']} steps", "",
           f"Budget per step, equal for every method: {b.get('sampled_rows_per_step')} sampled "
           f"responses ({b.get('sampled_prompts_per_step')} prompts x n={b.get('n')}) x max "
           f"{b.get('max_response_length')} tokens = {b.get('max_sampled_tokens_per_step')} "
           f"sampled-token budget. Held-out pass@1 (greedy); mean over seeds with the {pc}% "
           f"percentile-bootstrap CI over seeds (paired rows add the Student-t interval, "
           f"wider and more honest with few seeds).", "",
           "| method | runs done | start pass@1 | final pass@1 | gain | sampled tokens / run |",
           "|---|---|---|---|---|---|"]
  for m, v in s["per_method"].items():
    tok = f"{v['sampled_tokens_mean']:.0f}" if v["sampled_tokens_mean"] is not None else "–"
    lines.append(f"| {m} | {v['runs_finished']}/{len(s['seeds'])} | {_fmt_ci(v['start'])} | "
                 f"{_fmt_ci(v['final'])} | {_fmt_ci(v['gain'], signed=True)} | {tok} |")
  if s["paired"]:
    lines += ["", "| paired by seed | final pass@1 difference | gain difference | "
              "per seed (final) |", "|---|---|---|---|"]
    for name, v in s["paired"].items():
      per = ", ".join(f"{k}: {100 * x:+.1f}" for k, x in v["final"]["per_seed"].items())
      lines.append(f"| {name} | {_fmt_ci(v['final'], signed=True, t=True)} | "
                   f"{_fmt_ci(v['gain'], signed=True, t=True)} | {per or '–'} |")
  lines += ["", "| method | seeds reaching the baseline's final pass@1 | first step (mean) | "
            "baseline steps / method steps |", "|---|---|---|---|"]
  for m, v in s["steps_to_baseline_final"].items():
    lines.append(f"| {m} | {v['reached']}/{v['seeds']} | {_fmt_ci(v['steps'], pct=False)} | "
                 f"{_fmt_ci(v['efficiency'], pct=False)} |")
  if s["auroc"]:
    lines += ["", "| method | PRM metric | first (mean) | last (mean) |", "|---|---|---|---|"]
    for m, d in s["auroc"].items():
      for k, v in d.items():
        lines.append(f"| {m} | {k} | {_fmt_ci(v['first'], pct=False)} | "
                     f"{_fmt_ci(v['last'], pct=False)} |")
  if plot:
    lines += ["", f"![held-out pass@1 per step]({os.path.basename(plot)})"]
  return "\n".join(lines) + "\n"


def plot_curves(s: dict, path: str) -> Optional[str]:
  """Each seed's held-out pass@1 curve (thin), the mean over seeds (bold) and the CI band."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, m in enumerate(s["methods"]):
    col = colors[i % len(colors)]
    curves = [r["curve"] for r in s["runs"] if r["method"] == m and r["curve"]]
    for c in curves:
      ax.plot([x for x, _ in c], [100 * y for _, y in c], color=col, alpha=0.3, lw=1)
    if not curves:
      continue
    common = sorted(set.intersection(*[{x for x, _ in c} for c in curves]))
    mean, lo, hi = [], [], []
    for step in common:
      vals = [dict(c)[step] for c in curves]
      b = bootstrap_ci(vals, num_resamples=min(s["bootstrap"], 2000), ci=s["ci"])
      mean.append(100 * b["mean"]), lo.append(100 * b["lo"]), hi.append(100 * b["hi"])
    ax.plot(common, mean, color=col, lw=2.5, marker="o", ms=3,
            label=f"{m} (mean of {len(curves)} seeds)")
    if len(curves) > 1:
      ax.fill_between(common, lo, hi, color=col, alpha=0.15)
  ax.set_xlabel("RL step")
  ax.set_ylabel("held-out pass@1 (%)")
  ax.set_title(f"Held-out pass@1, {int(round(100 * s['ci']))}% bootstrap CI over seeds")
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_summary(s: dict, out: str, plot: bool = True) -> dict:
  os.makedirs(out, exist_ok=True)
  png = plot_curves(s, os.path.join(out, "curves.png")) if plot else None
  paths = {"json": os.path.join(out, "summary.json"), "md": os.path.join(out, "summary.md")}
  with open(paths["json"] + ".tmp", "w") as f:
    json.dump(s, f, indent=1, default=str)
  os.replace(paths["json"] + ".tmp", paths["json"])
  with open(paths["md"], "w") as f:
    f.write(to_markdown(s, png))
  if png:
    paths["png"] = png
  return paths


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def settings_from_flags() -> dict:
  f = FLAGS
  if not f.run_flagfile or not os.path.isfile(f.run_flagfile):
    raise CompareError(f"--run_flagfile={f.run_flagfile!r}: not a file (a prime_math flag file)")
  methods = [m.strip() for m in f.methods if m.strip()]
  bad = [m for m in methods if m not in METHODS]
  if not methods or bad or len(set(methods)) != len(methods):
    raise CompareError(f"--methods={','.join(f.methods)}: expected distinct values from {METHODS}")
  try:
    seeds = [int(s) for s in f.seeds]
  except ValueError:
    raise CompareError(f"--seeds={','.join(f.seeds)}: expected integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise CompareError(f"--seeds={','.join(f.seeds)}: expected distinct integers")
  if f.baseline not in methods and "prime" in methods and len(methods) > 1:
    raise CompareError(f"--baseline={f.baseline!r} is not one of --methods={methods}")
  for k in extra_flag_names(f.extra_flags):
    if k in _RESERVED or k in _BUDGET:
      raise CompareError(f"--extra_flags: --{k} is set by compare.py or fixes the equal budget; "
                         f"put budget flags in --run_flagfile")
  cfg = run_config(f.run_flagfile, f.extra_flags)
  steps = f.steps or cfg.steps
  if steps < 1:
    raise CompareError(f"--steps={steps}: must be >= 1")
  ro = cfg.prime.rollout
  p, o, n, r = ro.prompts_per_step, ro.oversample, ro.n, ro.max_response_length
  budget = {"sampled_prompts_per_step": p * o, "n": n, "sampled_rows_per_step": p * o * n,
            "trained_rows_per_step": p * n, "max_response_length": r,
            "max_sampled_tokens_per_step": p * o * n * r, "filter": cfg.prime.filter.filter,
            "filter_mode": cfg.prime.filter_protocol}
  return {"methods": methods, "seeds": seeds, "steps": steps, "budget": budget,
          "extra": list(f.extra_flags), "flagfile": os.path.abspath(f.run_flagfile),
          "out": f.out, "trainer": os.path.abspath(f.trainer)}


def share_start_eval(runs: list) -> list:
  """Fills the step-0 eval of runs started with `--eval_at_start=false` from the runs that have
  one. The step-0 eval is greedy decoding of the same initial model on the same problems, so it
  is one number for every method and seed; it is shared only when every run that measured it
  agrees exactly (else nothing changes). Shared values are marked `"start_shared": True`."""
  measured = {r["start"] for r in runs if r["start"] is not None}
  if len(measured) != 1:
    return runs
  (value,) = measured
  out = []
  for r in runs:
    if r["start"] is None and r["curve"]:
      r = dict(r, start=value, curve=[(0, value)] + list(r["curve"]), start_shared=True)
      if r["final"] is not None:
        r["gain"] = r["final"] - value
    out.append(r)
  return out


def collect(cfg: dict) -> dict:
  specs = run_specs(cfg["out"], cfg["methods"], cfg["seeds"])
  runs = [summarize_run(sp, cfg["budget"]["sampled_rows_per_step"], cfg["steps"]) for sp in specs]
  if FLAGS.share_start_eval:
    runs = share_start_eval(runs)
  return summarize(runs, methods=cfg["methods"], seeds=cfg["seeds"], steps=cfg["steps"],
                   budget=cfg["budget"], baseline=FLAGS.baseline, num_resamples=FLAGS.bootstrap,
                   ci=FLAGS.ci, config={k: cfg[k] for k in ("flagfile", "extra", "trainer")})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = settings_from_flags()
  except CompareError as e:
    print(f"compare.py: error: {e}", file=sys.stderr)
    return 2
  failed = []
  if not FLAGS.summarize_only:
    started = 0
    for spec in run_specs(cfg["out"], cfg["methods"], cfg["seeds"]):
      status = run_status(spec, cfg["steps"])
      if status == "done":
        print(f"[compare] {spec.name}: done, skipped")
        continue
      if FLAGS.max_runs and started >= FLAGS.max_runs:
        print(f"[compare] --max_runs={FLAGS.max_runs} reached; rerun the same command to continue")
        break
      started += 1
      cmd = run_command(spec, python=sys.executable, trainer=cfg["trainer"],
                        flagfile=cfg["flagfile"], steps=cfg["steps"],
                        extra=cfg["extra"], resume=(status == "resume"))
      print(f"[compare] {spec.name}: {'resuming' if status == 'resume' else 'starting'} "
            f"({shlex.join(cmd[1:])})", flush=True)
      rc, secs = execute(spec, cmd, FLAGS.run_timeout)
      if rc == 0:
        with open(os.path.join(spec.dir, "done.json"), "w") as f:
          json.dump({"steps": cfg["steps"], "wall_s": secs, "command": cmd}, f, indent=1)
        print(f"[compare] {spec.name}: finished in {secs:.0f}s")
      elif rc is None:
        print(f"[compare] {spec.name}: stopped after --run_timeout={FLAGS.run_timeout:.0f}s; "
              f"rerun to resume it")
      else:
        failed.append(spec.name)
        print(f"[compare] {spec.name}: failed (exit {rc}); see {spec.dir}/train.log",
              file=sys.stderr)
      paths = write_summary(collect(cfg), cfg["out"], plot=FLAGS.plot)
  summary = collect(cfg)
  paths = write_summary(summary, cfg["out"], plot=FLAGS.plot)
  print(to_markdown(summary, paths.get("png")))
  print(f"[compare] summary: {paths['json']}, {paths['md']}" +
        (f", {paths['png']}" if "png" in paths else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(lambda argv: sys.exit(main(argv)))
