"""Packaging for jaxrl_dense: install_requires comes from requirements.txt."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.split("#")[0].strip() for l in lines if l.split("#")[0].strip()]


setuptools.setup(
    name="jaxrl_dense",
    version="0.1.0",
    description="JAX-native RL for language models with dense, fine-grained rewards (PRIME and friends).",
    long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["jaxrl_dense", "jaxrl_dense.*"]),
    package_data={"jaxrl_dense": ["data/datasets/*.jsonl", "data/datasets/*.md", "data/datasets/SHA256SUMS"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={
        # torch + transformers' PyTorch models are used only as parity references in tests.
        # wandb (offline-mode sink tests), nbclient/nbformat/ipykernel (the walkthrough notebook).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "accelerate>=1.0",
                 "wandb>=0.31", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        # Optional W&B logging in the experiments (`--wandb_project`).
        "wandb": ["wandb>=0.31"],
        # reasoning-gym tasks as prompt sources (`--train_data=rg:<task>[:k=v,...]`), pinned: the
        # verifier re-creates entries from (task, config, seed, index), so versions must agree.
        "rg": ["reasoning-gym==0.1.25"],
    },
    license="Apache-2.0",
)
