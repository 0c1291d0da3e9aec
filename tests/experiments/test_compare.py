"""experiments/compare.py: statistics (bootstrap CI, paired differences, steps to reach), the
resumable run loop (against a fast stand-in trainer), and one end-to-end comparison on the tiny
smoke configuration with the real prime_math.py."""
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.experiments._experiment_module import REPO, load_experiment

compare = load_experiment("compare")


# ------------------------------------------------------------------------------ statistics
def exact_bootstrap_quantiles(x, q):
  """Quantiles of the exact bootstrap distribution of the mean (all n^n resamples)."""
  means = [np.mean(c) for c in itertools.product(x, repeat=len(x))]
  return np.quantile(means, q, method="inverted_cdf")  # the distribution's own quantiles


def test_bootstrap_ci_matches_exact_bootstrap_distribution():
  x = [0.0, 1.0, 2.0]  # resample sums 0..6 with counts 1,3,6,7,6,3,1 of 27
  c = compare.bootstrap_ci(x, num_resamples=200000, ci=0.95, seed=1)
  assert c["n"] == 3 and c["mean"] == pytest.approx(1.0) and c["std"] == pytest.approx(1.0)
  # P(mean = 0) = P(mean = 2) = 1/27 > 2.5%: the percentile interval is exactly [0, 2].
  assert (c["lo"], c["hi"]) == (0.0, 2.0)
  lo, hi = exact_bootstrap_quantiles(x, [0.025, 0.975])
  assert (c["lo"], c["hi"]) == (lo, hi)
  # At 50% the interval is the exact distribution's quartiles (2/3 and 4/3: atoms of mass 6/27).
  c50 = compare.bootstrap_ci(x, num_resamples=200000, ci=0.5, seed=1)
  assert (c50["lo"], c50["hi"]) == pytest.approx(tuple(exact_bootstrap_quantiles(x, [0.25, 0.75])))


def test_bootstrap_ci_normal_approximation_and_edge_cases():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=400)
  c = compare.bootstrap_ci(x, num_resamples=20000, seed=0)
  half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
  assert c["lo"] == pytest.approx(x.mean() - half, abs=0.05)
  assert c["hi"] == pytest.approx(x.mean() + half, abs=0.05)
  assert c["lo"] < c["mean"] < c["hi"]
  assert compare.bootstrap_ci(x, seed=3) == compare.bootstrap_ci(x, seed=3)  # deterministic
  # The t interval: mean -/+ t_{n-1, 0.975} sd / sqrt(n); t_{2, 0.975} = 4.302653.
  c3 = compare.bootstrap_ci([0.0, 1.0, 2.0], num_resamples=100)
  assert (c3["t_lo"], c3["t_hi"]) == pytest.approx((1 - 4.302653 / math.sqrt(3),
                                                    1 + 4.302653 / math.sqrt(3)), abs=1e-5)
  const = compare.bootstrap_ci([0.4] * 5)
  assert const["lo"] == const["hi"] == pytest.approx(0.4)
  one = compare.bootstrap_ci([0.7])
  assert (one["n"], one["lo"], one["hi"]) == (1, 0.7, 0.7) and math.isnan(one["std"])
  assert compare.bootstrap_ci([])["n"] == 0 and math.isnan(compare.bootstrap_ci([])["mean"])
  with pytest.raises(ValueError, match="finite"):
    compare.bootstrap_ci([1.0, float("nan")])
  with pytest.raises(ValueError, match="ci must be in"):
    compare.bootstrap_ci([1.0, 2.0], ci=1.0)


def test_paired_differences_and_steps_to_reach():
  a = {0: 0.5, 1: 0.4, 2: None, 3: 0.9}
  b = {0: 0.3, 1: 0.45, 2: 0.2}
  assert compare.paired_differences(a, b) == pytest.approx({0: 0.2, 1: -0.05})
  # Pairing removes the between-seed spread: the CI of the paired differences is narrow even
  # when the seeds' levels differ a lot.
  lvl = {s: 0.1 * s for s in range(6)}
  p = {s: v + 0.05 for s, v in lvl.items()}
  d = compare.paired_differences(p, lvl)
  c = compare.bootstrap_ci(list(d.values()))
  assert c["lo"] == pytest.approx(0.05) and c["hi"] == pytest.approx(0.05)
  curve = [(0, 0.1), (2, 0.25), (4, 0.3), (6, 0.28)]
  assert compare.steps_to_reach(curve, 0.25) == 2
  assert compare.steps_to_reach(curve, 0.3) == 4
  assert compare.steps_to_reach(curve, 0.31) is None
  assert compare.steps_to_reach(curve, 0.0) == 0


def test_reading_a_run_directory(tmp_path):
  # Eval reports in evaluation.write_report's layout, no metrics.jsonl: the curve comes from them.
  for step, tag, acc in ((0, "_start", 0.2), (2, "", 0.25), (4, "_end", 0.3)):
    (tmp_path / f"eval_step{step:05d}{tag}.json").write_text(json.dumps(
        {"step": step, "summary": {"accuracy": acc}, "problems": []}))
  assert compare.eval_curve(str(tmp_path)) == [(0, 0.2), (2, 0.25), (4, 0.3)]
  # metrics.jsonl wins when it has eval rows; a later row for the same step replaces an earlier
  # one, a line cut by a kill is skipped; sampled tokens prefer the logged count.
  rows = [{"step": 0, "eval/pass@1": 0.1}, {"step": 1, "outcome/acc": 0.5,
                                             "response/length_mean": 3.0},
          {"step": 2, "outcome/acc": 0.5, "response/length_mean": 5.0,
           "response/sampled_tokens": 77.0, "eval/pass@1": 0.15, "prm_health/auroc": 0.6},
          {"step": 2, "eval/pass@1": 0.2}]
  cut = '\n{"step": 3, "ou'
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + cut)
  recs = compare.read_metrics(str(tmp_path))
  assert len(recs) == 4
  assert compare.eval_curve(str(tmp_path)) == [(0, 0.1), (2, 0.2)]
  assert compare.sampled_tokens(recs, sampled_rows=8) == 3.0 * 8 + 77.0
  assert compare.auroc_series(recs) == {"prm_health/auroc": [(2, 0.6)]}


def _fake_runs(finals, starts, curves=None):
  runs = []
  for (m, s), f in finals.items():
    curve = (curves or {}).get((m, s), [(0, starts[(m, s)]), (4, f)])
    runs.append({"method": m, "seed": s, "dir": "", "status": "done", "steps_done": 4,
                 "curve": curve, "start": starts[(m, s)], "final": f,
                 "gain": f - starts[(m, s)], "sampled_tokens": 100.0,
                 "auroc": {"prm/auroc": [(1, 0.6), (4, 0.7 + 0.01 * s)]} if m == "prime" else {},
                 "wall_s": 1.0})
  return runs


def test_summarize_statistics_on_known_runs():
  starts = {(m, s): 0.2 for m in ("prime", "rloo") for s in range(3)}
  finals = {("prime", 0): 0.30, ("prime", 1): 0.35, ("prime", 2): 0.28,
            ("rloo", 0): 0.25, ("rloo", 1): 0.30, ("rloo", 2): 0.29}
  curves = {("prime", 0): [(0, 0.2), (2, 0.26), (4, 0.30)],
            ("rloo", 0): [(0, 0.2), (2, 0.22), (4, 0.25)]}
  s = compare.summarize(_fake_runs(finals, starts, curves), methods=["prime", "rloo"],
                        seeds=[0, 1, 2], steps=4, budget={"sampled_rows_per_step": 8},
                        num_resamples=5000)
  assert s["per_method"]["prime"]["gain"]["mean"] == pytest.approx(np.mean([0.1, 0.15, 0.08]))
  assert s["per_method"]["rloo"]["final"]["mean"] == pytest.approx(np.mean([0.25, 0.3, 0.29]))
  pd = s["paired"]["prime - rloo"]["final"]
  assert pd["per_seed"] == pytest.approx({0: 0.05, 1: 0.05, 2: -0.01})
  assert pd["mean"] == pytest.approx(0.03)
  assert pd["lo"] == pytest.approx(-0.01) and pd["hi"] == pytest.approx(0.05)
  st = s["steps_to_baseline_final"]["prime"]["per_seed"]
  assert st[0] == {"target": 0.25, "step": 2, "baseline_step": 4, "efficiency": 2.0}
  assert st[2]["step"] is None  # 0.28 < 0.29: not reached
  assert s["steps_to_baseline_final"]["prime"]["reached"] == 2
  assert s["auroc"]["prime"]["prm/auroc"]["last"]["mean"] == pytest.approx(0.71)
  md = compare.to_markdown(s)
  assert "| prime | 3/3 |" in md and "prime - rloo" in md and "+3.0 pt" in md and "; t [" in md


# ------------------------------------------------------------------------ the run loop
FAKE_TRAINER = textwrap.dedent('''
    """Stand-in for prime_math.py: same flags and output files, instant, deterministic."""
    import json, os, sys

    def parse(args, out):
      for a in args:
        k, _, v = a[2:].partition("=")
        if k == "flagfile":
          parse([l.strip() for l in open(v) if l.strip().startswith("--")], out)
        elif k == "resume":
          out["resume"] = "true"
        else:
          out[k] = v
      return out

    f = parse(sys.argv[1:], {})
    steps, seed, algo = int(f["steps"]), int(f["seed"]), f["algo"]
    logdir, ckpt = f["logdir"], f["checkpoint_dir"]
    every = int(f.get("eval_every", "0"))
    with open(os.path.join(os.path.dirname(os.path.dirname(logdir)), "calls.jsonl"), "a") as c:
      c.write(json.dumps({"algo": algo, "seed": seed, "resume": f.get("resume") == "true",
                          "steps": steps}) + "\\n")
    rate = {"prime": 0.03, "rloo": 0.02, "grpo": 0.01}[algo]
    acc = lambda step: round(0.1 + 0.01 * seed + rate * step, 6)
    path = os.path.join(logdir, "metrics.jsonl")
    start = 0
    os.makedirs(ckpt, exist_ok=True)
    state = os.path.join(ckpt, "state.json")
    if f.get("resume") == "true":
      start = json.load(open(state))["step"]
      keep = [l for l in open(path) if json.loads(l)["step"] <= start]
      open(path, "w").writelines(keep)
    else:
      assert not os.path.exists(state), "checkpoint exists but --resume not passed"
      open(path, "w").write(json.dumps({"step": 0, "eval/pass@1": acc(0)}) + "\\n")
    for step in range(start + 1, steps + 1):
      rec = {"step": step, "outcome/acc": 0.5, "response/length_mean": 10.0}
      if algo == "prime":
        rec["prm/auroc"] = 0.5 + 0.01 * step
      if every and step % every == 0 and step < steps:
        rec["eval/pass@1"] = acc(step)
      open(path, "a").write(json.dumps(rec) + "\\n")
      json.dump({"step": step}, open(state, "w"))
      crash = os.environ.get("FAKE_CRASH", "")
      marker = os.path.join(logdir, "crashed")
      if crash == f"{algo}:{seed}:{step}" and not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(3)
    open(path, "a").write(json.dumps({"step": steps, "eval/pass@1": acc(steps)}) + "\\n")
''')


def _run_compare(tmp_path, *args, env=None):
  trainer = tmp_path / "fake_trainer.py"
  trainer.write_text(FAKE_TRAINER)
  flagfile = tmp_path / "run.flags"
  flagfile.write_text("# shared\n--prompts_per_step=2\n--oversample=2\n--n=4\n"
                      "--max_response_length=16\n--eval_every=2\n--steps=9\n"
                      "--score_micro_batch_size=8\n--micro_batch_size=4\n--mini_batch_size=8\n"
                      "--prm_micro_batch_size=4\n--prm_mini_batch_size=8\n")
  cmd = [sys.executable, str(REPO / "experiments" / "compare.py"), f"--run_flagfile={flagfile}",
         f"--trainer={trainer}", f"--out={tmp_path / 'out'}", "--bootstrap=500", "--noplot",
         *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                        env={**os.environ, **(env or {})})


def _calls(tmp_path):
  p = tmp_path / "out" / "calls.jsonl"
  return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def test_run_loop_resumes_skips_and_summarises(tmp_path):
  # 1st invocation: prime seed 1 crashes at step 3 (after its checkpoint), --max_runs stops early.
  r = _run_compare(tmp_path, "--methods=prime,rloo", "--seeds=0,1", "--steps=4", "--max_runs=3",
                   env={"FAKE_CRASH": "prime:1:3"})
  assert r.returncode == 1, r.stderr  # one run failed
  assert "prime/seed1: failed (exit 3)" in r.stderr
  assert [(c["algo"], c["seed"], c["resume"]) for c in _calls(tmp_path)] == [
      ("prime", 0, False), ("rloo", 0, False), ("prime", 1, False)]
  s = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert s["per_method"]["prime"]["runs_finished"] == 1
  # 2nd invocation: finished runs skipped, the crashed one resumed, the missing one started.
  r = _run_compare(tmp_path, "--methods=prime,rloo", "--seeds=0,1", "--steps=4")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "prime/seed0: done, skipped" in r.stdout
  assert [(c["algo"], c["seed"], c["resume"]) for c in _calls(tmp_path)][3:] == [
      ("prime", 1, True), ("rloo", 1, False)]
  s = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert s["budget"]["sampled_rows_per_step"] == 16
  assert s["budget"]["max_sampled_tokens_per_step"] == 16 * 16
  run = {(x["method"], x["seed"]): x for x in s["runs"]}
  # The resumed run's curve has no duplicate or missing steps.
  assert [st for st, _ in run[("prime", 1)]["curve"]] == [0, 2, 4]
  assert run[("prime", 1)]["final"] == pytest.approx(0.11 + 0.12)
  assert run[("rloo", 0)]["sampled_tokens"] == pytest.approx(4 * 10.0 * 16)
  assert s["per_method"]["prime"]["gain"]["mean"] == pytest.approx(0.12)
  assert s["paired"]["prime - rloo"]["final"]["mean"] == pytest.approx(0.04)
  # prime reaches rloo's final (0.1 + 0.01 s + 0.08) at step 4 (0.12 at step 2 is short of it).
  st = s["steps_to_baseline_final"]["prime"]["per_seed"]
  assert st["0"]["step"] == 4 and st["0"]["baseline_step"] == 4
  assert s["auroc"]["prime"]["prm/auroc"]["last"]["mean"] == pytest.approx(0.54)
  md = (tmp_path / "out" / "summary.md").read_text()
  assert "| prime | 2/2 |" in md and "+4.0 pt" in md
  # 3rd invocation: nothing left to run; raising --steps continues every run with --resume.
  r = _run_compare(tmp_path, "--methods=prime,rloo", "--seeds=0,1", "--steps=4")
  assert r.returncode == 0 and len(_calls(tmp_path)) == 5
  r = _run_compare(tmp_path, "--methods=prime,rloo", "--seeds=0,1", "--steps=6")
  assert r.returncode == 0, r.stderr
  assert all(c["resume"] and c["steps"] == 6 for c in _calls(tmp_path)[5:])
  assert len(_calls(tmp_path)) == 9
  s = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert s["per_method"]["rloo"]["final"]["mean"] == pytest.approx(0.1 + 0.005 + 0.12)


def test_flag_validation(tmp_path):
  for args, what in [(["--methods=prime,ppo"], "--methods"),
                     (["--seeds=0,x"], "--seeds"),
                     (["--extra_flags=--n=8"], "--n is set by compare.py or fixes"),
                     (["--extra_flags=--seed=3"], "--seed is set by compare.py")]:
    r = _run_compare(tmp_path, *args)
    assert r.returncode == 2 and what in r.stderr, (args, r.stderr)
  assert not _calls(tmp_path)


# ----------------------------------------------------------- end to end, real prime_math
@pytest.mark.slow  # four prime_math subprocesses, each compiling its programs (> 60 s on 2 cores)
def test_end_to_end_smoke_two_seeds_two_methods(tmp_path):
  out = tmp_path / "cmp"
  cmd = [sys.executable, str(REPO / "experiments" / "compare.py"),
         f"--run_flagfile={REPO / 'experiments' / 'configs' / 'smoke.flags'}",
         "--methods=prime,rloo", "--seeds=0,1", "--steps=2", f"--out={out}", "--bootstrap=500",
         "--extra_flags=--eval_every=1"]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  s = json.loads((out / "summary.json").read_text())
  assert s["budget"]["sampled_rows_per_step"] == 4 * 2 * 4
  for run in s["runs"]:
    assert run["status"] == "done" and run["steps_done"] == 2
    assert [st for st, _ in run["curve"]] == [0, 1, 2]
    assert 0.0 <= run["final"] <= 1.0 and run["sampled_tokens"] > 0
  assert s["per_method"]["prime"]["runs_finished"] == 2
  assert set(s["paired"]["prime - rloo"]["final"]["per_seed"]) == {"0", "1"}
  assert (out / "summary.md").exists() and (out / "curves.png").stat().st_size > 1000
  # Rerunning skips every finished run.
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 0 and r.stdout.count("done, skipped") == 4


def test_share_start_eval_fills_only_an_agreed_step0_value():
  run = lambda start, curve, final: {"method": "prime", "seed": 0, "start": start, "curve": curve,
                                     "final": final, "gain": None if start is None else final - start}
  runs = [run(0.275, [(0, 0.275), (24, 0.3)], 0.3), run(None, [(24, 0.25)], 0.25)]
  out = compare.share_start_eval(runs)
  assert out[0] is runs[0] and "start_shared" not in out[0]
  assert out[1]["start"] == 0.275 and out[1]["start_shared"] and out[1]["curve"][0] == (0, 0.275)
  assert out[1]["gain"] == pytest.approx(0.25 - 0.275)
  # measured starts that disagree (not the same model / problems): nothing is filled
  runs2 = runs + [run(0.2, [(0, 0.2), (24, 0.3)], 0.3)]
  assert compare.share_start_eval(runs2)[1]["start"] is None


def test_bad_flag_file_fails_before_any_run(tmp_path):
  """compare.py reads the flag file with the trainer's parser: a bad value stops it, naming the
  flag, before any run starts."""
  bad = tmp_path / "bad.flags"
  bad.write_text("--n=4\n--lr=-1\n")
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "compare.py"),
                      f"--run_flagfile={bad}", f"--out={tmp_path / 'out'}", "--noplot"],
                     capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 2 and "--lr" in r.stderr, r.stderr
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
