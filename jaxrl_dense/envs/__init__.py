"""Environments for multi-turn rollouts: the protocol and a tool-calling environment (host-side Python).

Protocol (`base`): an `Environment` has `stop_strings` (a turn's generation stops right after any
of them), `reset(record) -> str` (the first observation, '' for none) and `step(action) ->
StepResult(observation, reward, done, info)`, where `action` is the decoded text of the model's
latest turn and `observation` is appended to the context as observation tokens.

Tool calls (`tool_env`, `tools`): the model writes

    <tool>NAME: ARGS</tool>            e.g.  <tool>calculator: 12*7</tool>

(`ToolEnv.stop_strings == ("</tool>",)`) and the environment appends

    \\n<result>OUTPUT</result>\\n        or   \\n<result>error: ...</result>\\n

A turn without a tool call ends the episode (done=True, observation ''), and so does turn
`max_turns`. Arguments: calculator {"expression": ARGS}, python {"code": ARGS}. Tools: `calculator`
(a capped, whitelist AST evaluator, in-process) and `python` (the code verifier's bubblewrap
sandbox). Every call runs under a wall-clock timeout, its output is cut to `max_observation_chars`
with a visible marker, and a tool's exception becomes an error observation; `ToolEnv.stats` counts
calls, errors by kind and truncations. `make_env("tool:calculator,python")` returns a factory of
fresh environments. Details: docs/environments.md.
"""
from jaxrl_dense.envs.base import Environment, StepResult
from jaxrl_dense.envs.tool_env import (DEFAULT_ARG_NAMES, ERROR_KINDS, TOOL_FORMAT_INSTRUCTION, TRUNCATION_MARKER,
                                       ToolEnv, make_env, parse_tool_call, summarize_stats, tool_calls)
from jaxrl_dense.envs.tools import TOOLS, Tool, ToolOutput, calculator, make_tool, python_tool

__all__ = [
    "DEFAULT_ARG_NAMES", "ERROR_KINDS", "Environment", "StepResult", "TOOLS", "TOOL_FORMAT_INSTRUCTION",
    "TRUNCATION_MARKER", "Tool", "ToolEnv", "ToolOutput", "calculator", "make_env", "make_tool",
    "parse_tool_call", "python_tool", "summarize_stats", "tool_calls",
]
