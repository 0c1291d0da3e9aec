"""The environment protocol of multi-turn rollouts: what a sampler needs from an environment.

A multi-turn episode alternates model turns and observations:

    obs = env.reset(record)            # '' for none; else appended to the prompt as observation tokens
    while True:
      action = <decode the model's next turn, stopping right after any of env.stop_strings>
      result = env.step(action)        # StepResult(observation, reward, done, info)
      if result.done: break
      <append result.observation to the context as observation tokens (mask 0)>

Everything here is host-side Python (no JAX): the sampler decodes, the environment answers with
text. Turn-level credit on the resulting `[B, T]` response (MatchTIR, IGPO) lives in
`jaxrl_dense.rewards.turn_level`, which reads turns from the assistant/observation mask.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["Environment", "StepResult"]


class StepResult(NamedTuple):
  """What one environment step returns.

  Attributes:
    observation: text appended to the context as observation tokens ('' = none). When `done` is
      True it is '' (nothing more is appended).
    reward: per-turn environment reward (0.0 for tool environments: the verifier scores the
      outcome).
    done: the episode ended (final answer given, or turn cap reached).
    info: plain data about the step, e.g. for `ToolEnv`: {"tool": "calculator", "call":
      {"name": ..., "arguments": {...}}, "error": None | "timeout" | "exception" |
      "output_limit" | "unknown_tool" | "parse" | "sandbox", "truncated": bool, "turn": int,
      "elapsed_s": float}.
  """
  observation: str
  reward: float
  done: bool
  info: dict


@runtime_checkable
class Environment(Protocol):
  """A multi-turn environment (one instance per episode; not thread-safe).

  Attributes:
    stop_strings: generation of a turn stops right after any of these strings (the string is
      part of the action handed to `step`).
  """
  stop_strings: tuple[str, ...]

  def reset(self, record: Any) -> str:
    """Starts an episode for `record` (a `jaxrl_dense.data.prompts.PromptRecord`); returns the
    first observation ('' for none)."""
    ...

  def step(self, action: str) -> StepResult:
    """`action`: the decoded text of the model's latest turn; returns the environment's answer."""
    ...
