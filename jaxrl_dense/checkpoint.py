"""Orbax checkpointing for RL runs: one array pytree + JSON metadata + a config fingerprint.

Public API
----------
`Checkpointer(directory, *, fingerprint, save_every=1, keep_last=3, async_save=False, renamed_keys=None)`
    Wraps `orbax.checkpoint.CheckpointManager` (orbax-checkpoint 0.12.x). Each step directory
    holds three items:
      "state"       `ocp.args.StandardSave` of an array pytree (policy params, PRM params, both
                    optimizer states, RNG keys, ...; typed PRNG keys are stored as key data and
                    re-wrapped on restore),
      "meta"        `ocp.args.JsonSave` of a JSON dict (step, data-iterator state, metrics
                    history, anything JSON-able),
      "fingerprint" `ocp.args.JsonSave` of the run's fingerprint (`make_fingerprint`).
  Methods:
    `should_save(step) -> bool`       step % save_every == 0.
    `save(step, state, meta, *, force=False, check_finite=True) -> bool`
                                      saves when `should_save(step)` or `force`; with
                                      `check_finite` a NaN/inf in any float leaf raises
                                      `NonFiniteStateError` BEFORE anything is written, so the
                                      last good checkpoint stays the latest.
    `latest_step() -> int | None`, `all_steps() -> list[int]`.
    `restore(step=None, *, target=None) -> (state, meta)`
                                      step None = the newest readable step (see "Damaged
                                      steps" below). `target`: a pytree of arrays or
                                      `jax.ShapeDtypeStruct`s (with `.sharding`) of the same
                                      structure; the arrays are restored with the target's
                                      shapes, dtypes and shardings (pass the freshly initialised,
                                      sharded state). Without a target they come back as saved,
                                      on the default device.
    `wait()` (finish async saves), `close()`; usable as a context manager.
`make_fingerprint(model_config=None, **key_flags) -> dict`: JSON-normalised fingerprint.
`CheckpointMismatchError`, `CheckpointReadError`, `NonFiniteStateError`.

Atomicity and retention: Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never leaves a half checkpoint as "latest"; `keep_last` = Orbax
`max_to_keep`.

Fingerprint: on construction, if `directory` already holds checkpoints, the latest one's
fingerprint must equal `fingerprint`; otherwise `CheckpointMismatchError` lists the differing
keys and nothing is written (neither `save` nor `restore` can then run on that directory, so a
checkpoint of another model or config is never overwritten). Put in it what must not change
across a resume: the model config and the flags that change the math (algorithm, batch shape,
learning rates, seeds, data); leave out what may (number of steps, logging intervals).
`renamed_keys` ({former key: key}, e.g. `rl.config.renamed_settings()`): a saved fingerprint's
top-level keys under a former name are read under the current one, so a checkpoint written before
a setting was renamed still resumes.

Damaged steps: a step whose files cannot be read (random bytes or a truncated data file, a cut
`meta` / `fingerprint` JSON, a missing `state/` item) is skipped with a warning naming it, and the
newest readable earlier step is used (for the fingerprint check and by `restore()`); no file is
deleted. When a later `save` reaches a skipped step's number, that step's directory is renamed
to `<step>.unreadable` (kept, and ignored by Orbax) first. `CheckpointReadError` when no step
can be read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_dense.parallel import placement

_ITEMS = ("state", "meta", "fingerprint")
_KEY_PATHS = "__prng_key_leaves__"


class CheckpointMismatchError(ValueError):
  """The checkpoint directory belongs to a different model or config."""


class NonFiniteStateError(FloatingPointError):
  """A NaN/inf was found in the state to save; nothing was written."""


class CheckpointReadError(ValueError):
  """A checkpoint step's files cannot be read (damaged or incomplete); no readable step is left."""


# TensorStore reports unreadable files with a status code ("DATA_LOSS: ...", "OUT_OF_RANGE: ...");
# Orbax's structure / shape mismatches are plain sentences.
_STORE_STATUS = re.compile(r"^[A-Z][A-Z_]{3,}: ")


def _to_jsonable(x: Any) -> Any:
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: _to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {str(k): _to_jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.bool_,)):
    return bool(x)
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  if hasattr(x, "to_json"):
    return _to_jsonable(x.to_json())
  return repr(x)


def make_fingerprint(model_config: Any = None, **key_flags: Any) -> dict:
  """A JSON-normalised dict identifying a run (dataclasses -> dicts, tuples -> lists).

  Example: `make_fingerprint(config, algo="prime", lr=5e-7, n=4, task=ArithmeticTask())`.
  """
  fp = {"model_config": _to_jsonable(model_config)}
  fp.update({k: _to_jsonable(v) for k, v in key_flags.items()})
  return json.loads(json.dumps(fp, sort_keys=True))


def _rename_keys(fp: Any, renamed: Mapping[str, str]) -> Any:
  """A saved fingerprint with its top-level keys under a former name (`renamed`) moved to the
  current name (a fingerprint holding both names is left as it is, and so differs)."""
  if not renamed or not isinstance(fp, dict):
    return fp
  out = dict(fp)
  for old, new in renamed.items():
    if old in out and new not in out:
      out[new] = out.pop(old)
  return out


def _diff(saved: Any, current: Any, prefix: str = "") -> list:
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current)):
      p = f"{prefix}.{k}" if prefix else str(k)
      if k not in saved:
        out.append(f"{p}: not in checkpoint, now {current[k]!r:.80}")
      elif k not in current:
        out.append(f"{p}: checkpoint has {saved[k]!r:.80}, now absent")
      else:
        out.extend(_diff(saved[k], current[k], p))
    return out
  if saved != current:
    return [f"{prefix or '<root>'}: checkpoint has {saved!r:.80}, now {current!r:.80}"]
  return []


def _is_prng_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path)


def _unwrap_keys(state: Any) -> tuple:
  """Replaces typed PRNG key leaves with their uint32 key data; returns (tree, {path: impl})."""
  impls = {}

  def f(path, x):
    if _is_prng_key(x):
      impls[_path_str(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(f, state), impls


def _rewrap_keys(state: Any, impls: dict) -> Any:
  if not impls:
    return state

  def f(path, x):
    impl = impls.get(_path_str(path))
    if impl is None:
      return x
    return jax.random.wrap_key_data(x, impl=impl)

  return jax.tree_util.tree_map_with_path(f, state)


def _abstract_target(target: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for StandardRestore; typed keys -> their key data."""

  def f(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        raise TypeError("restore target: pass typed PRNG keys as arrays, not ShapeDtypeStructs")
      return x
    if _is_prng_key(x):
      x = jax.random.key_data(x)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return ocp.utils.to_shape_dtype_struct(x)
    return x

  return jax.tree.map(f, target)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  """[len(leaves)] bool: whether each float leaf is free of NaN / inf."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _first_nonfinite(state: Any) -> Optional[str]:
  leaves = jax.tree_util.tree_leaves_with_path(state)
  float_leaves = [(p, x) for p, x in leaves
                  if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not float_leaves:
    return None
  # One jitted program over all leaves, read back with `placement.to_host`. Not one small
  # `jnp.all` dispatch per leaf: in a multi-process run (CPU, gloo; 2 processes x 4 devices)
  # that sequence of tiny SPMD programs deadlocked; one program is also one compile.
  flags = placement.to_host(_all_finite([x for _, x in float_leaves]))  # [num_float_leaves] bool
  for (p, _), ok in zip(float_leaves, flags):
    if not bool(ok):
      return _path_str(p)
  return None


class Checkpointer:
  """Orbax CheckpointManager wrapper; see the module docstring."""

  def __init__(self, directory: str | os.PathLike, *, fingerprint: dict, save_every: int = 1,
               keep_last: Optional[int] = 3, async_save: bool = False,
               renamed_keys: Optional[Mapping[str, str]] = None):
    if save_every < 1:
      raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every}")
    if keep_last is not None and keep_last < 1:
      raise ValueError(f"Checkpointer: keep_last must be >= 1 or None, got {keep_last}")
    if not isinstance(fingerprint, dict):
      raise TypeError(f"Checkpointer: fingerprint must be a dict (see make_fingerprint), got "
                      f"{type(fingerprint).__name__}")
    self.directory = pathlib.Path(directory).absolute()
    self.fingerprint = json.loads(json.dumps(_to_jsonable(fingerprint), sort_keys=True))
    self.save_every = int(save_every)
    self.renamed_keys = dict(renamed_keys or {})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self.unreadable: dict = {}  # step -> why it was skipped
    self._check_fingerprint()

  # -- fingerprint -----------------------------------------------------------------------------
  def saved_fingerprint(self, step: Optional[int] = None) -> Optional[dict]:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
    return _rename_keys(out["fingerprint"], self.renamed_keys)

  def _skip(self, step: int, why: str) -> None:
    """Marks `step` unreadable and says so (its files stay where they are)."""
    self.unreadable[step] = why
    warnings.warn(f"checkpoint step {step} in {self.directory} cannot be read ({why:.300}); skipping "
                  f"it and using the newest readable earlier step (nothing is deleted)", RuntimeWarning,
                  stacklevel=3)

  def _readable_steps(self) -> list:
    return [s for s in reversed(self.all_steps()) if s not in self.unreadable]

  def _check_fingerprint(self) -> None:
    """Compares the newest readable step's fingerprint (a damaged one is skipped) with ours."""
    for step in self._readable_steps():
      try:
        saved = self.saved_fingerprint(step)
      except (ValueError, OSError) as e:  # cut / garbage JSON, missing file
        self._skip(step, f"fingerprint: {type(e).__name__}: {e}")
        continue
      if saved != self.fingerprint:
        diffs = _diff(saved, self.fingerprint)
        shown = "\n  ".join(diffs[:20]) + ("\n  ..." if len(diffs) > 20 else "")
        raise CheckpointMismatchError(
            f"checkpoint directory {self.directory} (latest step {step}) was written by a run "
            f"with a different model or config; refusing to restore or overwrite it. Use another "
            f"checkpoint directory, or delete this one to start over. Differences:\n  {shown}")
      return

  # -- steps -----------------------------------------------------------------------------------
  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> list:
    return sorted(int(s) for s in self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  # -- save / restore --------------------------------------------------------------------------
  def save(self, step: int, state: Any, meta: Optional[dict] = None, *, force: bool = False,
           check_finite: bool = True) -> bool:
    """Saves (state, meta) as `step` if `should_save(step)` or `force`; returns whether it did.

    Raises NonFiniteStateError (writing nothing) if `check_finite` and a float leaf of `state`
    holds NaN/inf; ValueError if `step` is not above the latest saved step.
    """
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"Checkpointer.save: step must be a non-negative int, got {step!r}")
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    self._set_aside_unreadable(from_step=step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"Checkpointer.save: step {step} is not after the latest saved step "
                       f"{latest} in {self.directory}")
    if check_finite:
      bad = _first_nonfinite(state)
      if bad is not None:
        raise NonFiniteStateError(
            f"state leaf {bad} holds NaN/inf at step {step}; not saving (the last good "
            f"checkpoint is step {latest})")
    tree, impls = _unwrap_keys(state)
    meta = dict(meta or {})
    if _KEY_PATHS in meta:
      raise ValueError(f"Checkpointer.save: meta key {_KEY_PATHS!r} is reserved")
    meta[_KEY_PATHS] = impls
    meta = json.loads(json.dumps(_to_jsonable(meta)))
    saved = self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta),
        fingerprint=ocp.args.JsonSave(self.fingerprint)), force=True)
    return bool(saved)

  def restore(self, step: Optional[int] = None, *, target: Any = None) -> tuple:
    """(state, meta) of `step` (default: the newest readable step; a damaged newer one is skipped
    with a warning). See the module docstring for `target`."""
    if step is not None:
      if step not in self.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: "
                                f"{self.all_steps()}")
      return self._restore_step(step, target)
    if self.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed = []
    for i, s in enumerate(self._readable_steps()):
      try:
        if i and self.saved_fingerprint(s) != self.fingerprint:  # (the newest: checked on opening)
          break  # never fall back across a config change
        out = self._restore_step(s, target)
      except (CheckpointReadError, CheckpointMismatchError) as e:
        failed.append((s, e))
        continue
      except (ValueError, OSError) as e:  # its fingerprint JSON
        failed.append((s, CheckpointReadError(f"step {s}: fingerprint: {type(e).__name__}: {e}")))
        continue
      for bad, e in failed:  # an earlier step restores into the same target: these are damaged
        self._skip(bad, str(e))
      return out
    if not failed:
      raise CheckpointReadError(f"no readable checkpoint in {self.directory}: "
                                + "; ".join(f"step {k}: {v:.200}" for k, v in self.unreadable.items()))
    raise failed[0][1]

  def _restore_step(self, step: int, target: Any) -> tuple:
    where = f"step {step} in {self.directory}"
    if not (self.directory / str(step) / "state").is_dir():
      raise CheckpointReadError(f"{where} has no state/ item (an incomplete or damaged checkpoint)")
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (ValueError, OSError) as e:
      raise CheckpointReadError(f"{where}: its meta item cannot be read ({type(e).__name__}: {e})") from e
    impls = meta.pop(_KEY_PATHS, {}) or {}
    if target is None:
      state_args = ocp.args.StandardRestore()
    else:
      state_args = ocp.args.StandardRestore(_abstract_target(target))
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(state=state_args))["state"]
    except (ValueError, KeyError, TypeError, OSError) as e:
      if target is None or _STORE_STATUS.match(str(e)):
        raise CheckpointReadError(f"{where}: its state files cannot be read: {e}") from e
      raise CheckpointMismatchError(
          f"restoring {where} into the given target failed (tree structure, shapes or dtypes "
          f"differ): {e}") from e
    return _rewrap_keys(state, impls), meta

  def _set_aside_unreadable(self, from_step: int) -> None:
    """Renames skipped (unreadable) steps >= `from_step` to `<step>.unreadable` (kept; Orbax
    ignores them), so that a resumed run can save those step numbers again."""
    bad = [s for s in self.unreadable if s >= from_step and s in self.all_steps()]
    if not bad:
      return
    if jax.process_index() == 0:
      for s in bad:
        src = self.directory / str(s)
        dst, i = self.directory / f"{s}.unreadable", 1
        while dst.exists():
          dst, i = self.directory / f"{s}.unreadable.{i}", i + 1
        os.rename(src, dst)
        warnings.warn(f"moved the unreadable checkpoint step {s} to {dst} (kept) to save step {from_step}",
                      RuntimeWarning, stacklevel=3)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("jaxrl_dense_set_aside_unreadable")
    for s in bad:
      del self.unreadable[s]  # the step number is free again
    self._mngr.reload()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
