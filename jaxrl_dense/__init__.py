"""jaxrl_dense: JAX-native RL for language models with dense, fine-grained rewards.

The package reads as the pipeline a rollout travels:
`models` (LMs, checkpoint IO) -> `sampling` -> `verifiers` -> `rewards` -> `advantages`
-> `losses` -> `filters`, with `sharding`, `checkpoint`, `data`, `metrics` around them.
Submodules are imported explicitly, e.g. `from jaxrl_dense import rewards, advantages`.
"""

__version__ = "0.1.0"
