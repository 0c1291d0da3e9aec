"""Run observability: per-step metrics to JSONL + TensorBoard, stage timers, a progress bar.

Public API
----------
`MetricsWriter(logdir, *, jsonl_name="metrics.jsonl", tensorboard=True, fresh=False)`
    Appends to an existing JSONL (resume); `fresh=True` starts it empty (a new run).
    `write(step, metrics) -> dict`: one JSONL line `{"step": step, "time": unix_s, **metrics}`
    and one TensorBoard scalar per metric (tag = metric name, e.g. "prm/loss"). Values may be
    Python/numpy/JAX scalars (0-d or size-1 arrays; fetched with one `jax.device_get`); anything
    else raises a ValueError naming the metric. NaN/inf are kept (written as NaN / Infinity,
    which `json.loads` reads back).
    `history` (list of the dicts written by this writer, plus those kept by `truncate_after`),
    `truncate_after(step)`: on resume, drop logged rows with step > `step` (rows written after
    the checkpoint we resume from, by the run that crashed) from the JSONL and `history`.
    `flush()`, `close()`; a context manager.
    `sinks=[...]`: extra sinks, each with `write(step, scalars: dict)`, `flush()`, `close()`,
    called after the JSONL/TensorBoard write (e.g. `jaxrl_dense.observe.wandb_sink.WandbSink`).
`TensorBoardWriter(logdir)`: `write(scalars, step)`, `flush()`, `close()` (what MetricsWriter
    uses; for loops that keep their own JSONL).
`read_jsonl(path) -> list[dict]`: the rows of a metrics JSONL (for plotting / tests).
`StageTimer()`: `with timer("generate"): ...` accumulates wall seconds per stage;
    `timer.block(x)` = `jax.block_until_ready(x)` (call it on a stage's outputs inside the block,
    or JAX's async dispatch moves the stage's cost into the next stage);
    `timer.summary(prefix="time/") -> {"time/generate": s, ..., "time/step": total}`;
    `timer.reset()`. Standard stage names: `STAGES`.
`ProgressBar(total, *, initial=0, desc="train")`: tqdm with ETA; `update(step, **postfix)`,
    `close()`.

TensorBoard without TensorFlow: the `tensorboard` package's own `EventFileWriter` and protos
(`tensorboard.compat.proto`) write standard event files; TensorBoard reads them as usual.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

STAGES = ("generate", "verify", "prm_update", "scoring", "policy_update")


def _scalar(name: str, value: Any):
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, (int, float)):
    return value
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  arr = np.asarray(value)
  if arr.size != 1 or arr.dtype == object:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape} "
                     f"dtype {arr.dtype}")
  v = arr.reshape(()).item()
  if isinstance(v, bool):
    return int(v)
  if isinstance(v, (int, float)):
    return v
  raise ValueError(f"metric {name!r} must be numeric, got {type(v).__name__}")


class TensorBoardWriter:
  """Scalars to TensorBoard event files in `logdir`, with only the `tensorboard` package.

  `write(scalars: dict, step)` adds one event holding every numeric scalar (others skipped);
  `flush()`, `close()`.
  """

  def __init__(self, logdir: str | os.PathLike):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    os.makedirs(logdir, exist_ok=True)
    self._w = EventFileWriter(str(logdir))

  def write(self, scalars: Mapping[str, Any], step: int, wall_time: Optional[float] = None) -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    values = []
    for k, v in scalars.items():
      try:
        v = _scalar(k, v)
      except ValueError:
        continue
      values.append(Summary.Value(tag=str(k), simple_value=float(v)))
    self._w.add_event(Event(wall_time=time.time() if wall_time is None else wall_time,
                            step=int(step), summary=Summary(value=values)))

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()


class MetricsWriter:
  """Per-step metrics to `<logdir>/<jsonl_name>` and TensorBoard event files in `logdir`."""

  def __init__(self, logdir: str | os.PathLike, *, jsonl_name: str = "metrics.jsonl",
               tensorboard: bool = True, fresh: bool = False, sinks: Sequence[Any] = ()):
    self.sinks = list(sinks)
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = self.logdir / jsonl_name
    self._jsonl = open(self.jsonl_path, "w" if fresh else "a", encoding="utf-8")
    self._tb = TensorBoardWriter(self.logdir) if tensorboard else None
    self.history: list = []

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Logs `metrics` for `step`; returns the row as written (Python scalars)."""
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
      raise ValueError(f"MetricsWriter.write: step must be an int, got {step!r}")
    try:
      import jax
      metrics = jax.device_get(dict(metrics))
    except ImportError:
      metrics = dict(metrics)
    row = {"step": int(step), "time": time.time()}
    for k, v in metrics.items():
      if not isinstance(k, str) or not k:
        raise ValueError(f"metric names must be non-empty strings, got {k!r}")
      if k in ("step", "time"):
        raise ValueError(f"metric name {k!r} is reserved")
      row[k] = _scalar(k, v)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.write({k: v for k, v in row.items() if k not in ("step", "time")}, int(step),
                     wall_time=row["time"])
    for sink in self.sinks:
      sink.write(int(step), {k: v for k, v in row.items() if k not in ("step", "time")})
    self.history.append(row)
    return row

  def truncate_after(self, step: int) -> int:
    """Drops JSONL rows with row["step"] > step; returns how many were dropped.

    Call it when resuming from the checkpoint of `step`: rows logged after that checkpoint by
    the interrupted run would otherwise appear twice. `history` becomes the kept rows.
    """
    self._jsonl.close()
    rows = read_jsonl(self.jsonl_path) if self.jsonl_path.exists() else []
    kept = [r for r in rows if r.get("step", -1) <= step]
    tmp = self.jsonl_path.with_suffix(self.jsonl_path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.jsonl_path)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self.history = kept
    return len(rows) - len(kept)

  def flush(self) -> None:
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    for sink in self.sinks:
      sink.flush()

  def close(self) -> None:
    if not self._jsonl.closed:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    for sink in self.sinks:
      sink.close()
    self.sinks = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


def read_jsonl(path: str | os.PathLike) -> list:
  """Rows of a metrics JSONL file; a malformed line raises ValueError naming file and line."""
  rows = []
  with open(path, "r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path} line {lineno}: expected a JSON object")
      rows.append(row)
  return rows


class StageTimer:
  """Accumulates wall-clock seconds per named stage of a step."""

  def __init__(self):
    self._times: dict = {}
    self._order: list = []

  @contextlib.contextmanager
  def __call__(self, stage: str) -> Iterator[None]:
    if not isinstance(stage, str) or not stage:
      raise ValueError(f"StageTimer: stage name must be a non-empty string, got {stage!r}")
    t0 = time.perf_counter()
    try:
      yield
    finally:
      dt = time.perf_counter() - t0
      if stage not in self._times:
        self._order.append(stage)
        self._times[stage] = 0.0
      self._times[stage] += dt

  @staticmethod
  def block(x: Any) -> Any:
    """Waits for JAX arrays in `x` (so their compute is charged to the current stage)."""
    import jax
    return jax.block_until_ready(x)

  @property
  def times(self) -> dict:
    return {k: self._times[k] for k in self._order}

  def summary(self, prefix: str = "time/") -> dict:
    out = {f"{prefix}{k}": v for k, v in self.times.items()}
    out[f"{prefix}step"] = float(sum(self._times.values()))
    return out

  def reset(self) -> None:
    self._times.clear()
    self._order.clear()


class ProgressBar:
  """A tqdm progress bar over training steps (ETA from tqdm's rate estimate)."""

  def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
               disable: Optional[bool] = None):
    from tqdm.auto import tqdm
    if total < 0 or initial < 0 or initial > total:
      raise ValueError(f"ProgressBar: need 0 <= initial ({initial}) <= total ({total})")
    self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                     disable=disable)
    self._step = initial

  def update(self, step: int, **postfix: Any) -> None:
    """Moves the bar to `step` (absolute) and shows `postfix` (e.g. acc=0.4, loss=1.2)."""
    if step > self._step:
      self._bar.update(step - self._step)
      self._step = step
    if postfix:
      shown = {}
      for k, v in postfix.items():
        try:
          v = _scalar(k, v)
        except ValueError:
          continue
        shown[k] = f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else v
      self._bar.set_postfix(shown, refresh=False)

  @property
  def format_dict(self) -> dict:
    return self._bar.format_dict

  def close(self) -> None:
    self._bar.close()
