"""Code outcome verifier: run the response's last ```python block against tests in a sandbox.

PRIME's code label (Cui et al., arXiv 2502.01456; APPS harness, veRL `verl/utils/reward_score/prime_code`):

    r_o(y, tests) = 1.0                                   if all tests pass,
                    (# of the first min(10, n) tests passed) / min(10, n)   otherwise.

Test formats accepted (`normalize_tests`):
  * APPS / Eurus-2 "input_output": `{"inputs": [...], "outputs": [...]}` (stdin -> stdout), or
    with `"fn_name"` (call-based: each input is the argument list, output the return value;
    a LeetCode-style `class Solution` method is found too);
  * a list of `{"input": str, "output": str}` dicts (stdin -> stdout);
  * assert-style: a list of statements such as `"assert add(1, 2) == 3"`, or one string of them;
  * any of the above JSON-encoded in a string.

A verdict the program cannot forge. The program's code runs in a sandbox (`verifiers.sandbox`:
bubblewrap namespaces, an unprivileged uid, limits for the whole process tree), one fresh
sandbox per test. What leaves the sandbox is plain data only, and every comparison happens in
this (trusted) process:
  * stdio: the parent compares the program's stdout with the expected output (integers exactly,
    other numbers with APPS's tolerance); a non-zero exit status fails the test.
  * call-based: the sandbox calls `fn_name(*input)` and sends back the return value as tagged
    JSON of primitive types (None, bool, int, float, complex, str, bytes, list, tuple, set,
    frozenset, dict); the parent decodes it and compares.
  * assert-style: each statement is parsed here (`ast`) into a check the parent evaluates
    (comparisons, boolean and arithmetic operators, literals, a few pure builtins such as
    `sorted`, `set`, `abs`, `round`, `math.isclose`), whose leaves that name the program's code
    (e.g. `add(1, 2)`) are sent to the sandbox as expressions; the sandbox returns their values
    as plain data. The expected values never enter the sandbox, so the program cannot read them,
    and neither exiting early (`sys.exit(0)`, `os._exit(0)`, atexit hooks), nor an object whose
    `__eq__` is always true, nor rewriting files or builtins can make a test pass. A statement
    outside that form (comprehensions, lambdas, helper definitions) is refused by
    `normalize_tests` with an error naming it.
A program that exits early, hangs, crashes or returns something that is not plain data gets 0
for that test. The sandbox's own failures (it could not start) are HARNESS_ERROR, never the
program's: the harness writes a marker on stderr before the program runs, which the program
cannot take back.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math as _pymath
import operator
import re
import sys
from typing import Any, Sequence

from jaxrl_dense.verifiers import sandbox as sandbox_lib

__all__ = [
    "CodeScore",
    "OUTCOMES",
    "TestCase",
    "extract_code",
    "normalize_tests",
    "run_test_outcomes",
    "run_tests",
    "sandbox_description",
    "score",
    "score_detailed",
]

MAX_TESTS_FOR_FRACTION = 10  # PRIME: fraction over the first <= 10 tests
_DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB per test (cgroup for the tree; RLIMIT_AS per process)
_DEFAULT_FILE_BYTES = 1 << 20  # 1 MiB per written file, and per captured stream

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TestCase:
  """One test. kind: "stdio" (stdin -> stdout), "call" (fn_name(*input) == output) or "assert"."""
  kind: str
  input: Any = None
  output: Any = None
  fn_name: str | None = None
  statement: str | None = None


def extract_code(response: str | None) -> str | None:
  """Source of the last ```python (or ```py / ```python3) fenced block, or None."""
  if not response:
    return None
  blocks = _CODE_BLOCK.findall(response)
  if not blocks:
    return None
  code = blocks[-1]
  return code if code.strip() else None


def _split_asserts(source: str) -> list[str]:
  stmts, cur = [], []
  for line in source.splitlines():
    if line.startswith("assert") and cur:
      stmts.append("\n".join(cur))
      cur = []
    if line.strip():
      cur.append(line)
  if cur:
    stmts.append("\n".join(cur))
  return stmts


def _assert_case(statement: str, where: str) -> TestCase:
  _assert_plan(statement, where)  # refuses what the parent cannot evaluate, at load time
  return TestCase(kind="assert", statement=statement)


def normalize_tests(tests: Any) -> list[TestCase]:
  """Turns any accepted test format (see module docstring) into a list of `TestCase`.

  Raises ValueError / TypeError naming the offending part: unknown formats, mismatched
  inputs/outputs, and assert-style statements that are not a single `assert` of the supported
  form (so a gold like "5" routed here by mistake is refused instead of passing every program).
  """
  if isinstance(tests, (bytes, bytearray)):
    tests = tests.decode("utf-8")
  if isinstance(tests, str):
    stripped = tests.strip()
    if not stripped:
      raise ValueError("tests: empty string")
    if stripped[0] in "[{":
      try:
        return normalize_tests(json.loads(stripped))
      except json.JSONDecodeError:
        pass
    return [_assert_case(s, f"tests[{k}]") for k, s in enumerate(_split_asserts(stripped))]
  if isinstance(tests, dict):
    if "inputs" not in tests or "outputs" not in tests:
      raise ValueError(f"tests: a dict needs 'inputs' and 'outputs' keys, got keys {sorted(tests)}")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if len(inputs) != len(outputs):
      raise ValueError(f"tests: {len(inputs)} inputs but {len(outputs)} outputs")
    fn_name = tests.get("fn_name")
    if fn_name is not None and not (isinstance(fn_name, str) and fn_name.isidentifier()):
      raise ValueError(f"tests: fn_name must be a Python identifier, got {fn_name!r:.60}")
    kind = "call" if fn_name else "stdio"
    return [TestCase(kind=kind, input=i, output=o, fn_name=fn_name) for i, o in zip(inputs, outputs)]
  if isinstance(tests, (list, tuple)):
    out = []
    for k, t in enumerate(tests):
      if isinstance(t, str):
        out.append(_assert_case(t, f"tests[{k}]"))
      elif isinstance(t, dict) and "input" in t and "output" in t:
        out.append(TestCase(kind="stdio", input=t["input"], output=t["output"]))
      else:
        raise ValueError(f"tests[{k}]: expected an assert string or an {{'input','output'}} dict, "
                         f"got {type(t).__name__}")
    return out
  raise TypeError(f"tests: expected dict, list or str, got {type(tests).__name__}")


# ----------------------------------------------------------------------------- plain data

# Tagged JSON of primitive values: the only thing a sandbox sends back for call/assert tests.
# Every dict is tagged, so a JSON object is always a tag and decoding is unambiguous.
_ENCODER = r'''
def _jaxrl_plain(x, depth=0):
  if depth > 100:
    raise ValueError("nested too deeply")
  t = type(x)
  if x is None or t is bool or t is int or t is str:
    return x
  if t is float:
    return x if x == x and x not in (float("inf"), float("-inf")) else {"__float__": repr(x)}
  if t is list:
    return [_jaxrl_plain(v, depth + 1) for v in x]
  if t is tuple:
    return {"__tuple__": [_jaxrl_plain(v, depth + 1) for v in x]}
  if t is set or t is frozenset:
    return {"__" + t.__name__ + "__": [_jaxrl_plain(v, depth + 1) for v in x]}
  if t is dict:
    return {"__dict__": [[_jaxrl_plain(k, depth + 1), _jaxrl_plain(v, depth + 1)] for k, v in x.items()]}
  if t is bytes:
    return {"__bytes__": x.hex()}
  if t is complex:
    return {"__complex__": [repr(x.real), repr(x.imag)]}
  raise TypeError("not plain data: " + t.__name__)
'''

_MAX_DECODE_DEPTH = 100


def _decode_plain(x: Any, depth: int = 0) -> Any:
  """Inverse of the sandbox's `_jaxrl_plain`; only primitive types come out. ValueError if
  the data is not in that form (whatever a program wrote instead)."""
  if depth > _MAX_DECODE_DEPTH:
    raise ValueError("nested too deeply")
  t = type(x)
  if x is None or t in (bool, int, float, str):
    return x
  if t is list:
    return [_decode_plain(v, depth + 1) for v in x]
  if t is dict and len(x) == 1:
    (tag, v), = x.items()
    if tag == "__float__" and v in ("nan", "inf", "-inf"):
      return float(v)
    if tag == "__bytes__" and type(v) is str:
      return bytes.fromhex(v)
    if tag == "__complex__" and type(v) is list and len(v) == 2 and all(type(p) is str for p in v):
      return complex(float(v[0]), float(v[1]))
    if type(v) is list:
      if tag == "__tuple__":
        return tuple(_decode_plain(e, depth + 1) for e in v)
      if tag in ("__set__", "__frozenset__"):
        items = [_decode_plain(e, depth + 1) for e in v]
        try:
          return set(items) if tag == "__set__" else frozenset(items)
        except TypeError:
          raise ValueError("unhashable set element") from None
      if tag == "__dict__":
        out = {}
        for kv in v:
          if type(kv) is not list or len(kv) != 2:
            raise ValueError("bad dict item")
          try:
            out[_decode_plain(kv[0], depth + 1)] = _decode_plain(kv[1], depth + 1)
          except TypeError:
            raise ValueError("unhashable dict key") from None
        return out
  raise ValueError(f"not plain data: {t.__name__}")


# ----------------------------------------------------------------------------- assert plans

# Names the parent may call on plain data (pure, bounded). Everything else in an assert that
# names something (a function or variable of the program) is evaluated in the sandbox.
_SAFE_CALLS = {
    "abs": abs, "all": all, "any": any, "bool": bool, "dict": dict, "float": float,
    "frozenset": frozenset, "int": int, "isinstance": isinstance, "len": len, "list": list,
    "max": max, "min": min, "repr": repr, "round": round, "set": set, "sorted": sorted, "str": str,
    "sum": sum, "tuple": tuple, "complex": complex, "bytes": bytes,
}
_SAFE_MATH = {"isclose": _pymath.isclose, "fabs": _pymath.fabs, "floor": _pymath.floor,
              "ceil": _pymath.ceil, "sqrt": _pymath.sqrt, "isnan": _pymath.isnan,
              "isinf": _pymath.isinf, "pi": _pymath.pi, "e": _pymath.e, "inf": _pymath.inf}
_SAFE_TYPES = {"int", "float", "str", "bool", "list", "tuple", "dict", "set", "frozenset", "bytes",
               "complex"}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
           ast.BitXor: operator.xor, ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_UNOPS = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos,
          ast.Invert: operator.invert}
_MAX_BUILD = 10_000_000  # largest sequence / int (in bits) the parent builds from program data


class _UnsupportedAssert(ValueError):
  pass


def _is_math_attr(node: ast.AST) -> bool:
  return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id == "math" and node.attr in _SAFE_MATH)


def _is_remote(node: ast.AST) -> bool:
  """A leaf the sandbox evaluates: it names the program's code (a call or a name)."""
  if isinstance(node, ast.Name):
    return node.id not in _SAFE_TYPES and node.id not in ("math",)
  if isinstance(node, ast.Call):
    f = node.func
    if isinstance(f, ast.Name) and f.id in _SAFE_CALLS:
      return False
    return not _is_math_attr(f)
  if isinstance(node, ast.Attribute):
    return not _is_math_attr(node)
  return False


def _assert_plan(statement: str, where: str = "tests") -> tuple[ast.expr, list[str]]:
  """(test expression, sources of its remote leaves in evaluation order) of one assert."""
  if not isinstance(statement, str):
    raise ValueError(f"{where}: an assert-style test must be a string, got {type(statement).__name__}")
  try:
    tree = ast.parse(statement.strip(), mode="exec")
  except SyntaxError as e:
    raise ValueError(f"{where}: not valid Python ({e.msg}): {statement!r:.100}") from None
  if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
    raise ValueError(f"{where}: an assert-style test must be one `assert` statement, got "
                     f"{statement!r:.100}")
  test = tree.body[0].test
  remote: list[str] = []

  def walk(node: ast.AST) -> None:
    if _is_remote(node):
      remote.append(ast.unparse(node))
      return
    if isinstance(node, ast.Constant):
      return
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
      for e in node.elts:
        if isinstance(e, ast.Starred):
          raise _UnsupportedAssert("starred element")
        walk(e)
    elif isinstance(node, ast.Dict):
      for k, v in zip(node.keys, node.values):
        if k is None:
          raise _UnsupportedAssert("** in a dict")
        walk(k)
        walk(v)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
      walk(node.operand)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      walk(node.left)
      walk(node.right)
    elif isinstance(node, ast.BoolOp):
      for v in node.values:
        walk(v)
    elif isinstance(node, ast.Compare):
      walk(node.left)
      for c in node.comparators:
        walk(c)
    elif isinstance(node, ast.IfExp):
      walk(node.test)
      walk(node.body)
      walk(node.orelse)
    elif isinstance(node, ast.Call):  # a safe builtin or math.* (remote calls returned above)
      for a in node.args:
        if isinstance(a, ast.Starred):
          raise _UnsupportedAssert("starred argument")
        walk(a)
      for kw in node.keywords:
        if kw.arg is None:
          raise _UnsupportedAssert("** argument")
        walk(kw.value)
    elif isinstance(node, ast.Subscript):
      walk(node.value)
      walk(node.slice)
    elif isinstance(node, ast.Slice):
      for part in (node.lower, node.upper, node.step):
        if part is not None:
          walk(part)
    elif isinstance(node, ast.Name) or _is_math_attr(node):
      return  # a safe type name or math constant
    else:
      raise _UnsupportedAssert(type(node).__name__)

  try:
    walk(test)
  except _UnsupportedAssert as e:
    raise ValueError(f"{where}: unsupported assert form ({e}); the parent must be able to check it "
                     f"on plain data: write it as `assert f(args) == value` (or another comparison): "
                     f"{statement!r:.100}") from None
  return test, remote


def _bounded_binop(op, a, b):
  """`op(a, b)` on plain data, refusing results too large to build (a program's huge value)."""
  if op is operator.mul:
    for seq, n in ((a, b), (b, a)):
      if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > _MAX_BUILD:
        raise OverflowError("result too large")
  if op in (operator.pow, operator.lshift) and isinstance(a, int) and isinstance(b, int):
    bits = b if op is operator.lshift else abs(b) * max(1, a.bit_length())
    if bits > _MAX_BUILD:
      raise OverflowError("result too large")
  return op(a, b)


def _eval_plan(node: ast.AST, values: list, pos: list[int]) -> Any:
  """Evaluates an assert's test expression here on plain data; remote leaves take `values` in
  order (the order `_assert_plan` listed them)."""
  if _is_remote(node):
    v = values[pos[0]]
    pos[0] += 1
    return v
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, ast.Tuple):
    return tuple(_eval_plan(e, values, pos) for e in node.elts)
  if isinstance(node, ast.List):
    return [_eval_plan(e, values, pos) for e in node.elts]
  if isinstance(node, ast.Set):
    return {_eval_plan(e, values, pos) for e in node.elts}
  if isinstance(node, ast.Dict):
    return {_eval_plan(k, values, pos): _eval_plan(v, values, pos) for k, v in zip(node.keys, node.values)}
  if isinstance(node, ast.UnaryOp):
    return _UNOPS[type(node.op)](_eval_plan(node.operand, values, pos))
  if isinstance(node, ast.BinOp):
    a = _eval_plan(node.left, values, pos)
    return _bounded_binop(_BINOPS[type(node.op)], a, _eval_plan(node.right, values, pos))
  if isinstance(node, ast.BoolOp):  # every operand is evaluated, so remote values stay in order
    vals = [_eval_plan(v, values, pos) for v in node.values]
    out = vals[0]
    for v in vals[1:]:
      if isinstance(node.op, ast.And):
        out = out and v
      else:
        out = out or v
    return out
  if isinstance(node, ast.Compare):
    left = _eval_plan(node.left, values, pos)
    rights = [_eval_plan(c, values, pos) for c in node.comparators]
    ok = True
    for op, right in zip(node.ops, rights):
      ok = ok and bool(_CMPOPS[type(op)](left, right))
      left = right
    return ok
  if isinstance(node, ast.IfExp):
    t, a, b = (_eval_plan(x, values, pos) for x in (node.test, node.body, node.orelse))
    return a if t else b
  if isinstance(node, ast.Call):
    f = _SAFE_MATH[node.func.attr] if _is_math_attr(node.func) else _SAFE_CALLS[node.func.id]
    args = [_eval_plan(a, values, pos) for a in node.args]
    kwargs = {kw.arg: _eval_plan(kw.value, values, pos) for kw in node.keywords}
    if f is isinstance:  # only with builtin types: no class of the program reaches the parent
      types = args[1] if len(args) == 2 and isinstance(args[1], tuple) else args[1:]
      if kwargs or len(args) != 2 or not all(any(t is _SAFE_CALLS[n] for n in _SAFE_TYPES) for t in types):
        raise TypeError("isinstance(value, builtin type) only")
    return f(*args, **kwargs)
  if isinstance(node, ast.Subscript):
    return _eval_plan(node.value, values, pos)[_eval_plan(node.slice, values, pos)]
  if isinstance(node, ast.Slice):
    return slice(*(None if p is None else _eval_plan(p, values, pos)
                   for p in (node.lower, node.upper, node.step)))
  if isinstance(node, ast.Name):
    return _SAFE_CALLS[node.id]  # a type name (int, str, ...) as a value, e.g. isinstance's 2nd arg
  if _is_math_attr(node):
    return _SAFE_MATH[node.attr]
  raise TypeError(type(node).__name__)


def _check_assert(statement: str, values: list) -> bool:
  """The assert's verdict, computed here from the sandbox's values of its remote leaves."""
  test, remote = _assert_plan(statement)
  if len(values) != len(remote):
    return False
  return bool(_eval_plan(test, values, [0]))


# ----------------------------------------------------------------------------- the harness

# Runs inside the sandbox: `python -I -S -B harness.py MODE`. It writes READY on stderr before
# the program runs (so a sandbox that failed to start is told apart from a program that
# failed), then runs the program; for call/assert it sends the values as one line
# "JAXRL_RESULT <json>" on a private copy of stdout (the program's own stdout goes to
# /dev/null) and leaves with os._exit, so nothing the program registered runs afterwards.
READY = b"JAXRL_SANDBOX_READY\n"
_RESULT = b"JAXRL_RESULT "

_HARNESS = _ENCODER + r'''
import sys, os
_eval, _write, _exit, _BaseException = eval, os.write, os._exit, BaseException  # before the program
mode = sys.argv[1]
here = os.path.dirname(os.path.abspath(sys.argv[0]))
import json, runpy
with open(os.path.join(here, "spec.json")) as _f:
  spec = json.load(_f)
solution = os.path.join(here, "solution.py")
if mode == "stdio":
  os.write(2, b"JAXRL_SANDBOX_READY\n")
  runpy.run_path(solution, run_name="__main__")
else:
  _out = os.dup(1)
  _null = os.open(os.devnull, os.O_RDWR)
  os.dup2(_null, 1)
  os.dup2(_null, 0)
  def _emit(obj):
    data = b"\nJAXRL_RESULT " + json.dumps(obj).encode() + b"\n"
    while data:
      data = data[_write(_out, data):]
    _exit(0)
  os.write(2, b"JAXRL_SANDBOX_READY\n")
  try:
    ns = runpy.run_path(solution, run_name="__jaxrl_solution__")
  except BaseException as e:
    _emit({"error": "the program raised " + type(e).__name__})
  results = []
  if mode == "call":
    fn_name = spec["fn_name"]
    try:
      if fn_name in ns and callable(ns[fn_name]):
        fn = ns[fn_name]
      elif "Solution" in ns:
        fn = getattr(ns["Solution"](), fn_name)
      else:
        raise NameError(fn_name)
      args = spec["input"]
      results.append({"value": _jaxrl_plain(fn(*(args if isinstance(args, list) else [args])))})
    except BaseException as e:
      results.append({"error": type(e).__name__})
  else:
    for src in spec["exprs"]:
      try:
        results.append({"value": _jaxrl_plain(_eval(src, ns))})
      except BaseException as e:
        results.append({"error": type(e).__name__})
  _emit({"results": results})
'''

# The previous sandbox's in-process guard, used in "unsafe" mode only (no isolation there, so
# it blocks the obvious process, network and file-removal calls of model mistakes).
_GUARD = r"""
try:
  import builtins, json, os, runpy, sys, threading, random, logging
  import socket as _s, _socket, resource as _r, subprocess as _sp, shutil as _sh
  def _jaxrl_blocked(*a, **k):
    raise PermissionError("disabled in the jaxrl_dense sandbox")
  def _jaxrl_noop(*a, **k):
    return None
  class _NoSocket:
    def __init__(self, *a, **k):
      raise PermissionError("network is disabled in the jaxrl_dense sandbox")
  _s.socket = _socket.socket = _NoSocket
  for _n in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    setattr(_s, _n, _jaxrl_blocked)
  _r.setrlimit = _jaxrl_blocked
  for _n in ("fork", "forkpty", "system", "popen", "kill", "killpg", "putenv", "remove", "unlink",
             "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
             "lchown", "fchmod", "fchown", "setuid", "setgid", "execv", "execve", "execvp", "execvpe",
             "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _n):
      setattr(os, _n, _jaxrl_blocked)
  if hasattr(os, "register_at_fork"):
    os.register_at_fork = _jaxrl_noop
  _sp.Popen = _sp.run = _sp.call = _sp.check_call = _sp.check_output = _jaxrl_blocked
  _sh.rmtree = _sh.move = _sh.chown = _jaxrl_blocked
  del _n
except BaseException as _e:
  import sys as _sys
  _sys.stderr.write("guard set-up failed: %s: %s\n" % (type(_e).__name__, _e))
  _sys.stderr.flush()
  import os as _os
  _os._exit(86)
"""


def harness_source(mode: str) -> str:
  """The harness run inside the sandbox (the unsafe mode adds the in-process guard first)."""
  return (_GUARD + _HARNESS) if mode == "unsafe" else _HARNESS


def sandbox_description(sandbox: str = "auto") -> str:
  """Which sandbox `sandbox=` resolves to here, in words (logs, benchmarks)."""
  return sandbox_lib.describe(sandbox)


# ----------------------------------------------------------------------------- comparisons

_INT = re.compile(r"[+-]?\d+\Z")


def _tokens_match(a: str, b: str) -> bool:
  """One output token: equal strings; integers only exactly; other numbers within 1e-6."""
  if a == b:
    return True
  if _INT.match(a) and _INT.match(b):
    return int(a) == int(b)  # e.g. answers modulo 1e9+7: no tolerance
  if _INT.match(b) and not _INT.match(a):
    try:  # "5.0" for an integer 5 is fine; "1000000000.5" for 1000000000 is not
      fa = float(a)
      return fa.is_integer() and int(fa) == int(b)
    except (ValueError, OverflowError):
      return False
  try:
    fa, fb = float(a), float(b)
  except ValueError:
    return False
  if not (_pymath.isfinite(fa) and _pymath.isfinite(fb)):
    return False
  return _pymath.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-6)


def _outputs_match(got: str, expected: Any) -> bool:
  """APPS-style stdout comparison: per-line rstrip, then token-wise (`_tokens_match`)."""
  if isinstance(expected, (list, tuple)):
    expected = "\n".join(str(e) for e in expected)
  expected = str(expected)
  g = [l.rstrip() for l in got.strip().splitlines()]
  e = [l.rstrip() for l in expected.strip().splitlines()]
  if g == e:
    return True
  gt, et = got.split(), expected.split()
  if len(gt) != len(et) or not gt:
    return False
  return all(_tokens_match(a, b) for a, b in zip(gt, et))


def _lists(x: Any) -> Any:
  """Tuples as lists, recursively (call-based golds are JSON, which has no tuples)."""
  if isinstance(x, (list, tuple)):
    return [_lists(v) for v in x]
  if isinstance(x, dict):
    return {k: _lists(v) for k, v in x.items()}
  return x


def _results_match(got: Any, expected: Any) -> bool:
  got = _lists(got)
  if got == expected:
    return True
  if isinstance(expected, list) and len(expected) == 1 and got == expected[0]:
    return True  # APPS wraps call-based outputs in a list
  return False


# Outcomes of one test run (`run_test_outcomes`); only PASS counts as passed.
PASS = "pass"
WRONG_ANSWER = "wrong_answer"
RUNTIME_ERROR = "runtime_error"
TIMEOUT = "timeout"
HARNESS_ERROR = "harness_error"  # the sandbox itself failed: never the solution's fault
NO_CODE = "no_code"  # the response has no ```python block (score-level reason only)
OUTCOMES = (PASS, WRONG_ANSWER, RUNTIME_ERROR, TIMEOUT, HARNESS_ERROR)


@dataclasses.dataclass(frozen=True)
class CodeScore:
  """A code label with the reason behind it.

  Attributes:
    score: the PRIME code label in [0, 1] (see module docstring).
    reason: PASS if every test passed; otherwise the outcome of the first failed test
      (WRONG_ANSWER, RUNTIME_ERROR, TIMEOUT, HARNESS_ERROR) or NO_CODE.
    detail: for HARNESS_ERROR, why the sandbox failed; else "".
  """
  score: float
  reason: str
  detail: str = ""


def _result_values(stdout: bytes) -> list | None:
  """The decoded values of the harness's last result line, or None (none / malformed)."""
  k = stdout.rfind(b"\n" + _RESULT)
  if k < 0:
    return None
  line = stdout[k + 1 + len(_RESULT):].split(b"\n", 1)[0]
  try:
    obj = json.loads(line)
  except (ValueError, RecursionError):
    return None
  if type(obj) is not dict or "results" not in obj or type(obj["results"]) is not list:
    return None
  out = []
  for r in obj["results"]:
    if type(r) is not dict or "value" not in r:
      out.append(_MISSING)
      continue
    try:
      out.append(_decode_plain(r["value"]))
    except (ValueError, RecursionError, OverflowError):
      out.append(_MISSING)
  return out


_MISSING = object()  # a value the sandbox could not produce (raised, not plain data)


def _run_one(code: str, test: TestCase, timeout_s: float, limits: sandbox_lib.Limits, mode: str,
             python: str) -> tuple[str, str]:
  """Runs one test in a fresh sandbox; returns (outcome, detail) with outcome in OUTCOMES."""
  stdin = b""
  remote: list[str] = []
  if test.kind == "stdio":
    data = test.input if isinstance(test.input, str) else "\n".join(map(str, test.input))
    stdin = data.encode("utf-8")
    spec: dict = {}
  elif test.kind == "call":
    spec = {"fn_name": test.fn_name, "input": test.input}
  elif test.kind == "assert":
    _, remote = _assert_plan(test.statement)
    spec = {"exprs": remote}
  else:
    raise ValueError(f"unknown test kind {test.kind!r}")
  files = {"harness.py": harness_source(mode).encode(), "solution.py": code.encode("utf-8", "replace"),
           "spec.json": json.dumps(spec).encode()}
  res = sandbox_lib.run([python, "-I", "-S", "-B", "@/harness.py", test.kind], files=files, stdin=stdin,
                        timeout_s=timeout_s, limits=limits, mode=mode, python=python)
  if not res.started:
    return HARNESS_ERROR, res.detail
  if not res.stderr.startswith(READY):
    if res.timed_out:
      return TIMEOUT, ""
    return HARNESS_ERROR, res.stderr.decode("utf-8", "replace")[-500:] or f"exit status {res.returncode}"
  if res.timed_out:
    return TIMEOUT, ""
  if res.output_overflow:
    return RUNTIME_ERROR, ""
  if test.kind == "stdio":
    if res.returncode != 0:
      return RUNTIME_ERROR, ""
    got = res.stdout.decode("utf-8", errors="replace")
    return (PASS if _outputs_match(got, test.output) else WRONG_ANSWER), ""
  values = _result_values(res.stdout)
  if values is None or any(v is _MISSING for v in values):
    return RUNTIME_ERROR, ""
  if test.kind == "call":
    if len(values) != 1:
      return RUNTIME_ERROR, ""
    return (PASS if _results_match(values[0], test.output) else WRONG_ANSWER), ""
  try:
    ok = _check_assert(test.statement, values)
  except Exception:  # e.g. comparing values of types the program returned that do not compare
    return WRONG_ANSWER, ""
  return (PASS if ok else WRONG_ANSWER), ""


def run_test_outcomes(code: str, tests: Sequence[TestCase], *, timeout_s: float = 5.0,
                      memory_bytes: int = _DEFAULT_MEMORY_BYTES, file_bytes: int = _DEFAULT_FILE_BYTES,
                      stop_after_first_failure: int | None = None, sandbox: str = "auto",
                      python: str | None = None, nproc: int = 64) -> list[tuple[str, str]]:
  """Runs `code` on each test in its own sandbox; returns (outcome, detail) per test run.

  Args:
    code: Python source of the solution.
    tests: normalised tests (`normalize_tests`).
    timeout_s: wall-clock limit per test, for the whole process tree (CPU rlimit per process:
      ceil(timeout_s) + 1 s).
    memory_bytes: memory of each test's tree (cgroup where writable; RLIMIT_AS per process).
    file_bytes: largest written file, and the cap on captured stdout/stderr.
    stop_after_first_failure: if set, stop running tests with index >= this value once a
      test has failed (their outcome cannot change the score any more).
    sandbox: "auto"/"bwrap" (bubblewrap; raises `sandbox.SandboxUnavailableError` with how to
      install it where unusable) or "unsafe" (the weaker, non-isolating sandbox; warns once).
    python: interpreter that runs the solution (default: this one, `sys.executable`).
    nproc: processes + threads of each test's tree.
  """
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  mode = sandbox_lib.resolve_mode(sandbox)
  python = python or sys.executable
  limits = sandbox_lib.Limits(memory_bytes=memory_bytes, file_bytes=file_bytes, output_bytes=file_bytes,
                              nproc=nproc)
  results: list[tuple[str, str]] = []
  for k, test in enumerate(tests):
    if (stop_after_first_failure is not None and k >= stop_after_first_failure
        and any(o != PASS for o, _ in results)):
      break
    results.append(_run_one(code, test, timeout_s, limits, mode, python))
  return results


def run_tests(code: str, tests: Sequence[TestCase], **kwargs) -> list[bool]:
  """`run_test_outcomes` reduced to pass/fail per test run (same arguments)."""
  return [o == PASS for o, _ in run_test_outcomes(code, tests, **kwargs)]


_HARNESS_ERROR_LOGGED = False


def score_detailed(response: str | None, tests: Any, *, timeout_s: float = 5.0,
                   memory_bytes: int = _DEFAULT_MEMORY_BYTES, file_bytes: int = _DEFAULT_FILE_BYTES,
                   sandbox: str = "auto", python: str | None = None) -> CodeScore:
  """PRIME code label of one response (see module docstring) and why: 1.0 if all tests pass,
  else the fraction of the first min(10, n) tests passed. No ```python block -> 0.0 (NO_CODE).

  A HARNESS_ERROR (the sandbox itself failed) is logged at ERROR level once per process: a
  broken sandbox must never look like wrong answers.

  Args:
    response: decoded response text.
    tests: tests in any accepted format (`normalize_tests`); an empty list raises ValueError.
    timeout_s: wall-clock limit per test (PRIME/APPS: 5 s).
    memory_bytes, file_bytes, sandbox, python: see `run_test_outcomes`.
  """
  global _HARNESS_ERROR_LOGGED
  cases = normalize_tests(tests)
  if not cases:
    raise ValueError("tests: no test cases")
  code = extract_code(response)
  if code is None:
    return CodeScore(0.0, NO_CODE)
  n_frac = min(MAX_TESTS_FOR_FRACTION, len(cases))
  outcomes = run_test_outcomes(code, cases, timeout_s=timeout_s, memory_bytes=memory_bytes,
                               file_bytes=file_bytes, stop_after_first_failure=n_frac,
                               sandbox=sandbox, python=python)
  passed = [o == PASS for o, _ in outcomes]
  if len(passed) == len(cases) and all(passed):
    return CodeScore(1.0, PASS)
  reason, detail = next((o, d) for o, d in outcomes if o != PASS)
  if reason == HARNESS_ERROR and not _HARNESS_ERROR_LOGGED:
    _HARNESS_ERROR_LOGGED = True
    logging.getLogger(__name__).error(
        "jaxrl_dense code sandbox is BROKEN (every program will score 0): %s", detail)
  return CodeScore(sum(passed[:n_frac]) / n_frac, reason, detail)


def score(response: str | None, tests: Any, **kwargs) -> float:
  """PRIME code label of one response: `score_detailed(response, tests, **kwargs).score`."""
  return score_detailed(response, tests, **kwargs).score
