"""Tools a `ToolEnv` can run: a safe calculator (in-process) and Python (in the code sandbox).

A tool is a `Tool(fn, arg_name, description, enforces_timeout)`; `fn(args: str, timeout_s: float)`
returns the output text (str) or a `ToolOutput(text, error)` naming an error kind. `ToolEnv` turns
an exception raised by `fn` into an error observation, runs a tool that does not bound its own
time (`enforces_timeout=False`) on a worker thread it stops waiting for after `timeout_s`, and
truncates long outputs. Tools are built by name from the registry `TOOLS` (`make_tool(name)`).

calculator: `calculator("12*7") == "84"`. A whitelist AST evaluator: int and float literals,
  + - * / // % **, unary + and -, parentheses. No names, calls, attributes, subscripts, strings,
  comparisons or bit operators (`^` is refused with a hint to use `**`). Every int operand and
  result is capped at `CALC_MAX_INT_BITS` bits and an int power whose result would surely exceed it
  is refused before it is computed, so every operation works on numbers of at most 2x the cap (a
  few microseconds): `9**9**9` and `10**10**10` are refused at once. Floats must stay finite; a
  complex result (a negative base to a fractional power) is refused. Errors come back as the
  string "error: ..." (e.g. "error: division by zero"); integers print as ints, floats as `repr`
  with an integral value's ".0" dropped (`6/3` -> "2", `7/2` -> "3.5").

python: runs the call's code as a program in `jaxrl_dense.verifiers.sandbox` (bubblewrap mode,
  resolved with "auto" as the code verifier does: `SandboxUnavailableError` with install hints where
  bubblewrap is unusable; "unsafe" on request), under the env's wall-clock timeout for the whole
  process tree, with memory, process and output limits. Returns stdout; a non-zero exit becomes
  "error: <stderr tail>" (followed by the stdout it printed). Only the standard library is visible
  inside the sandbox (site-packages are hidden).
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import math
import operator
import re
import sys
from typing import Any, Callable, NamedTuple

from jaxrl_dense.registry import Registry

__all__ = ["CALC_MAX_EXPRESSION_CHARS", "CALC_MAX_INT_BITS", "TOOLS", "Tool", "ToolOutput", "calculator",
           "calculator_tool", "make_tool", "python_tool"]

_log = logging.getLogger(__name__)

# Error kinds a tool may report in ToolOutput.error (ToolEnv adds "unknown_tool" and "parse").
TIMEOUT, EXCEPTION, OUTPUT_LIMIT, SANDBOX = "timeout", "exception", "output_limit", "sandbox"


class ToolOutput(NamedTuple):
  """A tool's answer: the text, and the error kind (None when the call succeeded)."""
  text: str
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class Tool:
  """A tool the model can call as `<tool>NAME: ARGS</tool>`.

  Attributes:
    fn: (args, timeout_s) -> str | ToolOutput. `args` is the call's text after "NAME:".
    arg_name: the key of `args` in the parsed call's arguments dict (e.g. "expression").
    description: one line for the system prompt.
    enforces_timeout: True when `fn` bounds its own wall-clock time by `timeout_s` (the python tool:
      the sandbox kills the process tree); otherwise `ToolEnv` runs it on a worker thread and stops
      waiting after `timeout_s` (a runaway thread cannot be killed: give such tools hard caps of
      their own, as the calculator has).
  """
  fn: Callable[[str, float], "str | ToolOutput"]
  arg_name: str = "input"
  description: str = ""
  enforces_timeout: bool = False

  def __post_init__(self):
    if not callable(self.fn):
      raise ValueError(f"Tool.fn must be callable, got {self.fn!r}")
    if not isinstance(self.arg_name, str) or not self.arg_name:
      raise ValueError(f"Tool.arg_name must be a non-empty string, got {self.arg_name!r}")


# ----------------------------------------------------------------------------- calculator

CALC_MAX_EXPRESSION_CHARS = 1000
CALC_MAX_INT_BITS = 4096  # |int| < 2**4096 (~1233 digits) for every operand and result


class CalculatorError(ValueError):
  """The expression is refused or cannot be evaluated (the message is shown to the model)."""


def _checked(v: Any) -> int | float:
  if isinstance(v, complex):
    raise CalculatorError("complex results are not supported")
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise CalculatorError(f"only numbers are allowed, got {type(v).__name__}")
  if isinstance(v, int) and v.bit_length() > CALC_MAX_INT_BITS:
    raise CalculatorError(f"number too large (over {CALC_MAX_INT_BITS} bits)")
  if isinstance(v, float) and not math.isfinite(v):
    raise CalculatorError("result is not finite")
  return v


def _pow(a: int | float, b: int | float) -> int | float:
  if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
    # |a|**b >= 2**((bit_length(a) - 1) * b): refuse before computing what would surely exceed the cap
    # (whatever passes this is at most 2 * CALC_MAX_INT_BITS bits, then checked exactly).
    if (abs(a).bit_length() - 1) * b > CALC_MAX_INT_BITS:
      raise CalculatorError(f"number too large (over {CALC_MAX_INT_BITS} bits)")
  return operator.pow(a, b)  # float and negative-exponent powers: C double pow (OverflowError at most)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval(node: ast.AST) -> int | float:
  if isinstance(node, ast.Constant):
    return _checked(node.value)
  if isinstance(node, ast.BinOp):
    op = _BINOPS.get(type(node.op))
    if op is None:
      hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
      raise CalculatorError(f"operator {type(node.op).__name__} is not allowed{hint}")
    return _checked(op(_eval(node.left), _eval(node.right)))
  if isinstance(node, ast.UnaryOp):
    op = _UNARY.get(type(node.op))
    if op is None:
      raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
    return _checked(op(_eval(node.operand)))
  if isinstance(node, ast.Name):
    raise CalculatorError(f"names are not allowed ({node.id!r})")
  if isinstance(node, ast.Call):
    raise CalculatorError("function calls are not allowed")
  if isinstance(node, ast.Attribute):
    raise CalculatorError("attributes are not allowed")
  raise CalculatorError(f"{type(node).__name__} is not allowed (numbers and + - * / // % ** only)")


def calculate(expression: str) -> int | float:
  """The value of an arithmetic expression; raises CalculatorError (or ZeroDivisionError,
  OverflowError) for what `calculator` reports as an error."""
  if not isinstance(expression, str):
    raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
  if len(expression) > CALC_MAX_EXPRESSION_CHARS:
    raise CalculatorError(f"expression too long (over {CALC_MAX_EXPRESSION_CHARS} characters)")
  if not expression.strip():
    raise CalculatorError("empty expression")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError) as e:  # ValueError: e.g. null bytes
    raise CalculatorError(f"invalid expression ({getattr(e, 'msg', e)})") from None
  return _eval(tree.body)


def format_number(v: int | float) -> str:
  """An int as digits; a float as repr, with an integral value's '.0' dropped (below 1e16)."""
  if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
    return str(int(v))
  return repr(v) if isinstance(v, float) else str(v)


def calculator(expression: str) -> str:
  """The calculator tool: `calculator("12*7") == "84"`, `calculator("1/0") == "error: division by
  zero"`. Never raises; see the module docstring for what is accepted."""
  return _calculator(expression).text


def _calculator(expression: str) -> ToolOutput:
  try:
    return ToolOutput(format_number(calculate(expression)))
  except ZeroDivisionError:
    return ToolOutput("error: division by zero", EXCEPTION)
  except OverflowError:
    return ToolOutput("error: overflow", EXCEPTION)
  except RecursionError:
    return ToolOutput("error: expression nested too deeply", EXCEPTION)
  except CalculatorError as e:
    return ToolOutput(f"error: {e}", EXCEPTION)
  except Exception as e:  # e.g. TypeError from an unexpected operand mix: reported, never raised
    return ToolOutput(f"error: {type(e).__name__}", EXCEPTION)


def calculator_tool() -> Tool:
  """The calculator as a `Tool` (arguments {"expression": ARGS}); in-process, bounded by its caps
  and guarded by ToolEnv's worker-thread timeout."""
  return Tool(fn=lambda args, timeout_s: _calculator(args), arg_name="expression",
              description="calculator: evaluates an arithmetic expression (+ - * / // % ** and "
                          "parentheses), e.g. <tool>calculator: (12+3)*7</tool>")


# ----------------------------------------------------------------------------- python

_FENCE = re.compile(r"\A```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)\n?```\s*\Z", re.DOTALL | re.IGNORECASE)
_STDERR_TAIL_CHARS = 300


def _stderr_tail(err: bytes) -> str:
  text = err.decode("utf-8", "replace").rstrip()
  if len(text) > _STDERR_TAIL_CHARS:
    text = text[-_STDERR_TAIL_CHARS:]
    nl = text.find("\n")
    text = text[nl + 1:] if 0 <= nl < len(text) - 1 else text  # start at a line
  return text


def python_tool(*, sandbox: str = "auto", memory_bytes: int = 512 << 20, output_bytes: int = 64 << 10,
                nproc: int = 32, python: str | None = None) -> Tool:
  """Python in the code sandbox as a `Tool` (arguments {"code": ARGS}).

  Args:
    sandbox: "auto"/"bwrap" (bubblewrap; raises `sandbox.SandboxUnavailableError` here, at build
      time, where it is unusable) or "unsafe" (no isolation; warns once).
    memory_bytes: memory of the program's process tree (cgroup; RLIMIT_AS per process).
    output_bytes: stdout / stderr each; past it the program is killed (error "output_limit", the
      output so far is returned, truncated).
    nproc: processes + threads of the tree.
    python: the interpreter (default: this one).
  """
  from jaxrl_dense.verifiers import sandbox as sandbox_lib  # the verifiers package only when used

  mode = sandbox_lib.resolve_mode(sandbox)
  limits = sandbox_lib.Limits(memory_bytes=memory_bytes, output_bytes=output_bytes, nproc=nproc)
  python = python or sys.executable
  logged = []

  def run_python(code: str, timeout_s: float) -> ToolOutput:
    m = _FENCE.match(code.strip())
    if m:  # <tool>python: ```python ... ```</tool>
      code = m.group(1)
    res = sandbox_lib.run([python, "-I", "-S", "-B", "@/main.py"],
                          files={"main.py": code.encode("utf-8", "replace")}, timeout_s=timeout_s,
                          limits=limits, mode=mode, python=python)
    if not res.started:  # never the model's fault: loud, and a kind of its own
      if not logged:
        logged.append(True)
        _log.error("jaxrl_dense python tool: the sandbox could not start: %s", res.detail)
      return ToolOutput("error: the sandbox could not start", SANDBOX)
    out = res.stdout.decode("utf-8", "replace").rstrip("\n")
    if res.timed_out:
      return ToolOutput(f"error: timed out after {timeout_s:g} s", TIMEOUT)
    if res.output_overflow:
      return ToolOutput(out, OUTPUT_LIMIT)
    if res.returncode != 0:
      tail = _stderr_tail(res.stderr) or f"exit status {res.returncode}"
      return ToolOutput(f"error: {tail}" + (f"\nstdout:\n{out}" if out else ""), EXCEPTION)
    return ToolOutput(out)

  return Tool(fn=run_python, arg_name="code", enforces_timeout=True,
              description="python: runs a Python program (standard library only) and returns what it "
                          "prints, e.g. <tool>python: print(sum(range(10)))</tool>")


# ----------------------------------------------------------------------------- registry

TOOLS = Registry("tool")
TOOLS.register("calculator", calculator_tool)
TOOLS.register("python", python_tool)


def make_tool(name: str, **kwargs) -> Tool:
  """The tool registered as `name` (`TOOLS.names()`), built with `kwargs` (e.g. sandbox="unsafe"
  for python)."""
  return TOOLS.get(name)(**kwargs)
