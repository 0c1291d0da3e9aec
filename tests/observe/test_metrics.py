"""Tests for jaxrl_dense.observe.metrics: JSONL + TensorBoard writer, StageTimer, ProgressBar."""
import math
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.observe import metrics


def _tb_scalars(logdir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  ea = EventAccumulator(str(logdir))
  ea.Reload()
  return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    w.write(1, {"acc": 0.25, "prm/loss": jnp.float32(0.5), "n": np.int64(3),
                "flag": True, "arr": jnp.ones((1,)) * 2})
    w.write(2, {"acc": 0.5, "prm/loss": float("nan")})
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["acc"] == 0.25 and rows[0]["prm/loss"] == 0.5 and rows[0]["n"] == 3
  assert rows[0]["flag"] == 1 and rows[0]["arr"] == 2.0
  assert math.isnan(rows[1]["prm/loss"])
  assert isinstance(rows[0]["time"], float)
  tb = _tb_scalars(tmp_path)
  assert tb["acc"] == [(1, 0.25), (2, 0.5)]
  assert tb["prm/loss"][0] == (1, 0.5)


def test_tensorboard_writer_alone(tmp_path):
  w = metrics.TensorBoardWriter(tmp_path / "tb")
  w.write({"a": 1.5, "b": jnp.float32(2.0), "skip": "text", "vec": np.ones(2)}, 3)
  w.close()
  tb = _tb_scalars(tmp_path / "tb")
  assert tb == {"a": [(3, 1.5)], "b": [(3, 2.0)]}


def test_bad_metrics(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match="'vec' must be a scalar"):
      w.write(1, {"vec": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      w.write(1, {"step": 3})
    with pytest.raises(ValueError, match="'s' must be"):
      w.write(1, {"s": "text"})


def test_truncate_after_for_resume(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    for s in range(1, 6):
      w.write(s, {"x": s})
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    assert w.truncate_after(3) == 2
    assert [r["step"] for r in w.history] == [1, 2, 3]
    w.write(4, {"x": 40})
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["x"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40)]
  with metrics.MetricsWriter(tmp_path, tensorboard=False, fresh=True) as w:
    w.write(1, {"x": 7})
  assert [(r["step"], r["x"]) for r in metrics.read_jsonl(w.jsonl_path)] == [(1, 7)]


def test_read_jsonl_names_bad_line(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text('{"step": 1}\n{oops\n')
  with pytest.raises(ValueError, match="m.jsonl line 2"):
    metrics.read_jsonl(p)


def test_stage_timer():
  t = metrics.StageTimer()
  with t("generate"):
    time.sleep(0.05)
  with t("verify"):
    time.sleep(0.01)
  with t("generate"):
    time.sleep(0.02)
  times = t.times
  assert list(times) == ["generate", "verify"]
  assert 0.06 <= times["generate"] < 0.5 and 0.01 <= times["verify"] < 0.4
  s = t.summary()
  assert s["time/step"] == pytest.approx(times["generate"] + times["verify"])
  assert t.block(jnp.ones(2)).shape == (2,)
  with pytest.raises(RuntimeError):
    with t("policy_update"):
      raise RuntimeError("boom")
  assert "policy_update" in t.times  # time is recorded even when the stage fails
  t.reset()
  assert t.times == {}
  assert set(metrics.STAGES) == {"generate", "verify", "prm_update", "scoring", "policy_update"}


def test_progress_bar():
  bar = metrics.ProgressBar(10, initial=2, disable=False)
  bar.update(5, acc=0.5, loss=jnp.float32(1.25), skipped=np.ones(3))
  assert bar.format_dict["n"] == 5 and bar.format_dict["total"] == 10
  bar.update(5)  # same step: no movement
  assert bar.format_dict["n"] == 5
  bar.close()
  with pytest.raises(ValueError, match="initial"):
    metrics.ProgressBar(3, initial=4)


# ------------------------------------------------------------------------------ plot_metrics
def _plot_module():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "experiments", "plot_metrics.py")
  spec = importlib.util.spec_from_file_location("plot_metrics_under_test", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_plot_metrics_png(tmp_path):
  pm = _plot_module()
  logs = []
  for name, slope in (("prime", 0.02), ("rloo", 0.01)):
    with metrics.MetricsWriter(tmp_path / name, tensorboard=False) as w:
      for s in range(1, 21):
        row = {"outcome/acc": 0.2 + slope * s, "prm/loss": 1.0 / s}
        if s % 5 == 0:
          row["eval/pass@1"] = 0.1 + slope * s
        w.write(s, row)
    logs.append(str(w.jsonl_path))
  out = pm.plot(logs, str(tmp_path / "fig" / "curves.png"), labels=["PRIME", "RLOO"], smooth=3)
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  assert pm.series(metrics.read_jsonl(logs[0]), "eval/pass@1")[0] == [5, 10, 15, 20]
  assert pm.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
  assert pm.choose_keys([metrics.read_jsonl(logs[0])], []) == ["outcome/acc", "eval/pass@1",
                                                               "prm/loss"]
  with pytest.raises(ValueError, match="not in the logs"):
    pm.plot(logs, str(tmp_path / "x.png"), keys=["nope"])
  with pytest.raises(ValueError, match="--labels has 1"):
    pm.plot(logs, str(tmp_path / "x.png"), labels=["a"])
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    pm.plot([str(tmp_path / "missing.jsonl")], str(tmp_path / "x.png"))
