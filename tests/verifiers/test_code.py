"""Tests of the sandboxed code-test runner (PRIME's code label)."""
import os
import socket
import threading
import time

import pytest

from jaxrl_dense.verifiers import code as vcode
from jaxrl_dense.verifiers import sandbox as vsandbox

T = 1.0  # per-test timeout used in these tests
ADD_TESTS = {"inputs": ["1 2\n", "3 4\n", "10 -5\n"], "outputs": ["3\n", "7\n", "5\n"]}


def block(src: str) -> str:
  return "Here is my solution.\n```python\n" + src + "\n```\nDone."


ADD = block("a, b = map(int, input().split())\nprint(a + b)")

# Run the containment tests with bubblewrap (what every run uses) and with the explicit, weaker
# "unsafe" mode (rlimits + python guard), so both paths are exercised wherever CI runs. The
# attacks of the red-team review are in tests/verifiers/test_sandbox_attacks.py.
SANDBOXES = [pytest.param("auto", id="bwrap"), pytest.param("unsafe", id="unsafe")]
BWRAP_OK, BWRAP_WHY = vsandbox.bwrap_available()


@pytest.fixture(autouse=True)
def _needs_bwrap(request):
  """Tests that use the default sandbox skip where bubblewrap is unusable (CI installs it and
  fails without it); the explicit unsafe-mode variants run everywhere."""
  callspec = getattr(request.node, "callspec", None)
  if not BWRAP_OK and not (callspec and callspec.params.get("sandbox") == "unsafe"):
    pytest.skip(f"bubblewrap unusable here ({BWRAP_WHY}); install it: apt-get install bubblewrap")


def test_extract_code():
  assert vcode.extract_code(ADD).startswith("a, b = map")
  two = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```"
  assert vcode.extract_code(two).strip() == "print(2)"
  assert vcode.extract_code("no code") is None
  assert vcode.extract_code(None) is None
  assert vcode.extract_code("```python\n\n```") is None


def test_correct_solution_scores_one():
  assert vcode.score(ADD, ADD_TESTS, timeout_s=T) == 1.0


def test_partly_wrong_scores_fraction():
  wrong_on_negative = block("a, b = map(int, input().split())\nprint(a + b if b > 0 else 0)")
  assert vcode.score(wrong_on_negative, ADD_TESTS, timeout_s=T) == pytest.approx(2 / 3)


def test_fraction_uses_first_ten_tests_only():
  # 12 tests: the solution passes tests 0-4 (n < 5) and 10-11 -> 5 of the first 10
  src = block("n = int(input())\nprint(n * 2 if n < 5 or n >= 10 else -1)")
  tests = {"inputs": [f"{n}\n" for n in range(12)], "outputs": [f"{2 * n}\n" for n in range(12)]}
  assert vcode.score(src, tests, timeout_s=T) == pytest.approx(0.5)


def test_no_code_block_scores_zero():
  assert vcode.score("a + b", ADD_TESTS, timeout_s=T) == 0.0
  assert vcode.score(None, ADD_TESTS, timeout_s=T) == 0.0


def test_assert_style_tests():
  src = block("def add(a, b):\n    return a + b")
  assert vcode.score(src, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], timeout_s=T) == 1.0
  assert vcode.score(src, "assert add(1, 2) == 3\nassert add(0, 0) == 1\n", timeout_s=T) == 0.5


def test_call_based_tests():
  src = block("class Solution:\n    def twoSum(self, nums, target):\n"
              "        seen = {}\n        for i, x in enumerate(nums):\n"
              "            if target - x in seen:\n                return [seen[target - x], i]\n"
              "            seen[x] = i")
  tests = {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]], "outputs": [[0, 1], [[1, 2]]]}
  assert vcode.score(src, tests, timeout_s=T) == 1.0
  assert vcode.score(src, '{"fn_name": "twoSum", "inputs": [[[1, 2], 3]], "outputs": [[1, 0]]}', timeout_s=T) == 0.0


def test_float_output_tolerance_and_trailing_whitespace():
  src = block("print(1 / 3, '  ')\nprint('ok')")
  assert vcode.score(src, [{"input": "", "output": "0.333333333 \nok"}], timeout_s=T) == 1.0


def test_normalize_tests_rejects_bad_specs():
  with pytest.raises(ValueError, match="inputs"):
    vcode.normalize_tests({"inputs": ["1"]})
  with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
    vcode.normalize_tests({"inputs": ["1", "2"], "outputs": ["1"]})
  with pytest.raises(TypeError, match="tests"):
    vcode.normalize_tests(42)
  with pytest.raises(ValueError, match="tests\\[0\\]"):
    vcode.normalize_tests([3])
  with pytest.raises(ValueError, match="no test cases"):
    vcode.score(ADD, [], timeout_s=T)
  with pytest.raises(ValueError, match="timeout_s"):
    vcode.run_tests("print(1)", vcode.normalize_tests(["assert True"]), timeout_s=0)
  # an assert-style test must be one assert the parent can check on plain data
  with pytest.raises(ValueError, match="one `assert` statement"):
    vcode.normalize_tests("5")  # a math gold routed here by mistake is refused, not "passed"
  with pytest.raises(ValueError, match="one `assert` statement"):
    vcode.normalize_tests(["x = 1"])
  with pytest.raises(ValueError, match="unsupported assert form"):
    vcode.normalize_tests(["assert all(f(x) == x for x in range(3))"])
  with pytest.raises(ValueError, match="not valid Python"):
    vcode.normalize_tests(["assert f(1) =="])
  with pytest.raises(ValueError, match="fn_name"):
    vcode.normalize_tests({"fn_name": "os.system('x')", "inputs": [[1]], "outputs": [1]})


def test_fresh_working_directory_per_test():
  # each test starts in an empty fresh directory (only the harness files), nothing leaks between tests
  src = block("import os\nassert not os.path.exists('marker'), 'leaked'\nopen('marker', 'w').write('x')\n"
              "print('ok')")
  assert vcode.score(src, [{"input": "", "output": "ok"}] * 3, timeout_s=T) == 1.0


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_infinite_loop_is_contained(sandbox):
  t0 = time.monotonic()
  assert vcode.score(block("while True:\n    pass"), ["assert True"], timeout_s=T, sandbox=sandbox) == 0.0
  assert time.monotonic() - t0 < T + 3.0


def test_sleeping_solution_is_killed_on_wall_clock():
  t0 = time.monotonic()
  assert vcode.score(block("import time\ntime.sleep(60)"), ["assert True"], timeout_s=T) == 0.0
  assert time.monotonic() - t0 < T + 3.0


def _count_procs():
  return sum(1 for p in os.listdir("/proc") if p.isdigit())


def _sandbox_uid_procs():
  """Processes running as this process's sandbox uid (bwrap mode as root drops to it)."""
  uid = vsandbox._sandbox_uid()
  n = 0
  for p in os.listdir("/proc"):
    if p.isdigit():
      try:
        n += os.stat(f"/proc/{p}").st_uid == uid
      except OSError:
        pass
  return n


def _wait_until(cond, timeout_s=5.0):
  deadline = time.monotonic() + timeout_s
  while not cond() and time.monotonic() < deadline:
    time.sleep(0.1)
  return cond()


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_fork_bomb_is_contained(sandbox):
  before = _count_procs()
  bombs = [
      block("import os\nwhile True:\n    os.fork()"),
      block("import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while 1: pass'])"),
      block("import multiprocessing\ndef f():\n    while 1: pass\nwhile True:\n    multiprocessing.Process(target=f).start()"),
  ]
  for bomb in bombs:
    assert vcode.score(bomb, ["assert True"], timeout_s=T, sandbox=sandbox) == 0.0
  if sandbox == "auto" and os.geteuid() == 0:
    # exact: every process a sandboxed program starts runs as the sandbox uid, and none is left
    assert _wait_until(lambda: _sandbox_uid_procs() == 0), _sandbox_uid_procs()
  else:  # a count: other tests' processes may come and go meanwhile, so allow a few
    assert _wait_until(lambda: _count_procs() <= before + 5), (_count_procs(), before)


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_huge_allocation_is_contained(sandbox):
  src = block("x = bytearray(10 * 1024 ** 3)\nprint('allocated')")
  assert vcode.score(src, [{"input": "", "output": "allocated"}], timeout_s=T, sandbox=sandbox) == 0.0
  # and a modest allocation is fine
  ok = block("x = bytearray(50 * 1024 ** 2)\nprint('allocated')")
  assert vcode.score(ok, [{"input": "", "output": "allocated"}], timeout_s=5.0, sandbox=sandbox) == 1.0


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_outbound_socket_is_blocked(sandbox):
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  server.bind(("127.0.0.1", 0))
  server.listen(5)
  server.settimeout(0.2)
  port = server.getsockname()[1]
  accepted = []
  stop = threading.Event()

  def accept_loop():
    while not stop.is_set():
      try:
        conn, _ = server.accept()
        accepted.append(conn)
      except OSError:
        pass

  thread = threading.Thread(target=accept_loop, daemon=True)
  thread.start()
  try:
    attempts = [
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')",
        f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\nprint('connected')",
    ]
    for src in attempts:
      score = vcode.score(block(src), [{"input": "", "output": "connected"}], timeout_s=3.0, sandbox=sandbox)
      assert score == 0.0
    time.sleep(0.3)
    assert accepted == []
    # the listener itself works: a connection from outside the sandbox is accepted
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    deadline = time.monotonic() + 3
    while not accepted and time.monotonic() < deadline:
      time.sleep(0.05)
    assert len(accepted) == 1
  finally:
    stop.set()
    thread.join(2)
    server.close()
    for c in accepted:
      c.close()


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_output_is_capped(sandbox):
  src = block("while True:\n    print('x' * 10000)")
  t0 = time.monotonic()
  assert vcode.score(src, [{"input": "", "output": "x"}], timeout_s=T, sandbox=sandbox) == 0.0
  assert time.monotonic() - t0 < T + 3.0
  # a large but legal output within the cap passes
  big = block("print('y' * 200000)")
  assert vcode.score(big, [{"input": "", "output": "y" * 200000}], timeout_s=5.0, sandbox=sandbox) == 1.0


def test_sandbox_cannot_delete_files_outside(tmp_path):
  victim = tmp_path / "keep.txt"
  victim.write_text("keep")
  src = block(f"import os, shutil\ntry:\n    os.remove({str(victim)!r})\nexcept Exception:\n    pass\n"
              f"try:\n    shutil.rmtree({str(tmp_path)!r})\nexcept Exception:\n    pass\nprint('done')")
  assert vcode.score(src, [{"input": "", "output": "done"}], timeout_s=T) == 1.0
  assert victim.read_text() == "keep"


def test_sandbox_description_names_bwrap():
  assert vcode.sandbox_description().startswith("bwrap (")
  assert vcode.sandbox_description("unsafe").startswith("unsafe (")


# ------------------------------------------------------------------ clean interpreters, reasons


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
  """The python of a fresh virtual environment made here: its start-up imports nothing extra.

  The machines' base interpreter carries a site `.pth` file that imports `threading` at start-up,
  which hid a sandbox bug; a new user's venv has no such file, and neither has this one.
  """
  import subprocess
  import sys
  env_dir = tmp_path_factory.mktemp("clean_venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
  python = str(env_dir / "bin" / "python")
  # the point of the fixture: nothing beyond the bare interpreter's own start-up modules
  out = subprocess.run([python, "-I", "-c", "import sys; print('threading' in sys.modules)"],
                       capture_output=True, text=True, check=True).stdout.strip()
  assert out == "False"
  return python


def test_clean_interpreter_runs_every_test_kind(clean_python):
  assert vcode.score(ADD, ADD_TESTS, timeout_s=T, python=clean_python) == 1.0
  add = block("def add(a, b):\n    return a + b")
  assert vcode.score(add, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], timeout_s=T,
                     python=clean_python) == 1.0
  call = block("def twice(x):\n    return 2 * x")
  assert vcode.score(call, {"fn_name": "twice", "inputs": [[3]], "outputs": [6]}, timeout_s=T,
                     python=clean_python) == 1.0
  # modules whose import registers at-fork hooks still import inside the sandbox
  uses = block("import random, logging, threading\nprint(random.Random(0).randint(5, 5))")
  assert vcode.score(uses, [{"input": "", "output": "5"}], timeout_s=T, python=clean_python) == 1.0


def test_clean_interpreter_limits(clean_python, tmp_path):
  huge = block("x = bytearray(10 * 1024 ** 3)\nprint('allocated')")
  r = vcode.score_detailed(huge, [{"input": "", "output": "allocated"}], timeout_s=T, python=clean_python)
  assert (r.score, r.reason) == (0.0, vcode.RUNTIME_ERROR)
  loud = block("while True:\n    print('x' * 10000)")
  r = vcode.score_detailed(loud, [{"input": "", "output": "x"}], timeout_s=T, python=clean_python)
  assert r.score == 0.0 and r.reason != vcode.HARNESS_ERROR
  victim = tmp_path / "keep.txt"
  victim.write_text("keep")
  src = block(f"import os, shutil\ntry:\n    os.remove({str(victim)!r})\nexcept Exception:\n    pass\n"
              f"try:\n    shutil.rmtree({str(tmp_path)!r})\nexcept Exception:\n    pass\nprint('done')")
  assert vcode.score(src, [{"input": "", "output": "done"}], timeout_s=T, python=clean_python) == 1.0
  assert victim.read_text() == "keep"


def test_score_detailed_names_the_reason():
  assert vcode.score_detailed(ADD, ADD_TESTS, timeout_s=T).reason == vcode.PASS
  wrong = block("print(0)")
  assert vcode.score_detailed(wrong, ADD_TESTS, timeout_s=T).reason == vcode.WRONG_ANSWER
  assert vcode.score_detailed(block("raise SystemExit(3)"), ADD_TESTS, timeout_s=T).reason == vcode.RUNTIME_ERROR
  assert vcode.score_detailed(block("def f():\n  return 1"), ["assert f() == 2"], timeout_s=T).reason == vcode.WRONG_ANSWER
  assert vcode.score_detailed(block("import time\ntime.sleep(60)"), ["assert True"], timeout_s=T).reason == vcode.TIMEOUT
  assert vcode.score_detailed("no code here", ADD_TESTS, timeout_s=T).reason == vcode.NO_CODE


def test_broken_sandbox_is_a_harness_error_not_a_wrong_answer(monkeypatch, caplog):
  # Simulate the issue-#18 failure: the harness's own set-up raises before the solution runs.
  monkeypatch.setattr(vcode, "_HARNESS", vcode._HARNESS.replace(
      "import json, runpy\n", "import json, runpy\nraise PermissionError('harness set-up broke')\n", 1))
  monkeypatch.setattr(vcode, "_HARNESS_ERROR_LOGGED", False)
  with caplog.at_level("ERROR"):
    r = vcode.score_detailed(ADD, ADD_TESTS, timeout_s=T)
    vcode.score_detailed(ADD, ADD_TESTS, timeout_s=T)
  assert r.score == 0.0 and r.reason == vcode.HARNESS_ERROR
  assert "PermissionError" in r.detail
  broken = [rec for rec in caplog.records if "BROKEN" in rec.getMessage()]
  assert len(broken) == 1  # loud, once
