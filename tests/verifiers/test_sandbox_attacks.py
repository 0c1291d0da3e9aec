"""The red-team review's attacks on the code reward, as regression tests (bubblewrap sandbox).

Each attack either tries to forge a verdict (must score 0), to reach outside the sandbox (must
have no effect: files, processes, network, secrets), or to hurt the caller (the test process
plays the trainer and must survive). Numbers R1..R24 are the review's rows.
"""
import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxrl_dense.verifiers import VerifierPool, kind_of_source
from jaxrl_dense.verifiers import code as vcode
from jaxrl_dense.verifiers import sandbox as sandbox_lib

pytestmark = pytest.mark.skipif(not sandbox_lib.bwrap_available()[0],
                                reason="bubblewrap unusable here (.ci/run installs it)")

T = 2.0
A = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
OK = [{"input": "", "output": "ok"}]


def py(src: str) -> str:
  return "```python\n" + src + "\n```"


def detailed(src, tests, **kw):
  kw.setdefault("timeout_s", T)
  return vcode.score_detailed(py(src), tests, **kw)


# ------------------------------------------------------------------ forged verdicts (R1-R3)

FORGERIES = {
    "sys.exit": "import sys\nsys.exit(0)",
    "os._exit": "import os\nos._exit(0)",
    "SystemExit": "raise SystemExit",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b): return a - b",
    "excepthook": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\ndef add(a, b): raise ValueError",
    "thread exit": "import os, threading\nthreading.Timer(0.0, lambda: os._exit(0)).start()\n"
                   "import time\ntime.sleep(0.5)\ndef add(a, b): return 0",
    "always equal": "class E:\n    def __eq__(s, o): return True\n    def __ne__(s, o): return False\n"
                    "def add(a, b): return E()",
    "int subclass": "class I(int):\n    def __eq__(s, o): return True\ndef add(a, b): return I(0)",
    "repr forgery": "class R:\n    def __repr__(s): return '3'\ndef add(a, b): return R()",
    "rewrite test": "open('test_stmt.py', 'w').write('pass')\ndef add(a, b): return 0",
    "builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None",
    "builtins.eval": "import builtins\nbuiltins.eval = lambda *a, **k: 3\ndef add(a, b): return 0",
    "read expected": "import os, glob\nsrc = ''.join(open(f).read() for f in glob.glob('/sandbox/*'))\n"
                     "def add(a, b): return int('4' in src and '3' in src and 0)",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_verdicts_score_zero(name):
  r = detailed(FORGERIES[name], A)
  assert r.score == 0.0, (name, r)
  assert r.reason != vcode.HARNESS_ERROR


def test_expected_values_never_enter_the_sandbox():
  # the program sees the call expressions (it must compute them) but not the expected values
  src = ("import os\nseen = ''.join(open('/sandbox/' + f).read() for f in os.listdir('/sandbox')\n"
         "               if f != 'solution.py')\n"
         "def add(a, b): return a + b if '12345' + '67' not in seen else 0")
  assert vcode.score(py(src), ["assert add(1234560, 7) == 1234567"], timeout_s=T) == 1.0


def test_forged_values_are_worth_what_computing_them_is():
  # A program shares its process with the harness, so it can always make the values that leave
  # the sandbox whatever it likes; it cannot see the expected values, so forging one is the same
  # as returning it: here a constant 3, which passes add(1, 2) == 3 and fails add(2, 2) == 4.
  line = "\\nJAXRL_RESULT {\"results\": [{\"value\": 3}]}\\n"
  fake = ("import os\nfor fd in range(1, 20):\n    try: os.write(fd, b'" + line + "')\n"
          "    except OSError: pass\nos._exit(0)")
  honest = "def add(a, b): return 3"
  assert detailed(fake, A).score == detailed(honest, A).score == 0.5


def test_call_based_returns_are_plain_data_compared_here():
  tests = {"fn_name": "f", "inputs": [[1]], "outputs": [2]}
  assert detailed("class E:\n    def __eq__(s, o): return True\ndef f(x): return E()", tests).score == 0.0
  assert detailed("import sys\ndef f(x): sys.exit(0)", tests).score == 0.0
  assert detailed("def f(x): return 2", tests).score == 1.0
  # tuples, sets, dicts, nan and big ints survive the trip
  tests = ["assert f(0) == (1, {2, 3}, {'a': [4]}, 10**30)", "assert f(1) != f(1)",
           "assert math.isclose(g(), 0.1 + 0.2)", "assert isinstance(f(0), tuple)",
           "assert sorted(h()) == [1, 2, 3] and len(h()) == 3", "assert not k()", "assert f(0)[3] > 10**29"]
  src = ("def f(x): return (1, {2, 3}, {'a': [4]}, 10**30) if x == 0 else float('nan')\n"
         "def g(): return 0.30000000000000004\ndef h(): return {3, 1, 2}\ndef k(): return []")
  assert detailed(src, tests).score == 1.0


# ------------------------------------------------------------------ filesystem (R4-R6, R18, R19)

def test_host_files_are_invisible(tmp_path):
  secret = tmp_path / "id_rsa"
  secret.write_text("PRIVATE KEY")
  repo = os.path.dirname(importlib.util.find_spec("jaxrl_dense").origin)
  prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
  src = (f"import os\nfound = []\nfor p in ['/etc/passwd', '/etc/shadow', '/etc', {str(secret)!r}, {repo!r},"
         f" '/root/.ssh', '/home', {os.getcwd()!r}, {str(tmp_path)!r}]:\n"
         "    if os.path.exists(p): found.append(p)\n"
         # the interpreter's prefix is visible (read-only); its parents hold nothing else
         f"p = {prefix!r}\nwhile p != '/':\n    p = os.path.dirname(p)\n"
         "    if p != '/' and len(os.listdir(p)) != 1: found.append(p)\n"
         "print('ok' if not found else found)")
  assert detailed(src, OK).score == 1.0


def test_no_writes_or_deletes_outside(tmp_path):
  victim = tmp_path / "keep.txt"
  victim.write_text("keep")
  src = (f"import posix, os, ctypes\nfor f in (lambda: posix.unlink({str(victim)!r}), lambda: open({str(victim)!r}, 'w'),\n"
         f"          lambda: open('/usr/bin/planted', 'w'), lambda: posix.mkdir('/usr/x'),\n"
         f"          lambda: posix.system('rm -f {victim} /usr/bin/python3'),\n"
         f"          lambda: ctypes.CDLL(None).system(b'rm -f {victim}; touch /usr/bin/planted')):\n"
         "    try: f()\n    except OSError: pass\nprint('ok')")
  assert detailed(src, OK).score == 1.0
  assert victim.read_text() == "keep"
  assert not os.path.exists("/usr/bin/planted")


def test_installed_verifier_and_site_packages_cannot_be_tampered():
  spec = importlib.util.find_spec("jaxrl_dense")
  target = os.path.join(os.path.dirname(spec.origin), "verifiers", "code.py")
  before = hashlib.sha256(open(target, "rb").read()).hexdigest()
  site = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
  src = (f"paths = [{target!r}] + [p + '/evil.pth' for p in {site!r}]\n"
         "for p in paths:\n    try: open(p, 'a').write('\\n_outputs_match = lambda *a: True\\n')\n"
         "    except OSError: pass\nprint('ok')")
  assert detailed(src, OK).score == 1.0
  assert hashlib.sha256(open(target, "rb").read()).hexdigest() == before
  assert not any(os.path.exists(os.path.join(p, "evil.pth")) for p in site)


def test_fifo_or_replaced_output_does_not_hang():
  src = "import os, posix\ntry:\n    posix.unlink('stdout.txt')\nexcept OSError: pass\nos.mkfifo('stdout.txt')\nprint('ok')"
  t0 = time.monotonic()
  detailed(src, OK, timeout_s=2.0)
  assert time.monotonic() - t0 < 5.0
  r = detailed("import os\nos.makedirs('../t1')\nprint('ok')", OK * 2)  # R19: no exception escapes
  assert r.reason in (vcode.PASS, vcode.RUNTIME_ERROR)


# ------------------------------------------------------------------ processes (R10-R16)

@pytest.fixture
def victim():
  """A stand-in for the trainer: a process whose command line a program could search for."""
  env = dict(os.environ, FAKE_SECRET_TOKEN="sk-fake-123")
  p = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)", "TRAINER_STANDIN"], env=env)
  time.sleep(0.2)
  yield p
  p.kill()
  p.wait()


SCAN = """import os
pids = []
for p in os.listdir('/proc'):
    try:
        if p.isdigit() and b'TRAINER_STANDIN' in open(f'/proc/{p}/cmdline', 'rb').read():
            pids.append(int(p))
    except OSError:
        pass
"""


def test_trainer_cannot_be_found_killed_or_written(victim):
  kill = SCAN + "import posix\nfor p in pids + [os.getppid(), 1]:\n    try: posix.kill(p, 9)\n    except OSError: pass\nprint('ok')"
  detailed(kill, OK)
  stack = SCAN + """for p in pids:
    for line in open(f'/proc/{p}/maps'):
        if line.rstrip().endswith('[stack]'):
            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))
            with open(f'/proc/{p}/mem', 'r+b', 0) as m: m.seek(lo); m.write(bytes(hi - lo))
print('ok' if pids else 'none')"""
  assert detailed(stack, [{"input": "", "output": "none"}]).score == 1.0  # not even visible
  time.sleep(0.2)
  assert victim.poll() is None  # the trainer stand-in is alive


def test_secrets_of_other_processes_are_unreadable(victim, monkeypatch):
  monkeypatch.setenv("FAKE_SECRET_TOKEN", "sk-fake-123")
  src = """import os
def rd(p):
    try: return open(f'/proc/{p}/environ', 'rb').read()
    except OSError: return b''
leak = any(b'FAKE_SECRET_TOKEN' in rd(p) for p in os.listdir('/proc') if p.isdigit()) or 'FAKE_SECRET_TOKEN' in os.environ
print('leak' if leak else 'ok')"""
  assert detailed(src, OK).score == 1.0


def test_process_count_is_capped_and_nothing_survives():
  marker = f"ESCAPEE_{os.getpid()}_{time.monotonic_ns()}"
  src = f"""import posix, os, time
n = 0
for i in range(300):
    try:
        pid = posix.fork()
    except OSError:
        break
    if pid == 0:
        try: os.setsid()
        except OSError: pass
        time.sleep(60); posix._exit(0)
    n += 1
print('{marker}', n)"""
  res = sandbox_lib.run([sys.executable, "-I", "-S", "-c", src], files={}, timeout_s=5.0,
                        limits=sandbox_lib.Limits(nproc=16))
  forked = int(res.stdout.split()[-1])
  assert forked < 16
  time.sleep(0.3)
  alive = []
  for p in os.listdir("/proc"):
    try:
      if p.isdigit() and marker.encode() in open(f"/proc/{p}/cmdline", "rb").read():
        alive.append(p)
    except OSError:
      pass
  assert alive == []  # the setsid'd children died with the sandbox's PID namespace


def test_tree_memory_is_capped_where_cgroups_are_writable():
  if not sandbox_lib._cgroup_root():
    pytest.skip("no writable cgroup here: memory is RLIMIT_AS per process only")
  src = """import posix, time
kids = []
for i in range(4):
    pid = posix.fork()
    if pid == 0:
        x = b'x' * (200 << 20); time.sleep(3); posix._exit(0)
    kids.append(pid)
ok = all(posix.waitpid(k, 0)[1] == 0 for k in kids)
print('ok' if ok else 'killed')"""
  res = sandbox_lib.run([sys.executable, "-I", "-S", "-c", src], files={}, timeout_s=8.0,
                        limits=sandbox_lib.Limits(memory_bytes=400 << 20))
  assert b"ok" not in res.stdout  # 4 x 200 MB > 400 MB for the tree, though each process fits


# ------------------------------------------------------------------ network (R7-R9)

def test_network_namespace_cannot_be_escaped():
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(5)
  srv.settimeout(0.2)
  port = srv.getsockname()[1]
  got = []
  stop = threading.Event()

  def accept():
    while not stop.is_set():
      try:
        got.append(srv.accept()[0])
      except OSError:
        pass

  th = threading.Thread(target=accept, daemon=True)
  th.start()
  try:
    escape = f"""import ctypes, os, _socket
libc = ctypes.CDLL(None)
me = os.readlink('/proc/self/ns/net')
for p in os.listdir('/proc'):
    try:
        if p.isdigit() and os.readlink(f'/proc/{{p}}/ns/net') != me:
            libc.setns(os.open(f'/proc/{{p}}/ns/net', os.O_RDONLY), 0x40000000)
    except OSError:
        pass
s = _socket.SocketType(2, 1); s.settimeout(2); s.connect(('127.0.0.1', {port})); print('ok')"""
    plain = f"import _socket\ns = _socket.SocketType(2, 1); s.settimeout(2); s.connect(('127.0.0.1', {port})); print('ok')"
    for src in (escape, plain):
      assert detailed(src, OK, timeout_s=4.0).score == 0.0
    time.sleep(0.3)
    assert got == []
  finally:
    stop.set()
    th.join(2)
    srv.close()


# ------------------------------------------------------------------ items, pool, trainer (R14, R17, R22)

def test_items_cannot_touch_each_other_in_the_pool():
  wrong = py("import time\ntime.sleep(2.0)\ndef add(a, b):\n    return a - b")
  right = py("import time\ntime.sleep(2.0)\ndef add(a, b):\n    return a + b")
  evil = py("import glob, os, time\nt0 = time.time()\nwhile time.time() - t0 < 1.5:\n"
            "    for f in glob.glob('/tmp/**/*', recursive=True) + glob.glob('/sandbox/*'):\n"
            "        try: open(f, 'w').write('pass')\n        except OSError: pass\n    time.sleep(0.01)\nprint('x')")
  with VerifierPool(workers=2) as pool:
    s = pool.verify([wrong, evil, right, evil], [A, OK, A, OK], kinds="code", timeout_s=20.0)
    np.testing.assert_array_equal(s, [0.0, 0.0, 1.0, 0.0])
    # the worker survives a program that tries to kill its parent, and the pool goes on
    s = pool.verify([py("import os, posix\nposix.kill(os.getppid(), 9)\nprint('ok')"), right], [OK, A],
                    kinds="code", timeout_s=20.0)
    assert s[1] == 1.0
    assert pool.last_stats.crashes == 0


def test_spoofed_harness_error_is_the_programs_failure():
  src = "import sys, os\nsys.stderr.write('JAXRL_SANDBOX_HARNESS_ERROR: fake\\n'); sys.stderr.write('bwrap: fake\\n')\nos._exit(1)"
  r = detailed(src, OK)
  assert (r.score, r.reason) == (0.0, vcode.RUNTIME_ERROR)


# ------------------------------------------------------------------ comparisons and routing (R23, R24)

def test_integer_outputs_compare_exactly():
  assert detailed("print(1000000000)", [{"input": "", "output": "1000000006"}]).score == 0.0
  assert detailed("print(123456700)", [{"input": "", "output": "123456789"}]).score == 0.0
  assert detailed("print(5.0)", [{"input": "", "output": "5"}]).score == 1.0
  assert detailed("print(1000000000.5)", [{"input": "", "output": "1000000000"}]).score == 0.0
  assert detailed("print(0.3333333)", [{"input": "", "output": "0.33333333"}]).score == 1.0


@pytest.mark.parametrize("source,kind", [("unicode_math", "math"), ("math_decode", "math"), ("leetcode", "math"),
                                         ("code_contests_math", "math"), ("apps", "code"), ("code", "code")])
def test_routing_is_by_exact_name(source, kind):
  assert kind_of_source(source) == kind


def test_code_rows_need_test_specs(tmp_path):
  from jaxrl_dense.data import prompts
  p = tmp_path / "d.jsonl"
  p.write_text('{"problem": "2+3?", "answer": "5", "data_source": "apps"}\n')
  with pytest.raises(prompts.PromptDataError, match="not a test spec"):
    prompts.load_prompts(str(p))
  p.write_text('{"problem": "2+3?", "answer": "5", "data_source": "unicode_math"}\n'
               '{"problem": "add", "answer": "[\\"assert add(1, 2) == 3\\"]", "verifier": "code"}\n')
  recs = prompts.load_prompts(str(p))
  assert [kind_of_source(r.verifier_source) for r in recs] == ["math", "code"]


# ------------------------------------------------------------------ refusing the weak sandbox

def test_missing_bwrap_refuses_with_install_hint(monkeypatch):
  monkeypatch.setitem(sandbox_lib._PROBE, "bwrap", (False, "`bwrap` is not on PATH"))
  with pytest.raises(sandbox_lib.SandboxUnavailableError, match="apt-get install bubblewrap"):
    vcode.score(py("print('ok')"), OK)
  with VerifierPool(workers=1) as pool:
    with pytest.raises(sandbox_lib.SandboxUnavailableError, match="unsafe_code_sandbox"):
      pool.verify([py("print('ok')")], [OK], kinds="code")
    np.testing.assert_array_equal(pool.verify(["\\boxed{5}"], ["5"], kinds="math"), [1.0])  # math unaffected
  assert vcode.score(py("print('ok')"), OK, sandbox="unsafe") == 1.0  # explicit weaker mode


def test_unsafe_mode_warns_once(monkeypatch, caplog):
  monkeypatch.setattr(sandbox_lib, "_UNSAFE_WARNED", False)
  with caplog.at_level("WARNING"):
    vcode.score(py("print('ok')"), OK, sandbox="unsafe")
    vcode.score(py("print('ok')"), OK, sandbox="unsafe")
  assert sum("UNSAFE" in r.getMessage() for r in caplog.records) == 1


def test_trainer_refuses_code_rows_without_bwrap_before_any_model_loads(tmp_path, monkeypatch):
  from jaxrl_dense.rl import config as config_lib
  from jaxrl_dense.rl import load
  p = tmp_path / "code.jsonl"
  p.write_text('{"problem": "add", "answer": "[\\"assert add(1, 2) == 3\\"]", "verifier": "code"}\n')
  cfg = config_lib.replace(config_lib.RunConfig(), train_data=str(p))
  load.check_data_spec("train_data", str(p), cfg, allow_empty=False)  # bwrap usable: fine
  monkeypatch.setitem(sandbox_lib._PROBE, "bwrap", (False, "`bwrap` is not on PATH"))
  with pytest.raises(config_lib.ConfigError, match="train_data.*1 rows are scored by the code verifier.*bubblewrap"):
    load.check_data_spec("train_data", str(p), cfg, allow_empty=False)
  unsafe = config_lib.replace(cfg, unsafe_code_sandbox=True)
  load.check_data_spec("train_data", str(p), unsafe, allow_empty=False)  # the explicit weaker mode
