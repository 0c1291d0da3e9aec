"""Tests of the hang-proof verifier pool and verify_batch."""
import os
import random
import signal
import tempfile
import threading
import time

import numpy as np
import pytest

from jaxrl_dense.verifiers import VerifierPool, datasets, get_pool, verify_batch
from jaxrl_dense.verifiers import math as vmath
from jaxrl_dense.verifiers import sandbox as _vsandbox

# Code items need the bubblewrap sandbox (CI installs it and fails without it).
NEEDS_BWRAP = pytest.mark.skipif(not _vsandbox.bwrap_available()[0],
                                 reason="bubblewrap unusable here: apt-get install bubblewrap")

TIMEOUT = 1.5
# Scheduling slack on a loaded 2-core machine: kill + replacement + IPC.
SLACK = 3.0


@pytest.fixture(scope="module")
def pool():
  p = VerifierPool(workers=2)
  yield p
  p.close()


def test_scores_and_order(pool):
  responses = ["\\boxed{2}", "The answer is -3.", None, "", "\\boxed{\\frac12}", "#### 1,000", "\\boxed{7}"]
  golds = ["2", -3, "1", "1", "0.5", 1000, "8"]
  scores = pool.verify(responses, golds, timeout_s=5.0)
  assert scores.dtype == np.float32 and scores.shape == (7,)
  np.testing.assert_array_equal(scores, [1, 1, 0, 0, 1, 1, 0])
  assert pool.last_stats.timeouts == 0 and pool.last_stats.errors == 0


def test_matches_in_process_scores(pool):
  golds = [r.gold for r in datasets.load("math500")[:60]]
  perm = list(golds)
  random.Random(1).shuffle(perm)
  responses = ["\\boxed{" + p + "}" for p in perm[:30]] + ["\\boxed{" + g + "}" for g in golds[30:]]
  expected = [vmath.score(r, g) for r, g in zip(responses, golds)]
  np.testing.assert_array_equal(pool.verify(responses, golds, timeout_s=10.0), expected)


@pytest.mark.parametrize("bad", ["\\boxed{9^{9^{9^{9}}}}", "x" * 100_000, "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"])
def test_pathological_inputs_return_within_limit_and_pool_recovers(pool, bad):
  pids_before = set(pool.worker_pids())
  t0 = time.monotonic()
  scores = pool.verify([bad, "\\boxed{4}"], ["5", "4"], timeout_s=TIMEOUT)
  elapsed = time.monotonic() - t0
  np.testing.assert_array_equal(scores, [0, 1])
  assert elapsed < TIMEOUT + SLACK, elapsed
  if pool.last_stats.timeouts:
    assert pool.last_stats.statuses[0] == "timeout"
    assert set(pool.worker_pids()) != pids_before  # the killed worker was replaced
  # the pool keeps working
  np.testing.assert_array_equal(pool.verify(["\\boxed{1}"] * 4, ["1"] * 4, timeout_s=5.0), [1, 1, 1, 1])


def test_tower_of_powers_times_out(pool):
  restarts = pool.total_restarts
  scores = pool.verify(["\\boxed{9^{9^{9^{9}}}}"] * 3, ["1"] * 3, timeout_s=1.0)
  np.testing.assert_array_equal(scores, [0, 0, 0])
  assert pool.last_stats.timeouts == 3 and pool.total_restarts == restarts + 3
  assert pool.last_stats.statuses == ["timeout"] * 3


def test_worker_killed_from_outside_is_replaced(pool):
  victim = pool.worker_pids()[0]
  os.kill(victim, signal.SIGKILL)
  time.sleep(0.2)
  scores = pool.verify(["\\boxed{3}", "\\boxed{4}", "\\boxed{5}"], ["3", "4", "6"], timeout_s=5.0)
  np.testing.assert_array_equal(scores, [1, 1, 0])
  assert victim not in pool.worker_pids()


def test_hang_does_not_block_other_items(pool):
  # one worker is stuck for TIMEOUT on the first item; the other finishes the rest meanwhile
  responses = ["\\boxed{9^{9^{9^{9}}}}"] + ["\\boxed{%d}" % i for i in range(20)]
  golds = ["0"] + [str(i) for i in range(20)]
  t0 = time.monotonic()
  scores = pool.verify(responses, golds, timeout_s=TIMEOUT)
  assert time.monotonic() - t0 < TIMEOUT + SLACK
  np.testing.assert_array_equal(scores, [0] + [1] * 20)


def test_verify_from_a_non_main_thread(pool):
  out = {}
  t = threading.Thread(target=lambda: out.setdefault(
      "s", pool.verify(["\\boxed{\\frac{\\sqrt2}{2}}", "\\boxed{x}"], ["\\frac{1}{\\sqrt{2}}", "y"], timeout_s=10.0)))
  t.start()
  t.join(60)
  np.testing.assert_array_equal(out["s"], [1, 0])


@NEEDS_BWRAP
def test_mixed_kinds(pool):
  code_resp = "```python\nprint(sum(map(int, input().split())))\n```"
  tests = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "8\n"]}
  scores = pool.verify(["\\boxed{2}", code_resp], ["2", tests], kinds=["math", "code"], timeout_s=20.0)
  np.testing.assert_allclose(scores, [1.0, 0.5])


def _sandbox_cwds(pids):
  """Processes of a code sandbox: a working directory of one of `pids`' sandboxes (unsafe mode)
  or a bwrap sandbox's harness (`/sandbox/harness.py` on the command line)."""
  marks = [f"jaxrl_sandbox_{p}_" for p in pids]
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        cwd = os.readlink(f"/proc/{entry}/cwd")
        cmd = open(f"/proc/{entry}/cmdline", "rb").read()
      except OSError:
        continue
      if any(m in cwd for m in marks) or b"/sandbox/harness.py" in cmd:
        found.append((entry, cwd))
  return found


@NEEDS_BWRAP
def test_killed_worker_takes_its_code_sandbox_with_it(pool):
  pids = pool.worker_pids()
  sleeper = "```python\nimport time\ntime.sleep(60)\n```"
  t0 = time.monotonic()
  seen = []

  def watch():  # the detector below must see the running sandbox, or its "gone" proves nothing
    while time.monotonic() - t0 < 1.4 and not seen:
      seen.extend(_sandbox_cwds(pids))
      time.sleep(0.05)

  watcher = threading.Thread(target=watch)
  watcher.start()
  scores = pool.verify([sleeper], [["assert True"]], kinds="code", timeout_s=1.5, code_test_timeout_s=30.0)
  watcher.join()
  assert seen
  assert time.monotonic() - t0 < 1.5 + SLACK
  np.testing.assert_array_equal(scores, [0])
  assert pool.last_stats.statuses == ["timeout"]
  deadline = time.monotonic() + 5
  while _sandbox_cwds(pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _sandbox_cwds(pids) == []
  tmp = tempfile.gettempdir()
  assert not [d for d in os.listdir(tmp) if any(d.startswith(f"jaxrl_sandbox_{p}_") for p in pids)]


def test_bad_inputs_raise(pool):
  with pytest.raises(ValueError, match="2 responses but 1 golds"):
    pool.verify(["a", "b"], ["1"])
  with pytest.raises(ValueError, match="kinds\\[1\\]"):
    pool.verify(["a", "b"], ["1", "2"], kinds=["math", "chess"])
  with pytest.raises(ValueError, match="timeout_s"):
    pool.verify(["a"], ["1"], timeout_s=0)
  with pytest.raises(TypeError, match="golds\\[0\\]"):
    pool.verify(["a"], [None])
  with pytest.raises(TypeError, match="responses\\[0\\]"):
    pool.verify([3], ["1"])
  with pytest.raises(ValueError, match="workers"):
    VerifierPool(workers=0)


@NEEDS_BWRAP
def test_errors_in_the_verifier_score_zero(pool):
  # empty tests list makes code.score raise inside the worker: scored 0, counted, worker lives
  scores = pool.verify(["```python\nprint(1)\n```"], [[]], kinds="code", timeout_s=5.0)
  np.testing.assert_array_equal(scores, [0])
  assert pool.last_stats.errors == 1 and pool.last_stats.statuses[0].startswith("error: ValueError")


def test_empty_batch(pool):
  assert pool.verify([], []).shape == (0,)


def test_close():
  p = VerifierPool(workers=1)
  procs = [w.proc for w in p._workers]
  p.close()
  p.close()  # idempotent
  assert all(not proc.is_alive() for proc in procs)
  with pytest.raises(RuntimeError, match="closed"):
    p.verify(["\\boxed{1}"], ["1"])


def test_verify_batch_reuses_one_pool():
  s1 = verify_batch(["\\boxed{1}", "The answer is 2."], ["1", "3"], workers=2, timeout_s=5.0)
  pool = get_pool(2)
  s2 = verify_batch(["\\boxed{1}"], [1], workers=2)
  assert get_pool(2) is pool
  np.testing.assert_array_equal(s1, [1, 0])
  np.testing.assert_array_equal(s2, [1])


@NEEDS_BWRAP
def test_stats_name_why_items_failed(pool):
  ok = "```python\nprint(int(input()) * 2)\n```"
  wrong = "```python\nprint(0)\n```"
  tests = [{"input": "2", "output": "4"}]
  scores = pool.verify(["\\boxed{2}", "\\boxed{3}", ok, wrong, "no code"], ["2", "2", tests, tests, tests],
                       kinds=["math", "math", "code", "code", "code"], timeout_s=10.0)
  np.testing.assert_array_equal(scores, [1, 0, 1, 0, 0])
  st = pool.last_stats
  assert st.errors == 0 and st.harness_errors == 0
  assert st.failure_reasons() == {"wrong_answer": 2, "no_code": 1}


@NEEDS_BWRAP
def test_worker_reports_a_broken_sandbox_as_a_harness_error(monkeypatch):
  # Runs the worker loop in this process with the code sandbox's guard broken on purpose.
  import multiprocessing as mp
  from jaxrl_dense.verifiers import code as vcode
  from jaxrl_dense.verifiers import pool as pool_lib
  monkeypatch.setattr(vcode, "_HARNESS", vcode._HARNESS.replace(
      "import json, runpy\n", "import json, runpy\nraise PermissionError('harness set-up broke')\n", 1))
  parent, child = mp.Pipe(duplex=True)
  parent.send((0, "code", "```python\nprint(4)\n```", [{"input": "", "output": "4"}], 10.0, 2.0, "bwrap"))
  parent.send(None)
  previous = signal.getsignal(signal.SIGINT)
  try:
    pool_lib._worker_main(child, None)
  finally:
    signal.signal(signal.SIGINT, previous)
  idx, score, status = parent.recv()
  assert (idx, score) == (0, 0.0)
  assert status.startswith("harness_error") and "PermissionError" in status
  stats = pool_lib.VerifyStats(n=1, statuses=[status])
  assert stats.failure_reasons() == {"harness_error": 1}


def _verify_batch_in_child(q):
  q.put(verify_batch(["\\boxed{1}", "\\boxed{x+1}"], ["1", "1+x"], workers=1, timeout_s=10.0).tolist())


def test_verify_batch_in_a_forked_child():
  """The child gets its own pool and fork server; the parent's pool is left alone."""
  import multiprocessing as mp
  parent_pool = get_pool(1)
  np.testing.assert_array_equal(verify_batch(["\\boxed{2}"], ["2"], workers=1), [1])
  ctx = mp.get_context("fork")
  q = ctx.Queue()
  p = ctx.Process(target=_verify_batch_in_child, args=(q,))
  p.start()
  try:
    assert q.get(timeout=60) == [1.0, 1.0]
  finally:
    p.join(10)
  assert p.exitcode == 0
  assert get_pool(1) is parent_pool
  np.testing.assert_array_equal(verify_batch(["\\boxed{x+1}"], ["1+x"], workers=1), [1])


@pytest.mark.parametrize("source,kind", [
    ("codecontests", "code"), ("apps", "code"), ("codeforces", "code"), ("taco", "code"),
    ("TACO", "code"), ("leetcode", "math"), ("unicode_math", "math"), ("numina_olympiads", "math"), ("numina_cn_k12", "math"),
    ("numina_amc_aime", "math"), ("lighteval/MATH", "math"), ("openai/gsm8k", "math"),
    ("arithmetic", "math"), ("", "math"), (None, "math")])
def test_sources_route_like_verl(source, kind):
  from jaxrl_dense.verifiers import kind_of_source
  assert kind_of_source(source) == kind


@NEEDS_BWRAP
def test_code_source_is_scored_as_fraction_of_tests(pool):
  from jaxrl_dense.verifiers import kinds_of_sources
  half = "```python\nn = int(input())\nprint(n * 2 if n < 2 else 0)\n```"
  tests = {"inputs": ["0", "1", "2", "3"], "outputs": ["0", "2", "4", "6"]}
  kinds = kinds_of_sources(["taco", "numina_olympiads"])
  scores = pool.verify([half, "\\boxed{5}"], [tests, "5"], kinds=kinds, timeout_s=20.0)
  np.testing.assert_allclose(scores, [0.5, 1.0])


@NEEDS_BWRAP
def test_trainer_verifier_routes_code_sources_to_the_sandbox():
  from jaxrl_dense.rl import rollout
  v = rollout.Verifier(20.0, workers=1)
  try:
    half = "```python\nn = int(input())\nprint(n * 2 if n < 2 else 0)\n```"
    tests = {"inputs": ["0", "1", "2", "3"], "outputs": ["0", "2", "4", "6"]}
    scores = v([half, "The answer is 5."], [tests, "5"], ["codecontests", "numina_cn_k12"])
    np.testing.assert_allclose(scores, [0.5, 1.0])
    assert v.last_stats.failure_reasons() == {"wrong_answer": 1}
  finally:
    v.close()
