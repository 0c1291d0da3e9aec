"""Host-side page pool of the continuous-batching engine: free list, refcounts, block tables.

The KV cache is a pool of `num_pages` pages of `page_size` token slots (per layer and kv head,
see `paged_attention.py`). A sequence's keys/values at position t live in page
`block_table[t // page_size]`, slot `t % page_size`. Pages are reference counted so the n
samples of a prompt point at the same prompt pages (vLLM's copy-on-write block sharing;
Levanter `inference/page_table.py`, its `clone` of a sequence): a page is written only by a
holder that owns it alone (`refcount == 1`); a shared partial page is copied first
(`PagePool.make_private`).

Page 0 is reserved as the null page: rows that are padding or have finished write there and
block tables are padded with it, so device code never needs a branch. It is never handed out.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

NULL_PAGE = 0


def pages_for(num_tokens: int, page_size: int) -> int:
  """ceil(num_tokens / page_size): pages covering positions [0, num_tokens)."""
  return -(-int(num_tokens) // int(page_size))


class PagePool:
  """Free list + refcounts over pages 1 .. num_pages - 1 (page 0 is the null page).

  `reserve` / `unreserve` keep a count of pages promised to admitted sequences but not yet
  allocated (their future decode pages), so admission never over-commits the pool and a
  running sequence never waits for a page: `num_available = num_free - reserved`.
  """

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}.")
    self.num_pages = int(num_pages)
    self.refcount = np.zeros((self.num_pages,), np.int32)
    self._free = list(range(self.num_pages - 1, 0, -1))  # pop() hands out low ids first
    self.reserved = 0
    self.peak_in_use = 0

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_available(self) -> int:
    """Pages that may still be promised: free minus reserved."""
    return len(self._free) - self.reserved

  @property
  def num_in_use(self) -> int:
    return self.num_pages - 1 - len(self._free)

  def alloc(self, n: int, *, from_reserved: bool = False) -> list[int]:
    """Takes n free pages (refcount 1 each); `from_reserved` draws them from the reservation."""
    n = int(n)
    if n < 0:
      raise ValueError(f"alloc: n={n} < 0.")
    budget = len(self._free) if from_reserved else self.num_available
    if n > budget:
      raise RuntimeError(f"page pool exhausted: asked for {n} pages, {budget} available "
                         f"({len(self._free)} free, {self.reserved} reserved, {self.num_pages} total).")
    if from_reserved:
      if n > self.reserved:
        raise RuntimeError(f"alloc: {n} pages drawn from a reservation of {self.reserved}.")
      self.reserved -= n
    ids = [self._free.pop() for _ in range(n)]
    self.refcount[ids] = 1
    self.peak_in_use = max(self.peak_in_use, self.num_in_use)
    return ids

  def reserve(self, n: int) -> None:
    if n > self.num_available:
      raise RuntimeError(f"reserve: {n} pages asked, {self.num_available} available.")
    self.reserved += int(n)

  def unreserve(self, n: int) -> None:
    if n > self.reserved:
      raise RuntimeError(f"unreserve: {n} > reserved {self.reserved}.")
    self.reserved -= int(n)

  def incref(self, ids) -> None:
    ids = list(ids)
    if any(self.refcount[i] <= 0 or i == NULL_PAGE for i in ids):
      raise RuntimeError(f"incref of a free or null page in {ids}.")
    np.add.at(self.refcount, ids, 1)

  def decref(self, ids) -> None:
    """Drops one reference per id; pages reaching 0 go back to the free list."""
    for i in ids:
      if i == NULL_PAGE or self.refcount[i] <= 0:
        raise RuntimeError(f"decref of a free or null page {i}.")
      self.refcount[i] -= 1
      if self.refcount[i] == 0:
        self._free.append(int(i))

  def make_private(self, page: int, *, from_reserved: bool = False) -> tuple[int, Optional[int]]:
    """Copy-on-write: (page to write, source to copy from or None).

    A page held only by the caller is written in place. A shared one gets a fresh page (the
    caller copies `page` into it on device) and the caller's reference to `page` is dropped.
    """
    if self.refcount[page] == 1:
      return page, None
    (new,) = self.alloc(1, from_reserved=from_reserved)
    self.decref([page])
    return new, page

  def check_all_free(self) -> None:
    """Raises unless every page is back on the free list and nothing is reserved."""
    if self.num_free != self.num_pages - 1 or self.reserved or self.refcount.any():
      leaked = np.flatnonzero(self.refcount).tolist()
      raise AssertionError(f"pages still held: {leaked[:16]} ({len(leaked)} pages), "
                           f"{self.num_free} free of {self.num_pages - 1}, reserved {self.reserved}.")


@dataclasses.dataclass
class Sequence:
  """Book-keeping of one row (a sample of a prompt) on the host.

  block_table: page ids holding positions [0, len(block_table) * page_size), local to the
    row's shard's pool (`shard`: the engine keeps one PagePool per row shard of the mesh).
  reserved: pages still promised to this row in the pool's reservation.
  """
  row: int
  prompt: int
  prompt_len: int
  max_new: int
  block_table: list
  reserved: int = 0
  step: int = 0          # index of the next token to sample
  last_token: int = 0    # the token fed at the next decode step
  done: bool = False
  shard: int = 0         # row shard (data x fsdp device group) whose pages the row holds

  def positions_needed(self, steps: int) -> int:
    """Cache positions [0, n) the next `steps` decode steps need.

    Step s feeds token s - 1 at position prompt_len + s - 1; the last token (s = max_new - 1) is
    never fed, so a row never needs more than prompt_len + max_new - 1 positions.
    """
    return min(self.prompt_len + self.step - 1 + steps, self.prompt_len + self.max_new - 1)

  def release(self, pool: PagePool) -> None:
    pool.decref(self.block_table)
    pool.unreserve(self.reserved)
    self.block_table, self.reserved = [], 0
