"""Renamed keyword arguments and attributes, kept for one release as deprecated aliases.

    @renamed_kwargs(variant="reference_impl")
    def f(x, *, reference_impl="verl"): ...

    f(x, variant="original")     # works, warns DeprecationWarning naming `reference_impl`

    class Batch(NamedTuple):
      outcome: Array
      acc = renamed_attribute("outcome")   # batch.acc reads batch.outcome, with the warning

Giving both the old and the new name raises TypeError, as a duplicated argument does.
"""
from __future__ import annotations

import functools
import warnings


def renamed_kwargs(**old_to_new: str):
  """Decorator: each keyword `old` is accepted as `new` with a DeprecationWarning."""

  def wrap(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
      for old, new in old_to_new.items():
        if old in kwargs:
          if new in kwargs:
            raise TypeError(f"{fn.__qualname__}() got both {old!r} and its new name {new!r}")
          warnings.warn(f"{fn.__qualname__}(): keyword {old!r} is renamed {new!r}; the old name is "
                        "removed in the next release.", DeprecationWarning, stacklevel=2)
          kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    inner.renamed_kwargs = dict(old_to_new)
    return inner

  return wrap


def renamed_attribute(new: str):
  """A read-only property that returns attribute `new` with a DeprecationWarning (the old name of a
  renamed dataclass / NamedTuple field)."""

  class _Alias:
    owner, old = "", ""  # set by __set_name__ (which a NamedTuple's class body skips; looked up then)

    def __set_name__(self, owner, name):
      self.owner, self.old = owner.__name__, name

    def __get__(self, obj, objtype=None):
      if obj is None:
        return self
      where = f"{self.owner or type(obj).__name__}."
      old = self.old or next((k for k, v in vars(type(obj)).items() if v is self), "?")
      warnings.warn(f"{where}{old} is renamed {where}{new}; the old name is "
                    "removed in the next release.", DeprecationWarning, stacklevel=2)
      return getattr(obj, new)

  return _Alias()
