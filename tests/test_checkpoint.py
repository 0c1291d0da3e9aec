"""Tests for jaxrl_dense.checkpoint (Orbax wrapper with config fingerprints)."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_dense import checkpoint as ckpt


def _state(seed=0):
  k = jax.random.key(seed)
  policy = {"w": jax.random.normal(k, (4, 3)), "b": jnp.arange(3, dtype=jnp.float32)}
  prm = {"w": jax.random.normal(jax.random.fold_in(k, 1), (4, 3)).astype(jnp.bfloat16)}
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  return {
      "policy": policy, "prm": prm, "policy_opt": opt.init(policy), "prm_opt": opt.init(prm),
      "rng": jax.random.key(seed + 7), "legacy_rng": jax.random.PRNGKey(seed + 9),
      "step": jnp.int32(seed),
  }


FP = ckpt.make_fingerprint({"hidden": 8, "layers": 2}, algo="prime", lr=5e-7, ops=("+", "-"))


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else x,
                                  np.asarray(y, np.float32) if y.dtype == jnp.bfloat16 else y)


def test_roundtrip_with_target(tmp_path):
  state = _state(1)
  meta = {"step": 4, "iterator": {"next_index": 17, "seed": 0}, "history": [{"acc": 0.5}]}
  with ckpt.Checkpointer(tmp_path, fingerprint=FP, save_every=2) as c:
    assert c.latest_step() is None
    assert c.save(4, state, meta)
  with ckpt.Checkpointer(tmp_path, fingerprint=FP, save_every=2) as c:
    assert c.latest_step() == 4
    restored, rmeta = c.restore(target=_state(0))
  _assert_tree_equal(restored, state)
  assert rmeta == meta
  # the typed key still works as a key and produces the same numbers
  np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)),
                                jax.random.normal(state["rng"], (3,)))
  assert isinstance(restored["policy_opt"][1][0], optax.ScaleByAdamState)


def test_restore_without_target_gives_arrays(tmp_path):
  state = _state(2)
  with ckpt.Checkpointer(tmp_path, fingerprint=FP) as c:
    c.save(1, state)
    restored, meta = c.restore()
  assert meta == {}
  np.testing.assert_array_equal(restored["policy"]["w"], state["policy"]["w"])
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(state["rng"]))


def test_save_every_and_keep_last(tmp_path):
  with ckpt.Checkpointer(tmp_path, fingerprint=FP, save_every=3, keep_last=2) as c:
    saved = [s for s in range(1, 11) if c.save(s, _state(s), {"step": s})]
    assert saved == [3, 6, 9]
    assert c.save(10, _state(10), {"step": 10}, force=True)
    assert c.all_steps() == [9, 10]
    _, meta = c.restore(9)
    assert meta["step"] == 9
    with pytest.raises(FileNotFoundError, match="step 3"):
      c.restore(3)
    with pytest.raises(ValueError, match="not after the latest"):
      c.save(10, _state(10), force=True)


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def test_fingerprint_mismatch_is_refused_and_untouched(tmp_path):
  with ckpt.Checkpointer(tmp_path, fingerprint=FP) as c:
    c.save(1, _state(1), {"step": 1})
  before = _snapshot(tmp_path)
  other = ckpt.make_fingerprint({"hidden": 16, "layers": 2}, algo="prime", lr=5e-7,
                                ops=("+", "-"))
  with pytest.raises(ckpt.CheckpointMismatchError, match=r"model_config\.hidden: checkpoint has 8"):
    ckpt.Checkpointer(tmp_path, fingerprint=other)
  other_flag = ckpt.make_fingerprint({"hidden": 8, "layers": 2}, algo="grpo", lr=5e-7,
                                     ops=("+", "-"))
  with pytest.raises(ckpt.CheckpointMismatchError, match="algo"):
    ckpt.Checkpointer(tmp_path, fingerprint=other_flag)
  assert _snapshot(tmp_path) == before
  # the same fingerprint (tuples vs lists do not matter) is accepted
  same = ckpt.make_fingerprint({"layers": 2, "hidden": 8}, algo="prime", lr=5e-7, ops=["+", "-"])
  with ckpt.Checkpointer(tmp_path, fingerprint=same) as c:
    assert c.latest_step() == 1


def test_nonfinite_state_is_not_saved(tmp_path):
  with ckpt.Checkpointer(tmp_path, fingerprint=FP) as c:
    c.save(1, _state(1), {"step": 1})
    bad = _state(2)
    bad["policy"]["w"] = bad["policy"]["w"].at[1, 2].set(jnp.nan)
    with pytest.raises(ckpt.NonFiniteStateError, match=r"\['policy'\]\['w'\].*step 2.*step 1"):
      c.save(2, bad, {"step": 2})
    assert c.all_steps() == [1]
    _, meta = c.restore()
    assert meta["step"] == 1


def test_wrong_target_structure_raises(tmp_path):
  with ckpt.Checkpointer(tmp_path, fingerprint=FP) as c:
    c.save(1, _state(1))
    target = _state(0)
    target["policy"]["w"] = jnp.zeros((5, 3))
    with pytest.raises(Exception, match=r"shape|Shape|\(5, 3\)|\(4, 3\)"):
      c.restore(target=target)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="save_every"):
    ckpt.Checkpointer(tmp_path, fingerprint=FP, save_every=0)
  with pytest.raises(TypeError, match="fingerprint"):
    ckpt.Checkpointer(tmp_path, fingerprint="abc")
  with ckpt.Checkpointer(tmp_path, fingerprint=FP) as c:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      c.restore()
    with pytest.raises(ValueError, match="reserved"):
      c.save(1, _state(1), {"__prng_key_leaves__": 1})


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrl_dense import checkpoint as ckpt
    assert jax.device_count() == 8, jax.device_count()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sh = NamedSharding(mesh, P("fsdp", None))
    rep = NamedSharding(mesh, P())
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), sh)
    state = {"w": w, "rng": jax.random.key(3)}
    fp = ckpt.make_fingerprint(None, mesh="2x4")
    with ckpt.Checkpointer(sys.argv[1], fingerprint=fp) as c:
      c.save(1, state)
    with ckpt.Checkpointer(sys.argv[1], fingerprint=fp) as c:
      target = {"w": jax.device_put(jnp.zeros((8, 4)), sh), "rng": jax.random.key(0)}
      r, _ = c.restore(target=target)
      assert r["w"].sharding == sh, r["w"].sharding
      np.testing.assert_array_equal(np.asarray(r["w"]), np.arange(32.0).reshape(8, 4))
      # restoring into another layout (replicated) also works
      r2, _ = c.restore(target={"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rep),
                                "rng": jax.random.key(0)})
      assert r2["w"].sharding == rep
      np.testing.assert_array_equal(np.asarray(r2["w"]), np.arange(32.0).reshape(8, 4))
    print("SHARDED_OK")
""")


def test_sharded_restore_uses_target_shardings(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "ck")], env=env,
                       capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED_OK" in out.stdout


def test_async_save_roundtrip(tmp_path):
  state = _state(3)
  with ckpt.Checkpointer(tmp_path, fingerprint=FP, async_save=True, keep_last=1) as c:
    assert c.save(1, _state(1), {"step": 1})
    assert c.save(2, state, {"step": 2})
    c.wait()
    assert c.all_steps() == [2]
    restored, meta = c.restore(target=_state(0))
  _assert_tree_equal(restored, state)
  assert meta == {"step": 2}


# ------------------------------------------------ damaged steps
def _data_files(step_dir):
  return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _damage(step_dir, how):
  if how == "random_bytes":  # every OCDBT data file of the step
    for p in _data_files(step_dir):
      p.write_bytes(os.urandom(p.stat().st_size))
  elif how == "truncated":
    for p in _data_files(step_dir):
      os.truncate(p, 100)
  elif how == "meta_cut":
    p = step_dir / "meta" / "metadata"
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  elif how == "fingerprint_garbage":
    (step_dir / "fingerprint" / "metadata").write_text("garbage{")
  elif how == "no_state":
    import shutil
    shutil.rmtree(step_dir / "state")


_DAMAGE = ("random_bytes", "truncated", "meta_cut", "fingerprint_garbage", "no_state")


@pytest.mark.parametrize("how", _DAMAGE)
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, how):
  with ckpt.Checkpointer(tmp_path, fingerprint=FP, keep_last=3) as c:
    for s in (1, 2, 3):
      c.save(s, _state(s), {"step": s})
  _damage(tmp_path / "3", how)
  before = _snapshot(tmp_path)
  with pytest.warns(RuntimeWarning, match=r"checkpoint step 3 .* cannot be read"):
    with ckpt.Checkpointer(tmp_path, fingerprint=FP, keep_last=3) as c:
      restored, meta = c.restore(target=_state(0))
      assert meta == {"step": 2} and set(c.unreadable) == {3}
  _assert_tree_equal(restored, _state(2))
  assert _snapshot(tmp_path) == before  # nothing deleted or rewritten
  # The resumed run saves step 3 again: the damaged one is kept aside, not overwritten.
  with pytest.warns(RuntimeWarning):
    with ckpt.Checkpointer(tmp_path, fingerprint=FP, keep_last=3) as c:
      c.restore(target=_state(0))
      assert c.save(3, _state(30), {"step": 3}, force=True)
      assert c.all_steps() == [1, 2, 3]
      _, meta = c.restore()
      assert meta == {"step": 3}
  kept = tmp_path / "3.unreadable"
  assert {os.path.join("3.unreadable", os.path.relpath(k, "3")) for k in before if k.startswith("3" + os.sep)} \
      == {k for k in _snapshot(tmp_path) if k.startswith("3.unreadable")} and kept.is_dir()


def test_a_lone_damaged_step_is_named_not_blamed_on_the_config(tmp_path):
  for how in ("no_state", "truncated"):
    d = tmp_path / how
    with ckpt.Checkpointer(d, fingerprint=FP) as c:
      c.save(1, _state(1), {"step": 1})
    _damage(d / "1", how)
    with ckpt.Checkpointer(d, fingerprint=FP) as c:
      with pytest.raises(ckpt.CheckpointReadError, match="step 1") as e:
        c.restore(target=_state(0))
      assert not isinstance(e.value, ckpt.CheckpointMismatchError)
      assert ("state/" if how == "no_state" else "cannot be read") in str(e.value)
  # every step's fingerprint unreadable: no readable checkpoint at all
  d = tmp_path / "fp"
  with ckpt.Checkpointer(d, fingerprint=FP) as c:
    c.save(1, _state(1), {"step": 1})
  _damage(d / "1", "fingerprint_garbage")
  with pytest.warns(RuntimeWarning):
    with ckpt.Checkpointer(d, fingerprint=FP) as c:
      with pytest.raises(ckpt.CheckpointReadError, match="no readable checkpoint"):
        c.restore()


def test_checkpoint_written_before_a_setting_was_renamed_still_resumes(tmp_path):
  """A run's fingerprint from before --prime_variant became --reference_impl (the old key, the old
  value) resumes under the renamed config: `renamed_keys` reads the old key as the new one; the
  flag's value must still agree, and steps saved after the resume (new key) read the same."""
  from jaxrl_dense.rl import config as config_lib
  from jaxrl_dense.rl import setup
  cfg = config_lib.RunConfig(prime=config_lib.PrimeConfig(reference_impl="original"))
  new_fp = setup.checkpoint_fingerprint(cfg)
  assert new_fp["reference_impl"] == "original" and "prime_variant" not in new_fp
  old_fp = {("prime_variant" if k == "reference_impl" else k): v for k, v in new_fp.items()}
  renamed = config_lib.renamed_settings()
  assert renamed == {"prime_variant": "reference_impl"}
  s0 = _state(0)
  with ckpt.Checkpointer(tmp_path, fingerprint=old_fp) as c:  # the run before the rename
    c.save(1, s0, {"step": 1}, force=True)
  with pytest.raises(ckpt.CheckpointMismatchError, match="prime_variant"):  # without the map
    ckpt.Checkpointer(tmp_path, fingerprint=new_fp)
  other = setup.checkpoint_fingerprint(config_lib.replace(cfg, reference_impl="verl"))
  with pytest.raises(ckpt.CheckpointMismatchError, match="reference_impl"):  # the value still counts
    ckpt.Checkpointer(tmp_path, fingerprint=other, renamed_keys=renamed)
  with ckpt.Checkpointer(tmp_path, fingerprint=new_fp, renamed_keys=renamed, keep_last=3) as c:
    assert c.saved_fingerprint() == new_fp
    state, meta = c.restore(target=_state(1))
    _assert_tree_equal(state, s0)
    assert meta["step"] == 1
    c.save(2, state, {"step": 2}, force=True)  # written with the new key
  with ckpt.Checkpointer(tmp_path, fingerprint=new_fp, renamed_keys=renamed, keep_last=3) as c:
    assert c.all_steps() == [1, 2]
    _, meta = c.restore(step=1, target=_state(1))  # the older, old-key step: checked and read
    assert meta["step"] == 1
