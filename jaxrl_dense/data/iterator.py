"""Seeded, checkpointable prompt iterator (epoch shuffling; state = plain JSON ints).

Public API
----------
`PromptIterator(records, *, seed, shuffle=True, num_epochs=None)`
    `next()` / `next_batch(k) -> list` of records; `get_state() -> dict` and `set_state(dict)`;
    `epoch` (0-based epoch of the next record), `position` (records consumed so far).
    `num_epochs=None` cycles forever; otherwise `StopIteration` after the last epoch
    (`next_batch` then returns the remaining records, then raises).

State: `{"next_index": int, "seed": int, "num_records": int, "shuffle": int}` — all plain ints,
so it goes into the checkpoint's JSON item as is. `set_state` checks that seed, dataset size
and shuffle flag match this iterator and raises a ValueError naming the mismatch otherwise
(restoring the state of a different data pipeline would silently change the run).

Why grain's MapDataset, used by index: `grain.MapDataset.source(records).shuffle(seed).repeat()`
gives a random-access view whose element i is a pure function of (seed, i) — each epoch is
reshuffled with a seed derived from the epoch number (grain's index shuffle). So the whole
iterator state is one integer, `next_index`, and resuming is exact by construction. We read
`ds[i]` directly instead of grain's `DatasetIterator`: its `get_state()` is the same
`{"next_index": i}`, but the iterator adds threads/prefetch we do not need for a few hundred
prompts per step, and direct indexing keeps `next_batch(k)` for any k (the PRIME loop oversamples
and may draw a variable number of prompts).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import grain

_STATE_KEYS = ("next_index", "seed", "num_records", "shuffle")


class PromptIterator:
  """Deterministic (seeded) epoch-shuffled iterator over a list of prompt records."""

  def __init__(self, records: Sequence[Any], *, seed: int, shuffle: bool = True,
               num_epochs: Optional[int] = None):
    if len(records) == 0:
      raise ValueError("PromptIterator: records is empty")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
      raise ValueError(f"PromptIterator: seed must be a non-negative int, got {seed!r}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"PromptIterator: num_epochs must be >= 1 or None, got {num_epochs}")
    self._records = records
    self._seed = seed
    self._shuffle = bool(shuffle)
    self._num_epochs = num_epochs
    ds = grain.MapDataset.source(records)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    self._ds = ds.repeat(num_epochs)
    self._n = len(records)
    self._total = None if num_epochs is None else self._n * num_epochs
    self._next = 0

  def __len__(self) -> int:
    return self._n

  def __iter__(self):
    return self

  def __next__(self):
    if self._total is not None and self._next >= self._total:
      raise StopIteration
    item = self._ds[self._next]
    self._next += 1
    return item

  next = __next__

  def next_batch(self, k: int) -> list:
    """The next `k` records (fewer only at the very end of a finite iterator)."""
    if k < 1:
      raise ValueError(f"next_batch: k must be >= 1, got {k}")
    out = []
    for _ in range(k):
      try:
        out.append(next(self))
      except StopIteration:
        if not out:
          raise
        break
    return out

  @property
  def epoch(self) -> int:
    return self._next // self._n

  @property
  def position(self) -> int:
    return self._next

  def get_state(self) -> dict:
    return {"next_index": int(self._next), "seed": int(self._seed),
            "num_records": int(self._n), "shuffle": int(self._shuffle)}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
      raise ValueError(f"PromptIterator.set_state: expected a dict with keys {_STATE_KEYS}, "
                       f"got {state!r:.200}")
    mine = self.get_state()
    for k in ("seed", "num_records", "shuffle"):
      if int(state[k]) != mine[k]:
        raise ValueError(f"PromptIterator.set_state: saved {k}={state[k]} but this iterator has "
                         f"{k}={mine[k]}; the checkpoint comes from a different data pipeline")
    nxt = int(state["next_index"])
    if nxt < 0 or (self._total is not None and nxt > self._total):
      raise ValueError(f"PromptIterator.set_state: next_index={nxt} is out of range")
    self._next = nxt
