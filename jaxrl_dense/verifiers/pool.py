"""Hang-proof process pool for outcome verification.

`VerifierPool` keeps `workers` long-lived processes (created once, reused across training
steps). The parent hands each worker one item at a time and enforces a hard wall-clock limit
per item: a worker that overruns is SIGKILLed, the item scores 0.0, and a fresh worker takes its
place. Verification runs on each worker's main thread, so math-verify's `signal.alarm` timeout
works there too (as a soft, inner limit). Workers also run under an address-space rlimit, so a
runaway sympy expansion ends in MemoryError (score 0.0) instead of swapping the machine.

Workers start with the "forkserver" method by default: the fork server imports and warms up
math-verify once, and every worker (including replacements) forks from it, so replacing a
killed worker costs milliseconds and the parent (which may hold JAX threads) is never forked.

Kinds: "math" (`math.score`), "code" (`code.score_detailed` in the sandbox) and "rg" (a
reasoning-gym task's `score_answer`, `rg.score_detailed`: the worker re-creates the entry from the
JSON gold and caches each spec's dataset). reasoning-gym is optional and not preloaded by the
fork server: the first batch with a new rg spec first imports it and builds that spec's dataset
in every worker (`_RG_WARMUP`, under a separate, generous limit), so that the per-item limit
measures scoring only.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math as _pymath
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

__all__ = ["VerifierPool", "VerifyStats", "default_workers", "get_pool", "verify_batch"]

KINDS = ("math", "code", "rg")
# Package-internal kind: (extracted answer, gold string) pairs sent by `math.score`.
_MATH_ANSWERS = "_math_answers"
# Package-internal kind: import reasoning-gym and build the datasets of a list of rg specs.
_RG_WARMUP = "_rg_warmup"
RG_WARMUP_TIMEOUT_S = 300.0
_PRELOAD = ["jaxrl_dense.verifiers._preload"]


def default_workers() -> int:
  """Number of CPUs this process may run on."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # pragma: no cover
    return max(1, os.cpu_count() or 1)


def _worker_main(conn, memory_bytes: int | None) -> None:
  """Worker loop: receive (idx, kind, response, gold, timeout_s), send (idx, score, status).

  status: "ok" (full marks), "ok:<reason>" (judged: wrong_answer, no_code, runtime_error, timeout
  of a code test, no_answer of an rg item), "harness_error: ..." (the code sandbox itself
  failed), "memory", "error: ...".
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
  if memory_bytes:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
  from jaxrl_dense.verifiers import code as code_lib
  from jaxrl_dense.verifiers import math_answers
  from jaxrl_dense.verifiers import rg as rg_lib
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    idx, kind, response, gold, timeout_s, code_test_timeout_s, code_sandbox = msg
    try:
      if kind in ("math", _MATH_ANSWERS):
        # math-verify's own (signal) limit, per parse/compare, below the parent's hard limit so
        # that most slow items end in the worker instead of costing a kill and a restart. The
        # parent enforces the hard limit: scored in this process (`score_in_process`).
        soft_s = max(1.0, timeout_s / 2)
        if kind == "math":
          s = math_answers.score_in_process(response, gold, timeout_s=soft_s)
        else:  # already-extracted answers, from `math.score`'s isolation
          s = float(math_answers._sympy_equal(response, gold, soft_s))
        status = "ok" if s >= 1.0 else "ok:wrong_answer"
      elif kind == "rg":
        s, reason = rg_lib.score_detailed(response, gold)
        status = "ok" if reason == "ok" else f"ok:{reason}"
      elif kind == _RG_WARMUP:  # gold: the rg specs whose datasets to build now
        rg_lib.require()
        for spec in gold:
          rg_lib.dataset(spec)
        s, status = 1.0, "ok"
      else:
        r = code_lib.score_detailed(response, gold, timeout_s=code_test_timeout_s, sandbox=code_sandbox)
        s = r.score
        # A broken sandbox is an error of the verifier, never a wrong answer.
        status = f"harness_error: {r.detail[-300:]}" if r.reason == code_lib.HARNESS_ERROR else (
            "ok" if r.reason == code_lib.PASS else f"ok:{r.reason}")
    except MemoryError:
      s, status = 0.0, "memory"
    except RecursionError:
      s, status = 0.0, "error: RecursionError"
    except Exception as e:  # a broken item scores 0, the worker lives on
      s, status = 0.0, f"error: {type(e).__name__}: {str(e)[:200]}"
    try:
      conn.send((idx, float(s), status))
    except (OSError, ValueError):
      return


@dataclasses.dataclass
class VerifyStats:
  """What happened during the last `VerifierPool.verify` call."""
  n: int = 0
  timeouts: int = 0
  crashes: int = 0  # worker died without answering (e.g. killed by the OS)
  errors: int = 0  # the verifier raised or its sandbox broke; item scored 0
  harness_errors: int = 0  # code items whose sandbox itself failed (counted in `errors` too)
  restarts: int = 0
  wall_s: float = 0.0
  statuses: list[str] = dataclasses.field(default_factory=list)

  def failure_reasons(self) -> dict[str, int]:
    """Why items did not score 1, by kind: "wrong_answer" (judged wrong, incl. no answer),
    code outcomes ("no_code", "runtime_error", "timeout" of a test), "harness_error",
    "timeout" (the whole item overran), "crash", "memory", "error" (the verifier raised)."""
    out: dict[str, int] = {}
    for st in self.statuses:
      if st == "ok":
        continue
      key = st.split(":", 2)[1] if st.startswith("ok:") else st.split(":", 1)[0]
      out[key] = out.get(key, 0) + 1
    return out


_MAIN_LOCK = threading.Lock()
_HARNESS_ERROR_LOGGED = False


def _log_harness_error(status: str) -> None:
  """Logs a broken code sandbox loudly, once per process."""
  global _HARNESS_ERROR_LOGGED
  if not _HARNESS_ERROR_LOGGED:
    _HARNESS_ERROR_LOGGED = True
    logging.getLogger(__name__).error(
        "jaxrl_dense code sandbox is BROKEN: code items score 0 because the sandbox failed, not "
        "because the answers are wrong (VerifyStats.harness_errors counts them): %s", status)


@contextlib.contextmanager
def _no_main_reimport():
  """Hides `__main__`'s file/spec while a worker starts, so that the child does not re-run the
  user's script (workers only need this package): a script calling `verify_batch` at top
  level, without an `if __name__ == "__main__":` guard, must not start workers recursively."""
  main = sys.modules.get("__main__")
  if main is None:
    yield
    return
  with _MAIN_LOCK:
    saved = {a: main.__dict__[a] for a in ("__file__", "__spec__") if a in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
      yield
    finally:
      main.__dict__.pop("__spec__", None)
      main.__dict__.update(saved)


class _Worker:

  def __init__(self, ctx, memory_bytes: int | None):
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    self.proc = ctx.Process(target=_worker_main, args=(child_conn, memory_bytes), daemon=True,
                            name="jaxrl-verifier")
    with _no_main_reimport():
      self.proc.start()
    child_conn.close()
    self.conn = parent_conn
    self.item: int | None = None
    self.deadline = _pymath.inf

  def kill(self) -> None:
    try:
      self.proc.kill()
    except (OSError, ValueError, AttributeError):
      pass
    self.proc.join(timeout=5)
    if self.proc.pid is not None:  # its code sandboxes died with it (PDEATHSIG); their dirs did not
      from jaxrl_dense.verifiers import sandbox as sandbox_lib
      sandbox_lib.cleanup_after(self.proc.pid)
    try:
      self.conn.close()
    except OSError:
      pass

  def stop(self, timeout: float = 2.0) -> None:
    try:
      self.conn.send(None)
    except (OSError, ValueError):
      pass
    self.proc.join(timeout=timeout)
    if self.proc.is_alive():
      self.kill()
    else:
      self.conn.close()


class VerifierPool:
  """A reusable pool of verifier processes with a hard per-item wall-clock limit.

  Usage:
    pool = VerifierPool(workers=2)           # once
    scores = pool.verify(responses, golds, kinds="math", timeout_s=5.0)   # every step, [N]
    pool.close()                             # or `with VerifierPool() as pool:`

  Args:
    workers: number of worker processes (default: the CPUs available to this process).
    memory_bytes: address-space limit of each worker (None: unlimited). Code-test sandboxes
      set their own, smaller limit.
    start_method: "forkserver" (default; see module docstring), "spawn" or "fork".
    code_sandbox: sandbox of code items (`verifiers.sandbox`): "auto" (bubblewrap; `verify`
      raises `SandboxUnavailableError` before scoring code where it is unusable) or "unsafe".
  """

  def __init__(self, workers: int | None = None, *, memory_bytes: int | None = 4 << 30,
               start_method: str = "forkserver", code_sandbox: str = "auto"):
    from jaxrl_dense.verifiers import sandbox as sandbox_lib
    if code_sandbox not in sandbox_lib.MODES:
      raise ValueError(f"code_sandbox must be one of {sandbox_lib.MODES}, got {code_sandbox!r}")
    self.code_sandbox = code_sandbox
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    if memory_bytes is not None and memory_bytes < (256 << 20):
      raise ValueError(f"memory_bytes must be >= 256 MiB (sympy needs it), got {memory_bytes}")
    self._ctx = mp.get_context(start_method)
    if start_method == "forkserver":
      self._ctx.set_forkserver_preload(_PRELOAD)
    self._memory_bytes = memory_bytes
    self._lock = threading.Lock()
    self._closed = False
    self.num_workers = workers
    self._workers = [_Worker(self._ctx, memory_bytes) for _ in range(workers)]
    self.total_restarts = 0
    self.last_stats = VerifyStats()
    self._rg_warm_specs: set = set()  # rg specs whose datasets every worker has built

  # -- lifecycle

  def close(self) -> None:
    """Stops all workers. Idempotent."""
    if self._closed:
      return
    self._closed = True
    for w in self._workers:
      w.stop()
    self._workers = []

  def __enter__(self) -> "VerifierPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass

  def _abandon(self) -> None:
    """In a forked child: forget the parent's workers (not ours to stop) and close."""
    self._closed = True
    self._workers = []

  @property
  def closed(self) -> bool:
    return self._closed

  def worker_pids(self) -> list[int]:
    return [w.proc.pid for w in self._workers]

  def _replace(self, k: int) -> None:
    self._workers[k].kill()
    self._workers[k] = _Worker(self._ctx, self._memory_bytes)
    self.total_restarts += 1

  # -- work

  def verify(self, responses: Sequence[str | None], golds: Sequence[Any],
             kinds: str | Sequence[str] = "math", timeout_s: float = 5.0, *,
             code_test_timeout_s: float | None = None) -> np.ndarray:
    """Scores `responses[i]` against `golds[i]` under a hard limit of `timeout_s` per item.

    Args:
      responses: N decoded response texts (None counts as empty: 0.0).
      golds: N gold answers (math: str/int/float), test specs (code: see `code.score`) or
        rg golds (the JSON of `rg.encode_gold`).
      kinds: "math" / "code" / "rg", or one per item.
      timeout_s: hard wall-clock limit per item, enforced by killing the worker (> 0). For
        "code" items it bounds the whole test suite of the item.
      code_test_timeout_s: per-test limit inside the code sandbox (default min(5, timeout_s)).

    Returns:
      float32 [N] scores in [0, 1]; a timeout, crash or verifier error gives 0.0
      (`self.last_stats` counts them).
    """
    if self._closed:
      raise RuntimeError("VerifierPool.verify: the pool is closed")
    n = len(responses)
    if len(golds) != n:
      raise ValueError(f"verify: {n} responses but {len(golds)} golds")
    if isinstance(kinds, str):
      kinds = [kinds] * n
    kinds = list(kinds)
    if len(kinds) != n:
      raise ValueError(f"verify: {n} responses but {len(kinds)} kinds")
    for i, k in enumerate(kinds):
      if k not in KINDS:
        raise ValueError(f"verify: kinds[{i}] = {k!r}, expected one of {KINDS}")
    if not (timeout_s > 0 and _pymath.isfinite(timeout_s)):
      raise ValueError(f"verify: timeout_s must be a finite number > 0, got {timeout_s}")
    test_timeout = min(5.0, timeout_s) if code_test_timeout_s is None else float(code_test_timeout_s)
    for i, (r, g, k) in enumerate(zip(responses, golds, kinds)):
      if r is not None and not isinstance(r, str):
        raise TypeError(f"verify: responses[{i}] must be str or None, got {type(r).__name__}")
      if k == "math" and (g is None or isinstance(g, bool) or not isinstance(g, (str, int, float, np.number))):
        raise TypeError(f"verify: golds[{i}] must be str, int or float for math, got {type(g).__name__}")
      if k == "code" and not isinstance(g, (str, list, tuple, dict)):
        raise TypeError(f"verify: golds[{i}] must be tests (dict, list or str) for code, got {type(g).__name__}")
      if k == "rg" and not isinstance(g, str):
        raise TypeError(f"verify: golds[{i}] must be the JSON string of an rg gold, got {type(g).__name__}")

    code_mode = None
    if "code" in kinds:  # refuse before scoring anything: an unusable sandbox is not a 0 reward
      from jaxrl_dense.verifiers import sandbox as sandbox_lib
      code_mode = sandbox_lib.resolve_mode(self.code_sandbox)
    rg_specs = set()
    if "rg" in kinds:  # refuse before scoring anything: a missing package is not a 0 reward
      from jaxrl_dense.verifiers import rg as rg_lib
      rg_lib.require()
      for g, k in zip(golds, kinds):
        if k == "rg":
          try:
            rg_specs.add(rg_lib.decode_gold(g)["rg"])
          except ValueError:
            pass  # the worker reports it as this item's error
    with self._lock:
      new_specs = sorted(rg_specs - self._rg_warm_specs)
      if new_specs:
        self._warm_rg(new_specs)
      return self._run(responses, golds, kinds, float(timeout_s), test_timeout, code_mode)

  def _warm_rg(self, specs: list) -> None:
    """Every worker imports reasoning-gym and builds the datasets of `specs` (one item each)."""
    n = len(self._workers)
    self._run([None] * n, [list(specs)] * n, [_RG_WARMUP] * n, RG_WARMUP_TIMEOUT_S, 0.0, None)
    if self.last_stats.failure_reasons():  # a spec that fails fails again, per item, in the real run
      logging.getLogger(__name__).warning("rg warm-up of %s: %s", specs, self.last_stats.statuses)
    else:
      self._rg_warm_specs.update(specs)

  def _verify_math_answers(self, answers: Sequence[str], golds: Sequence[str],
                           timeout_s: float) -> np.ndarray:
    """Package-internal (`math.score`'s hard time limit): the sympy step of math equality on
    already-extracted answers and gold strings, `timeout_s` per item; float32 [N]."""
    if self._closed:
      raise RuntimeError("VerifierPool: the pool is closed")
    with self._lock:
      return self._run(list(answers), list(golds), [_MATH_ANSWERS] * len(answers), float(timeout_s), 0.0, None)

  def _run(self, responses, golds, kinds, timeout_s: float, test_timeout: float,
           code_mode: str | None) -> np.ndarray:
    t_start = time.perf_counter()
    n = len(responses)
    scores = np.zeros([n], np.float32)  # [N]
    statuses = ["pending"] * n
    stats = VerifyStats(n=n)
    next_item = 0
    done = 0
    idle = list(range(len(self._workers)))
    busy: dict[Any, int] = {}  # conn -> worker index

    def dispatch(k: int) -> bool:
      nonlocal next_item
      w = self._workers[k]
      i = next_item
      g = golds[i]
      if isinstance(g, np.generic):
        g = g.item()
      try:
        w.conn.send((i, kinds[i], responses[i], g, timeout_s, test_timeout, code_mode))
      except (OSError, ValueError):
        return False  # dead worker: replace it, item stays queued
      next_item += 1
      w.item = i
      w.deadline = time.monotonic() + timeout_s
      busy[w.conn] = k
      return True

    def fail(k: int, status: str) -> None:
      nonlocal done
      w = self._workers[k]
      if w.item is not None:
        statuses[w.item] = status
        scores[w.item] = 0.0
        done += 1
      busy.pop(w.conn, None)
      self._replace(k)
      stats.restarts += 1
      idle.append(k)

    while done < n:
      while idle and next_item < n:
        k = idle.pop()
        if not self._workers[k].proc.is_alive() or not dispatch(k):  # died while idle
          self._workers[k].item = None
          self._replace(k)
          stats.restarts += 1
          idle.append(k)
      if not busy:  # unreachable: every worker is idle or busy and items remain
        raise RuntimeError("VerifierPool: no worker busy while items remain")
      now = time.monotonic()
      wait_s = max(0.0, min(self._workers[k].deadline for k in busy.values()) - now)
      ready = mp_connection.wait(list(busy), timeout=wait_s)
      for conn in ready:
        k = busy[conn]
        w = self._workers[k]
        try:
          i, s, status = conn.recv()
        except (EOFError, OSError):
          stats.crashes += 1
          fail(k, "crash")
          continue
        if i != w.item:  # cannot happen with one item in flight; be strict
          stats.crashes += 1
          fail(k, "crash")
          continue
        scores[i] = s
        statuses[i] = status
        if status.startswith("harness_error"):
          stats.harness_errors += 1
          _log_harness_error(status)
        if not (status == "ok" or status.startswith("ok:")):
          stats.errors += 1
        done += 1
        w.item = None
        w.deadline = _pymath.inf
        del busy[conn]
        idle.append(k)
      now = time.monotonic()
      for conn, k in list(busy.items()):
        if self._workers[k].deadline <= now:
          stats.timeouts += 1
          fail(k, "timeout")
    stats.wall_s = time.perf_counter() - t_start
    stats.statuses = statuses
    self.last_stats = stats
    return scores


_POOLS: dict[int, VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(workers: int | None = None) -> VerifierPool:
  """The process-wide pool with `workers` workers, created on first use, closed at exit."""
  workers = default_workers() if workers is None else int(workers)
  with _POOLS_LOCK:
    pool = _POOLS.get(workers)
    if pool is None or pool.closed:
      pool = _POOLS[workers] = VerifierPool(workers)
    return pool


@atexit.register
def _close_pools() -> None:
  for pool in list(_POOLS.values()):
    try:
      pool.close()
    except Exception:
      pass
  _POOLS.clear()


def _after_fork_in_child() -> None:
  """A forked child inherits the parent's pools and fork-server client state, neither usable
  there (the workers and the fork server are the parent's children): forget them, so that the
  child's first pool starts its own fork server."""
  global _POOLS_LOCK
  for pool in _POOLS.values():
    pool._abandon()
  _POOLS.clear()
  _POOLS_LOCK = threading.Lock()
  try:
    from multiprocessing import forkserver
    fs = forkserver._forkserver
    if fs._forkserver_pid is not None:
      try:
        os.close(fs._forkserver_alive_fd)  # the parent's server stops when the parent does
      except (OSError, TypeError):
        pass
      fs._forkserver_pid = fs._forkserver_address = fs._forkserver_alive_fd = None
      fs._lock = threading.Lock()
  except (ImportError, AttributeError):  # pragma: no cover (other multiprocessing internals)
    pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def verify_batch(responses: Sequence[str | None], golds: Sequence[Any], kind: str | Sequence[str] = "math",
                 timeout_s: float = 5.0, workers: int | None = None) -> np.ndarray:
  """Outcome labels of a batch: float32 [N] in [0, 1] (math: 0/1; code: PRIME's fraction).

  Runs on the process-wide `get_pool(workers)` (created once, reused across calls), each item
  under a hard wall-clock limit of `timeout_s`; timeouts and verifier errors score 0.0.
  `kind` is "math", "code" or "rg" (a reasoning-gym task's checker) or one per item; for code, `timeout_s` bounds the whole test suite
  of an item (each test gets min(5, timeout_s)), so give code a larger limit (PRIME: 300 s).
  """
  return get_pool(workers).verify(responses, golds, kinds=kind, timeout_s=timeout_s)
