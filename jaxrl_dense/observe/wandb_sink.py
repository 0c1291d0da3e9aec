"""Optional Weights & Biases logging beside JSONL and TensorBoard.

``WandbSink`` is a ``jaxrl_dense.observe.metrics.MetricsWriter`` sink: pass it as
``MetricsWriter(logdir, sinks=[WandbSink(project=...)])`` and every ``write(step, metrics)``
also goes to W&B as scalars. Sample pages and tables are logged explicitly:

    sink.log_html(step, "samples/page", html_text)          # wandb.Html (no injected CSS link)
    sink.log_samples(step, groups)                          # wandb.Table, one row per response

Offline mode works without a network: ``WandbSink(project, mode="offline")`` (or
``WANDB_MODE=offline``) writes the run under ``<dir>/wandb/offline-run-*``; upload it later
with ``wandb sync <that folder>``. ``wandb`` is an optional dependency (``pip install wandb``);
constructing a sink without it raises ImportError with that command.

Table columns of :meth:`WandbSink.log_samples`: ``group`` (index on the page), ``title`` (why the
group was picked), ``sample``, ``prompt``, ``response`` (the token texts joined), ``label``
(verifier), ``outcome_reward``, ``num_tokens``, then ``sum/<series>`` for every per-token series.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["WandbSink", "samples_table_rows"]


def _scalar_or_none(value: Any):
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, (int, float)):
    return value
  arr = np.asarray(value)
  if arr.size != 1 or arr.dtype.kind not in "biuf":
    return None
  return arr.reshape(()).item()


def samples_table_rows(groups: Sequence[Any]) -> tuple:
  """``(columns, rows)`` of the samples table for ``viz.Group`` s (see the module docstring)."""
  groups = list(groups)
  names = sorted(groups[0].responses[0].values) if groups else []
  columns = ["group", "title", "sample", "prompt", "response", "label", "outcome_reward",
             "num_tokens"] + [f"sum/{s}" for s in names]
  rows = []
  for gi, g in enumerate(groups):
    for si, r in enumerate(g.responses):
      sums = [float(sum(v for v in r.values[s] if math.isfinite(v))) for s in names]
      rows.append([gi, g.title, si, g.prompt, "".join(r.tokens),
                   None if r.label is None else float(r.label),
                   None if r.outcome_reward is None else float(r.outcome_reward),
                   len(r.tokens)] + sums)
  return columns, rows


class WandbSink:
  """Scalars, HTML sample pages and sample tables to one W&B run.

  Args:
    project: W&B project name (``--wandb_project``).
    name: run name. config: run config (e.g. the flags / dataclass as a dict).
    dir: folder for W&B's files (default ``$WANDB_DIR`` or the working directory).
    mode: ``"online"``, ``"offline"`` or ``"disabled"``; None lets wandb decide
      (``$WANDB_MODE``, else online).
    entity, tags, group: passed to ``wandb.init``.
    run: an existing ``wandb`` run to log into instead of starting one (then ``close`` does not
      finish it).
  """

  def __init__(self, project: Optional[str] = None, *, name: Optional[str] = None,
               config: Optional[Mapping[str, Any]] = None, dir: Optional[str | os.PathLike] = None,  # pylint: disable=redefined-builtin
               mode: Optional[str] = None, entity: Optional[str] = None,
               tags: Optional[Sequence[str]] = None, group: Optional[str] = None, run: Any = None):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("WandbSink needs the optional `wandb` package: pip install wandb") from e
    if mode not in (None, "online", "offline", "disabled"):
      raise ValueError(f"WandbSink: mode must be 'online', 'offline', 'disabled' or None, got {mode!r}")
    self._wandb = wandb
    self._owns_run = run is None
    if run is None:
      if not project:
        raise ValueError("WandbSink: `project` is required when no `run` is given")
      if dir is not None:
        os.makedirs(dir, exist_ok=True)
      run = wandb.init(project=project, name=name, config=dict(config or {}),
                       dir=None if dir is None else str(dir), mode=mode, entity=entity,
                       tags=list(tags) if tags else None, group=group, reinit="create_new")
    self.run = run

  # -- MetricsWriter sink protocol --------------------------------------------------------------
  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs the numeric scalars of ``scalars`` at ``step`` (non-numeric values are skipped)."""
    data = {}
    for k, v in scalars.items():
      v = _scalar_or_none(v)
      if v is not None:
        data[str(k)] = v
    if data:
      self.run.log(data, step=int(step))

  def flush(self) -> None:
    """W&B writes asynchronously; nothing to flush."""

  def close(self) -> None:
    """Finishes the run (if this sink started it); safe to call twice."""
    if self.run is not None and self._owns_run:
      self.run.finish()
    self.run = None

  # -- samples ----------------------------------------------------------------------------------
  def log_html(self, step: int, key: str, page: str | os.PathLike) -> None:
    """Logs an HTML page (its text, or the path of a ``.html`` file) as ``wandb.Html``.

    ``inject=False``: W&B would otherwise add a stylesheet link to app.wandb.ai, and the page
    written by ``jaxrl_dense.observe.viz`` is meant to make no network request.
    """
    text = str(page)
    if isinstance(page, os.PathLike) or (len(text) < 4096 and text.endswith(".html")
                                          and os.path.isfile(text)):
      with open(page, "r", encoding="utf-8") as f:
        text = f.read()
    self.run.log({key: self._wandb.Html(text, inject=False)}, step=int(step))

  def log_samples(self, step: int, groups: Sequence[Any], key: str = "samples/table") -> None:
    """Logs the responses of ``viz.Group`` s as a ``wandb.Table`` (columns in the module docstring)."""
    columns, rows = samples_table_rows(groups)
    self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=int(step))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
