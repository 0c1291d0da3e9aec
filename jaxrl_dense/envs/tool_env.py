"""A tool-calling environment for multi-turn rollouts (`ToolEnv`), the call format and its parser.

Call format. The model calls a tool by writing

    <tool>NAME: ARGS</tool>          e.g.  <tool>calculator: 12*7</tool>

and generation of the turn stops right after "</tool>" (`ToolEnv.stop_strings`). NAME is an
identifier (letters, digits, `_`, `.`, `-`; whitespace around it is ignored); ARGS is everything
after the first ":" up to "</tool>", stripped (a multi-line ARGS loses its leading blank lines and
common indentation, so indented code works). The parsed call is `{"name": NAME, "arguments":
{ARG_NAME: ARGS}}` with ARG_NAME the tool's (`"expression"` for calculator, `"code"` for python,
`"input"` for a name no tool claims) -- the dict `rewards.turn_level.tool_call_similarity`
(MatchTIR) compares. A call is complete once closed: `<tool>calculator: 1+2` has no call. A
"<tool>" inside an open call starts a new one (the earlier opener is text), so in
`<tool>a: x <tool>calculator: 1</tool>` the call is `calculator: 1`.

The environment answers a call with the observation

    \\n<result>OUTPUT</result>\\n        or   \\n<result>error: ...</result>\\n

Episode. `reset(record)` returns '' (the tool instructions belong in the prompt:
`TOOL_FORMAT_INSTRUCTION`, or `ToolEnv.instruction` which also lists the tools). Each `step(action)`
is one model turn:
  * no complete tool call in the turn -> the episode ends (done=True, observation ''): the turn is
    the final answer, which the verifier scores;
  * otherwise the LAST complete block of the turn is executed: a malformed block (no "NAME:") is
    error "parse", an unknown NAME error "unknown_tool", else the tool runs under `timeout_s`
    (error "timeout"; an exception inside the tool becomes error "exception", never propagates;
    the python tool also reports "output_limit" and "sandbox"); its output is cut to
    `max_observation_chars` with the visible marker `TRUNCATION_MARKER` (info["truncated"]);
  * turn `max_turns` ends the episode whatever it holds: a call there is parsed (info) but not
    run, since its result could never be read (done=True, observation '', info["capped"]).
Rewards are 0.0 (the verifier scores the outcome). `env.stats` counts episodes, turns, calls,
capped calls, truncated outputs, errors by kind and tool time (`summarize_stats` sums and flattens
them for a trainer's log).
"""
from __future__ import annotations

import math
import re
import textwrap
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from jaxrl_dense.envs.base import Environment, StepResult
from jaxrl_dense.envs.tools import (EXCEPTION, OUTPUT_LIMIT, SANDBOX, TIMEOUT, TOOLS, Tool, ToolOutput,
                                    make_tool)

__all__ = ["DEFAULT_ARG_NAMES", "ERROR_KINDS", "TOOL_FORMAT_INSTRUCTION", "TRUNCATION_MARKER", "ToolEnv",
           "make_env", "parse_tool_call", "summarize_stats", "tool_calls"]

CALL_OPEN, CALL_CLOSE = "<tool>", "</tool>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
TRUNCATION_MARKER = "...[truncated]"
UNKNOWN_TOOL, PARSE = "unknown_tool", "parse"
ERROR_KINDS = (TIMEOUT, EXCEPTION, OUTPUT_LIMIT, UNKNOWN_TOOL, PARSE, SANDBOX)
DEFAULT_ARG_NAMES = {"calculator": "expression", "python": "code"}

TOOL_FORMAT_INSTRUCTION = (
    "To use a tool, write <tool>NAME: ARGS</tool>, for example <tool>calculator: 12*7</tool>; its output "
    "comes back as <result>OUTPUT</result>. Call at most one tool per turn, and give your final answer "
    "in a turn without a tool call.")

# A complete block: "<tool>", then text without another "<tool>", then "</tool>".
_BLOCK = re.compile(r"<tool>((?:(?!<tool>).)*?)</tool>", re.DOTALL)
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*:(.*)\Z", re.DOTALL)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


# ----------------------------------------------------------------------------- parsing

def _clean_args(raw: str) -> str:
  lines = raw.lstrip(" \t").split("\n")
  while lines and not lines[0].strip():
    lines.pop(0)
  return textwrap.dedent("\n".join(lines)).strip()


def _parse_block(block: str, arg_names: Mapping[str, str]) -> dict | None:
  m = _NAME.match(block)
  if m is None:
    return None
  name = m.group(1)
  arg = arg_names.get(name) or arg_names.get(name.lower()) or "input"
  return {"name": name, "arguments": {arg: _clean_args(m.group(2))}}


def tool_calls(text: str, arg_names: Mapping[str, str] | None = None) -> list[dict]:
  """Every complete, well-formed call in `text`, in order: [{"name": str, "arguments": {...}}]
  (for MatchTIR matching). `arg_names`: tool name -> argument key (default `DEFAULT_ARG_NAMES`;
  "input" for names it lacks)."""
  names = DEFAULT_ARG_NAMES if arg_names is None else arg_names
  calls = (_parse_block(m.group(1), names) for m in _BLOCK.finditer(text))
  return [c for c in calls if c is not None]


def parse_tool_call(text: str, arg_names: Mapping[str, str] | None = None) -> dict | None:
  """The LAST complete, well-formed call in `text` ({"name": str, "arguments": {...}}), or None."""
  calls = tool_calls(text, arg_names)
  return calls[-1] if calls else None


def _last_block(text: str) -> str | None:
  last = None
  for m in _BLOCK.finditer(text):
    last = m.group(1)
  return last


def _truncate(text: str, limit: int, force: bool = False) -> tuple[str, bool]:
  """`text` cut to at most `limit` characters ending in TRUNCATION_MARKER when it is longer (or
  `force`: output the tool itself cut off)."""
  if len(text) <= limit and not force:
    return text, False
  if force and len(text) + len(TRUNCATION_MARKER) <= limit:
    return text + TRUNCATION_MARKER, True
  return text[:limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER, True


# ----------------------------------------------------------------------------- the environment

def _run_guarded(fn: Callable[[str, float], Any], args: str, timeout_s: float) -> Any:
  """fn(args, timeout_s) on a daemon thread; a ToolOutput timeout error if it is not done in time."""
  box: dict[str, Any] = {}

  def target():
    try:
      box["out"] = fn(args, timeout_s)
    except BaseException as e:  # noqa: BLE001 -- reported as an observation, never propagated
      box["exc"] = e

  t = threading.Thread(target=target, name="jaxrl-tool", daemon=True)
  t.start()
  t.join(timeout_s)
  if t.is_alive():
    return ToolOutput(f"error: timed out after {timeout_s:g} s", TIMEOUT)
  if "exc" in box:
    raise box["exc"]
  return box.get("out")


class ToolEnv:
  """A tool-calling `Environment` (see the module docstring for the format and the episode).

  Args:
    tools: name -> `Tool` (default: the calculator alone). Names are matched exactly, then
      lower-cased.
    max_turns: model turns per episode (>= 1); turn `max_turns` ends the episode.
    max_observation_chars: longest tool output inside <result>...</result> (>= 32), the marker
      included.
    timeout_s: wall-clock limit of every tool call.
  """
  stop_strings: tuple[str, ...] = (CALL_CLOSE,)

  def __init__(self, tools: Mapping[str, Tool] | None = None, *, max_turns: int = 4,
               max_observation_chars: int = 512, timeout_s: float = 2.0):
    if tools is None:
      tools = {"calculator": make_tool("calculator")}
    if not isinstance(tools, Mapping) or not tools:
      raise ValueError(f"ToolEnv: tools must be a non-empty mapping name -> Tool, got {tools!r}")
    for name, tool in tools.items():
      if not isinstance(name, str) or _IDENT.match(name) is None:
        raise ValueError(f"ToolEnv: tool name {name!r} is not an identifier (letters, digits, _ . -)")
      if not isinstance(tool, Tool):
        raise ValueError(f"ToolEnv: tools[{name!r}] must be a Tool, got {type(tool).__name__}")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
      raise ValueError(f"ToolEnv: max_turns must be an int >= 1, got {max_turns!r}")
    if (isinstance(max_observation_chars, bool) or not isinstance(max_observation_chars, int)
        or max_observation_chars < 32):
      raise ValueError(f"ToolEnv: max_observation_chars must be an int >= 32, got {max_observation_chars!r}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
      raise ValueError(f"ToolEnv: timeout_s must be a finite number > 0, got {timeout_s!r}")
    self.tools = dict(tools)
    self.max_turns = max_turns
    self.max_observation_chars = max_observation_chars
    self.timeout_s = float(timeout_s)
    self._arg_names = {name: tool.arg_name for name, tool in self.tools.items()}
    self.stats: dict[str, Any] = {"episodes": 0, "turns": 0, "calls": 0, "capped": 0, "truncated": 0,
                                  "tool_time_s": 0.0, "errors": {k: 0 for k in ERROR_KINDS}}
    self.record = None
    self.turn = 0
    self._done = True

  @property
  def instruction(self) -> str:
    """TOOL_FORMAT_INSTRUCTION followed by the tools' one-line descriptions (for the system prompt)."""
    lines = [t.description or name for name, t in self.tools.items()]
    return TOOL_FORMAT_INSTRUCTION + " Tools:\n" + "\n".join(f"- {l}" for l in lines)

  def reset(self, record: Any) -> str:
    """Starts an episode for `record`; the first observation is '' (instructions are in the prompt)."""
    self.record = record
    self.turn = 0
    self._done = False
    self.stats["episodes"] += 1
    return ""

  def step(self, action: str) -> StepResult:
    """One model turn (its decoded text); see the module docstring."""
    if self._done:
      raise RuntimeError("ToolEnv.step: no episode in progress (call reset(record) first; the last "
                         "episode may have ended)")
    if not isinstance(action, str):
      raise TypeError(f"ToolEnv.step: action must be the decoded turn (str), got {type(action).__name__}")
    self.turn += 1
    self.stats["turns"] += 1
    info: dict[str, Any] = {"tool": None, "call": None, "error": None, "truncated": False, "turn": self.turn,
                            "elapsed_s": 0.0}
    block = _last_block(action)
    if block is None:  # the final answer
      return self._end(info)
    call = _parse_block(block, self._arg_names)
    if call is not None:
      info["tool"], info["call"] = call["name"], call
    if self.turn >= self.max_turns:  # its result could never be read
      info["capped"] = True
      self.stats["capped"] += 1
      return self._end(info)
    t0 = time.monotonic()
    if call is None:
      out = ToolOutput(f"error: could not parse the tool call; write {CALL_OPEN}NAME: ARGS{CALL_CLOSE}", PARSE)
    else:
      name = call["name"]
      key = name if name in self.tools else name.lower()
      tool = self.tools.get(key)
      if tool is None:
        out = ToolOutput(f"error: unknown tool {name!r}; available: {', '.join(self.tools)}", UNKNOWN_TOOL)
      else:
        info["tool"] = key
        out = self._call(tool, call["arguments"][tool.arg_name])
    info["elapsed_s"] = time.monotonic() - t0
    text, truncated = _truncate(out.text, self.max_observation_chars, force=out.error == OUTPUT_LIMIT)
    info["error"], info["truncated"] = out.error, truncated
    self.stats["calls"] += 1
    self.stats["truncated"] += int(truncated)
    self.stats["tool_time_s"] += info["elapsed_s"]
    if out.error is not None:
      self.stats["errors"][out.error] = self.stats["errors"].get(out.error, 0) + 1
    return StepResult(f"\n{RESULT_OPEN}{text}{RESULT_CLOSE}\n", 0.0, False, info)

  def _end(self, info: dict) -> StepResult:
    self._done = True
    return StepResult("", 0.0, True, info)

  def _call(self, tool: Tool, args: str) -> ToolOutput:
    """Runs one tool call: under the timeout, exceptions turned into error outputs."""
    try:
      if tool.enforces_timeout:
        out = tool.fn(args, self.timeout_s)
      else:
        out = _run_guarded(tool.fn, args, self.timeout_s)
    except BaseException as e:  # noqa: BLE001 -- a tool's failure is an observation, never the trainer's
      if isinstance(e, KeyboardInterrupt):
        raise
      return ToolOutput(f"error: {type(e).__name__}: {e}", EXCEPTION)
    if isinstance(out, str):
      return ToolOutput(out)
    if isinstance(out, ToolOutput) and isinstance(out.text, str):
      return out
    return ToolOutput(f"error: the tool returned {type(out).__name__}, not text", EXCEPTION)


def summarize_stats(stats: Mapping[str, Any] | Iterable[Mapping[str, Any]], prefix: str = "env/") -> dict:
  """`ToolEnv.stats` of one env or summed over several, flattened for a metrics log:
  {"env/calls": ..., "env/errors/timeout": ..., ...}."""
  items = [stats] if isinstance(stats, Mapping) else list(stats)
  out: dict[str, float] = {}
  for s in items:
    for k, v in s.items():
      if isinstance(v, Mapping):
        for kk, vv in v.items():
          out[f"{prefix}{k}/{kk}"] = out.get(f"{prefix}{k}/{kk}", 0) + vv
      else:
        out[f"{prefix}{k}"] = out.get(f"{prefix}{k}", 0) + v
  return out


def make_env(spec: str, *, sandbox: str = "auto", **env_kwargs) -> Callable[[], Environment]:
  """A factory of fresh environments for `spec` (one per episode).

  Args:
    spec: "tool:NAME[,NAME...]" with NAME in `TOOLS.names()`, e.g. "tool:calculator",
      "tool:calculator,python".
    sandbox: the python tool's sandbox mode ("auto" raises `SandboxUnavailableError` here when
      bubblewrap is unusable; "unsafe" runs without isolation).
    **env_kwargs: ToolEnv's max_turns, max_observation_chars, timeout_s (checked here).

  Raises:
    ValueError naming `spec` when it is not of that form.
  """
  kind, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
  if kind.strip() != "tool" or not sep:
    raise ValueError(f"unknown environment spec {spec!r}; expected 'tool:NAME[,NAME...]' with NAME in "
                     f"{', '.join(TOOLS.names())}, e.g. 'tool:calculator'")
  names = [n.strip() for n in rest.split(",")]
  for n in names:
    if n not in TOOLS:
      raise ValueError(f"environment spec {spec!r}: unknown tool {n!r}; known: {', '.join(TOOLS.names())}")
  if len(set(names)) != len(names):
    raise ValueError(f"environment spec {spec!r}: a tool is named twice")
  tools = {n: make_tool(n, sandbox=sandbox) if n == "python" else make_tool(n) for n in names}
  ToolEnv(tools, **env_kwargs)  # check the arguments now, not in the first rollout

  def factory() -> Environment:
    return ToolEnv(tools, **env_kwargs)

  factory.__name__ = factory.__qualname__ = f"make_env({spec!r})"
  return factory
