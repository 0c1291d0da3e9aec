"""The persistent compilation cache: --compilation_cache_dir (default
<logdir>/jax_cache), set by experiments/prime_math.py through load.configure_compilation_cache,
is filled by a run, and a second process with the same programs loads them from it instead of
compiling (JAX's /jax/compilation_cache/cache_hits event); prime_math writes into it."""
import os
import pathlib
import subprocess
import sys

import pytest

from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import load

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "configs" / "smoke.flags"

# One Trainer step in a fresh process, counting the persistent-cache hits of its compilations.
CHILD = r"""
import sys, jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl.trainer import Trainer
from jaxrl_dense.rl import load
cfg = config_lib.replace(config_lib.from_args(["--flagfile=" + sys.argv[1]]), eval_data="", steps=1,
                         logdir=sys.argv[2], progress=False)
path = load.configure_compilation_cache(cfg)  # as experiments/prime_math.py does
run = Trainer(cfg)
run.train_step()
run.close()
print("CACHE_HITS", len(hits), path)
"""


def test_resolution_of_the_flag(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # (tests/conftest.py sets it)
  base = config_lib.from_args([f"--flagfile={SMOKE}"])
  assert load.compilation_cache_dir(config_lib.replace(base, logdir="")) == ""
  assert load.compilation_cache_dir(config_lib.replace(base, logdir="/x/y")) == "/x/y/jax_cache"
  assert load.compilation_cache_dir(config_lib.replace(base, logdir="/x", compilation_cache_dir="none")) == ""
  assert load.compilation_cache_dir(config_lib.replace(base, compilation_cache_dir=str(tmp_path))) == str(tmp_path)
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(config_lib.ConfigError, match="compilation_cache_dir"):
    load.check_inputs(config_lib.replace(base, compilation_cache_dir=str(afile)))
  assert "compilation_cache_dir" in config_lib.RUNTIME_ONLY  # a cache never changes a result
  # JAX's own setting, when the environment has one, wins over <logdir>/jax_cache; the flag over it
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/machine/cache")
  assert load.compilation_cache_dir(config_lib.replace(base, logdir="/x/y")) == "/machine/cache"
  assert load.compilation_cache_dir(config_lib.replace(base, compilation_cache_dir=str(tmp_path))) == str(tmp_path)
  assert load.compilation_cache_dir(config_lib.replace(base, logdir="/x", compilation_cache_dir="none")) == ""


def _env():
  """The child's environment without the test session's shared cache (tests/conftest.py), so
  the run's own default, <logdir>/jax_cache, is the one under test."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_programs(tmp_path):
  env = _env()
  out = []
  for _ in range(2):
    r = subprocess.run([sys.executable, "-c", CHILD, str(SMOKE), str(tmp_path / "logs")],
                       capture_output=True, text=True, timeout=600, cwd=str(REPO), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("CACHE_HITS"))
    out.append(int(line.split()[1]))
    assert line.split()[2] == str(tmp_path / "logs" / "jax_cache")
  # (the first process may hit its own entries: a program compiled twice in one run)
  assert any((tmp_path / "logs" / "jax_cache").iterdir())
  assert out[1] >= out[0] + 3, out  # sampler and update programs: loaded, not compiled


@pytest.mark.slow
def test_prime_math_writes_the_cache_under_its_logdir(tmp_path):
  env = _env()
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "prime_math.py"), f"--flagfile={SMOKE}",
                      "--eval_data=", "--steps=1", f"--logdir={tmp_path}/logs"],
                     capture_output=True, text=True, timeout=600, cwd=str(REPO), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert any((tmp_path / "logs" / "jax_cache").iterdir())
