"""README claims, proven: a run downloads nothing and never imports torch.

The PRIME smoke run (experiments/configs/smoke.flags) runs in a subprocess in which every Python
process (the trainer and the verifier pool's workers, through a `sitecustomize` on PYTHONPATH)
refuses any internet socket connection or name lookup, with the Hugging Face libraries set
offline. It must finish, and `torch` must not be in `sys.modules` at the end.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

_SITECUSTOMIZE = textwrap.dedent('''
    import socket as _socket

    _LOG = __import__("os").environ.get("JAXRL_NET_LOG")
    _real_connect = _socket.socket.connect
    _real_connect_ex = _socket.socket.connect_ex

    def _note(what):
      if _LOG:
        with open(_LOG, "a") as f:
          f.write(what + "\\n")

    def _guard(self, address):
      if self.family in (_socket.AF_INET, _socket.AF_INET6):
        _note("connect %r" % (address,))
        raise OSError("network access is blocked in this test (%r)" % (address,))

    def connect(self, address):
      _guard(self, address)
      return _real_connect(self, address)

    def connect_ex(self, address):
      _guard(self, address)
      return _real_connect_ex(self, address)

    def getaddrinfo(host, *a, **k):
      _note("getaddrinfo %r" % (host,))
      raise OSError("name lookup is blocked in this test (%r)" % (host,))

    _socket.socket.connect = connect
    _socket.socket.connect_ex = connect_ex
    _socket.getaddrinfo = getaddrinfo
''')

_DRIVER = textwrap.dedent('''
    import json, runpy, sys
    sys.argv = ["prime_math.py"] + sys.argv[1:]
    code = 0
    try:
      runpy.run_path("experiments/prime_math.py", run_name="__main__")
    except SystemExit as e:
      code = e.code or 0
    heavy = sorted(m for m in ("torch", "tensorflow", "transformers.models") if m in sys.modules)
    print("OFFLINE_RESULT " + json.dumps({"exit": code, "heavy_modules": heavy}))
''')


@pytest.mark.slow
def test_smoke_run_offline_without_torch(tmp_path):
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
  net_log = tmp_path / "net.log"
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", JAXRL_NET_LOG=str(net_log),
             PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
  # The guard itself works in a child interpreter.
  probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                         env=env, capture_output=True, text=True, timeout=60)
  assert probe.returncode != 0 and "blocked in this test" in probe.stderr
  net_log.unlink(missing_ok=True)
  proc = subprocess.run(
      [sys.executable, "-c", _DRIVER, "--flagfile=experiments/configs/smoke.flags",
       f"--logdir={tmp_path / 'run'}", "--steps=2", "--eval_at_start=false"],
      env=env, capture_output=True, text=True, timeout=900, cwd=str(REPO))
  line = next((l for l in proc.stdout.splitlines() if l.startswith("OFFLINE_RESULT ")), None)
  assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(line.split(" ", 1)[1])
  assert result["exit"] == 0, proc.stderr[-3000:]
  assert result["heavy_modules"] == [], result
  assert not net_log.exists(), net_log.read_text()  # not even an attempt
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
  assert len([r for r in rows if "step" in r]) >= 2
