"""Throughput of the code outcome verifier (the sandbox) on correct solutions, one row per test format.

  python benchmarks/code_verifier.py --workers 2 --n 24 --json /tmp/code_verifier.json

Rows (each: --n responses x 3 tests, all correct, so every test runs):
  stdio   read two ints from stdin, print their sum
  call    APPS call-based (`fn_name`): the return value is compared in the parent
  assert  assert-style tests (`assert add(1, 2) == 3`), turned into call checks
through a `VerifierPool` (items/s and tests/s), plus the mean latency of one sandboxed test run
in-process (`ms_per_test`). The sandbox in use is printed (`sandbox`), so runs made with and
without bubblewrap are not compared by mistake.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from jaxrl_dense.verifiers import VerifierPool  # noqa: E402
from jaxrl_dense.verifiers import code as vcode  # noqa: E402


def _py(src: str) -> str:
  return "```python\n" + src + "\n```"


CASES = {
    "stdio": (_py("a, b = map(int, input().split())\nprint(a + b)"),
              {"inputs": ["1 2\n", "3 4\n", "10 -5\n"], "outputs": ["3\n", "7\n", "5\n"]}),
    "call": (_py("def add(a, b):\n    return a + b"),
             {"fn_name": "add", "inputs": [[1, 2], [3, 4], [10, -5]], "outputs": [3, 7, 5]}),
    "assert": (_py("def add(a, b):\n    return a + b"),
               ["assert add(1, 2) == 3", "assert add(3, 4) == 7", "assert add(10, -5) == 5"]),
}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--n", type=int, default=24, help="responses per test format")
  ap.add_argument("--timeout", type=float, default=10.0, help="hard per-item limit, seconds")
  ap.add_argument("--json", type=str, default=None)
  args = ap.parse_args(argv)
  if args.n < 1 or args.workers < 1:
    ap.error("--n and --workers must be >= 1")
  out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
         "workers": args.workers, "n": args.n, "sandbox": getattr(vcode, "sandbox_description", lambda: "unshare" if vcode.sandbox_prefix() else "rlimits")(), "rows": {}}
  with VerifierPool(workers=args.workers) as pool:
    pool.verify([CASES["stdio"][0]], [CASES["stdio"][1]], kinds="code", timeout_s=args.timeout)  # warm
    for name, (resp, tests) in CASES.items():
      t0 = time.perf_counter()
      scores = pool.verify([resp] * args.n, [tests] * args.n, kinds="code", timeout_s=args.timeout)
      wall = time.perf_counter() - t0
      t1 = time.perf_counter()
      one = vcode.score(resp, tests)
      ms = (time.perf_counter() - t1) * 1e3 / 3
      row = {"items_per_s": args.n / wall, "tests_per_s": 3 * args.n / wall, "ms_per_test": ms,
             "mean_score": float(sum(scores) / len(scores)), "in_process_score": one}
      out["rows"][name] = row
      print(f"{name:7s} {row['items_per_s']:6.2f} items/s  {row['tests_per_s']:6.2f} tests/s  "
            f"{ms:6.1f} ms/test in-process  mean score {row['mean_score']:.2f}")
  print(f"sandbox: {out['sandbox']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
