"""`benchmarks/device.py --smoke`: every section runs on CPU with tiny shapes and writes its JSON."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "device.py")


def _module():
  spec = importlib.util.spec_from_file_location("device_bench", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow  # small compiles (samplers, train step, GRPO and PRIME updates, engine): ~2-3 min
def test_smoke_runs_every_section(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = tmp_path / "device.json"
  result = _module().main(["--smoke", "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["smoke"] and saved["backend"] == result["backend"]
  for name in ("roofline", "rollout", "train", "step", "engine"):
    assert "error" not in saved[name], (name, saved[name])
  (row,) = saved["rollout"]
  assert row["ours_tok_s"] > 0 and row["peer_tok_s"] > 0 and row["ratio"] > 0
  assert row["decode_bytes"] > 0 and row["decode_bytes_s"] > 0
  train = saved["train"]
  assert train["ours_tok_s"] > 0 and train["peer_tok_s"] > 0 and train["flops_per_token"] > 0
  assert train["ours_mfu_measured_peak"] > 0   # against this run's own matmul
  step = saved["step"]   # the whole step: rollout copy + generate + update, each part timed
  for algo in ("prime", "grpo"):
    parts = [step[f"{algo}_{k}_s"] for k in ("rollout_copy", "generate", "update")]
    assert all(p > 0 for p in parts) and abs(sum(parts) - step[f"{algo}_step_s"]) < 1e-9
  assert abs(step["prime_over_grpo_full_step"] - step["prime_step_s"] / step["grpo_step_s"]) < 1e-9
  assert abs(step["prime_over_grpo_update"] - step["prime_update_s"] / step["grpo_update_s"]) < 1e-9
  eng = saved["engine"]   # heavy-tailed and uniform workloads, both samplers, tokens/s each
  assert {r["workload"] for r in eng["rows"]} == {"heavy_tailed", "uniform"}
  assert all(r["static_tok_s"] > 0 and r["engine_tok_s"] > 0 for r in eng["rows"])
  assert eng["speedup_heavy_tailed"] > 0
  # Every figure is printed next to its goal.
  text = "\n".join(saved["summary"])
  for goal in ("goal >= 50%", "goal >= 45%", "goal <= 1.25", "goal >= 2x"):
    assert goal in text, text


def test_flop_count_and_bytes_by_hand():
  mod = _module()
  cfg = mod._config("tiny")
  pc = mod._param_count(cfg)
  d, hd, h, hkv, i, v, l = 64, 16, 4, 2, 128, 256, 2
  assert pc["layer_matmul"] == l * (d * (h + 2 * hkv) * hd + h * hd * d + 3 * d * i)
  assert pc["total"] == pc["layer_matmul"] + d * v  # tied embedding counted once
