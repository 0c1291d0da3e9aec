"""Observing a run: metrics, sinks, sample pages and the PRM health monitor (all host-side).

Modules (imported explicitly, e.g. `from jaxrl_dense.observe import metrics`):
  `metrics`     JSONL + TensorBoard writer, stage timers, progress bar.
  `wandb_sink`  optional Weights & Biases sink for `metrics.MetricsWriter`.
  `viz`         per-token heatmap sample pages (HTML / PNG).
  `prm_health`  PRM AUROC, reward-hacking monitor, step-credit metrics.
"""
