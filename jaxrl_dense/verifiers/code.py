"""Code outcome verifier: run the response's last ```python block against tests in a sandbox.

PRIME's code label (Cui et al., 2025, §3 of our spec; APPS harness, `prime_code` in veRL):

    r_o(y, tests) = 1.0                                   if all tests pass,
                    (# of the first min(10, n) tests passed) / min(10, n)   otherwise.

Test formats accepted (`normalize_tests`):
  * APPS / Eurus-2 "input_output": `{"inputs": [...], "outputs": [...]}` (stdin -> stdout), or
    with `"fn_name"` (call-based: each input is the argument list, output the return value;
    a LeetCode-style `class Solution` method is found too);
  * a list of `{"input": str, "output": str}` dicts (stdin -> stdout);
  * assert-style: a list of statements such as `"assert add(1, 2) == 3"`, or one string of them;
  * any of the above JSON-encoded in a string.

Sandbox, one fresh process per test:
  * fresh temporary working directory (removed afterwards), minimal environment, `python -I`;
  * no network: a new network namespace (`unshare -n`, with a new PID namespace so that every
    descendant dies with the test) when the kernel allows it (as root, or via a user
    namespace), and always an in-process shim that makes `socket.socket` raise;
  * rlimits: CPU time, address space, file size (which also caps captured output: stdout and
    stderr go to files), process count (when not root), no core files;
  * a Python-level guard that disables fork/exec/subprocess/kill/file removal;
  * a per-test wall-clock timeout; on expiry the whole process group is SIGKILLed, and the
    sandbox dies with its parent (PR_SET_PDEATHSIG) if the verifier worker is killed.
This contains mistakes of model-written code (loops, fork bombs, huge allocations, network
calls); it is not a security boundary against deliberately malicious code.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math as _pymath
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Sequence

__all__ = [
    "CodeScore",
    "OUTCOMES",
    "TestCase",
    "extract_code",
    "normalize_tests",
    "run_test_outcomes",
    "run_tests",
    "sandbox_prefix",
    "score",
    "score_detailed",
]

MAX_TESTS_FOR_FRACTION = 10  # PRIME: fraction over the first <= 10 tests
_DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB address space per test process
_DEFAULT_FILE_BYTES = 1 << 20  # 1 MiB per written file, stdout/stderr included
_DEFAULT_NPROC_HEADROOM = 16
# Temp dirs are named <tmp>/jaxrl_sandbox_<verifier pid>_*, so that a pool can remove those of
# a worker it had to kill (`remove_sandbox_dirs`).
SANDBOX_DIR_PREFIX = "jaxrl_sandbox_"

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TestCase:
  """One test. kind: "stdio" (stdin -> stdout), "call" (fn_name(*input) == output) or "assert"."""
  kind: str
  input: Any = None
  output: Any = None
  fn_name: str | None = None
  statement: str | None = None


def extract_code(response: str | None) -> str | None:
  """Source of the last ```python (or ```py / ```python3) fenced block, or None."""
  if not response:
    return None
  blocks = _CODE_BLOCK.findall(response)
  if not blocks:
    return None
  code = blocks[-1]
  return code if code.strip() else None


def _split_asserts(source: str) -> list[str]:
  stmts, cur = [], []
  for line in source.splitlines():
    if line.startswith("assert") and cur:
      stmts.append("\n".join(cur))
      cur = []
    if line.strip():
      cur.append(line)
  if cur:
    stmts.append("\n".join(cur))
  return stmts


def normalize_tests(tests: Any) -> list[TestCase]:
  """Turns any accepted test format (see module docstring) into a list of `TestCase`."""
  if isinstance(tests, (bytes, bytearray)):
    tests = tests.decode("utf-8")
  if isinstance(tests, str):
    stripped = tests.strip()
    if not stripped:
      raise ValueError("tests: empty string")
    if stripped[0] in "[{":
      try:
        return normalize_tests(json.loads(stripped))
      except json.JSONDecodeError:
        pass
    return [TestCase(kind="assert", statement=s) for s in _split_asserts(stripped)]
  if isinstance(tests, dict):
    if "inputs" not in tests or "outputs" not in tests:
      raise ValueError(f"tests: a dict needs 'inputs' and 'outputs' keys, got keys {sorted(tests)}")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if len(inputs) != len(outputs):
      raise ValueError(f"tests: {len(inputs)} inputs but {len(outputs)} outputs")
    fn_name = tests.get("fn_name")
    kind = "call" if fn_name else "stdio"
    return [TestCase(kind=kind, input=i, output=o, fn_name=fn_name) for i, o in zip(inputs, outputs)]
  if isinstance(tests, (list, tuple)):
    out = []
    for k, t in enumerate(tests):
      if isinstance(t, str):
        out.append(TestCase(kind="assert", statement=t))
      elif isinstance(t, dict) and "input" in t and "output" in t:
        out.append(TestCase(kind="stdio", input=t["input"], output=t["output"]))
      else:
        raise ValueError(f"tests[{k}]: expected an assert string or an {{'input','output'}} dict, "
                         f"got {type(t).__name__}")
    return out
  raise TypeError(f"tests: expected dict, list or str, got {type(tests).__name__}")


# ----------------------------------------------------------------------------- sandbox

# Exit status and stderr marker of a sandbox whose own set-up failed (not the solution's fault).
HARNESS_ERROR_RC = 86
HARNESS_ERROR_MARKER = "JAXRL_SANDBOX_HARNESS_ERROR"

# The guard first imports every module the harness (and the modules it pulls in) needs, THEN
# disables dangerous functions: importing `subprocess` imports `threading`, and `threading`,
# `random` and `logging` call `os.register_at_fork` in their module bodies. A clean virtual
# environment imports none of them at start-up (a site `.pth` file may), so the order matters.
# `os.register_at_fork` becomes a no-op (at-fork hooks are harmless once fork itself is blocked),
# so solutions may still `import random` / `logging` / `threading`. Any failure of the set-up
# exits with HARNESS_ERROR_RC and a marker on stderr, so it is never mistaken for a wrong answer.
_GUARD = r"""
try:
  import builtins, json, os, runpy, sys, threading, random, logging
  import socket as _s, _socket, resource as _r, subprocess as _sp, shutil as _sh
  def _jaxrl_blocked(*a, **k):
    raise PermissionError("disabled in the jaxrl_dense sandbox")
  def _jaxrl_noop(*a, **k):
    return None
  class _NoSocket:
    def __init__(self, *a, **k):
      raise PermissionError("network is disabled in the jaxrl_dense sandbox")
  _s.socket = _socket.socket = _NoSocket
  for _n in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    setattr(_s, _n, _jaxrl_blocked)
  _r.setrlimit = _jaxrl_blocked
  for _n in ("fork", "forkpty", "system", "popen", "kill", "killpg", "putenv", "remove", "unlink",
             "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
             "lchown", "fchmod", "fchown", "setuid", "setgid", "execv", "execve", "execvp", "execvpe",
             "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _n):
      setattr(os, _n, _jaxrl_blocked)
  if hasattr(os, "register_at_fork"):
    os.register_at_fork = _jaxrl_noop
  _sp.Popen = _sp.run = _sp.call = _sp.check_call = _sp.check_output = _jaxrl_blocked
  _sh.rmtree = _sh.move = _sh.chown = _jaxrl_blocked
  del _n
except BaseException as _e:
  import sys as _sys
  _sys.stderr.write("%s: %s: %s\n" % ("JAXRL_SANDBOX_HARNESS_ERROR", type(_e).__name__, _e))
  _sys.stderr.flush()
  import os as _os
  _os._exit(86)
"""

_HARNESS = r"""
mode = sys.argv[1]
if mode == "stdio":
  runpy.run_path("solution.py", run_name="__main__")
elif mode == "assert":
  ns = runpy.run_path("solution.py", run_name="__jaxrl_solution__")
  exec(compile(open("test_stmt.py").read(), "test_stmt.py", "exec"), ns)
elif mode == "call":
  spec = json.load(open("call.json"))
  ns = runpy.run_path("solution.py", run_name="__jaxrl_solution__")
  fn_name = spec["fn_name"]
  if fn_name in ns and callable(ns[fn_name]):
    fn = ns[fn_name]
  elif "Solution" in ns:
    fn = getattr(ns["Solution"](), fn_name)
  else:
    raise NameError(fn_name)
  args = spec["input"]
  if not isinstance(args, list):
    args = [args]
  result = fn(*args)
  if isinstance(result, tuple):
    result = list(result)
  with open("result.json", "w") as f:
    json.dump({"result": result}, f)
else:
  raise ValueError(mode)
"""

_PREFIX_CACHE: list[str] | None = None


def sandbox_prefix(refresh: bool = False) -> list[str]:
  """Command prefix that isolates network and PIDs (`unshare`), or [] where the kernel refuses.

  Tries, in order: `unshare -n -p -f --kill-child` (root), the same with `-r` (unprivileged
  user namespace). The probe result is cached per process.
  """
  global _PREFIX_CACHE
  if _PREFIX_CACHE is not None and not refresh:
    return list(_PREFIX_CACHE)
  exe = shutil.which("unshare")
  result: list[str] = []
  if exe and sys.platform.startswith("linux"):
    for flags in (["-n", "-p", "-f", "--kill-child"], ["-r", "-n", "-p", "-f", "--kill-child"]):
      cmd = [exe, *flags, "--"]
      try:
        ok = subprocess.run(cmd + [sys.executable, "-I", "-S", "-c", "pass"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=20).returncode == 0
      except (OSError, subprocess.TimeoutExpired):
        ok = False
      if ok:
        result = cmd
        break
  _PREFIX_CACHE = result
  return list(result)


def remove_sandbox_dirs(pid: int) -> None:
  """Removes the sandbox temp dirs left by verifier process `pid` (e.g. after it was killed)."""
  import glob
  for d in glob.glob(os.path.join(tempfile.gettempdir(), f"{SANDBOX_DIR_PREFIX}{pid}_*")):
    shutil.rmtree(d, ignore_errors=True)


def _count_user_processes(uid: int) -> int:
  n = 0
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      try:
        if os.stat(f"/proc/{pid}").st_uid == uid:
          n += 1
      except OSError:
        pass
  return n


def _make_preexec(cpu_s: int, memory_bytes: int, file_bytes: int, nproc: int | None):
  libc = None
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:  # pragma: no cover
    pass

  def preexec():  # runs in the child between fork and exec: async-signal-safe-ish calls only
    if libc is not None:
      libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the verifier
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:
      resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

  return preexec


def _outputs_match(got: str, expected: Any) -> bool:
  """APPS-style stdout comparison: per-line rstrip, then token-wise with float tolerance."""
  if isinstance(expected, (list, tuple)):
    expected = "\n".join(str(e) for e in expected)
  expected = str(expected)
  g = [l.rstrip() for l in got.strip().splitlines()]
  e = [l.rstrip() for l in expected.strip().splitlines()]
  if g == e:
    return True
  gt, et = got.split(), expected.split()
  if len(gt) != len(et) or not gt:
    return False
  for a, b in zip(gt, et):
    if a == b:
      continue
    try:
      fa, fb = float(a), float(b)
    except ValueError:
      return False
    if not _pymath.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-6):
      return False
  return True


def _results_match(got: Any, expected: Any) -> bool:
  if got == expected:
    return True
  if isinstance(expected, list) and len(expected) == 1 and got == expected[0]:
    return True  # APPS wraps call-based outputs in a list
  return False


# Outcomes of one test run (`run_test_outcomes`); only PASS counts as passed.
PASS = "pass"
WRONG_ANSWER = "wrong_answer"
RUNTIME_ERROR = "runtime_error"
TIMEOUT = "timeout"
HARNESS_ERROR = "harness_error"  # the sandbox itself failed: never the solution's fault
NO_CODE = "no_code"  # the response has no ```python block (score-level reason only)
OUTCOMES = (PASS, WRONG_ANSWER, RUNTIME_ERROR, TIMEOUT, HARNESS_ERROR)


@dataclasses.dataclass(frozen=True)
class CodeScore:
  """A code label with the reason behind it.

  Attributes:
    score: the PRIME code label in [0, 1] (see module docstring).
    reason: PASS if every test passed; otherwise the outcome of the first failed test
      (WRONG_ANSWER, RUNTIME_ERROR, TIMEOUT, HARNESS_ERROR) or NO_CODE.
    detail: for HARNESS_ERROR, the sandbox's stderr tail; else "".
  """
  score: float
  reason: str
  detail: str = ""


def _run_one(code: str, test: TestCase, workdir: str, prefix: list[str], timeout_s: float,
             memory_bytes: int, file_bytes: int, nproc: int | None,
             python: str) -> tuple[str, str]:
  """Runs one test; returns (outcome, detail) with outcome in OUTCOMES."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "solution.py"), "w") as f:
    f.write(code)
  with open(os.path.join(workdir, "_harness.py"), "w") as f:
    f.write(_GUARD + _HARNESS)
  stdin_data = ""
  if test.kind == "stdio":
    stdin_data = test.input if isinstance(test.input, str) else "\n".join(map(str, test.input))
  elif test.kind == "assert":
    with open(os.path.join(workdir, "test_stmt.py"), "w") as f:
      f.write(test.statement)
  elif test.kind == "call":
    with open(os.path.join(workdir, "call.json"), "w") as f:
      json.dump({"fn_name": test.fn_name, "input": test.input}, f)
  else:
    raise ValueError(f"unknown test kind {test.kind!r}")
  stdin_path = os.path.join(workdir, "stdin.txt")
  with open(stdin_path, "w") as f:
    f.write(stdin_data)
  out_path, err_path = os.path.join(workdir, "stdout.txt"), os.path.join(workdir, "stderr.txt")
  env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
         "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
  cmd = prefix + [python, "-I", "-B", "_harness.py", test.kind]
  cpu_s = max(1, int(_pymath.ceil(timeout_s)) + 1)
  with open(stdin_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
    try:
      proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=fin, stdout=fout, stderr=ferr,
                              start_new_session=True, close_fds=True,
                              preexec_fn=_make_preexec(cpu_s, memory_bytes, file_bytes, nproc))
    except OSError as e:
      return HARNESS_ERROR, f"cannot start the sandbox: {e}"
    try:
      rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      rc = None
    finally:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
      proc.wait()
  if rc is None or rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
    return TIMEOUT, ""
  if rc != 0:
    with open(err_path, "rb") as f:
      err = f.read(file_bytes).decode("utf-8", errors="replace")
    if rc == HARNESS_ERROR_RC and HARNESS_ERROR_MARKER in err:
      return HARNESS_ERROR, err[-500:]
    if test.kind == "assert" and "AssertionError" in err:
      return WRONG_ANSWER, ""
    return RUNTIME_ERROR, ""
  if test.kind == "assert":
    return PASS, ""
  if test.kind == "stdio":
    with open(out_path, "rb") as f:
      got = f.read(file_bytes).decode("utf-8", errors="replace")
    return (PASS if _outputs_match(got, test.output) else WRONG_ANSWER), ""
  try:
    with open(os.path.join(workdir, "result.json")) as f:
      got = json.load(f)["result"]
  except (OSError, ValueError, KeyError):
    return RUNTIME_ERROR, ""
  return (PASS if _results_match(got, test.output) else WRONG_ANSWER), ""


def run_test_outcomes(code: str, tests: Sequence[TestCase], *, timeout_s: float = 5.0,
                      memory_bytes: int = _DEFAULT_MEMORY_BYTES, file_bytes: int = _DEFAULT_FILE_BYTES,
                      stop_after_first_failure: int | None = None,
                      use_unshare: bool | None = None,
                      python: str | None = None) -> list[tuple[str, str]]:
  """Runs `code` on each test in its own sandboxed process; returns (outcome, detail) per test run.

  Args:
    code: Python source of the solution.
    tests: normalised tests (`normalize_tests`).
    timeout_s: wall-clock limit per test (CPU rlimit is ceil(timeout_s) + 1 s).
    memory_bytes: RLIMIT_AS of each test process.
    file_bytes: RLIMIT_FSIZE (caps stdout/stderr capture and any file written).
    stop_after_first_failure: if set, stop running tests with index >= this value once a
      test has failed (their outcome cannot change the score any more).
    use_unshare: None: use `unshare` namespaces when the kernel allows; False: only the
      in-process socket shim and rlimits; True: require `unshare` (RuntimeError if unusable).
    python: interpreter that runs the solution (default: this one, `sys.executable`).
  """
  if timeout_s <= 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  python = python or sys.executable
  prefix = sandbox_prefix() if use_unshare is not False else []
  if use_unshare and not prefix:
    raise RuntimeError("use_unshare=True but `unshare -n -p -f` is not usable on this machine")
  nproc = None
  if os.geteuid() != 0:  # RLIMIT_NPROC counts all processes of the uid and does not bind root
    nproc = _count_user_processes(os.geteuid()) + _DEFAULT_NPROC_HEADROOM
  root = tempfile.mkdtemp(prefix=f"{SANDBOX_DIR_PREFIX}{os.getpid()}_")
  results: list[tuple[str, str]] = []
  try:
    for k, test in enumerate(tests):
      if (stop_after_first_failure is not None and k >= stop_after_first_failure
          and any(o != PASS for o, _ in results)):
        break
      results.append(_run_one(code, test, os.path.join(root, f"t{k}"), prefix, timeout_s,
                              memory_bytes, file_bytes, nproc, python))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return results


def run_tests(code: str, tests: Sequence[TestCase], **kwargs) -> list[bool]:
  """`run_test_outcomes` reduced to pass/fail per test run (same arguments)."""
  return [o == PASS for o, _ in run_test_outcomes(code, tests, **kwargs)]


_HARNESS_ERROR_LOGGED = False


def score_detailed(response: str | None, tests: Any, *, timeout_s: float = 5.0,
                   memory_bytes: int = _DEFAULT_MEMORY_BYTES, file_bytes: int = _DEFAULT_FILE_BYTES,
                   use_unshare: bool | None = None, python: str | None = None) -> CodeScore:
  """PRIME code label of one response (see module docstring) and why: 1.0 if all tests pass,
  else the fraction of the first min(10, n) tests passed. No ```python block -> 0.0 (NO_CODE).

  A HARNESS_ERROR (the sandbox itself failed, e.g. a broken interpreter set-up) is logged at
  ERROR level once per process: a broken sandbox must never look like wrong answers.

  Args:
    response: decoded response text.
    tests: tests in any accepted format (`normalize_tests`); an empty list raises ValueError.
    timeout_s: wall-clock limit per test (PRIME/APPS: 5 s).
    memory_bytes, file_bytes, use_unshare, python: sandbox settings, see `run_test_outcomes`.
  """
  global _HARNESS_ERROR_LOGGED
  cases = normalize_tests(tests)
  if not cases:
    raise ValueError("tests: no test cases")
  code = extract_code(response)
  if code is None:
    return CodeScore(0.0, NO_CODE)
  n_frac = min(MAX_TESTS_FOR_FRACTION, len(cases))
  outcomes = run_test_outcomes(code, cases, timeout_s=timeout_s, memory_bytes=memory_bytes,
                               file_bytes=file_bytes, stop_after_first_failure=n_frac,
                               use_unshare=use_unshare, python=python)
  passed = [o == PASS for o, _ in outcomes]
  if len(passed) == len(cases) and all(passed):
    return CodeScore(1.0, PASS)
  reason, detail = next((o, d) for o, d in outcomes if o != PASS)
  if reason == HARNESS_ERROR and not _HARNESS_ERROR_LOGGED:
    _HARNESS_ERROR_LOGGED = True
    logging.getLogger(__name__).error(
        "jaxrl_dense code sandbox is BROKEN (every program will score 0): %s", detail)
  return CodeScore(sum(passed[:n_frac]) / n_frac, reason, detail)


def score(response: str | None, tests: Any, **kwargs) -> float:
  """PRIME code label of one response: `score_detailed(response, tests, **kwargs).score`."""
  return score_detailed(response, tests, **kwargs).score
