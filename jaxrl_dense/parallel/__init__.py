"""Parallelism: how arrays are laid out on a device mesh, and what XLA compiled for it.

Modules (imported explicitly, e.g. `from jaxrl_dense.parallel import mesh as mesh_lib, placement`),
each importing only those above it:
  `mesh`       the ("data", "fsdp", "tensor") mesh: parsing, building, multi-process start-up,
               the context mesh (`use_mesh`, `with_mesh`).
  `rules`      logical axes -> PartitionSpecs: parameters, activations (`with_logical_constraint`),
               the KV cache, custom kernels per shard (`shard_kernel`).
  `placement`  shardings of batches, parameters and optimizer states; putting arrays on the mesh
               and reading them back (`shard_params`, `shard_batch`, `device_put`, `to_host`).
  `inference`  the rollout's copy of the weights and its layout (`rollout_params`).
  `inspect`    bytes held per device, one line per parameter's layout.
  `plan`       compiled memory plans from abstract inputs and readers of the partitioned HLO
               (collectives, array shapes).
  `sharding`   deprecated for one release: forwards the former single module's names (warns).
"""
