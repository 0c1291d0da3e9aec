"""Imports an experiment script as a module, once per process (its absl flags register once)."""
import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_experiment(name: str):
  """`experiments/<name>.py` as the module `<name>_under_test`."""
  mod_name = f"{name}_under_test"
  if mod_name in sys.modules:
    return sys.modules[mod_name]
  spec = importlib.util.spec_from_file_location(mod_name, REPO / "experiments" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[mod_name] = mod
  spec.loader.exec_module(mod)
  return mod
