"""Parallelism: how arrays are laid out on a device mesh, and what XLA compiled for it.

Modules (imported explicitly, e.g. `from jaxrl_dense.parallel import sharding`):
  `sharding`  mesh, partition rules (parameters, optimizer states, activations), placement,
              the inference (rollout) layout and KV cache, introspection.
  `plan`      compiled memory plans from abstract inputs and readers of the partitioned HLO
              (collectives, array shapes).
"""
