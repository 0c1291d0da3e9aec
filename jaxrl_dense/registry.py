"""A tiny string -> function registry, so experiment flags can select functions.

Registration lives next to the package exports (``advantages/__init__.py`` etc.), never inside the
math: a new method is one module plus one ``REGISTRY.register("name", fn)`` line.

    >>> reg = Registry("advantage estimator")
    >>> reg.register("grpo", grpo_advantages, density="sequence")
    >>> reg.get("grpo")            # -> grpo_advantages
    >>> reg.get("nope")            # UnknownNameError: unknown advantage estimator 'nope'; known: grpo
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple


class UnknownNameError(KeyError, ValueError):
  """Raised for a name that is not registered; the message lists the known names."""

  def __str__(self) -> str:  # KeyError would repr() the message.
    return str(self.args[0]) if self.args else ""


class Registry:
  """Maps names (flag strings) to callables, with optional metadata per entry."""

  def __init__(self, kind: str):
    self._kind = kind
    self._fns: Dict[str, Callable[..., Any]] = {}
    self._meta: Dict[str, Dict[str, Any]] = {}

  @property
  def kind(self) -> str:
    return self._kind

  def register(self, name: str, fn: Optional[Callable[..., Any]] = None, **meta: Any):
    """Registers ``fn`` under ``name``; usable directly or as a decorator (``fn`` omitted).

    Raises ValueError when ``name`` is already taken by a different function.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self._kind} name must be a non-empty string, got {name!r}")

    def _do(f: Callable[..., Any]) -> Callable[..., Any]:
      if not callable(f):
        raise ValueError(f"{self._kind} {name!r}: registered object {f!r} is not callable")
      if name in self._fns and self._fns[name] is not f:
        raise ValueError(f"{self._kind} {name!r} is already registered (to {self._fns[name]!r})")
      self._fns[name] = f
      self._meta[name] = dict(meta)
      return f

    return _do if fn is None else _do(fn)

  def get(self, name: str) -> Callable[..., Any]:
    """Returns the callable registered under ``name``; UnknownNameError lists the known names."""
    try:
      return self._fns[name]
    except (KeyError, TypeError):
      raise UnknownNameError(
          f"unknown {self._kind} {name!r}; known: {', '.join(self.names())}") from None

  def info(self, name: str) -> Dict[str, Any]:
    """Metadata given at registration (e.g. ``density="token"``)."""
    self.get(name)
    return dict(self._meta[name])

  def names(self) -> Tuple[str, ...]:
    return tuple(sorted(self._fns))

  def __contains__(self, name: object) -> bool:
    return name in self._fns

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._fns)

  def __repr__(self) -> str:
    return f"Registry({self._kind!r}, names={list(self.names())})"
