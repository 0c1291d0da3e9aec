"""Multi-controller JAX on one machine: 2 processes x 4 simulated CPU devices == 1 process x 8.

Each of the two processes runs tests/sharding_worker.py in "multi" mode: it calls
`jax.distributed.initialize(coordinator_address="127.0.0.1:PORT", num_processes=2, process_id=i)`
with gloo CPU collectives, builds the global data:2,fsdp:2,tensor:2 mesh over all 8 devices,
shards a tiny model (FSDP + tensor parallel), runs forward, token_logprobs, one PRM update and one
PPO step as ONE jitted SPMD program, then saves the new params + AdamW state with Orbax (each
process writes its own shards) and restores them with the same shardings. A third process runs
the same workload single-process on 8 devices; the results must agree to 1e-5.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "sharding_worker.py")
TOL = 1e-5
COMPARED = ("logits", "logprobs", "prm_loss", "prm_params", "policy_loss", "policy_params")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n} "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.mark.slow  # ~67 s of CPU over 3 processes (~2 min wall on the shared 2-core machine)
def test_two_processes_match_one_process_and_checkpoint(tmp_path):
  port = free_port()
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  multi_out = tmp_path / "multi.json"
  single_out = tmp_path / "single.json"
  procs = []
  for pid in range(2):
    cmd = [sys.executable, WORKER, "multi", str(multi_out), "--process-id", str(pid),
           "--num-processes", "2", "--port", str(port), "--ckpt-dir", str(ckpt)]
    procs.append(subprocess.Popen(cmd, env=env_with_devices(4), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  procs.append(subprocess.Popen([sys.executable, WORKER, "single", str(single_out)],
                                env=env_with_devices(8), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True))
  logs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=900)
      logs.append(err[-3000:])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log

  multi = json.loads(multi_out.read_text())
  single = json.loads(single_out.read_text())
  assert multi["process_count"] == 2 and multi["local_devices"] == 4
  assert single["process_count"] == 1 and single["local_devices"] == 8
  for key in COMPARED:
    a, b = np.asarray(multi[key]), np.asarray(single[key])
    assert a.shape == b.shape, key
    diff = float(np.max(np.abs(a - b)))
    assert diff <= TOL, f"{key}: 2-process result differs from the 1-process one by {diff}"
  assert np.isfinite(multi["prm_loss"]) and abs(multi["policy_loss"]) > 0
  # FSDP x tensor = 4 shards per parameter: each process holds 4 of the 8 devices' shards.
  assert len(multi["param_bytes_per_device"]) == 4
  assert multi["param_bytes_per_device"] == {k: v for k, v in single["param_bytes_per_device"].items()
                                             if k in multi["param_bytes_per_device"]}
  # Orbax: written by both processes, restored bit-exactly with the same global shardings.
  assert multi["ckpt_equal"] is True
  assert multi["ckpt_sharding_kept"] is True
  assert multi["ckpt_local_shards"] == 4
  assert (ckpt / "step_1").is_dir()
