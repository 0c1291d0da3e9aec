"""The tool-learning check's inputs (docs/results/tool_learning/): experiments/tool_warmstart.py
writes a model directory that the trainer's --model accepts, with the character tokenizer and the
demonstration mix it reports, and experiments/configs/tool_calc_tiny.flags parses into a
multi-turn calculator run on it."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS = REPO / "experiments" / "configs" / "tool_calc_tiny.flags"


def test_warm_start_output_loads_and_the_flag_file_runs_it(tmp_path):
  out = tmp_path / "ws"
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "tool_warmstart.py"), f"--out={out}",
                      "--limit=40", "--steps=2", "--full_steps=1", "--batch=4",
                      "--shape=hidden=16,layers=1,heads=2,kv_heads=1,mlp=32"],
                     capture_output=True, text=True, cwd=str(REPO), timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((out / "warmstart.json").read_text())
  assert summary["num_demos"] == 40 and 0.5 < summary["tool_frac"] < 1.0  # 80% tool episodes asked
  assert [c[1] for c in summary["loss_curve"]] == ["window", "full"]  # steps 0 and 2 (the last)
  assert all(np.isfinite(c[2]) for c in summary["loss_curve"])

  from jaxrl_dense import models
  from jaxrl_dense.models import tokenizer as tok_lib
  from jaxrl_dense.rl import config as config_lib
  from jaxrl_dense.rl import load
  loaded = models.load_pretrained(out)
  assert loaded.config.hidden_size == 16 and loaded.config.num_layers == 1
  chars = tok_lib.char_chat_tokenizer()
  text = "<tool>calculator: 347 + 589</tool>"
  assert loaded.tokenizer.encode(text, add_special_tokens=False) == chars.encode(text, add_special_tokens=False)
  msgs = [{"role": "user", "content": "What is 1 + 2?"}]
  assert (loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
          == chars.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))

  cfg = config_lib.from_args([f"--flagfile={FLAGS}", f"--model={out}"])
  load.check_model_spec("model", cfg.model)  # a directory with config.json and weights
  r_cfg = cfg.prime.rollout
  assert r_cfg.env == "tool:calculator" and r_cfg.max_turns == 3
  for adv in ("matchtir", "igpo", ""):  # the three arms are valid settings of the one flag file
    config_lib.replace(cfg, advantage=adv)
  train, ev = load.load_records(cfg)
  assert len(ev) == 200 and not {x.uid.split(":")[-1] for x in train} & {x.uid.split(":")[-1] for x in ev}
  assert all(x.gold_calls for x in train[:10])  # MatchTIR's match target
