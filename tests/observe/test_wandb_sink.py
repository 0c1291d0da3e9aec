"""jaxrl_dense.observe.wandb_sink in W&B offline mode (no network): scalars via MetricsWriter, the sample
page as wandb.Html, the samples table. The W&B tests skip when `wandb` is not installed.

The scalars are read back from the offline run file (`run-*.wandb`: W&B's LevelDB-style log of
`wandb_internal_pb2.Record` protos, read with the small reader below). The MetricsWriter sink
hook is also tested without wandb.
"""
import importlib.util
import json
import pathlib
import struct
import time

import numpy as np
import pytest

from jaxrl_dense.observe import viz
from jaxrl_dense.observe.metrics import MetricsWriter
from jaxrl_dense.observe.wandb_sink import WandbSink, samples_table_rows

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb not installed (pip install wandb)")


class _RecordingSink:
  def __init__(self):
    self.calls = []

  def write(self, step, scalars):
    self.calls.append(("write", step, dict(scalars)))

  def flush(self):
    self.calls.append(("flush",))

  def close(self):
    self.calls.append(("close",))


def test_metrics_writer_feeds_sinks(tmp_path):
  sink = _RecordingSink()
  writer = MetricsWriter(tmp_path, tensorboard=False, sinks=[sink])
  writer.write(3, {"a": np.float32(1.5), "b": True})
  writer.flush()
  writer.close()
  writer.close()  # closes each sink once
  assert sink.calls == [("write", 3, {"a": 1.5, "b": 1}), ("flush",), ("close",)]


def _records(path):
  """Records of a .wandb file: 7-byte file header, then 32 KiB blocks of (crc u32, len u16, type u8) chunks."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b":W&B", data[:7]
  block, pos, buf, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pos += 7
    if pos + length > len(data):  # a chunk still being written
      break
    if kind == 0 and length == 0:
      break
    chunk, pos = data[pos:pos + length], pos + length
    if kind == 1:
      out.append(chunk)
    elif kind == 2:
      buf = chunk
    elif kind == 3:
      buf += chunk
    elif kind == 4:
      out.append(buf + chunk)
      buf = b""
  recs = []
  for raw in out:
    r = pb.Record()
    r.ParseFromString(raw)
    recs.append(r)
  return recs


def _history(run_dir, timeout_s=60.0):
  """History rows of the offline run, once its exit record is on disk (wandb-core writes the
  file from its own process and may still be flushing when `finish()` returns)."""
  (path,) = pathlib.Path(run_dir).glob("run-*.wandb")
  deadline = time.time() + timeout_s
  while True:
    recs = _records(path)
    if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.time() > deadline:
      break
    time.sleep(0.2)
  rows = []
  for r in recs:
    if r.WhichOneof("record_type") == "history":
      rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
  return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
  return tmp_path


@needs_wandb
def test_scalars_page_and_table_offline(offline):
  from tests.observe.test_viz import example_groups
  prompts, texts, series, mask, acc = example_groups()
  groups = viz.groups_from_batch(prompts, texts, series, mask, acc, n=3, group_indices=[0, 2],
                                 titles=["best", "worst"])
  page = viz.write_html(offline / "samples" / "step_00002.html", groups)
  sink = WandbSink(project="jaxrl-dense-test", mode="offline", dir=offline / "wandb_dir",
                   config={"beta": 0.05})
  run_dir = pathlib.Path(sink.run.dir).parent
  with MetricsWriter(offline / "logs", sinks=[sink]) as writer:
    writer.write(1, {"prm_health/auroc": np.float32(0.75), "outcome/acc": 0.5})
    writer.write(2, {"prm_health/auroc": 0.8125, "prm_health/hacking_alarm": True})
    sink.log_html(2, "samples/page", page)
    sink.log_samples(2, groups)
  assert sink.run is None and writer.sinks == []  # closed with the writer
  hist = _history(run_dir)
  assert hist[0]["_step"] == 1 and hist[0]["prm_health/auroc"] == 0.75 and hist[0]["outcome/acc"] == 0.5
  last = hist[-1]
  assert last["_step"] == 2 and last["prm_health/auroc"] == 0.8125 and last["prm_health/hacking_alarm"] == 1
  assert last["samples/page/_type"] == "html-file" and last["samples/table/_type"] == "table-file"
  assert last["samples/table/nrows"] == 6
  files = run_dir / "files"
  (html_file,) = files.glob("media/html/samples/page_*.html")
  logged = html_file.read_text()
  assert "viz-data" in logged and "https://" not in logged  # no injected stylesheet link
  (table_file,) = files.glob("media/table/samples/table_*.table.json")
  table = json.loads(table_file.read_text())
  columns, rows = samples_table_rows(groups)
  assert table["columns"] == columns
  assert [r[4] for r in table["data"]] == ["".join(r.tokens) for g in groups for r in g.responses]
  assert [r[1] for r in table["data"]] == ["best"] * 3 + ["worst"] * 3
  np.testing.assert_allclose([r[columns.index("sum/advantage")] for r in table["data"]],
                             [sum(r.values["advantage"]) for g in groups for r in g.responses])


def test_samples_table_rows():
  g = viz.Group("p", [viz.Response(tokens=("a", "b"), values={"x": [1.0, float("nan")]}, label=1.0,
                                   outcome_reward=0.5)], title="t")
  columns, rows = samples_table_rows([g])
  assert columns == ["group", "title", "sample", "prompt", "response", "label", "outcome_reward",
                     "num_tokens", "sum/x"]
  assert rows == [[0, "t", 0, "p", "ab", 1.0, 0.5, 2, 1.0]]


@needs_wandb
def test_sink_validation(offline):
  with pytest.raises(ValueError, match="mode"):
    WandbSink(project="p", mode="sometimes")
  with pytest.raises(ValueError, match="project"):
    WandbSink(project=None)
