r"""Plot the curves of one or more metrics JSONL logs into a PNG.

    python experiments/plot_metrics.py --jsonl=runs/prime/metrics.jsonl --output=docs/prime.png
    # PRIME vs outcome-only RLOO on the same axes:
    python experiments/plot_metrics.py \
        --jsonl=runs/prime/metrics.jsonl,runs/rloo/metrics.jsonl --labels=PRIME,RLOO \
        --keys=outcome/acc,eval/pass@1,prm/loss --smooth=5 --output=docs/prime_vs_rloo.png

Each metric gets one panel (x = step); each log one line (label = --labels, else the log's
folder name). Rows missing a metric are skipped (e.g. eval metrics logged every k steps), NaNs
are dropped. `--smooth=W` overlays a trailing moving average of W points on the raw curve.
Without --keys, the panels are the DEFAULT_KEYS present in the logs, else every numeric metric
except time/*. Reading uses `jaxrl_dense.observe.metrics.read_jsonl` (a bad line names file and line).
"""
from __future__ import annotations

import math
import pathlib
import sys

from absl import app, flags

from jaxrl_dense import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("jsonl", [], "Comma-separated metrics JSONL files.")
flags.DEFINE_list("labels", [], "Legend labels, one per --jsonl (default: folder names).")
flags.DEFINE_list("keys", [], "Metrics to plot (default: DEFAULT_KEYS present in the logs).")
flags.DEFINE_integer("smooth", 1, "Moving-average window (points); 1 = raw only.")
flags.DEFINE_integer("columns", 3, "Panels per row.")
flags.DEFINE_string("output", "metrics.png", "PNG path.")
flags.DEFINE_string("title", "", "Figure title.")

# Panels shown by default when present (names the PRIME loop logs; others are matched too).
DEFAULT_KEYS = (
    "outcome/acc", "eval/pass@1", "prm/loss", "prm/dpo_acc", "adv/mean", "adv/std",
    "returns/mean", "actor/kl_ref", "actor/entropy", "actor/clipfrac", "response/length_mean",
    "perf/tokens_per_s", "time/step",
)


def moving_average(ys: list, window: int) -> list:
  """Trailing mean over the last `window` points (shorter at the start)."""
  if window < 1:
    raise ValueError(f"smooth window must be >= 1, got {window}")
  out, acc = [], 0.0
  for i, y in enumerate(ys):
    acc += y
    if i >= window:
      acc -= ys[i - window]
    out.append(acc / min(i + 1, window))
  return out


def series(rows: list, key: str) -> tuple:
  """(steps, values) of `key` in `rows`, skipping rows without it and non-finite values."""
  xs, ys = [], []
  for r in rows:
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      continue
    xs.append(r["step"])
    ys.append(float(v))
  return xs, ys


def choose_keys(logs: list, requested: list) -> list:
  present = []
  for rows in logs:
    for r in rows:
      for k, v in r.items():
        if k not in ("step", "time") and isinstance(v, (int, float)) and k not in present:
          present.append(k)
  if requested:
    missing = [k for k in requested if k not in present]
    if missing:
      raise ValueError(f"--keys {missing} are not in the logs; available: {sorted(present)}")
    return list(requested)
  keys = [k for k in DEFAULT_KEYS if k in present]
  return keys or [k for k in present if not k.startswith("time/")]


def plot(paths: list, output: str, *, labels=None, keys=None, smooth: int = 1, columns: int = 3,
         title: str = "") -> pathlib.Path:
  """Draws the curves of the JSONL logs `paths` into the PNG `output`; returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxrl_dense.observe.metrics import read_jsonl

  if not paths:
    raise ValueError("no --jsonl files given")
  for p in paths:
    if not pathlib.Path(p).is_file():
      raise FileNotFoundError(f"--jsonl: {p!r} does not exist")
  if labels and len(labels) != len(paths):
    raise ValueError(f"--labels has {len(labels)} entries for {len(paths)} --jsonl files")
  if columns < 1:
    raise ValueError(f"--columns must be >= 1, got {columns}")
  logs = [read_jsonl(p) for p in paths]
  for p, rows in zip(paths, logs):
    if not rows:
      raise ValueError(f"{p}: no rows")
    for i, r in enumerate(rows):
      if "step" not in r:
        raise ValueError(f"{p} row {i + 1}: no 'step'")
  labels = labels or [pathlib.Path(p).parent.name or pathlib.Path(p).stem for p in paths]
  keys = choose_keys(logs, keys or [])
  if not keys:
    raise ValueError("the logs hold no numeric metrics")
  ncols = min(columns, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, key in zip(axes.flat, keys):
    for j, (rows, label) in enumerate(zip(logs, labels)):
      xs, ys = series(rows, key)
      if not xs:
        continue
      c = colors[j % len(colors)]
      if smooth > 1 and len(xs) > smooth:  # sparse series (e.g. before/after evals): raw points
        ax.plot(xs, ys, color=c, alpha=0.3, linewidth=1)
        ax.plot(xs, moving_average(ys, smooth), color=c, linewidth=1.8, label=label)
      else:
        ax.plot(xs, ys, color=c, linewidth=1.5, marker="o" if len(xs) < 30 else None,
                markersize=3, label=label)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if len(paths) > 1:
    axes.flat[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out = pathlib.Path(output)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    out = plot(FLAGS.jsonl, FLAGS.output, labels=FLAGS.labels, keys=FLAGS.keys,
               smooth=FLAGS.smooth, columns=FLAGS.columns, title=FLAGS.title)
  except (ValueError, FileNotFoundError) as e:
    print(f"plot_metrics: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  cli.run(lambda argv: sys.exit(main(argv)))
