"""Throughput of the math outcome verifier on MATH-500 (self and shuffled golds).

  python benchmarks/verifiers.py --workers 2 --json /tmp/verifiers.json

Rows:
  self      responses "\\boxed{gold}" against their own golds (all 1.0; mostly the string path)
  shuffled  "\\boxed{gold[perm[i]]}" against gold[i] (≈1.6% 1.0; mostly sympy / math-verify)
each through a `VerifierPool`: "cold" = first pass after the pool started, "warm" = a second
pass (shuffled with another permutation: new pairs, but the same strings, so math-verify's
parse cache hits); and the "cold" checks in-process on one core for reference
(`--no-baseline` skips it; that process has not run the pool's warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

from jaxrl_dense.verifiers import VerifierPool, datasets  # noqa: E402
from jaxrl_dense.verifiers import math as vmath  # noqa: E402


def _cpu_seconds(pids) -> float:
  """utime + stime of the given processes (Linux /proc), 0 for vanished ones."""
  tick = os.sysconf("SC_CLK_TCK")
  total = 0.0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
      pass
  return total


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--timeout", type=float, default=5.0, help="hard per-item limit, seconds")
  ap.add_argument("--n", type=int, default=500, help="number of MATH-500 problems")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-baseline", action="store_true", help="skip the in-process single-core rows")
  ap.add_argument("--json", type=str, default=None, help="write the results here")
  args = ap.parse_args(argv)
  if args.n < 1 or args.workers < 1:
    ap.error("--n and --workers must be >= 1")

  golds = [r.gold for r in datasets.load("math500")][:args.n]
  perm = list(golds)
  random.Random(args.seed).shuffle(perm)
  cases = {
      "self": (["\\boxed{" + g + "}" for g in golds], golds),
      "shuffled": (["\\boxed{" + p + "}" for p in perm], golds),
  }
  rows = []
  load0 = os.getloadavg()[0]

  t0 = time.perf_counter()
  pool = VerifierPool(workers=args.workers)
  start_s = time.perf_counter() - t0
  perm2 = list(golds)
  random.Random(args.seed + 1).shuffle(perm2)
  warm_cases = {"self": cases["self"], "shuffled": (["\\boxed{" + p + "}" for p in perm2], golds)}
  try:
    for phase, phase_cases in (("cold", cases), ("warm", warm_cases)):
      for name, (responses, gs) in phase_cases.items():
        pids = pool.worker_pids()
        c0 = _cpu_seconds(pids)
        t = time.perf_counter()
        scores = pool.verify(responses, gs, timeout_s=args.timeout)
        dt = time.perf_counter() - t
        cpu = _cpu_seconds(pids) - c0
        st = pool.last_stats
        rows.append(dict(case=name, mode=f"pool x{args.workers} ({phase})", n=len(gs), seconds=dt,
                         per_s=len(gs) / dt, accuracy=float(scores.mean()), timeouts=st.timeouts,
                         errors=st.errors, cpu_ms_per_check=1e3 * cpu / len(gs)))
  finally:
    pool.close()

  if not args.no_baseline:
    for name, (responses, gs) in cases.items():
      t = time.perf_counter()
      c = time.process_time()
      scores = [vmath.score(r, g) for r, g in zip(responses, gs)]
      dt, cpu = time.perf_counter() - t, time.process_time() - c
      rows.append(dict(case=name, mode="in-process x1", n=len(gs), seconds=dt, per_s=len(gs) / dt,
                       accuracy=sum(scores) / len(gs), timeouts=0, errors=0, cpu_ms_per_check=1e3 * cpu / len(gs)))

  print(f"MATH-500 verification throughput (pool start {start_s:.1f} s, load average at start {load0:.1f}, "
        f"{os.cpu_count()} CPUs)")
  print(f"{'case':<9} {'mode':<22} {'n':>4} {'seconds':>8} {'verif/s':>9} {'cpu ms/check':>12} "
        f"{'acc':>6} {'timeouts':>8}")
  for r in rows:
    print(f"{r['case']:<9} {r['mode']:<22} {r['n']:>4} {r['seconds']:>8.2f} {r['per_s']:>9.1f} "
          f"{r['cpu_ms_per_check']:>12.2f} {r['accuracy']:>6.3f} {r['timeouts']:>8d}")
  print("cpu ms/check: CPU time of the verifying processes per check (independent of machine load);"
        " 1000 * workers / (cpu ms/check) is the rate on idle cores.")
  result = dict(benchmark="verifiers_math500", workers=args.workers, timeout_s=args.timeout,
                pool_start_s=start_s, load_average_at_start=load0, cpu_count=os.cpu_count(),
                python=platform.python_version(), rows=rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
