"""Old import paths of moved modules (`jaxrl_dense._moved.MOVED`) still work for one release.

Each old path warns with a DeprecationWarning naming the new path and is the new module object
itself (so a monkeypatch through either path patches both); the README's changelog lists every move.
"""
import importlib
import pathlib
import subprocess
import sys

import pytest

from jaxrl_dense import _moved

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_path_is_the_new_module(old):
  assert importlib.import_module(old) is importlib.import_module(_moved.MOVED[old])


def test_old_paths_warn_and_alias_in_a_fresh_process():
  """Fresh interpreter, so no module is cached: every old path warns once, with the new name."""
  code = ("import importlib, sys, warnings\n"
          "from jaxrl_dense import _moved\n"
          "bad = []\n"
          "for old, new in sorted(_moved.MOVED.items()):\n"
          "  with warnings.catch_warnings(record=True) as w:\n"
          "    warnings.simplefilter('always')\n"
          "    mod = importlib.import_module(old)\n"
          "  msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
          "  if mod is not sys.modules[new] or not any(new in m for m in msgs): bad.append((old, msgs))\n"
          "from jaxrl_dense import sharding\n"
          "from jaxrl_dense.engine import engine\n"
          "import jaxrl_dense.parallel.sharding as s, jaxrl_dense.sampling.engine.engine as e\n"
          "assert sharding is s and engine is e\n"
          "print('BAD', bad)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert "BAD []" in out.stdout, out.stdout


def test_patching_the_old_path_patches_the_new(monkeypatch):
  import jaxrl_dense.parallel.plan as plan
  old = importlib.import_module("jaxrl_dense.sharding_plan")
  monkeypatch.setattr(old, "MEMORY_KEYS", ("patched",))
  assert plan.MEMORY_KEYS == ("patched",)


def test_unknown_names_still_fail():
  """Control: the finder answers only the moved names."""
  with pytest.raises(ImportError):
    importlib.import_module("jaxrl_dense.no_such_module")
  assert _moved._MovedFinder().find_spec("jaxrl_dense.ops") is None


def test_changelog_lists_every_move():
  readme = (ROOT / "README.md").read_text()
  changelog = readme[readme.index("## Changelog"):]
  for old, new in _moved.MOVED.items():
    top_old = ".".join(old.split(".")[:2])  # submodules of a moved package share its row
    top_new = new if old == top_old else new.rsplit(".", 1)[0]
    assert f"`{top_old}`" in changelog or f"`{top_old}` (" in changelog, old
    assert top_new in changelog, new


def test_rl_setup_forwards_to_load_and_plan():
  """`rl.setup` was split into `rl.load` and `rl.plan`: each former name is the new home's own
  object, read with a DeprecationWarning that names that home; unknown names still fail."""
  from jaxrl_dense.rl import load, plan, setup
  for name, home in (("load_model", load), ("checkpoint_fingerprint", load), ("check_inputs", load),
                     ("aot_plan", plan), ("target_fit", plan), ("PLAN_FLAGS", plan),
                     ("ARCH_PRESETS", plan), ("check_mesh", plan)):
    with pytest.warns(DeprecationWarning, match=f"{home.__name__}.{name}"):
      assert getattr(setup, name) is getattr(home, name)
  with pytest.raises(AttributeError):
    setup.no_such_name  # pylint: disable=pointless-statement


def test_moved_names_warn_and_are_the_objects_of_their_new_home():
  """A name that moved out of a module that stays (`_moved.moved_names`): the old attribute warns,
  naming the new home, and is the new object; other names still fail."""
  from jaxrl_dense import rewards
  from jaxrl_dense.models import prm_head
  for old in (rewards, rewards.step_rewards):
    with pytest.warns(DeprecationWarning, match="models.prm_head.prm_logits_to_step_reward"):
      assert old.prm_logits_to_step_reward is prm_head.prm_logits_to_step_reward
  with pytest.raises(AttributeError):
    rewards.no_such_name  # pylint: disable=pointless-statement


def test_moved_plan_names_warn_and_resolve_in_rl_programs():
  """`parallel.plan`'s RL programs moved to `rl.programs` (plan imports nothing of rl / models /
  sampling): the old names warn, naming the new home, and are the new objects."""
  from jaxrl_dense.parallel import plan
  from jaxrl_dense.rl import programs
  assert set(plan._MOVED) == {"rl_step_programs", "rl_batch_shapes", "abstract_params",
                              "abstract_train_state"}
  for name in plan._MOVED:
    with pytest.warns(DeprecationWarning, match=f"jaxrl_dense.rl.programs.{name}"):
      assert getattr(plan, name) is getattr(programs, name)
  with pytest.raises(AttributeError):
    plan.no_such_name  # pylint: disable=pointless-statement
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse((ROOT / "jaxrl_dense" / "parallel" / "plan.py").read_text())
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
      a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  upward = [m for m in imported if m and m.startswith(("jaxrl_dense.rl", "jaxrl_dense.models",
                                                       "jaxrl_dense.sampling"))]
  assert not upward, upward


def test_eval_loop_names_moved_to_estimators_and_prm():
  """`eval.loop` keeps the loop; its k-sample estimators moved to `eval.estimators` and the
  implicit PRM's scoring of responses to `eval.prm`: each old name warns, naming the new home,
  and is the new object (also on `jaxrl_dense.eval`, without a warning); unknown names fail."""
  from jaxrl_dense import eval as eval_pkg
  from jaxrl_dense.eval import estimators, loop, prm
  moved = {**{n: estimators for n in ("pass_at_k", "pass_at_k_curve", "mean_at_k", "majority_vote",
                                      "best_of_n", "prm_vote_weights", "extract_answers",
                                      "sampled_summary")},
           **{n: prm for n in ("implicit_prm_sequence_reward", "implicit_prm_rewards",
                               "implicit_prm_step_rewards")}}
  for name, home in moved.items():
    with pytest.warns(DeprecationWarning, match=f"{home.__name__}.{name}"):
      assert getattr(loop, name) is getattr(home, name)
    assert getattr(eval_pkg, name) is getattr(home, name)
  with pytest.raises(AttributeError):
    loop.no_such_name  # pylint: disable=pointless-statement
