"""Sequences stepped directly on an engine's cache, outside a scheduler: for benchmarks and tests of the step.

`DirectSequences` plays the scheduler's part for a fixed set of sequences: it takes pages for what each row
writes (from the cache's own allocator, optionally scattered so page tables are not contiguous), builds the
`StepBatch`, runs the step and moves the lengths; `rollback` moves a length back like a rejected speculation.
Requests are served by the scheduler (runtime/scheduler/); this is for measuring and checking one step.
"""

from __future__ import annotations

import random

import torch

from ..backends.step import ChunkRow, StepBatch


class DirectSequences:
    """`count` sequences on `cache` (default: a fresh cache of the engine, or the engine's own)."""

    def __init__(self, engine, count: int, cache=None, shuffle: int | None = None) -> None:
        self.engine = engine
        if cache is None:
            try:
                cache = engine.allocate_cache()
            except ValueError:  # engines that serve only their own cache
                cache = engine.cache
        self.cache = cache
        self.tables: list[list[int]] = [[] for _ in range(count)]
        self.lengths = [0] * count
        self.rng = random.Random(shuffle) if shuffle is not None else None

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    def _grow(self, seq: int, positions: int) -> None:
        need = self.cache.pages.pages_for(positions) - len(self.tables[seq])
        if need > 0:
            extra = max(0, min(3, self.cache.pages.available - need)) if self.rng else 0
            taken = self.cache.pages.take(need + extra)
            if self.rng:  # scatter: keep a random subset, give the rest back (tables become non-contiguous)
                self.rng.shuffle(taken)
                self.cache.pages.release(taken[need:])
                taken = taken[:need]
            self.tables[seq] += taken

    def batch(self, seqs: list[int], rows: list[ChunkRow]) -> StepBatch:
        for seq, row in zip(seqs, rows, strict=True):
            self._grow(seq, self.lengths[seq] + row.written)
        return StepBatch.from_rows(rows, [self.tables[s] for s in seqs], [self.lengths[s] for s in seqs],
                                   self.page_size)

    def step(self, seqs: list[int], rows: list[ChunkRow]) -> torch.Tensor:
        logits = self.engine.step(self.cache, self.batch(seqs, rows))
        for seq, row in zip(seqs, rows, strict=True):
            self.lengths[seq] += row.written
        return logits

    def run(self, items: list[tuple[int, ChunkRow]]) -> torch.Tensor:
        """One step of (sequence, row) pairs (what `row(...)` makes)."""
        return self.step([seq for seq, _ in items], [r for _, r in items])

    def release(self) -> None:
        """Give every sequence's pages back (tests that use the engine's own cache)."""
        for table in self.tables:
            self.cache.pages.release(table)
        self.tables = [[] for _ in self.tables]
        self.lengths = [0] * len(self.lengths)

    def rollback(self, seq: int, length: int) -> None:
        assert 0 <= length <= self.lengths[seq]
        self.lengths[seq] = length

    def positions(self, seq: int, length: int | None = None) -> torch.Tensor:
        """Flat pool indices of a sequence's first `length` cached positions (default: all)."""
        count = self.lengths[seq] if length is None else length
        pos = torch.arange(count)
        table = torch.tensor(self.tables[seq] or [0], dtype=torch.long)
        return table[pos // self.page_size] * self.page_size + pos % self.page_size

    def keys(self, seq: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [layers, length, Hkv, D] of a sequence's cached positions."""
        k = self.cache.k.flatten(1, 2)
        v = self.cache.v.flatten(1, 2)
        index = self.positions(seq, length)
        return k[:, index], v[:, index]
