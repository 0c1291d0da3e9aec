"""jaxrl_dense: JAX-native RL for language models with dense, fine-grained rewards.

The package reads as the pipeline a rollout travels:
`models` (LMs, checkpoint IO) -> `sampling` (static sampler, engine) -> `verifiers` (outcome
labels) -> `filters` (accuracy band, PROF: which groups train) -> `rewards` -> `advantages` ->
`losses` -> `rl` (the update and the trainer), with `parallel` (mesh, layout, compiled plans),
`data`, `checkpoint`, `observe` (metrics, sinks, sample pages, PRM health) and `eval` (the eval
loop, k-sample estimators, the PRM on held-out responses) around them. Submodules are imported explicitly, e.g.
`from jaxrl_dense import rewards, advantages` or `from jaxrl_dense.parallel import mesh as mesh_lib, placement`.
"""

__version__ = "0.1.0"

from jaxrl_dense import _moved  # old paths of moved modules: deprecated aliases for one release

_moved.install()
