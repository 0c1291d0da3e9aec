"""Process isolation for model-written code: bubblewrap namespaces, an unprivileged uid, limits.

The code verifier (`verifiers.code`) runs every test of every response through `run`:

    result = sandbox.run([python, "-I", "-S", "-B", "/sandbox/harness.py", ...],
                         files={"harness.py": src, "solution.py": code, "spec.json": spec},
                         stdin=b"1 2\\n", timeout_s=5.0, limits=sandbox.Limits())
    result.stdout, result.stderr, result.timed_out, result.output_overflow

Threat model: the program is adversarial (an RL policy is optimised against this reward). It must
not be able to forge its verdict (that is `code.py`'s job: only plain data leaves the sandbox
and the comparisons happen in the trusted parent), read or change anything outside the sandbox,
see or signal other processes (the trainer, the verifier pool, other rollouts' tests), reach the
network, or exhaust the host. Mode "bwrap" (the default) uses bubblewrap (`bwrap`, Debian/Ubuntu
package `bubblewrap`; the tool Flatpak is built on):

  * new mount, PID, network, IPC, UTS and cgroup namespaces (and a user namespace when not
    root); its own `/proc` (only its own processes), a minimal `/dev`;
  * a read-only view of only what the interpreter needs: `/usr` (plus the top-level `/lib*`,
    `/bin` links) and the interpreter's prefix, with `site-packages` hidden; no `/etc`, `/home`,
    `/root`, no repository, no installed `jaxrl_dense`;
  * the program's files bound read-only under `/sandbox` (copied in by bwrap from memfds: no
    host path is shared between the parent and the sandbox, so no item can name another's
    files); a private, size-limited tmpfs at `/tmp` as the only writable place;
  * an unprivileged uid: as root, bwrap sets up the namespaces and `setpriv` drops to a uid of
    its own with no capabilities and `no_new_privs` (a user namespace would map the program to
    root outside, which RLIMIT_NPROC exempts); as another user, bwrap's user namespace maps it
    to that user's uid;
  * environment cleared, `--die-with-parent`, a new session; the wall-clock limit kills the
    whole PID namespace;
  * limits for the whole process tree: processes (RLIMIT_NPROC of the sandbox's own uid, and a
    cgroup `pids.max` where the cgroup tree is writable), memory (a cgroup `memory.max` where
    writable; always RLIMIT_AS per process, so at most nproc x memory_bytes otherwise), CPU
    (RLIMIT_CPU per process, the wall-clock limit for the tree), written file size
    (RLIMIT_FSIZE, and the tmpfs size), open files, and output (stdout/stderr read through
    pipes, the process killed when either passes `output_bytes`).

Mode "unsafe" is the previous, weaker sandbox (for machines without bwrap or user namespaces):
rlimits, a fresh private directory per test, `unshare -n -p -f` where the kernel allows it, and
an in-process Python guard. It is NOT a security boundary (the program runs as the verifier's
user with the host filesystem in view); it is never chosen silently: `resolve_mode("auto")`
raises `SandboxUnavailableError` saying how to install bubblewrap, and the unsafe mode logs a
warning once per process.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Mapping, Sequence

__all__ = ["Limits", "MODES", "RunResult", "SandboxUnavailableError", "bwrap_available", "cleanup_after",
           "describe", "resolve_mode", "run"]

MODES = ("auto", "bwrap", "unsafe")
SANDBOX_DIR = "/sandbox"  # where the program's files are, inside the sandbox
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
                "bubblewrap`) and allow user namespaces (or run as root); or pass "
                "--unsafe_code_sandbox to use the weaker, non-isolating sandbox")
# Uids the sandboxed programs run as when the verifier is root: one per verifier process, so
# RLIMIT_NPROC counts exactly one sandbox's process tree (a pool worker runs one test at a time).
_UID_BASE, _UID_SPAN = 1_500_000_000, 100_000_000
_PREFIX = "jaxrl_sandbox_"  # temp dirs (unsafe mode) and cgroups: <prefix><verifier pid>_...

_log = logging.getLogger(__name__)


class SandboxUnavailableError(RuntimeError):
  """bubblewrap is missing or cannot create namespaces here (the message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed run (whole process tree unless noted).

  Attributes:
    memory_bytes: cgroup memory.max of the tree where writable; RLIMIT_AS of every process.
    nproc: processes + threads of the tree (RLIMIT_NPROC of the sandbox uid; cgroup pids.max).
    file_bytes: RLIMIT_FSIZE (largest file a process may write).
    tmp_bytes: size of the writable tmpfs /tmp (bwrap mode).
    output_bytes: stdout and stderr each; past it the tree is killed (`output_overflow`).
    open_files: RLIMIT_NOFILE.
  """
  memory_bytes: int = 1 << 30
  nproc: int = 64
  file_bytes: int = 1 << 20
  tmp_bytes: int = 64 << 20
  output_bytes: int = 1 << 20
  open_files: int = 256

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"Limits.{f.name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What came back from one sandboxed run (the parent read it; nothing else crosses)."""
  returncode: int | None  # None when killed for time or output
  stdout: bytes
  stderr: bytes
  timed_out: bool
  output_overflow: bool
  started: bool  # False: the sandbox itself could not start (not the program's fault)
  detail: str = ""


# ----------------------------------------------------------------------------- mode selection

_PROBE: dict[str, tuple[bool, str]] = {}
_UNSAFE_WARNED = False
_LOCK = threading.Lock()


def bwrap_available(refresh: bool = False) -> tuple[bool, str]:
  """(usable, why not): runs `true` in a minimal bwrap sandbox once per process."""
  with _LOCK:
    if "bwrap" in _PROBE and not refresh:
      return _PROBE["bwrap"]
    exe = shutil.which("bwrap")
    if not sys.platform.startswith("linux"):
      res = (False, f"bubblewrap needs Linux (this is {sys.platform})")
    elif exe is None:
      res = (False, "`bwrap` is not on PATH")
    else:
      try:
        p = subprocess.run(_bwrap_args(exe, os.path.realpath(sys.executable), {}, Limits(), _sandbox_uid())
                           + [os.path.realpath(sys.executable), "-I", "-S", "-c", "pass"],
                           capture_output=True, timeout=30, preexec_fn=_preexec(Limits(), 5, None))
        res = (p.returncode == 0, p.stderr.decode("utf-8", "replace").strip()[-300:])
      except (OSError, subprocess.TimeoutExpired) as e:
        res = (False, f"{type(e).__name__}: {e}")
    _PROBE["bwrap"] = res
    return res


def resolve_mode(mode: str) -> str:
  """"bwrap" or "unsafe" for a requested mode; "auto" and "bwrap" raise when bwrap is unusable."""
  global _UNSAFE_WARNED
  if mode not in MODES:
    raise ValueError(f"sandbox mode must be one of {MODES}, got {mode!r}")
  if mode == "unsafe":
    if not _UNSAFE_WARNED:
      _UNSAFE_WARNED = True
      _log.warning("jaxrl_dense code sandbox: UNSAFE mode (no isolation: model-written code runs as "
                   "this user with the host filesystem in view); use bubblewrap for RL on code")
    return "unsafe"
  ok, why = bwrap_available()
  if not ok:
    raise SandboxUnavailableError(f"the code sandbox needs bubblewrap, which is unusable here ({why}); "
                                  + INSTALL_HINT)
  return "bwrap"


def describe(mode: str = "auto") -> str:
  """One line naming the sandbox a run with `mode` would use (for logs and benchmarks)."""
  if mode == "unsafe":
    return "unsafe (rlimits + python guard" + (", unshare)" if _unshare_prefix() else ")")
  ok, why = bwrap_available()
  if not ok:
    return f"unavailable ({why})"
  who = "root: setpriv to an unprivileged uid" if os.geteuid() == 0 else "user namespace"
  return f"bwrap ({who}; cgroup limits: {'yes' if _cgroup_root() else 'no'})"


# ----------------------------------------------------------------------------- bwrap command

def _interpreter_prefix(python: str) -> str:
  """The directory tree an interpreter needs: <prefix> with bin/ and lib/ (realpath)."""
  return os.path.dirname(os.path.dirname(os.path.realpath(python)))


def _bwrap_args(exe: str, python: str, files: Mapping[str, int], limits: Limits, uid: int) -> list[str]:
  """The bwrap command line (before the program). files: name -> readable fd of its content."""
  args = [exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
          "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
          "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
          "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "OMP_NUM_THREADS", "1"]
  root = os.geteuid() == 0
  if not root:
    args += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
  args += ["--ro-bind", "/usr", "/usr"]
  for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
    path = "/" + top
    if os.path.islink(path):
      args += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      args += ["--ro-bind", path, path]
  hide = []
  prefix = _interpreter_prefix(python)
  if prefix != "/usr" and not prefix.startswith("/usr/"):
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts)):  # parents traversable (bwrap would create them 0700 as root)
      args += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
    args += ["--ro-bind", prefix, prefix]
    hide.append(prefix)
  for base in hide + ["/usr/local", "/usr"]:  # other packages are not part of "what Python needs"
    lib = os.path.join(base, "lib")
    if os.path.isdir(lib):
      for name in sorted(os.listdir(lib)):
        if name.startswith("python3"):
          for sub in ("site-packages", "dist-packages"):
            d = os.path.join(lib, name, sub)
            if os.path.isdir(d) and not os.path.islink(d):
              args += ["--tmpfs", d]
  args += ["--proc", "/proc", "--dev", "/dev"]
  args += ["--perms", "1777", "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
  args += ["--perms", "0755", "--dir", SANDBOX_DIR]
  for name, fd in files.items():
    args += ["--perms", "0444", "--ro-bind-data", str(fd), f"{SANDBOX_DIR}/{name}"]
  args += ["--chdir", "/tmp"]
  if root:
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
             setpriv, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--no-new-privs",
             "--inh-caps=-all"]
  else:
    args += ["--"]
  return args


# ----------------------------------------------------------------------------- cgroups

def _cgroup_root() -> str | None:
  """A writable cgroup directory under which per-run groups with memory and pids limits can be
  made (v2 unified hierarchy, or v1 memory + pids), or None."""
  if "cgroup" in _PROBE:
    return _PROBE["cgroup"][1] or None
  found = ""
  try:
    with open("/proc/self/cgroup") as f:
      lines = f.read().splitlines()
    v2 = [l.split(":", 2)[2] for l in lines if l.startswith("0::")]
    if v2 and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
      d = os.path.join("/sys/fs/cgroup", v2[0].lstrip("/"))
      ctrl = open(os.path.join(d, "cgroup.subtree_control")).read().split()
      if "memory" in ctrl and "pids" in ctrl and os.access(d, os.W_OK):
        found = "v2:" + d
    if not found and os.path.isdir("/sys/fs/cgroup/memory") and os.path.isdir("/sys/fs/cgroup/pids"):
      paths = {}
      for l in lines:
        _, ctrls, path = l.split(":", 2)
        for c in ctrls.split(","):
          paths[c] = path
      mem = os.path.join("/sys/fs/cgroup/memory", paths.get("memory", "/").lstrip("/"))
      pids = os.path.join("/sys/fs/cgroup/pids", paths.get("pids", "/").lstrip("/"))
      if os.access(mem, os.W_OK) and os.access(pids, os.W_OK):
        found = f"v1:{mem}|{pids}"
  except (OSError, IndexError, ValueError):
    found = ""
  _PROBE["cgroup"] = (bool(found), found)
  return found or None


def _make_cgroups(limits: Limits) -> list[str]:
  """Per-run cgroup directories with the tree's memory and process limits ([] if unavailable)."""
  root = _cgroup_root()
  if not root:
    return []
  name = f"{_PREFIX}{os.getpid()}_{time.monotonic_ns()}"
  made = []
  try:
    if root.startswith("v2:"):
      d = os.path.join(root[3:], name)
      os.mkdir(d)
      made.append(d)
      _write(os.path.join(d, "memory.max"), limits.memory_bytes)
      _write(os.path.join(d, "memory.swap.max"), 0, missing_ok=True)
      _write(os.path.join(d, "pids.max"), limits.nproc)
    else:
      mem, pids = root[3:].split("|")
      dm, dp = os.path.join(mem, name), os.path.join(pids, name)
      os.mkdir(dm)
      made.append(dm)
      os.mkdir(dp)
      made.append(dp)
      _write(os.path.join(dm, "memory.limit_in_bytes"), limits.memory_bytes)
      _write(os.path.join(dp, "pids.max"), limits.nproc)
  except OSError:
    _remove_cgroups(made)
    _PROBE["cgroup"] = (False, "")
    return []
  return made


def _write(path: str, value, missing_ok: bool = False) -> None:
  try:
    with open(path, "w") as f:
      f.write(str(value))
  except FileNotFoundError:
    if not missing_ok:
      raise


def _remove_cgroups(dirs: Sequence[str]) -> None:
  for d in dirs:
    kill = os.path.join(d, "cgroup.kill")
    if os.path.exists(kill):
      try:
        _write(kill, 1)
      except OSError:
        pass
    for _ in range(50):  # a just-killed tree may take a moment to leave the group
      try:
        os.rmdir(d)
        break
      except FileNotFoundError:
        break
      except OSError:
        time.sleep(0.002)


# ----------------------------------------------------------------------------- running

def _preexec(limits: Limits, cpu_s: int, cgroups: Sequence[str] | None,
             nproc: int | None = None) -> Callable[[], None]:
  libc = None
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:  # pragma: no cover
    pass
  procs_files = [os.path.join(d, "cgroup.procs") for d in (cgroups or ())]
  nproc = limits.nproc if nproc is None else nproc  # 0: leave RLIMIT_NPROC alone

  def preexec():  # the child between fork and exec
    for f in procs_files:  # join the run's cgroups first: everything forked later inherits them
      with open(f, "w") as fh:
        fh.write(str(os.getpid()))
    if libc is not None:
      libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the verifier
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    if nproc:
      resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

  return preexec


def _memfd(name: str, data: bytes) -> int:
  fd = os.memfd_create(name, 0)  # no host path: nothing else can name or replace it
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _sandbox_uid() -> int:
  return _UID_BASE + os.getpid() % _UID_SPAN


def _unshare_prefix() -> list[str]:
  """`unshare -n -p -f --kill-child` where the kernel allows it (unsafe mode only), cached."""
  if "unshare" in _PROBE:
    return list(_PROBE["unshare"][1])
  exe = shutil.which("unshare")
  result: list[str] = []
  if exe and sys.platform.startswith("linux"):
    for flags in (["-n", "-p", "-f", "--kill-child"], ["-r", "-n", "-p", "-f", "--kill-child"]):
      cmd = [exe, *flags, "--"]
      try:
        ok = subprocess.run(cmd + [sys.executable, "-I", "-S", "-c", "pass"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=20).returncode == 0
      except (OSError, subprocess.TimeoutExpired):
        ok = False
      if ok:
        result = cmd
        break
  _PROBE["unshare"] = (bool(result), result)  # type: ignore[assignment]
  return list(result)


def run(argv: Sequence[str], *, files: Mapping[str, bytes], stdin: bytes = b"", timeout_s: float,
        limits: Limits = Limits(), mode: str = "bwrap", python: str | None = None) -> RunResult:
  """Runs `argv` (whose argv[0] is the interpreter) in a sandbox; returns what it printed.

  Args:
    argv: the program: argv[0] the interpreter, then its arguments; an argument starting with
      "@/" names one of `files` ("@/harness.py" becomes /sandbox/harness.py in bwrap mode and
      ./harness.py, in the private working directory, in unsafe mode).
    files: name -> content, read-only inside the sandbox.
    stdin: the program's standard input.
    timeout_s: wall-clock limit of the whole tree (> 0).
    limits: resource limits (`Limits`).
    mode: "bwrap" or "unsafe" (see the module docstring; `resolve_mode` picks it).
    python: the interpreter argv[0] is (its prefix is made visible); default argv[0].
  """
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  if mode not in ("bwrap", "unsafe"):
    raise ValueError(f"run: mode must be 'bwrap' or 'unsafe', got {mode!r}")
  python = python or argv[0]
  cpu_s = max(1, int(timeout_s + 0.999) + 1)
  fds: list[int] = []
  workdir = None
  cgroups: list[str] = []
  try:
    if mode == "bwrap":
      named = {}
      for name, data in files.items():
        fd = _memfd(name, data)
        fds.append(fd)
        named[name] = fd
      exe = shutil.which("bwrap")
      if exe is None:
        return RunResult(None, b"", b"", False, False, False, "`bwrap` is not on PATH")
      real = os.path.realpath(python)
      cmd = _bwrap_args(exe, real, named, limits, _sandbox_uid()) + [real] + [
          (SANDBOX_DIR + a[1:]) if a.startswith("@/") else a for a in argv[1:]]
      cgroups = _make_cgroups(limits)
      nproc = limits.nproc
      if os.geteuid() != 0:  # RLIMIT_NPROC counts every process of this user
        nproc = _count_user_processes(os.geteuid()) + limits.nproc
      preexec = _preexec(limits, cpu_s, cgroups, nproc)
      cwd = "/"
    else:
      workdir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}_")  # random suffix, mode 0700
      for name, data in files.items():
        with open(os.path.join(workdir, name), "wb") as f:
          f.write(data)
      cmd = _unshare_prefix() + [python] + [("." + a[1:]) if a.startswith("@/") else a for a in argv[1:]]
      # RLIMIT_NPROC does not bind root (and cannot be raised back): only set it for other users
      nproc = 0 if os.geteuid() == 0 else _count_user_processes(os.geteuid()) + limits.nproc
      preexec = _preexec(limits, cpu_s, None, nproc)
      cwd = workdir
    env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    stdin_f = tempfile.TemporaryFile()  # unnamed: nothing in the sandbox can replace it
    stdin_f.write(stdin)
    stdin_f.seek(0)
    try:
      proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin_f, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                              pass_fds=tuple(fds), preexec_fn=preexec)
    except OSError as e:
      return RunResult(None, b"", b"", False, False, False, f"cannot start the sandbox: {e}")
    finally:
      stdin_f.close()
    for fd in fds:  # bwrap copies them; the parent's copies are no longer needed
      os.close(fd)
    fds = []
    out, err, timed_out, overflow = _collect(proc, timeout_s, limits.output_bytes)
    rc = None if (timed_out or overflow) else proc.returncode
    started = True
    detail = ""
    if mode == "bwrap" and rc == 1 and err.startswith(b"bwrap: "):
      started, detail = False, err.decode("utf-8", "replace")[-500:]
    return RunResult(rc, out, err, timed_out, overflow, started, detail)
  finally:
    for fd in fds:
      os.close(fd)
    _remove_cgroups(cgroups)
    if workdir is not None:
      shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
  """Reads stdout/stderr until both close, the deadline passes or either exceeds `cap` bytes;
  then kills the process group and reaps. Returns (stdout, stderr, timed_out, overflow)."""
  deadline = time.monotonic() + timeout_s
  bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
  sel = selectors.DefaultSelector()
  for f in bufs:
    os.set_blocking(f.fileno(), False)
    sel.register(f, selectors.EVENT_READ)
  timed_out = overflow = False
  try:
    while sel.get_map():
      left = deadline - time.monotonic()
      if left <= 0:
        timed_out = True
        break
      for key, _ in sel.select(timeout=min(left, 0.5)):
        try:
          chunk = os.read(key.fileobj.fileno(), 65536)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(key.fileobj)
          continue
        buf = bufs[key.fileobj]
        buf += chunk
        if len(buf) > cap:
          overflow = True
      if overflow:
        break
    if not timed_out and not overflow:
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        timed_out = True
  finally:
    sel.close()
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    proc.wait()
    for f in bufs:
      f.close()
  return bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap]), timed_out, overflow


def cleanup_after(pid: int) -> None:
  """Removes what verifier process `pid` left when it was killed mid-test: its per-run cgroups
  and (unsafe mode) its private working directories."""
  import glob
  for d in glob.glob(os.path.join(tempfile.gettempdir(), f"{_PREFIX}{pid}_*")):
    shutil.rmtree(d, ignore_errors=True)
  root = _cgroup_root()
  if root:
    bases = [root[3:]] if root.startswith("v2:") else root[3:].split("|")
    for base in bases:
      _remove_cgroups(glob.glob(os.path.join(base, f"{_PREFIX}{pid}_*")))


def _count_user_processes(uid: int) -> int:
  n = 0
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      try:
        if os.stat(f"/proc/{pid}").st_uid == uid:
          n += 1
      except OSError:
        pass
  return n
