"""`benchmarks/device.py --smoke`: every section runs on CPU with tiny shapes and writes its JSON."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                     "device.py")


def _module():
  spec = importlib.util.spec_from_file_location("device_bench", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow  # small compiles (samplers, train step, GRPO and PRIME steps, engine)
def test_smoke_runs_every_section(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  mod = _module()
  out = tmp_path / "device.json"
  result = mod.main(["--smoke", "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["smoke"] and saved["backend"] == result["backend"]
  for name in ("roofline", "rollout", "train", "full_step", "engine"):
    assert "error" not in saved[name], (name, saved[name])
  # The schema the README cites: every required figure present, finite and positive.
  assert saved["schema_problems"] == [] and mod.check_schema(saved) == []
  (row,) = saved["rollout"]   # the trainer's rollout copy, timed, then generate
  assert row["ours_tok_s"] > 0 and row["peer_tok_s"] > 0 and row["ratio"] > 0
  assert row["rollout_copy_s"] > 0 and row["decode_bytes"] > 0 and row["decode_bytes_s"] > 0
  train = saved["train"]
  assert train["ours_tok_s"] > 0 and train["peer_tok_s"] > 0 and train["flops_per_token"] > 0
  assert train["measured_peak_tflops"] == saved["roofline"]["matmul_tflops"]  # this run's matmul
  assert train["ours_mfu_measured_peak"] > 0
  step = saved["full_step"]   # the whole step: rollout copy + generate + update, each part timed
  for algo in ("prime", "grpo"):
    parts = [step[f"{algo}_{k}_s"] for k in ("rollout_copy", "generate", "update")]
    assert all(p > 0 for p in parts) and abs(sum(parts) - step[f"{algo}_s"]) < 1e-9
  assert abs(step["ratio"] - step["prime_s"] / step["grpo_s"]) < 1e-9
  assert abs(step["update_ratio"] - step["prime_update_s"] / step["grpo_update_s"]) < 1e-9
  eng = saved["engine"]   # heavy-tailed on top, both workloads in rows, tokens/s each
  assert {r["workload"] for r in eng["rows"]} == {"heavy_tailed", "uniform"}
  assert all(r["static_tok_s"] > 0 and r["engine_tok_s"] > 0 for r in eng["rows"])
  assert abs(eng["speedup"] - eng["engine_tok_s"] / eng["static_tok_s"]) < 1e-9
  # Every figure is printed next to its goal.
  text = "\n".join(saved["summary"])
  for goal in ("goal >= 50%", "goal >= 45%", "goal <= 1.25", "goal >= 2x"):
    assert goal in text, text


def test_schema_check_fails_on_a_broken_result():
  """check_schema (the control of the smoke test's schema assertion) names what is wrong."""
  mod = _module()
  good = {"roofline": {"matmul_tflops": 1.0, "copy_tbs": 1.0},
          "rollout": [{k: 1.0 for k in mod.ROLLOUT_SCHEMA}],
          "train": {"ours_tok_s": 1.0, "measured_peak_tflops": 1.0, "ours_mfu_measured_peak": 0.5},
          "full_step": {"prime_s": 2.0, "grpo_s": 1.0, "ratio": 2.0, "update_ratio": 2.5},
          "engine": {"engine_s": 1.0, "static_s": 2.0, "speedup": 2.0, "engine_tok_s": 9.0,
                     "static_tok_s": 4.5}}
  assert mod.check_schema(good) == []
  for section, key, value in (("full_step", "ratio", float("nan")), ("engine", "speedup", 0.0),
                              ("engine", "static_s", None), ("train", "measured_peak_tflops", "1")):
    bad = json.loads(json.dumps(good))
    bad[section][key] = value
    assert mod.check_schema(bad) == [f"{section}.{key} = {value!r}"], (section, key)
  assert mod.check_schema({k: v for k, v in good.items() if k != "full_step"}) == ["full_step: missing"]
  assert mod.check_schema({**good, "engine": {"error": "boom"}}) == ["engine: boom"]
  assert mod.check_schema({"full_step": good["full_step"]}, ["full_step"]) == []


def test_section_aliases_of_the_device_script():
  """device_check.sh runs `--sections rl`: still the whole-step section; a typo is refused."""
  mod = _module()
  with pytest.raises(SystemExit):
    mod.main(["--smoke", "--sections", "rolout"])


def test_flop_count_and_bytes_by_hand():
  mod = _module()
  cfg = mod._config("tiny")
  pc = mod._param_count(cfg)
  d, hd, h, hkv, i, v, l = 64, 16, 4, 2, 128, 256, 2
  assert pc["layer_matmul"] == l * (d * (h + 2 * hkv) * hd + h * hd * d + 3 * d * i)
  assert pc["total"] == pc["layer_matmul"] + d * v  # tied embedding counted once
