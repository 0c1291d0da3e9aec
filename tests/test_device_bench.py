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


@pytest.mark.slow  # four small compiles (sampler, train step, GRPO and PRIME updates): ~1 min
def test_smoke_runs_every_section(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = tmp_path / "device.json"
  result = _module().main(["--smoke", "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["smoke"] and saved["backend"] == result["backend"]
  for name in ("roofline", "rollout", "train", "rl"):
    assert "error" not in saved[name], (name, saved[name])
  (row,) = saved["rollout"]
  assert row["ours_tok_s"] > 0 and row["peer_tok_s"] > 0 and row["ratio"] > 0
  assert row["decode_bytes"] > 0 and row["decode_bytes_s"] > 0
  train = saved["train"]
  assert train["ours_tok_s"] > 0 and train["peer_tok_s"] > 0 and train["flops_per_token"] > 0
  rl = saved["rl"]
  assert rl["prime_s"] > 0 and rl["grpo_s"] > 0
  assert abs(rl["prime_over_grpo"] - rl["prime_s"] / rl["grpo_s"]) < 1e-9
  # Every figure is printed next to its goal.
  text = "\n".join(saved["summary"])
  for goal in ("goal >= 50%", "goal >= 45%", "goal <= 1.25"):
    assert goal in text, text


def test_flop_count_and_bytes_by_hand():
  mod = _module()
  cfg = mod._config("tiny")
  pc = mod._param_count(cfg)
  d, hd, h, hkv, i, v, l = 64, 16, 4, 2, 128, 256, 2
  assert pc["layer_matmul"] == l * (d * (h + 2 * hkv) * hd + h * hd * d + 3 * d * i)
  assert pc["total"] == pc["layer_matmul"] + d * v  # tied embedding counted once
